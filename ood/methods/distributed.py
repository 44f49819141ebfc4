"""DDP helpers for methods whose training step must equal the single-device step over the global batch.

- `gather_global`: a loss over cross-sample pairs (SupCon, SimCLR) needs every rank's samples. Each rank gathers
  all ranks' tensors (with gradients, Lightning's `all_gather(..., sync_grads=True)`, whose backward sums the
  gradients of every rank's loss into the rank that produced the rows) and takes its own rows as anchors. The
  rank-averaged DDP gradient is then the gradient of one loss over the concatenated batch: with L_r the mean over
  rank r's anchors and equal per-rank batches, L = mean_r L_r.
- `zero_touch`: DDP without `find_unused_parameters` needs a gradient for every parameter in every step. A stage
  that trains only part of a model adds this exact-zero term, so the idle parameters get a gradient of exactly 0
  (not touched by their optimiser, which is not stepped) and DDP's reducer completes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning import LightningModule
from torch import nn


def gather_global(module: LightningModule, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], slice]:
    """All ranks' `tensors` concatenated in rank order (the first one with gradients, which must be the same
    shape on every rank), and the slice of the rows this rank contributed. One process: the tensors themselves."""
    n = tensors[0].shape[0]
    world = module.trainer.world_size if module._trainer is not None else 1
    if world == 1:
        return list(tensors), slice(0, n)
    gathered = [module.all_gather(t, sync_grads=i == 0).flatten(0, 1) for i, t in enumerate(tensors)]
    rank = module.global_rank
    return gathered, slice(rank * n, (rank + 1) * n)


def zero_touch(parameters: Iterable[nn.Parameter]) -> torch.Tensor:
    """0 x the sum of `parameters`: adds nothing to a loss, gives each parameter an exact zero gradient."""
    return sum((p.sum() for p in parameters if p.requires_grad), torch.zeros(())) * 0.0
