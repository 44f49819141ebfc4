"""The failure record of a run: `FAILED.txt` (the error, one line) in a failed run's folder, so `ood-report` names
the job of a sweep that failed; a resumed run that starts again clears it."""

from __future__ import annotations

from pathlib import Path

from ood.files import atomic_write_text

#: the file a failed run leaves in its folder (read by `ood-report`)
FAILED_FILE = "FAILED.txt"


def clear_failure(output_dir: str | Path) -> None:
    """Forget an earlier attempt's `FAILED.txt` (a resumed run starts clean)."""
    (Path(output_dir) / FAILED_FILE).unlink(missing_ok=True)


def record_failure(output_dir: str | Path, err: BaseException) -> None:
    """Leave `FAILED.txt` (the error) in a failed run's folder, so `ood-report` can name the job."""
    path = Path(output_dir)
    if path.is_dir():
        atomic_write_text(path / FAILED_FILE, f"{type(err).__name__}: {err}\n")


def failure(run_dir: str | Path) -> str | None:
    """Why the run in `run_dir` failed (its `FAILED.txt`) on one line, None when it left no record: an error's own
    message may span lines (CUDA's does), which broke `ood-report`'s list of failed jobs."""
    path = Path(run_dir) / FAILED_FILE
    return " ".join(line.strip() for line in path.read_text().splitlines() if line.strip()) if path.is_file() else None
