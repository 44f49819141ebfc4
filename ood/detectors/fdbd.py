"""Decision-boundary and neural-collapse detectors on penultimate features and the linear head.

- fDBD, Liu & Qin, "Fast Decision Boundary based Out-of-Distribution Detector", ICML 2024 (arXiv 2312.11536),
  OpenOOD's `fdbd`: score(h) = sum_{c != yhat} |f_yhat - f_c| / ||w_yhat - w_c|| (the feature-space distance
  to each decision boundary), divided by ||h - mu_bar|| (`distance_as_normalizer=True`, mu_bar the train
  mean) or by ||h|| (OpenOOD chooses between the two on validation data, a deviation from the paper, which
  uses the distance; we keep OpenOOD's grid). Pair norms are computed once per row chunk (C x C).
- NCI, Liu & Qin, "Detecting Out-of-Distribution through the Lens of Neural Collapse", CVPR 2025
  (arXiv 2311.01479), OpenOOD's `nci`: score(h) = <w_yhat, h - mu_bar> / ||h - mu_bar|| + alpha ||h||_1.
Memory: the train mean (the sum of the chunk sums over N) and the scores go through the bank in row chunks of `CHUNK`
rows in float64, never a float64 copy of a whole bank, so they read float16 banks chunk by chunk.
"""

from __future__ import annotations

import torch

from ood.detectors.base import NON_NEGATIVE, Detector
from ood.detectors.mahalanobis import feature_mean, row_chunks
from ood.features.bank import FeatureBank


class _TrainMean(Detector):
    """Shared fit: the mean train feature mu_bar."""

    reads_head = True
    float16_features = True

    def fit(self, bank: FeatureBank) -> _TrainMean:
        self.mean_ = feature_mean(bank.features)
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        """`_score_rows` of each row chunk of `bank` (float64 chunks of `CHUNK` rows), concatenated."""
        w = bank.head()[0].double()
        mean = self.mean_.to(bank.features.device)
        return torch.cat([self._score_rows(bank.features[rows].double(), bank.logits[rows], w, mean)
                          for rows in row_chunks(len(bank))])

    def _score_rows(self, h: torch.Tensor, logits: torch.Tensor, w: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FDBD(_TrainMean):
    """Summed distance to the decision boundaries of the predicted class, normalised by a feature norm."""

    name = "fdbd"
    min_classes = 2
    grid = {"distance_as_normalizer": [True, False]}
    score_params = frozenset({"distance_as_normalizer"})

    def __init__(self, distance_as_normalizer: bool = True) -> None:
        self.distance_as_normalizer = distance_as_normalizer

    def _score_rows(self, h: torch.Tensor, logits: torch.Tensor, w: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        logits = logits.double()
        pred = logits.argmax(1)
        gaps = (logits.gather(1, pred[:, None]) - logits).abs()
        # ||w_yhat - w_c|| for every (class, class) pair, looked up per predicted class; 0 on the diagonal
        pair_norm = torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist")[pred]
        boundary = torch.where(pair_norm > 0, gaps / pair_norm.clamp_min(1e-300), 0.0).sum(1)
        normaliser = h - mean if self.distance_as_normalizer else h
        return boundary / torch.linalg.vector_norm(normaliser, dim=1).clamp_min(1e-300)


class NCI(_TrainMean):
    """Alignment of the centred feature with the predicted class's weight plus a small L1 feature-norm term."""

    name = "nci"
    ranges = {"alpha": NON_NEGATIVE}
    grid = {"alpha": [1e-4, 1e-3, 1e-2, 0.1]}
    score_params = frozenset({"alpha"})

    def __init__(self, alpha: float = 1e-4) -> None:
        self.alpha = alpha

    def _score_rows(self, h: torch.Tensor, logits: torch.Tensor, w: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        centred = h - mean
        align = (w[logits.argmax(1)] * centred).sum(1) / torch.linalg.vector_norm(centred, dim=1).clamp_min(1e-300)
        return align + self.alpha * h.abs().sum(1)
