"""DDP-exact collection of per-sample evaluation outputs.

Lightning's distributed sampler pads evaluation loaders with duplicate samples and `all_gather` needs equal
shapes, so every sample carries its dataset index. Two ways bring the ranks' rows together, both deduplicating on
the index (first occurrence in rank-major order, as Lightning's padding repeats a sample another rank already has)
and sorting by it, so the result equals the single-process one exactly:
- `SplitCollector`: torchmetrics cat states, synced at `compute`, every rank receives every row (small reducers:
  `ood.features.reduce`);
- `RankZeroRows`: only global rank 0 holds the rows (the evaluation banks), written in place as they come, in RAM
  or in memory-mapped .npy files; the other ranks send theirs over point-to-point messages and never hold more
  than their own shard."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ood.features.bank import row_slices

#: bytes per point-to-point message of `RankZeroRows.gather` (bounds the receive buffer)
SEND_BYTES = 64 * 2**20
#: how long the other ranks may wait for rank 0 (its evaluation of an ImageNet-sized bank can take hours on CPU;
#: the default process group's 30 min would time out)
RANK_ZERO_TIMEOUT = timedelta(hours=24)


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's `malloc_trim`; nothing elsewhere: musl, macOS, and Windows,
    whose LoadLibrary cannot open the process itself). A process that has freed a large block raises glibc's mmap
    threshold (up to 32 MB), so later batch-sized tensors live on the heap and their pages stay resident once freed:
    a rank that sent its shard, then received the result, peaked at both."""
    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):  # Windows: CDLL(None) is a TypeError
        return
    if trim is not None:
        trim(0)


def _sorted_firsts(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stable sort order of `index` and, in that order, whether each entry is its value's first occurrence (no
    host sync: it stays on the device)."""
    ordered, order = torch.sort(index, stable=True)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return order, first


def first_occurrences(index: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of every distinct value of `index`, ordered by that value."""
    order, first = _sorted_firsts(index)
    return order[first]


class SplitCollector(Metric):
    """Cat-states for `index` and each named field of one evaluation split."""

    full_state_update = False

    def __init__(self, fields: list[str]) -> None:
        super().__init__(dist_sync_on_step=False, distributed_available_fn=in_distributed_run)
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
        """All fields, synced across ranks, one row per unique dataset index, sorted by index."""
        index = dim_zero_cat(self.index)
        keep = first_occurrences(index)
        out = {"index": index[keep]}
        for field in self.fields:
            out[field] = dim_zero_cat(getattr(self, field))[keep]
        return out


#: True inside `alone()`: this process evaluates by itself, whatever process group its caller runs in
_ALONE: ContextVar[bool] = ContextVar("ood_evaluates_alone", default=False)


@contextmanager
def alone() -> Iterator[None]:
    """A single-process evaluation inside a caller's process group (`ood.evaluate` in one rank of the caller's DDP
    training): its rows are this process's own, exchanged with no other rank. Taken as the evaluation of a DDP run, it
    waited for the caller's other ranks, forever when it ran on rank 0 alone."""
    token = _ALONE.set(True)
    try:
        yield
    finally:
        _ALONE.reset(token)


def in_distributed_run() -> bool:
    """Whether this process exchanges rows with other ranks: a DDP run's, and not inside `alone()`."""
    return not _ALONE.get() and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _empty(shape: tuple[int, ...], dtype: torch.dtype, path: Path | None, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor: in RAM on `device`, or backed by a new memory-mapped .npy file at `path`."""
    if path is None:
        return torch.empty(shape, dtype=dtype, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=torch.empty(0, dtype=dtype).numpy().dtype, shape=shape)
    return torch.from_numpy(array)


def open_bank_file(path: str | Path) -> torch.Tensor:
    """A .npy file as a memory-mapped tensor (copy-on-write: the file is never modified; nothing is read until used)."""
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def _row_chunks(n: int, row: tuple[int, ...], dtype: torch.dtype) -> list[slice]:
    """Row slices of at most `SEND_BYTES` each (at least one row) covering `n` rows of shape `row`."""
    row_bytes = max(1, int(np.prod(row, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size())
    step = max(1, SEND_BYTES // row_bytes)
    return row_slices(n, step)


class RankZeroRows:
    """One evaluation split's rows (`index` and named fields), assembled in place on global rank 0 (DDP-exact).

    Every batch's `index` holds its rows' dataset index, in `[0, size)`. Global rank 0 (or the single process)
    allocates each field once, with `size` rows, on `device` or as a memory-mapped `<out_dir>/<field>.npy` (CPU),
    and writes every batch at its rows' dataset index as it arrives, a row's first occurrence winning (rank 0's own
    rows, then rank 1's, ...: Lightning's padding repeats a sample another rank already has), without a host sync:
    rank 0 never holds a split twice, not even while assembling it. Its batches on another device than the memory
    map wait for `gather` (no copy to the host per batch). Other ranks keep their batches, and `gather` sends them one
    message (`SEND_BYTES`) at a time, dropping each batch once sent: they never hold more than their own rows plus
    one message.
    """

    def __init__(
        self, size: int, device: torch.device | str = "cpu", out_dir: str | Path | None = None, distributed: bool = True
    ) -> None:
        self.size = size
        #: False: this process's rows alone, whatever the process group (a pass each rank runs in full)
        self.distributed = distributed and in_distributed_run()
        self.rank_zero = not self.distributed or dist.get_rank() == 0
        self.device = torch.device("cpu") if out_dir is not None else torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # as batches name it: rows written in place
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.fields: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        # one spare row past `size`: where a row already written goes instead (no sync to drop it)
        self._written = torch.zeros(size + 1, dtype=torch.bool, device=self.device) if self.rank_zero else None
        self._out: dict[str, torch.Tensor] = {}
        self._batches: dict[str, list[torch.Tensor]] = {}

    def update(self, index: torch.Tensor, **values: torch.Tensor) -> None:
        """Add one batch: written into place on rank 0, kept for `gather` otherwise."""
        if not self.fields:
            self.fields = {k: (tuple(v.shape[1:]), v.dtype) for k, v in values.items()}
        elif values.keys() != self.fields.keys():
            raise KeyError(f"evaluation batch has fields {sorted(values)}, the first had {sorted(self.fields)}")
        if self.rank_zero and index.device == self.device:
            target = self._targets(index)
            for name, value in values.items():
                self._put(name, target, value.detach())
            return
        for name, value in {"index": index, **values}.items():
            self._batches.setdefault(name, []).append(value.detach())

    def _targets(self, index: torch.Tensor) -> torch.Tensor:
        """Rank 0: where each row of `index` goes (its dataset index, or the spare row when that index was written
        before or earlier in `index`), marked written."""
        index = index.to(self.device)
        order, first = _sorted_firsts(index)
        first = torch.empty_like(first).scatter_(0, order, first)
        target = torch.where(first & ~self._written[index], index, self.size)
        self._written[target] = True
        return target

    def _put(self, name: str, target: torch.Tensor, rows: torch.Tensor) -> None:
        if name not in self._out:
            shape, dtype = self.fields[name]
            path = None if self.out_dir is None else self.out_dir / f"{name}.npy"
            self._out[name] = _empty((self.size + 1, *shape), dtype, path, self.device)
        self._out[name][target] = rows.to(self.device)

    def _stream(self, name: str) -> Iterator[torch.Tensor]:
        """This rank's kept rows of field `name` on the CPU, in messages of at most `SEND_BYTES`; each batch is
        dropped as soon as its rows are out."""
        batches = self._batches.pop(name)[::-1]  # popped from the end: first batch first
        held: list[torch.Tensor] = []
        for rows in _row_chunks(sum(len(b) for b in batches), *self.fields[name]):
            need = rows.stop - rows.start
            while sum(len(h) for h in held) < need:
                held.append(batches.pop())
            joined = torch.cat(held).cpu() if len(held) > 1 else held[0].cpu()
            held = [joined[need:]] if len(joined) > need else []
            yield joined[:need].contiguous()

    def gather(self, group: Any = None) -> dict[str, torch.Tensor] | None:
        """Every rank's rows, deduplicated and sorted by dataset index, on global rank 0 only (None elsewhere).

        Every rank calls it (a collective over `group`, which must be a gloo group: rows travel as CPU tensors).
        Dataset rows no rank added (e.g. under `trainer.limit_test_batches`) are left out (rank 0 then copies the
        rows it has into new tensors).
        """
        index = torch.cat(self._batches.pop("index", [torch.zeros(0, dtype=torch.long)])).cpu()
        if self.distributed:
            gathered: list[Any] = [None] * dist.get_world_size() if self.rank_zero else []
            dist.gather_object((self.fields, index), gathered if self.rank_zero else None, dst=0, group=group)
            if not self.rank_zero:
                for name in self.fields:
                    for message in self._stream(name):
                        dist.send(message, dst=0, group=group)
                return_freed_memory()  # before the result arrives (`broadcast_rows`)
                return None
            self.fields = self.fields or next((f for f, _ in gathered if f), {})
        if not self.fields:
            raise RuntimeError("no batch was added")
        if len(index):  # rank 0's own batches from another device than its memory map, each dropped once written
            target = self._targets(index)
            for name in self.fields:
                batches, start = self._batches.pop(name)[::-1], 0
                while batches:
                    rows = batches.pop()
                    self._put(name, target[start : start + len(rows)], rows)
                    start += len(rows)
                    del rows
        if self.distributed:
            for src, (fields, index) in enumerate(gathered[1:], start=1):
                target = self._targets(index)
                for name, (shape, dtype) in fields.items():
                    parts = _row_chunks(len(index), shape, dtype)
                    buffer = torch.empty((parts[0].stop - parts[0].start if parts else 0, *shape), dtype=dtype)
                    for rows in parts:  # one buffer for every message (see `broadcast_rows`)
                        message = buffer[: rows.stop - rows.start]
                        dist.recv(message, src=src, group=group)
                        self._put(name, target[rows], message)
        return self._result()

    def _result(self) -> dict[str, torch.Tensor]:
        kept = self._written[: self.size].cpu().nonzero().flatten()
        out, self._out = self._out, {}
        for name in list(out):
            path = None if self.out_dir is None else self.out_dir / f"{name}.npy"
            if len(kept) < self.size:
                path = None if path is None else path.with_suffix(".kept.npy")
                out[name] = _take(out.pop(name), kept, path)
            else:
                out[name] = out.pop(name)[: self.size]
            if path is not None:
                del out[name]  # unmaps the writable view (its pages stay in the page cache)
                out[name] = open_bank_file(path)[: len(kept)]
        # on the bank's device, as its rows: a CPU index beside GPU rows broke `FeatureBank.subset` with device rows
        return {"index": kept.to(self.device), **out}


def _take(tensor: torch.Tensor, rows: torch.Tensor, path: Path | None) -> torch.Tensor:
    """`tensor[rows]` into a new tensor (or memory-mapped file at `path`), copied one message at a time."""
    out = _empty((len(rows), *tensor.shape[1:]), tensor.dtype, path, tensor.device)
    for part in _row_chunks(len(rows), tuple(tensor.shape[1:]), tensor.dtype):
        out[part] = tensor[rows[part].to(tensor.device)]
    return out


def rank_zero_group() -> Any:
    """A gloo group over all ranks with `RANK_ZERO_TIMEOUT` for `RankZeroRows.gather` and the result broadcast
    (CPU tensors whatever the default backend); None outside DDP. Every rank must call it."""
    return dist.new_group(backend="gloo", timeout=RANK_ZERO_TIMEOUT) if in_distributed_run() else None


def release_group(group: Any) -> None:
    """Destroy a group made by `rank_zero_group` (None outside DDP: nothing to do), so its gloo sockets do not
    outlive the pass that used it."""
    if group is not None:
        dist.destroy_process_group(group)


def broadcast_rows(rows: dict[str, torch.Tensor] | None, device: torch.device | str, group: Any = None) -> dict[str, torch.Tensor]:
    """Global rank 0's `rows` (same-length per-row fields) on every rank: rank 0 keeps `rows` themselves, every other
    rank gets them on `device`, each field allocated once at its full size and filled one message (`SEND_BYTES`) at a
    time, so no rank holds them twice. `group` must be a gloo group (rows travel as CPU tensors); every rank calls it;
    outside DDP `rows` themselves."""
    if not in_distributed_run():
        assert rows is not None
        return rows
    meta = broadcast_from_rank_zero(None if rows is None else {k: (tuple(v.shape), v.dtype) for k, v in rows.items()},
                                    group)
    out = {}
    for name, (shape, dtype) in meta.items():
        field = rows[name] if rows is not None else torch.empty(shape, dtype=dtype, device=device)
        parts = _row_chunks(shape[0], shape[1:], dtype)
        # a receiver on the CPU takes each message straight into its rows; on another device through one buffer,
        # reused: a new one per message split the heap's free space (rank 1 of 2 peaked at 1.33x the result)
        buffer = None if rows is not None or field.device.type == "cpu" or not parts else torch.empty(
            (parts[0].stop - parts[0].start, *shape[1:]), dtype=dtype)
        for part in parts:
            message = field[part].cpu() if buffer is None else buffer[: part.stop - part.start]
            dist.broadcast(message, src=0, group=group)
            if buffer is not None:
                field[part] = message.to(device)
        out[name] = field
    return out


def broadcast_from_rank_zero(obj: Any, group: Any = None) -> Any:
    """Rank 0's `obj` (pickled) on every rank; `obj` itself outside DDP."""
    if not in_distributed_run():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]
