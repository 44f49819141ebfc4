"""Gradients as uncertainty, Lee & AlRegib, "Gradients as a Measure of Uncertainty in Neural Networks", ICIP 2020
(arXiv 2008.08030), as pytorch-ood's `GradUncertainty` (`src/pytorch_ood/detector/graduncertainty.py`) restricted
to the last layer (its documented `param_filter` use).

Loss against the all-ones "confounding label": L = BCE(softmax(f), 1) = sum_c -log p_c, whose gradient with respect
to the logits is C p - 1. For the last layer (weight W, bias b) the per-sample gradients are (C p - 1) h^T and
C p - 1, so the sum of their squared L2 norms is closed-form:
    score(x) = || C p - 1 ||_2^2 * (|| h ||_2^2 + 1),
large for confident (ID) inputs and 0 for a uniform prediction, hence an ID score as is (pytorch-ood returns its
negation as an outlier score).
Deviations: closed form from the cache (no backward pass, no per-sample vmap); float64. pytorch-ood differentiates
through a float32 softmax and `binary_cross_entropy`, whose backward clamps p (1 - p) at 1e-12: where probabilities
saturate (p_c < 1e-12 or p_max rounding to 1) its gradient departs from the exact C p - 1 used here. The paper itself
trains a small classifier on per-layer gradient norms with labelled OOD data; like pytorch-ood we use the summed
norm directly (no OOD data). pytorch-ood 0.4.0 ships this method as `GradNorm` and uses the summed norm as an
outlier score (higher = more OOD); its later `GradUncertainty` negates it (confident ID inputs have the larger
gradient), which is the orientation used here. Not in OpenOOD. Memory: one float64 row chunk of the logits and features at a time (float16 features too).
"""

from __future__ import annotations

import torch

from ood.detectors.base import Detector
from ood.detectors.mahalanobis import row_chunks
from ood.features.bank import FeatureBank


def grad_uncertainty_score(logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """|| C softmax(f) - 1 ||^2 (|| h ||^2 + 1): squared L2 norm of the last layer's (W, b) gradient of sum_c -log p_c."""
    out = []
    for rows in row_chunks(len(logits)):
        p = torch.softmax(logits[rows].double(), dim=1)
        grad_sq = (p.shape[1] * p - 1).square().sum(1)
        out.append(grad_sq * (features[rows].double().square().sum(1) + 1))
    return torch.cat(out)


class GradUncertainty(Detector):
    """Squared norm of the last layer's gradient of the all-ones BCE, in closed form."""

    name = "graduncertainty"
    float16_features = True
    min_classes = 2

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return grad_uncertainty_score(bank.logits, bank.features)
