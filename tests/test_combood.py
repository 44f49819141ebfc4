"""`combood` against an independent transcription of the authors' released scoring (rmagesh148/combood), and known
answers. The registry contract (pickling, NaN rows, empty banks, float64 scores) runs over every registered
detector in `test_detectors.py` / `test_detectors_fidelity.py`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis
from sklearn.preprocessing import PowerTransformer, StandardScaler

from ood.detectors import build_detector
from ood.features.bank import FeatureBank


def _bank(features: np.ndarray | torch.Tensor) -> FeatureBank:
    h = torch.as_tensor(features, dtype=torch.float32)
    return FeatureBank(logits=torch.zeros(len(h), 3), features=h)


def released_scores(train: np.ndarray, test: np.ndarray, k: int, reg: float) -> np.ndarray:
    """`test_ood.py`'s `square_log_probability(pred_mahala, pred_knn, knn_n)` with `Confidenciator`'s Mahalanobis
    branch on penultimate features (`extreme=False`) and `fit_knn_faiss` / `predict_knn_faiss` (K-th squared L2
    distance, here brute force), transcribed line by line in NumPy / scikit-learn / SciPy."""
    def normalizer(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=-1, keepdims=True) + 1e-10

    train, test = normalizer(train.astype(np.float64)), normalizer(test.astype(np.float64))
    scaler, pt = StandardScaler(), PowerTransformer()
    x = pt.fit_transform(scaler.fit_transform(train))
    inv_cov = np.linalg.inv(np.cov(x, rowvar=False) + reg * np.identity(train.shape[1]))
    mean = np.zeros(train.shape[1])
    pred_mahala = -np.apply_along_axis(lambda row: mahalanobis(row, mean, inv_cov), 1,
                                       pt.transform(scaler.transform(test)))
    d2 = ((test[:, None, :] - train[None, :, :]) ** 2).sum(-1)
    pred_knn = -np.sort(d2, axis=1)[:, k - 1]
    n = train.shape[1]
    return (-math.sqrt(n) * np.log(-pred_knn)) - pred_mahala**2


@pytest.mark.parametrize(("k", "reg"), [(50, 1.0), (5, 0.3)])
def test_matches_released_scoring(k: int, reg: float) -> None:
    g = np.random.default_rng(0)
    train = np.abs(g.normal(size=(400, 12))) * g.uniform(0.5, 3, size=12)  # post-ReLU-like, skewed columns
    test = np.concatenate([np.abs(g.normal(size=(40, 12))), g.normal(size=(40, 12)) * 2])
    det = build_detector("combood", k=k, reg=reg).fit(_bank(train))
    ours = det.score(_bank(test)).numpy()
    np.testing.assert_allclose(ours, released_scores(train.astype(np.float32), test.astype(np.float32), k, reg),
                               rtol=1e-5, atol=1e-4)


def test_known_answers() -> None:
    """kNN term: unit vectors +-e1, +-e2 and a query along (1, 1): the 2nd nearest is at 2 - sqrt 2, the 3rd at
    2 + sqrt 2. Mahalanobis term with reg = 0: over the train rows it averages D (N - 1) / N, whatever the power
    transform (trace of S S^-1 with S of ddof 1)."""
    train = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    query = _bank(torch.tensor([[3.0, 3.0]]))
    for k, d2 in [(2, 2 - math.sqrt(2)), (3, 2 + math.sqrt(2))]:
        det = build_detector("combood", k=k).fit(_bank(train))
        assert det.knn_sq_distance(query).item() == pytest.approx(d2, rel=1e-6)
        expected = -math.sqrt(2) * math.log(d2) - det.mahalanobis_sq(query).item()
        assert det.score(query).item() == pytest.approx(expected, rel=1e-6)
    g = np.random.default_rng(1)
    bank = _bank(np.abs(g.normal(size=(300, 6))) + 0.1)
    det = build_detector("combood", reg=0.0).fit(bank)
    assert det.mahalanobis_sq(bank).mean().item() == pytest.approx(6 * 299 / 300, rel=1e-9)


def test_zero_distance_is_the_most_in_distribution_finite_score() -> None:
    """A query equal to its K nearest train rows: the released log(0) is left uninitialised; ours is finite and
    above every other score."""
    g = np.random.default_rng(2)
    train = np.abs(g.normal(size=(100, 5))) + 0.1
    det = build_detector("combood", k=1).fit(_bank(train))
    scores = det.score(_bank(np.concatenate([train[:1], train[1:10] + 0.05])))
    assert torch.isfinite(scores).all()
    assert scores[0] > scores[1:].max()
