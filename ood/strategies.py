"""`DDPStrategy` whose spawned ranks hand their results back through a file (`trainer=ddp_cpu`, `start_method=spawn`).

Lightning's spawn launcher (`_MultiProcessingLauncher`) sends rank 0's results (the trainer state, `trainer.test`'s
returned metrics and `callback_metrics`) through a pipe, but reads the pipe only after every rank has exited. A payload
over the pipe buffer (64 KB on Linux; an evaluation's hundreds of `test/<detector>/<set>/<metric>` values) blocks rank
0 in `put` and the parent in `join`: the run hangs after writing its results. Here rank 0 saves the payload in a
temporary file, as Lightning already does for the weights, and the pipe carries only its path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy as _DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput


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
    def _collect_rank_zero_results(self, trainer: Any, results: Any) -> _WorkerOutput | None:
        output = super()._collect_rank_zero_results(trainer, results)
        if output is None:
            return None
        path = os.path.join(tempfile.mkdtemp(), "worker_output.pt")
        torch.save(output, path)
        return _SpilledOutput(path)  # type: ignore[return-value]


class DDPStrategy(_DDPStrategy):
    """Lightning's `DDPStrategy`; with a spawning start method, rank 0's results return through a file (module doc)."""

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _MultiProcessingLauncher):
            self._launcher = _SpillingLauncher(self, start_method=self._start_method)
