"""`make bench`'s parts (benchmarks/run.py, a to f) at tiny sizes and one call per competitor (`repeats=0`), so the
benchmarks cannot rot: each part checks its own results before it times them (ours vs scikit-learn's metrics and
the NumPy / scikit-learn detectors, ODIN's shared grid vs point by point, our AUROCs vs OpenOOD's evaluator loop),
and the pass counts the README reports hold at any size (they depend on the split proportions only)."""

from __future__ import annotations

import re

import pytest

from benchmarks import bench_detectors, bench_digits, bench_e2e, bench_loaders, bench_metrics, bench_training
from ood import CONFIG_DIR


def _rows(table: str) -> dict[str, list[str]]:
    """A Markdown table's body (below its header and rule) as {first cell: the other cells}."""
    lines = [line for line in table.splitlines() if line.startswith("|")][2:]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_metric_and_detector_benchmarks_check_ours_against_the_references() -> None:
    # each raises before timing when ours and the reference differ (AUROC / FPR95 / AUPRs; knn, mahalanobis, vim)
    metrics = bench_metrics.run(4000, 0)
    detectors = bench_detectors.run(600, 150, 0)
    loaders = bench_loaders.run(40, 0)
    assert [t.reference_name for t in metrics] == ["scikit-learn (OpenOOD)"] * len(metrics)
    assert [t.task.split(" fit")[0] for t in detectors] == ["(b) knn (k=50)", "(b) mahalanobis", "(b) vim (dim=256)"]
    assert [t.reference_name for t in loaders] == ["per-item PIL"] * 2


@pytest.mark.slow
def test_digits_benchmark_every_cached_detector_from_one_pass() -> None:
    timings, table = bench_digits.run(epochs=1, repeats=0)
    passes = {name: float(cells[1]) for name, cells in _rows(table).items()}
    # msp and every cache-scored detector: one pass over each split; `all` adds ODIN's gradient passes
    assert passes["msp only"] == passes["fast"] == 1.0
    assert passes["all"] == 7.0
    assert len(timings) == 3  # ODIN's shared grid (scores checked equal to point by point), fast, all


@pytest.mark.slow
def test_training_benchmark_times_every_method_config() -> None:
    timings = bench_training.run(epochs=1, repeats=0)
    methods = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml") if p.stem != "ce")
    assert [re.sub(r".*method=", "", t.task) for t in timings] == methods
    assert all(t.ours > 0 and t.reference > 0 for t in timings)


@pytest.mark.slow
def test_end_to_end_benchmark_pass_counts() -> None:
    # equal AUROCs for every detector, ours vs OpenOOD's way, are asserted inside `run`
    timings, table = bench_e2e.run(size=32, epochs=1)
    rows = _rows(table.split("\n\n")[1])
    got = {group: (int(cells[0]), float(cells[4]), float(cells[5])) for group, cells in rows.items()}
    # (detectors run, ours' passes over every split, OpenOOD's way's passes): the README's end-to-end table
    assert got["cache-scored"] == (26, 1.0, 34.36)
    assert got["network-pass"] == (6, 8.57, 32.57)
    assert got["every detector"] == (32, 9.57, 66.93)
    assert [t.reference_name for t in timings] == ["OpenOOD's way"] * 2
