"""Resumable training: SIGKILL in the middle of a known epoch, resume with `ckpt_path=last`, get the uninterrupted results."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FAST, NO_FIGURES, capture_warnings_of, compose_config, run_config

from ood.errors import CheckpointError, ConfigError
from ood.runs.checkpoints import resolve_ckpt_path
from ood.runs.checks import check_run
from ood.runs.identity import flat_config
from ood.train import run

RUN = [*FAST, "trainer.max_epochs=3", "detectors.names=[msp,energy]", "logger=none", NO_FIGURES]
TESTS = Path(__file__).parent
#: a quick msp run of `epochs` epochs, and the callback that stops it by SIGTERM at the start of epoch 1
QUICK = [*FAST, "detectors.names=[msp]", "logger=none", NO_FIGURES]
SIGTERM_IN_EPOCH_1 = ["+callbacks.kill._target_=killer.KillAt", "+callbacks.kill.epoch=1", "+callbacks.kill.batch=0",
                      f"+callbacks.kill.signum={int(signal.SIGTERM)}"]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 2-epoch `QUICK` run stopped by SIGTERM in epoch 1, and what it printed on stderr: run once for the tests
    that read it (those that change it take a copy)."""
    folder = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
        run_config(folder, [*QUICK, "trainer.max_epochs=2", *SIGTERM_IN_EPOCH_1])
    return folder, err.getvalue()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A finished 1-epoch `QUICK` run and its result rows: trained once for the tests that resume it (each resumes
    a copy)."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    return folder, run_config(folder, [*QUICK, "trainer.max_epochs=1"])


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """The results, and the CSV log: the resumed run continues the killed run's `csv/version_0/metrics.csv` without
    the rows of the epoch it was killed in, so the file equals the uninterrupted run's."""
    killed = tmp_path / "killed"
    logged = [*(o for o in RUN if o != "logger=none"), "logger=csv"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "ood.train", *logged, f"hydra.run.dir={killed}",
         "+callbacks.kill._target_=killer.KillAt", "+callbacks.kill.epoch=2", "+callbacks.kill.batch=3"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (killed / "results.jsonl").exists()
    ckpt = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["hyper_parameters"]["config"]["trainer.max_epochs"] == 3
    assert not list((killed / "checkpoints").glob("*.tmp")), "no half-written checkpoint is left behind"

    (killed / "FAILED.txt").write_text("SIGTERMException: an earlier attempt\n")
    run_config(killed, [*logged, "ckpt_path=last"])  # same folder: `last` is its own checkpoints/last.ckpt
    assert not (killed / "FAILED.txt").exists(), "a resumed run that finishes is no longer reported as failed"
    run_config(tmp_path / "straight", logged)
    assert (killed / "results.jsonl").read_text() == (tmp_path / "straight" / "results.jsonl").read_text()
    assert [p.name for p in (killed / "csv").iterdir()] == ["version_0"]
    metrics = [(run / "csv" / "version_0" / "metrics.csv").read_text() for run in (killed, tmp_path / "straight")]
    assert metrics[0] == metrics[1] and metrics[0].count("\n") > 10


@pytest.mark.slow
def test_sigterm_ends_the_run_as_failed_and_it_resumes(tmp_path: Path) -> None:
    """Lightning answers SIGTERM with a SystemExit of status 0 at the next training step: the run exits 143 (killed
    by SIGTERM) and leaves FAILED.txt, not a silent success without results; `ckpt_path=last` then finishes it. An
    `ood-eval` stopped in its evaluation pass likewise, and one stopped after it, in the evaluation itself."""
    with pytest.raises(SystemExit) as stop:
        run_config(tmp_path, [*RUN, "+callbacks.kill._target_=killer.KillAt", "+callbacks.kill.epoch=1",
                              "+callbacks.kill.batch=0", f"+callbacks.kill.signum={int(signal.SIGTERM)}"])
    assert stop.value.code == 128 + signal.SIGTERM
    assert (tmp_path / "FAILED.txt").read_text() == "SIGTERMException: terminated by SIGTERM; resume with ckpt_path=last\n"
    assert not (tmp_path / "results.jsonl").exists()
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 0
    assert {r["detector"] for r in run_config(tmp_path, [*RUN, "ckpt_path=last"])} == {"msp", "energy"}
    assert not (tmp_path / "FAILED.txt").exists()
    # `ood-eval` stops in its evaluation pass at the next batch too, and after the pass in the evaluation itself
    # (ODIN's network passes, hours on ImageNet: it stopped only once done): rerun it, there is nothing to resume
    for folder, batch, extra in (("eval", 0, "data.eval_batch_size=64"), ("late", -1, "detectors.names=[msp,odin]")):
        with pytest.raises(SystemExit) as stop:
            run_config(tmp_path / folder, [*RUN, f"ckpt_path={tmp_path}", extra, "+callbacks.kill._target_=killer.KillAtTest",
                                           f"+callbacks.kill.batch={batch}", f"+callbacks.kill.signum={int(signal.SIGTERM)}"],
                       config_name="eval")
        assert stop.value.code == 128 + signal.SIGTERM
        assert (tmp_path / folder / "FAILED.txt").read_text() == "SIGTERMException: terminated by SIGTERM; rerun the evaluation\n"
        assert not (tmp_path / folder / "results.jsonl").exists()


def test_a_run_stopped_by_sigterm_says_so_on_the_console(stopped: tuple[Path, str]) -> None:
    """A run stopped by SIGTERM (a cluster's time limit, `scancel`) ended with status 143 and nothing on the console:
    the job's log gave no reason and no way on (only `FAILED.txt` did). It now prints one line naming the folder and
    the overrides that resume it there."""
    folder, err = stopped
    assert err.splitlines()[-1] == (
        f"stopped by SIGTERM: {folder} keeps its last completed epoch's checkpoint; resume it with the same command "
        f"plus ckpt_path=last hydra.run.dir={folder}")


@pytest.mark.slow
def test_a_run_resumed_in_another_folder_is_not_reported_as_failed(tmp_path: Path, stopped: tuple[Path, str],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A run stopped by SIGTERM and resumed with `ckpt_path=<it>` (or `last`) into a new folder, as the README
    resumes without `hydra.run.dir`: ood-report listed the stopped folder as a failed job for good ("resume with
    ckpt_path=last", which was done); it names the folder that resumed it now (that run's `resumed.json`). A run
    resumed in its own folder writes none."""
    from ood.report import main as report
    from ood.report.reading import failed_runs
    from ood.runs.failures import RESUMED_FILE

    first, second = tmp_path / "runs" / "first", tmp_path / "runs" / "second"
    quick = [*QUICK, "trainer.max_epochs=2"]
    shutil.copytree(stopped[0], first)
    assert list(failed_runs([tmp_path])) == [str(first)]
    rows = run_config(second, [*quick, f"ckpt_path={first}"])
    assert {r["detector"] for r in rows} == {"msp"}
    recorded = {"checkpoint": str((first / "checkpoints" / "last.ckpt").resolve()),
                "relative": os.path.join("..", "first", "checkpoints", "last.ckpt")}
    assert json.loads((second / RESUMED_FILE).read_text()) == recorded
    assert failed_runs([tmp_path]) == {str(first): f"stopped; resumed in {second.resolve()}"}
    # a report over the stopped folder alone does not see the run that resumed it
    assert failed_runs([first]) == {str(first): "SIGTERMException: terminated by SIGTERM; resume with ckpt_path=last"}
    report([str(tmp_path / "runs"), "--no-figures"])
    assert f"resumed job {first}: stopped; resumed in {second.resolve()}\n" in capsys.readouterr().err
    # the folders copied together elsewhere (off a cluster): the record's relative path still pairs them
    copied = tmp_path / "copied"
    shutil.copytree(tmp_path / "runs", copied)
    assert failed_runs([copied]) == {str(copied / "first"): f"stopped; resumed in {(copied / 'second').resolve()}"}
    (second / RESUMED_FILE).unlink()
    run_config(second, [*quick, "ckpt_path=last"])  # its own checkpoint: evaluated again, nothing recorded
    assert not (second / RESUMED_FILE).exists()


def test_a_finished_run_resumed_in_another_folder_counts_once_in_the_report(
    tmp_path: Path, finished: tuple[Path, list[dict]]
) -> None:
    """A run stopped by SIGTERM after its evaluation wrote its results (`FAILED.txt` beside a complete
    `results.jsonl`), then resumed with `ckpt_path=last` into a new folder, as the README resumes: the new run finds
    training done and evaluates the same network again. ood-report counted both folders as two seeds of one
    configuration (std 0.00, "are seed 0 of one configuration"); the resumed folder is now that run's model, counted
    once, as an `ood-eval` of a checkpoint already in the report is."""
    from ood.report.reading import load_rows

    first, second = tmp_path / "runs" / "first", tmp_path / "runs" / "second"
    quick = [*QUICK, "trainer.max_epochs=1"]
    shutil.copytree(finished[0], first)
    trained = finished[1]
    (first / "FAILED.txt").write_text("SIGTERMException: terminated by SIGTERM; resume with ckpt_path=last\n")
    assert run_config(second, [*quick, f"ckpt_path={first}"]) == trained  # the same network, evaluated again
    rows = load_rows([tmp_path / "runs"])
    assert {row["_run"] for row in rows} == {str(first)}
    assert len(rows) == len(trained)


def test_resuming_prints_none_of_lightnings_warnings_about_the_checkpoint_folder(
    tmp_path: Path, finished: tuple[Path, list[dict]], recwarn: pytest.WarningsRecorder
) -> None:
    """A resume as the README does it printed a Lightning warning that reads like a fault: into the run's own folder
    (a sweep rerun into its fixed `hydra.sweep.dir`, `hydra.run.dir=<run>`) "Checkpoint directory ... exists and is
    not empty" (the checkpoint it continues), into a new folder (`ckpt_path=last`) "The dirpath has changed ...
    `best_model_score` ... won't be reloaded" (state that ood's monitor-less `last.ckpt` does not have). A resumed
    fit now leaves both out; a run trained anew over a folder's checkpoint still gets the first."""
    first, second = tmp_path / "first", tmp_path / "second"
    quick = [*QUICK, "trainer.max_epochs=1"]
    shutil.copytree(finished[0], first)
    recwarn.clear()
    run_config(first, [*quick, "ckpt_path=last"])
    run_config(second, [*quick, f"ckpt_path={first}"])
    about_folders = [str(w.message) for w in recwarn if "exists and is not empty" in str(w.message)
                     or "dirpath has changed" in str(w.message)]
    assert about_folders == []
    run_config(first, quick)  # trained anew: its checkpoint is replaced, and Lightning says so
    assert any("exists and is not empty" in str(w.message) for w in recwarn)


def test_ctrl_c_ends_the_run_as_failed(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) in training: Lightning ended the run with `sys.exit(1)`, no FAILED.txt, SIGINT left ignored
    (`ood-report` listed the job as still running or killed). Now it is a KeyboardInterrupt, recorded as SIGTERM is,
    SIGINT's handler back, the epoch-0 checkpoint there to resume."""
    # Python's own handler: a process started in the background (`make test &`) has SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_config(tmp_path, [*RUN, "trainer.max_epochs=2", "+callbacks.kill._target_=killer.KillAt",
                                  "+callbacks.kill.epoch=1", "+callbacks.kill.batch=0",
                                  f"+callbacks.kill.signum={int(signal.SIGINT)}"])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (tmp_path / "FAILED.txt").read_text() == ("KeyboardInterrupt: interrupted (Ctrl-C); resume with "
                                                     "ckpt_path=last\n")
    assert not (tmp_path / "results.jsonl").exists()
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 0


@pytest.mark.slow
def test_sigterm_outside_lightnings_handler_ends_the_run_as_failed(tmp_path: Path) -> None:
    """SIGTERM where Lightning has no handler, or one that a stage's start forgets: as the fit stage sets up (the run
    used to train its whole epoch, then evaluate), between training and evaluation, as a resumed run restores its
    checkpoint (the default handler: the process died at once, without FAILED.txt), and after the evaluation wrote its
    results. Each run ends with status 143 and FAILED.txt, with its last complete checkpoint and no partial results.
    The test's own SIGTERM handler (what the run found installed) must never be called: the run only notes it."""

    def reached(signum: int, frame: object) -> None:
        raise AssertionError("SIGTERM reached the handler the run found installed")

    quick = [*RUN, "trainer.max_epochs=1", "detectors.names=[msp]", f"+callbacks.kill.signum={int(signal.SIGTERM)}",
             "+callbacks.kill._target_=killer.KillAtHook"]
    previous = signal.signal(signal.SIGTERM, reached)
    try:
        for hook, resume in (("setup", False), ("on_fit_end", True), ("on_load_checkpoint", True), ("on_test_end", True)):
            with pytest.raises(SystemExit) as stop:
                run_config(tmp_path, [*quick, f"+callbacks.kill.hook={hook}", *(["ckpt_path=last"] if resume else [])])
            assert stop.value.code == 128 + signal.SIGTERM, hook
            assert (tmp_path / "FAILED.txt").read_text() == "SIGTERMException: terminated by SIGTERM; resume with ckpt_path=last\n"
            last = tmp_path / "checkpoints" / "last.ckpt"
            assert last.exists() == (hook != "setup"), f"{hook}: stopped at the first step, before any checkpoint"
            assert (tmp_path / "results.jsonl").exists() == (hook == "on_test_end"), hook
        assert {row["detector"] for row in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())} == {"msp"}
        assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_resuming_says_from_which_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """"resuming <ckpt>" did not say from which epoch: it now names the epoch whose end saved the checkpoint (read
    from the file before the run is built; the build stopped here)."""
    import ood.train

    cfg = compose_config(tmp_path / "new", [*RUN, f"ckpt_path={tmp_path / 'old'}"])
    ckpt = tmp_path / "old" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"epoch": 1, "hyper_parameters": {"config": flat_config(cfg)}}, ckpt)

    def built(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # no training: the line is written before the build

    monkeypatch.setattr(ood.train, "build", built)
    with caplog.at_level(logging.INFO, logger="ood.train"), pytest.raises(KeyboardInterrupt):
        run(cfg)
    assert f"resuming {ckpt} from the end of epoch 1 (counted from 0, as the progress bar and the CSV log count)" in \
        caplog.messages


def test_resume_with_other_max_epochs_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"hyper_parameters": {"config": {"trainer.max_epochs": 3}}}, ckpt)
    with pytest.raises(ConfigError, match=r"trained for trainer.max_epochs=3; resuming with trainer.max_epochs=5"):
        run(compose_config(tmp_path / "new", [*FAST, "trainer.max_epochs=5", f"ckpt_path={tmp_path}"]))


def test_resume_of_a_checkpoint_predating_a_key_names_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint of an older version lacks a key added since (cluster's `method.base_temperature`): the resume is
    not refused, but a warning names the key and the value the resumed epochs run with."""
    ckpt = tmp_path / "old" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    cluster = [*FAST, "method=cluster", "method.objective=supcon", "trainer.max_epochs=5"]
    stored = flat_config(compose_config(tmp_path / "old", cluster))
    del stored["method.base_temperature"]
    torch.save({"hyper_parameters": {"config": stored}}, ckpt)
    with caplog.at_level(logging.WARNING, logger="ood.runs.checks"):
        check_run(compose_config(tmp_path / "new", [*cluster, f"ckpt_path={ckpt}"]), str(ckpt))
    assert caplog.messages == [f"checkpoint {ckpt} predates method.base_temperature=0.07: the resumed epochs run with "
                               "these values, the earlier ones did without them"]


def test_resume_with_best_val_acc_of_a_run_trained_with_last_is_refused_at_once(tmp_path: Path,
                                                                               caplog: pytest.LogCaptureFixture) -> None:
    """A run trained with `evaluation.weights=last` (the default, which identities leave out) resumed with
    `best_val_acc`: warned that the checkpoint "predates" the key, then refused at the fit's start; now refused before
    anything is built, with no warning. Evaluation-only keys at their default (`evaluation.feature_dtype`) are not
    called new keys either: the resumed training does not read them."""
    ckpt = tmp_path / "old" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"hyper_parameters": {"config": flat_config(compose_config(tmp_path / "old", FAST))}}, ckpt)
    with caplog.at_level(logging.WARNING, logger="ood.runs.checks"), pytest.raises(
            ConfigError, match=r"was trained with evaluation.weights=last, so its epochs' ID-val accuracy is not known"):
        check_run(compose_config(tmp_path / "new", [*FAST, "evaluation.weights=best_val_acc", f"ckpt_path={ckpt}"]), str(ckpt))
    assert caplog.messages == []
    with caplog.at_level(logging.WARNING, logger="ood.runs.checks"):
        check_run(compose_config(tmp_path / "new2", [*FAST, "evaluation.feature_dtype=float16", f"ckpt_path={ckpt}"]), str(ckpt))
    assert caplog.messages == []


def test_resume_with_another_configuration_is_refused(tmp_path: Path) -> None:
    """Lightning restores the checkpoint's weights, optimizer and schedule: a changed seed, learning rate, method or
    preprocessing would leave a run that follows neither configuration, so resuming with them is refused before
    anything runs, naming each change (not claiming a preprocessing key would go unused). Folders (`hydra.run.dir`,
    `data_dir`) and loader plumbing may differ."""
    ckpt = tmp_path / "old" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    stored = flat_config(compose_config(tmp_path / "old", [*FAST, "paths.data_dir=/elsewhere"]))
    torch.save({"hyper_parameters": {"config": stored}}, ckpt)
    with pytest.raises(ConfigError, match=r"trained with seed=0 \(now 3\), method.optimizer.lr=0.05 \(now 0.01\): resuming "
                                          r"keeps its weights, optimizer and schedule"):
        run(compose_config(tmp_path / "new", [*FAST, "seed=3", "method.optimizer.lr=0.01", f"ckpt_path={ckpt}"]))
    with pytest.raises(ConfigError, match=r"trained with method._target_=ood.methods.CrossEntropy \(now ood.methods.logitnorm.LogitNorm\), "):
        run(compose_config(tmp_path / "new2", [*FAST, "method=logitnorm", f"ckpt_path={ckpt}"]))
    with pytest.raises(ConfigError) as refused:
        run(compose_config(tmp_path / "new4", [*FAST, "data.benchmark.image_size=12", f"ckpt_path={ckpt}"]))
    assert str(refused.value) == (
        f"checkpoint {ckpt} was trained with data.benchmark.image_size=16 (now 12): resuming keeps its weights, optimizer "
        "and schedule, so the finished run would follow neither configuration yet be recorded as the new one. Resume "
        "with the checkpoint's settings (data.benchmark.image_size=16), or start a new run from its weights: "
        f"method.init.ckpt={ckpt} without ckpt_path (another hydra.run.dir)")
    assert not (tmp_path / "new" / "results.jsonl").exists()
    check_run(compose_config(tmp_path / "new3", [*FAST, "data.num_workers=0", f"ckpt_path={ckpt}"]), str(ckpt))


def test_a_refused_resume_names_the_checkpoints_settings_and_how_to_start_from_its_weights(tmp_path: Path) -> None:
    """A resume refused for a changed setting said "Resume with the checkpoint's settings" without naming them past
    the fourth, nor how to keep the weights in a new run: it lists every differing key at the checkpoint's value, as
    overrides to type (the run's method= option for another method; in words when the checkpoint names none), and
    `method.init.ckpt=<checkpoint>`."""
    from ood.runs.identity import RunIdentity, write_identity

    run_dir = tmp_path / "old"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    stored = flat_config(compose_config(run_dir, [*FAST, "data.benchmark.image_size=12"]))
    torch.save({"hyper_parameters": {"config": stored}}, ckpt)
    changes = ["seed=3", "method.optimizer.lr=0.01", "method.optimizer.momentum=0.5", "method.optimizer.weight_decay=0",
               "data.benchmark.image_size=16"]
    with pytest.raises(ConfigError, match=r" and 1 more: .* Resume with the checkpoint's settings \(seed=0 "
                                          r"data.benchmark.image_size=12 method.optimizer.lr=0.05 "
                                          r"method.optimizer.momentum=0.9 method.optimizer.weight_decay=0.0005\), or "
                                          rf"start a new run from its weights: method.init.ckpt={ckpt} without "
                                          r"ckpt_path \(another hydra.run.dir\)$"):
        check_run(compose_config(tmp_path / "new", [*FAST, *changes]), str(ckpt))
    with pytest.raises(ConfigError, match=r"settings \(the method= it was trained with, method.optimizer.lr=0.05\)"):
        check_run(compose_config(tmp_path / "new", [*FAST, "data.benchmark.image_size=12", "method=logitnorm"]), str(ckpt))
    write_identity(run_dir, RunIdentity({}, str(ckpt), names=["ce", "digits", "small_cnn"]))
    with pytest.raises(ConfigError, match=r"settings \(method=ce method.optimizer.lr=0.05\)"):
        check_run(compose_config(tmp_path / "new", [*FAST, "data.benchmark.image_size=12", "method=logitnorm"]), str(ckpt))


@pytest.mark.parametrize("epochs", [0, -1])
def test_max_epochs_below_one_is_refused(tmp_path: Path, epochs: int) -> None:
    with pytest.raises(ConfigError, match=rf"trainer.max_epochs={epochs}: must be >= 1"):
        run(compose_config(tmp_path, [*FAST, f"trainer.max_epochs={epochs}"]))
    assert "ConfigError: trainer.max_epochs" in (tmp_path / "FAILED.txt").read_text()


def test_failed_txt_holds_the_one_line_error_of_a_worker_not_its_traceback(tmp_path: Path) -> None:
    """A DataLoader worker's unreadable image arrives as a `BadImageError` whose text is the worker's traceback: the
    console showed its last line, `FAILED.txt` held all of it (ood-report printed it flattened into one long line)."""
    from ood.data.hygiene import BadImageError

    with pytest.raises(BadImageError):
        run(compose_config(tmp_path, [*FAST, "+callbacks.boom._target_=killer.RaiseAsWorker"]))
    assert (tmp_path / "FAILED.txt").read_text() == "BadImageError: a.png: cannot read\n"


def _two_runs(runs: Path) -> tuple[Path, Path]:
    """The last.ckpt of an older run `a` and a newer run `b` under `runs`."""
    old, new = runs / "a" / "checkpoints" / "last.ckpt", runs / "b" / "checkpoints" / "last.ckpt"
    for i, path in enumerate((old, new)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
    return old, new


def test_ckpt_path_forms(tmp_path: Path) -> None:
    runs = tmp_path / "logs" / "train" / "runs"
    old, new = _two_runs(runs)
    here = tmp_path / "here"
    assert resolve_ckpt_path("last", here, runs) == str(new), "the newest run when this folder has none"
    assert resolve_ckpt_path(str(runs / "a"), here, runs) == str(old), "a run folder means its last.ckpt"
    assert resolve_ckpt_path(str(old), here, runs) == str(old)
    with pytest.raises(CheckpointError, match="is a folder without checkpoints/last.ckpt"):
        resolve_ckpt_path(str(tmp_path), here, runs)
    # a sweep's folder (`ood-eval ckpt_path=<multirun>`) was told to "pass ckpt_path=<run folder>"; it names its jobs
    with pytest.raises(CheckpointError, match=rf"^{runs} is a folder without checkpoints/last.ckpt: it holds 2 run "
                                              rf"folder\(s\) with one: pass one, e.g. ckpt_path={runs / 'a'}$"):
        resolve_ckpt_path(str(runs), here, runs)
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.ckpt"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), here, runs)
    with pytest.raises(CheckpointError, match="ckpt_path=last: no checkpoints/last.ckpt"):
        resolve_ckpt_path("last", here, tmp_path / "empty")
    assert resolve_ckpt_path("last", here, runs, own_only=True) is None, "a sweep's job: its own checkpoint or none"


def test_a_folder_that_resumed_a_finished_run_names_that_runs_checkpoint(tmp_path: Path) -> None:
    """A finished run resumed with `ckpt_path=last` into a new folder trains no epoch and saves no checkpoint there:
    `ood-eval ckpt_path=<that folder>` was told to "pass ckpt_path=<run folder> or the .ckpt file", of a run folder.
    It now names the checkpoint the folder resumed (its `resumed.json`)."""
    from ood.runs.failures import record_resumed

    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    second = tmp_path / "second"
    second.mkdir()
    record_resumed(second, ckpt)
    with pytest.raises(CheckpointError) as err:
        resolve_ckpt_path(str(second), tmp_path / "here", tmp_path)
    assert str(err.value) == (f"{second} has no checkpoints/last.ckpt: it resumed {ckpt.resolve()} and saved no "
                              "checkpoint of its own (training was done, or it stopped before its first epoch ended): "
                              f"pass ckpt_path={ckpt.resolve()}")


def test_a_folder_trained_anew_forgets_the_checkpoint_it_once_resumed(tmp_path: Path) -> None:
    """A folder that once resumed another run's checkpoint (`resumed.json`) and is then trained from scratch in a new
    attempt (`hydra.run.dir=<it>` without `ckpt_path`) kept that record: `ood-eval ckpt_path=<it>` was told to pass
    the other run's checkpoint, and `ood-report` took its new model for that run's (a seed dropped as a
    re-evaluation). Training anew removes the record; resuming its own checkpoint keeps it (the model descends)."""
    from ood.runs.failures import RESUMED_FILE, record_resumed, resumed_checkpoint

    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    second = tmp_path / "second"
    (second / "checkpoints").mkdir(parents=True)
    record_resumed(second, ckpt)
    record_resumed(second, second / "checkpoints" / "last.ckpt")  # its own: the record stays
    assert resumed_checkpoint(second) == ckpt.resolve()
    record_resumed(second, None)  # trained from scratch
    assert not (second / RESUMED_FILE).exists() and resumed_checkpoint(second) is None
    with pytest.raises(CheckpointError, match=rf"^{second} is a folder without checkpoints/last.ckpt"):
        resolve_ckpt_path(str(second), tmp_path / "here", tmp_path)
    record_resumed(second, None)  # none to remove: no error


def test_ckpt_path_last_in_a_folder_whose_run_resumed_another_resumes_that_checkpoint(tmp_path: Path) -> None:
    """trainer=ddp's ranks 1.. rerun the command once rank 0 wrote this attempt's config.yaml and resumed.json: with
    `ckpt_path=last` into a new folder rank 0 resumed the newest run's checkpoint, rank 1 found a folder of ours
    (`own_only`) without one and trained from scratch beside it (its own epochs, optimizer and schedule; it failed in
    a collective once rank 0 was done: FAILED.txt beside the finished run). The checkpoint the folder's run resumed is
    its to resume (also for a rerun in place of an attempt that died before its first checkpoint)."""
    from ood.runs.failures import record_resumed

    runs = tmp_path / "runs"
    old, new = _two_runs(runs)
    here = runs / "here"
    here.mkdir()
    record_resumed(here, old)  # not the newest: the one this folder's run resumed
    assert resolve_ckpt_path("last", here, runs, own_only=True) == str(old.resolve())
    old.unlink()  # gone since: nothing of this run's to resume
    assert resolve_ckpt_path("last", here, runs, own_only=True) is None


def test_ckpt_path_last_in_a_new_sweep_folder_says_how_to_resume_the_stopped_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`ood-train -m ... ckpt_path=last` without `hydra.sweep.dir` makes a new timestamped sweep folder, and every job
    trained from scratch with only an INFO line ("no checkpoint in <job> yet"): a stopped sweep's finished epochs were
    lost without a word on what to add. A job whose sweep folder holds no job's checkpoint now warns, naming
    `hydra.sweep.dir=`; a job of a sweep rerun into its folder that had not started stays an INFO line."""
    capture_warnings_of("ood.runs.checkpoints", monkeypatch, caplog)
    runs = tmp_path / "runs"
    new = tmp_path / "multiruns" / "new"
    assert resolve_ckpt_path("last", new / "0", runs, own_only=True, sweep_dir=new) is None
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [f"ckpt_path=last: the sweep folder {new} holds no checkpoint, so this job starts from scratch; a "
                      "stopped sweep resumes only rerun into its own folder: add hydra.sweep.dir=<its folder>"]
    caplog.clear()
    stopped = tmp_path / "multiruns" / "stopped"
    (stopped / "0" / "checkpoints").mkdir(parents=True)
    (stopped / "0" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("last", stopped / "1", runs, own_only=True, sweep_dir=stopped) is None  # never started
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # job folders deeper than one level (hydra.sweep.subdir=${seed}/${hydra.job.num}): the sweep folder is
    # hydra.sweep.dir, not the job folder's parent, which was taken for a new sweep
    nested = tmp_path / "multiruns" / "nested"
    (nested / "s0" / "0" / "checkpoints").mkdir(parents=True)
    (nested / "s0" / "0" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("last", nested / "s1" / "1", runs, own_only=True, sweep_dir=nested) is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_sigterm_line_of_a_sweeps_job_names_the_sweep_folder(tmp_path: Path) -> None:
    """A job of a sweep stopped by SIGTERM is told to resume with `hydra.sweep.dir=<the sweep folder>`: that is
    `hydra.sweep.dir`, not the job folder's parent, which differs with `hydra.sweep.subdir=a/b`."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    from ood.train import _stopped_line

    sweep, job = tmp_path / "sweep", tmp_path / "sweep" / "seed0" / "0"
    cfg = compose_config(job, ["hydra.sweep.subdir=seed${seed}/${hydra.job.num}", f"hydra.sweep.dir={sweep}"])
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig().set_config(cfg)
    try:
        # stopped in its first epoch: it has no checkpoint to keep (the line claimed one); `ckpt_path=last` starts it
        # again, or goes on from the checkpoint it resumed (`resumed.json`)
        resume = f"with the same command plus ckpt_path=last hydra.sweep.dir={sweep}"
        assert _stopped_line(cfg, job) == f"stopped by SIGTERM: {job} has no checkpoint yet (stopped in its first epoch); start it again there {resume}"
        job.mkdir(parents=True, exist_ok=True)
        (job / "resumed.json").write_text("{}")
        assert _stopped_line(cfg, job) == (f"stopped by SIGTERM: {job} saved no checkpoint of its own yet (stopped in the "
                                           f"first epoch it ran); resume the one it started from {resume}")
        (job / "checkpoints").mkdir()
        (job / "checkpoints" / "last.ckpt").write_bytes(b"")
        assert _stopped_line(cfg, job) == f"stopped by SIGTERM: {job} keeps its last completed epoch's checkpoint; resume it {resume}"
    finally:
        HydraConfig.instance().cfg = None  # no later test of this process takes itself for a multirun's job


def test_a_job_of_a_sweep_whose_folder_the_command_names_is_not_told_to_name_it(tmp_path: Path) -> None:
    """`make reproduce-<paper> RESUME=1` names every stage's `hydra.sweep.dir` and adds ckpt_path=last: a stage with no
    checkpoint yet (a fresh R=, a stage not run before) warned every job "add hydra.sweep.dir=<its folder>", which the
    command names already. The warning is for a sweep into Hydra's dated default folder alone."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    from ood.train import _unnamed_sweep_dir

    sweep = tmp_path / "sweep"
    for named in (True, False):
        cfg = compose_config(tmp_path / "job", [f"hydra.sweep.dir={sweep}"] if named else [])
        OmegaConf.set_readonly(cfg.hydra, False)
        with open_dict(cfg):
            cfg.hydra.mode = RunMode.MULTIRUN
            cfg.hydra.sweep.dir = str(sweep)
        HydraConfig().set_config(cfg)
        try:
            assert _unnamed_sweep_dir() == (None if named else sweep)
        finally:
            HydraConfig.instance().cfg = None  # no later test of this process takes itself for a multirun's job


def test_a_requeued_job_of_a_sweep_without_checkpoints_is_not_told_to_add_hydra_sweep_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A job that `hydra/launcher=slurm` requeued (`ckpt_path=last` added) before any job of its sweep saved a
    checkpoint was warned that its sweep folder is a new one and told to add `hydra.sweep.dir=<its folder>`: it is in
    its folder already. A job folder with an earlier attempt (its `config.yaml`) gets the INFO line only."""
    capture_warnings_of("ood.runs.checkpoints", monkeypatch, caplog)
    job = tmp_path / "multiruns" / "stopped" / "0"
    job.mkdir(parents=True)
    (job / "config.yaml").write_text("seed: 0\n")  # what the first attempt left
    with caplog.at_level(logging.INFO, logger="ood.runs.checkpoints"):
        assert resolve_ckpt_path("last", job, tmp_path / "runs", own_only=True, sweep_dir=job.parent) is None
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, f"ckpt_path=last: no checkpoint in {job} yet, training starts from scratch")]


@pytest.mark.parametrize(("left", "text"), [
    ("config.yaml", "seed: 0\n"),
    # stopped (SIGTERM, Ctrl-C) before its config.yaml landed, e.g. as it started: its stopped line says to rerun it
    # with ckpt_path=last, which took the newest other run's checkpoint
    ("FAILED.txt", "SIGTERMException: terminated by SIGTERM; resume with ckpt_path=last\n"),
], ids=["config", "failed-before-config"])
def test_rerun_into_a_folder_without_a_checkpoint_starts_from_scratch(tmp_path: Path, left: str, text: str) -> None:
    """A run (or a sweep's job) killed before its first checkpoint, rerun into its folder with `ckpt_path=last`,
    trains from scratch: it used to resume the newest run under logs/train/runs (another run's training, or a
    refusal naming that run's settings). Here that newest run's checkpoint is unreadable, so taking it would fail."""
    other = tmp_path / "logs" / "train" / "runs" / "other" / "checkpoints" / "last.ckpt"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"not a checkpoint")
    here = tmp_path / "here"
    here.mkdir()
    (here / left).write_text(text)  # what the killed attempt left
    quick = [*RUN, "trainer.max_epochs=1", "detectors.names=[msp]", f"paths.log_dir={tmp_path / 'logs'}"]
    assert {r["detector"] for r in run_config(here, [*quick, "ckpt_path=last"])} == {"msp"}
    assert torch.load(here / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 0


def test_gpu_rng_state_is_carried_once_cuda_is_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpointed RNG states include the current GPU's when the run has initialised CUDA (stand-ins: no GPU
    here), and restoring sets it back; a CPU run's states have none."""
    from ood.runs import checkpoints

    assert "cuda" not in checkpoints._rng_state()
    restored: list[torch.Tensor] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7, 8], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    state = checkpoints._rng_state()
    checkpoints._set_rng_state(state)
    assert state["cuda"].tolist() == [7, 8] and [t.tolist() for t in restored] == [[7, 8]]


@pytest.mark.parametrize("method", ["oal", "heatmap"])
def test_checkpoint_hyperparameters_load_weights_only(tmp_path: Path, method: str) -> None:
    """Lightning resumes with `torch.load(weights_only=True)`: a method whose hyper-parameters hold a `_partial_: true`
    factory (OAL's teacher backbone, heatmap's classifier optimizer) wrote checkpoints that `ckpt_path=last` refused
    (UnpicklingError); they are stored as builtins, the factory as its `_target_` and keywords."""
    from ood.runs.checkpoints import RunState
    from ood.train import build

    cfg = compose_config(tmp_path, [*FAST, f"method={method}", "logger=none"])
    module = build(cfg)[0]
    checkpoint = {"hyper_parameters": dict(module.hparams)}
    RunState({"seed": 0}).on_save_checkpoint(None, module, checkpoint)  # type: ignore[arg-type]
    torch.save(checkpoint, tmp_path / "last.ckpt")
    hparams = torch.load(tmp_path / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["config"] == {"seed": 0}
    if method == "oal":
        assert hparams["teacher"]["backbone"] == {"_target_": "ood.models.small_cnn.SmallCNN", "width": 64, "feature_dim": 128}
    else:
        assert hparams["classifier_optimizer"] == {"_target_": "torch.optim.sgd.SGD", "lr": 0.05, "momentum": 0.9,
                                                   "weight_decay": 5.0e-4, "nesterov": True}


def test_a_noted_sigterm_is_forgotten_when_the_run_fails_otherwise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM noted, then a run failing for another reason: the note was kept, so the process's next run (the
    Python API, a notebook, pytest) stopped at once as terminated."""
    from ood import termination

    monkeypatch.setattr(termination, "_received", True)
    with pytest.raises(ConfigError, match="evaluation without training needs a checkpoint"):
        run(compose_config(tmp_path, [], config_name="eval"))
    assert not termination.sigterm_received()
