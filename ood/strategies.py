"""`DDPStrategy`: every rank stops at the same step on SIGTERM, and spawned ranks hand their results back through a
file (`trainer=ddp_cpu`, `start_method=spawn`).

SIGTERM (a scheduler's time limit, `scancel`): Lightning's handler broadcasts a tensor from inside the signal handler
(`_SignalConnector._sigterm_notifier_fn`), wherever the rank happens to be, and its loops broadcast rank 0's flag at
each training step only. A rank signalled alone or at another point than the others (SIGTERM reaches the processes
of a job one by one) issues a collective the others do not: the ranks wait on each other for ever. Here the handler
only notes the signal (rank 0 of the subprocess launcher also passes it on to the ranks it started); before each
training, validation and test step the ranks sum their flags, so all of them raise Lightning's `SIGTERMException` at
the same step. A spawned rank then exits with status 143 (128 + SIGTERM); the main process, which passes its own
SIGTERM on to the ranks, raises `SIGTERMException` once they have exited, and starts no further stage (`ood.train`
records the failure and exits 143).

Results: Lightning's spawn launcher (`_MultiProcessingLauncher`) sends rank 0's results (the trainer state,
`trainer.test`'s returned metrics and `callback_metrics`) through a pipe, but reads the pipe only after every rank has
exited. A payload over the pipe buffer (64 KB on Linux; an evaluation's hundreds of `test/<detector>/<set>/<metric>`
values) blocks rank 0 in `put` and the parent in `join`: the run hangs after writing its results. Here rank 0 saves
the payload in a temporary file, as Lightning already does for the weights, and the pipe carries only its path.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy as _DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.multiprocessing import ProcessExitedException

#: the exit status of a rank stopped by SIGTERM, as a shell reports a process killed by it
SIGTERM_EXIT = 128 + signal.SIGTERM


def _on_sigterm(handler: Callable[[int, FrameType | None], None]) -> Any:
    """Install `handler` for SIGTERM (only the main thread may); returns the previous handler, None when not set."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


class _SpilledOutput:
    """A `_WorkerOutput` kept on disk: pickles as its path, loads (and deletes the file) on first attribute access."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "path" not in self.__dict__:
            raise AttributeError(name)
        if "output" not in self.__dict__:
            self.output = torch.load(self.path, weights_only=False)
            shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)
        return getattr(self.output, name)


class _SpillingLauncher(_MultiProcessingLauncher):
    """The spawn launcher with results through a file and SIGTERM passed on to the ranks (module doc)."""

    terminated = False  # the main process received SIGTERM during a launch

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        if self.terminated:  # SIGTERM came during an earlier stage that still finished: start no other
            raise SIGTERMException
        previous = _on_sigterm(self._pass_on)
        try:
            return super().launch(function, *args, trainer=trainer, **kwargs)
        except ProcessExitedException as err:  # a rank stopped by SIGTERM (or killed by it before handling it)
            if err.exit_code in (SIGTERM_EXIT, -signal.SIGTERM):
                raise SIGTERMException from err
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _pass_on(self, signum: int, frame: FrameType | None) -> None:
        """The main process's SIGTERM: the ranks stop at their next step."""
        self.terminated = True
        self.kill(signum)

    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        try:
            super()._wrapping_function(*args, **kwargs)
        except SIGTERMException:  # a SystemExit of status 0, which the main process would take for a success
            sys.exit(SIGTERM_EXIT)

    def _collect_rank_zero_results(self, trainer: Any, results: Any) -> _WorkerOutput | None:
        output = super()._collect_rank_zero_results(trainer, results)
        if output is None:
            return None
        path = os.path.join(tempfile.mkdtemp(), "worker_output.pt")
        torch.save(output, path)
        return _SpilledOutput(path)  # type: ignore[return-value]


class DDPStrategy(_DDPStrategy):
    """Lightning's `DDPStrategy` whose ranks stop together on SIGTERM; with a spawning start method, rank 0's results
    return through a file (module doc)."""

    received_sigterm = False  # this rank was sent SIGTERM

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _MultiProcessingLauncher):
            self._launcher = _SpillingLauncher(self, start_method=self._start_method)

    def _note_sigterm(self, signum: int, frame: FrameType | None) -> None:
        """Replaces Lightning's SIGTERM handler, which runs a collective inside the handler (module doc)."""
        if not self.received_sigterm and self.launcher is not None:
            self.launcher.kill(signum)  # the subprocess launcher's rank 0: the ranks it started (none when spawned)
        self.received_sigterm = True

    def _stop_if_terminated(self) -> None:
        """Raise `SIGTERMException` on every rank once any rank has received SIGTERM: a collective, called by all
        ranks before the same step."""
        flags = self.reduce(torch.tensor(float(self.received_sigterm), device=self.root_device), reduce_op="sum")
        if flags.item() > 0:
            raise SIGTERMException

    # Lightning installs its handler as a stage starts (`Trainer._run`), just before these hooks
    def on_train_start(self) -> None:
        super().on_train_start()
        _on_sigterm(self._note_sigterm)

    def on_validation_start(self) -> None:
        super().on_validation_start()
        _on_sigterm(self._note_sigterm)

    def on_test_start(self) -> None:
        super().on_test_start()
        _on_sigterm(self._note_sigterm)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._stop_if_terminated()

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        self._stop_if_terminated()
        return super().validation_step(*args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        self._stop_if_terminated()
        return super().test_step(*args, **kwargs)
