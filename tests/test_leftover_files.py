"""What a process killed while it writes leaves behind, and writes that survive a power loss: a killed writer's
temporary file (`ood.files.atomic_write`, the in-memory pipeline's decoded-image cache) is removed by the next write
to the same target, never a live writer's (an older version's, whose name lacks the host, is named, not removed);
every atomic write flushes its file before the rename and the folder after it; `ood-report` names an empty or
cut-short `results.jsonl` instead of reading it as a run without rows."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import signal
import stat
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ood import files
from ood.data import memory as mem
from ood.errors import ConfigError
from ood.runs.identity import RunIdentity, write_identity

FORK = multiprocessing.get_context("fork")


def _killed_in(target: Callable[[], None]) -> None:
    """Run `target` in a forked child that SIGKILLs itself inside it (no `finally`, as the OOM killer does)."""
    child = FORK.Process(target=target)
    child.start()
    child.join(20)
    assert child.exitcode == -signal.SIGKILL, "the child was to be killed mid-write"


def _die_after_writing(tmp: Path) -> None:
    tmp.write_text('{"method": "half a row')
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_writers_temporary_goes_at_the_next_write_a_live_ones_stays(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`.results.jsonl.tmp<pid>` of a SIGKILLed writer stayed forever beside the results; the next write removes it,
    saying so, and keeps the temporary of a writer still running (here a live child blocked mid-write)."""
    target = tmp_path / "results.jsonl"
    ready, release = FORK.Event(), FORK.Event()

    def blocked(tmp: Path) -> None:
        tmp.write_text("live")
        ready.set()
        release.wait(20)

    live = FORK.Process(target=lambda: files.atomic_write(target, blocked))
    live.start()
    try:
        assert ready.wait(20)
        [live_tmp] = list(tmp_path.iterdir())
        _killed_in(lambda: files.atomic_write(target, _die_after_writing))
        [dead] = [p for p in tmp_path.iterdir() if p != live_tmp]
        with caplog.at_level(logging.INFO, logger="ood.files"):
            files.atomic_write_text(target, "row\n")
        assert sorted(tmp_path.iterdir()) == sorted([target, live_tmp])
        assert target.read_text() == "row\n" and live_tmp.read_text() == "live"
        assert [r.getMessage() for r in caplog.records] == [
            f"removed {dead}, left by process {dead.name.split('.')[-2]} killed while it wrote {target}"]
    finally:
        release.set()
        live.join(20)
    assert live.exitcode == 0 and target.read_text() == "live"


def test_a_killed_image_cache_writers_temporary_goes_at_the_next_build(tmp_path: Path) -> None:
    """The decoded-image cache (`in_memory`), killed while it wrote its `.npy`, left `.<cache>.<pid>.tmp` (gigabytes
    for a large set) that no later run removed; the next build of that cache removes it."""
    images = [(np.full((2, 2, 3), i, dtype=np.uint8), i) for i in range(3)]
    cache = tmp_path / "set.npy"
    save = np.save

    def dying(file: object, array: np.ndarray) -> None:
        if array.ndim == 4:  # the images, after the labels
            save(file, array[:1])
            os.kill(os.getpid(), signal.SIGKILL)
        save(file, array)

    def build_killed() -> None:
        mem.np.save = dying  # in the child only, which dies in it
        mem.load_or_build(images, cache, "set")

    _killed_in(build_killed)
    assert len([p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]) == 1
    built, labels = mem.load_or_build(images, cache, "set")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.labels.npy", "set.npy"]
    assert built[:, 0, 0, 0].tolist() == [0, 1, 2] and labels.tolist() == [0, 1, 2]


def _record_syncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """`os.fsync` and `os.replace` recorded in order, as ("fsync", path) / ("replace", source)."""
    calls: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recorded_replace(src: str | Path, dst: str | Path) -> None:
        calls.append(("replace", str(src)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    return calls


def test_a_writer_killed_in_a_methods_diagnostics_leaves_no_half_file(tmp_path: Path) -> None:
    """`<method>_stats.json` and the diagnostic `<key>.png` images were written in place: a run SIGKILLed while it
    wrote them left half a JSON or PNG under their names. Each is written atomically now: killed in the image, or in
    the stats (the image done), the writer leaves no file of that name, and the next write replaces its temporary
    with the whole file."""
    import io

    import matplotlib.image
    import torch

    from ood.evaluation import sinks
    from ood.evaluation.evaluator import EvaluationResult

    row = {"method": "cluster", "detector": "msp", "ood_dataset": "noise", "ood_group": "far", "auroc": 0.75}
    result = EvaluationResult([row], {"msp": {"test": torch.tensor([1.0])}}, 0.5, "cluster",
                              {"gs": [0.5, 0.25], "map": np.full((4, 4, 3), 0.5)})
    context = SimpleNamespace(is_global_zero=True)  # a SinkContext's only field ResultsWriter reads
    write_text, imsave = Path.write_text, matplotlib.image.imsave

    def writes(name: str) -> list[str]:
        return sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(name))

    def killed_in_the_stats() -> None:
        def half(path: Path, text: str, *args: object, **kwargs: object) -> int:
            if "_stats.json" not in path.name:
                return write_text(path, text, *args, **kwargs)  # type: ignore[arg-type]
            write_text(path, text[: len(text) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
            return 0

        Path.write_text = half  # type: ignore[method-assign] # in the child only, which dies in it
        sinks.ResultsWriter(str(tmp_path), figures=False).write(result, context)  # type: ignore[arg-type]

    def killed_in_the_image() -> None:
        def half(fname: Path, *args: object, **kwargs: object) -> None:
            png = io.BytesIO()
            imsave(png, *args, **kwargs)  # type: ignore[arg-type]
            Path(fname).write_bytes(png.getvalue()[:40])
            os.kill(os.getpid(), signal.SIGKILL)

        matplotlib.image.imsave = half
        sinks.ResultsWriter(str(tmp_path), figures=False).write(result, context)  # type: ignore[arg-type]

    _killed_in(killed_in_the_image)
    assert writes(".png") == [] and writes(".json") == ["validation.json"]
    _killed_in(killed_in_the_stats)
    assert writes(".json") == ["validation.json"] and matplotlib.image.imread(tmp_path / "map.png").shape == (4, 4, 4)
    sinks.ResultsWriter(str(tmp_path), figures=False).write(result, context)  # type: ignore[arg-type]
    assert json.loads((tmp_path / "cluster_stats.json").read_text()) == {"gs": [0.5, 0.25]}
    assert writes(".tmp") == [] and (tmp_path / "results.jsonl").is_file()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an fd's file through /proc")
def test_atomic_writes_flush_the_file_before_the_rename_and_the_folder_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an fsync before the rename a power loss could keep the rename but not the data: a zero-length
    `results.jsonl` that ood-report read as a run without rows."""
    calls = _record_syncs(monkeypatch)
    files.atomic_write_text(tmp_path / "results.jsonl", "row\n")
    [(_, tmp)] = [c for c in calls if c[0] == "replace"]
    assert Path(tmp).parent == tmp_path and calls == [("fsync", tmp), ("replace", tmp), ("fsync", str(tmp_path))]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an fd's file through /proc")
def test_the_checkpoint_is_flushed_before_its_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`last.ckpt` too: a power loss after the rename left a zero-length checkpoint, which resuming cannot read."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ood.runs.checkpoints import AtomicCheckpoint

    monkeypatch.setattr(ModelCheckpoint, "_save_checkpoint", lambda self, trainer, path: Path(path).write_bytes(b"w"))
    calls = _record_syncs(monkeypatch)
    trainer = SimpleNamespace(loggers=[], is_global_zero=True, strategy=SimpleNamespace(barrier=lambda name: None))
    last = tmp_path / "last.ckpt"
    AtomicCheckpoint(dirpath=tmp_path)._save_checkpoint(trainer, str(last))  # type: ignore[arg-type]
    assert calls == [("fsync", f"{last}.tmp"), ("replace", f"{last}.tmp"), ("fsync", str(tmp_path))]
    assert last.read_bytes() == b"w"


def test_a_file_system_that_cannot_flush_folders_still_gets_its_writes(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync of a folder fails with EINVAL on some mounts (VirtualBox shared folders, some FUSE file systems): every
    atomic write raised after its rename, so a run there failed at its first result (and at its FAILED.txt). There
    the write stands; a real error while flushing the data (EIO) still fails it, before the rename."""
    fsync = os.fsync

    def no_folder_sync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", no_folder_sync)
    files.atomic_write_text(tmp_path / "results.jsonl", "row\n")
    assert [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]
    assert (tmp_path / "results.jsonl").read_text() == "row\n"

    def failing_disk(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_disk)
    with pytest.raises(OSError, match="Input/output error"):
        files.atomic_write_text(tmp_path / "scores.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]


def test_report_names_an_empty_or_cut_short_results_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A zero-length `results.jsonl` (a power loss after the rename) was read silently as a run without rows, and
    one cut short mid-line failed the whole report; each is now one line naming the file, the run listed as without
    results, and the other runs reported."""
    from ood.report.command import main

    row = {"method": "msp", "detector": "msp", "backbone": "small_cnn", "id_dataset": "digits", "ood_dataset": "s",
           "ood_group": "near", "seed": 0, "auroc": 0.75, "fpr95": 0.5}
    for name, text in (("good", json.dumps(row) + "\n"), ("empty", ""), ("cut", json.dumps(row) + '\n{"method": "m')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text(text)
    main([str(tmp_path), "--no-figures", "--no-reference"])
    out, err = capsys.readouterr()
    assert "| 75.00 | 50.00 |" in out and f"`{tmp_path / 'cut'}`" in out and f"`{tmp_path / 'empty'}`" in out
    assert [line for line in err.splitlines() if line.startswith("job without results")] == [
        f"job without results {tmp_path / 'cut'}: no results: {tmp_path / 'cut' / 'results.jsonl'} is cut short "
        "(its last line is unfinished: a crash while it was written?); rerun its evaluation",
        f"job without results {tmp_path / 'empty'}: no results: {tmp_path / 'empty' / 'results.jsonl'} is empty "
        "(a run that scored nothing, or a file lost in a crash: rerun its evaluation)",
    ]
    # a failed attempt's error is named beside the unreadable file it left (only the file was named)
    (tmp_path / "empty" / "FAILED.txt").write_text("RuntimeError: boom\n")
    main([str(tmp_path), "--no-figures", "--no-reference"])
    err = capsys.readouterr().err
    assert f"failed job {tmp_path / 'empty'}: RuntimeError: boom; no results: {tmp_path / 'empty' / 'results.jsonl'} is empty" in err


def test_a_results_file_saved_without_its_last_newline_is_read(tmp_path: Path) -> None:
    """A `results.jsonl` edited by hand and saved without the final newline (its last row complete) was taken for one
    cut short: the run's rows were left out of the report and the run listed as without results."""
    from ood.report.reading import failed_runs, load_rows

    rows = [{"method": "msp", "detector": "msp", "backbone": "small_cnn", "id_dataset": "digits", "ood_dataset": name,
             "ood_group": "near", "seed": 0, "auroc": auroc, "fpr95": 0.5} for name, auroc in (("s", 0.75), ("t", 0.5))]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.jsonl").write_text("\n".join(map(json.dumps, rows)))
    assert [row["auroc"] for row in load_rows([tmp_path])] == [0.75, 0.5]
    assert failed_runs([tmp_path]) == {}


def test_a_rerun_of_a_finished_job_keeps_its_results_until_they_are_replaced(tmp_path: Path) -> None:
    """A sweep rerun with `ckpt_path=last` deleted the finished job's results.jsonl as it started: killed while it
    re-evaluated, the job had none. They now stay until the new ones replace them; they still go as the attempt
    starts in a folder without identity.json, once its identity is another configuration's or model's, or when it
    fails (the report would read them as the failed attempt's)."""
    from ood.runs.failures import clear_failure, record_failure
    from ood.runs.identity import RunIdentity, write_identity

    ident = RunIdentity({"method.name": "msp"}, str(tmp_path / "checkpoints" / "last.ckpt"), [], ["msp", "d", "b"])
    other = RunIdentity({"method.name": "energy"}, ident.model, [], ["energy", "d", "b"])

    def earlier(identity: RunIdentity | None) -> None:
        for name in ("results.jsonl", "scores.npz", "FAILED.txt", "identity.json"):
            (tmp_path / name).unlink(missing_ok=True)
        (tmp_path / "results.jsonl").write_text("row\n")
        (tmp_path / "scores.npz").write_bytes(b"scores")
        if identity:
            write_identity(tmp_path, identity)

    earlier(ident)
    clear_failure(tmp_path)  # the rerun starts ...
    write_identity(tmp_path, ident)  # ... as the same configuration and model, and is killed
    assert (tmp_path / "results.jsonl").read_text() == "row\n" and (tmp_path / "scores.npz").is_file()
    clear_failure(tmp_path)
    write_identity(tmp_path, other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.json"]
    earlier(ident)
    record_failure(tmp_path, RuntimeError("boom"), clear_failure(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FAILED.txt", "identity.json"]
    # results this attempt wrote (the evaluation finished, then SIGTERM came) stay, complete
    earlier(ident)
    started = clear_failure(tmp_path)
    files.atomic_write_text(tmp_path / "results.jsonl", "new row\n")
    record_failure(tmp_path, RuntimeError("SIGTERM after the results"), started)
    assert (tmp_path / "results.jsonl").read_text() == "new row\n" and not (tmp_path / "scores.npz").exists()
    earlier(None)
    clear_failure(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_earlier_results_another_rank_removed_first_are_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun every rank runs the job and records its failure, removing the earlier attempt's results at the
    same time: a rank that saw `results.jsonl` just before another removed it raised FileNotFoundError, in place of
    the run's own error and without writing FAILED.txt. Here the other rank removes it right after this one looks."""
    from ood.runs.failures import clear_failure, record_failure

    (tmp_path / "identity.json").write_text("{}")
    (tmp_path / "results.jsonl").write_text("row\n")
    started = clear_failure(tmp_path)
    path_stat = Path.stat

    def looked_at_then_removed(self: Path, **kwargs: bool) -> os.stat_result:
        found = path_stat(self, **kwargs)
        if self.name == "results.jsonl":
            os.unlink(self)
        return found

    monkeypatch.setattr(Path, "stat", looked_at_then_removed)
    record_failure(tmp_path, RuntimeError("boom"), started)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FAILED.txt", "identity.json"]
    assert (tmp_path / "FAILED.txt").read_text() == "RuntimeError: boom\n"


def test_a_job_trained_anew_in_its_folder_drops_the_earlier_models_results(tmp_path: Path) -> None:
    """A finished job run again without `ckpt_path=last` (a sweep rerun into its fixed `hydra.sweep.dir`) trains a new
    model in the same folder, under the same identity (its model is the folder's own last.ckpt): the earlier model's
    results stayed, read as the new model's by ood-report (here it trains with evaluate=false; the same when killed
    in training). Results of a resumed job stay until replaced (test above)."""
    from helpers import run_config

    quick = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_test_batches=1",
             "trainer.enable_progress_bar=false", "detectors.names=[msp]", "logger=none", "evaluation.sinks.results.figures=false"]
    run_config(tmp_path, quick)
    assert (tmp_path / "results.jsonl").is_file() and (tmp_path / "scores.npz").is_file()
    run_config(tmp_path, [*quick, "evaluate=false"])
    assert not (tmp_path / "results.jsonl").exists() and not (tmp_path / "scores.npz").exists()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_a_rerun_with_other_evaluation_settings_killed_in_its_evaluation_leaves_no_earlier_results(
        tmp_path: Path) -> None:
    """A rerun of a finished job with other detectors, SIGKILLed while it evaluated, left the earlier results.jsonl
    (msp rows) beside its new config.yaml (energy): `ood-report` read them as made with the new settings. They now go
    before the new config.yaml lands."""
    import torch
    from helpers import run_config

    from ood.evaluation.evaluator import Evaluator

    quick = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_test_batches=1",
             "trainer.enable_progress_bar=false", "logger=none", "evaluation.sinks.results.figures=false"]
    run_config(tmp_path, [*quick, "detectors.names=[msp]"])
    assert {json.loads(line)["detector"] for line in (tmp_path / "results.jsonl").read_text().splitlines()} == {"msp"}

    def rerun_killed() -> None:
        torch.set_num_threads(1)  # the parent's OpenMP pool is not the child's
        Evaluator.evaluate = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)  # type: ignore[method-assign]
        run_config(tmp_path, [*quick, "detectors.names=[energy]", "ckpt_path=last"])

    _killed_in(rerun_killed)
    assert "- energy" in (tmp_path / "config.yaml").read_text()
    assert [name for name in ("results.jsonl", "scores.npz", "samples.csv", "validation.json")
            if (tmp_path / name).exists()] == []


def test_results_stay_beside_a_config_that_differs_only_in_ckpt_path(tmp_path: Path) -> None:
    """A resumed rerun with the same settings (`ckpt_path=last`, the same model by `identity.json`) keeps the results
    until its own replace them, and one with `evaluate=false` keeps them (it writes none: a sweep resumed to finish
    training lost its finished jobs' results); any other key of config.yaml that differs removes them before
    config.yaml lands."""
    first = "seed: 0\nckpt_path: null\nevaluation:\n  detectors: [msp]\n"
    ident = _finished(tmp_path, first)
    write_identity(tmp_path, ident, first.replace("null", "last"))
    assert (tmp_path / "results.jsonl").read_text() == "row\n"
    assert (tmp_path / "config.yaml").read_text() == first.replace("null", "last")
    write_identity(tmp_path, ident, first.replace("null", "last") + "evaluate: false\n")
    assert (tmp_path / "results.jsonl").read_text() == "row\n"  # a resumed attempt that writes no results of its own
    write_identity(tmp_path, ident, first.replace("msp]", "msp, energy]"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "identity.json"]


def test_results_stay_beside_a_config_that_differs_only_in_how_the_run_is_watched(tmp_path: Path) -> None:
    """A finished job resumed (`ckpt_path=last`) with wandb on instead of the CSV log, its tags or run name, no
    logger, another progress bar or logging interval lost its complete results before it re-evaluated, for keys that
    change no number of them (`WATCHING`). A key beside them that does (`trainer.max_epochs`) still removes them."""
    first = ("ckpt_path: null\ntags: []\nrun_name: null\nlogger:\n  csv:\n    name: csv\ntrainer:\n  max_epochs: 1\n"
             "  log_every_n_steps: 5\n  enable_progress_bar: true\n  enable_model_summary: false\n"
             "evaluation:\n  detectors: [msp]\n")
    ident = _finished(tmp_path, first)
    wandb = (first.replace("null", "last", 1).replace("tags: []", "tags: [paper]").replace("run_name: null", "run_name: again")
             .replace("logger:\n", "logger:\n  wandb:\n    project: ood2\n    group: g\n    name: again\n"
                      "    tags: [paper, msp]\n")
             .replace("steps: 5", "steps: 50").replace("bar: true", "bar: false").replace("summary: false", "summary: true"))
    none = wandb.replace("logger:\n  wandb:\n    project: ood2\n    group: g\n    name: again\n    tags: [paper, msp]\n"
                         "  csv:\n    name: csv\n", "logger: {}\n")
    assert "logger: {}" in none
    for rerun in (wandb, none):
        write_identity(tmp_path, ident, rerun)
        assert (tmp_path / "results.jsonl").read_text() == "row\n"
        assert (tmp_path / "config.yaml").read_text() == rerun
    write_identity(tmp_path, ident, none.replace("max_epochs: 1", "max_epochs: 2"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "identity.json"]


def test_an_older_versions_temporaries_are_named_once_and_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Temporaries of versions before the host was in the name (`.results.jsonl.tmp<pid>`, the image cache's
    `.<name>.<pid>.tmp`) were never cleaned, nor named. A dead pid here may be a live writer on another host sharing
    the folder, so they are kept, and named once in a warning with their size; a live writer's here is not named."""
    target = tmp_path / "results.jsonl"
    dead = FORK.Process(target=lambda: None)
    dead.start()
    dead.join(20)
    old, cache = tmp_path / f".results.jsonl.tmp{dead.pid}", tmp_path / f".results.jsonl.{dead.pid}.tmp"
    live = tmp_path / f".results.jsonl.tmp{os.getppid()}"
    for path in (old, cache, live):
        path.write_bytes(os.urandom(2_000_000))
    with caplog.at_level(logging.WARNING, logger="ood.files"):
        files.atomic_write_text(target, "row\n")
        files.atomic_write_text(target, "row\n")
    assert sorted(r.getMessage() for r in caplog.records) == [
        f"{tmp} (2.0 MB) is the temporary file of an older version of ood writing {target} (process {dead.pid}, not "
        f"running on this host): kept, as its name does not say its host (another one sharing the folder may be "
        f"writing it); remove it if no ood process writes {target}" for tmp in sorted([cache, old])]
    assert sorted(tmp_path.iterdir()) == sorted([target, old, cache, live])


def test_results_stay_beside_a_config_that_differs_only_in_the_machines_workers_and_folders(tmp_path: Path) -> None:
    """A finished job requeued (`ckpt_path=last`) on a node with fewer CPUs resolves `data.num_workers:
    ${ood.workers:8}` to another count, and one whose data was staged to the node's own disk another
    `paths.data_dir`: its complete results were removed before it re-evaluated (lost should it be killed again), for
    keys that make no other numbers (the identity leaves them out too). Other detectors still remove them."""
    first = ("ckpt_path: null\npaths:\n  data_dir: /local/job1/data\ndata:\n  num_workers: 8\n  data_dir: "
             "/local/job1/data\ncallbacks:\n  model_checkpoint:\n    dirpath: /local/job1/run/checkpoints\n"
             "evaluation:\n  detectors: [msp]\n")
    ident = _finished(tmp_path, first)
    requeued = first.replace("null", "last").replace("job1", "job2").replace("num_workers: 8", "num_workers: 4")
    write_identity(tmp_path, ident, requeued)
    assert (tmp_path / "results.jsonl").read_text() == "row\n"
    assert (tmp_path / "config.yaml").read_text() == requeued
    write_identity(tmp_path, ident, requeued.replace("msp]", "energy]"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "identity.json"]


def test_an_attempt_refused_before_it_started_keeps_a_finished_runs_results(tmp_path: Path) -> None:
    """A rerun into a finished run's folder refused by its checks (`ckpt_path=last` with another
    `trainer.max_epochs`: one line) removed the finished run's results.jsonl, scores.npz, samples.csv and
    validation.json, and then left FAILED.txt beside them. The folder stays as it was until an attempt writes its
    own config.yaml (an earlier attempt's FAILED.txt too); a failure after that removes them as before, and a new
    folder gets FAILED.txt (ood-report names a sweep's refused job)."""
    from ood.runs.failures import clear_failure, record_failure

    ident = _finished(tmp_path, "method: msp\n")
    (tmp_path / "scores.npz").write_bytes(b"scores")
    record_failure(tmp_path, ConfigError("refused"), clear_failure(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "identity.json", "results.jsonl", "scores.npz"]
    (tmp_path / "FAILED.txt").write_text("SIGTERMException: terminated by SIGTERM\n")  # an earlier attempt's
    record_failure(tmp_path, ConfigError("refused"), clear_failure(tmp_path))
    assert (tmp_path / "FAILED.txt").read_text() == "SIGTERMException: terminated by SIGTERM\n"
    started = clear_failure(tmp_path)
    write_identity(tmp_path, ident, "method: msp\n")  # this attempt passed its checks and wrote its settings
    started.begin()
    record_failure(tmp_path, RuntimeError("boom"), started)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FAILED.txt", "config.yaml", "identity.json"]
    assert (tmp_path / "FAILED.txt").read_text() == "RuntimeError: boom\n"
    (tmp_path / "new").mkdir()
    record_failure(tmp_path / "new", ConfigError("refused"), clear_failure(tmp_path / "new"))
    assert (tmp_path / "new" / "FAILED.txt").read_text() == "ConfigError: refused\n"


def test_a_refused_rerun_of_a_finished_run_is_not_reported_failed(tmp_path: Path) -> None:
    """`ood-train ckpt_path=last trainer.max_epochs=5` into a finished run of `evaluate=false` (trained for 3) is
    refused in one line; it left FAILED.txt there, and ood-report named the finished run a failed job with that
    refusal in place of how to evaluate it. The folder is now as it was."""
    import torch
    from helpers import FAST, compose_config

    from ood.report.reading import failed_runs
    from ood.train import run

    _finished(tmp_path, "evaluate: false\n")
    (tmp_path / "results.jsonl").unlink()  # evaluate=false writes none
    (tmp_path / ".hydra").mkdir()
    (tmp_path / "checkpoints").mkdir()
    torch.save({"hyper_parameters": {"config": {"trainer.max_epochs": 3}}}, tmp_path / "checkpoints" / "last.ckpt")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match="trained for trainer.max_epochs=3; resuming with trainer.max_epochs=5"):
        run(compose_config(tmp_path, [*FAST, "trainer.max_epochs=5", "ckpt_path=last"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert failed_runs([tmp_path]) == {str(tmp_path): "no results: trained with evaluate=false (evaluate it: ood-eval "
                                                      f"ckpt_path={tmp_path}), or still running"}


def test_a_failed_rank_started_after_rank_zero_wrote_the_config_leaves_failed_txt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """trainer=ddp's ranks 1.. start (popen) once rank 0 wrote this attempt's config.yaml, so their `clear_failure`
    stamps it: one failing in training found it unchanged and, taken for an attempt refused before its settings,
    left no FAILED.txt (rank 0, killed by Lightning's child observer, none either): ood-report called the job still
    running. The attempt's own mark (`Started.begin`, set on each rank once its run is built) tells: it records its
    failure. Under torchrun every rank runs the checks: a rank refused there leaves a finished run's folder as it
    was (it wrote FAILED.txt beside the complete results, the report naming the finished run failed)."""
    from ood.runs.failures import clear_failure, record_failure

    _finished(tmp_path, "method: msp\n")  # rank 0's config.yaml of this attempt (and an earlier results.jsonl)
    started = clear_failure(tmp_path)
    started.begin()  # this rank built its run and trained
    record_failure(tmp_path, RuntimeError("CUDA out of memory"), started)
    assert (tmp_path / "FAILED.txt").read_text() == "RuntimeError: CUDA out of memory\n"
    (tmp_path / "FAILED.txt").unlink()
    _finished(tmp_path, "method: msp\n")  # a finished run; a rerun refused on a rank by its checks (torchrun)
    monkeypatch.setattr("lightning_utilities.core.rank_zero.rank_zero_only.rank", 1, raising=False)
    record_failure(tmp_path, RuntimeError("refused"), clear_failure(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "identity.json", "results.jsonl"]


def _finished(folder: Path, config: str) -> RunIdentity:
    """A finished run in `folder`: its identity (one msp model), `config` as its config.yaml, a results.jsonl."""
    ident = RunIdentity({"method.name": "msp"}, str(folder / "checkpoints" / "last.ckpt"), [], ["msp", "d", "b"])
    write_identity(folder, ident, config)
    (folder / "results.jsonl").write_text("row\n")
    return ident
