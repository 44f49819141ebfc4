"""SIGTERM (a scheduler's time limit, `scancel`) noted at once, acted on at the run's next safe point.

Python's default answer to SIGTERM ends the process wherever it is: a run stopped while it builds its objects,
restores a checkpoint or goes from training to evaluation left no `FAILED.txt`, and Lightning's own handler is
there only while a stage runs (it registers it as `fit` / `test` start, composed with the handler already there,
and puts that one back after). Each process (the entry points, spawned DDP ranks) first installs a handler that
only records the signal (`sigterm_noted`); `stop_if_terminated` raises Lightning's `SIGTERMException` at the safe
points (between stages, before each step through `ood.runs.checkpoints.StopAtSigterm`, in the evaluation), so the
run ends as failed with its last complete checkpoint, whenever the signal came. A sweep's worker whose launcher died (SIGKILL) sends
itself that SIGTERM (`stop_when_orphaned`) rather than run on as an orphan.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, NoReturn

from hydra.experimental.callback import Callback as HydraCallback

#: the exit status of a process stopped by SIGTERM, as a shell reports one killed by it
SIGTERM_EXIT = 128 + signal.SIGTERM
_WATCH = "ood-parent-watch"  # the thread of `stop_when_orphaned`
_received = False  # this process was sent SIGTERM since the last run acted on it
_orphaned = False  # the launcher that started this process for its jobs is gone (`stop_when_orphaned`)


def note(signum: int, frame: FrameType | None) -> None:
    """The recording SIGTERM handler: notes the signal, nothing else. A second SIGTERM does not act at once either:
    ranks get one from the scheduler and one passed on by their launcher, and must still stop together. A run stuck
    before its next safe point (a rank that never joined) ends on SIGINT (Ctrl-C) or SIGKILL."""
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
    finally:  # None: a handler set outside Python, which cannot be put back; the default then
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def sigterm_received() -> bool:
    """Whether this process was sent SIGTERM (since the last `forget_sigterm`)."""
    return _received


def stop_if_terminated() -> None:
    """Raise `SIGTERMException` once this process was sent SIGTERM: call it where stopping leaves a clean state."""
    if _received:
        # Lightning imported only here: the entry points note SIGTERM from their start, before they import it
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        raise SIGTERMException


def exit_terminated() -> NoReturn:
    """Exit as a process stopped by SIGTERM does (status 143); at once when orphaned (`stop_when_orphaned`): no one
    is left to take the job's result or give another job, and the launcher's worker would wait idle for minutes."""
    if _orphaned:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(SIGTERM_EXIT)
    sys.exit(SIGTERM_EXIT)


def forget_sigterm() -> None:
    """Clear the record once a run has stopped for it (a later run in this process starts clean)."""
    global _received
    _received = False


def stop_when_orphaned(interval: float = 1.0) -> None:
    """In a process that a sweep's launcher started for its jobs (a joblib worker): once that parent is gone (the
    sweep SIGKILLed), send this process SIGTERM, so its job stops at its next safe point as a terminated run does
    instead of running on, an orphan holding its CPUs and GPU, and the process then exits (`exit_terminated`).
    Watches from a daemon thread, one per process. POSIX only: on Windows `os.getppid()` keeps the dead parent's id,
    so the watch never fires there."""
    if any(thread.name == _WATCH for thread in threading.enumerate()):
        return
    parent = os.getppid()

    def watch() -> None:
        global _orphaned
        while os.getppid() == parent:
            time.sleep(interval)
        _orphaned = True
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name=_WATCH, daemon=True).start()


class SweepSigterm(HydraCallback):
    """`hydra.callbacks` of every run: a sweep's own process (`-m`) ends on SIGTERM at once (143), as it did before
    entry points noted signals, instead of noting it and launching job after job (the parallel and SLURM launchers
    run no job in it, so no run would act on the note). Jobs note their own: in-process ones through `run`'s handler,
    the others in their processes. A SIGTERM noted while Hydra started ends the sweep before its first job."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        if _received:
            exit_terminated()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
