"""Sweeps through Hydra plugins, end to end: in subprocesses the local parallel preset with a failing job and SLURM's
launcher through its local executor (`slurm_local`: ood's, whose requeue resumes); in this process Optuna tuning on
validation-OOD AUROC (its jobs run in the sweep's own process: a subprocess only imported torch again)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import NO_FIGURES, multirun_here

from ood import termination
from ood.files import atomic_write_text
from ood.report import main as report

JOB = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false", "detectors.names=[msp]", "logger=none", NO_FIGURES]


def _sweep(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "ood.train", "-m", *JOB, *overrides, f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    return proc, sweep


def _sweep_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> Path:
    """`_sweep`'s command in this process (`multirun_here`); returns the sweep folder."""
    sweep = tmp_path / "sweep"
    multirun_here(tmp_path, monkeypatch, [*JOB, *overrides, f"hydra.sweep.dir={sweep}"])
    return sweep


@pytest.mark.slow
def test_failed_job_leaves_the_others_and_report_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a file only the job reads (a value out of range stops the sweep before any job: `check_sweep_jobs`)
    proc, sweep = _sweep(tmp_path, "hydra/launcher=parallel", "method.init.ckpt=null,missing.ckpt")
    assert proc.returncode != 0, "a failed job fails the sweep"
    done = {p.parent.name for p in sweep.glob("*/results.jsonl")}
    failed = {p.parent.name for p in sweep.glob("*/FAILED.txt")}
    assert (done, failed) == ({"0"}, {"1"})
    # Hydra's last lines name the first failed job alone: the sweep ends listing every one and the report command
    last = proc.stderr.splitlines()[-3:]
    assert last[0] == "1 job of the sweep failed:"
    assert last[1].startswith(f"  {sweep / '1'}: CheckpointError: checkpoint not found: missing.ckpt")
    assert last[2] == f"the sweep's report (its failed jobs listed under the table): ood-report {sweep}"
    report([str(sweep), "--no-figures"])
    out, err = capsys.readouterr()
    for job in failed:
        assert f"failed job {sweep / job}: CheckpointError: checkpoint not found: missing.ckpt" in err
        assert f"`{sweep / job}`: CheckpointError" in out
    assert "| ce | msp | small_cnn | digits | 1 |" in out


@pytest.mark.slow
def test_slurm_local_runs_two_jobs_whose_requeue_resumes(tmp_path: Path) -> None:
    """hydra-submitit-launcher (`hydra/launcher=slurm_local`: the SLURM launcher's class on submitit's local
    executor) runs the sweep's jobs; a job preempted or at its time limit is resubmitted by the launcher's
    `checkpoint` with the arguments it was first given, so it trained from scratch (ood resumes only with
    `ckpt_path=last`): ood's launcher resubmits it with `ckpt_path=last` (a job naming its own `ckpt_path` as it was)."""
    import pickle

    from hydra_plugins.ood_launchers import requeue_overrides

    proc, sweep = _sweep(tmp_path, "hydra/launcher=slurm_local", "hydra.launcher.timeout_min=10", "seed=0,1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    seeds = sorted(json.loads((p).read_text().splitlines()[0])["seed"] for p in sweep.glob("*/results.jsonl"))
    assert seeds == [0, 1]
    assert list((sweep / ".submitit").rglob("*_result.pkl")), "the jobs went through submitit"
    submitted = pickle.loads(next((sweep / ".submitit").rglob("*_submitted.pkl")).read_bytes())
    assert type(submitted.function).__name__ == "ResumingLocalLauncher"
    requeued = submitted.function.checkpoint(*submitted.args)  # what submitit's USR2 handler calls
    assert requeued.function is submitted.function and requeued.args[1:] == submitted.args[1:]
    assert requeued.args[0] == [*submitted.args[0], "ckpt_path=last"] and "ckpt_path=last" not in submitted.args[0]
    assert requeue_overrides(["seed=1", "ckpt_path=/runs/a"]) == ["seed=1", "ckpt_path=/runs/a"]
    assert requeue_overrides(["+ckpt_path=a"]) == ["+ckpt_path=a"]


@pytest.mark.slow
def test_a_slurm_local_job_stopped_by_sigterm_fails_the_sweep_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job of ood's submitit launchers that SIGTERM stopped exited with status 143 and no submitit result, so the
    sweep's own process ended in submitit's 30-line `UncompletedJobError` traceback. The job's stop is now its failure,
    as under the other launchers: every job's result collected, one line naming the stopped job's folder and its
    `FAILED.txt`, a non-zero status."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    proc, sweep = _sweep(tmp_path, "hydra/launcher=slurm_local", "hydra.launcher.timeout_min=10",
                         "+callbacks.kill._target_=killer.KillAtHook", "+callbacks.kill.hook=setup",
                         "+callbacks.kill.signum=0,15")  # signal 0 sends nothing: job 0 runs to its end
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "UncompletedJobError" not in proc.stderr, proc.stderr[-3000:]
    stopped = "SIGTERMException: terminated by SIGTERM; resume with ckpt_path=last"
    assert f"job {sweep / '1'} stopped: {stopped}\n" in proc.stderr, proc.stderr[-3000:]
    assert (sweep / "1" / "FAILED.txt").read_text() == stopped + "\n"
    assert [p.parent.name for p in sweep.glob("*/results.jsonl")] == ["0"]


@pytest.mark.parametrize("code", [-1, 0, 1])
def test_a_sweep_job_exiting_otherwise_still_exits(code: int) -> None:
    """Only ood's stop on SIGTERM (143) becomes a failed job: submitit ends a job it requeued with `sys.exit(-1)`,
    which must leave no result (it would pass for the requeued job's), and any other exit goes on as it was."""
    from hydra_plugins.ood_launchers import stopped_as_failure

    with pytest.raises(SystemExit) as stop:
        stopped_as_failure(sys.exit, code)
    assert stop.value.code == code
    assert stopped_as_failure(lambda cfg: cfg * 2, 21) == 42


@pytest.mark.slow
def test_optuna_tunes_on_validation_auroc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = _sweep_here(tmp_path, monkeypatch, "hydra/sweeper=optuna_val", "hydra.sweeper.n_trials=2", "objective=msp",
                        "method.optimizer.lr=interval(0.01,0.1)")  # a failed job: SystemExit(1), failing the test
    trials = {p.parent.name: json.loads(p.read_text())["auroc"]["msp"] for p in sweep.glob("*/validation.json")}
    assert len(trials) == 2
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(trials.values()), abs=0), "the sweeper saw the val_ood AUROC"
    tests = {json.loads(line)["auroc"] for p in sweep.glob("*/results.jsonl") for line in p.read_text().splitlines()}
    assert best["best_value"] not in tests


def test_a_worker_whose_sweep_died_stops_its_job(tmp_path: Path) -> None:
    """hydra/launcher=parallel's workers ran their jobs on after the sweep's process was SIGKILLed (orphans holding
    CPUs and GPUs, then idle for minutes). A worker's job now watches its parent (`stop_when_orphaned`): once it is
    gone the job is sent SIGTERM, so it stops at its next safe point (`ood-train`: status 143, FAILED.txt, resumable)
    and the process exits. Here a forked process stands for the sweep and its child for the worker."""
    noted = tmp_path / "noted"
    ready_r, ready_w = os.pipe()
    if os.fork() == 0:  # the sweep: starts its worker, waits until it watches, dies (never back into pytest)
        try:
            if os.fork() == 0:  # the worker
                try:
                    _watch_until_sigterm(noted, ready_w)
                finally:
                    os._exit(0)
            os.close(ready_w)
            os.read(ready_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.wait()
    deadline = time.monotonic() + 10
    while not noted.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert noted.read_text() == "True"


def _watch_until_sigterm(noted: Path, ready: int) -> None:
    """The worker's job: watch the parent, tell it so, wait up to 10 s for SIGTERM, write whether it came."""
    with termination.sigterm_noted():
        termination.stop_when_orphaned(interval=0.05)
        os.write(ready, b"x")
        deadline = time.monotonic() + 10
        while not termination.sigterm_received() and time.monotonic() < deadline:
            time.sleep(0.01)
        atomic_write_text(noted, str(termination.sigterm_received()))  # the parent polls for it: never half-written


def test_a_sweeps_own_process_ends_on_sigterm_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry points note SIGTERM from their start; a sweep's own process (`-m`) runs no job under the parallel and
    SLURM launchers, so no run acted on the note and it launched every job (the review's repro: 6 jobs, exit 0). Its
    `hydra.callbacks` entry (`SweepSigterm`) puts the default handler back as the sweep starts, and ends it at once
    (143) when the signal was noted while Hydra started."""
    import signal

    from helpers import compose_config

    callbacks = compose_config(tmp_path, ["hydra/launcher=parallel"]).hydra.callbacks
    assert callbacks.sweep_sigterm._target_ == "ood.termination.SweepSigterm"
    with termination.sigterm_noted():
        termination.SweepSigterm().on_multirun_start(config=None)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    monkeypatch.setattr(termination, "_received", True)
    with pytest.raises(SystemExit) as stop:
        termination.SweepSigterm().on_multirun_start(config=None)
    assert stop.value.code == termination.SIGTERM_EXIT


@pytest.mark.parametrize("given", [["ckpt_path=null"], ["ckpt_path=NULL"], ["~ckpt_path"], ["~ckpt_path=null"]])
def test_a_requeued_job_started_from_scratch_resumes(given: list[str]) -> None:
    """A job told to start from scratch (`ckpt_path=null`, `~ckpt_path`: the default, written out) was requeued with
    that override kept, so it trained from scratch again and its epochs were lost (`~ckpt_path` then
    `ckpt_path=last` would not even parse: the key is gone); its requeue now resumes with `ckpt_path=last` in its
    place. A job naming a checkpoint keeps it."""
    from hydra_plugins.ood_launchers import requeue_overrides

    assert requeue_overrides(["seed=1", *given, "data=digits"]) == ["seed=1", "data=digits", "ckpt_path=last"]
    assert requeue_overrides(["seed=1", "ckpt_path=last"]) == ["seed=1", "ckpt_path=last"]
    assert requeue_overrides(["++ckpt_path=/runs/a"]) == ["++ckpt_path=/runs/a"]


def test_the_end_of_an_optuna_sweep_names_its_best_job_and_what_its_value_is(tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Optuna's last lines were `Best parameters: {...}` and `Best value: 0.3075925925925926`: a fraction where every
    table is in %, of no named score, and no job folder to read. The sweep's end now says which job, which AUROC, in
    %, and where the numbers are."""
    from omegaconf import OmegaConf

    from ood.runs.sweeps import BestTrial

    for job, auroc in (("0", 0.3075925925925926), ("1", 0.25)):
        (tmp_path / job).mkdir()
        (tmp_path / job / "validation.json").write_text(json.dumps({"method": "ce", "auroc": {"msp": auroc, "ce": 0.2}}))
    (tmp_path / "optimization_results.yaml").write_text(
        "name: optuna\nbest_params:\n  method.optimizer.lr: 0.1142745657461917\nbest_value: 0.3075925925925926\n")
    BestTrial().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}, "objective": "msp"}))
    assert capsys.readouterr().out == (
        f"best trial: {tmp_path / '0'} (method.optimizer.lr=0.1142745657461917): validation AUROC of msp (ID val vs "
        f"validation OOD) 30.76 %, Optuna's best_value 0.3075925925925926 in {tmp_path / 'optimization_results.yaml'}; "
        f"test numbers of every trial: ood-report {tmp_path}\n")
    (tmp_path / "optimization_results.yaml").unlink()  # a sweep of the basic sweeper: nothing to say
    BestTrial().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}, "objective": None}))
    assert capsys.readouterr().out == ""


def test_the_best_trial_callback_imports_no_torch() -> None:
    """`BestTrial` is a callback of every run (`hydra.callbacks`): Hydra imports its module as it starts, also in the
    sweep's own process of the parallel and SLURM launchers, which runs no job; at 7 s for torch there, it must not."""
    code = "import sys, ood.runs.sweeps; print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out == "[]\n"


def test_the_best_trial_of_tied_trials_is_optunas_the_first_to_reach_the_value(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Optuna's best trial is the first to reach the best value (a later tie does not replace it), and its
    `best_params` are that trial's; the line took the first tied job folder by name, `10` before `2`, naming trial
    10's folder beside trial 2's parameters (AUROC ties are common: 1.0 on an easy validation set)."""
    from omegaconf import OmegaConf

    from ood.runs.sweeps import BestTrial

    for job, auroc in (("0", 0.9), ("1", 0.95), ("2", 1.0), *((str(j), 0.97) for j in range(3, 10)), ("10", 1.0)):
        (tmp_path / job).mkdir()
        (tmp_path / job / "validation.json").write_text(json.dumps({"method": "ce", "auroc": {"msp": auroc}}))
    (tmp_path / "optimization_results.yaml").write_text(
        "name: optuna\nbest_params:\n  method.optimizer.lr: 0.1\nbest_value: 1.0\n")
    BestTrial().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}, "objective": "msp"}))
    assert capsys.readouterr().out.startswith(f"best trial: {tmp_path / '2'} (method.optimizer.lr=0.1): ")


def test_a_sweeps_failed_jobs_are_listed_once_and_not_for_a_later_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`failed_jobs_listed` names the jobs whose FAILED.txt the sweep wrote (not an earlier attempt's), then forgets
    the sweep: a later failed command of the same process (a script calling main() twice) listed them again."""
    from omegaconf import OmegaConf

    import ood.runs.sweeps as sweeps

    old, new = tmp_path / "0", tmp_path / "1"
    for job in (old, new):
        job.mkdir()
        (job / "FAILED.txt").write_text(f"ConfigError: job {job.name}\n")
    os.utime(old / "FAILED.txt", (0, 0))  # an earlier attempt's
    sweeps.SweepStart().on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    for _ in range(2):
        with pytest.raises(SystemExit), sweeps.failed_jobs_listed():
            sys.exit(1)
    assert capsys.readouterr().err.splitlines() == [
        "1 job of the sweep failed:", f"  {new}: ConfigError: job 1",
        f"the sweep's report (its failed jobs listed under the table): ood-report {tmp_path}"]


def test_a_sweeps_bad_value_stops_it_before_any_job_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Each job checked its ranges only as it started: `method.optimizer.lr=0.1,-1` trained job 0, then failed job 1.
    Every job's composed config is now checked before the first starts: one line names the bad job, nothing trains."""
    from ood.train import main

    sweep = tmp_path / "sweep"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["ood-train", "-m", *JOB, "method.optimizer.lr=0.1,-1", f"hydra.sweep.dir={sweep}"])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 1
    assert not sweep.exists(), "no job started"
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("error: job 1 of the sweep (trainer.max_epochs=1 ")
    assert line.endswith(" method.optimizer.lr=-1): method.optimizer.lr=-1 is outside its range [0, inf]; no job was "
                         "started")


@pytest.mark.parametrize(("swept", "bad", "error"), [
    ("trainer.max_epochs=1,0", "trainer.max_epochs=0",
     "trainer.max_epochs=0: must be >= 1 (Lightning's -1 would train forever)"),
    ("data.fit_fraction=1.0,1.5", "data.fit_fraction=1.5", "data.fit_fraction must be in (0, 1], got 1.5"),
    ("detectors.names=[msp],[msp,nope]", "'detectors.names=[msp,nope]'", "unknown detector 'nope'; available: "),
])
def test_every_job_of_a_sweep_is_checked_before_it_starts(swept: str, bad: str, error: str) -> None:
    """The range checks of epochs, data fractions and detector names run on the second job's config; the message is
    the one the job would have failed with, after the job's overrides as shell words."""
    from ood import CONFIG_DIR
    from ood.errors import ConfigError
    from ood.runs.sweeps import check_sweep_jobs

    with pytest.raises(ConfigError) as refused:
        check_sweep_jobs(CONFIG_DIR, "train", ["-m", "seed=0", swept])
    assert str(refused.value).startswith(f"job 1 of the sweep (seed=0 {bad}): {error}")


def test_a_sweep_whose_values_are_drawn_later_or_a_single_run_is_not_checked_before() -> None:
    """Optuna draws its values as the sweep goes: nothing to check before; a run without -m checks itself."""
    from ood import CONFIG_DIR
    from ood.runs.sweeps import check_sweep_jobs

    check_sweep_jobs(CONFIG_DIR, "train", ["-m", "hydra/sweeper=optuna_val", "method.optimizer.lr=interval(-1,0.1)"])
    check_sweep_jobs(CONFIG_DIR, "train", ["method.optimizer.lr=-1"])


def test_a_sweep_of_a_preset_on_hydra_searchpath_is_checked(tmp_path: Path) -> None:
    """Each job's config-group options were composed without the command line's `hydra.searchpath`: a preset of the
    user's own (`method=mine` from `my_conf/method/`; `ood-eval` adds a run's searchpath) was not found, and the whole
    sweep went unchecked (its jobs failed one by one as they started)."""
    from ood import CONFIG_DIR
    from ood.errors import ConfigError
    from ood.runs.sweeps import check_sweep_jobs

    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "mine.yaml").write_text("defaults:\n  - ce\n  - _self_\noptimizer:\n  lr: -1\n")
    with pytest.raises(ConfigError) as refused:
        check_sweep_jobs(CONFIG_DIR, "train", ["-m", f"hydra.searchpath=[file://{tmp_path}]", "method=ce,mine"])
    assert str(refused.value) == ("job 1 of the sweep (method=mine): method.optimizer.lr=-1 is outside its range "
                                  "[0, inf]; no job was started")


def test_a_sweep_naming_a_module_only_its_cluster_nodes_import_is_left_to_its_jobs(
        caplog: pytest.LogCaptureFixture) -> None:
    """A detector import path or a method `_target_` in a module on the PYTHONPATH a SLURM launcher's `setup` sets on
    the node was refused on the submitting machine ("cannot be imported"), stopping a sweep that would have run. Now
    one warning per module names it and says the jobs check it; a wrong class in a module that imports (ood's own
    module path misspelt too) and a bad value still stop the sweep."""
    from ood import CONFIG_DIR
    from ood.errors import ConfigError
    from ood.runs.sweeps import check_sweep_jobs

    with caplog.at_level("WARNING", logger="ood.runs.sweeps"):
        check_sweep_jobs(CONFIG_DIR, "train", ["-m", "seed=0,1,2", "method._target_=cluster_only.methods.Mine",
                                               "detectors.names=[msp,cluster_only.detectors.MyDet]"])
    why = "cannot be imported here (No module named 'cluster_only'): each job checks it as it starts (a module on " \
          "the PYTHONPATH of the node that runs it)"
    assert [r.getMessage() for r in caplog.records] == [f"the sweep's jobs name cluster_only.detectors, which {why}",
                                                       f"the sweep's jobs name cluster_only.methods, which {why}"]
    for names, error in (("[msp,ood.detectors.knn.KNNN]", "detector 'ood.detectors.knn.KNNN': ood.detectors.knn holds "
                          "nothing named 'KNNN'"),
                         ("[msp,ood.detectors.knnn.KNN]", "detector 'ood.detectors.knnn.KNN' cannot be imported")):
        with pytest.raises(ConfigError) as refused:
            check_sweep_jobs(CONFIG_DIR, "train", ["-m", "seed=0,1", f"detectors.names={names}"])
        assert str(refused.value).startswith(f"job 0 of the sweep (seed=0 'detectors.names={names}'): {error}")
    with pytest.raises(ConfigError) as refused:
        check_sweep_jobs(CONFIG_DIR, "train", ["-m", "seed=0,-1", "detectors.names=[msp,cluster_only.detectors.MyDet]"])
    assert str(refused.value).startswith("job 1 of the sweep (seed=-1 'detectors.names=[msp,cluster_only.detectors.MyDet]'): seed=-1 is outside")


@pytest.mark.parametrize(("target", "error"), [
    ("ood.methods.ce.CEE", "method._target_='ood.methods.ce.CEE': ood.methods.ce holds nothing named 'CEE'; its "
                           "methods, closest first: CrossEntropy"),
    ("ood.methods.cee.CE", "method._target_='ood.methods.cee.CE' cannot be imported: No module named 'ood.methods.cee'"),
])
def test_a_sweeps_method_target_naming_no_class_stops_it_before_any_job(target: str, error: str) -> None:
    """A method `_target_` naming a class its module (which imports) does not hold, or a misspelt module of ood's own,
    passed the pre-sweep check silently (Hydra's `get_class` failed inside it): job 0 failed at its start. One line
    names the job, the path and the module's methods, closest first."""
    from ood import CONFIG_DIR
    from ood.errors import ConfigError
    from ood.runs.sweeps import check_sweep_jobs

    with pytest.raises(ConfigError) as refused:
        check_sweep_jobs(CONFIG_DIR, "train", ["-m", f"method._target_={target}", "seed=0,1"])
    assert str(refused.value) == f"job 0 of the sweep (method._target_={target} seed=0): {error}; no job was started"


def test_a_sweeps_nested_method_target_is_found_as_hydra_finds_it(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Hydra takes a `_target_` `pkg.mod.Class.factory` (its longest importable module, then attributes); the
    pre-sweep check took all but the last part for the module: a user's nested target was warned of as a module that
    "cannot be imported here" (its jobs' checks skipped), and a nested ood path was refused as one that "cannot be
    imported" (`ood.methods.ce.CrossEntropy` is no package). Now the nested target's jobs are checked, and a missing
    attribute names the class that lacks it."""
    import types

    from ood import CONFIG_DIR
    from ood.errors import ConfigError
    from ood.methods.ce import CrossEntropy
    from ood.runs.sweeps import check_sweep_jobs

    presets = types.ModuleType("nested_presets")
    presets.Presets = type("Presets", (), {"ce": CrossEntropy})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nested_presets", presets)
    with caplog.at_level("WARNING", logger="ood.runs.sweeps"), pytest.raises(ConfigError) as refused:
        check_sweep_jobs(CONFIG_DIR, "train", ["-m", "method._target_=nested_presets.Presets.ce",
                                               "method.optimizer.lr=0.1,-1"])
    assert str(refused.value) == ("job 1 of the sweep (method._target_=nested_presets.Presets.ce "
                                  "method.optimizer.lr=-1): method.optimizer.lr=-1 is outside its range [0, inf]; no "
                                  "job was started")
    assert caplog.records == []
    with pytest.raises(ConfigError) as refused:
        check_sweep_jobs(CONFIG_DIR, "train", ["-m", "method._target_=ood.methods.ce.CrossEntropy.x", "seed=0,1"])
    assert str(refused.value) == ("job 0 of the sweep (method._target_=ood.methods.ce.CrossEntropy.x seed=0): "
                                  "method._target_='ood.methods.ce.CrossEntropy.x': ood.methods.ce.CrossEntropy holds "
                                  "nothing named 'x'; no job was started")
