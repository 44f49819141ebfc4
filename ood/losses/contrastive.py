"""Supervised contrastive loss (SupCon) and SimCLR's NT-Xent as its special case.

Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020 (arXiv 2004.11362), `L^sup_out`, as in
https://github.com/HobbitLong/SupContrast `losses.py`; SimCLR (Chen et al., ICML 2020, arXiv 2002.05709) is the
same loss with every sample its own class. Given a `base_temperature`, the loss is scaled by `temperature /
base_temperature` as SupContrast's `SupConLoss` (`main_supcon.py` keeps its base 0.07 and passes only the
temperature, so at OODformer's 0.1 the loss is x1.43, at SimCLR's 0.5 x7.1: under SGD a learning-rate factor,
weight decay aside; `method=cluster` passes SupContrast's 0.07); without one it is the paper's L^sup_out. Deviation: anchors without any
positive are left out of the mean instead of counting as 0 (never happens with two views).

Under DDP the loss is taken over the global batch: every rank gathers all ranks' embeddings (with gradients) as
`z` and passes its own rows as `anchors`; the mean over the global batch is the mean of the ranks' losses, which
is what DDP's gradient averaging computes (`ood.methods.distributed.gather_global`).
"""

from __future__ import annotations

import torch

#: SupContrast's `base_temperature`
BASE_TEMPERATURE = 0.07


def supcon(
    z: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    anchors: slice | None = None,
    base_temperature: float | None = None,
) -> torch.Tensor:
    """Supervised contrastive loss of the L2-normalised embeddings `z` [M, P] (all views stacked), labels [M].

    For anchor i with positives P(i) = {p != i : y_p = y_i}:
    l_i = -1/|P(i)| sum_p log( exp(z_i.z_p / T) / sum_{a != i} exp(z_i.z_a / T) ); the loss is the mean over
    anchors with at least one positive, times T / `base_temperature` when one is given (SupContrast's code). With
    labels = sample ids (views share their sample's id) it is SimCLR.
    `anchors` (default: every row) restricts the anchors to those rows of `z`; every row stays a contrast sample.
    """
    m = z.shape[0]
    rows = torch.arange(m, device=z.device)[anchors if anchors is not None else slice(None)]
    sim = z[rows] @ z.T / temperature
    self_mask = rows[:, None] == torch.arange(m, device=z.device)[None, :]
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positive = (labels[rows][:, None] == labels[None, :]) & ~self_mask
    n_pos = positive.sum(1)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        raise ValueError("supcon: no anchor has a positive; stack at least two views per sample")
    mean_log_prob_pos = log_prob.masked_fill(~positive, 0.0).sum(1)[has_pos] / n_pos[has_pos]
    scale = 1.0 if base_temperature is None else temperature / base_temperature
    return -scale * mean_log_prob_pos.mean()
