"""`DDPStrategy`: every rank stops at the same step on SIGTERM; ranks the main process starts (`trainer=ddp_cpu`:
`start_method=forkserver`; or `spawn`) stop on a SIGINT sent to the main process alone, log where the main process
logs, hand their results back through a file and, from a fork server, start without importing torch, Lightning and
ood again. "Spawned" below means either.

Fork server: a spawned rank is a fresh interpreter that imports torch, Lightning and ood before it runs (about 5 s on
a CPU; paid per rank at every stage: the fit, the evaluation, each run of a sweep). Python's fork server imports them
once (`FORKSERVER_PRELOAD`) and forks each rank from itself. What a spawned rank got from the main process and a
forked one would not is handed over as the rank starts (`_ParentState`: the environment, stdout / stderr, Lightning's
RNG / deterministic-flag snapshot); tensors are pickled by value (`_tensors_by_value`: the server passes at most 256
file descriptors with a process, and torch shares each storage as one); the server ignores SIGTERM (`ood.forkserver`:
killed with a job's processes it would leave the main process reading status 255 for ranks still stopping). A forked
rank runs the main script again, as a spawned one does; one without `if __name__ == "__main__":` now gets Lightning's
message saying to add it (Lightning checks for spawn only: the rank died in Python's bootstrapping `RuntimeError`).

SIGTERM (a scheduler's time limit, `scancel`): Lightning's handler broadcasts a tensor from inside the signal handler
(`_SignalConnector._sigterm_notifier_fn`), wherever the rank happens to be, and its loops broadcast rank 0's flag at
each training step only. A rank signalled alone or at another point than the others (SIGTERM reaches the processes
of a job one by one) issues a collective the others do not: the ranks wait on each other for ever. Here the handler
only notes the signal (`ood.termination`; rank 0 of the subprocess launcher also passes it on to the ranks it
started), as does the one a spawned rank installs first thing, before Lightning's exists (setup, checkpoint restore:
the rank died there); before each training, validation and test step the ranks sum their flags, so all of them raise
Lightning's `SIGTERMException` at the same step. A spawned rank then exits with status 143 (128 + SIGTERM); the main
process, which passes its own SIGTERM on to the ranks (once they are all started, when it came as they started),
raises `SIGTERMException` once they have exited, and starts no further stage (`ood.train` records the failure and
exits 143).

SIGINT to the main process only (`kill -INT <pid>`, a notebook's "interrupt kernel", a scheduler that signals the job's
main process): Ctrl-C on a terminal signals every process of the foreground group, the ranks too, and each stops
with a `KeyboardInterrupt`; signalled alone, the main process stopped waiting for its ranks, which ran their whole stage
on (a fit to its last epoch) while the main process waited for them in its exit. The main process now passes SIGINT
on to its ranks, says so, waits for them (`RANK_STOP_TIMEOUT`, then SIGKILL for any still running: one blocked in a
collective) and raises the `KeyboardInterrupt` as for Ctrl-C. A rank takes the first SIGINT as `KeyboardInterrupt`
and ignores any later one (on a terminal it gets one from the terminal and the one passed on): a second interruption
would cut its way out (below) short. A main process started with SIGINT ignored (`cmd &` in a script) is left so.
A SIGINT while the ranks are being started (the fork server's first start imports torch, Lightning and ood: 5 s) is
held until the launcher has them all (as SIGTERM is): raised there, it left the ranks already started running, their
processes not yet handed to the launcher (nor, for the one the fork server was forking, to this process at all).

Exit: a spawned rank never destroyed its gloo process group (Lightning destroys only NCCL ones, at exit; the DDP
wrapper holds the group, and a rank stopped by SIGTERM or an error never reaches Lightning's teardown), so gloo's
C++ threads (its workers and TCP loop; on rank 0 also the TCPStore server) still ran while the interpreter finalized
and C++ destroyed what was left. On a loaded machine a rank stopped by SIGTERM once aborted there ("terminate called
without an active exception": SIGABRT, which the main process takes for a crash, not a stop). Every way out of a
spawned rank (stopped, failed, done) now unwraps the model and destroys the group, without a collective (the other
ranks may have exited), so those threads have ended before the interpreter's exit begins.

Counters: Lightning's spawn launcher hands rank 0's weights, trainer state and metrics back to the main process, not
its loops' epoch and step counters: after a fit the main process's trainer was at epoch 0, step 0, and so was the
evaluation's rank started from it, which logged the `test/*` metrics there (CSV log, wandb's `trainer/global_step`)
where one process logs them at the fit's end. Rank 0's fit loop state now comes back with the results.

Stop line: a run stopped by SIGTERM printed torch's "Terminating process N via signal SIGTERM" besides its own line
(the first rank to exit 143 makes torch terminate the others, which had the SIGTERM already): left out then.

Failure hooks: Lightning runs the callbacks' `on_exception` (and finalizes the loggers as failed) in the process that
called the stage: under a spawning launcher the main process, whose callbacks hold nothing of the ranks' stage. A rank
stopped by SIGTERM or an error in its evaluation left its `evaluation.bank_dir` folder behind (`OODEvaluation` removes
it in `on_exception`) until the next evaluation with that `bank_dir`. Each spawned rank now runs them on its way out.

Logs: a spawned rank is a fresh interpreter without the handlers Hydra gave the main process's root logger, so its
warnings and errors reached the console (Python's last-resort handler) but not the run's `train.log`. Each spawned
rank now recreates the main process's root handlers that write to a file or to stdout / stderr, same level and
format, and the `ood` logger's (the console `ood.evaluate` adds: without it a rank's INFO lines were lost and its
warnings printed by Python's last-resort handler); the records of a rank other than 0 start with `[rank N]`. (`ood.utils.get_logger` loggers stay quiet off
rank 0, so rank 0's lines are not repeated.) It also takes the main process's logger levels and warning filters, in
their order (`_Quiet`): without them each rank printed Lightning's start-up chatter and its `LeafSpec` warning, which the
main process keeps off the console. A rank that runs the command line itself (Lightning's subprocess
launcher, `trainer=ddp`: Hydra logs it to `train_ddp_process_N.log` in the run's folder; torchrun, srun) keeps its
own Hydra handlers, its lines marked `[rank N]` as well.

Results: Lightning's spawn launcher (`_MultiProcessingLauncher`) sends rank 0's results (the trainer state,
`trainer.test`'s returned metrics and `callback_metrics`) through a pipe, but reads the pipe only after every rank has
exited. A payload over the pipe buffer (64 KB on Linux; an evaluation's hundreds of `test/<detector>/<set>/<metric>`
values) blocks rank 0 in `put` and the parent in `join`: the run hangs after writing its results. Here rank 0 saves
the payload in a temporary file, as Lightning already does for the weights, and the pipe carries only its path.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from multiprocessing import reduction
from types import FrameType
from typing import Any, NoReturn

import torch
from lightning.pytorch.loops.loop import _Loop
from lightning.pytorch.strategies import DDPStrategy as _DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import (
    _check_missing_main_guard,
    _GlobalStateSnapshot,
    _MultiProcessingLauncher,
    _WorkerOutput,
)
from lightning.pytorch.trainer.call import _interrupt
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.multiprocessing import ProcessExitedException
from torch.nn.parallel import DistributedDataParallel

from ood.termination import SIGTERM_EXIT, note, sigterm_noted, sigterm_received
from ood.utils import warnings_in_log_files

#: seconds the main process waits for its ranks to stop after passing SIGINT on, before it kills them (module doc)
RANK_STOP_TIMEOUT = 30.0


def _on_sigterm(handler: Callable[[int, FrameType | None], None]) -> Any:
    """Install `handler` for SIGTERM (only the main thread may); returns the previous handler, None when not set."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


class _StoppedBySigterm(logging.Filter):
    """Drops torch's "Terminating process N via signal SIGTERM" while a SIGTERM stops the run: the first rank to exit
    143 makes `ProcessContext.join` terminate the others, which had the SIGTERM too (the run prints its one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (sigterm_received() and str(record.msg).startswith("Terminating process"))


@contextmanager
def _quiet_torch_terminations() -> Iterator[None]:
    """`_StoppedBySigterm` on torch's spawn logger for the launch."""
    spawn_log, only = logging.getLogger("torch.multiprocessing.spawn"), _StoppedBySigterm()
    spawn_log.addFilter(only)
    try:
        yield
    finally:
        spawn_log.removeFilter(only)


def _interrupt_once(signum: int, frame: FrameType | None) -> NoReturn:
    """A rank's SIGINT handler: `KeyboardInterrupt`, later SIGINTs ignored (module doc)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


class _HeldInterrupt:
    """The main process's SIGINT handler while its ranks start: notes the signal, for the launcher to act on once it
    has them all (module doc)."""

    def __init__(self) -> None:
        self.received = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received = True


@contextmanager
def _sigint_once() -> Iterator[None]:
    """`_interrupt_once` inside, in place of Python's own SIGINT handler (an ignored SIGINT stays ignored)."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    signal.signal(signal.SIGINT, _interrupt_once)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@dataclass(frozen=True)
class _LogTarget:
    """Where one of the main process's log handlers writes (a file `path`, or the `stream` "stdout" / "stderr"), on
    which logger (`logger`: "" the root), from which level and in which format: what a spawned rank needs to
    recreate it."""

    logger: str
    path: str | None
    stream: str | None
    level: int
    formatter: logging.Formatter | None


#: the loggers whose handlers a spawned rank recreates: the root's (Hydra's `train.log` and console) and `ood`'s
#: (the console `ood.evaluate` adds when its caller set up no logging: `ood.api._console_logs`)
LOG_TARGET_LOGGERS = ("", "ood")


def _log_targets() -> list[_LogTarget]:
    """The handlers of `LOG_TARGET_LOGGERS` that write to a file or to stdout / stderr."""
    targets = []
    for name in LOG_TARGET_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.FileHandler):
                targets.append(_LogTarget(name, handler.baseFilename, None, handler.level, handler.formatter))
            elif isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr):
                stream = "stdout" if handler.stream is sys.stdout else "stderr"
                targets.append(_LogTarget(name, None, stream, handler.level, handler.formatter))
    return targets


class _RankFormatter(logging.Formatter):
    """`inner`'s line after `[rank N] `: a record of a rank other than 0."""

    def __init__(self, inner: logging.Formatter | None, rank: int) -> None:
        super().__init__()
        self.inner, self.rank = inner or logging.Formatter(), rank

    def format(self, record: logging.LogRecord) -> str:
        return f"[rank {self.rank}] {self.inner.format(record)}"


def _log_to(targets: list[_LogTarget], level: int, rank: int) -> None:
    """Give this process's root logger `level` and a handler per target on its logger (files appended to), prefixed
    off rank 0."""
    logging.getLogger().setLevel(level)
    for target in targets:
        if target.path:
            handler: logging.Handler = logging.FileHandler(target.path)
        else:
            handler = logging.StreamHandler(sys.stdout if target.stream == "stdout" else sys.stderr)
        handler.setLevel(target.level)
        handler.setFormatter(target.formatter if rank == 0 else _RankFormatter(target.formatter, rank))
        logging.getLogger(target.logger).addHandler(handler)


#: a warning filter as `warnings.filters` holds it: action, message and module patterns, category, line
_Filter = tuple[str, Any, type, Any, int]


@dataclass
class _Quiet:
    """What keeps the main process's console quiet (`ood.runs.console.quiet_lightning`: Lightning's loggers at
    WARNING, its `LeafSpec` deprecation ignored), for a spawned rank, which starts without it: the levels of the
    loggers that set one and the warning filters in their order (those of categories a rank can import)."""

    levels: dict[str, int]
    filters: list[_Filter]


def _quiet_settings() -> _Quiet:
    """This process's logger levels and warning filters (`_Quiet`)."""
    levels = {name: logger.level for name, logger in logging.root.manager.loggerDict.items()
              if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET}
    filters = [f for f in warnings.filters if f[2].__module__ != "__main__"]
    return _Quiet(levels, filters)


def _quiet_like(quiet: _Quiet) -> None:
    """Give this process the main process's logger levels and warning filters (`_quiet_settings`), the filters in the
    main process's order (its `ignore` ones alone, put in front, reordered them: Python's `ignore::DeprecationWarning`
    went before `default::DeprecationWarning:__main__`, which then never applied); this process's own filters that
    the main process lacks (the fork server's) go first."""
    for name, level in quiet.levels.items():
        logging.getLogger(name).setLevel(level)
    own = [f for f in warnings.filters if f not in quiet.filters]
    # as they are (Python's own hold a module name, not a pattern, which `filterwarnings` would compile); the reset
    # tells the `warnings` machinery that the filters changed, and nothing warns before they are all in
    warnings.resetwarnings()
    warnings.filters.extend([*own, *quiet.filters])


def _mark_rank(rank: int) -> None:
    """Start the lines of this process's root handlers with `[rank N]` (once)."""
    for handler in logging.getLogger().handlers:
        if not isinstance(handler.formatter, _RankFormatter):
            handler.setFormatter(_RankFormatter(handler.formatter, rank))


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


def _interrupt_rank(trainer: Any, err: BaseException) -> None:
    """What Lightning runs when a stage fails or is stopped (`_interrupt`: the callbacks' and the datamodule's
    `on_exception`, the loggers finalized as failed), run in the rank: Lightning runs it in the process that called the
    stage, under a spawning launcher the main process, whose callbacks hold none of the rank's state (module doc). A
    failure here is logged, not raised: it would replace the exception the rank is leaving with."""
    if trainer is None:
        return
    try:
        _interrupt(trainer, err)
    except Exception as hook_err:
        logging.getLogger(__name__).warning("a failure hook raised as the rank stopped: %r", hook_err)


def _end_process_group(strategy: Any) -> None:
    """Destroy this rank's process group, and with it gloo's threads, while the interpreter is whole (module doc).
    No collective: the other ranks may have exited already. DDP's reducer holds the group, so the model is unwrapped
    first, as Lightning's `teardown` does (which a rank stopped by an exception never reaches). A failure here is
    logged, not raised: it would replace the exception or exit status the rank is leaving with."""
    try:
        if isinstance(strategy.model, DistributedDataParallel):
            wrapper = weakref.ref(strategy.model)
            strategy.model = strategy.lightning_module
            if wrapper() is not None:  # in a reference cycle: collected now rather than as the interpreter exits
                gc.collect()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except Exception as err:
        logging.getLogger(__name__).warning("could not destroy the process group before exiting: %r", err)


#: what the fork server imports once, so that the ranks it forks start with them done (torch, Lightning, ood: 5 s of
#: every spawned rank's start on a CPU); `ood.forkserver` first (its SIGTERM handling); `ood.train` imports the rest
#: only as a job starts (its `RUN_MODULES`, named here: this layer does not import `ood.train`)
FORKSERVER_PRELOAD = ["ood.forkserver", "ood.train", "lightning", "ood.evaluation.callback", "ood.evaluation.prepare",
                      "ood.runs.checkpoints", "ood.runs.console", "ood.runs.loggers", "ood.runs.sweeps"]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class _ParentState:
    """Pickles, as a rank is started, into what a spawned rank gets from the main process and one forked by the fork
    server (`start_method=forkserver`) would not: the environment (the server's is that of its own start) with the
    thread count it sets, stdout and stderr (the server's are those of the process that started it: not a later redirect), and
    Lightning's spawn snapshot (RNG states, deterministic flags)."""

    def __init__(self, state: tuple | None = None) -> None:
        self.state = state

    def __reduce__(self) -> tuple:
        if multiprocessing.context.get_spawning_popen() is None:  # not a process start (a deep copy of the trainer)
            return _ParentState, ()
        # sent with the process (SCM_RIGHTS); a closed one (`script >&-`) is left as the server's
        stdio = [reduction.DupFd(fd) if _is_open(fd) else None for fd in (1, 2)]
        return _ParentState, ((dict(os.environ), stdio, _GlobalStateSnapshot.capture()),)

    def restore(self) -> None:
        environ, stdio, snapshot = self.state
        os.environ.clear()
        os.environ.update(environ)
        if "OMP_NUM_THREADS" in environ:  # a spawned rank's torch reads it as it loads (else: Lightning sets one)
            torch.set_num_threads(int(environ["OMP_NUM_THREADS"]))
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        for target, fd in zip((1, 2), stdio, strict=True):
            if fd is None:
                continue
            received = fd.detach()
            os.dup2(received, target)
            os.close(received)
        snapshot.restore()


@contextmanager
def _tensors_by_value() -> Iterator[None]:
    """Tensors pickle by value while the fork server starts ranks: torch's multiprocessing pickles each storage as a
    shared-memory file descriptor, and the fork server passes at most 256 of them with a process (a model and its
    fitted detectors have more). By value, each rank has its own copy, as a spawned CPU rank makes for itself
    (Lightning's `_disable_module_memory_sharing`: ranks sharing parameters would step each other's weights)."""
    reducers = reduction.ForkingPickler._extra_reducers
    storages = (*torch._storage_classes, torch.storage.TypedStorage)
    taken = {cls: reducers.pop(cls) for cls in list(reducers) if issubclass(cls, torch.Tensor) or cls in storages}
    try:
        yield
    finally:
        reducers.update(taken)


def _finished(loop: _Loop) -> None:
    """`loop` and the loops inside it as a finished fit leaves them in one process: loading their state marked them
    restarting and resuming from a checkpoint (a later fit of the trainer would resume mid-epoch), and the fit loop
    keeps `restarting` True when it is set False under `max_steps`. Each loop ends an iteration so."""
    loop.on_iteration_done()
    for child in vars(loop).values():
        if isinstance(child, _Loop):
            _finished(child)


#: `get_extra_results`' key for rank 0's fit loop state (its epoch and step counters)
_FIT_LOOP = "ood_fit_loop"


class _SpawnLauncher(_MultiProcessingLauncher):
    """The spawn launcher with SIGTERM and SIGINT passed on to the ranks, the main process's log handlers in every rank and
    results through a file (module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the main process's root and `ood` handlers and the root level as the last launch began (pickled with the
        # launcher to the ranks)
        self.log_targets: list[_LogTarget] = []
        self.log_level = logging.WARNING
        self.quiet = _Quiet({}, [])
        self.parent: _ParentState | None = None
        self._held: _HeldInterrupt | None = None  # SIGINT's handler while the ranks start (module doc)

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        if sigterm_received():  # SIGTERM came during an earlier stage that still finished: start no other
            raise SIGTERMException
        self.log_targets, self.log_level = _log_targets(), logging.getLogger().level
        self.quiet = _quiet_settings()
        if self._start_method == "forkserver":  # the first launch starts the server with these imports done
            _check_missing_main_guard()  # a rank re-running a script without `if __name__ == "__main__":` says so
            multiprocessing.set_forkserver_preload(FORKSERVER_PRELOAD)
            self.parent = _ParentState()  # filled as each rank is started
        # SIGINT held from here (module doc): nothing in between raises a KeyboardInterrupt outside the `try`
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._held = _HeldInterrupt()
            signal.signal(signal.SIGINT, self._held)
        previous = _on_sigterm(self._pass_on)
        try:
            with _tensors_by_value() if self.parent is not None else nullcontext(), _quiet_torch_terminations():
                return super().launch(function, *args, trainer=trainer, **kwargs)
        except ProcessExitedException as err:  # a rank stopped by SIGTERM (or killed by it before handling it)
            if err.exit_code in (SIGTERM_EXIT, -signal.SIGTERM):
                raise SIGTERMException from err
            raise
        except KeyboardInterrupt:  # SIGINT, maybe to this process only (module doc)
            self._interrupt_ranks()
            raise
        finally:
            self._release_sigint()  # the ranks' start failed
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _release_sigint(self) -> bool:
        """Python's SIGINT handler back in place of `_HeldInterrupt`; whether a SIGINT came while it was held."""
        held, self._held = self._held, None
        if held is None:
            return False
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return held.received

    def _interrupt_ranks(self) -> None:
        """SIGINT passed on to the ranks still running, which are waited for (`RANK_STOP_TIMEOUT`, then killed)."""
        ranks = [proc for proc in self.procs if proc.is_alive()]
        if not ranks:
            return
        log = logging.getLogger(__name__)
        log.warning("interrupted: SIGINT passed on to the %d DDP ranks, waiting for them to stop", len(ranks))
        self.kill(signal.SIGINT)
        deadline = time.monotonic() + RANK_STOP_TIMEOUT
        for proc in ranks:
            proc.join(max(0.0, deadline - time.monotonic()))
        stuck = [proc for proc in ranks if proc.is_alive()]
        if stuck:
            log.warning("DDP rank(s) %s still running %g s after SIGINT: killed", [p.pid for p in stuck],
                        RANK_STOP_TIMEOUT)
            self.kill(signal.SIGKILL)
            for proc in stuck:
                proc.join()

    def _pass_on(self, signum: int, frame: FrameType | None) -> None:
        """The main process's SIGTERM: the ranks stop at their next step."""
        note(signum, frame)
        self.kill(signum)

    @property
    def procs(self) -> list:
        """The ranks of the running launch (Lightning sets them once all are started)."""
        return self._procs

    @procs.setter
    def procs(self, procs: list) -> None:
        self._procs = procs
        if procs and sigterm_received():  # came while the ranks were starting, when there was none to pass it to
            self.kill(signal.SIGTERM)
        if procs and self._release_sigint():  # as well: `launch` passes it on
            raise KeyboardInterrupt

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_procs": [], "_held": None}  # as Lightning's: processes do not pickle

    def _wrapping_function(self, process_idx: int, *args: Any, **kwargs: Any) -> None:
        # the rank's first code: SIGTERM before Lightning's handler (setup, checkpoint restore) is noted, not fatal;
        # SIGINT interrupts once (module doc); a rank forked from the main process (`start_method=fork`) has its
        # `_HeldInterrupt` as handler, which would hold the rank's SIGINT for ever
        if isinstance(signal.getsignal(signal.SIGINT), _HeldInterrupt):
            signal.signal(signal.SIGINT, signal.default_int_handler)
        with sigterm_noted(), _sigint_once():
            if self.parent is not None:  # forked by the server: made what a spawned rank is (`_ParentState`)
                self.parent.restore()
            _log_to(self.log_targets, self.log_level, self._strategy.node_rank * self._strategy.num_processes + process_idx)
            _quiet_like(self.quiet)
            try:
                try:
                    with warnings_in_log_files():
                        super()._wrapping_function(process_idx, *args, **kwargs)
                except BaseException as err:
                    _interrupt_rank(args[0] if args else kwargs.get("trainer"), err)
                    raise
            except SIGTERMException:  # a SystemExit of status 0, which the main process would take for a success
                sys.exit(SIGTERM_EXIT)
            finally:  # every way out: stopped, failed or done (module doc)
                _end_process_group(self._strategy)

    def get_extra_results(self, trainer: Any) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        if trainer.state.fn == TrainerFn.FITTING:  # the fit's epoch and step counters (module doc)
            extra[_FIT_LOOP] = trainer.fit_loop.state_dict()
        return extra

    def update_main_process_results(self, trainer: Any, extra: dict[str, Any]) -> None:
        fit_loop = extra.pop(_FIT_LOOP, None)
        super().update_main_process_results(trainer, extra)
        if fit_loop is not None:
            trainer.fit_loop.load_state_dict(fit_loop)
            _finished(trainer.fit_loop)

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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gloo_flags: Any = None  # `_flag_group`'s, made in the rank

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _MultiProcessingLauncher):
            self._launcher = _SpawnLauncher(self, start_method=self._start_method)

    def setup_environment(self) -> None:
        super().setup_environment()
        if self.global_rank > 0:  # also a rank that runs the command line itself (subprocess launcher, torchrun, srun)
            _mark_rank(self.global_rank)

    def _note_sigterm(self, signum: int, frame: FrameType | None) -> None:
        """Replaces Lightning's SIGTERM handler, which runs a collective inside the handler (module doc)."""
        if not sigterm_received() and self.launcher is not None:
            self.launcher.kill(signum)  # the subprocess launcher's rank 0: the ranks it started (none when spawned)
        note(signum, frame)

    def _stop_if_terminated(self) -> None:
        """Raise `SIGTERMException` on every rank once any rank has received SIGTERM (`ood.termination`'s record, also
        of a signal before this stage began): a collective, called by all ranks before the same step. The flag is a
        CPU tensor summed over gloo (a group of its own when the ranks talk NCCL): over NCCL, reading the sum back
        (`.item()`) made the host wait for every step queued on the GPU, at each training and evaluation step."""
        flag = torch.tensor(float(sigterm_received()))
        torch.distributed.all_reduce(flag, group=self._flag_group())  # a sum, without the barrier of Lightning's `reduce`
        if flag.item() > 0:
            raise SIGTERMException

    def _flag_group(self) -> Any:
        """The process group for `_stop_if_terminated`'s CPU flag: the default one if it is gloo, else a gloo group of
        every rank, made at the first check (which every rank reaches at the same step: creating it is collective)."""
        if torch.distributed.get_backend() == "gloo":
            return None
        if self._gloo_flags is None:
            self._gloo_flags = torch.distributed.new_group(backend="gloo")
        return self._gloo_flags

    # Lightning installs its handler as a stage starts (`Trainer._run`), just before its "run-stage" barrier: ours goes
    # in there, before data loaders and callbacks' `on_*_start` run; the stage hooks put it back should that change
    def barrier(self, name: str | None = None) -> None:
        if name == "run-stage":
            _on_sigterm(self._note_sigterm)
        super().barrier(name)

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
