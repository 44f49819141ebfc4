"""Mahalanobis detector, Lee et al., NeurIPS 2018 (arXiv 1807.03888), OpenOOD's `mds` variant.

score(h) = max_c -(h - mu_c)^T Sigma^+ (h - mu_c), with mu_c the train class means and Sigma the shared
covariance of class-centred train features (pseudo-inverse). Penultimate layer only, no input noise and no
layer ensemble (as OpenOOD v1.5).
"""

from __future__ import annotations

import torch

from ood.detectors.base import Detector
from ood.evaluation.bank import FeatureBank


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, D] mean feature per class (float64)."""
    feats = features.double()
    sums = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64, device=feats.device)
    sums.index_add_(0, labels, feats)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(sums)
    return sums / counts[:, None]


def shared_precision(features: torch.Tensor, labels: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Pseudo-inverse of the shared covariance of class-centred features (float64)."""
    centred = features.double() - means[labels]
    cov = centred.T @ centred / centred.shape[0]
    return torch.linalg.pinv(cov, hermitian=True)


def min_mahalanobis(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """[N] min over centres of the squared Mahalanobis distance, batched as a quadratic form."""
    h = features.double()
    hp = h @ precision
    d = (hp * h).sum(1, keepdim=True) - 2 * hp @ means.T + ((means @ precision) * means).sum(1)[None, :]
    return d.min(1).values


class Mahalanobis(Detector):
    """max_c -(h - mu_c)^T Sigma^+ (h - mu_c), shared covariance."""

    name = "mahalanobis"

    def fit(self, bank: FeatureBank) -> Mahalanobis:
        assert bank.labels is not None, "mahalanobis needs labelled ID features"
        self.means_ = class_means(bank.features, bank.labels, bank.logits.shape[1])
        self.precision_ = shared_precision(bank.features, bank.labels, self.means_)
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return -min_mahalanobis(bank.features, self.means_.to(bank.features.device), self.precision_.to(bank.features.device))
