"""A callback that signals its own process at a known point: SIGKILL (no cleanup, like a machine dying) by default,
or another signal (SIGTERM, as a scheduler sends before its time limit). Under DDP ranks the main process starts
(`trainer=ddp_cpu`) it runs in every rank; `to` picks who is signalled: each rank itself, the main process that
started them (rank 0 sends it), both, or every process of rank 0's process group (rank 0 sends it: the main process,
the ranks and the fork server that forked them, as a scheduler signals every process of a job). `LogFromRanks` logs
from chosen DDP ranks."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import warnings
from typing import Any

from lightning import Callback, LightningModule, Trainer

from ood.utils import get_logger

TARGETS = ("self", "main", "all", "group")


class _Kill(Callback):
    def __init__(self, signum: int, to: str) -> None:
        if to not in TARGETS:
            raise ValueError(f"to={to!r}: one of {TARGETS}")
        self.signum, self.to = signum, to

    def _send(self, trainer: Trainer) -> None:
        if self.to == "group":
            if trainer.is_global_zero:
                os.killpg(os.getpgid(0), self.signum)
            return
        if self.to != "self" and trainer.is_global_zero:
            os.kill(multiprocessing.parent_process().pid, self.signum)  # the main process (not the fork server)
        if self.to != "main":
            os.kill(os.getpid(), self.signum)


class KillAt(_Kill):
    """Send `signum` (default SIGKILL) after training batch `batch` of epoch `epoch` (both 0-based), mid-epoch, to
    `to` (module doc)."""

    def __init__(self, epoch: int, batch: int, signum: int = signal.SIGKILL, to: str = "self") -> None:
        super().__init__(signum, to)
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            self._send(trainer)


class KillAtTest(_Kill):
    """Send `signum` (default SIGKILL) after batch `batch` (0-based) of the first evaluation loader, or with `batch=-1`
    after the last batch of the last one (so it reaches the evaluation after the pass), to `to` (module doc)."""

    def __init__(self, batch: int, signum: int = signal.SIGKILL, to: str = "self") -> None:
        super().__init__(signum, to)
        self.batch = batch

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        last = (len(trainer.num_test_batches) - 1, trainer.num_test_batches[-1] - 1)
        if (dataloader_idx, batch_idx) == ((0, self.batch) if self.batch >= 0 else last):
            self._send(trainer)


class KillAtHook(_Kill):
    """Send `signum` (default SIGKILL) to `to` (module doc) in the callback hook `hook` (e.g. `setup`, before
    Lightning registers its SIGTERM handler; `on_load_checkpoint`, as a resumed run restores; `on_fit_end`, between
    training and evaluation; `on_test_end`, after the evaluation wrote its results)."""

    def __init__(self, hook: str, signum: int = signal.SIGKILL, to: str = "self") -> None:
        super().__init__(signum, to)
        setattr(self, hook, self._at_hook)  # a bound method: pickled to spawned DDP ranks, unlike a lambda

    def _at_hook(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        self._send(trainer)


class LogFromRanks(Callback):
    """As training starts: an INFO line through `ood.utils.get_logger` (rank 0 only) and a warning from rank `rank`
    alone, through a plain logger and as a Python warning."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        get_logger("killer.zero").info("an INFO line of rank 0")
        if trainer.global_rank == self.rank:
            logging.getLogger("killer.rank").warning("a warning of rank %d only", self.rank)
            warnings.warn(f"a Python warning of rank {self.rank}", UserWarning, stacklevel=1)


class RaiseAsWorker(Callback):
    """Raise, at the start of training, the `BadImageError` a DataLoader worker's failure arrives as: the worker's
    whole traceback as its text (torch's `ExceptionWrapper.reraise`)."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from ood.data.hygiene import BadImageError

        raise BadImageError("Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                            "last):\n  File \"x.py\", line 1, in f\nood.data.hygiene.BadImageError: a.png: cannot read")
