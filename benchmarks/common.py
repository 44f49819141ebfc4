"""Shared timing helpers: run competitors alternately, report the median of the repeats and their ratio."""

from __future__ import annotations

import atexit
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Timing:
    """Median seconds of `ours` and `reference` over the repeats, and the target ratio."""

    task: str
    ours: float
    reference: float
    target: float
    reference_name: str

    @property
    def ratio(self) -> float:
        return self.ours / self.reference

    @property
    def ok(self) -> bool:
        return self.ratio <= self.target


def time_alternating(fns: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall time of each function, calling them in turn `repeats` times (after one untimed warm-up each);
    `repeats=0` is a smoke run: each function called once, that call timed."""
    if repeats == 0:
        return [_seconds(fn) for fn in fns]
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            times[i].append(_seconds(fns[i]))
    return [statistics.median(t) for t in times]


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def scratch_dir(prefix: str) -> Path:
    """A new temporary folder for a benchmark's runs and data, deleted when the process ends."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def markdown_table(timings: Sequence[Timing]) -> str:
    """The ratio table `make bench` prints."""
    lines = [
        "| task | ours (s) | reference | reference (s) | ratio | target | ok |",
        "|---|---:|---|---:|---:|---:|:-:|",
    ]
    for t in timings:
        lines.append(
            f"| {t.task} | {t.ours:.3f} | {t.reference_name} | {t.reference:.3f} | {t.ratio:.2f}x | <= {t.target}x | "
            f"{'yes' if t.ok else 'NO'} |"
        )
    return "\n".join(lines)
