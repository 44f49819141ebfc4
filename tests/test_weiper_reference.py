"""`weiper` against a transcription of the authors' released code (mgranz/weiper, initial commit, as in the fork
omah03/weiper f3cdf25: `Weiper/OpenOOD/openood/postprocessors/weiper_kldiv/utils.py`, `weiper_kldiv_postprocessor.py`
and `configs/postprocessors/weiper_kldiv.yml`), written from that code, not through `ood.detectors.weiper`.

Both get the same perturbed head (the reference's `calculate_weiper_space` takes a precomputed `perturbed_fc`), the
same train bank and test rows. The transcription keeps the reference's float32 histograms, kernel and KL
(`dtype=float32`) or runs them in float64 (`ood`'s stated deviation); its two other stated deviations are knobs:
`chunk` (values per histogram chunk, the reference's 1000) and `batch` (train rows per setup batch, whose per-batch
means the reference averages). With the knobs at "no chunking, one batch" the scores must agree to rounding (1e-6:
the max softmax of both is float32; any departure from the reference's algorithm, such as smoothing padded one bin
to the other side, moves them by more than 1e-3); with the reference's knobs they must agree exactly where the
deviation cannot show and differ where it can.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ood.detectors import build_detector
from ood.detectors.weiper import WeiPer
from ood.features.bank import FeatureBank

#: `weiper_kldiv.yml`: `postprocessor_args` (without exact_minmax, n_samples_for_setup) and `postprocessor_sweep`
YML_ARGS = {"n_repeats": 100, "lambda_1": 2.5, "lambda_2": 0.1, "n_bins": 100, "perturbation_distance": 1.8,
            "smoothing": 4, "smoothing_perturbed": 15}
YML_SWEEP = {"lambda_1": [0.1, 1, 2.5, 4], "lambda_2": [0.1, 0.25, 1, 2.5, 5], "n_bins": [60, 80, 100],
             "perturbation_distance": [1.8, 2.0, 2.2, 2.4], "smoothing": [4, 8, 12, 20, 40],
             "smoothing_perturbed": [15, 25, 40]}
#: the README's optima (CIFAR-10 = the yml's args, CIFAR-100, ImageNet ResNet-50, ImageNet ViT-B/16), n_repeats 100
README_ROWS = [
    YML_ARGS,
    {**YML_ARGS, "perturbation_distance": 2.4, "lambda_1": 0.1, "lambda_2": 1, "smoothing_perturbed": 40},
    {**YML_ARGS, "perturbation_distance": 2.4, "lambda_2": 0.25, "smoothing": 40},
    {**YML_ARGS, "perturbation_distance": 2.0, "n_bins": 80, "smoothing": 40},
]
UNCHUNKED, ONE_BATCH = 10**9, 10**9


# ----- the transcription ---------------------------------------------------------------------------------------
def reference_head(w: torch.Tensor, b: torch.Tensor, directions: torch.Tensor,
                   delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`calculate_weiper_space` (noise_proportional, constant_length): copy r = W + (delta normalize(u_r)) ||w_c||."""
    weight = torch.cat([w + delta * F.normalize(u, dim=1) * w.norm(dim=1)[:, None] for u in directions])
    return weight, torch.cat([b for _ in directions])


def reference_density(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, n_bins: int, chunk: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """`calculate_density` -> `batch_histogram(x.T, bins_min_max=(low, high), probability=True)`: [N, n_bins].

    Edges: the jit `linspace(low, high + 1e-8, n_bins + 1)` in float32, with -inf / +inf slots outside; more than
    `chunk` values of a row are split into chunks whose fractions are summed (equal weight per chunk), then
    renormalised over all n_bins + 2 slots and the outer two dropped. (Its split into groups of 100 rows is per row.)"""
    steps = torch.arange(n_bins + 1, dtype=torch.float32) / n_bins
    inf = torch.tensor([float("inf")])
    bounds = torch.cat([-inf, low + steps * (high + 1e-8 - low), inf])[:, None, None]
    samples = x.T
    parts = samples.split(chunk) if samples.shape[0] > chunk else [samples]
    total = sum(((p[None] < bounds[1:]) & (p[None] >= bounds[:-1])).to(dtype).mean(1) for p in parts)
    return (total[1:-1] / total.sum(0)[None]).T


def reference_kl(p: torch.Tensor, q: torch.Tensor, width: int, eps: float) -> torch.Tensor:
    """`calculate_uncertainty` -> `kldiv(p, q, eps, UniformKernel(.., width), symmetric=True)`: [N].

    Only q is smoothed (a Conv1d running mean, padding="same", replicate: one channel here, the reference's diagonal
    100-channel kernel smooths each row alike); both + eps, renormalised;
    KL(p || q) + KL(q || p). (Its groups of 100 columns, padded with ones and cut back, are per column.)"""
    conv = torch.nn.Conv1d(1, 1, width, padding="same", padding_mode="replicate", bias=False).to(q.dtype)
    with torch.no_grad():
        conv.weight.fill_(1 / width)
        q_ = conv(q[:, None, :])[:, 0, :] + eps
    p_ = p + eps
    p_, q_ = p_ / p_.sum(), q_ / q_.sum(1, keepdim=True)
    q_p = q_.log() - p_.log()
    return -(p_ * q_p).sum(1) - (q_ * -q_p).sum(1)


def reference_scores(train: torch.Tensor, test: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     params: dict, chunk: int = 1000, batch: int = 5000,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`WeiPerKLDivPostprocessor.setup` (exact_minmax) + `postprocess` -> `calculate_WeiPerKLDiv_score`."""
    n_bins, r = params["n_bins"], params["n_repeats"]
    g_train, g_test = F.linear(train, weight, bias), F.linear(test, weight, bias)
    # setup, exact_minmax: global min / max of the train features and of their perturbed logits
    lo, hi, lo_w, hi_w = train.min(), train.max(), g_train.min(), g_train.max()
    # setup: the train densities of each batch averaged over its rows, then over the batches
    batches = list(zip(train.split(batch), g_train.split(batch)))
    p = sum(reference_density(h, lo, hi, n_bins, chunk, dtype).mean(0) for h, _ in batches) / len(batches)
    p_w = sum(reference_density(g, lo_w, hi_w, n_bins, chunk, dtype).mean(0) for _, g in batches) / len(batches)
    # calculate_WeiPerKLDiv_score: densities of the test rows, `calculate_weiper_pred`, the combination
    q = reference_density(test, lo, hi, n_bins, chunk, dtype)
    q_w = reference_density(g_test, lo_w, hi_w, n_bins, chunk, dtype)
    c = weight.shape[0] // r
    msp = torch.cat([g_test[:, i * c : (i + 1) * c].softmax(-1).max(-1)[0][:, None] for i in range(r)], -1)
    kl = reference_kl(p, q, params["smoothing"], 0.01)  # epsilon
    kl_w = reference_kl(p_w, q_w, params["smoothing_perturbed"], 0.025)  # epsilon_noise
    return -(kl + params["lambda_1"] * kl_w - params["lambda_2"] * msp.to(dtype).mean(-1))


# ----- data ----------------------------------------------------------------------------------------------------
def make_data(n_train: int, n_test: int, c: int, d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """ReLU features (many exact zeros: the train minimum, the first bin edge), a head, test rows that include
    OOD-like rows, values beyond the train range and values exactly on the feature bins' edges."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(c, d, generator=gen) * 2 * (torch.rand(c, d, generator=gen) < 0.5)
    w = (centres - centres.mean(0)) / 2 + 0.1 * torch.randn(c, d, generator=gen)
    b = 0.2 * torch.randn(c, generator=gen)
    train = (centres[torch.arange(n_train) % c] + 0.5 * torch.randn(n_train, d, generator=gen)).clamp(min=0)
    test = (centres[torch.arange(n_test) % c] + 0.5 * torch.randn(n_test, d, generator=gen)).clamp(min=0)
    test[n_test // 2 :] = (0.4 + 0.7 * torch.randn(n_test - n_test // 2, d, generator=gen)).clamp(min=0)
    test[0, :3] = torch.tensor([-1.0, 1e3, float(train.max())])  # below, above, at the train max
    return {"w": w, "b": b, "train": train, "test": test}


def put_on_edges(test: torch.Tensor, train: torch.Tensor, n_bins: int) -> torch.Tensor:
    """A copy of `test` whose row 1 holds every feature bin edge (the reference's float32 `linspace`) exactly."""
    steps = torch.arange(n_bins + 1, dtype=torch.float32) / n_bins
    edges = train.min() + steps * (train.max() + 1e-8 - train.min())
    out = test.clone()
    k = min(n_bins + 1, test.shape[1])
    out[1, :k] = edges[:k]
    return out


def bank(h: torch.Tensor, data: dict[str, torch.Tensor]) -> FeatureBank:
    return FeatureBank(h @ data["w"].T + data["b"], h, None, data["w"], data["b"])


def fit_both(data: dict[str, torch.Tensor], params: dict, test: torch.Tensor,
             **knobs: object) -> tuple[torch.Tensor, torch.Tensor, WeiPer]:
    """(ood's scores, the transcription's, the fitted detector) of `test`, the transcription given ood's head."""
    det = build_detector("weiper", **params).fit(bank(data["train"], data))
    ref = reference_scores(data["train"], test, det.weight_, det.bias_, params, **knobs)
    return det.score(bank(test, data)), ref, det


# ----- tests ---------------------------------------------------------------------------------------------------
def test_defaults_and_grid_are_the_yml_and_readme_values() -> None:
    """Defaults = the yml's postprocessor_args; every grid value is in the yml's sweep and is some README optimum."""
    det = WeiPer()
    assert {k: getattr(det, k) for k in YML_ARGS} == YML_ARGS
    for key, values in WeiPer.grid.items():
        assert set(values) <= set(YML_SWEEP[key]), key
        assert set(values) == {row[key] for row in README_ROWS}, key


def test_head_is_the_reference_perturbation() -> None:
    """Given the same unit directions (ood's seeded draws), ood's head is `calculate_weiper_space`'s."""
    data = make_data(20, 4, 5, 24)
    det = WeiPer(n_repeats=7, perturbation_distance=2.2, seed=3).fit(bank(data["train"], data))
    gen = torch.Generator().manual_seed(3)
    directions = torch.stack([torch.randn(5, 24, generator=gen) for _ in range(7)])
    weight, bias = reference_head(data["w"], data["b"], directions, 2.2)
    torch.testing.assert_close(det.weight_, weight, rtol=1e-6, atol=1e-6)
    assert torch.equal(det.bias_, bias)


#: (train rows, test rows, C, D, n_repeats) per README row: D and R C at most 1000 or a multiple of it (unchunked =
#: chunked); R C = 1000 at the default R = 100
CASES = {"cifar10": (40, 16, 5, 24, 20), "cifar100": (30, 12, 10, 300, 100), "in1k_r50": (20, 8, 4, 2000, 5),
         "in1k_vit": (30, 12, 25, 64, 8)}


@pytest.mark.parametrize("row", range(len(README_ROWS)), ids=list(CASES))
def test_scores_equal_the_reference(row: int) -> None:
    """Same head, bank, test rows (some beyond the train range, some exactly on the bin edges): the reference's own
    knobs (chunks of 1000 values, one setup batch) agree to rounding, in float64 and in the reference's float32."""
    n_train, n_test, c, d, r = CASES[list(CASES)[row]]
    params = {**README_ROWS[row], "n_repeats": r}
    data = make_data(n_train, n_test, c, d, seed=row)
    test = put_on_edges(data["test"], data["train"], params["n_bins"])
    ours, ref64, det = fit_both(data, params, test, chunk=1000, dtype=torch.float64)
    torch.testing.assert_close(ours, ref64, rtol=0, atol=1e-6)
    ref32 = reference_scores(data["train"], test, det.weight_, det.bias_, params)
    torch.testing.assert_close(ours, ref32.double(), rtol=0, atol=1e-6)


def test_score_grid_equals_the_reference_at_each_point() -> None:
    """One fit, one histogram pass: each (lambda_1, lambda_2, smoothing, smoothing_perturbed) is the reference's."""
    data = make_data(30, 12, 6, 50)
    params = {**YML_ARGS, "n_repeats": 10}
    det = build_detector("weiper", **params).fit(bank(data["train"], data))
    points = [{"lambda_1": l1, "lambda_2": l2, "smoothing": s, "smoothing_perturbed": sp}
              for l1, l2, s, sp in [(0.1, 1, 40, 40), (2.5, 0.25, 4, 15), (4, 5, 20, 25), (1, 2.5, 8, 40)]]
    for point, ours in zip(points, det.score_grid(bank(data["test"], data), points)):
        ref = reference_scores(data["train"], data["test"], det.weight_, det.bias_, {**params, **point},
                               dtype=torch.float64)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("d, c, r", [(2048, 4, 5), (24, 14, 100)], ids=["features_2048", "perturbed_1400"])
def test_chunked_histograms_are_the_only_difference(d: int, c: int, r: int) -> None:
    """More than 1000 values, not a multiple of 1000 (ResNet-50's D = 2048; R C = 1400): the reference weights its
    chunks of 1000 equally, ood counts exact fractions. The scores differ, and agree once the reference is unchunked."""
    data = make_data(20, 8, c, d)
    params = {**YML_ARGS, "n_repeats": r}
    ours, chunked, det = fit_both(data, params, data["test"], chunk=1000, dtype=torch.float64)
    assert (ours - chunked).abs().max() > 1e-3
    unchunked = reference_scores(data["train"], data["test"], det.weight_, det.bias_, params, chunk=UNCHUNKED,
                                 dtype=torch.float64)
    torch.testing.assert_close(ours, unchunked, rtol=0, atol=1e-6)


def test_train_density_is_the_row_mean_not_the_mean_of_batch_means() -> None:
    """The reference's p averages per-batch means: equal to ood's row mean for equal batches, not for a short last
    batch (and then ood equals the one-batch reference)."""
    data = make_data(40, 10, 5, 24)
    params = {**YML_ARGS, "n_repeats": 10}
    det = build_detector("weiper", **params).fit(bank(data["train"], data))
    ours = det.score(bank(data["test"], data))
    for batch, equal in [(20, True), (8, True), (15, False), (ONE_BATCH, True)]:
        ref = reference_scores(data["train"], data["test"], det.weight_, det.bias_, params, batch=batch,
                               dtype=torch.float64)
        assert torch.allclose(ours, ref, rtol=0, atol=1e-6) == equal, batch
