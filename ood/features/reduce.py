"""DDP-exact reducers for methods that reduce a split instead of caching it: per-class sums of named
per-sample fields, and the first n samples of a split in dataset order.

Lightning's distributed sampler pads every rank's share of an evaluation split with at most one duplicate, always
the rank's *last* sample. `ClassSums` holds each rank's last sample back from its sums and, after the sync, adds it
only when no other rank summed its index, so the sums equal the single-process ones (up to float summation order).
`FirstN` is a `SplitCollector` (cat states, deduplicated and sorted by index) that keeps rows with index < n.

Both sync at `compute` (a collective: every rank must call it). The evaluation runs on global rank 0 only, so the
evaluation callback first calls `sync_reducers()` on every rank: it computes every reducer updated since its last
`compute`, in first-update order (the same on every rank); the method's later `compute` calls return the result.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Mapping

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ood.features.collector import SplitCollector, in_distributed_run

#: reducers updated since their last `compute`, keyed by first-update order (weak: a dropped reducer leaves it)
_PENDING: weakref.WeakValueDictionary[int, _Pending] = weakref.WeakValueDictionary()
_ORDER = itertools.count()


class _Pending:
    """A reducer that registers itself in `_PENDING` at its first update after a `compute` and leaves it at the next."""

    _sync_key: int | None = None

    def _mark_pending(self) -> None:
        if self._sync_key is None:
            self._sync_key = next(_ORDER)
            _PENDING[self._sync_key] = self

    def _forget(self) -> None:
        if self._sync_key is not None:
            _PENDING.pop(self._sync_key, None)
            self._sync_key = None


def sync_reducers() -> None:
    """`compute` (and so sync across ranks) every reducer with updates not yet computed, in first-update order.

    Call it on every rank before work that runs on one rank only (the evaluation on rank 0).
    """
    for key in sorted(_PENDING.keys()):
        reducer = _PENDING.get(key)
        if reducer is not None:
            reducer.compute()


class _Sums(Metric):
    full_state_update = False

    def __init__(self, num_classes: int, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype]) -> None:
        # not over a caller's process group inside `alone()` (`ood.evaluate` in one rank of the caller's training)
        super().__init__(dist_sync_on_step=False, distributed_available_fn=in_distributed_run)
        self.fields = list(shapes)
        for name, shape in shapes.items():
            self.add_state(f"sum_{name}", torch.zeros(num_classes, *shape, dtype=dtypes[name]), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(self, index: torch.Tensor, labels: torch.Tensor, **values: torch.Tensor) -> None:  # type: ignore[override]
        for name in self.fields:
            state = getattr(self, f"sum_{name}")
            state.index_add_(0, labels, values[name].to(state.dtype))
        self.counts += torch.bincount(labels, minlength=self.counts.shape[0])
        self.index.append(index)

    def compute(self) -> dict[str, torch.Tensor]:
        # torchmetrics squeezes one-element outputs: restore the row dimension of index/counts
        out = {name: getattr(self, f"sum_{name}") for name in self.fields}
        return {**out, "counts": self.counts.reshape(-1), "index": dim_zero_cat(self.index).reshape(-1)}


class ClassSums(_Pending):
    """Per-class sums and counts of named fields over one split, exact under DDP (see the module docstring).

    Args:
        num_classes: number of classes (labels index the sums).
        dtypes: accumulation dtype per field (default: the field's own dtype).
    """

    def __init__(self, num_classes: int, dtypes: Mapping[str, torch.dtype] | None = None) -> None:
        self.num_classes = num_classes
        self.dtypes = dict(dtypes or {})
        self._sums: _Sums | None = None
        self._tail: SplitCollector | None = None
        self._pending: dict[str, torch.Tensor] | None = None
        self._result: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None

    def update(self, index: torch.Tensor, labels: torch.Tensor, **values: torch.Tensor) -> None:
        """Add one batch; its last sample waits until the next batch (or the sync) in case it is padding."""
        self._mark_pending()
        if self._sums is None:
            shapes = {k: tuple(v.shape[1:]) for k, v in values.items()}
            dtypes = {k: self.dtypes.get(k, v.dtype) for k, v in values.items()}
            self._sums = _Sums(self.num_classes, shapes, dtypes).to(labels.device)
            self._tail = SplitCollector(["labels", *values]).to(labels.device)
        if self._pending is not None:
            self._sums.update(**self._pending)
        self._sums.update(index[:-1], labels[:-1], **{k: v[:-1] for k, v in values.items()})
        self._pending = {"index": index[-1:], "labels": labels[-1:], **{k: v[-1:] for k, v in values.items()}}

    def finish(self) -> None:
        """End of this rank's pass (idempotent): the held-back last sample joins the deduplicated tail."""
        if self._sums is None or self._tail is None:
            raise RuntimeError("ClassSums: no batch was added")
        if self._pending is not None:
            self._tail.update(**self._pending)
            self._pending = None

    def merge(self, other: ClassSums) -> None:
        """Fold another shard's partial sums into this one (what the DDP sync does; for sharded runs and tests)."""
        self.finish()
        other.finish()
        assert self._sums is not None and self._tail is not None and other._sums is not None and other._tail is not None
        self._sums.merge_state(other._sums)
        self._tail.merge_state(other._tail)

    def compute(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(sums per field [C, ...], counts [C]), synced across ranks; computed once."""
        if self._result is None:
            self._forget()
            self.finish()
            assert self._sums is not None and self._tail is not None
            sums, tail = self._sums.compute(), self._tail.compute()
            new = ~torch.isin(tail["index"].reshape(-1), sums["index"])
            labels = tail["labels"].reshape(-1)[new]
            out = {
                name: sums[name].index_add(0, labels, tail[name][new].to(sums[name].dtype))
                for name in self._sums.fields
            }
            self._result = out, sums["counts"] + torch.bincount(labels, minlength=self.num_classes)
        return self._result


class FirstN(_Pending, SplitCollector):
    """The rows of the first `n` samples (dataset index < n) of a split, deduplicated and sorted by index."""

    def __init__(self, n: int, fields: list[str]) -> None:
        super().__init__(fields)
        self.n = n

    def update(self, index: torch.Tensor, **values: torch.Tensor) -> None:  # type: ignore[override]
        self._mark_pending()
        keep = index < self.n
        super().update(index[keep], **{k: v[keep] for k, v in values.items()})

    def compute(self) -> dict[str, torch.Tensor]:
        self._forget()
        return super().compute()
