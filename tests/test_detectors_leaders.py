"""Reference equality of the leaderboard / pytorch-ood detectors (neco, caref, cadref, mahalanobis_pp, rmds_pp,
weiper, graduncertainty): each detector's scores against an independent transcription of its reference code's
scoring (NumPy / scikit-learn / autograd, written from the reference, not through the detector's code path) on fixed
synthetic features, logits and head. All are deterministic, so they must agree to rounding (allclose); the Spearman
rho (>= 0.999) and the ID-vs-OOD AUROC (within 1e-3) are asserted too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.covariance import EmpiricalCovariance
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from ood.detectors import build_detector
from ood.features.bank import FeatureBank
from ood.metrics import ood_metrics

C, D = 5, 24


def _bank(h: np.ndarray, w: np.ndarray, b: np.ndarray, y: np.ndarray | None = None) -> FeatureBank:
    h_t, w_t, b_t = torch.from_numpy(h).float(), torch.from_numpy(w).float(), torch.from_numpy(b).float()
    return FeatureBank(h_t @ w_t.T + b_t, h_t, None if y is None else torch.from_numpy(y), w_t, b_t)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    """ReLU features around per-class centres (train, ID test) or weak unstructured (OOD), a random head that
    classifies them; moderate logits (no saturated softmax)."""
    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 2, (C, D)) * (rng.uniform(size=(C, D)) < 0.5)
    w = (centres - centres.mean(0)) / 2 + 0.1 * rng.standard_normal((C, D))
    b = 0.2 * rng.standard_normal(C)
    y = np.arange(300) % C
    out = {"w": w.astype(np.float32), "b": b.astype(np.float32), "y": y}
    out["train"] = np.maximum(centres[y] + 0.5 * rng.standard_normal((300, D)), 0).astype(np.float32)
    out["id"] = np.maximum(centres[np.arange(80) % C] + 0.5 * rng.standard_normal((80, D)), 0).astype(np.float32)
    out["ood"] = np.maximum(0.4 + 0.7 * rng.standard_normal((80, D)), 0).astype(np.float32)
    return out


def _fit_score(name: str, data: dict[str, np.ndarray], **hparams: object) -> np.ndarray:
    det = build_detector(name, **hparams).fit(_bank(data["train"], data["w"], data["b"], data["y"]))
    test = np.concatenate([data["id"], data["ood"]])
    return det.score(_bank(test, data["w"], data["b"])).numpy()


def _agree(ours: np.ndarray, ref: np.ndarray, rtol: float = 1e-6, atol: float = 1e-8) -> None:
    """Allclose, and the rank statistics the reference-equality table reports (first 80 rows ID, last 80 OOD)."""
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=atol)
    assert spearmanr(ours, ref).statistic >= 0.999
    auroc = lambda s: ood_metrics(s[:80], s[80:])["auroc"]  # noqa: E731
    assert abs(auroc(ours) - auroc(ref)) <= 1e-3


def _logits(h: np.ndarray, data: dict[str, np.ndarray]) -> np.ndarray:
    return h.astype(np.float64) @ data["w"].T.astype(np.float64) + data["b"]


def _softmax(f: np.ndarray) -> np.ndarray:
    e = np.exp(f - f.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _test(data: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([data["id"], data["ood"]]).astype(np.float64)


# ----- NECO: the authors' StandardScaler -> PCA pipeline ---------------------------------------------------------
@pytest.mark.parametrize("use_max_logit", [False, True])
def test_neco_equals_scaler_pca_reference(data: dict[str, np.ndarray], use_max_logit: bool) -> None:
    ss = StandardScaler().fit(data["train"].astype(np.float64))
    pca = PCA(D).fit(ss.transform(data["train"].astype(np.float64)))
    z = ss.transform(_test(data))
    ref = np.linalg.norm(pca.transform(z)[:, :6], axis=1) / np.linalg.norm(z, axis=1)
    if use_max_logit:
        ref = ref * _logits(_test(data), data).max(1)
    _agree(_fit_score("neco", data, dim=0.25, use_max_logit=use_max_logit), ref)  # 0.25 * 24 = 6 components
    _agree(_fit_score("neco", data, dim=6, use_max_logit=use_max_logit), ref)


# ----- CARef / CADRef: LingAndZero/CADRef ood_methods/CARef.py, CADRef.py --------------------------------------
def _predicted_class_means(data: dict[str, np.ndarray]) -> np.ndarray:
    train = data["train"].astype(np.float64)
    pred = _logits(train, data).argmax(1)
    return np.stack([train[pred == c].mean(0) for c in range(C)])


def test_caref_equals_reference(data: dict[str, np.ndarray]) -> None:
    x = _test(data)
    tm = _predicted_class_means(data)[_logits(x, data).argmax(1)]
    ref = -np.abs(tm - x).sum(1) / np.abs(x).sum(1)
    _agree(_fit_score("caref", data), ref)


def _reference_logit_score(f: np.ndarray, method: str) -> np.ndarray:
    if method == "energy":
        m = f.max(1)
        return m + np.log(np.exp(f - m[:, None]).sum(1))
    if method == "maxlogit":
        return f.max(1)
    if method == "msp":
        return _softmax(f).max(1)
    top = np.sort(_softmax(f), axis=1)[:, -max(10, f.shape[1] // 10):]  # C = 5 < 10: all classes
    return 1 / (top**0.1 * (1 - top) ** 0.1).sum(1)


@pytest.mark.parametrize("method", ["energy", "maxlogit", "msp", "gen"])
def test_cadref_equals_reference(data: dict[str, np.ndarray], method: str) -> None:
    x, train = _test(data), data["train"].astype(np.float64)
    f = _logits(x, data)
    ids = f.argmax(1)
    dist = x - _predicted_class_means(data)[ids]
    sg = np.sign(data["w"][ids])
    ep = np.where(dist * sg < 0, 0, dist * sg)
    en = np.where(dist * -sg < 0, 0, dist * -sg)
    norm = np.abs(x).sum(1)
    global_mean = _reference_logit_score(_logits(train, data), method).mean()
    ref = -(ep.sum(1) / norm / _reference_logit_score(f, method) + en.sum(1) / norm / global_mean)
    _agree(_fit_score("cadref", data, logit_score=method), ref)


# ----- Mahalanobis++ / RMDS++: OpenOOD's mds / rmds scoring on l2-normalised features ------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _openood_class_scores(train: np.ndarray, y: np.ndarray, test: np.ndarray) -> np.ndarray:
    """OpenOOD mds: per-class means, EmpiricalCovariance of the class-centred train features, -(x-mu) P (x-mu)^T."""
    means = [train[y == c].mean(0) for c in range(C)]
    centred = np.concatenate([train[y == c] - means[c] for c in range(C)])
    precision = EmpiricalCovariance(assume_centered=False).fit(centred).precision_
    return np.stack([-np.einsum("nd,de,ne->n", test - m, precision, test - m) for m in means], axis=1)


def test_mahalanobis_pp_equals_openood_mds_on_normalised_features(data: dict[str, np.ndarray]) -> None:
    train, test = _unit(data["train"].astype(np.float64)), _unit(_test(data))
    ref = _openood_class_scores(train, data["y"], test).max(1)
    _agree(_fit_score("mahalanobis_pp", data), ref, rtol=1e-5)


def test_rmds_pp_equals_openood_rmds_on_normalised_features(data: dict[str, np.ndarray]) -> None:
    train, test = _unit(data["train"].astype(np.float64)), _unit(_test(data))
    whole = train.mean(0)
    p0 = EmpiricalCovariance(assume_centered=False).fit(train - whole).precision_
    background = -np.einsum("nd,de,ne->n", test - whole, p0, test - whole)
    ref = (_openood_class_scores(train, data["y"], test) - background[:, None]).max(1)
    _agree(_fit_score("rmds_pp", data), ref, rtol=1e-5)


# ----- WeiPer + KLD: mgranz/weiper weiper_kldiv/utils.py ------------------------------------------------------
def _reference_density(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, n_bins: int) -> torch.Tensor:
    """batch_histogram(x.T, bins_min_max=(low, high), probability=True): [n_bins, N] (at most 1000 values a row)."""
    steps = torch.arange(n_bins + 1, dtype=torch.float32) / (n_bins + 1 - 1)
    bins = (low + steps * (high + 1e-8 - low))[:, None].repeat(1, x.shape[0])
    inf = torch.full((1, x.shape[0]), np.inf)
    bins = torch.cat([-inf, bins, inf])
    samples = x.T
    density = ((samples[None] < bins[1:, None]) & (samples[None] >= bins[:-1, None])).float().mean(1)
    return density[1:-1] / density.sum(0)[None]


def _reference_kl(p: torch.Tensor, q: torch.Tensor, width: int, eps: float) -> torch.Tensor:
    """kldiv(p, q, kernel=UniformKernel(N, width), symmetric=True): [N]."""
    n = q.shape[1]
    conv = torch.nn.Conv1d(n, n, width, padding="same", padding_mode="replicate", bias=False).double()
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[range(n), range(n)] = torch.ones(n, width, dtype=torch.float64) / width
        q_ = conv(q.T).T + eps
    p_ = p + eps
    p_, q_ = p_ / p_.sum(0), q_ / q_.sum(0)
    q_p = q_.log()[:, None] - p_.log()[..., None]
    return (-(p_[..., None] * q_p).sum(0) - (q_[:, None] * (-q_p)).sum(0))[0]


def test_weiper_equals_reference(data: dict[str, np.ndarray]) -> None:
    params = {"n_bins": 40, "perturbation_distance": 2.0, "n_repeats": 30, "smoothing": 4, "smoothing_perturbed": 15,
              "lambda_1": 2.5, "lambda_2": 1.0}
    train_bank = _bank(data["train"], data["w"], data["b"], data["y"])
    det = build_detector("weiper", **params).fit(train_bank)
    # the perturbed head: 30 copies, row c moved by 2.0 ||w_c|| along a unit direction, biases repeated
    w = torch.from_numpy(data["w"])
    moved = (det.weight_.view(30, C, D) - w).norm(dim=2)
    torch.testing.assert_close(moved, (2.0 * w.norm(dim=1)).expand(30, C))
    torch.testing.assert_close(det.bias_, torch.from_numpy(data["b"]).repeat(30))
    perturbed = torch.nn.Linear(D, 30 * C)
    with torch.no_grad():
        perturbed.weight.copy_(det.weight_)
        perturbed.bias.copy_(det.bias_)
    train, test = torch.from_numpy(data["train"]), torch.from_numpy(np.concatenate([data["id"], data["ood"]]))
    with torch.no_grad():
        g_train, g_test = perturbed(train), perturbed(test)
    lo, hi, lo_w, hi_w = train.min(), train.max(), g_train.min(), g_train.max()
    p = _reference_density(train, lo, hi, 40).mean(1)[:, None].double()
    p_w = _reference_density(g_train, lo_w, hi_w, 40).mean(1)[:, None].double()
    q = _reference_density(test, lo, hi, 40).double()
    q_w = _reference_density(g_test, lo_w, hi_w, 40).double()
    msp_w = torch.stack([g_test[:, r * C : (r + 1) * C].softmax(1).max(1).values for r in range(30)], 1).mean(1)
    ref = -(_reference_kl(p, q, 4, 0.01) + 2.5 * _reference_kl(p_w, q_w, 15, 0.025) - 1.0 * msp_w.double())
    _agree(det.score(_bank(test.numpy(), data["w"], data["b"])).numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)


# ----- GradUncertainty: pytorch-ood's per-sample autograd, last layer only ---------------------------------------
def test_graduncertainty_equals_autograd_reference(data: dict[str, np.ndarray]) -> None:
    head = torch.nn.Linear(D, C).double()
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(data["w"]))
        head.bias.copy_(torch.from_numpy(data["b"]))
    ref = []
    for x in torch.from_numpy(_test(data)):
        logits = head(x[None])
        loss = torch.nn.functional.binary_cross_entropy(logits.softmax(1), torch.ones_like(logits), reduction="sum")
        grads = torch.autograd.grad(loss, [head.weight, head.bias])
        ref.append(sum(float((g**2).sum()) for g in grads))  # pytorch-ood returns the negation (outlier score)
    _agree(_fit_score("graduncertainty", data), np.array(ref), rtol=1e-6)
