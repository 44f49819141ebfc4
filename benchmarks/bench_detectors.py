"""(b) fit + score of `knn`, `mahalanobis` and `vim` at CIFAR scale (50 000 x 512 train bank, 20 000 test rows,
10 classes, random ReLU-like features) vs a straightforward reference: scikit-learn `NearestNeighbors` for kNN,
NumPy (float64, per-class loop as OpenOOD's `mds`; `eigh` + projections for ViM) for the others.
Every pair is also checked for equal scores before it is timed.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

from benchmarks.common import Timing, time_alternating
from ood.detectors import build_detector
from ood.features.bank import FeatureBank


def make_banks(n_train: int, n_test: int, dim: int = 512, classes: int = 10, seed: int = 0) -> tuple[FeatureBank, FeatureBank]:
    """Class-structured non-negative features with a random linear head."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(classes, dim, generator=gen) * 2
    weight, bias = torch.randn(classes, dim, generator=gen) / dim**0.5, torch.randn(classes, generator=gen)

    def bank(n: int, labelled: bool) -> FeatureBank:
        y = torch.randint(classes, (n,), generator=gen)
        h = (centres[y] + torch.randn(n, dim, generator=gen)).clamp_min(0)
        return FeatureBank(h @ weight.T + bias, h, y if labelled else None, weight, bias)

    return bank(n_train, True), bank(n_test, False)


def ours(name: str, train: FeatureBank, test: FeatureBank, **hparams: object) -> torch.Tensor:
    return build_detector(name, **hparams).fit(train).score(test)


def sklearn_knn(train: np.ndarray, test: np.ndarray, k: int) -> np.ndarray:
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    dist, _ = NearestNeighbors(n_neighbors=k).fit(unit(train)).kneighbors(unit(test))
    return -(dist[:, -1] ** 2)


def numpy_mahalanobis(train: np.ndarray, labels: np.ndarray, test: np.ndarray, classes: int) -> np.ndarray:
    means = np.stack([train[labels == c].mean(0) for c in range(classes)])
    centred = train - means[labels]
    precision = np.linalg.pinv(centred.T @ centred / len(train), hermitian=True)
    dists = np.empty((len(test), classes))
    for c in range(classes):
        diff = test - means[c]
        dists[:, c] = ((diff @ precision) * diff).sum(1)
    return -dists.min(1)


def numpy_vim(train: np.ndarray, train_logits: np.ndarray, test: np.ndarray, test_logits: np.ndarray, w: np.ndarray, b: np.ndarray, dim: int) -> np.ndarray:
    u = -np.linalg.pinv(w) @ b
    centred = train - u
    eigvals, eigvecs = np.linalg.eigh(centred.T @ centred / len(train))
    residual = np.ascontiguousarray(eigvecs[:, np.argsort(-eigvals)[dim:]])
    alpha = train_logits.max(1).mean() / np.linalg.norm(centred @ residual, axis=1).mean()
    lse = np.log(np.exp(test_logits - test_logits.max(1, keepdims=True)).sum(1)) + test_logits.max(1)
    return lse - alpha * np.linalg.norm((test - u) @ residual, axis=1)


def run(n_train: int, n_test: int, repeats: int) -> list[Timing]:
    train, test = make_banks(n_train, n_test)
    f64 = lambda t: t.double().numpy()  # noqa: E731
    tr, te, y = f64(train.features), f64(test.features), train.labels.numpy()
    w, b = f64(train.weight), f64(train.bias)
    tr_logits, te_logits = f64(train.logits), f64(test.logits)
    tr32, te32 = train.features.numpy(), test.features.numpy()
    cases = {
        "knn (k=50)": (lambda: ours("knn", train, test, k=50), lambda: sklearn_knn(tr32, te32, 50), "scikit-learn NearestNeighbors", 1e-4),
        "mahalanobis": (lambda: ours("mahalanobis", train, test), lambda: numpy_mahalanobis(tr, y, te, 10), "NumPy", 1e-6),
        "vim (dim=256)": (
            lambda: ours("vim", train, test, dim=256),
            lambda: numpy_vim(tr, tr_logits, te, te_logits, w, b, 256),
            "NumPy",
            1e-5,
        ),
    }
    timings = []
    for task, (mine, reference, ref_name, tol) in cases.items():
        got, want = mine().numpy(), reference()
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= tol * scale, f"{task}: scores differ from the reference by {np.abs(got - want).max()}"
        t_ours, t_ref = time_alternating([mine, reference], repeats)
        timings.append(Timing(f"(b) {task} fit+score, {n_train:,} x 512 -> {n_test:,}", t_ours, t_ref, 0.5, ref_name))
    return timings
