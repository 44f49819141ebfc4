"""`forward_dataset`: THE one pass of a function over a dataset, used by every fit-time pass of a method (statistics,
prototypes, a teacher's features, an outlier pool's predictions) and by feature extraction.

Why one helper: each pass needs the same care, and hand-written loops got it wrong in different ways. Here the
network is in eval mode for the pass (each sub-module's mode restored after), gradients are off (`torch.no_grad`:
outputs are ordinary tensors a later step may use), inputs go to the given device and dtype (the trainer's
precision), and the global random state is left exactly as it was (`torch.random.fork_rng` on the CPU and the
pass's CUDA device, Python's `random` and NumPy's global state saved and restored: iterating a `DataLoader` draws
a base seed from the global generator), so a run's training stream does not depend on whether, or how often, a
pass ran. A progress bar (tqdm, not left on screen) shows the pass.

Items: `(x, y, index)` (the DataModule's `Indexed` form), `(x, y)`, or a bare tensor `x`. The result holds every
field `fn` returns (a dict of per-sample tensors, or one tensor stored as `outputs`) plus `labels` when the items
carry them, one row per sample in dataset order, on the device `fn` returns its first field on (a pass may move its
outputs to the CPU as it goes).

The rows are written into place as they come (`ood.features.collector.RankZeroRows`, the evaluation's collector):
the result is never held twice, not even while it is assembled. `distributed=True` (under an initialised process
group of more than one rank) gives each rank every `world_size`-th sample; global rank 0 assembles the rows and
sends them to every rank (`broadcast_rows`, over a gloo group), so every rank receives the full result in dataset
order, equal to the one-process result.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ood.errors import DataNotFoundError
from ood.features.collector import RankZeroRows, broadcast_rows, rank_zero_group, release_group
from ood.utils import loader_batches, progress

PassFn = Callable[[torch.Tensor], "torch.Tensor | Mapping[str, torch.Tensor]"]


@contextmanager
def isolated_rng(device: torch.device) -> Iterator[None]:
    """The global torch (CPU and `device` if CUDA), Python and NumPy random states restored on exit."""
    devices = [device] if device.type == "cuda" else []
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextmanager
def eval_mode(module: nn.Module | None) -> Iterator[None]:
    """`module` in eval mode inside the block; every sub-module's own mode (e.g. frozen parts) restored after."""
    if module is None:
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _split_item(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, labels or None) of a collated batch of `(x, y, index)`, `(x, y)` or `x` items."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    return batch[0], torch.as_tensor(batch[1]) if len(batch) > 1 else None


class _Positions(Dataset):
    """Items of `dataset` tagged with their position (the key the distributed gather sorts by)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.dataset[i], i


def forward_dataset(
    fn: PassFn,
    dataset: Dataset,
    *,
    module: nn.Module | None = None,
    batch_size: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    num_workers: int = 0,
    desc: str | None = None,
    distributed: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-sample outputs of `fn` over `dataset`, in dataset order (module doc).

    Args:
        fn: batch of inputs -> a dict of per-sample tensors (or one tensor, returned as `outputs`).
        dataset: items `(x, y, index)`, `(x, y)` or `x`.
        module: the network `fn` runs; in eval mode for the pass (modes restored after); its first parameter gives
            the default device and dtype.
        batch_size: samples per forward call (per rank when `distributed`).
        device, dtype: where and in which floating dtype inputs go (default: the module's; else as loaded).
        num_workers: DataLoader workers.
        desc: progress-bar label.
        distributed: shard across DDP ranks and gather, every rank receiving the full result.
    """
    param = next(module.parameters(), None) if module is not None else None
    device = torch.device(device) if device is not None else param.device if param is not None else torch.device("cpu")
    if dtype is None and param is not None and param.is_floating_point():
        dtype = param.dtype
    world = dist.get_world_size() if distributed and dist.is_available() and dist.is_initialized() else 1
    positions = _Positions(dataset)
    if not len(positions):  # the rows' allocation needs a first batch: a clear line rather than an assertion
        raise DataNotFoundError(f"{desc or 'forward pass'}: the dataset has no items")
    source: Dataset = Subset(positions, range(dist.get_rank(), len(positions), world)) if world > 1 else positions
    collector: RankZeroRows | None = None
    with isolated_rng(device), eval_mode(module), torch.no_grad():
        loader = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        with loader_batches(loader) as batches:
            for items, pos in progress(batches, desc=desc or "forward pass"):
                x, y = _split_item(items)
                x = x.to(device, dtype) if dtype is not None and x.is_floating_point() else x.to(device)
                out = fn(x)
                fields = dict(out) if isinstance(out, Mapping) else {"outputs": out}
                if collector is None:  # the rows stay where `fn` returns them (a pass may keep them on the CPU)
                    collector = RankZeroRows(len(positions), next(iter(fields.values())).device, distributed=world > 1)
                if y is not None:
                    fields["labels"] = y.to(collector.device)
                collector.update(pos.to(collector.device), **fields)
    assert collector is not None, "every rank has at least one sample (len(dataset) >= world_size)"
    group = rank_zero_group() if world > 1 else None
    try:
        rows = collector.gather(group)
        if rows is not None:
            rows.pop("index")
        return rows if group is None else broadcast_rows(rows, collector.device, group)  # type: ignore[return-value]
    finally:
        release_group(group)
