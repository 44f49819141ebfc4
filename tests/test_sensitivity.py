"""Hyper-parameter sensitivity from the one cached pass (`detectors.sensitivity=true`): every grid point of a cached
detector's search scored on the test sets (`sensitivity.jsonl`), equal to a run fixed at that point, the choice and
`results.jsonl` unchanged; `ood-report`'s `sensitivity.csv` and `figures/sensitivity_<detector>.png`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from fabricate import synthetic_banks

from ood.data.benchmark import EvalSplit
from ood.detectors import Detector
from ood.errors import ConfigError
from ood.evaluation import sinks
from ood.evaluation.evaluator import EvaluationResult, Evaluator
from ood.evaluation.scoring import METRICS, detector_scorers
from ood.features.bank import FeatureBank
from ood.metrics import ood_metrics

SPLITS = [EvalSplit("train", "fit"), EvalSplit("val", "id_val"), EvalSplit("val_ood", "ood_val"), EvalSplit("test", "id_test"),
          EvalSplit("near", "ood", "near"), EvalSplit("far", "ood", "far")]
#: knn over the user's list, react over its own percentile grid, cfood over k (a score parameter) x alpha (a refit)
DETECTORS = ["msp", "knn", "react", "cfood"]
PARAMS = {"knn": {"k": [1, 5, 10]}}


@pytest.fixture(scope="module")
def banks() -> dict[str, FeatureBank]:
    """The synthetic banks, their OOD test rows split into a near and a far set."""
    synthetic = synthetic_banks()
    ood = synthetic.pop("ood")
    return {**synthetic, "near": ood.subset(torch.arange(0, 100)), "far": ood.subset(torch.arange(100, 200))}


def _evaluate(banks: dict[str, FeatureBank], detectors: list[str], params: dict, **options: Any) -> EvaluationResult:
    from ood.methods import CrossEntropy
    from ood.models import SmallCNN

    method = CrossEntropy(SmallCNN(6), optimizer=torch.optim.SGD)
    return Evaluator(detectors, params=params, **options).evaluate(method, banks, SPLITS, "synthetic",
                                                                  info={"backbone": "toy", "seed": 3})


@pytest.fixture(scope="module")
def swept(banks: dict[str, FeatureBank]) -> tuple[EvaluationResult, EvaluationResult]:
    """The same evaluation without and with `sensitivity=True`."""
    return _evaluate(banks, DETECTORS, PARAMS), _evaluate(banks, DETECTORS, PARAMS, sensitivity=True)


def _points(result: EvaluationResult, detector: str) -> dict[str, dict[str, Any]]:
    """The detector's sensitivity rows, keyed by OOD set and point (`params` as JSON)."""
    return {f"{r['ood_dataset']} {json.dumps(r['params'], sort_keys=True)}": r
            for r in result.sensitivity if r["detector"] == detector}


@pytest.mark.parametrize(("detector", "grid", "points"), [
    ("knn", 3, [{"k": 1}, {"k": 5}, {"k": 10}]),
    ("react", 4, [{"percentile": p} for p in (85, 90, 95, 99)]),
    ("cfood", 12, [{"k": k, "alpha": a} for k in (0.001, 0.05) for a in (0.1, 1.0)]),  # 4 of its 4 x 3 points
])
def test_every_grid_point_equals_a_run_fixed_at_it(
    banks: dict[str, FeatureBank], swept: tuple[EvaluationResult, EvaluationResult], detector: str, grid: int,
    points: list[dict],
) -> None:
    """Each point's test metrics are those of a run with `detectors.params.<detector>` fixed at it (knn's k=1, 5, 10
    from one search at k=10), its `val_auroc` that run's ID-val vs validation-OOD AUROC; one point per OOD set is
    `chosen`: the tuned row's."""
    _, on = swept
    rows = _points(on, detector)
    assert len(rows) == 2 * grid
    for point in points:
        fixed = _evaluate(banks, [detector], {detector: point})
        for row in (r for r in fixed.rows if r["detector"] == detector):
            got = rows[f"{row['ood_dataset']} {json.dumps(point, sort_keys=True)}"]
            assert {m: got[m] for m in METRICS} == {m: row[m] for m in METRICS}
            assert got["val_auroc"] == fixed.validation[detector]
            assert {k: got[k] for k in ("method", "detector", "backbone", "id_dataset", "seed", "mode", "ood_group")} == \
                {k: row[k] for k in ("method", "detector", "backbone", "id_dataset", "seed", "mode", "ood_group")}
    for row in (r for r in on.rows if r["detector"] == detector):
        (chosen,) = [r for r in on.sensitivity if r["detector"] == detector and r["chosen"]
                     and r["ood_dataset"] == row["ood_dataset"]]
        assert chosen["params"] == {k: row["detector_params"][k] for k in row["tuned_params"]}
        assert chosen["val_auroc"] == on.validation[detector] == max(r["val_auroc"] for r in rows.values())
        assert chosen["auroc"] == row["auroc"]


def test_the_result_rows_and_the_choice_stay_byte_for_byte(
    tmp_path: Path, swept: tuple[EvaluationResult, EvaluationResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """results.jsonl and validation.json are the same bytes with the option on; sensitivity.jsonl is written beside
    them on rank 0 only, and a later run without the option removes it (it would be read as that run's)."""
    off, on = swept
    monkeypatch.setattr(sinks, "save_run_figures", lambda *args: [])
    rank0 = SimpleNamespace(is_global_zero=True)  # a SinkContext's only field ResultsWriter reads
    for name, result in (("off", off), ("on", on)):
        sinks.ResultsWriter(str(tmp_path / name), save_scores=False).write(result, rank0)
    for file in ("results.jsonl", "validation.json"):
        assert (tmp_path / "on" / file).read_bytes() == (tmp_path / "off" / file).read_bytes()
    assert not (tmp_path / "off" / "sensitivity.jsonl").exists()
    lines = (tmp_path / "on" / "sensitivity.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == on.sensitivity
    assert {r["detector"] for r in on.sensitivity} == {"knn", "react", "cfood"}
    assert len(on.sensitivity) == 2 * (3 + 4 + 12)
    sinks.ResultsWriter(str(tmp_path / "rank1"), save_scores=False).write(on, SimpleNamespace(is_global_zero=False))
    assert not (tmp_path / "rank1").exists()
    sinks.ResultsWriter(str(tmp_path / "on"), save_scores=False).write(off, rank0)
    assert not (tmp_path / "on" / "sensitivity.jsonl").exists()


#: weiper's fit parameters and two of its score parameters fixed, 4 perturbed heads: its grid is 144 points of seconds
WEIPER = {"n_repeats": 4, "n_bins": 80, "perturbation_distance": 1.8, "lambda_2": 0.1, "smoothing_perturbed": 15}


def test_every_registered_cached_detector_sweeps_the_scores_of_a_run_fixed_at_each_point(
    banks: dict[str, FeatureBank],
) -> None:
    """For every registered cached detector with a grid (`score_grid` overrides share work across the points: knn's
    one search, neco's projection, relation's, cfood's, weiper's, gen's, the activation shapers'...), each swept
    point's test scores are bit for bit those of a detector built, fitted and scored at that point alone: neco's
    projection onto the grid's largest subspace rounded the smaller subspaces' norms ~1e-16 off. Each key's first two
    and last values (neco's smallest and largest subspace, knn's k beyond the fit rows), on 100 fit rows."""
    from ood.detectors import build_detector, detector_class
    from ood.detectors.base import available_detectors
    from ood.evaluation.scoring import Sweep, grid_points, search_grid, tune_detector

    small = {**banks, "train": banks["train"].subset(torch.arange(100))}
    tests = ["test", "near", "far"]
    checked = []
    for cls in map(detector_class, available_detectors()):
        grid = search_grid(cls, {})
        if cls.needs_model or len(grid_points(grid)) < 2:
            continue
        fixed = WEIPER if cls.name == "weiper" else {}
        cut = {k: list(dict.fromkeys([*v[:2], v[-1]])) for k, v in grid.items() if k not in fixed}
        sweep = Sweep(tests)
        tune_detector(cls, {**fixed, **cut}, small, True, sweep=sweep)
        for point in sweep.points:
            det = build_detector(cls, **fixed, **point.params).fit(small[cls.fit_split])
            unequal = [s for s in tests if not torch.equal(point.scores[s], det.score(small[s]))]
            assert not unequal, f"{cls.name} at {point.params}: {unequal}"
        checked.append(cls.name)
    assert {"knn", "neco", "relation", "cfood", "weiper", "gen", "react", "ash", "scale", "vim"} <= set(checked)


def test_results_read_back_the_sensitivity_rows(
    tmp_path: Path, swept: tuple[EvaluationResult, EvaluationResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ood.evaluate(..., overrides=["detectors.sensitivity=true"])` wrote sensitivity.jsonl that its `Results`
    did not expose: `Results.sensitivity` holds its rows as written, empty for a run without the option."""
    from ood.api import Results

    monkeypatch.setattr(sinks, "save_run_figures", lambda *args: [])
    rank0 = SimpleNamespace(is_global_zero=True)
    for name, result in zip(("off", "on"), swept):
        sinks.ResultsWriter(str(tmp_path / name), save_scores=False).write(result, rank0)
    assert Results.from_dir(tmp_path / "on").sensitivity == swept[1].sensitivity != []
    assert Results.from_dir(tmp_path / "off").sensitivity == []


class _InfiniteOnTest(Detector):
    """Feature 0 at p=1; at p=2 the same doubled (tied on val: p=1 is chosen, first in order), but infinite on a bank
    of 100 rows, the near / far test sets here: a point that overflows on test data alone."""

    grid = {"p": [1, 2]}
    score_params = frozenset({"p"})

    def __init__(self, p: int = 1) -> None:
        self.p = p

    def score(self, bank: FeatureBank) -> torch.Tensor:
        features = bank.features[:, 0].double()
        return features if self.p == 1 else 2 * features / (len(bank) != 100)


_InfiniteOnTest.name = "infinite_on_test"  # after the class: out of the registry


def test_a_point_infinite_on_a_test_set_is_left_out_not_the_evaluation(
    banks: dict[str, FeatureBank], caplog: pytest.LogCaptureFixture
) -> None:
    """An unchosen point whose test scores are not finite raised NonFiniteError after every pass, so the option lost
    the whole evaluation (results.jsonl) that runs without it; now that point is left out of sensitivity.jsonl, said
    in one warning, and the rows are those of a run without the option."""
    off = _evaluate(banks, [_InfiniteOnTest], {})
    with caplog.at_level(logging.WARNING, logger="ood.evaluation.scoring"):
        on = _evaluate(banks, [_InfiniteOnTest], {}, sensitivity=True)
    assert on.rows == off.rows and on.rows[0]["detector_params"] == {"p": 1}
    assert [(r["params"], r["chosen"]) for r in on.sensitivity] == [({"p": 1}, True)] * 2
    assert "detectors.sensitivity: infinite_on_test at {'p': 2} left out of sensitivity.jsonl:" in caplog.text


def test_network_pass_and_gridless_detectors_are_named_as_left_out(
    banks: dict[str, FeatureBank], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One line names the detectors not swept and why; knn's points share one search per split at the largest k, on
    the test splits as on val and val_ood."""
    from ood.neighbors import KNNIndex

    searches: list[int] = []
    search = KNNIndex.search
    monkeypatch.setattr(KNNIndex, "search", lambda self, q, k: searches.append(k) or search(self, q, k))
    with caplog.at_level(logging.INFO, logger="ood.evaluation.scoring"):
        scorers = detector_scorers(["odin", "msp", "knn"], {"knn": {"k": [1, 5]}}, banks, tune=True,
                                   sweep_splits=["test", "far"])
    assert searches == [5, 5, 5, 5]  # val, val_ood, test, far
    assert "detectors.sensitivity leaves out odin (network-pass detectors: each grid point would take passes over " \
           "every test set); msp (no grid to search in this run)" in caplog.text
    assert [(s.name, [p.params for p in s.sweep]) for s in scorers] == [("msp", []), ("knn", [{"k": 1}, {"k": 5}])]


def test_sensitivity_needs_tuning() -> None:
    with pytest.raises(ConfigError, match=r"^detectors\.sensitivity=true scores the points of the tuning grids: it "
                                          r"needs detectors\.tune=true$"):
        Evaluator(["knn"], tune=False, sensitivity=True)


def test_the_option_reaches_the_evaluator_from_the_config(tmp_path: Path) -> None:
    from helpers import compose_config

    from ood import CONFIG_DIR
    from ood.runs.checks import check_overrides
    from ood.utils import instantiate

    evaluator = compose_config(tmp_path, check_overrides(CONFIG_DIR, "eval", ["detectors.sensitivity=true"]), "eval").evaluation.evaluator
    assert instantiate(evaluator).sensitivity is True  # off by default in every detectors config: test_detectors.py


def test_val_auroc_is_the_validation_metric(banks: dict[str, FeatureBank], swept: tuple[EvaluationResult, EvaluationResult]) -> None:
    """`val_auroc` is ID val vs val_ood at the point, computed here from a detector fitted at it."""
    from ood.detectors import build_detector

    det = build_detector("knn", k=5).fit(banks["train"])
    want = ood_metrics(det.score(banks["val"]), det.score(banks["val_ood"]))["auroc"]
    assert _points(swept[1], "knn")['far {"k": 5}']["val_auroc"] == want


# ----- ood-report: sensitivity.csv and figures/sensitivity_<detector>.png -----------------------------------------
SETS = {"near_a": "near", "far_a": "far", "far_b": "far"}
#: knn over k (one swept key, a 100x span: log x), cfood over k x alpha (one line per alpha)
GRIDS = {"knn": [{"k": k} for k in (1, 10, 100)],
         "cfood": [{"k": k, "alpha": a} for k in (0.001, 0.01) for a in (0.1, 1.0)]}


def _report_runs(root: Path) -> list[dict]:
    """Two seeds of a run with sensitivity.jsonl (seed 1 tunes knn to another k), and a run without one; returns
    the sensitivity rows written."""
    import random

    written = []
    for seed in (0, 1):
        gen = random.Random(seed)
        results, swept = [], []
        for detector, points in GRIDS.items():
            chosen = points[seed]
            for ood, group in SETS.items():
                base = {"method": "ce", "detector": detector, "backbone": "small_cnn", "id_dataset": "digits",
                        "seed": seed, "mode": "standard", "ood_dataset": ood, "ood_group": group}
                for point in points:
                    auroc = round(gen.uniform(0.5, 1.0), 4)
                    swept.append({**base, "params": point, "chosen": point == chosen,
                                  "val_auroc": round(0.5 + sum(map(float, point.values())) / 300 + seed / 100, 4),
                                  "auroc": auroc, "fpr95": round(1 - auroc / 2, 4)})
                pick = next(r for r in swept[-len(points):] if r["chosen"])
                results.append({**base, "auroc": pick["auroc"], "fpr95": pick["fpr95"], "fpr95_oodpos": 0.5,
                                "id_acc": 0.9, "method_params": {}, "detector_params": {**chosen, "index": "exact"},
                                "tuned": True, "tuned_params": sorted(chosen)})
        run = root / str(seed)
        run.mkdir(parents=True)
        (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
        (run / "sensitivity.jsonl").write_text("".join(json.dumps(r) + "\n" for r in swept))
        written += [{**r, "_run": str(run)} for r in swept]
    return written


def test_the_report_averages_each_point_over_seeds_as_pandas_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """sensitivity.csv: per detector and grid point, the near / far means per run first, then mean ± sample std over
    the seeds, and the validation AUROC; `chosen` counts the seeds that chose the point. Checked against pandas."""
    import pandas as pd

    from ood.report import main

    written = pd.DataFrame(_report_runs(tmp_path / "runs"))
    main([str(tmp_path / "runs"), "--no-figures", "--no-reference"])
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"wrote {tmp_path / 'runs'}/report.md, report.csv, report.tex, sensitivity.csv"
    assert "\nHyper-parameter sensitivity (test AUROC per grid point of the tuning): `sensitivity.csv`\n" in \
        (tmp_path / "runs" / "report.md").read_text()  # the stderr line alone named it
    got = pd.read_csv(tmp_path / "runs" / "sensitivity.csv")
    point = lambda p: json.dumps({k: float(v) for k, v in p.items()}, sort_keys=True)  # noqa: E731 (read_csv: floats)
    written["point"] = written["params"].map(point)
    per_run = written.groupby(["detector", "point", "_run", "ood_group"])[["auroc", "fpr95"]].mean().unstack("ood_group")
    per_run.columns = [f"{g}/{m}" for m, g in per_run.columns]
    per_run["val/auroc"] = written.groupby(["detector", "point", "_run"])["val_auroc"].first()
    per_run["chosen"] = written.groupby(["detector", "point", "_run"])["chosen"].first()
    want = per_run.groupby(["detector", "point"]).agg(["mean", "std"])
    assert len(got) == len(want) == 3 + 4
    for _, row in got.iterrows():
        params = {k[len("point."):]: row[k] for k in got.columns if k.startswith("point.") and pd.notna(row[k])}
        expected = want.loc[(row["detector"], point(params))]
        for col in ("val/auroc", "near/auroc", "near/fpr95", "far/auroc", "far/fpr95"):
            assert row[f"{col}_mean"] == pytest.approx(expected[(col, "mean")], abs=1e-12)
            assert row[f"{col}_std"] == pytest.approx(expected[(col, "std")], abs=1e-12)
        assert row["chosen"] == expected[("chosen", "mean")] * 2 and row["seeds"] == 2
    assert list(got.columns[:8]) == ["method", "detector", "backbone", "id_dataset", "point.k", "point.alpha", "chosen",
                                     "seeds"]


def test_the_report_warns_of_a_configuration_whose_sensitivity_is_over_fewer_of_its_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A third seed evaluated without the option (no sensitivity.jsonl) is in report.csv's means, not in
    sensitivity.csv's: one warning per configuration says its sensitivity is over 2 of its 3 runs."""
    from ood.report import main

    _report_runs(tmp_path / "runs")
    third = tmp_path / "runs" / "2"
    third.mkdir()
    rows = [{**json.loads(line), "seed": 2} for line in (tmp_path / "runs" / "1" / "results.jsonl").read_text().splitlines()]
    (third / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main([str(tmp_path / "runs"), "--no-figures", "--no-reference"])
    warned = [line for line in capsys.readouterr().err.splitlines() if "sensitivity.csv:" in line]
    assert warned == [f"warning: sensitivity.csv: method=ce detector={d} backbone=small_cnn id_dataset=digits is over 2 "
                      "of its 3 runs (the others have no sensitivity.jsonl rows for it: evaluated without "
                      "detectors.sensitivity=true)" for d in ("cfood", "knn")]


def test_the_report_draws_one_sensitivity_figure_per_detector(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """knn: one line over k on a log axis (1..100), two starred points (each chosen by one seed of two); cfood: one
    line per alpha; a later report of runs without sensitivity rows leaves neither the csv nor the figures."""
    from ood import plots
    from ood.report import main

    _report_runs(tmp_path / "runs")
    drawn: dict[str, Any] = {}
    draw = plots.sensitivity_figure

    def spy(lines: Any, key: str, path: Path, title: str) -> Path:
        drawn[Path(path).name] = (key, lines)
        return draw(lines, key, path, title)

    monkeypatch.setattr(plots, "sensitivity_figure", spy)
    main([str(tmp_path / "runs"), "--no-reference", "--out", str(tmp_path / "report")])
    assert sorted(drawn) == ["sensitivity_cfood.png", "sensitivity_knn.png"]
    key, (knn,) = drawn["sensitivity_knn.png"]
    assert (key, knn.label, list(knn.x), list(knn.chosen)) == ("k", "knn", [1, 10, 100], [(1, 2), (1, 2), (0, 2)])
    key, lines = drawn["sensitivity_cfood.png"]
    assert (key, [line.label for line in lines]) == ("k", ["alpha=0.1", "alpha=1.0"])
    assert [list(line.x) for line in lines] == [[0.001, 0.01], [0.001, 0.01]]
    for name in drawn:
        assert (tmp_path / "report" / "figures" / name).stat().st_size > 10_000
    for run in (tmp_path / "runs").iterdir():
        (run / "sensitivity.jsonl").unlink()
    main([str(tmp_path / "runs"), "--no-reference", "--out", str(tmp_path / "report")])
    assert not (tmp_path / "report" / "sensitivity.csv").exists()
    assert not list((tmp_path / "report" / "figures").glob("sensitivity_*.png"))
    assert "sensitivity" not in (tmp_path / "report" / "report.md").read_text()


def test_the_reports_sensitivity_figures_follow_its_detectors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--detectors knn` chose roc.png's and the bars' detectors, but every detector still got a sensitivity figure:
    now knn's alone, an earlier report's cfood figure is removed, and sensitivity.csv keeps every detector (a table,
    as report.csv)."""
    import csv

    from ood import plots
    from ood.report import main

    _report_runs(tmp_path / "runs")
    (tmp_path / "report" / "figures").mkdir(parents=True)
    (tmp_path / "report" / "figures" / "sensitivity_cfood.png").write_bytes(b"an earlier report's")
    drawn: list[str] = []
    monkeypatch.setattr(plots, "sensitivity_figure", lambda lines, key, path, title: drawn.append(Path(path).name) or path)
    monkeypatch.setattr(plots, "auroc_bars", lambda bars, path, title: path)
    main([str(tmp_path / "runs"), "--no-reference", "--detectors", "knn", "--out", str(tmp_path / "report")])
    assert drawn == ["sensitivity_knn.png"]
    assert not list((tmp_path / "report" / "figures").glob("sensitivity_*.png"))  # cfood's gone; knn's not drawn here
    assert ("\nHyper-parameter sensitivity (test AUROC per grid point of the tuning): `sensitivity.csv`; figures: "
            "`figures/sensitivity_knn.png`\n") in (tmp_path / "report" / "report.md").read_text()
    with open(tmp_path / "report" / "sensitivity.csv") as f:
        assert sorted({row["detector"] for row in csv.DictReader(f)}) == ["cfood", "knn"]


def test_a_fraction_of_d_axis_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ViM's and neco's `dim` grids are fractions of the feature dimension D (0.125, 0.5), which the axis showed as a
    bare "dim": labelled "dim (fraction of D)"; counts (256) and another detector's fractions (cfood's k) keep the
    key alone."""
    from ood import plots
    from ood.report.sensitivity import write_sensitivity_figures

    axes: dict[str, str] = {}
    monkeypatch.setattr(plots, "sensitivity_figure", lambda lines, key, path, title: axes.update({path.name: key}) or path)

    def entry(detector: str, **params: Any) -> dict[str, Any]:
        return {"detector": detector, "_params": params, "val/auroc": (0.9, 0.0, 1), "near/auroc": (0.8, 0.01, 1),
                "chosen": 0, "seeds": 1}

    table = [entry("vim", dim=0.125), entry("vim", dim=0.5), entry("neco", dim=1 / 64, use_max_logit=False),
             entry("residual", dim=256), entry("residual", dim=1024), entry("cfood", k=0.01)]
    write_sensitivity_figures(tmp_path, ["detector"], table)
    assert axes == {"sensitivity_vim.png": "dim (fraction of D)", "sensitivity_neco.png": "dim (fraction of D)",
                    "sensitivity_residual.png": "dim", "sensitivity_cfood.png": "k"}


def test_the_reports_file_name_is_the_writers() -> None:
    from ood.report.sensitivity import SENSITIVITY_FILE

    assert SENSITIVITY_FILE == sinks.SENSITIVITY_FILE


def test_the_sensitivity_figure_reads_as_an_ablation_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """x ticks at the grid's own values (k = 1, 5, 10, 50, 100 on the log axis, not 10^0, 10^1, 10^2; percentile
    85, 90, 95, 99, not 87.5); a flat line (ViM's far AUROC 99.998 ± 0.001) is drawn flat on a plain axis: no
    '+9.999e1' offset, at least one AUROC point of y range, no tick above 100."""
    from ood import plots

    saved = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: saved.append(fig) or Path(path))

    def line(x: list[float], mean: list[float]) -> plots.SensitivityLine:
        cells = {"val/auroc": [(1.0, 0.0)] * len(x), "near/auroc": [(m, 0.01) for m in mean],
                 "far/auroc": [(0.99998 + i * 1e-6, 1e-5) for i in range(len(x))]}
        return plots.SensitivityLine("a", x, cells, [(i == 0, 2) for i in range(len(x))])

    plots.sensitivity_figure([line([1, 5, 10, 50, 100], [0.9, 0.8, 0.7, 0.6, 0.5])], "k", tmp_path / "k.png", "t")
    plots.sensitivity_figure([line([85, 90, 95, 99], [0.6, 0.6, 0.5, 0.5])], "percentile", tmp_path / "p.png", "t")
    (knn_near, knn_far), (react_near, _) = (fig.axes[:2] for fig in saved)
    for fig in saved:
        fig.canvas.draw()
    assert knn_near.get_xscale() == "log"
    assert [t.get_text() for t in knn_near.get_xticklabels()] == ["1", "5", "10", "50", "100"]
    assert [t.get_text() for t in react_near.get_xticklabels()] == ["85", "90", "95", "99"]
    assert knn_far.yaxis.get_major_formatter().get_offset() == ""
    low, high = knn_far.get_ylim()
    assert high - low >= 1 and max(t for t in knn_far.get_yticks() if low <= t <= high) == 100


def test_the_report_says_when_a_re_evaluations_sensitivity_is_left_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ood-report <train sweep> <eval sweep>`, the eval sweep `ood-eval`'s of the training runs' checkpoints with
    detectors.sensitivity=true over the detectors' own grids (no `tuned_grid`): the same configuration (the option
    is none), so the report counts each model once, its training run's rows, and every sensitivity row was dropped
    and no sensitivity.csv written, silently. Now one warning per evaluation run names its file, the run counted
    instead and what to report. An evaluation over the user's lists (`tuned_grid`) is another configuration: its
    rows and sensitivity rows are kept, no warning."""
    from ood.report import main
    from ood.runs.identity import IDENTITY_FILE

    _report_runs(tmp_path / "eval")
    for seed in ("0", "1"):
        train, run = tmp_path / "train" / seed, tmp_path / "eval" / seed
        (train / "checkpoints").mkdir(parents=True)
        (train / "checkpoints" / "last.ckpt").write_bytes(b"")
        (train / "results.jsonl").write_text((run / "results.jsonl").read_text())
        model = str((train / "checkpoints" / "last.ckpt").resolve())
        for folder in (train, run):
            (folder / IDENTITY_FILE).write_text(json.dumps({"config": {}, "model": model}))
    main([str(tmp_path / "train"), str(tmp_path / "eval"), "--no-figures", "--no-reference", "--out", str(tmp_path)])
    warned = [line for line in capsys.readouterr().err.splitlines() if "sensitivity.jsonl" in line]
    assert warned == [f"warning: {tmp_path / 'eval' / s / 'sensitivity.jsonl'} left out (cfood, knn): its run re-evaluates "
                      f"the model of {tmp_path / 'train' / s} in the same configuration (the same detector settings "
                      f"and grids), whose rows the report keeps; report {tmp_path / 'eval' / s} without "
                      f"{tmp_path / 'train' / s} for its sensitivity.csv and figures" for s in ("0", "1")]
    assert not (tmp_path / "sensitivity.csv").exists()
    assert warned[0][len("warning: "):] in (tmp_path / "report.md").read_text()
    lists = {"knn": {"k": [1, 10, 100]}, "cfood": {"k": [0.001, 0.01]}}
    for seed in ("0", "1"):
        results = tmp_path / "eval" / seed / "results.jsonl"
        rows = [json.loads(line) for line in results.read_text().splitlines()]
        results.write_text("".join(json.dumps({**r, "tuned_grid": lists[r["detector"]]}) + "\n" for r in rows))
    main([str(tmp_path / "train"), str(tmp_path / "eval"), "--no-figures", "--no-reference", "--out", str(tmp_path)])
    assert [line for line in capsys.readouterr().err.splitlines() if "sensitivity.jsonl" in line] == []
    assert (tmp_path / "sensitivity.csv").read_text().count("tuned [1, 10, 100]") == 3
