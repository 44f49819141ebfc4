"""`Batch`: the small named type every training and evaluation step receives.

`x, y, index` always (OOD labels are -1; `index` is the dataset index, carried for DDP-exact evaluation); `x_out`
only when the method trains on outliers (its labels and indices are never needed). Lightning moves dataclasses to
the device field by field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch.utils.data import default_collate


@dataclass
class Batch:
    """Images `x` [B, C, H, W], labels `y` [B], dataset indices `index` [B], outlier images `x_out` [B', C, H, W]."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    x_out: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def pin_memory(self) -> Batch:
        """The same batch in page-locked memory. A DataLoader with `pin_memory=True` calls this (it leaves objects
        without the method as they are), so the copies to the GPU can overlap computation (`non_blocking`)."""
        return Batch(**{f.name: None if (v := getattr(self, f.name)) is None else v.pin_memory() for f in fields(self)})


def collate_batch(items: Sequence[tuple[Any, Any, Any]]) -> Batch:
    """DataLoader `collate_fn`: `(x, y, index)` items -> `Batch`."""
    x, y, index = default_collate(items)
    return Batch(x, y, index)
