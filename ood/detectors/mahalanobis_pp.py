"""Mahalanobis++ and RMDS++, Mueller & Hein, "Mahalanobis++: Improving OOD Detection via Feature Normalization",
ICML 2025 (arXiv 2505.18032): the Mahalanobis (`mahalanobis`) and relative Mahalanobis (`rmds`) scores computed on
l2-normalised penultimate features h / ||h||_2, both in the fit (class means, shared covariance, and RMDS's
background Gaussian) and in the scoring:
    mahalanobis_pp: max_c -(z - mu_c)^T Sigma^+ (z - mu_c),       z = h / ||h||_2
    rmds_pp:        max_c [-MD_c(z) + MD_0(z)]
The normalisation removes the variation of the feature norm that the shared-covariance Gaussian model does not fit;
with it Mahalanobis / RMDS lead the ImageNet-1K results for ViT and Swin backbones. Reference: the paper (neither
OpenOOD nor pytorch-ood implements it); the tests compare with OpenOOD's `mds` / `rmds` scoring on normalised features.
Implementation: the `mahalanobis` / `rmds` detectors (`ood.detectors.mahalanobis`) run unchanged on a view of the
bank whose rows are normalised chunk by chunk as those detectors read them (`NormalisedRows`): no normalised copy
of the bank is made, so memory is theirs (the bank plus one float64 chunk; state C x D means and D x D precisions).
Deviations: those of `mahalanobis` / `rmds` (batched quadratic form, float64, pseudo-inverse); an all-zero h stays 0.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ood.detectors.base import Detector
from ood.detectors.mahalanobis import RMDS, Mahalanobis
from ood.features.bank import FeatureBank


class NormalisedRows:
    """Read-only view of a [N, D] feature tensor whose row slices come back l2-normalised in float64.

    It offers what the Mahalanobis helpers use (`shape`, `device`, `len`, row slicing and indexing), so they run on
    normalised features chunk by chunk without a normalised copy of the bank.
    """

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features
        self.shape = features.shape
        self.device = features.device

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice | torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features[rows].double(), dim=1)


def normalised(bank: FeatureBank) -> FeatureBank:
    """`bank` with l2-normalised features (a lazy row view, no copy)."""
    return replace(bank, features=NormalisedRows(bank.features))  # type: ignore[arg-type]


class _Normalised(Detector):
    """Fits and scores its Mahalanobis parent on l2-normalised features."""

    def fit(self, bank: FeatureBank) -> _Normalised:
        return super().fit(normalised(bank))  # type: ignore[safe-super]

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return super().score(normalised(bank))


class MahalanobisPP(_Normalised, Mahalanobis):
    """Mahalanobis on h / ||h||_2."""

    name = "mahalanobis_pp"


class RMDSPP(_Normalised, RMDS):
    """Relative Mahalanobis on h / ||h||_2."""

    name = "rmds_pp"
