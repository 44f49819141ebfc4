"""Decision-boundary and neural-collapse detectors on penultimate features and the linear head.

- fDBD, Liu & Qin, "Fast Decision Boundary based Out-of-Distribution Detector", ICML 2024 (arXiv 2312.11536),
  OpenOOD's `fdbd`: score(h) = sum_{c != yhat} |f_yhat - f_c| / ||w_yhat - w_c|| (the feature-space distance
  to each decision boundary), divided by ||h - mu_bar|| (`distance_as_normalizer=True`, mu_bar the train
  mean) or by ||h|| (OpenOOD chooses between the two on validation data, a deviation from the paper, which
  uses the distance; we keep OpenOOD's grid). Pair norms are computed once per fit-free call (C x C).
- NCI, Liu & Qin, "Detecting Out-of-Distribution through the Lens of Neural Collapse", CVPR 2025
  (arXiv 2311.01479), OpenOOD's `nci`: score(h) = <w_yhat, h - mu_bar> / ||h - mu_bar|| + alpha ||h||_1.
"""

from __future__ import annotations

import torch

from ood.detectors.base import NON_NEGATIVE, Detector
from ood.features.bank import FeatureBank


class _TrainMean(Detector):
    """Shared fit: the mean train feature mu_bar."""

    reads_head = True

    def fit(self, bank: FeatureBank) -> _TrainMean:
        self.mean_ = bank.features.double().mean(0)
        return self

    def _centred(self, bank: FeatureBank) -> torch.Tensor:
        return bank.features.double() - self.mean_.to(bank.features.device)


class FDBD(_TrainMean):
    """Summed distance to the decision boundaries of the predicted class, normalised by a feature norm."""

    name = "fdbd"
    min_classes = 2
    grid = {"distance_as_normalizer": [True, False]}
    score_params = frozenset({"distance_as_normalizer"})

    def __init__(self, distance_as_normalizer: bool = True) -> None:
        self.distance_as_normalizer = distance_as_normalizer

    def score(self, bank: FeatureBank) -> torch.Tensor:
        w, _ = bank.head()
        w = w.double()
        logits = bank.logits.double()
        pred = logits.argmax(1)
        gaps = (logits.gather(1, pred[:, None]) - logits).abs()
        # ||w_yhat - w_c|| for every (class, class) pair, looked up per predicted class; 0 on the diagonal
        pair_norm = torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist")[pred]
        boundary = torch.where(pair_norm > 0, gaps / pair_norm.clamp_min(1e-300), 0.0).sum(1)
        h = self._centred(bank) if self.distance_as_normalizer else bank.features.double()
        return boundary / torch.linalg.vector_norm(h, dim=1).clamp_min(1e-300)


class NCI(_TrainMean):
    """Alignment of the centred feature with the predicted class's weight plus a small L1 feature-norm term."""

    name = "nci"
    ranges = {"alpha": NON_NEGATIVE}
    grid = {"alpha": [1e-4, 1e-3, 1e-2, 0.1]}
    score_params = frozenset({"alpha"})

    def __init__(self, alpha: float = 1e-4) -> None:
        self.alpha = alpha

    def score(self, bank: FeatureBank) -> torch.Tensor:
        w, _ = bank.head()
        centred = self._centred(bank)
        align = (w.double()[bank.predictions] * centred).sum(1) / torch.linalg.vector_norm(centred, dim=1).clamp_min(1e-300)
        return align + self.alpha * bank.features.double().abs().sum(1)
