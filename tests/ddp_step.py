"""Harness for tests/test_ddp_training.py: the first optimisation steps of every method on one fixed global batch,
in one process and in two gloo DDP processes (each holding half the batch), from the same initial weights.

The two processes are spawned once and run every case one after the other (Lightning finds the process group
already initialised and uses it), so the start-up is paid once. Both sides run in float64 (`precision=64-true`),
so float summation order leaves ~1e-15 differences that Adam's first step cannot blow up (its update is about
lr * sign(g), which flips for gradients near zero in float32). Batch norm normalises with its running statistics
on both sides: `SyncBatchNorm` (on in `trainer=ddp`) only runs on GPUs, so on CPU per-rank batch statistics would
differ from the global ones by construction. Random draws in training must be the same on both sides: the
contrastive cases use `method.augment=none`; a new method with random training elements adds its override to
`CASES` (or draws per sample from `(seed, batch.index)`).
"""

from __future__ import annotations

import os
import time
import types
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import compose_config
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader

from ood import CONFIG_DIR
from ood.data.batch import Batch
from ood.evaluation.prepare import PrepareMethod
from ood.methods.base import OODMethod
from ood.utils import instantiate

#: extra overrides of a method config whose training draws random numbers, so both sides draw the same ones, or
#: whose fit start or step is slow (oal: a 1-epoch teacher, trained once and cached for both sides, and 200 boundary
#: candidates a point, not 1500, sampled on each side; heatmap: a 64-outlier pool, as one step per epoch takes the
#: whole pool, ~1000 digits outliers through the float64 decoder)
OVERRIDES: dict[str, list[str]] = {"oal": ["method.teacher.epochs=1", "method.n_candidates=200"],
                                   "heatmap": ["method.num_ood=64"]}
#: (case id, overrides): every method config (with its `OVERRIDES`), plus the contrastive objectives of `cluster`,
#: trained for one epoch per stage (contrastive step, then a probe step)
CASES: list[tuple[str, list[str]]] = [
    *((p.stem, [f"method={p.stem}", *OVERRIDES.get(p.stem, [])]) for p in sorted((CONFIG_DIR / "method").glob("*.yaml"))),
    *(
        (f"cluster_{objective}", ["method=cluster", f"method.objective={objective}", "method.probe_epochs=1",
                                  "method.augment=none"])
        for objective in ("supcon", "simclr")
    ),
    # heatmap's own CE phase (epoch 0), then its decoder (epoch 1): each phase leaves the other's parameters idle
    ("heatmap_ce_phase", ["method=heatmap", "method.classifier_epochs=1", "method.init.ckpt=null", *OVERRIDES["heatmap"]]),
]
GLOBAL_BATCH = 16
STEPS = 2  # epochs of one batch each: the first two optimisation steps


def _running_stats_forward(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Batch norm as in eval mode whatever `training` says (Lightning sets `training` on every module directly)."""
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def build(case: Sequence[str], ckpt: Path, out: Path) -> tuple[OODMethod, L.LightningDataModule]:
    """The method of `case` (seed 0, started from `ckpt` unless the case says otherwise) with batch norm kept in eval mode, and its DataModule."""
    # paths.root_dir: caches (oal's teacher) shared by every case and rank of this test, not the checkout's
    cfg = compose_config(out, [f"method.init.ckpt={ckpt}", *case, "logger=none", f"paths.root_dir={out.parent}"])
    L.seed_everything(0, verbose=False)
    datamodule = instantiate(cfg.data, seed=cfg.seed)
    benchmark = datamodule.benchmark
    backbone = instantiate(cfg.backbone, num_classes=benchmark.num_classes, in_channels=benchmark.in_channels)
    method = instantiate(cfg.method, backbone=backbone)
    datamodule.use_streams(method.streams, method.name)
    method.apply_init()
    for m in method.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.forward = types.MethodType(_running_stats_forward, m)
    return method, datamodule


def fixed_batch(datamodule: Any, n: int) -> Batch:
    """`n` seeded ID-train samples (no augmentation) and, for outlier methods, 2n outliers."""
    train = datamodule.benchmark.train(augment=False)
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n].tolist()
    x, y = zip(*(train[i] for i in rows), strict=True)
    x_out = None
    if "outliers" in datamodule.streams:
        outliers = datamodule.benchmark.outliers()
        x_out = torch.stack([outliers[i][0] for i in range(2 * n)])
    return Batch(torch.stack(x), torch.tensor(y), torch.tensor(rows), x_out)


def shard(batch: Batch, rank: int, world: int) -> Batch:
    """Rank `rank`'s contiguous share of `batch` (ID and outlier rows alike)."""
    take = lambda t: t.chunk(world)[rank]  # noqa: E731
    return Batch(take(batch.x), take(batch.y), take(batch.index), None if batch.x_out is None else take(batch.x_out))


class StepTimes(L.Callback):
    """Wall time of every training step after the first."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter())

    @property
    def per_step(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]


def fit(method: OODMethod, datamodule: Any, batches: Sequence[Batch], epochs: int = STEPS, precision: str = "64-true",
        **trainer: Any) -> list[float]:
    """`epochs` epochs over `batches`; returns the wall time of every step after the first."""
    datamodule.train_dataloader = lambda: DataLoader(list(batches), batch_size=None, collate_fn=lambda b: b)
    timer = StepTimes()
    L.Trainer(accelerator="cpu", precision=precision, max_epochs=epochs, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
              limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer, PrepareMethod()], **trainer).fit(method, datamodule=datamodule)
    return timer.per_step


def prepare(ckpt: Path, out: Path) -> None:
    """Write every case's initial weights and global batch, and its single-process result, under `out`: on one
    intra-op thread, as each rank runs (two threads a process on the 2 cores `make test`'s two workers share waited
    on each other: the float64 heatmap decoder's 2 steps took 2-6 s of CPU, 0.6 s on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, case in CASES:
            method, datamodule = build(case, ckpt, out / name)
            batch = fixed_batch(datamodule, GLOBAL_BATCH)
            torch.save({"state": method.state_dict(), "batch": batch}, out / f"{name}.init.pt")
            fit(method, datamodule, [batch], devices=1)
            torch.save({"state": method.state_dict()}, out / f"{name}.single.pt")
    finally:
        torch.set_num_threads(threads)


def ddp_strategy() -> DDPStrategy:
    return DDPStrategy(process_group_backend="gloo")


def worker(rank: int, world: int, port: int, ckpt: Path, out: Path) -> None:
    """One DDP rank: every case from the saved initial weights on its half of the batch; rank 0 saves the result
    (or the error, so one broken method does not hide the others)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    for name, case in CASES:
        try:
            method, datamodule = build(case, ckpt, out / f"{name}.rank{rank}")
            init = torch.load(out / f"{name}.init.pt", weights_only=False)
            method.load_state_dict(init["state"])
            fit(method, datamodule, [shard(init["batch"], rank, world)], devices=world, strategy=ddp_strategy())
            result: dict[str, Any] = {"state": method.state_dict()}
        except Exception as err:  # noqa: BLE001 - reported per case by the test
            result = {"error": f"{type(err).__name__}: {err}"}
        if rank == 0:
            torch.save(result, out / f"{name}.ddp.pt")
    dist.destroy_process_group()
