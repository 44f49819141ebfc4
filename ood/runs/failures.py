"""The failure record of a run: `FAILED.txt` (the error, one line) in a failed run's folder, so `ood-report` names
the job of a sweep that failed; a resumed run that starts again clears it. A run that resumes another folder's
checkpoint (`ckpt_path=last` after an interruption, into a new folder) leaves `resumed.json` naming it, so that
`ood-report` lists that folder as resumed there, not as a failed job."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ood.files import atomic_write_text
from ood.utils import get_logger

log = get_logger(__name__)

#: the identity file of a run folder (`ood.runs.identity.IDENTITY_FILE`, which imports this module)
IDENTITY_FILE = "identity.json"

#: the file a failed run leaves in its folder (read by `ood-report`)
FAILED_FILE = "FAILED.txt"
#: the file a run that resumed another folder's checkpoint leaves in its own folder (read by `ood-report`)
RESUMED_FILE = "resumed.json"
#: what an earlier attempt in the same folder wrote that `ood-report` (and a sweeper, `validation.json`) would take
#: for this attempt's; `results.jsonl`, which marks a set complete, first: a removal cut short leaves no complete set
EARLIER_RESULTS = ("results.jsonl", "scores.npz", "samples.csv", "validation.json", "sensitivity.jsonl")


#: the settings an attempt writes beside its results (`ood.runs.identity.write_identity`) once it passed its checks:
#: an attempt refused before that leaves the folder's earlier results beside the settings they were made with
SETTINGS_FILE = "config.yaml"

#: a results file as found when an attempt started: (inode, mtime in ns, size); a write of this attempt replaces the
#: file (a new inode), so a file still matching it is the earlier attempt's
FileStamp = tuple[int, int, int]


def _stamp(path: Path) -> FileStamp | None:
    """`path`'s stamp; None when it is not a file (gone: under torchrun every rank of the run removes them too)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size) if stat.S_ISREG(st.st_mode) else None


def remove_earlier_results(output_dir: str | Path, only: Mapping[str, FileStamp] | None = None) -> None:
    """Remove the results an earlier attempt left in this folder (`EARLIER_RESULTS`), saying so; with `only`, just
    those still as stamped there (not rewritten since). One that another rank removed first is no error."""
    for name in EARLIER_RESULTS:
        path = Path(output_dir) / name
        found = _stamp(path)
        if found is not None and (only is None or only.get(name) == found):
            path.unlink(missing_ok=True)
            log.info("removed %s of an earlier attempt in %s", name, output_dir)


@dataclass
class Started:
    """What a run folder held as an attempt started (`clear_failure`), for `record_failure`: the stamps of the
    results kept and of their `config.yaml`, the earlier attempt's `FAILED.txt` (its text), which an attempt that
    fails before it began puts back, and whether it began (`begin`)."""

    stamps: dict[str, FileStamp] = field(default_factory=dict)
    failed: str | None = None
    begun: bool = False

    def begin(self) -> None:
        """This attempt passed its checks and built its run (rank 0 wrote its `config.yaml`), on this rank: a failure
        from now on is the run's, recorded whatever the folder held. Every rank marks it where it gets there, so
        ranks started after rank 0 wrote the settings (trainer=ddp) and ranks refused on their own (torchrun) are
        told apart, which the folder's files cannot do."""
        self.begun = True


def clear_failure(output_dir: str | Path) -> Started:
    """Forget an earlier attempt in this folder as a new one starts: its `FAILED.txt` (a resumed run starts clean),
    and its results, which `ood-report` would otherwise read beside this attempt's `config.yaml` should this one fail
    (a rerun of a sweep into its fixed `hydra.sweep.dir` with other data reported the earlier data's rows under the
    new configuration). A folder with `identity.json` keeps them until `write_identity` finds the configuration or
    the settings (`config.yaml`, but for `ckpt_path`) changed, the training starts anew (`ood.train`: not resumed,
    so another model), or the attempt fails: a rerun of a finished job (`ckpt_path=last`) killed while it
    re-evaluates keeps the complete results it had, up to its results writer, which removes `results.jsonl` first
    and writes the new one last (`ood.evaluation.sinks.ResultsWriter`: a kill there leaves no complete set).
    Returns what the folder held, for `record_failure`."""
    path = Path(output_dir)
    found = folder_state(path)
    (path / FAILED_FILE).unlink(missing_ok=True)
    if not (path / IDENTITY_FILE).is_file():
        remove_earlier_results(path)
    found.stamps = {name: stamp for name in found.stamps if (stamp := _stamp(path / name)) is not None}
    return found


def folder_state(output_dir: str | Path) -> Started:
    """What `output_dir` holds (its results' and `config.yaml`'s stamps, its `FAILED.txt`), changing nothing: an
    attempt that may still be refused by its checks takes this, and clears the folder (`clear_failure`) once past them."""
    path = Path(output_dir)
    failed = None
    with contextlib.suppress(FileNotFoundError, IsADirectoryError):  # none, or another rank removed it first
        failed = (path / FAILED_FILE).read_text()
    stamps = {name: _stamp(path / name) for name in (*EARLIER_RESULTS, SETTINGS_FILE)}
    return Started({name: found for name, found in stamps.items() if found is not None}, failed)


def record_failure(output_dir: str | Path, err: BaseException, earlier: Started | None = None) -> None:
    """Leave `FAILED.txt` (the error) in a failed run's folder, so `ood-report` can name the job, and remove the
    results an earlier attempt left there (`earlier`, as `clear_failure` found them; the report would read their
    rows as this attempt's) once this attempt wrote its own `config.yaml`. One that failed before (a resume with
    other settings, a misspelt key: refused in one line on the console) leaves a folder that held a run's
    `config.yaml` as it was: a finished run's results beside the settings they were made with (it removed them), and
    no `FAILED.txt` but the earlier attempt's (`ood-report` named a finished run of `evaluate=false` failed, with the
    refusal); a new folder gets one, so that the report names a sweep's refused job. Before or not is the attempt's
    own mark (`Started.begin`), on every rank. Results this attempt wrote stay: a SIGTERM after the evaluation wrote
    them leaves them complete."""
    path = Path(output_dir)
    if not path.is_dir():
        return
    if earlier is not None and SETTINGS_FILE in earlier.stamps and not earlier.begun:
        if earlier.failed is not None:
            atomic_write_text(path / FAILED_FILE, earlier.failed)
        return
    if earlier and earlier.stamps:
        remove_earlier_results(path, only=earlier.stamps)
    atomic_write_text(path / FAILED_FILE, f"{type(err).__name__}: {err}\n")


def failure(run_dir: str | Path) -> str | None:
    """Why the run in `run_dir` failed (its `FAILED.txt`) on one line, None when it left no record: an error's own
    message may span lines (CUDA's does), which broke `ood-report`'s list of failed jobs."""
    path = Path(run_dir) / FAILED_FILE
    return " ".join(line.strip() for line in path.read_text().splitlines() if line.strip()) if path.is_file() else None


def record_resumed(output_dir: str | Path, checkpoint: str | Path | None) -> None:
    """`<output_dir>/resumed.json` naming `checkpoint` when it is another run folder's (`<run>/checkpoints/last.ckpt`)
    that this run resumes; nothing for its own (an earlier record stays: the model still descends from it). A run
    trained from scratch (`checkpoint` None) removes an earlier attempt's record: its model is not that checkpoint's,
    which `ood-report` (one model counted once) and `ood-eval ckpt_path=<folder>` would take it for."""
    if checkpoint is None:
        (Path(output_dir) / RESUMED_FILE).unlink(missing_ok=True)
        return
    checkpoint = Path(checkpoint).resolve()
    here = Path(output_dir).resolve()
    if checkpoint != here / "checkpoints" / "last.ckpt":
        record = {"checkpoint": str(checkpoint), "relative": os.path.relpath(checkpoint, here)}
        atomic_write_text(Path(output_dir) / RESUMED_FILE, json.dumps(record) + "\n")


def _resumed_pairs(records: Iterable[Path]) -> list[tuple[Path, Path]]:
    """(run folder whose checkpoint a later run resumed, that run's folder), oldest resume first, over the
    `resumed.json` files `records`."""
    stamped = []
    for record in records:
        with contextlib.suppress(FileNotFoundError):  # removed since the walk found it (a rerun trained anew)
            stamped.append((record.stat().st_mtime, record))
    found = [record for _, record in sorted(stamped)]
    pairs = ((resumed_checkpoint(record.parent), record.parent.resolve()) for record in found)
    return [(ckpt.parent.parent, run) for ckpt, run in pairs if ckpt is not None]


def resumed_checkpoint(run_dir: str | Path) -> Path | None:
    """The other run folder's checkpoint that the run in `run_dir` resumed (its `resumed.json`), None without one:
    the one at the recorded relative path when it is there (run folders copied together off a cluster), else the
    absolute path recorded."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        record = json.loads((Path(run_dir) / RESUMED_FILE).read_text())
        relative = Path(run_dir).resolve() / record.get("relative", "")
        return relative.resolve() if "relative" in record and relative.is_file() else Path(record["checkpoint"])
    return None


def resumed_in(records: Iterable[Path]) -> dict[Path, Path]:
    """Run folder whose checkpoint a later run resumed -> that run's folder (the newest, when several did), over the
    `resumed.json` files `records`."""
    return dict(_resumed_pairs(records))


def resumed_from(records: Iterable[Path]) -> dict[Path, Path]:
    """Run folder that resumed another folder's checkpoint -> that folder, over the `resumed.json` files `records`
    (the inverse of `resumed_in`)."""
    return {resumer: stopped for stopped, resumer in _resumed_pairs(records)}


@contextlib.contextmanager
def ctrl_c_raised(trainer: Any) -> Iterator[None]:
    """Around `trainer.fit` / `trainer.test`: Lightning answers Ctrl-C with `sys.exit(1)` and leaves SIGINT ignored;
    raise `KeyboardInterrupt` instead, with SIGINT's handler as it was, so the caller's program (a notebook cell, a
    loop over models) and the run's `FAILED.txt` see an interruption, not an exit."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SystemExit as stop:
        if not (trainer.interrupted and isinstance(stop.__context__, KeyboardInterrupt)):  # exited while handling it
            raise
        signal.signal(signal.SIGINT, previous)
        raise KeyboardInterrupt from None
