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


@pytest.mark.parametrize(("detector", "points"), [
    ("knn", [{"k": 1}, {"k": 5}, {"k": 10}]),
    ("react", [{"percentile": p} for p in (85, 90, 95, 99)]),
    ("cfood", [{"k": k, "alpha": a} for k in (0.001, 0.005, 0.01, 0.05) for a in (0.1, 0.5, 1.0)]),
])
def test_every_grid_point_equals_a_run_fixed_at_it(
    banks: dict[str, FeatureBank], swept: tuple[EvaluationResult, EvaluationResult], detector: str, points: list[dict]
) -> None:
    """Each point's test metrics are those of a run with `detectors.params.<detector>` fixed at it (knn's k=1, 5, 10
    from one search at k=10), its `val_auroc` that run's ID-val vs validation-OOD AUROC; one point per OOD set is
    `chosen`: the tuned row's."""
    _, on = swept
    rows = _points(on, detector)
    assert len(rows) == 2 * len(points)
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


def test_network_pass_and_gridless_detectors_are_named_as_left_out(
    banks: dict[str, FeatureBank], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="ood.evaluation.scoring"):
        scorers = detector_scorers(["odin", "msp", "knn"], {"knn": {"k": [1, 5]}}, banks, tune=True,
                                   sweep_splits=["test", "far"])
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

    for group in ("all", "fast", "full", "none"):
        args = check_overrides(CONFIG_DIR, "eval", [f"detectors={group}"])
        assert instantiate(compose_config(tmp_path, args, "eval").evaluation.evaluator).sensitivity is False
    args = check_overrides(CONFIG_DIR, "eval", ["detectors.sensitivity=true"])
    assert instantiate(compose_config(tmp_path, args, "eval").evaluation.evaluator).sensitivity is True


def test_val_auroc_is_the_validation_metric(banks: dict[str, FeatureBank], swept: tuple[EvaluationResult, EvaluationResult]) -> None:
    """`val_auroc` is ID val vs val_ood at the point, computed here from a detector fitted at it."""
    from ood.detectors import build_detector

    det = build_detector("knn", k=5).fit(banks["train"])
    want = ood_metrics(det.score(banks["val"]), det.score(banks["val_ood"]))["auroc"]
    assert _points(swept[1], "knn")['far {"k": 5}']["val_auroc"] == want
