"""Free energy and the squared-hinge energy regulariser of Energy-OE fine-tuning.

W. Liu, X. Wang, J. D. Owens, Y. Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020, arXiv 2010.03759;
released code wetliu/energy_ood `CIFAR/train.py`:
  Ec_in = -logsumexp(x_in), Ec_out = -logsumexp(x_out),
  loss += 0.1 * (relu(Ec_in - m_in)^2.mean() + relu(m_out - Ec_out)^2.mean())
Here the weight (0.1 there) stays outside the function and the temperature is a parameter (the code fixes T = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def free_energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """E(x) = -T * logsumexp(f(x) / T) per row of `logits` [N, C]: low for ID, high for OOD (the ID score is -E)."""
    return -temperature * torch.logsumexp(logits / temperature, dim=1)


def energy_margin(
    logits_in: torch.Tensor,
    logits_out: torch.Tensor,
    m_in: float,
    m_out: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """mean relu(E_in - m_in)^2 + mean relu(m_out - E_out)^2 with E = -T * LSE(f / T).

    ID samples pay when their energy is above `m_in`, outliers when theirs is below `m_out`; both terms are zero
    inside the margins. No weight inside (Energy-OE multiplies by lambda = 0.1).
    """
    e_in, e_out = free_energy(logits_in, temperature), free_energy(logits_out, temperature)
    return F.relu(e_in - m_in).pow(2).mean() + F.relu(m_out - e_out).pow(2).mean()
