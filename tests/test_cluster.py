"""`method=cluster` ("Is it all a cluster game?"): losses, clusters, distances, per-cluster thresholds, GS (docs/methods/cluster.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fabricate import CASES, DIGITS
from helpers import NO_FIGURES, compose_config, rows_by, run_config
from omegaconf import OmegaConf
from sklearn.metrics import roc_curve

from ood.data.benchmark import EvalSplit
from ood.errors import ConfigError
from ood.features.bank import FeatureBank
from ood.losses import supcon
from ood.methods.augment import TensorAugment
from ood.methods.cluster import (
    ClusterMethod,
    check_percentiles,
    cluster_distances,
    cluster_precisions,
    cluster_statistics,
    global_separation,
    percentile_cdf,
)
from ood.models.small_cnn import SmallCNN


def _method(**kwargs: object) -> ClusterMethod:
    return ClusterMethod(SmallCNN(num_classes=3, feature_dim=8), optimizer=torch.optim.SGD, **kwargs)


def _bank(features: torch.Tensor, labels: torch.Tensor | None = None, num_classes: int = 3) -> FeatureBank:
    return FeatureBank(logits=torch.zeros(len(features), num_classes), features=features, labels=labels)


def _blobs(n: int = 40, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated Gaussian blobs (labels 0, 1, 2)."""
    gen = torch.Generator().manual_seed(seed)
    angles = torch.arange(3, dtype=torch.float64) * 2 * math.pi / 3
    centres = torch.zeros(3, dim, dtype=torch.float64)
    centres[:, 0], centres[:, 1] = 10 * angles.cos(), 10 * angles.sin()
    labels = torch.arange(3).repeat_interleave(n)
    return centres[labels] + torch.randn(3 * n, dim, generator=gen, dtype=torch.float64), labels


# ----- contrastive losses ---------------------------------------------------------------------------------------
def test_supcon_two_pairs_hand_value() -> None:
    """z = [a, a, b, b], a ⟂ b, T = 1: every anchor has one positive (s = 1) and denominator e + 2."""
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    z = torch.stack([a, a, b, b]).double()
    loss = supcon(z, torch.tensor([0, 0, 1, 1]), temperature=1.0)
    assert float(loss) == pytest.approx(math.log(math.e + 2) - 1, abs=1e-12)


def test_supcon_several_positives_hand_value() -> None:
    """z = [a, a, a, b], labels [0, 0, 0, 1], T = 0.5: anchors 0-2 have two positives at s/T = 2; anchor 3 none."""
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    z = torch.stack([a, a, a, b]).double()
    loss = supcon(z, torch.tensor([0, 0, 0, 1]), temperature=0.5)
    assert float(loss) == pytest.approx(math.log(2 * math.e**2 + 1) - 2, abs=1e-12)


def _supcontrast_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupContrast's `SupConLoss.forward` (losses.py, contrast_mode 'all', base_temperature 0.07), transcribed:
    features [bsz, n_views, dim]."""
    bsz, n_views = features.shape[:2]
    mask = (labels[:, None] == labels[None, :]).double()
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(1, keepdim=True).values.detach()
    mask = mask.repeat(n_views, n_views)
    logits_mask = 1 - torch.eye(bsz * n_views, dtype=torch.float64)
    mask = mask * logits_mask
    exp_logits = logits.exp() * logits_mask
    log_prob = logits - exp_logits.sum(1, keepdim=True).log()
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return (-(temperature / 0.07) * mean_log_prob_pos).view(n_views, bsz).mean()


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_supcon_with_a_base_temperature_is_supcontrasts_loss(temperature: float) -> None:
    """With SupContrast's base temperature (what `method=cluster` passes) the loss is its `SupConLoss`, x T / 0.07
    the paper's L^sup_out: x1.43 at OODformer's 0.1, x7.1 at SimCLR's 0.5."""
    gen = torch.Generator().manual_seed(3)
    views = F.normalize(torch.randn(8, 2, 6, generator=gen, dtype=torch.float64), dim=2)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    z, ids = torch.cat(torch.unbind(views, dim=1)), labels.repeat(2)
    ours = supcon(z, ids, temperature, base_temperature=0.07)
    assert float(ours) == pytest.approx(float(_supcontrast_loss(views, labels, temperature)), abs=1e-12)
    assert float(ours) == pytest.approx(temperature / 0.07 * float(supcon(z, ids, temperature)), abs=1e-12)


def test_supcon_with_unique_labels_is_simclr() -> None:
    """Every sample its own class: SupCon equals NT-Xent written as cross-entropy over the other 2N - 1 views."""
    n, temperature = 6, 0.5
    z = F.normalize(torch.randn(2 * n, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64), dim=1)
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    target = (torch.arange(2 * n) + n) % (2 * n)
    expected = F.cross_entropy(logits, target)
    assert float(supcon(z, torch.arange(n).repeat(2), temperature)) == pytest.approx(float(expected), abs=1e-12)


@pytest.mark.parametrize("probe_features", ["raw", "normalized"])
def test_contrastive_probe_reads_raw_or_normalised_features(probe_features: str) -> None:
    """The cache holds the probe's input (raw h by default, as OODformer's linear probe) and its logits; the cluster
    embedding z is the normalised h either way."""
    method = _method(objective="supcon", probe_features=probe_features).eval()
    x = torch.randn(5, 1, 16, 16)
    out = method.eval_outputs(x, EvalSplit("test", "id_test"))
    h = method.backbone.features(x)[0]
    expected = h if probe_features == "raw" else F.normalize(h, dim=1)
    assert torch.allclose(out["features"], expected, atol=1e-6)
    w, b = method.backbone.fc.weight, method.backbone.fc.bias
    assert torch.allclose(out["logits"], out["features"] @ w.T + b, atol=1e-6)
    assert torch.allclose(method(x), out["logits"], atol=1e-6)
    assert torch.allclose(method._embedding(out["features"]), F.normalize(h, dim=1), atol=1e-6)


@pytest.mark.parametrize("objective", ["supcon", "simclr"])
def test_oodformer_preset_builds_supcontrast_head(tmp_path: Path, objective: str) -> None:
    """experiment=cluster_oodformer: SupContrast's `mlp` head, feature dim -> feature dim -> 128 (OODformer
    2048-2048-128 on ResNet-50; 512-512-128 on the preset's ResNet-18), OODformer's temperatures and SupContrast's
    base temperature."""
    from ood.utils import instantiate

    cfg = compose_config(tmp_path, ["experiment=cluster_oodformer", f"method.objective={objective}"])
    backbone = instantiate(cfg.backbone, num_classes=10)
    method = instantiate(cfg.method, backbone=backbone)
    linears = [m for m in method.head.modules() if isinstance(m, torch.nn.Linear)]
    dim = backbone.feature_dim
    assert [(m.in_features, m.out_features) for m in linears] == [(dim, dim), (dim, 128)]
    assert method.temperature == {"supcon": 0.1, "simclr": 0.5}[objective]
    assert method.base_temperature == 0.07  # SupContrast's loss scale T / 0.07


def test_the_cluster_game_picks_its_schedule_from_the_scheduler_group(tmp_path: Path) -> None:
    """`method=cluster method/scheduler=openood` failed to compose ("Could not override 'method/scheduler'. No match
    in the defaults list": cluster.yaml held a copy of the cosine instead of the group); now it composes: objective=ce
    anneals per iteration, the contrastive stage (stepped by hand per epoch) refuses it in one line naming the fix."""
    from ood.utils import instantiate

    cfg = compose_config(tmp_path, ["method=cluster", "method/scheduler=openood"])
    method = instantiate(cfg.method, backbone=SmallCNN(3, feature_dim=8))
    optimizer = method.configure_optimizers()["optimizer"]
    assert method.lr_scheduler_config(optimizer)["interval"] == "step"
    cfg = compose_config(tmp_path, ["method=cluster", "method/scheduler=openood", "method.objective=supcon"])
    with pytest.raises(ConfigError, match=r"^method.scheduler: ClusterMethod steps .*: give a per-epoch torch "
                                          r"scheduler \(method/scheduler=cosine\)$"):
        instantiate(cfg.method, backbone=SmallCNN(3, feature_dim=8)).configure_optimizers()
    default = compose_config(tmp_path, ["method=cluster"]).method.scheduler  # the digits default, as before
    assert OmegaConf.to_container(default, resolve=True) == {
        "_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True, "T_max": 15}


def test_augmentation_is_identity_when_off() -> None:
    """All knobs at zero give the input back (identity affine grid); `auto` on grey images is the no-flip digits preset."""
    x = torch.randn(4, 1, 16, 16)
    assert torch.allclose(TensorAugment()(x), x, atol=1e-5)
    assert TensorAugment.preset("auto", channels=1) == TensorAugment.preset("digits", channels=1)
    assert not TensorAugment.preset("digits", channels=1).flip


# ----- clusters and distances ---------------------------------------------------------------------------------
def test_class_mean_centres_are_per_class_means() -> None:
    z, y = _blobs()
    method = _method(clusters="class_mean", distance="euclidean")
    method.setup_ood({"train": _bank(z, y)})
    expected = torch.stack([z[y == c].mean(0) for c in range(3)])
    assert torch.allclose(method._fit["centres"], expected, atol=1e-12)


def test_a_class_missing_from_the_fit_split_is_one_line() -> None:
    """Class-mean centres are the present classes' means (OODformer: one per torch.unique(train_targets)). A class
    without a fit image (a small data.fit_fraction) got a zero centre, under which a sample at the origin scored as
    the most in-distribution of all; now a one-line ConfigError naming the class. k-means centres need no class."""
    z, y = _blobs()
    present = y < 2
    method = _method(distance="euclidean")
    with pytest.raises(ConfigError, match=r"^cluster: 1 of the 3 classes have no training image in the fit split "
                                          r"\(first: \[2\]\), so they have no class-mean centre"):
        method.setup_ood({"train": _bank(z[present], y[present])})
    _method(clusters="kmeans", k=2, n_init=1, distance="euclidean").setup_ood({"train": _bank(z[present], y[present])})


def test_kmeans_on_separated_blobs_has_purity_one() -> None:
    z, y = _blobs()
    method = _method(clusters="kmeans", k=3, n_init=3, distance="euclidean")
    method.setup_ood({"train": _bank(z, y)})
    assert method.cluster_stats["purity"] == 1.0
    assert sorted(method.cluster_stats["sizes"]) == [40, 40, 40]
    assert method.cluster_stats["gs_min"] > 0.5 and method.cluster_stats["silhouette"] > 0.5


def test_a_centre_scores_zero_under_euclidean() -> None:
    z, y = _blobs()
    method = _method(distance="euclidean")
    method.setup_ood({"train": _bank(z, y)})
    centres = method._fit["centres"]
    assert torch.equal(method.ood_score(_bank(centres)), torch.zeros(3, dtype=torch.float64))
    assert bool((method.ood_score(_bank(z)) < 0).all())


def test_cosine_score_is_invariant_to_positive_scaling() -> None:
    z, y = _blobs()
    method = _method(distance="cosine")
    method.setup_ood({"train": _bank(z, y)})
    queries = torch.randn(20, 8, dtype=torch.float64)
    assert torch.allclose(method.ood_score(_bank(queries)), method.ood_score(_bank(3.7 * queries)), atol=1e-12)
    assert float(method.ood_score(_bank(method._fit["centres"])).min()) == pytest.approx(1.0)


def test_mahalanobis_with_identity_is_squared_euclidean() -> None:
    z, centres = torch.randn(30, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    brute = ((z[:, None, :] - centres[None]) ** 2).sum(-1)
    assert torch.allclose(cluster_distances(z, centres, "mahalanobis", torch.eye(4)), brute, atol=1e-10)
    per_centre = torch.eye(4, dtype=torch.float64).expand(5, 4, 4)
    assert torch.allclose(cluster_distances(z, centres, "mahalanobis", per_centre), brute, atol=1e-10)
    assert torch.allclose(cluster_distances(z, centres, "euclidean"), brute, atol=1e-10)


@pytest.mark.parametrize("covariance", ["shared", "per_cluster"])
def test_pinv_of_rank_deficient_covariance_gives_finite_scores(covariance: str) -> None:
    """Train features span 2 of 5 dims: the pseudo-inverse keeps every score finite, also off the span. Known answer:
    NumPy's pinv of the (class-centred or per-class) covariance with denominator N, and s = -min_c squared
    Mahalanobis distance under it, which ignores the three dims the train rows never leave."""
    z2, y = _blobs(dim=2)
    z = torch.cat([z2, torch.zeros(len(z2), 3, dtype=torch.float64)], 1)
    method = _method(distance="mahalanobis", covariance=covariance)
    method.setup_ood({"train": _bank(z, y)})
    zn, yn = z.numpy(), y.numpy()
    means = np.stack([zn[yn == c].mean(0) for c in range(3)])
    centred = zn - means[yn]
    precision = ([np.linalg.pinv(centred.T @ centred / len(zn))] * 3 if covariance == "shared"
                 else [np.linalg.pinv(np.cov(zn[yn == c].T, ddof=0)) for c in range(3)])
    fitted = np.broadcast_to(method._fit["precision"].numpy(), (3, 5, 5))  # shared: one matrix for the three
    np.testing.assert_allclose(fitted, np.stack(precision), rtol=0, atol=1e-12)
    queries = torch.randn(50, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    d = np.stack([np.einsum("ni,ij,nj->n", queries.numpy() - means[c], precision[c], queries.numpy() - means[c])
                  for c in range(3)], 1)
    scores = method.ood_score(_bank(queries))
    assert bool(torch.isfinite(scores).all())
    np.testing.assert_allclose(scores.numpy(), -d.min(1), rtol=1e-12, atol=1e-10)
    on_span = torch.cat([queries[:, :2], torch.zeros(50, 3, dtype=torch.float64)], 1)
    torch.testing.assert_close(method.ood_score(_bank(on_span)), scores, rtol=1e-12, atol=1e-10)


def test_oodformer_covariance_is_inv_of_numpy_cov() -> None:
    """OODformer: per class np.linalg.inv(np.cov(z_c.T)) (N-1 denominator); shared: the same on class-centred rows."""
    z, y = _blobs(n=30, dim=3)
    means = torch.stack([z[y == c].mean(0) for c in range(3)])
    precision = cluster_precisions(z, y, means, "per_cluster", inverse="inv", ddof=1)
    for c in range(3):
        assert np.allclose(precision[c].numpy(), np.linalg.inv(np.cov(z[y == c].numpy().T)), atol=1e-8)
    centred = (z - means[y]).numpy()
    shared = cluster_precisions(z, y, means, "shared", inverse="inv", ddof=1)
    assert np.allclose(shared.numpy(), np.linalg.inv(centred.T @ centred / (len(z) - 1)), atol=1e-8)
    flat = torch.cat([z, torch.zeros(len(z), 1, dtype=torch.float64)], 1)
    with pytest.raises(ConfigError, match=r"class-centred features \(90 rows, 4 dims\) is singular \(rank 3\).*cov_inverse=pinv"):
        cluster_precisions(flat, y, torch.cat([means, torch.zeros(3, 1, dtype=torch.float64)], 1), "shared", inverse="inv")
    # fewer members than dimensions (OODformer's CIFAR-100: 500 per class, 512 dims): `inv` returned entries of 1e17
    few = torch.randn(12, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pairs = torch.arange(12) % 2
    few_means = torch.stack([few[pairs == c].mean(0) for c in range(2)])
    with pytest.raises(ConfigError, match=r"cluster 0 \(6 rows, 8 dims\) is singular \(rank 5\)"):
        cluster_precisions(few, pairs, few_means, "per_cluster", inverse="inv", ddof=1)
    assert bool(torch.isfinite(cluster_precisions(few, pairs, few_means, "per_cluster", ddof=1)).all())


def test_gt_assignment_scores_id_against_its_own_centre() -> None:
    """Centres 0 and 10 on a line: an ID sample of class 0 at 7 scores -(7-0)^2 under gt, -(7-10)^2 under nearest;
    OOD samples (label -1) always use the nearest centre."""
    z = torch.tensor([[-1.0], [1.0], [9.0], [11.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    test = _bank(torch.tensor([[7.0], [7.0]], dtype=torch.float64), torch.tensor([0, -1]), num_classes=2)
    scores = {}
    for assignment in ("nearest", "gt"):
        method = _method(distance="euclidean", id_assignment=assignment)
        method.setup_ood({"train": _bank(z, y, num_classes=2)})
        scores[assignment] = method.ood_score(test).tolist()
    assert scores == {"nearest": [-9.0, -9.0], "gt": [-49.0, -9.0]}
    with pytest.raises(ConfigError, match="id_assignment=gt needs method.clusters=class_mean"):
        _method(clusters="kmeans", id_assignment="gt")


def test_per_cluster_precision_is_the_pinv_of_each_cluster_covariance() -> None:
    z, y = _blobs(n=30, dim=3)
    means = torch.stack([z[y == c].mean(0) for c in range(3)])
    precision = cluster_precisions(z, y, means, "per_cluster")
    for c in range(3):
        cov = np.cov(z[y == c].numpy().T, bias=True)
        assert np.allclose(precision[c].numpy(), np.linalg.inv(cov), atol=1e-8)


# ----- per-cluster thresholds ---------------------------------------------------------------------------------
def test_percentile_cdf_inverts_numpy_percentile() -> None:
    d = torch.rand(37, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 5
    sorted_d = d.sort().values
    p = np.arange(101)
    t = torch.from_numpy(np.percentile(d.numpy(), p))
    assert torch.allclose(percentile_cdf(sorted_d, t), torch.from_numpy(p / 100), atol=1e-12)
    far = percentile_cdf(sorted_d, torch.tensor([-1.0, 6.0, 9.0], dtype=torch.float64))
    assert bool(far[0] < 0) and bool(1 < far[1] < far[2])


def test_per_cluster_percentile_sweep_lies_on_the_roc_of_the_score() -> None:
    """Brute force: OOD iff d >= t_c(p) for p = 0..100; every (FPR, TPR) point is a vertex of the score's ROC."""
    z, y = _blobs(n=30, dim=2)
    method = _method(distance="euclidean", threshold="per_cluster")
    method.setup_ood({"train": _bank(z, y)})
    gen = torch.Generator().manual_seed(3)
    id_test, _ = _blobs(n=20, dim=2, seed=4)
    ood = torch.randn(60, 2, generator=gen, dtype=torch.float64) * 6 + 5
    queries = torch.cat([id_test, ood])
    is_id = np.r_[np.ones(len(id_test)), np.zeros(len(ood))]

    centres = z.numpy().reshape(3, 30, 2).mean(1)
    own = ((z.numpy() - centres[y.numpy()]) ** 2).sum(1)
    dist = ((queries.numpy()[:, None] - centres[None]) ** 2).sum(-1)
    nearest, d = dist.argmin(1), dist.min(1)
    fpr, tpr, _ = roc_curve(is_id, method.ood_score(_bank(queries)).numpy(), drop_intermediate=False)
    vertices = {(round(a, 12), round(b, 12)) for a, b in zip(fpr, tpr)}
    for p in range(101):
        t = np.array([np.percentile(own[y.numpy() == c], p) for c in range(3)])
        accepted = d < t[nearest]
        point = (round(accepted[is_id == 0].mean(), 12), round(accepted[is_id == 1].mean(), 12))
        assert point in vertices, f"p={p}: {point} is not on the ROC"


def test_cosine_per_cluster_score_orders_as_oodformers_similarity_sweep() -> None:
    """OODformer's `calculate_auroc` for Cosine (eval_metric.py:95-98), transcribed: t_c(p) = the p-th percentile of
    class c's train cosine similarities to its centre (sklearn's `cosine_similarity`), OOD iff sim <= t_c(p) of the
    predicted class (argmax similarity, OOD_Distance.py:325). Every (FPR, TPR) of that sweep is a vertex of the ROC
    of our per-cluster score on 1 - cos."""
    from sklearn.metrics.pairwise import cosine_similarity

    z, y = _blobs(n=30, dim=3)
    method = _method(distance="cosine", threshold="per_cluster")
    method.setup_ood({"train": _bank(z, y)})
    id_test, _ = _blobs(n=20, dim=3, seed=4)
    ood = torch.randn(60, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 6 + 3
    queries = torch.cat([id_test, ood])
    is_id = np.r_[np.ones(len(id_test)), np.zeros(len(ood))]

    centres = np.stack([z.numpy()[y.numpy() == c].mean(0) for c in range(3)])
    train_sim = cosine_similarity(z.numpy(), centres)[np.arange(len(z)), y.numpy()]
    sim = cosine_similarity(queries.numpy(), centres)
    predicted, s = sim.argmax(1), sim.max(1)
    fpr, tpr, _ = roc_curve(is_id, method.ood_score(_bank(queries)).numpy(), drop_intermediate=False)
    vertices = {(round(a, 12), round(b, 12)) for a, b in zip(fpr, tpr)}
    for p in range(101):
        t = np.array([np.percentile(train_sim[y.numpy() == c], p) for c in range(3)])
        accepted = s > t[predicted]
        point = (round(accepted[is_id == 0].mean(), 12), round(accepted[is_id == 1].mean(), 12))
        assert point in vertices, f"p={p}: {point} is not on the ROC"


def test_per_cluster_threshold_on_a_class_of_two_is_refused_at_fit_with_the_clusters_fix() -> None:
    """Two members are equidistant from their mean: no percentile CDF. Refused in setup_ood, naming the cluster; the
    fix for class-mean clusters is the global threshold (method.k, the k-means fix, does nothing there)."""
    z, y = _blobs(n=30, dim=2)
    keep = torch.cat([torch.arange(30), torch.tensor([30, 31]), torch.arange(60, 90)])
    method = _method(distance="euclidean", threshold="per_cluster")
    with pytest.raises(ConfigError, match=r"per_cluster threshold: 1 of the 3 clusters have fewer than two distinct "
                                          r"train distances \(first: \[1\], with \[2\] members\); use method.threshold=global"):
        method.setup_ood({"train": _bank(z[keep], y[keep])})
    _method(distance="euclidean").setup_ood({"train": _bank(z[keep], y[keep])})  # the global threshold fits


def test_distances_equal_up_to_rounding_count_as_one() -> None:
    """Two members of a class are equidistant from its mean; float64 distances may miss that by an ulp (torch.cdist's
    matrix-product form with MKL's AVX2 kernels did, and the class of two above was not refused there: its
    percentile slope was 1 / 2e-16). Distances within 1e-9 of each other, relative, count as one value."""
    one_ulp = torch.tensor([1.0, 1.0 + 2.3e-16], dtype=torch.float64)
    assert bool(one_ulp[1] > one_ulp[0])
    with pytest.raises(ConfigError, match=r"^per_cluster threshold: 1 of the 2 clusters have fewer than two distinct "
                                          r"train distances \(first: \[1\], with \[2\] members\); lower method.k$"):
        check_percentiles([torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), one_ulp], "kmeans")
    with pytest.raises(ConfigError, match="at least two distinct train distances"):
        percentile_cdf(one_ulp, torch.tensor([1.0], dtype=torch.float64))
    apart = torch.tensor([1.0, 1.0 + 1e-6], dtype=torch.float64)
    check_percentiles([apart], "kmeans")
    assert percentile_cdf(apart, torch.tensor([1.0 + 5e-7], dtype=torch.float64)).tolist() == pytest.approx([0.5], abs=1e-9)


# ----- diagnostics ----------------------------------------------------------------------------------------------
def test_global_separation_hand_value() -> None:
    """A = {0, 1}, B = {3, 5} on a line: P(A,A) = 1, P(B,B) = 2, P(A,B) = 3.5 -> GS = [5/7, 3/7]."""
    z = torch.tensor([[0.0], [1.0], [3.0], [5.0]])
    gs = global_separation(z, torch.tensor([0, 0, 1, 1]), 2)
    assert torch.allclose(gs, torch.tensor([5 / 7, 3 / 7], dtype=torch.float64), atol=1e-12)
    random = global_separation(torch.randn(50, 3), torch.randint(0, 4, (50,)), 4)
    assert bool((random.abs() <= 1).all())


def test_silhouette_is_left_out_when_every_row_is_its_own_cluster() -> None:
    """As many clusters present as rows (one image per class, k-means k >= the rows): scikit-learn refuses the
    silhouette; the diagnostics leave it out instead of failing the run after its training."""
    z, labels = torch.randn(4, 3, dtype=torch.float64), torch.arange(4)
    stats = cluster_statistics(z, labels, labels, 4, False, 2000, 0)
    assert "silhouette" not in stats and stats["sizes"] == [1, 1, 1, 1]
    assert "silhouette" in cluster_statistics(z, labels, labels % 2, 2, False, 2000, 0)




@pytest.mark.slow
@pytest.mark.parametrize("objective", list(CASES))
def test_digits_run_per_objective(tmp_path: Path, objective: str) -> None:
    overrides, near_floor, far_floor = CASES[objective]
    rows = rows_by(run_config(tmp_path, [*DIGITS, *overrides, NO_FIGURES]), "cluster")  # no test here reads a figure
    assert rows["digits_6_9"]["auroc"] >= near_floor
    far = [r["auroc"] for name, r in rows.items() if r["ood_group"] == "far"]
    assert sum(far) / len(far) >= far_floor
    assert rows["digits_6_9"]["method_params"]["objective"] == objective
    stats = json.loads((tmp_path / "cluster_stats.json").read_text())
    assert -1 <= stats["gs_mean"] <= 1 and ("purity" in stats) == (objective == "simclr")
    if objective == "supcon":  # the checkpoint (encoder, head, probe) reloads strictly and evaluates the same
        again = rows_by(run_config(tmp_path / "eval", [*DIGITS, *overrides, NO_FIGURES, "train=false",
                                                       f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"]), "cluster")
        assert again["digits_6_9"]["auroc"] == rows["digits_6_9"]["auroc"]
        assert again["digits_6_9"]["id_acc"] == rows["digits_6_9"]["id_acc"]


def test_more_kmeans_centres_than_fit_images_are_refused_before_training(tmp_path: Path) -> None:
    """`method.clusters=kmeans method.k=1000` on digits (650 training images) trained the whole run, then failed in
    `ood.neighbors.kmeans` with a traceback; `prepare` (fit start) now refuses it by name, as `setup_ood` does for an
    evaluated checkpoint, and k up to the image count passes."""
    from ood.utils import instantiate

    cfg = compose_config(tmp_path, ["method=cluster", "method.clusters=kmeans", "method.k=1000", "data.fit_fraction=0.5"])
    data = instantiate(cfg.data, seed=0).fit_data()
    method = instantiate(cfg.method, backbone=SmallCNN(6))
    with pytest.raises(ConfigError, match=r"^method.k=1000 k-means centres, but the fit split has 325 ID training "
                                          r"images; lower method.k \(or raise data.fit_fraction\)$"):
        method.prepare(data)
    method.hparams.k = 325
    method.prepare(data)
    bank = FeatureBank(logits=torch.randn(6, 6), features=torch.randn(6, 64), labels=torch.arange(6))
    with pytest.raises(ConfigError, match=r"^method.k=325 k-means centres, but the fit split has 6 ID training images"):
        method.setup_ood({"train": bank})
