"""SIGTERM (a scheduler's time limit, `scancel`) noted at once, acted on at the run's next safe point.

Python's default answer to SIGTERM ends the process wherever it is: a run stopped while it builds its objects,
restores a checkpoint or goes from training to evaluation left no `FAILED.txt`, and Lightning's own handler is
there only while a stage runs (it registers it as `fit` / `test` start, composed with the handler already there,
and puts that one back after). Each process (the entry points, spawned DDP ranks) first installs a handler that
only records the signal (`sigterm_noted`); `stop_if_terminated` raises Lightning's `SIGTERMException` at the safe
points (between stages, before each step through `StopAtSigterm`, in the evaluation), so the run ends as failed
with its last complete checkpoint, whenever the signal came.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from lightning import Callback, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException

_received = False  # this process was sent SIGTERM since the last run acted on it


def note(signum: int, frame: FrameType | None) -> None:
    """The recording SIGTERM handler: notes the signal, nothing else."""
    global _received
    _received = True


@contextmanager
def sigterm_noted() -> Iterator[None]:
    """SIGTERM only noted inside (the handler before it back after; only the main thread may set a handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def sigterm_received() -> bool:
    """Whether this process was sent SIGTERM (since the last `forget_sigterm`)."""
    return _received


def stop_if_terminated() -> None:
    """Raise `SIGTERMException` once this process was sent SIGTERM: call it where stopping leaves a clean state."""
    if _received:
        raise SIGTERMException


def forget_sigterm() -> None:
    """Clear the record once a run has stopped for it (a later run in this process starts clean)."""
    global _received
    _received = False


class StopAtSigterm(Callback):
    """`stop_if_terminated` before each training, validation and test step of a single-process run: also a signal
    that came before Lightning registered its handler (setup, checkpoint restore), which Lightning's flag misses.
    Several ranks stop together through ood's `DDPStrategy` instead (one rank alone would leave the others waiting)."""

    def _check(self, trainer: Trainer) -> None:
        if trainer.world_size == 1:
            stop_if_terminated()

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        self._check(trainer)

    def on_validation_batch_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        self._check(trainer)

    def on_test_batch_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        self._check(trainer)
