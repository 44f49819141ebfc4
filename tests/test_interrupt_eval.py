"""Interrupted in the evaluation phase: what a killed evaluation leaves on disk (its memory-mapped banks under
`evaluation.bank_dir`) is cleaned up by the next one, without touching an evaluation still running."""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import compose_config

from ood.evaluation.callback import OODEvaluation
from ood.evaluation.evaluator import Evaluator
from ood.methods.base import OODMethod
from ood.train import build

#: a quick evaluation with memory-mapped banks (digits, an untrained small CNN: the numbers do not matter here)
SPILLING = ["detectors.names=[msp]", "trainer.enable_progress_bar=false", "logger=none", "callbacks=none",
            "data.eval_batch_size=16", "+trainer.limit_test_batches=2", "~evaluation.sinks"]


def test_the_banks_of_a_killed_evaluation_are_removed_by_the_next(tmp_path: Path) -> None:
    """An evaluation SIGKILLed in its pass with its memory-mapped banks in `evaluation.bank_dir` (the out-of-memory
    killer, a scheduler, a dead machine) cannot delete them: the next evaluation there removes that folder. Each
    rerun left one more copy of every bank beside the others (15.6 GB a time for ImageNet's fit split)."""
    banks = tmp_path / "banks"
    model, datamodule, trainer, _ = build(compose_config(tmp_path / "run", [*SPILLING, f"evaluation.bank_dir={banks}"]))
    step = OODMethod.test_step

    def killed() -> None:
        torch.set_num_threads(1)  # the parent's OpenMP pool is not the child's: a second thread hung the forked child

        def dying(self: OODMethod, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
            if batch_idx == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, batch, batch_idx, dataloader_idx)

        OODMethod.test_step = dying  # type: ignore[method-assign] # in the child only, which dies in it
        trainer.test(model, datamodule=datamodule, verbose=False)

    child = multiprocessing.get_context("fork").Process(target=killed)
    child.start()
    child.join(60)
    hung = child.exitcode is None
    if hung:
        child.kill()
        child.join()
    assert not hung, "the forked evaluation hung"
    assert child.exitcode == -signal.SIGKILL, "the evaluation was to be killed in its pass"
    [dead] = banks.glob("banks-*")
    assert (dead / "train" / "features.npy").is_file()  # the fit split, the first one passed

    trainer.test(model, datamodule=datamodule, verbose=False)
    assert list(banks.iterdir()) == []  # the killed evaluation's folder too, not only this one's


def test_only_bank_folders_whose_evaluation_ended_are_removed(tmp_path: Path) -> None:
    """A folder whose lock an evaluation holds (one running now, here or on another machine sharing the disk) stays,
    and so does one without a lock file (just made, or not an evaluation's); a free lock is an ended evaluation's."""
    from ood.evaluation.callback import lock_spill, remove_abandoned_spills

    for name in ("banks-running", "banks-ended", "banks-unlocked"):
        (tmp_path / name).mkdir()
    held = lock_spill(tmp_path / "banks-running")
    os.close(lock_spill(tmp_path / "banks-ended"))
    try:
        assert remove_abandoned_spills(tmp_path) == [tmp_path / "banks-ended"]
    finally:
        os.close(held)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["banks-running", "banks-unlocked"]


def test_a_bank_dir_without_file_locks_still_evaluates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a file system that cannot lock (some network mounts) the evaluation still gets its folder, with a warning
    naming it, and no folder there is taken for a dead evaluation's: none can be told from a running one."""
    import fcntl

    from ood.evaluation.callback import lock_spill, remove_abandoned_spills

    ended = tmp_path / "banks-ended"
    ended.mkdir()
    os.close(lock_spill(ended))

    def no_locks(fd: int, operation: int, *where: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    running = OODEvaluation(Evaluator(detectors=[]), bank_dir=tmp_path)
    running._open_spill()
    assert remove_abandoned_spills(tmp_path) == []
    assert sorted(tmp_path.iterdir()) == sorted([ended, running._spill])
    running._release()
    assert list(tmp_path.iterdir()) == [ended]


def test_a_killed_evaluations_folder_is_free_while_the_workers_it_forked_live_on(tmp_path: Path) -> None:
    """The folder's lock was an flock, which the DataLoader workers an evaluation forks inherit: SIGKILLed, the
    evaluation's folder stayed locked, so kept, for as long as a worker lived on. Its lock is now the evaluation
    process's own: here the evaluation forks a worker, is killed, and its folder goes while the worker runs."""
    from ood.evaluation.callback import lock_spill, remove_abandoned_spills

    folder = tmp_path / "banks-killed"
    folder.mkdir()

    evaluation = os.fork()  # os.fork, not multiprocessing: the worker would inherit the join's pipe and hold it
    if evaluation == 0:
        try:
            lock_spill(folder)
            worker = os.fork()
            if worker == 0:  # the worker: outlives the evaluation
                time.sleep(30)
                os._exit(0)
            (tmp_path / "worker.pid").write_text(str(worker))
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)  # never back into pytest
    _, status = os.waitpid(evaluation, 0)
    worker = int((tmp_path / "worker.pid").read_text())
    try:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        os.kill(worker, 0)  # alive, holding the inherited descriptor of the lock file
        assert remove_abandoned_spills(tmp_path) == [folder]
    finally:
        os.kill(worker, signal.SIGKILL)
    assert [p.name for p in tmp_path.iterdir()] == ["worker.pid"]


def test_a_staging_folder_left_by_a_killed_evaluation_is_removed(tmp_path: Path) -> None:
    """A new bank folder is made and locked as a hidden `.banks-*` folder, then renamed to `banks-*`: an evaluation
    killed in between left that folder for good (the cleanup looked at `banks-*` only). It now goes by the same
    rule: removed when its lock is free (here its process was SIGKILLed), kept while a live process holds it; one
    killed before its lock was in place (an empty folder, or one with the lock's temporary) goes once made
    `STAGING_GRACE_S` ago, and a younger one stays (a running evaluation spends an instant there)."""
    from ood.evaluation.callback import SPILL_LOCK, STAGING_GRACE_S, lock_spill, remove_abandoned_spills

    killed, running, unlocked, young = (tmp_path / f".banks-{name}" for name in ("killed", "running", "old", "young"))
    for folder in (killed, running, unlocked, young):
        folder.mkdir()
    (unlocked / f"{SPILL_LOCK}.tmp").touch()
    before = time.time() - STAGING_GRACE_S - 60
    os.utime(unlocked, (before, before))
    ready_read, ready_write = os.pipe()
    children = []
    for folder in (killed, running):
        child = os.fork()  # os.fork, not multiprocessing: as the workers' test above
        if child == 0:
            try:
                lock_spill(folder)
                if folder == killed:
                    os.kill(os.getpid(), signal.SIGKILL)
                os.write(ready_write, b"1")
                time.sleep(30)
            finally:
                os._exit(1)  # never back into pytest
        children.append(child)
    _, status = os.waitpid(children[0], 0)
    try:
        assert os.WIFSIGNALED(status) and os.read(ready_read, 1) == b"1"  # the running one holds its lock
        assert remove_abandoned_spills(tmp_path) == [killed, unlocked]
    finally:
        os.kill(children[1], signal.SIGKILL)
        os.waitpid(children[1], 0)
        os.close(ready_read)
        os.close(ready_write)
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, young.name]
    assert (running / SPILL_LOCK).is_file()


def lockless_warning(bank_dir: Path, folder: Path, size: str) -> str:
    """The warning naming a `banks-*` folder without a lock file, kept."""
    return (f"evaluation.bank_dir={bank_dir} holds bank folder(s) without a lock file, so kept (left by a version of "
            f"ood before the locks, or by an evaluation on a file system without them): {folder} ({size}); remove it "
            "if no evaluation is running")


def test_bank_folders_without_a_lock_file_are_named_with_their_size(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A `banks-*` folder left by a version before the locks (no lock file) was kept without a word, gigabytes each
    at ImageNet scale; it is kept (a running evaluation's cannot be told from it) and named once, with its size."""
    from ood.evaluation.callback import remove_abandoned_spills

    old = tmp_path / "banks-old"
    (old / "train").mkdir(parents=True)
    (old / "train" / "features.npy").write_bytes(os.urandom(2_000_000))
    with caplog.at_level(logging.WARNING):
        assert remove_abandoned_spills(tmp_path) == []
    assert [r.getMessage() for r in caplog.records] == [lockless_warning(tmp_path, old, "2.0 MB")]
    assert (old / "train" / "features.npy").is_file()


def test_a_bank_folder_removed_while_it_is_measured_is_no_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A folder whose lock file went first as another evaluation removed it (its own at its end, or a dead one's)
    was measured for the lockless warning while its files vanished: the FileNotFoundError of a file listed, then
    gone, stopped this evaluation before its pass. A file gone meanwhile now counts nothing."""
    from ood.evaluation.callback import remove_abandoned_spills

    going = tmp_path / "banks-going"
    (going / "train").mkdir(parents=True)
    (going / "test").mkdir()
    for split in ("train", "test"):
        (going / split / "features.npy").write_bytes(os.urandom(1_000_000))
    real_stat, real_lstat = os.stat, os.lstat

    def removed_on_first_look(real: Any) -> Any:
        def look(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            found = real(path, *args, **kwargs)
            if str(path).endswith(".npy") and going.exists():  # the other evaluation's rmtree, as this one looks
                import shutil

                shutil.rmtree(going)
            return found
        return look

    monkeypatch.setattr(os, "stat", removed_on_first_look(real_stat))
    monkeypatch.setattr(os, "lstat", removed_on_first_look(real_lstat))
    with caplog.at_level(logging.WARNING):
        assert remove_abandoned_spills(tmp_path) == []
    assert [r.getMessage() for r in caplog.records] == [lockless_warning(tmp_path, going, "1.0 MB")]


class _Listing:
    """An `os.scandir` iterator over given entries (a directory order of the test's choosing)."""

    def __init__(self, entries: list[os.DirEntry]) -> None:
        self._entries = iter(entries)

    def __iter__(self) -> _Listing:
        return self

    def __next__(self) -> os.DirEntry:
        return next(self._entries)

    def __enter__(self) -> _Listing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass


def test_a_bank_folder_being_removed_keeps_its_lock_file_to_the_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An evaluation removing its bank folder (gigabytes: seconds) deleted the lock file in directory order, often
    first: an evaluation starting meanwhile on the same bank_dir found the folder without one and named it as an
    older version's, 'remove it if no evaluation is running'. The lock file now goes last, so the folder reads as
    locked until it is gone (here on a file system listing `.lock` first)."""
    from ood.evaluation.callback import SPILL_LOCK, remove_abandoned_spills

    ending = OODEvaluation(Evaluator(detectors=[]), bank_dir=tmp_path)
    ending._open_spill()
    assert ending._spill is not None
    (ending._spill / "train").mkdir()
    (ending._spill / "train" / "features.npy").write_bytes(b"\0" * 4096)
    real_scandir, real_unlink = os.scandir, os.unlink
    seen: list[list[Path]] = []

    def lock_first(path: Any = ".") -> _Listing:
        with real_scandir(path) as listing:
            return _Listing(sorted(listing, key=lambda entry: entry.name != SPILL_LOCK))

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path).endswith("features.npy"):  # another evaluation starts as this one removes its banks
            seen.append(remove_abandoned_spills(tmp_path))
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", lock_first)
    monkeypatch.setattr(os, "unlink", unlink)
    with caplog.at_level(logging.WARNING):
        ending._release()
    assert seen == [[]]
    assert [r.getMessage() for r in caplog.records] == []
    assert list(tmp_path.iterdir()) == []


def test_a_new_bank_folder_is_never_seen_without_its_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Another evaluation's cleanup at the instant this one locks its new folder (after making it, before its lock
    file is in place) named that running evaluation's folder as an older version's ("remove it if no evaluation is
    running"); the folder is now made and locked under a hidden name, and appears as `banks-*` locked."""
    from ood.evaluation import callback

    banks = tmp_path / "banks"
    _, _, trainer, _ = build(compose_config(tmp_path / "run", [*SPILLING, f"evaluation.bank_dir={banks}"]))
    [evaluation] = [c for c in trainer.callbacks if isinstance(c, OODEvaluation)]
    lockf, found = callback.fcntl.lockf, []

    def locking_while_another_cleans(fd: int, operation: int) -> None:
        lockf(fd, operation)
        if not found:
            found.append(callback.remove_abandoned_spills(banks))

    monkeypatch.setattr(callback.fcntl, "lockf", locking_while_another_cleans)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        evaluation._open_spill()
    try:
        assert found == [[]] and [r.getMessage() for r in caplog.records if r.name.startswith("ood")] == []
        assert list(banks.iterdir()) == [evaluation._spill] and evaluation._spill.name.startswith("banks-")
        assert (evaluation._spill / callback.SPILL_LOCK).is_file()
    finally:
        evaluation._release()
    assert list(banks.iterdir()) == []
