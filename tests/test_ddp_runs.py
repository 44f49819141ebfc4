"""A `trainer=ddp_cpu` run (2 spawned gloo ranks, `ood.strategies.DDPStrategy`) as a cluster job meets it: SIGTERM
at a time limit stops every rank at the same step and the run ends as failed (status 143, FAILED.txt) with a usable
checkpoint; what the ranks log is in the run's `train.log`."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import pytest
import torch
from helpers import StandInRank, capture_warnings_of, run_config
from lightning import Callback, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.nn.parallel import DistributedDataParallel

from ood import strategies, termination
from ood.strategies import DDPStrategy, _SpawnLauncher

TESTS = Path(__file__).parent
#: a short 2-rank training: 2 epochs of 4 steps, no evaluation
DDP = ["trainer=ddp_cpu", "trainer.max_epochs=2", "+trainer.limit_train_batches=4", "trainer.enable_progress_bar=false",
       "evaluate=false", "logger=none"]
SIGTERM = f"signum={int(signal.SIGTERM)}"


def _train_in_own_group(run_dir: Path, overrides: Sequence[str], timeout: float = 120) -> None:
    """`python -m ood.train` in a new process group, which must end with status 143 (SIGTERM). A run still going
    after `timeout` seconds (ranks waiting on each other) is killed with its ranks and fails the test."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "ood.train", *overrides, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the run hung: still going {timeout} s after its start\n{proc.communicate()[0][-3000:]}")
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]


@pytest.mark.slow
def test_sigterm_stops_all_ranks_in_training_and_in_the_evaluation_pass(tmp_path: Path) -> None:
    """SIGTERM to every process of the run (the main process, both ranks and the fork server that started them) in the
    middle of epoch 1 (a scheduler's time limit): Lightning's
    handler broadcast from inside the signal handler, so ranks signalled at different points waited on each other
    for ever, and the main process died at once without FAILED.txt, leaving its ranks behind. Now the run exits 143
    with FAILED.txt and its epoch-0 checkpoint complete. Evaluating that checkpoint, SIGTERM to the main process only
    (`scancel --signal=TERM --batch`) after the evaluation pass is passed on to the ranks; rank 0 stops its evaluation
    (ODIN's network passes) and tells the others, and they stop together: 143 and "rerun the evaluation" (it used to
    finish and exit 0, or meet the scheduler's SIGKILL with nothing recorded). The training run's `train.log` (Hydra's, in the main process) has rank 1's warning and its
    Python warning, marked `[rank 1]`, and rank 0's lines once: spawned ranks logged to the console only. (`ckpt_path=last` then resumes such
    a run to the results of an uninterrupted one, weights and CSV log: checked by hand, two more DDP runs being too
    slow for the suite; tests/test_resume.py checks the resume on one process.)"""
    train = tmp_path / "train"
    _train_in_own_group(train, [*DDP, "+callbacks.kill._target_=killer.KillAt", "+callbacks.kill.epoch=1",
                                "+callbacks.kill.batch=1", f"+callbacks.kill.{SIGTERM}", "+callbacks.kill.to=group",
                                "+callbacks.log._target_=killer.LogFromRanks", "+callbacks.log.rank=1"])
    assert (train / "FAILED.txt").read_text() == "SIGTERMException: terminated by SIGTERM; resume with ckpt_path=last\n"
    ckpt = train / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"] == 0
    assert not list(ckpt.parent.glob("*.tmp"))
    log = (train / "train.log").read_text().splitlines()
    ranked = [line for line in log if line.startswith("[rank ")]  # also Lightning's Python warnings on rank 1
    assert all(line.startswith("[rank 1] [") for line in ranked), log
    ours = [line for line in ranked if "killer" in line]
    assert len(ours) == 2 and ours[0].endswith("[killer.rank][WARNING] - a warning of rank 1 only"), log
    assert "[py.warnings][WARNING] - " in ours[1] and "killer.py:" in ours[1], log
    assert ours[1].endswith(": UserWarning: a Python warning of rank 1"), log
    assert sum(line.endswith("[killer.zero][INFO] - an INFO line of rank 0") for line in log) == 1, log

    with pytest.raises(SystemExit) as stop:
        run_config(tmp_path / "eval", ["trainer=ddp_cpu", f"ckpt_path={ckpt}", "detectors.names=[msp,odin]",
                                       "data.eval_batch_size=64", "trainer.enable_progress_bar=false", "logger=none",
                                       "+callbacks.kill._target_=killer.KillAtTest", "+callbacks.kill.batch=-1",
                                       f"+callbacks.kill.{SIGTERM}", "+callbacks.kill.to=main"], config_name="eval")
    assert stop.value.code == 128 + signal.SIGTERM
    assert (tmp_path / "eval" / "FAILED.txt").read_text() == "SIGTERMException: terminated by SIGTERM; rerun the evaluation\n"
    assert not (tmp_path / "eval" / "results.jsonl").exists()


def test_our_sigterm_handler_goes_in_at_the_run_stage_barrier() -> None:
    """Lightning registers its SIGTERM handler (a collective inside the handler) just before the "run-stage" barrier
    that opens every stage (checked here on the installed Lightning), and ood's DDPStrategy replaces it at that
    barrier: before the data loaders and callbacks' `on_*_start` run, where a SIGTERM to one rank still deadlocked."""
    seen: dict[str, object] = {}

    class Spy(SingleDeviceStrategy):
        def barrier(self, name: str | None = None) -> None:
            if name == "run-stage":
                seen["handler"] = signal.getsignal(signal.SIGTERM)
            super().barrier(name)

    trainer = Trainer(strategy=Spy("cpu"), max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(BoringModel())
    assert type(seen["handler"]).__name__ == "_HandlersCompose"  # Lightning's, installed by then
    previous = signal.getsignal(signal.SIGTERM)
    strategy = DDPStrategy()
    try:
        strategy.barrier("run-stage")  # no process group here: only the handler goes in
        assert signal.getsignal(signal.SIGTERM) == strategy._note_sigterm
    finally:
        signal.signal(signal.SIGTERM, previous)


def _two_cpu_ranks() -> DDPStrategy:
    return DDPStrategy(accelerator="cpu", parallel_devices=[torch.device("cpu")] * 2, start_method="spawn")


def test_a_spawned_rank_notes_sigterm_from_its_first_line_and_stops_at_the_next_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A spawned rank kept Python's default SIGTERM handler until Lightning registered its own as the stage began,
    after setup and the checkpoint restore: a SIGTERM there ended it at once. ood's recording handler is now the
    rank's first code (checked as Lightning's part of the rank starts), and the ranks' check before each step reads
    that record (here one rank in a one-process gloo group): the rank stops at the first step with the others."""
    seen = []
    monkeypatch.setattr(strategies, "_log_to", lambda *args: None)
    monkeypatch.setattr(_MultiProcessingLauncher, "_wrapping_function",
                        lambda self, *args: seen.append(signal.getsignal(signal.SIGTERM)))
    strategy = _two_cpu_ranks()
    _SpawnLauncher(strategy, start_method="spawn")._wrapping_function(0)
    assert seen == [termination.note]
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        strategy._stop_if_terminated()
        termination.note(signal.SIGTERM, None)  # as before the stage began
        with pytest.raises(SIGTERMException):
            strategy._stop_if_terminated()
    finally:
        termination.forget_sigterm()
        torch.distributed.destroy_process_group()


def test_a_rank_keeps_the_console_as_quiet_as_the_main_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ood-train` keeps Lightning's start-up chatter and its `LeafSpec` deprecation warning off the console
    (`ood.runs.console.quiet_lightning`), but a spawned rank started without that: every `trainer=ddp_cpu` run
    printed "Initializing distributed: GLOBAL_RANK ...", "Restoring states from the checkpoint ...", "`Trainer.fit`
    stopped ..." and the `LeafSpec` warning once per rank and stage. A rank now takes the main process's logger
    levels and `ignore` warning filters with the launcher (here pickled as to a rank, unpickled in a process state
    without them, and its rank function run in place)."""
    import logging
    import pickle
    import warnings

    chatter = logging.getLogger("lightning.fabric.utilities.distributed")  # "Initializing distributed: ..."
    leafspec = "`isinstance(treespec, LeafSpec)` is deprecated (test_a_rank_keeps_the_console_quiet)"
    seen: dict[str, int] = {}

    def in_rank(self: _SpawnLauncher, *args: object) -> None:
        with warnings.catch_warnings(record=True) as shown:
            warnings.warn(leafspec, FutureWarning, stacklevel=1)
        seen.update(level=chatter.getEffectiveLevel(), shown=len(shown))

    monkeypatch.setattr(strategies, "_log_to", lambda *args: None)
    monkeypatch.setattr(_MultiProcessingLauncher, "launch", lambda self, *args, **kwargs: pickle.dumps(self))
    monkeypatch.setattr(_MultiProcessingLauncher, "_wrapping_function", in_rank)
    for name in ("lightning", "lightning.fabric", "lightning.fabric.utilities", chatter.name):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    with warnings.catch_warnings():  # the main process, as `quiet_lightning` leaves it
        monkeypatch.setattr(logging.getLogger("lightning.fabric"), "level", logging.WARNING)
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        pickled = _SpawnLauncher(_two_cpu_ranks(), start_method="spawn").launch(lambda: None)
    monkeypatch.setattr(logging.getLogger("lightning.fabric"), "level", logging.NOTSET)  # a rank starts without them
    monkeypatch.setattr(logging.getLogger(), "level", logging.INFO)  # Hydra's root level, which `_log_to` gives it
    with warnings.catch_warnings():
        warnings.resetwarnings()
        pickle.loads(pickled)._wrapping_function(0)
    assert seen == {"level": logging.WARNING, "shown": 0}


def test_a_rank_takes_the_main_processs_warning_filters_in_their_order() -> None:
    """A rank got only the main process's `ignore` filters, put in front of its own, which reordered them: Python's
    `ignore::DeprecationWarning` went before `default::DeprecationWarning:__main__`, so a DeprecationWarning of
    `__main__`, which the main process shows, was ignored in the rank, and a non-`ignore` filter (`error`) was lost.
    The rank now has the main process's filters in their order (pickled as to a rank), its own that the main process
    lacks first."""
    import pickle
    import warnings

    def python_defaults() -> None:  # the two of Python's default filters that matter here, in its order
        warnings.resetwarnings()
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")

    with warnings.catch_warnings():  # the main process
        python_defaults()
        warnings.filterwarnings("ignore", message=r".*LeafSpec")
        warnings.filterwarnings("error", message="loud", category=UserWarning)
        main = list(warnings.filters)
        quiet = pickle.loads(pickle.dumps(strategies._quiet_settings()))
    with warnings.catch_warnings(record=True) as shown:  # a rank as it starts, with a filter of its own
        python_defaults()
        warnings.filterwarnings("ignore", message="the fork server's")
        own = warnings.filters[0]
        strategies._quiet_like(quiet)
        assert warnings.filters == [own, *main]
        warnings.warn_explicit("of __main__", DeprecationWarning, "script.py", 1, module="__main__")
        with pytest.raises(UserWarning, match="loud"):
            warnings.warn("loud", UserWarning, stacklevel=1)
    assert [str(w.message) for w in shown] == ["of __main__"]


def test_the_sigterm_check_never_waits_on_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check before every step summed a flag on the rank's device and read it back (`.item()`): over NCCL the
    host waited for every step queued on the GPU, at each training and evaluation step. The flag is now a CPU tensor
    summed over gloo: the default group when it is gloo, else one gloo group of every rank, made once (here a
    one-process gloo group reported as NCCL, with the device reported as a GPU)."""
    strategy = _two_cpu_ranks()
    monkeypatch.setattr(DDPStrategy, "root_device", property(lambda self: torch.device("cuda", 0)))
    made, summed = [], []

    def new_group(**kwargs: object) -> str:
        made.append(kwargs)
        return "gloo-flags"

    monkeypatch.setattr(torch.distributed, "new_group", new_group)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, group=None: summed.append((t.device.type, group)))
    for backend, groups in (("gloo", [None, None]), ("nccl", ["gloo-flags", "gloo-flags"])):
        monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None, b=backend: b)
        summed.clear()
        strategy._stop_if_terminated()
        strategy._stop_if_terminated()
        assert summed == [("cpu", g) for g in groups]
    assert made == [{"backend": "gloo"}]  # once, at the first check over NCCL


def _gloo_threads() -> list[str]:
    """The names of this process's C++ threads that gloo started: its process group's workers and TCP loop."""
    names = ((task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir())
    return sorted(name for name in names if name.startswith(("pt_gloo", "gloo")))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads this process's threads from /proc")
@pytest.mark.parametrize("way_out", ["sigterm", "error", "done"])
def test_a_spawned_rank_ends_its_process_group_and_gloo_threads_on_every_way_out(
    way_out: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spawned rank left its gloo process group, held by the DDP wrapper, running into the interpreter's exit:
    its worker and transport threads were still there while Python finalized (and C++ destroyed what was left),
    and a rank stopped by SIGTERM on a loaded machine once aborted there ("terminate called without an active
    exception", SIGABRT instead of 143). Each way out of the rank (stopped by SIGTERM: 143, failed, done) now
    unwraps the model and destroys the group without a collective, and gloo's threads have ended before the rank
    returns (here one rank in a one-process group; Lightning's part of the rank replaced)."""
    importlib.import_module("torch._dynamo")  # as in a rank: imported after the group, it keeps a reference to it
    monkeypatch.setattr(strategies, "_log_to", lambda *args: None)
    strategy = _two_cpu_ranks()
    during: list[list[str]] = []

    def stage(self: _MultiProcessingLauncher, *args: object) -> None:
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
        strategy.model = DistributedDataParallel(torch.nn.Linear(2, 2))
        during.append(_gloo_threads())
        if way_out == "sigterm":
            raise SIGTERMException
        if way_out == "error":
            raise RuntimeError("a stage that failed")

    monkeypatch.setattr(_MultiProcessingLauncher, "_wrapping_function", stage)
    leaves: AbstractContextManager = {"sigterm": pytest.raises(SystemExit), "error": pytest.raises(RuntimeError),
                                      "done": nullcontext()}[way_out]
    before = _gloo_threads()  # an earlier test's group that something still holds, if any
    try:
        with leaves as left:
            _SpawnLauncher(strategy, start_method="spawn")._wrapping_function(0)
        if way_out == "sigterm":
            assert left.value.code == 128 + signal.SIGTERM
        assert len(during[0]) > len(before), "gloo started no thread of its own: nothing left to check"
        assert not torch.distributed.is_initialized()
        assert not isinstance(strategy.model, DistributedDataParallel)
        assert _gloo_threads() == before
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.parametrize("way_out", ["sigterm", "error", "done"])
def test_a_spawned_rank_runs_the_failure_hooks_a_single_process_runs(way_out: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning runs the callbacks' `on_exception` (and finalizes the loggers as failed) around a stage in the process
    that called it, which under `trainer=ddp_cpu` is the main process, whose callbacks hold nothing of the ranks'
    stage: a rank stopped by SIGTERM in its evaluation left its `evaluation.bank_dir` folder (`banks-*`, removed by
    `OODEvaluation.on_exception`) on disk, and its network its layer taps. The rank now runs them on its way out."""
    seen: list[tuple[str, object]] = []

    class Hooks(Callback):
        def on_exception(self, trainer: Trainer, pl_module: object, exception: BaseException) -> None:
            seen.append(("on_exception", type(exception)))

    class Logger(CSVLogger):
        def finalize(self, status: str) -> None:
            seen.append(("finalize", status))

    def stage(self: _MultiProcessingLauncher, *args: object) -> None:
        if way_out != "done":
            raise SIGTERMException if way_out == "sigterm" else RuntimeError("a stage that failed")

    trainer = Trainer(callbacks=[Hooks()], logger=Logger(os.devnull), enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    monkeypatch.setattr(strategies, "_log_to", lambda *args: None)
    monkeypatch.setattr(_MultiProcessingLauncher, "_wrapping_function", stage)
    leaves: AbstractContextManager = {"sigterm": pytest.raises(SystemExit), "error": pytest.raises(RuntimeError),
                                      "done": nullcontext()}[way_out]
    with leaves:
        _SpawnLauncher(_two_cpu_ranks(), start_method="spawn")._wrapping_function(0, trainer)
    raised = {"sigterm": SIGTERMException, "error": RuntimeError}.get(way_out)
    assert seen == ([] if raised is None else [("on_exception", raised), ("finalize", "failed")])


@pytest.mark.parametrize(("stop", "counters"), [({"max_epochs": 2}, (2, 4, 4)), ({"max_steps": 3}, (2, 3, 3))])
def test_the_main_process_takes_the_fits_epoch_and_step_from_rank_0(stop: dict[str, int],
                                                                     counters: tuple[int, int, int]) -> None:
    """Lightning's spawn launcher hands back rank 0's weights, state and metrics but not its loop counters: after a
    `trainer=ddp_cpu` fit the main process's trainer was at epoch 0, step 0, and the evaluation's rank started from it,
    so the `test/*` metrics were logged at epoch 0, step 0 (CSV log, wandb's `trainer/global_step`), where one process
    logs them at the fit's end (here 2 epochs of 2 steps: epoch 2, step 4; or 3 steps: epoch 2, step 3). The counters
    now come back with the results (here a fit in this process stands for rank 0's), and the loops are left as a
    finished fit leaves them: loading the counters marked them restarting and resuming (a step-based fit's
    `restarting = False` did not hold: Lightning's fit loop keeps it True when `max_steps` is set)."""
    kwargs = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
              "enable_model_summary": False, **stop}
    fitted = Trainer(limit_train_batches=2, limit_val_batches=0, **kwargs)
    fitted.fit(BoringModel())
    launcher = _SpawnLauncher(_two_cpu_ranks(), start_method="spawn")
    main = Trainer(**kwargs)
    launcher.update_main_process_results(main, launcher.get_extra_results(fitted))
    assert (main.current_epoch, main.global_step, main.fit_loop.epoch_loop._batches_that_stepped) == counters

    def flags(trainer: Trainer) -> list[tuple[bool, bool]]:
        loops = [trainer.fit_loop, trainer.fit_loop.epoch_loop, trainer.fit_loop.epoch_loop.val_loop]
        return [(loop.restarting, loop.is_resuming) for loop in loops]

    assert flags(main) == flags(fitted) == [(False, False)] * 3, "a later fit of this trainer does not resume"


def test_sigterm_while_the_ranks_start_is_passed_on_once_they_are_there() -> None:
    """The main process's SIGTERM while Lightning started the ranks found none to pass it to: they ran their whole
    stage. It now reaches them as soon as Lightning has them (a `sleep` process stands for a rank)."""

    sleeper = subprocess.Popen(["sleep", "30"])

    class Rank:
        pid = sleeper.pid

        def is_alive(self) -> bool:
            return sleeper.poll() is None

    launcher = _SpawnLauncher(_two_cpu_ranks(), start_method="spawn")
    termination.note(signal.SIGTERM, None)
    try:
        launcher.procs = [Rank()]
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
    finally:
        termination.forget_sigterm()
        sleeper.kill()
        sleeper.wait()


def test_sigint_to_the_main_process_alone_stops_its_ranks(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """SIGINT to the main process only (`kill -INT <pid>`, a notebook's interrupt, a scheduler signalling the job's
    main process): its KeyboardInterrupt left the ranks running, which ran their whole stage (a 2-rank fit went on to
    epoch 216 in the 90 s a run was watched) while the main process waited for them in its exit. It now passes SIGINT
    on, says so, waits for them and kills one still running after `RANK_STOP_TIMEOUT` (here one that ignores SIGINT),
    then raises the KeyboardInterrupt (Lightning's launch replaced: the interruption comes as it waits for its ranks)."""
    ranks = [StandInRank(signal.SIG_DFL), StandInRank(signal.SIG_IGN)]

    def launch(self: _MultiProcessingLauncher, *args: object, **kwargs: object) -> None:
        self.procs = ranks
        raise KeyboardInterrupt

    monkeypatch.setattr(_MultiProcessingLauncher, "launch", launch)
    monkeypatch.setattr(strategies, "RANK_STOP_TIMEOUT", 0.5)
    capture_warnings_of("ood.strategies", monkeypatch, caplog)
    try:
        with pytest.raises(KeyboardInterrupt):
            _SpawnLauncher(_two_cpu_ranks(), start_method="spawn").launch(print)
        assert [rank.poll() for rank in ranks] == [-signal.SIGINT, -signal.SIGKILL]
        assert [r.getMessage() for r in caplog.records if r.name == "ood.strategies"] == [
            "interrupted: SIGINT passed on to the 2 DDP ranks, waiting for them to stop",
            f"DDP rank(s) [{ranks[1].pid}] still running 0.5 s after SIGINT: killed"]
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()


def test_a_rank_takes_the_first_sigint_and_ignores_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C on a terminal reaches a rank twice: from the terminal, and passed on by the main process. The second
    interrupted the rank's way out (its process group's end, without which gloo's threads run into the interpreter's
    exit); the first SIGINT now raises KeyboardInterrupt and a later one is ignored, until the rank's code is done
    (here one rank in this process; Lightning's part of it replaced)."""
    monkeypatch.setattr(strategies, "_log_to", lambda *args: None)
    ended = []

    def stage(self: _MultiProcessingLauncher, *args: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)  # interrupted

    def end_process_group(strategy: DDPStrategy) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # the second
        time.sleep(0.01)
        ended.append(strategy)

    monkeypatch.setattr(_MultiProcessingLauncher, "_wrapping_function", stage)
    monkeypatch.setattr(strategies, "_end_process_group", end_process_group)
    strategy = _two_cpu_ranks()
    # Python's own handler: a process started in the background (`make test &`) has SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            _SpawnLauncher(strategy, start_method="spawn")._wrapping_function(0)
        assert ended == [strategy] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
