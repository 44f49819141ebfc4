"""`make bench`'s parts (benchmarks/run.py) a, b, c, e and f at tiny sizes and one call per competitor (`repeats=0`),
so the benchmarks cannot rot (part d, one training epoch of every method, is `trainer.fit` as `test_methods.py` runs
it for every method config, timed): each part checks its own results before it times them (ours vs scikit-learn's metrics and
the NumPy / scikit-learn detectors, ODIN's shared grid vs point by point, our AUROCs vs OpenOOD's evaluator loop),
and the pass counts the README reports hold at any size (they depend on the split proportions only)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import bench_detectors, bench_digits, bench_e2e, bench_loaders, bench_metrics


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


#: bench_scale's "their way" columns that compute our scores (float32 rounding apart), or their negation (pytorch-ood
#: scores outliers high). The others differ by design, at the same cost: pytorch-ood's mahalanobis divides the
#: covariance by N - 1 and adds 1e-6 I (same ranking), its RMD leaves the background covariance undivided by N, its LTS
#: is the form `ood.detectors.activation` documents as not followed, and WeiPer draws its own random perturbations.
SAME_SCORES = {
    ("knn", "openood"): 1, ("knn", "pytorch-ood"): 1, ("mahalanobis", "openood"): 1, ("rmds", "openood"): 1,
    ("vim", "openood"): 1, ("vim", "pytorch-ood"): 1, ("neco", "authors"): 1, ("caref", "authors"): 1,
    ("cadref", "authors"): 1, ("mahalanobis_pp", "openood"): 1, ("rmds_pp", "openood"): 1, ("residual", "openood"): 1,
    ("vra", "openood"): 1, ("graduncertainty", "pytorch-ood"): -1, ("pnml", "pytorch-ood"): -1,
}


def test_scale_benchmark_times_the_same_scores_on_both_sides() -> None:
    """The heavy-detector table (`python -m benchmarks.bench_scale`) compares like with like: on small synthetic banks
    each reference implementation listed in `SAME_SCORES` gives ours' scores, the mahalanobis one ours' ranking."""
    import torch
    from scipy.stats import spearmanr

    from benchmarks import bench_scale

    d = bench_scale.banks(400, 60, 16, 4, torch.float32)
    pairs = [(name, impl) for name, impls in bench_scale.IMPLS.items() for impl in impls if not impl.startswith("ours")]
    assert set(SAME_SCORES) <= set(pairs)
    for name, impl in pairs:
        if name == "grood_bank":  # OpenOOD's approximate IVF index: ours' exact 1-NN is checked in test_neighbors
            continue
        ours = bench_scale.ours(name, d).double().numpy()
        theirs = bench_scale.their_scores(name, impl, d, len(ours)).astype(np.float64)
        if (name, impl) in SAME_SCORES:
            scale = max(1.0, np.abs(ours).max())
            assert np.abs(SAME_SCORES[name, impl] * theirs - ours).max() <= 1e-4 * scale, (name, impl)
        elif name == "mahalanobis":
            assert spearmanr(ours, theirs).statistic == pytest.approx(1.0), impl
