"""Equality with the reference code: each cache detector against an independent transcription of its reference's
scoring (OpenOOD's postprocessor, or pytorch-ood's detector or the authors' code where OpenOOD has none), written here in a few lines of
NumPy / torch / scikit-learn on fixed synthetic features, never through the detector's code path.

Deterministic computations must agree to float tolerance; the others (Weibull and mixture fits, thresholded counts)
in ranking: Spearman rho >= 0.999 and AUROC (ID test vs OOD) within 1e-3.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from fabricate import REF_CLASSES, REF_DIM, centred_banks
from scipy.special import logsumexp
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture

from ood.detectors import build_detector
from ood.features.bank import FeatureBank
from ood.metrics import ood_metrics

C, D = REF_CLASSES, REF_DIM


@pytest.fixture(scope="module")
def ref() -> dict[str, FeatureBank]:
    """ReLU features around a class centre each (ID) or around the mean centre (OOD); a head roughly aligned with the
    centres (most, not all, train samples classified correctly)."""
    return centred_banks(7, {"train": 300, "val": 120, "test": 150, "ood": 150}, ood_labelled=False)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _agree(ours: tuple[torch.Tensor, torch.Tensor], theirs: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """Spearman rho over ID test + OOD scores and the AUROC difference; asserts the rank criterion."""
    a, b = np.concatenate([_np(s) for s in ours]), np.concatenate(theirs)
    rho = float(scipy.stats.spearmanr(a, b).statistic)
    auroc = lambda s: ood_metrics(torch.as_tensor(s[0]), torch.as_tensor(s[1]))["auroc"]  # noqa: E731
    diff = abs(auroc([_np(s) for s in ours]) - auroc(theirs))
    assert rho >= 0.999 and diff <= 1e-3, (rho, diff)
    return rho, diff


def _ours(name: str, banks: dict[str, FeatureBank], fit: str, **hparams: object) -> tuple[torch.Tensor, torch.Tensor]:
    det = build_detector(name, **hparams).fit(banks[fit])
    return det.score(banks["test"]), det.score(banks["ood"])


def _wb(bank: FeatureBank) -> tuple[np.ndarray, np.ndarray]:
    return _np(bank.weight), _np(bank.bias)


# ----- OpenOOD residual_postprocessor.py: eig of the uncentred covariance of (h - u) on ID val ----------------------
def test_residual_equals_openood(ref: dict[str, FeatureBank]) -> None:
    w, b = _wb(ref["val"])
    u = -np.linalg.pinv(w) @ b
    x = _np(ref["val"].features) - u
    vals, vecs = np.linalg.eig(x.T @ x / len(x))
    ns = np.ascontiguousarray(vecs.T[np.argsort(-vals.real)[12:]].T.real)
    theirs = [-np.linalg.norm((_np(ref[s].features) - u) @ ns, axis=-1) for s in ("test", "ood")]
    ours = _ours("residual", ref, "val", dim=12)
    for o, t in zip(ours, theirs):
        np.testing.assert_allclose(_np(o), t, rtol=1e-5)
    _agree(ours, theirs)


# ----- OpenOOD relation_postprocessor.py ----------------------------------------------------------------------------
@pytest.mark.parametrize("power", [1, 4])
def test_relation_equals_openood(ref: dict[str, FeatureBank], power: int) -> None:
    def normalise(f: torch.Tensor) -> torch.Tensor:
        return f / torch.sqrt((f**2).sum(-1) + 1e-10).reshape(-1, 1)

    train = ref["train"]
    ft, pt = normalise(train.features.float()), torch.softmax(train.logits.float(), 1)

    def relation(bank: FeatureBank) -> np.ndarray:
        f, p = normalise(bank.features.float()), torch.softmax(bank.logits.float(), 1)
        rel = torch.clamp(f @ ft.T, min=0.0) * (p @ pt.T)
        rel = (rel.abs() > 0.03) * rel
        return _np((rel.sign() * rel.abs() ** power).sum(-1))

    theirs = [relation(ref[s]) for s in ("test", "ood")]
    ours = _ours("relation", ref, "train", pow=power)
    for o, t in zip(ours, theirs):
        np.testing.assert_allclose(_np(o), t, rtol=1e-5)
    _agree(ours, theirs)


# ----- OpenOOD vra_postprocessor.py: clip to ID-val percentiles, energy ---------------------------------------------
def test_vra_equals_openood(ref: dict[str, FeatureBank]) -> None:
    acts = _np(ref["val"].features).flatten()
    high, low = np.percentile(acts, 95), np.percentile(acts, 5)
    w, b = _wb(ref["val"])
    theirs = [logsumexp(_np(ref[s].features).clip(min=low, max=high) @ w.T + b, axis=1) for s in ("test", "ood")]
    ours = _ours("vra", ref, "val", percentile_high=95, percentile_low=5)
    for o, t in zip(ours, theirs):
        np.testing.assert_allclose(_np(o), t, rtol=1e-10)
    _agree(ours, theirs)


# ----- OpenOOD cfood_postprocessor.py: per-reference sorted self-distances, per-query reach counts -------------------
@pytest.mark.parametrize("alpha, k", [(1.0, 0.01), (0.5, 0.05)])
def test_cfood_equals_openood(ref: dict[str, FeatureBank], alpha: float, k: float) -> None:
    feats = ref["train"].features.float()
    feats = feats / (torch.norm(feats, dim=1, keepdim=True) + 1e-10)
    n = int(alpha * len(feats)) if alpha < 1 else len(feats)
    # the subset: OpenOOD draws torch.randperm from the global RNG; the detector from a generator seeded with 0
    refs = feats[torch.randperm(len(feats), generator=torch.Generator().manual_seed(0))[:n]] if alpha < 1 else feats
    kval = np.concatenate((np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81), np.linspace(0.51, 0.99, 49)))
    kpos = np.array(kval * n - 1, dtype=int)
    keep = np.concatenate(([True], kpos[:-1] < kpos[1:]))
    kval, kpos = kval[keep], kpos[keep]
    knndst = torch.stack([torch.sort(torch.sum((refs[i] - refs) ** 2, dim=1)).values[kpos + 1] for i in range(n)])

    def cfood(bank: FeatureBank) -> np.ndarray:
        f = bank.features.float()
        f = f / (torch.norm(f, dim=1, keepdim=True) + 1e-10)
        out = []
        for v in f:
            count = (knndst >= torch.sum((v - refs) ** 2, dim=1).view(n, 1)).sum(0).float() / n
            pos = torch.nonzero(count >= k)
            out.append(-(kval[pos[0, 0]] if len(pos) else 1.0))
        return np.array(out)

    theirs = [cfood(ref[s]) for s in ("test", "ood")]
    ours = _ours("cfood", ref, "train", alpha=alpha, k=k)
    for o, t in zip(ours, theirs):  # each score minus one of the listed k values: equal, not 98 % equal
        np.testing.assert_array_equal(_np(o), t)
    _agree(ours, theirs)


# ----- OpenOOD openmax_postprocessor.py with a scipy Weibull in place of libMR, shift 1 as in libmr 0.1.9 ---------------
def test_openmax_equals_openood(ref: dict[str, FeatureBank]) -> None:
    train = ref["train"]
    logits, labels = _np(train.logits), train.labels.numpy()
    tail, alpha, translation = 20, 3, 1
    models = []
    for c in range(C):
        right = logits[(labels == c) & (logits.argmax(1) == c)]
        mav = right.mean(0)
        dist = np.sort(np.linalg.norm(right - mav, axis=1))[-tail:]
        _, shape, _, scale = scipy.stats.exponweib.fit(dist + translation - dist.min(), floc=0, f0=1)
        models.append((mav, shape, scale, dist.min()))

    def openmax(bank: FeatureBank) -> np.ndarray:
        logits = _np(bank.logits)
        # w_score of every (sample, class), one scipy call per class
        wscore = np.stack(
            [
                scipy.stats.exponweib.cdf(np.linalg.norm(logits - mav, axis=1) + translation - low, a=1, c=shape, loc=0, scale=scale)
                for mav, shape, scale, low in models
            ],
            axis=1,
        )
        out = []
        for x, w in zip(logits, wscore):
            omega = np.zeros(C)
            omega[x.argsort()[::-1][:alpha]] = [((alpha + 1) - i) / float(alpha) for i in range(1, alpha + 1)]
            modified = x * (1 - w * omega)
            unknown = np.exp(np.sum(x - modified))
            out.append(-unknown / (np.exp(modified).sum() + unknown))
        return np.array(out)

    theirs = [openmax(ref[s]) for s in ("test", "ood")]
    _agree(_ours("openmax", ref, "train"), theirs)


# ----- OpenOOD gmm_postprocessor.py: sklearn PCA (uncentred projection) + tied GaussianMixture -----------------------
def test_gmm_equals_openood(ref: dict[str, FeatureBank]) -> None:
    x = _np(ref["train"].features)
    transform = PCA(n_components=8).fit(x).components_.T
    gm = GaussianMixture(n_components=5, random_state=0, covariance_type="tied").fit(x @ transform)

    def gmm(bank: FeatureBank) -> np.ndarray:
        z = _np(bank.features) @ transform
        prob = sum(
            wk * np.exp(-0.5 * np.einsum("nd,de,ne->n", z - mk, gm.precisions_, z - mk)) for wk, mk in zip(gm.weights_, gm.means_)
        )
        return np.log(prob + 1e-45)

    theirs = [gmm(ref[s]) for s in ("test", "ood")]
    ours = _ours("gmm", ref, "train", num_clusters=5, reduce_dim=8)
    for o, t in zip(ours, theirs):
        # float64 throughout, the same EM on projections that agree to rounding (eigh vs PCA's SVD): measured 2e-14
        np.testing.assert_allclose(_np(o), t, rtol=1e-10, atol=1e-10)
    _agree(ours, theirs)


# ----- the LTS authors' lts.py (andrijazz/lts): energy of logits * s -----------------------------------------------
def _lts(bank: FeatureBank, percentile: int = 65, at_least_one: bool = False) -> np.ndarray:
    h = bank.features.double()
    x, n = torch.relu(h), h.shape[1]
    k = n - int(np.round(n * percentile / 100.0))
    k = max(k, 1) if at_least_one else k
    s = (x.sum(dim=1) / torch.topk(x, k, dim=1).values.sum(dim=1))[:, None] ** 2
    logits = h @ bank.weight.double().T + bank.bias.double()
    return _np(torch.logsumexp(logits * s, dim=1))


def test_lts_equals_the_authors_code(ref: dict[str, FeatureBank]) -> None:
    theirs = [_lts(ref[s]) for s in ("test", "ood")]
    ours = _ours("lts", ref, "train")
    for o, t in zip(ours, theirs):
        np.testing.assert_allclose(_np(o), t, rtol=1e-6)
    _agree(ours, theirs)


def test_lts_keeps_one_entry_where_the_authors_code_keeps_none(ref: dict[str, FeatureBank]) -> None:
    """D = 32 at p = 99: the authors' k = 32 - round(31.68) = 0 divides by an empty top-k sum (s = inf, scores inf or
    NaN); ours keep k = 1 (activation.py's documented deviation) and equal their code with k = 1."""
    assert not np.isfinite(_lts(ref["test"], 99)).any()
    ours = _ours("lts", ref, "train", percentile=99)
    for o, split in zip(ours, ("test", "ood")):
        np.testing.assert_allclose(_np(o), _lts(ref[split], 99, at_least_one=True), rtol=1e-6)


# ----- pytorch-ood pnml.py ----------------------------------------------------------------------------------------
def test_pnml_equals_pytorch_ood(ref: dict[str, FeatureBank]) -> None:
    z = torch.nn.functional.normalize(ref["train"].features.double(), p=2, dim=1)
    projector = torch.linalg.pinv(z.T @ z)
    w, b = ref["train"].weight.double(), ref["train"].bias.double()

    def regret(bank: FeatureBank, eps: float = 1e-12) -> np.ndarray:
        x = torch.nn.functional.normalize(bank.features.double(), p=2, dim=1)
        probs = torch.softmax(x @ w.T + b, dim=1).clamp(min=eps, max=1.0 - eps)
        proj = (x @ projector * x).sum(dim=1)
        g = proj / (1.0 + proj)
        terms = probs / (probs + (1.0 - probs) * probs.pow(g.unsqueeze(1)))
        return _np(-torch.log(terms.sum(dim=1)) / np.log(probs.shape[1]))

    theirs = [regret(ref[s]) for s in ("test", "ood")]
    ours = _ours("pnml", ref, "train")
    for o, t in zip(ours, theirs):
        # float64 throughout (the unit rows, pinv, softmax): rounding only, measured 3e-15
        np.testing.assert_allclose(_np(o), t, rtol=1e-10, atol=1e-12)
    _agree(ours, theirs)


# ----- GEM's code (PeymanMorteza/GEM utils/score_calculation.py): `sample_estimator`'s class means and scikit-learn
# precision of the class-centred train features, then `get_GEM_Mahalanobis_score(..., GEM=1)` at run.sh's noise 0.0
# (the perturbed pass is the clean one): logsumexp over classes of -0.5 (h - mu_c)^T P (h - mu_c), returned negated
# (OOD-high); negated back here to an ID score -----------------------------------------------------------------------
def test_gem_equals_the_authors_code(ref: dict[str, FeatureBank]) -> None:
    import sklearn.covariance

    train = ref["train"]
    feats, labels = train.features.double(), train.labels
    sample_mean = torch.stack([feats[labels == c].mean(0) for c in range(C)])
    x = torch.cat([feats[labels == c] - sample_mean[c] for c in range(C)])
    precision = torch.from_numpy(sklearn.covariance.EmpiricalCovariance(assume_centered=False).fit(x.numpy()).precision_)

    def gem(bank: FeatureBank) -> np.ndarray:
        out = bank.features.double()
        gaussian_score = torch.stack(
            [-0.5 * torch.mm(torch.mm(out - sample_mean[i], precision), (out - sample_mean[i]).t()).diag() for i in range(C)], 1)
        mahalanobis = -torch.logsumexp(gaussian_score, dim=1)  # the released code's OOD-high score
        return -_np(mahalanobis)

    theirs = [gem(ref[s]) for s in ("test", "ood")]
    ours = _ours("gem", ref, "train")
    for o, t in zip(ours, theirs):
        # float64 on both sides; scikit-learn's pinvh against our pinv of the same covariance: rounding only
        np.testing.assert_allclose(_np(o), t, rtol=1e-9, atol=1e-9)
    _agree(ours, theirs)


# ----- OE's test.py with --use_xent: output.mean(1) - logsumexp(output, 1), OOD-high; negated back to an ID score -----
def test_oe_xent_equals_outlier_exposures_code(ref: dict[str, FeatureBank]) -> None:
    def xent(bank: FeatureBank) -> np.ndarray:
        output = bank.logits.double()
        return -_np(output.mean(1) - torch.logsumexp(output, dim=1))

    theirs = [xent(ref[s]) for s in ("test", "ood")]
    ours = _ours("oe_xent", ref, "train")
    for o, t in zip(ours, theirs):
        np.testing.assert_allclose(_np(o), t, rtol=1e-12, atol=1e-12)
    _agree(ours, theirs)


# ----- OptFS's code (Qinyu-Allen-Zhao/OptFSOOD detector/ours.py `Ours`, run by eval_ood.py -d ours): `setup` on the
# float32 train features and predicted classes (`get_feature_train`), `get_lc_fv_list`'s masks, `postprocess` ---------
def _optfs(train: FeatureBank, banks: list[FeatureBank], use_ood_score: str) -> list[np.ndarray]:
    def net(bank: FeatureBank) -> tuple[np.ndarray, np.ndarray]:
        output, feature = bank.logits.float(), bank.features.float().numpy()
        return torch.max(torch.softmax(output, dim=1), dim=1).indices.numpy(), feature

    w_np, b_np = train.weight.float().numpy(), train.bias.float().numpy()[None, :]
    pred, feature = net(train)
    left_b, right_b = np.quantile(feature, 1e-3), np.quantile(feature, 1 - 1e-3)
    width = (right_b - left_b) / 100.0
    left_boundary = np.arange(left_b, right_b, width)
    lc = w_np[pred] * feature
    lc_fv_list = np.array([np.mean(np.sum(((feature >= x) & (feature < x + width)) * lc, axis=1)) for x in left_boundary])
    theta = lc_fv_list / np.linalg.norm(lc_fv_list, 2) * 1000

    def postprocess(bank: FeatureBank) -> np.ndarray:
        pred, feature = net(bank)
        feat_p = np.zeros_like(feature)
        for i, x in enumerate(left_boundary):
            mask = (feature >= x) & (feature < x + width)
            feat_p += mask * feature * theta[i]
        if use_ood_score == "energy":
            return logsumexp(feat_p @ w_np.T + b_np, axis=1)
        return np.sum(w_np[pred] * feat_p, axis=1)

    return [postprocess(bank) for bank in banks]


@pytest.mark.parametrize("ood_score", ["vanilla", "energy"])
def test_optfs_equals_the_authors_code(ref: dict[str, FeatureBank], ood_score: str) -> None:
    theirs = _optfs(ref["train"], [ref["test"], ref["ood"]], ood_score)
    ours = _ours("optfs", ref, "train", ood_score=ood_score)
    for o, t in zip(ours, theirs):
        # the same intervals; the code's float32 (theta's sums, h theta, the head) against our float64: rounding only,
        # measured 2.4e-7 relative
        np.testing.assert_allclose(_np(o), t, rtol=2e-6)
    _agree(ours, theirs)
