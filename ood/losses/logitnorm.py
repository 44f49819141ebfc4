"""LogitNorm: cross-entropy on L2-normalised logits.

H. Wei, R. Xie, H. Cheng, L. Feng, B. An, Y. Li, "Mitigating Neural Network Overconfidence with Logit
Normalization", ICML 2022, arXiv 2205.09310; released code hongxin001/logitnorm_ood `common/loss_function.py`
(`LogitNormLoss`: `x / (||x||_2 + 1e-7) / t`, then cross-entropy), OpenOOD v1.5 `LogitNormTrainer`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logitnorm(logits: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    """CE(f / (tau * (||f||_2 + 1e-7)), y), mean over the batch; `logits` [N, C], `targets` [N]."""
    norms = torch.linalg.vector_norm(logits, dim=1, keepdim=True) + 1e-7
    return F.cross_entropy(logits / (norms * tau), targets)
