"""What a run prints: the training bar, one bar for the evaluation pass, the evaluation's own bars, the table.

- `ProgressBar`: Lightning's rich progress bar with one "evaluation pass" bar over every split (Lightning's own
  starts a bar per split) that is closed when the pass ends, before the evaluation prints its bars and table.
- `quiet_lightning`: Lightning's start-up chatter (accelerator lines, "Seed set to", its litlogger "Tip" advert)
  and the `LeafSpec` deprecation warning that Lightning's pytree helper triggers on recent torch stay off the
  console; Lightning's warnings (`WARNING` and up) still show.
- `logs_above_bars`: log lines are written above the running tqdm bars instead of through them.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar

#: Lightning's loggers whose INFO records are start-up chatter
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


class ProgressBar(RichProgressBar):
    """Rich progress bars: the training epochs as Lightning draws them, and one bar for the whole evaluation pass."""

    @property
    def test_description(self) -> str:
        return "evaluation pass"

    def on_test_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.is_disabled or self.test_progress_bar_id is not None:
            return
        self.test_progress_bar_id = self._add_task(sum(trainer.num_test_batches), self.test_description)
        self.refresh()

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.is_disabled or self.test_progress_bar_id is None or self.progress is None:
            return
        self.progress.update(self.test_progress_bar_id, advance=1)
        self.refresh()

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The pass is over: stop the live display before the evaluation callback prints."""
        self._stop_progress()


def quiet_lightning() -> None:
    """Lightning's INFO chatter and its `LeafSpec` deprecation warning off the console (call after importing it)."""
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    quiet_warnings()


def quiet_warnings() -> None:
    """Lightning warnings that do not apply to ood ignored: the `LeafSpec` deprecation its pytree helper triggers on
    recent torch (nothing the user can act on), and, under DDP, its advice to test on one device because the
    distributed sampler repeats samples (ood's evaluation keeps each dataset index once: DDP-exact). For the process
    (the entry points) or inside a caller's `warnings.catch_warnings()` (`ood.evaluate`, which leaves the caller's
    filters as they were)."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"Using `DistributedSampler` with the dataloaders\. During `trainer\.test\(\)`")


@contextlib.contextmanager
def logs_above_bars() -> Iterator[None]:
    """Route the console log handlers through `tqdm.write`, so a log line never lands in the middle of a bar."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield
