"""Detectors against independent transcriptions of their reference code, on inputs where an earlier version
deviated (a class-sorted train bank, an empty split, ...): each test here failed before its fix."""

from __future__ import annotations

import numpy as np
import torch
from fabricate import feature_bank as _bank
from scipy.special import logsumexp

from ood.detectors import build_detector


def _nnguide_reference(train_h: np.ndarray, train_f: np.ndarray, rows: np.ndarray, h: np.ndarray, f: np.ndarray,
                       k: int) -> np.ndarray:
    """roomo7time/nnguide (`subsample` of the bank set, then `NNGuideOODDetector`): the guides are the drawn rows'
    normalised features times their energy; score = LSE(f) * mean of the k largest inner products."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    guides = unit(train_h[rows]) * logsumexp(train_f[rows], axis=1)[:, None]
    sims = np.sort(unit(h) @ guides.T, axis=1)[:, ::-1][:, :k]
    return logsumexp(f, axis=1) * sims.mean(1)


def test_nnguide_guides_are_a_random_subset_of_a_class_sorted_bank() -> None:
    """A train split stored class by class (ImageFolder): the first 10 % of 100 rows were all class 0, so a class-1
    ID input had no guide and scored 0, below an OOD input; the guide rows are now drawn at random (seeded), as the
    authors' code draws them, and the scores equal its transcription on those rows."""
    gen = torch.Generator().manual_seed(0)
    w, b = torch.eye(2), torch.zeros(2)
    labels = torch.arange(100) // 50  # 50 rows of class 0, then 50 of class 1
    train = _bank(torch.eye(2)[labels] * 3 + 0.1 * torch.rand(100, 2, generator=gen), labels, w, b)
    query = _bank(torch.tensor([[0.1, 3.0], [3.0, 0.1], [1.0, 1.0]]), None, w, b)
    det = build_detector("nnguide", k=3, alpha=0.1).fit(train)
    scores = det.score(query)
    assert float(scores[0]) > float(scores[2]) and float(scores[1]) > float(scores[2])  # both classes ID, the mix OOD
    rows = torch.randperm(100, generator=torch.Generator().manual_seed(0))[:10].numpy()
    assert {0, 1} <= set(labels[rows].tolist())
    expected = _nnguide_reference(train.features.numpy().astype(np.float64), train.logits.numpy().astype(np.float64),
                                  rows, query.features.numpy().astype(np.float64), query.logits.numpy().astype(np.float64), 3)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5)
    # seeded: the same seed gives the same guides, another seed other ones
    assert torch.equal(build_detector("nnguide", k=3, alpha=0.1).fit(train).score(query), scores)
    assert not torch.equal(build_detector("nnguide", k=3, alpha=0.1, seed=1).fit(train).score(query), scores)
