"""Shared timing helpers: run competitors alternately, report the median of the repeats and their ratio."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


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
    """Median wall time of each function, calling them in turn `repeats` times (after one untimed warm-up each)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            start = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


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
