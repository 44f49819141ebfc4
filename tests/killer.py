"""A callback that kills its own process (SIGKILL: no cleanup, like a machine dying) at a known point."""

from __future__ import annotations

import os
import signal
from typing import Any

from lightning import Callback, LightningModule, Trainer


class KillAt(Callback):
    """SIGKILL the process after training batch `batch` of epoch `epoch` (both 0-based), mid-epoch."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGKILL)
