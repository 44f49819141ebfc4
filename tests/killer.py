"""A callback that signals its own process at a known point: SIGKILL (no cleanup, like a machine dying) by default,
or another signal (SIGTERM, as a scheduler sends before its time limit)."""

from __future__ import annotations

import os
import signal
from typing import Any

from lightning import Callback, LightningModule, Trainer


class KillAt(Callback):
    """Send `signum` (default SIGKILL) to the process after training batch `batch` of epoch `epoch` (both 0-based),
    mid-epoch."""

    def __init__(self, epoch: int, batch: int, signum: int = signal.SIGKILL) -> None:
        self.epoch, self.batch, self.signum = epoch, batch, signum

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), self.signum)


class KillAtTest(Callback):
    """Send `signum` (default SIGKILL) to the process after batch `batch` (0-based) of the first evaluation loader."""

    def __init__(self, batch: int, signum: int = signal.SIGKILL) -> None:
        self.batch, self.signum = batch, signum

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if (dataloader_idx, batch_idx) == (0, self.batch):
            os.kill(os.getpid(), self.signum)
