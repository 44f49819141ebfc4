"""DDP-exact collection of per-sample evaluation outputs (DESIGN §4).

Lightning's distributed sampler pads evaluation loaders with duplicate samples and `all_gather` needs equal
shapes, so every sample carries its dataset index; a torchmetrics cat-state gathers uneven per-rank tensors,
and `compute` dedupes on the index and sorts by it. The result equals the single-process one exactly.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class SplitCollector(Metric):
    """Cat-states for `index` and each named field of one evaluation split."""

    full_state_update = False

    def __init__(self, fields: list[str]) -> None:
        super().__init__(dist_sync_on_step=False)
        self.fields = list(fields)
        self.add_state("index", default=[], dist_reduce_fx="cat")
        for field in self.fields:
            self.add_state(field, default=[], dist_reduce_fx="cat")

    def update(self, index: torch.Tensor, **values: torch.Tensor) -> None:  # type: ignore[override]
        missing = set(self.fields) - set(values)
        if missing:
            raise KeyError(f"evaluation batch lacks fields {sorted(missing)}")
        self.index.append(index.detach())
        for field in self.fields:
            getattr(self, field).append(values[field].detach())

    def compute(self) -> dict[str, torch.Tensor]:
        """All fields, one row per unique dataset index, sorted by index."""
        index = dim_zero_cat(self.index)
        index_sorted, order = torch.sort(index, stable=True)
        first = torch.ones_like(index_sorted, dtype=torch.bool)
        first[1:] = index_sorted[1:] != index_sorted[:-1]
        keep = order[first]
        out = {"index": index[keep]}
        for field in self.fields:
            out[field] = dim_zero_cat(getattr(self, field))[keep]
        return out
