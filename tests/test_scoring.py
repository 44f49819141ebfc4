"""Detector fitting and tuning (`ood.evaluation.scoring`): validation data only, shared work, model-scored ODIN."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from fabricate import synthetic_banks
from helpers import fit_detector
from test_metrics import EQUAL_AUROC_HIGH, EQUAL_AUROC_LOW
from torch import nn

from ood.data.benchmark import EvalSplit
from ood.detectors import DetectorNotApplicable, build_detector, detector_class
from ood.detectors.base import Detector
from ood.errors import ConfigError, NonFiniteError
from ood.evaluation.evaluator import Evaluator, check_banks_finite, check_id_labels
from ood.evaluation.scoring import detector_scorers, sweep_order, tune_detector
from ood.features.bank import FeatureBank
from ood.metrics import ood_metrics
from ood.neighbors import KNNIndex


@pytest.fixture
def banks() -> dict[str, FeatureBank]:
    """Train/val/val_ood only, plus a test-OOD bank full of NaN: tuning that touched it would raise."""
    synthetic = synthetic_banks()
    poisoned = synthetic["ood"]
    nan = FeatureBank(
        logits=torch.full_like(poisoned.logits, float("nan")),
        features=torch.full_like(poisoned.features, float("nan")),
        weight=poisoned.weight,
        bias=poisoned.bias,
    )
    return {k: synthetic[k] for k in ("train", "val", "val_ood")} | {"ood": nan}


def _val_auroc(det: Detector, banks: dict[str, FeatureBank]) -> float:
    return ood_metrics(det.score(banks["val"]), det.score(banks["val_ood"]))["auroc"]


@pytest.mark.parametrize("name", ["knn", "react", "gen", "ash", "nci"])
def test_tuning_picks_the_best_validation_point(name: str, banks: dict[str, FeatureBank]) -> None:
    """The chosen point maximises val AUROC over the grid (first in OpenOOD's order on ties); test OOD untouched."""
    det, tuned = fit_detector(name, {}, banks, tune=True)
    assert tuned
    cls = detector_class(name)
    fit_bank = banks[cls.fit_split]
    points = [p for p in sweep_order(cls.grid) if p.get("k", 0) <= len(fit_bank)]  # kNN's k beyond the bank: dropped
    aurocs = [(_val_auroc(build_detector(name, **p).fit(fit_bank), banks), p) for p in points]
    best = max(a for a, _ in aurocs)
    first_best = next(p for a, p in aurocs if a == best)
    assert {k: det.hparams[k] for k in first_best} == first_best
    assert _val_auroc(det, banks) == best


def test_sweep_order_is_openoods_recursive_generator() -> None:
    """OpenOOD's `recursive_generator` varies the first parameter fastest (itertools.product: the last)."""
    assert sweep_order({"a": [0, 1, 2], "b": ["x", "y"]}) == [
        {"a": 0, "b": "x"}, {"a": 1, "b": "x"}, {"a": 2, "b": "x"}, {"a": 0, "b": "y"}, {"a": 1, "b": "y"},
        {"a": 2, "b": "y"}]
    assert [tuple(p.values()) for p in sweep_order({"a": [0, 1], "b": [0, 1], "c": [0, 1]})] == [
        (0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    assert sweep_order({"k": [5, 1]}) == [{"k": 5}, {"k": 1}]


class _Planted(Detector):
    """Scores feature 0 (val AUROC 1) at (a, b) = (0, 1) and (1, 0), feature 1 (val AUROC 0.25) elsewhere: an exact
    tie that the product order breaks for (0, 1) and OpenOOD's for (1, 0) (named below, out of the registry)."""

    grid = {"a": [0, 1, 2], "b": [0, 1]}

    def __init__(self, a: int = 0, b: int = 0) -> None:
        self.a, self.b = a, b

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return bank.features[:, 0 if (self.a, self.b) in {(0, 1), (1, 0)} else 1].double()


_Planted.name = "planted"


@pytest.mark.parametrize("score_params", [set(), {"b"}, {"a", "b"}])
def test_exact_validation_ties_go_to_the_first_point_in_openoods_order(score_params: set[str]) -> None:
    """On equal val AUROC OpenOOD keeps the first point of its search order (a varies fastest); tuning kept the first
    it scored, walking fit groups in product order (b fastest), and chose (0, 1)."""
    def bank(features: list[list[float]]) -> FeatureBank:
        return FeatureBank(logits=torch.zeros(2, 2), features=torch.tensor(features))

    val = bank([[2.0, 0.0], [3.0, 2.0]])
    banks = {"train": val, "val": val, "val_ood": bank([[0.0, 1.0], [1.0, 3.0]])}
    cls = type("_PlantedFits", (_Planted,), {"score_params": frozenset(score_params)})
    det, tuned, scores = tune_detector(cls, {}, banks, tune=True)
    assert tuned and det.hparams == {"a": 1, "b": 0}
    assert ood_metrics(scores["val"], scores["val_ood"])["auroc"] == 1.0


class _RoundedApart(Detector):
    """Feature a of the banks: two rankings with the same val AUROC, whose float AUROCs differ by an ulp (named below,
    out of the registry)."""

    grid = {"a": [0, 1]}
    score_params = frozenset({"a"})

    def __init__(self, a: int = 0) -> None:
        self.a = a

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return bank.features[:, self.a].double()


_RoundedApart.name = "rounded_apart"


def test_validation_aurocs_equal_but_rounded_apart_go_to_the_first_point() -> None:
    """The first point's AUROC, 25/42, sums to an ulp below the second's (tests/test_metrics.py): the key's exact
    count (`auroc_pairs`) keeps OpenOOD's first point; the float key chose a=1."""
    def bank(pair: tuple[list[int], list[int]]) -> FeatureBank:
        features = torch.tensor(pair, dtype=torch.float32).T
        return FeatureBank(logits=torch.zeros(len(features), 2), features=features)

    (low_id, low_ood), (high_id, high_ood) = EQUAL_AUROC_LOW, EQUAL_AUROC_HIGH
    val = bank((low_id, high_id))
    banks = {"train": val, "val": val, "val_ood": bank((low_ood, high_ood))}
    det, tuned, scores = tune_detector(_RoundedApart, {}, banks, tune=True)
    assert tuned and det.hparams == {"a": 0}
    assert torch.equal(scores["val"], torch.tensor(low_id, dtype=torch.float64))


def test_fixed_params_and_tune_false_are_not_searched(banks: dict[str, FeatureBank]) -> None:
    det, tuned = fit_detector("knn", {"k": 7}, banks, tune=True)
    assert (det.k, tuned) == (7, False)
    det, tuned = fit_detector("react", {}, banks, tune=False)
    assert (det.percentile, tuned) == (90, False)
    no_val_ood = {k: v for k, v in banks.items() if k != "val_ood"}
    assert fit_detector("knn", {}, no_val_ood, tune=True)[1] is False



def test_no_validation_ood_set_says_which_detectors_stay_untuned(
    banks: dict[str, FeatureBank], caplog: pytest.LogCaptureFixture
) -> None:
    """Without val_ood the grids cannot be searched: one warning names the detectors left at their defaults (it was
    silent); detectors without a grid or with fixed values are not named, and with val_ood nothing is said."""
    no_val_ood = {k: v for k, v in banks.items() if k != "val_ood"}
    with caplog.at_level(logging.WARNING):
        scorers = detector_scorers(["msp", "react", "knn"], {"knn": {"k": 7}}, no_val_ood, tune=True)
    assert not any(s.tuned for s in scorers)
    assert "keep their default hyper-parameters: react (give one" in caplog.text and "+data.ood.val=" in caplog.text
    assert "are not searched" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a user's grid cannot be searched either, and the line says so
        (scorer,) = detector_scorers(["knn"], {"knn": {"k": [10, 100]}}, no_val_ood, tune=True)
    assert scorer.hparams["k"] == 50 and not scorer.tuned
    assert caplog.text.rstrip().endswith("keep their default hyper-parameters: knn (give one: data=folder's "
                                         "'+data.ood.val=<folder>', ood.evaluate's ood_data={'val': ...}); the lists "
                                         "given for knn.k are not searched")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        detector_scorers(["react"], {}, banks, tune=True)
        detector_scorers(["react"], {}, no_val_ood, tune=False)
    assert "validation-OOD" not in caplog.text

def test_knn_tuning_searches_once_per_split(banks: dict[str, FeatureBank], monkeypatch: pytest.MonkeyPatch) -> None:
    """Five k values, one search each on val and val_ood (at the largest k within the 400-row bank: 500 and 1000
    have no k-th neighbour and drop out), and one index."""
    searches: list[int] = []
    adds: list[int] = []
    search, add = KNNIndex.search, KNNIndex.add
    monkeypatch.setattr(KNNIndex, "search", lambda self, q, k: searches.append(k) or search(self, q, k))
    monkeypatch.setattr(KNNIndex, "add", lambda self, x, *rest: adds.append(len(x)) or add(self, x, *rest))
    fit_detector("knn", {}, banks, tune=True)
    assert searches == [200, 200] and adds == [400]


def test_vim_drops_inapplicable_grid_points(
    banks: dict[str, FeatureBank], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """D=16: grid points with dim >= D are dropped (one left: nothing was chosen, untuned as a one-point grid); with
    none left, the run skips vim and says why."""
    monkeypatch.setattr(detector_class("vim"), "grid", {"dim": [8, 16, 256]})
    det, tuned = fit_detector("vim", {}, banks, tune=True)
    assert not tuned and det.dim == 8
    with pytest.raises(DetectorNotApplicable, match="dim < feature dim D=16"):
        fit_detector("vim", {"dim": 16}, banks, tune=True)
    with caplog.at_level(logging.WARNING):
        scorers = detector_scorers(["vim", "msp"], {"vim": {"dim": 256}}, banks, tune=True)
    assert [s.name for s in scorers] == ["msp"]
    assert "skipping detector vim" in caplog.text and "D=16" in caplog.text
    scorers = detector_scorers(["vim"], {"vim": {"dim": 8}}, banks, tune=True)
    assert scorers[0].hparams == {"dim": 8} and not scorers[0].tuned


def test_model_detectors_tune_through_model_scores(banks: dict[str, FeatureBank]) -> None:
    """ODIN is tuned on val / val_ood through the callback's scorer: one run per split for the whole grid."""
    calls: list[str] = []
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 3)
    inputs = {"val": torch.randn(50, 4, generator=gen), "val_ood": 3 * torch.randn(50, 4, generator=gen)}

    def model_scores(det: Detector, split: str) -> torch.Tensor:
        calls.append(split)
        return det.score_inputs(model, inputs[split])

    det, tuned = fit_detector("odin", {}, banks, tune=True, model_scores=model_scores)
    assert tuned and calls == ["val", "val_ood"]
    points = [{"temperature": t, "noise": n} for t in (1, 10, 100, 1000) for n in (0.0014, 0.0028)]
    aurocs = [
        ood_metrics(*(build_detector("odin", **p).score_inputs(model, inputs[s]) for s in ("val", "val_ood")))["auroc"]
        for p in points
    ]
    assert (det.temperature, det.noise) == tuple(points[aurocs.index(max(aurocs))].values())
    with pytest.raises(DetectorNotApplicable, match="needs the model"):
        fit_detector("odin", {}, banks, tune=True)
    assert detector_scorers(["odin"], {}, banks, tune=True) == []


def test_odin_grid_shares_passes_and_is_bit_identical() -> None:
    """One forward per batch and one input gradient per temperature for the whole grid; the scores equal the
    point-by-point ones exactly (max |diff| = 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5)).eval()
    x = torch.randn(16, 3, 6, 6)
    points = [{"temperature": t, "noise": n} for t in (1, 10, 100, 1000) for n in (0.0014, 0.0028)]
    det = build_detector("odin", input_std=(0.2, 0.3, 0.4))
    forwards: list[bool] = []
    hook = model[0].register_forward_hook(lambda _m, _i, out: forwards.append(out.requires_grad))
    grid = det.score_inputs_grid(model, x, points)
    hook.remove()
    assert forwards.count(True) == 1 and forwards.count(False) == len(points)
    assert (det.temperature, det.noise) == (1000, 0.0028)  # the last point stays set
    for point, got in zip(points, grid):
        want = build_detector("odin", input_std=(0.2, 0.3, 0.4), **point).score_inputs(model, x)
        assert float((got - want).abs().max()) == 0.0
def test_scorers_record_the_chosen_hyperparameters(banks: dict[str, FeatureBank]) -> None:
    scorers = {s.name: s for s in detector_scorers(["knn", "msp", "dice"], {}, banks, tune=True)}
    assert scorers["knn"].tuned and set(scorers["knn"].hparams) == {"k", "index"}
    assert not scorers["msp"].tuned and scorers["msp"].hparams == {}
    assert not scorers["dice"].tuned and scorers["dice"].hparams == {"p": 90}  # a one-point grid is no search
    fitted = build_detector("knn", k=scorers["knn"].hparams["k"]).fit(banks["train"])
    torch.testing.assert_close(scorers["knn"].score("val"), fitted.score(banks["val"]))



def test_data_facts_reach_only_detectors_that_take_them() -> None:
    from ood.evaluation.scoring import with_data_facts

    params = with_data_facts(["odin", "msp", "knn"], {"knn": {"k": 5}}, {"input_std": (0.25,)})
    assert params == {"odin": {"input_std": (0.25,)}, "msp": {}, "knn": {"k": 5}}
    explicit = with_data_facts(["odin"], {"odin": {"input_std": 1.0}}, {"input_std": (0.25,)})
    assert explicit == {"odin": {"input_std": 1.0}}


def test_benchmarks_expose_their_normalisation_std() -> None:
    from ood.data import CIFAR10Benchmark, DigitsBenchmark

    digits = DigitsBenchmark()
    assert digits.input_std == (digits._stats[1],)
    assert CIFAR10Benchmark("/nonexistent").input_std == CIFAR10Benchmark.std


def test_a_nan_feature_is_named_with_its_split() -> None:
    banks = {split: FeatureBank(logits=torch.zeros(4, 3), features=torch.ones(4, 6)) for split in ("test", "svhn")}
    banks["svhn"].features[2, 5] = float("nan")
    with pytest.raises(NonFiniteError, match=r"^split svhn: 1 of 24 feature values are NaN or infinite$"):
        check_banks_finite(banks)
    banks["svhn"].features[2, 5] = 1.0
    banks["test"].logits[0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"^split test: 3 of 12 logit values are NaN or infinite$"):
        check_banks_finite(banks)


def test_an_id_label_outside_the_networks_classes_is_named_with_its_split() -> None:
    """A Dataset whose labels do not index the network's outputs (e.g. 5 labels for a 3-class head) stops the
    evaluation instead of giving a wrong accuracy; OOD sets' labels are not ID classes and are not checked."""
    splits = [EvalSplit("train", "fit"), EvalSplit("test", "id_test"), EvalSplit("svhn", "ood", "far")]
    banks = {s.name: FeatureBank(logits=torch.zeros(4, 3), features=torch.ones(4, 6), labels=torch.tensor([0, 1, 2, 1]))
             for s in splits}
    banks["svhn"].labels = torch.tensor([7, 7, -1, 9])
    check_id_labels(banks, splits)
    banks["test"].labels = torch.tensor([0, 4, 3, 4])
    with pytest.raises(ConfigError, match=r"^split test: 3 labels outside the network's 3 classes 0\.\.2 \(e\.g\. \[3, 4\]\)"):
        check_id_labels(banks, splits)


def test_results_file_is_written_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`results.jsonl` marks a run complete for `ood-report`: a run that dies while writing its scores or figures
    leaves none (a SIGKILL there left a results.jsonl without scores.npz, reported as a finished run)."""
    import json
    from types import SimpleNamespace

    from ood.evaluation import sinks
    from ood.evaluation.evaluator import EvaluationResult

    row = {"method": "ce", "detector": "msp", "ood_dataset": "noise", "ood_group": "far", "auroc": 0.75}
    result = EvaluationResult([row], {"msp": {"test": torch.tensor([1.0, 2.0])}}, 0.5, "ce")
    context = SimpleNamespace(is_global_zero=True)  # a SinkContext's only field ResultsWriter reads

    def die(*args: object) -> None:
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(sinks, "save_run_figures", die)
    with pytest.raises(RuntimeError, match="killed while writing"):
        sinks.ResultsWriter(str(tmp_path)).write(result, context)
    assert (tmp_path / "scores.npz").is_file() and not (tmp_path / "results.jsonl").exists()
    monkeypatch.setattr(sinks, "save_run_figures", lambda *args: [])
    sinks.ResultsWriter(str(tmp_path)).write(result, context)
    assert [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()] == [row]


def test_a_writer_killed_midway_leaves_no_earlier_results_beside_its_new_scores(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-evaluation into a folder with complete results, killed while it wrote its scores, left its new
    scores.npz beside the earlier evaluation's results.jsonl, which `ood-report` read as one set; the earlier
    results.jsonl now goes before any file is replaced, so the run reads as killed."""
    from types import SimpleNamespace

    import numpy as np

    from ood.evaluation import sinks
    from ood.evaluation.evaluator import EvaluationResult

    row = {"method": "ce", "detector": "msp", "ood_dataset": "noise", "ood_group": "far", "auroc": 0.75}
    context = SimpleNamespace(is_global_zero=True)  # a SinkContext's only field ResultsWriter reads
    monkeypatch.setattr(sinks, "save_run_figures", lambda *args: [])
    sinks.ResultsWriter(str(tmp_path)).write(EvaluationResult([row], {"msp": {"test": torch.tensor([1.0])}}, 0.5, "ce"),
                                             context)
    assert (tmp_path / "results.jsonl").is_file()

    def die(*args: object) -> None:
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(sinks, "save_run_figures", die)
    energy = EvaluationResult([{**row, "detector": "energy"}], {"energy": {"test": torch.tensor([2.0])}}, 0.5, "ce")
    with pytest.raises(RuntimeError, match="killed while writing"):
        sinks.ResultsWriter(str(tmp_path)).write(energy, context)
    with np.load(tmp_path / "scores.npz") as npz:
        assert npz["energy/test"].tolist() == [2.0]
    assert not (tmp_path / "results.jsonl").exists()


def test_results_writer_without_figures_draws_none_and_leaves_no_stale_ones(tmp_path: Path) -> None:
    """`evaluation.sinks.results.figures=false` writes the results without figures/roc.png and hist_*.png, and
    removes those an earlier run into the same folder left (they would be taken for this run's)."""
    from types import SimpleNamespace

    from ood.evaluation import sinks
    from ood.evaluation.evaluator import EvaluationResult

    rows = [{"method": "ce", "detector": "msp", "ood_dataset": "noise", "ood_group": "far", "auroc": 0.75,
             "id_dataset": "toy", "seed": 0}]
    result = EvaluationResult(rows, {"msp": {"test": torch.tensor([1.0, 2.0, 3.0]), "noise": torch.tensor([0.5, 2.5])}},
                              0.5, "ce")
    context = SimpleNamespace(is_global_zero=True)  # a SinkContext's only field ResultsWriter reads
    sinks.ResultsWriter(str(tmp_path)).write(result, context)
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["hist_msp.png", "roc.png"]
    sinks.ResultsWriter(str(tmp_path), figures=False).write(result, context)
    assert not list((tmp_path / "figures").iterdir()) and (tmp_path / "results.jsonl").is_file()
    assert (tmp_path / "scores.npz").is_file()


def test_constant_negative_zero_scores_warn_with_zero(caplog: pytest.LogCaptureFixture) -> None:
    """Every image scored -0.0 (a ReLU'd score times -1) was warned of as the same score `(-0)`: it says `(0)`."""
    from ood.evaluation.scoring import Scorer, evaluate

    splits = [EvalSplit("test", "id_test"), EvalSplit("svhn", "ood", "far")]
    flat = Scorer("react", lambda split: torch.full((3,), -0.0))
    with caplog.at_level(logging.WARNING):
        evaluate([flat], splits, id_acc=1.0, info={})
    assert [r.getMessage() for r in caplog.records] == [
        "detector react gives every ID test and OOD image the same score (0): its AUROC 50 and FPR95 100 say nothing "
        "about the data"]


@pytest.mark.parametrize(("modes", "csid", "message"), [
    (("fsood",), [0.0, 2.0], None),
    (("standard", "fsood"), [1.0, 1.0], "detector flat gives every ID test, csid and OOD image the same score (1): its "
                                        "AUROC 50 and FPR95 100 say nothing about the data"),
    (("standard", "fsood"), [0.0, 2.0], "detector flat gives every ID test and OOD image the same score (1): its AUROC "
                                        "50 and FPR95 100 in the standard rows say nothing about the data"),
])
def test_the_same_score_warning_covers_the_csid_sets_full_spectrum_rows_rank(
    modes: tuple[str, ...], csid: list[float], message: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning looked at ID test and OOD only: full-spectrum rows, which rank the csid sets too, were warned of
    when only the csid scores differed, and named no csid set when those were alike too."""
    from ood.evaluation.scoring import Scorer, evaluate

    splits = [EvalSplit("test", "id_test"), EvalSplit("svhn", "ood", "far"), EvalSplit("blur", "csid")]
    flat = Scorer("flat", lambda split: torch.tensor(csid) if split == "blur" else torch.ones(2))
    with caplog.at_level(logging.WARNING):
        evaluate([flat], splits, id_acc=1.0, info={}, modes=modes, csid_acc={"blur": 1.0})
    assert [r.getMessage() for r in caplog.records] == ([message] if message else [])


def _best_point(name: str, grid: dict[str, list], banks: dict[str, FeatureBank]) -> dict:
    """The point of `grid` with the highest val AUROC, the first in OpenOOD's order among ties, by brute force."""
    fit_bank = banks[detector_class(name).fit_split]
    aurocs = [(_val_auroc(build_detector(name, **p).fit(fit_bank), banks), p) for p in sweep_order(grid)]
    return next(p for a, p in aurocs if a == max(a for a, _ in aurocs))


def test_a_list_for_a_one_value_hyperparameter_is_its_tuning_grid(
    banks: dict[str, FeatureBank], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`detectors.params.knn.k=[100,10,50]` (OpenOOD's `K_list`) passed the range check and failed after the network
    pass ('>' not supported between 'list' and 'int'): it is knn's grid in place of its own, searched as the built-in
    one is (one index, one search per split at the largest k: the points share one fit); gen's gamma list replaces
    gamma's grid, M keeps its own; residual's dim, which has none, gets one."""
    searches: list[int] = []
    adds: list[int] = []
    search, add = KNNIndex.search, KNNIndex.add
    monkeypatch.setattr(KNNIndex, "search", lambda self, q, k: searches.append(k) or search(self, q, k))
    monkeypatch.setattr(KNNIndex, "add", lambda self, x, *rest: adds.append(len(x)) or add(self, x, *rest))
    det, tuned = fit_detector("knn", {"k": [100, 10, 50]}, banks, tune=True)
    assert searches == [100, 100] and adds == [400]
    assert tuned and det.k == _best_point("knn", {"k": [100, 10, 50]}, banks)["k"]
    gen_grid = {"gamma": [1.0, 0.1], "M": list(detector_class("gen").grid["M"])}
    det, tuned = fit_detector("gen", {"gamma": [1.0, 0.1]}, banks, tune=True)
    assert tuned and (det.gamma, det.M) == tuple(_best_point("gen", gen_grid, banks).values())
    det, tuned = fit_detector("residual", {"dim": [2, 8]}, banks, tune=True)
    assert tuned and det.dim == _best_point("residual", {"dim": [2, 8]}, banks)["dim"]


def test_a_users_grid_is_recorded_as_tuned_and_a_one_value_list_as_fixed(banks: dict[str, FeatureBank]) -> None:
    params = {"knn": {"k": [10, 50]}, "gen": {"gamma": [1.0, 0.1]}, "residual": {"dim": [2, 8]}, "react": {"percentile": [95]}}
    scorers = {s.name: s for s in detector_scorers(["knn", "gen", "residual", "react"], params, banks, tune=True)}
    assert {n: s.tuned for n, s in scorers.items()} == {"knn": ["k"], "gen": ["M", "gamma"], "residual": ["dim"], "react": []}
    assert scorers["knn"].hparams == {"k": _best_point("knn", {"k": [10, 50]}, banks)["k"], "index": "exact"}
    assert scorers["react"].hparams == {"percentile": 95}


def test_a_grid_with_tuning_off_is_refused_in_one_line(banks: dict[str, FeatureBank]) -> None:
    """A list asks for a search: with detectors.tune=false it is refused before the network pass (the evaluator is
    made as the run starts), and by tuning's own entry alike; a one-value list is that value."""
    message = (r"^detector 'knn': k=\[10, 50\] lists values to tune on validation OOD, and tuning is off "
               r"\(detectors\.tune=false\); give one value, e.g\. k=10$")
    with pytest.raises(ConfigError, match=message):
        Evaluator(["knn"], params={"knn": {"k": [10, 50]}}, tune=False)
    with pytest.raises(ConfigError, match=message):
        fit_detector("knn", {"k": [10, 50]}, banks, tune=False)
    det, tuned = fit_detector("knn", {"k": [10]}, banks, tune=False)
    assert (det.k, tuned) == (10, False)
    assert Evaluator(["knn"], params={"knn": {"k": [10]}}, tune=False).params == {"knn": {"k": [10]}}


def test_a_grid_given_on_the_command_line_reaches_the_rows(tmp_path: Path) -> None:
    """End to end from the overrides `ood-eval` and `ood.evaluate(overrides=[...])` take (no `+` needed) to the
    result rows: knn's k searched over the user's list, recorded tuned; cached banks, no network."""
    from helpers import compose_config

    from ood import CONFIG_DIR
    from ood.methods import CrossEntropy
    from ood.models import SmallCNN
    from ood.runs.checks import check_overrides
    from ood.utils import instantiate

    args = check_overrides(CONFIG_DIR, "eval", ["detectors.names=[knn]", "detectors.params.knn.k=[100,10,50]"])
    evaluator = instantiate(compose_config(tmp_path, args, "eval").evaluation.evaluator)
    banks = synthetic_banks()
    splits = [EvalSplit("test", "id_test"), EvalSplit("ood", "ood", "far")]
    rows = evaluator.evaluate(CrossEntropy(SmallCNN(6), optimizer=torch.optim.SGD), banks, splits, "synthetic").rows
    (row,) = [r for r in rows if r["detector"] == "knn"]
    k = _best_point("knn", {"k": [100, 10, 50]}, banks)["k"]
    assert (row["detector_params"], row["tuned"], row["tuned_params"]) == ({"k": k, "index": "exact"}, True, ["k"])
    fitted = build_detector("knn", k=k).fit(banks["train"])
    assert row["auroc"] == ood_metrics(fitted.score(banks["test"]), fitted.score(banks["ood"]))["auroc"]


def test_a_grid_point_the_detector_refuses_is_named_before_the_network_pass() -> None:
    """vra's percentile_low must stay below percentile_high: a list (or a fixed value) reaching above its
    percentile_high grid stopped the search after the network pass; the evaluator, made as the run starts, names
    the point."""
    with pytest.raises(ConfigError, match=r"^detector 'vra': percentile_low=90 must be below percentile_high=85, at the "
                                          r"point \{'percentile_high': 85, 'percentile_low': 90\} of its tuning grid$"):
        Evaluator(["vra"], params={"vra": {"percentile_low": [10, 90]}})
    with pytest.raises(ConfigError, match=r"^detector 'vra': percentile_low=95 must be below percentile_high=90$"):
        Evaluator(["vra"], params={"vra": {"percentile_low": 95}}, tune=False)
    Evaluator(["vra"], params={"vra": {"percentile_low": [10, 50]}})


def test_the_rows_of_a_detector_tuned_over_a_users_list_record_that_grid() -> None:
    """`tuned_grid` names, per key, the user's list tuning searched (knn's k; gen's gamma, not M: its own grid), so
    `ood-report` tells an evaluation over `k=[10, 50]` from one over knn's own grid; a one-value list is fixed, a
    list with no validation OOD is not searched: no `tuned_grid`. Rows of a run without lists gain no key."""
    from ood.evaluation.scoring import evaluate

    banks = synthetic_banks()
    splits = [EvalSplit("test", "id_test"), EvalSplit("ood", "ood", "far")]
    names = ["msp", "knn", "gen", "react"]
    params = {"knn": {"k": [10, 50]}, "gen": {"gamma": [1.0, 0.1]}, "react": {"percentile": [95]}}
    rows, _ = evaluate(detector_scorers(names, params, banks, tune=True), splits, id_acc=1.0, info={})
    assert {r["detector"]: r.get("tuned_grid", "absent") for r in rows} == {
        "msp": "absent", "knn": {"k": [10, 50]}, "gen": {"gamma": [1.0, 0.1]}, "react": "absent"}
    assert {r["detector"]: r["tuned_params"] for r in rows} == {"msp": [], "knn": ["k"], "gen": ["M", "gamma"], "react": []}
    untuned = {k: v for k, v in banks.items() if k != "val_ood"}
    rows, _ = evaluate(detector_scorers(["knn"], params, untuned, tune=True), splits, id_acc=1.0, info={})
    assert [("tuned_grid" in r, r["tuned"]) for r in rows] == [(False, False)]
    rows, _ = evaluate(detector_scorers(names, {}, banks, tune=True), splits, id_acc=1.0, info={})
    assert {tuple(r) for r in rows} == {("detector", "ood_dataset", "ood_group", "mode", "auroc", "aupr_in", "aupr_out",
                                        "fpr95", "fpr95_oodpos", "id_acc", "n_id", "n_ood", "detector_params", "tuned",
                                        "tuned_params")}
