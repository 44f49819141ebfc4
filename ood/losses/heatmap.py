"""The weighted heatmap loss of heatmap-based OOD detection.

Hornauer & Belagiannis, "Heatmap-based Out-of-Distribution Detection", WACV 2023 (arXiv 2211.08115); released code
jhornauer/heatmap_ood `optimization.py::ase_loss_weighted` (summed over channels and pixels, then averaged over the
batch in `learn_prototype`):

  L = mean_batch sum_{c,i,j} w_cij (M_cij + x_cij - t_cij)^2,   w = 1 + alpha |t|,

with the heatmap M, the input x and the target image t (t = x for ID samples, so the target heatmap is 0; the
nearest same-class ID prototype for outliers), all in the method's [-1, 1] input space.
"""

from __future__ import annotations

import torch


def heatmap_loss(
    heatmap: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 5.0
) -> torch.Tensor:
    """Batch mean of sum_{c,i,j} (1 + alpha |t|) (M + x - t)^2 for heatmaps, inputs and targets [B, C, H, W].

    Zero when M = t - x; the gradient w.r.t. M of one sample's term is 2 w (M + x - t) (divided by B for the mean).
    """
    weight = 1.0 + alpha * targets.abs()
    return (weight * (heatmap + inputs - targets).square()).flatten(1).sum(1).mean()
