"""DDP-exact collection of per-sample evaluation outputs.

Lightning's distributed sampler pads evaluation loaders with duplicate samples and `all_gather` needs equal
shapes, so every sample carries its dataset index. Each rank appends its rows to a `SplitCollector`; two ways
bring them together, both deduplicating on the index (first occurrence in rank-major order, as Lightning's padding
repeats a sample another rank already has) and sorting by it, so the result equals the single-process one exactly:
- `SplitCollector.compute`: the torchmetrics cat-state sync, every rank receives every row (small reducers:
  `ood.features.reduce`);
- `gather_to_rank_zero`: only global rank 0 receives the rows (the evaluation banks: at ImageNet scale the other
  ranks never hold more than their own shard), chunk by chunk over point-to-point sends, into RAM or into
  memory-mapped .npy files.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

#: bytes per point-to-point message of `gather_to_rank_zero` (bounds the receive buffer)
SEND_BYTES = 64 * 2**20
#: how long the other ranks may wait for rank 0 (its evaluation of an ImageNet-sized bank can take hours on CPU;
#: the default process group's 30 min would time out)
RANK_ZERO_TIMEOUT = timedelta(hours=24)


def first_occurrences(index: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of every distinct value of `index`, ordered by that value."""
    index_sorted, order = torch.sort(index, stable=True)
    first = torch.ones_like(index_sorted, dtype=torch.bool)
    first[1:] = index_sorted[1:] != index_sorted[:-1]
    return order[first]


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
        """All fields, synced across ranks, one row per unique dataset index, sorted by index."""
        index = dim_zero_cat(self.index)
        keep = first_occurrences(index)
        out = {"index": index[keep]}
        for field in self.fields:
            out[field] = dim_zero_cat(getattr(self, field))[keep]
        return out

    def local(self) -> dict[str, torch.Tensor]:
        """This rank's rows as appended (index and every field; no sync, no dedupe)."""
        return {name: torch.cat(getattr(self, name)) for name in ("index", *self.fields)}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def gather_to_rank_zero(
    rows: Mapping[str, torch.Tensor],
    out_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    group: Any = None,
) -> dict[str, torch.Tensor] | None:
    """Every rank's `rows` (`index` [n] and per-row fields) deduplicated and sorted by index, on global rank 0 only.

    Every rank calls it (a collective over `group`, which must be a gloo group: rows travel as CPU tensors); ranks
    other than 0 get None and never hold more than their own rows. Rank 0 allocates each field once at its final
    size, on `device` or, with `out_dir`, as a memory-mapped `<out_dir>/<field>.npy`, and fills it one message
    (`SEND_BYTES`) at a time, so its peak is the result plus its own rows plus one message.
    """
    names = list(rows)
    local = {k: v.detach() for k, v in rows.items()}
    meta = (len(local["index"]), {k: (tuple(v.shape[1:]), v.dtype) for k, v in local.items()}, local["index"].cpu())
    world, rank = (dist.get_world_size(), dist.get_rank()) if _distributed() else (1, 0)
    if world > 1:
        gathered: list[Any] = [None] * world if rank == 0 else []
        dist.gather_object(meta, gathered if rank == 0 else None, dst=0, group=group)
        if rank != 0:
            for name in names:
                tensor = local[name].cpu()
                for rows_slice in _row_chunks(len(tensor), *meta[1][name]):
                    dist.send(tensor[rows_slice].contiguous(), dst=0, group=group)
            return None
    else:
        gathered = [meta]
    lengths = [m[0] for m in gathered]
    keep = first_occurrences(torch.cat([m[2] for m in gathered]))
    dest = torch.full((sum(lengths),), -1, dtype=torch.long)
    dest[keep] = torch.arange(len(keep))
    shapes = gathered[0][1]
    paths = {name: None if out_dir is None else Path(out_dir) / f"{name}.npy" for name in names}
    out_device = torch.device("cpu") if out_dir is not None else torch.device(device)
    out = {name: _empty((len(keep), *shapes[name][0]), shapes[name][1], paths[name], out_device) for name in names}
    offset = 0
    for src, n in enumerate(lengths):
        target = dest[offset : offset + n]
        offset += n
        for name in names:
            shape, dtype = gathered[src][1][name]
            for rows_slice in _row_chunks(n, shape, dtype):
                if src == 0:
                    chunk = local[name][rows_slice]
                else:
                    chunk = torch.empty((rows_slice.stop - rows_slice.start, *shape), dtype=dtype)
                    dist.recv(chunk, src=src, group=group)
                where = target[rows_slice]
                mine = where >= 0
                out[name][where[mine].to(out[name].device)] = chunk[mine.to(chunk.device)].to(out[name].device)
    for name, path in paths.items():
        if path is not None:
            del out[name]  # unmaps the writable view (its pages stay in the page cache)
            out[name] = open_bank_file(path)
    return {name: out[name] for name in names}


def rank_zero_group() -> Any:
    """A gloo group over all ranks with `RANK_ZERO_TIMEOUT` for `gather_to_rank_zero` and the result broadcast
    (CPU tensors whatever the default backend); None outside DDP. Every rank must call it."""
    return dist.new_group(backend="gloo", timeout=RANK_ZERO_TIMEOUT) if _distributed() else None


def release_group(group: Any) -> None:
    if group is not None:
        dist.destroy_process_group(group)


def broadcast_from_rank_zero(obj: Any, group: Any = None) -> Any:
    """Rank 0's `obj` (pickled) on every rank; `obj` itself outside DDP."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]
