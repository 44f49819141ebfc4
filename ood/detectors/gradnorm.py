"""GradNorm, Huang, Geng & Li, "On the Importance of Gradients for Detecting Distributional Shifts in the Wild",
NeurIPS 2021 (arXiv 2110.00218).

score(x) = || d L / d W ||_1 for L = sum_c -log p_c (cross-entropy against every class), W the last layer's
weight. Since dL/df = C p - 1 and dL/dW = (C p - 1) h^T, the L1 norm of the outer product factorises:
score = || C p - 1 ||_1 * || h ||_1, computed from the cache with no backward pass.
The paper's Eq. 4 writes the KL to the uniform target, i.e. L / C; its released code
(deeplearning-wisc/gradnorm_ood, `iterate_data_gradnorm`: targets of ones, temperature 1) and OpenOOD's `gradnorm`
use L itself, as here (the same score; 1/C would only rescale it).
Deviations: closed form instead of autograd; float64. Memory: one float64 row chunk of the logits and features at a
time (`row_chunks`), so a float16 bank is widened chunk by chunk, never copied whole.
"""

from __future__ import annotations

import torch

from ood.detectors.base import Detector
from ood.detectors.mahalanobis import row_chunks
from ood.features.bank import FeatureBank


def gradnorm_score(logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """|| C softmax(f) - 1 ||_1 * || h ||_1: the L1 norm of the head-weight gradient of sum_c -log p_c (float64, one
    `CHUNK`-row chunk at a time)."""
    out = []
    for rows in row_chunks(len(logits)):
        p = torch.softmax(logits[rows].double(), dim=1)
        out.append((p.shape[1] * p - 1).abs().sum(1) * features[rows].double().abs().sum(1))
    return torch.cat(out)


class GradNorm(Detector):
    """L1 norm of the last-layer weight gradient of the all-classes cross-entropy, in closed form."""

    name = "gradnorm"
    float16_features = True
    min_classes = 2

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return gradnorm_score(bank.logits, bank.features)
