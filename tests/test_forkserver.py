"""`trainer=ddp_cpu` starts its ranks through Python's fork server (`ood.strategies`, `start_method=forkserver`): a
rank forked from the server must get what a spawned rank got from the main process as each launch began, not what
the server had when it started (an earlier launch, maybe another test): the environment, stdout, the RNG states;
its tensors by value (the server passes at most 256 file descriptors, torch shares each storage as one)."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from ood.strategies import DDPStrategy, _SpawnLauncher

STORAGES = 300  # buffers: each its own storage, more than the 256 descriptors the server passes with a process


class Probe(BoringModel):
    """Records, in each rank as its fit starts, what it got from the main process."""

    def __init__(self, out: str, say: bool = True) -> None:
        super().__init__()
        self.out, self.say = out, say
        for i in range(STORAGES):
            self.register_buffer(f"b{i}", torch.full((1,), float(i)))

    def on_fit_start(self) -> None:
        tag = os.environ["OOD_PROBE"]
        if self.say:  # on stdout
            print(f"rank {self.global_rank} of launch {tag}", flush=True)
        report = {"rand": torch.rand(3).tolist(), "server": os.getppid(), "threads": torch.get_num_threads(),
                  "buffers": sum(float(getattr(self, f"b{i}")) for i in range(STORAGES)),
                  "shared": any(t.is_shared() for t in (*self.parameters(), *self.buffers()))}
        Path(self.out, f"{tag}-{self.global_rank}.json").write_text(json.dumps(report))


def _fit(model: Probe) -> None:
    strategy = DDPStrategy(start_method="forkserver", process_group_backend="gloo")
    trainer = Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, logger=False, limit_val_batches=0,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model)


def test_forked_ranks_get_the_launchs_environment_stdout_rng_and_own_tensors(tmp_path: Path, monkeypatch) -> None:
    seen = {}
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # an earlier test's seed_everything: every rank would reseed
    for launch, threads in (("first", 1), ("second", 3)):
        monkeypatch.setenv("OOD_PROBE", launch)
        monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
        model = Probe(str(tmp_path))
        torch.manual_seed(len(launch))
        expected = torch.rand(3).tolist()
        torch.manual_seed(len(launch))
        stdout = tmp_path / f"{launch}.out"
        saved = os.dup(1)
        with open(stdout, "a") as redirected:  # this launch's stdout (the server keeps the one it started with)
            sys.stdout.flush()
            os.dup2(redirected.fileno(), 1)
            try:
                _fit(model)
            finally:
                os.dup2(saved, 1)
                os.close(saved)
        # the ranks' lines, whichever order their writes interleave in (unbuffered: text and newline are two writes)
        lines = re.findall(r"rank \d of launch (?:first|second)", stdout.read_text())
        assert sorted(lines) == [f"rank 0 of launch {launch}", f"rank 1 of launch {launch}"]
        for rank in (0, 1):
            report = json.loads((tmp_path / f"{launch}-{rank}.json").read_text())
            assert report["rand"] == expected  # the main process's RNG state as the launch began, in every rank
            assert report["threads"] == threads  # OMP_NUM_THREADS, read as a spawned rank's torch loads
            assert report["buffers"] == sum(range(STORAGES)) and not report["shared"]
            seen[launch, rank] = report["server"]
    # both launches' ranks were forked by one server (not the main process: not spawned)
    assert len(set(seen.values())) == 1 and os.getpid() not in seen.values()


#: a main module that starts one process through a fork server preloading `{preload}`, and says how it ended
FORKSERVER_MAIN = """
import multiprocessing

if __name__ == "__main__":
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload({preload})
    process = context.Process(target=print, args=("rank ran",))
    process.start()
    process.join()
    print("exit", process.exitcode)
"""
#: a package's main module that the server preloaded, as `python -m ood.train`
PRELOADED_MAIN = FORKSERVER_MAIN.format(preload=["ood.forkserver", "preloaded.main"])


def test_a_forked_rank_runs_a_preloaded_main_module_again_without_runpys_warning(tmp_path: Path) -> None:
    """A rank runs the main module again as `__mp_main__`, as a spawned rank does; `python -m ood.train`'s was
    already imported in the server (preloaded), and each rank printed runpy's "RuntimeWarning: 'ood.train' found in
    sys.modules after import of package 'ood'" on the console, at every stage. Now it says nothing, as a spawned one."""
    (tmp_path / "preloaded").mkdir()
    (tmp_path / "preloaded" / "__init__.py").write_text("")
    (tmp_path / "preloaded" / "main.py").write_text(PRELOADED_MAIN)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTHONWARNINGS", None)
    run = subprocess.run([sys.executable, "-m", "preloaded.main"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert (run.stdout, run.stderr) == ("rank ran\nexit 0\n", "")


#: a module the server preloads before `ood.forkserver`: a signal to each process it forks, right after the fork
SIGNALLED_AT_FORK = """
import os

os.register_at_fork(after_in_child=lambda: os.kill(os.getpid(), {signum}))
"""

#: one process started through that server
SIGNALLED_MAIN = FORKSERVER_MAIN.format(preload=["signalled_at_fork", "ood.forkserver"])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_passed_on_as_the_server_forks_the_rank_reaches_it(tmp_path: Path, signum: signal.Signals) -> None:
    """The main process passes SIGINT or SIGTERM on to its ranks as soon as it has their pids, which the server sends
    as it forks: one that came before the rank stopped ignoring it (the server's SIG_IGN) was lost, and the rank ran
    its whole stage. Here the signal comes first thing after the fork: the rank is now stopped by it."""
    (tmp_path / "signalled_at_fork.py").write_text(SIGNALLED_AT_FORK.format(signum=int(signum)))
    (tmp_path / "main.py").write_text(SIGNALLED_MAIN)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), root, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "main.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert (run.stdout, run.stderr) == (f"exit {-signum}\n", "")


#: a rank that sets its own SIGINT / SIGTERM handlers, then forks a worker (as a DataLoader's) that reports its own
WORKER_MAIN = """
import multiprocessing
import signal


def noted(signum, frame):
    pass


def worker():
    print("worker", signal.getsignal(signal.SIGINT) is noted, signal.getsignal(signal.SIGTERM) is noted, flush=True)


def rank():
    signal.signal(signal.SIGINT, noted)
    signal.signal(signal.SIGTERM, noted)
    process = multiprocessing.get_context("fork").Process(target=worker)
    process.start()
    process.join()


if __name__ == "__main__":
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["ood.forkserver"])
    process = context.Process(target=rank)
    process.start()
    process.join()
    print("exit", process.exitcode)
"""


def test_a_process_a_rank_forks_keeps_the_ranks_signal_handlers(tmp_path: Path) -> None:
    """The server's after-fork reset (SIGINT and SIGTERM to their default actions) ran again in every process a rank
    forked, as its DataLoader workers: a Ctrl-C or a scheduler's SIGTERM killed them outright, where a spawned rank's
    workers have the rank's handlers (a worker takes Ctrl-C as KeyboardInterrupt and ends quietly; ood notes
    SIGTERM), and the rank failed on "DataLoader worker is killed by signal". Only the rank the server forks is reset."""
    (tmp_path / "main.py").write_text(WORKER_MAIN)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "main.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert (run.stdout, run.stderr) == ("worker True True\nexit 0\n", "")


def test_a_forked_rank_of_a_script_without_the_main_guard_is_told_to_add_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forked rank runs the main script again, as a spawned one does: a script calling `ood.evaluate(...,
    overrides=["trainer=ddp_cpu"])` without `if __name__ == "__main__":` launched again from inside the rank, which
    died in Python's "An attempt has been made to start a new process before the current process has finished its
    bootstrapping phase" (and the main process in a BrokenPipeError). Lightning's message saying to add the guard,
    which it gives for spawn only, now comes for the fork server too (here a launch while the rank is bootstrapping)."""
    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)
    strategy = DDPStrategy(accelerator="cpu", parallel_devices=[torch.device("cpu")] * 2, start_method="forkserver")
    with pytest.raises(RuntimeError, match='guards the main\nfunction with an `if __name__ == "__main__"` clause'):
        _SpawnLauncher(strategy, start_method="forkserver").launch(print)


def test_a_launch_with_stdout_closed_starts_its_ranks(tmp_path: Path, monkeypatch) -> None:
    """A program started with its stdout closed (`python script.py >&-`): handing the ranks the main process's stdout
    failed (no descriptor to duplicate), so no rank started; now they start (keeping the server's stdout), as spawned
    ranks started without one."""
    monkeypatch.setenv("OOD_PROBE", "closed")
    model = Probe(str(tmp_path), say=False)
    saved = os.dup(1)
    sys.stdout.flush()
    os.close(1)
    try:
        _fit(model)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    assert sorted(p.name for p in tmp_path.glob("closed-*.json")) == ["closed-0.json", "closed-1.json"]
