"""Cluster Focal Loss and the outlier push-away term of the semantic-driven energy method: a RECONSTRUCTION.

A. Joshi, S. Chalasani, K. Nanjunda Iyer, "Semantic Driven Energy based Out-of-Distribution Detection",
arXiv 2208.10787 (no public code). The paper names a Cluster Focal Loss (CFL) that pulls ID embeddings to learnt
class representations and a term that pushes OOD embeddings away from them, without formulas in any source we
could consult. Ours (docs/methods/energy_cfl.md), with squared Euclidean distances to the centres:
  p_k(x) = softmax_k(-||z(x) - c_k||^2 / tau),   L_CFL = mean_x -(1 - p_y)^gamma log p_y     (focal loss, Lin et al.
  ICCV 2017, arXiv 1708.02002, on distance logits; gamma = 0 is cross-entropy on those logits)
  L_push = mean_{x_out} relu(m_d - min_k ||z(x_out) - c_k||)^2                               (unsquared distance)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def squared_distances(embeddings: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """||z_i - c_k||^2 [N, K] of `embeddings` [N, d] to `centres` [K, d], from the differences (exact, no
    expansion round-off)."""
    return (embeddings[:, None, :] - centres[None, :, :]).pow(2).sum(-1)


def cluster_focal(embeddings: torch.Tensor, centres: torch.Tensor, targets: torch.Tensor, gamma: float, tau: float) -> torch.Tensor:
    """mean -(1 - p_y)^gamma log p_y with p = softmax(-||z - c_k||^2 / tau) (reconstruction, module doc)."""
    log_p = F.log_softmax(-squared_distances(embeddings, centres) / tau, dim=1)
    log_py = log_p.gather(1, targets[:, None])[:, 0]
    return (-(1 - log_py.exp()).pow(gamma) * log_py).mean()


def push_away(embeddings_out: torch.Tensor, centres: torch.Tensor, margin: float) -> torch.Tensor:
    """mean relu(margin - min_k ||z_out - c_k||)^2: outliers closer than `margin` to a centre pay (module doc)."""
    nearest = squared_distances(embeddings_out, centres).min(1).values.clamp_min(1e-12).sqrt()
    return F.relu(margin - nearest).pow(2).mean()
