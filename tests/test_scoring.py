"""Detector fitting and tuning (`ood.evaluation.scoring`): validation data only, shared work, model-scored ODIN."""

from __future__ import annotations

import logging

import pytest
import torch
from test_detectors import SYNTHETIC_PARAMS, synthetic  # noqa: F401 - the module-scoped bank fixture

from ood.detectors import DetectorNotApplicable, build_detector, detector_class
from ood.detectors.base import Detector
from ood.evaluation.metrics import ood_metrics
from ood.evaluation.scoring import detector_scorers, fit_detector, grid_points
from ood.features.bank import FeatureBank
from ood.knn import KNNIndex


@pytest.fixture
def banks(synthetic: dict[str, FeatureBank]) -> dict[str, FeatureBank]:  # noqa: F811
    """Train/val/val_ood only, plus a test-OOD bank full of NaN: tuning that touched it would raise."""
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
    """The chosen point maximises val AUROC over the grid (first in grid order on ties); test OOD untouched."""
    det, tuned = fit_detector(name, {}, banks, tune=True)
    assert tuned
    cls = detector_class(name)
    fit_bank = banks[cls.fit_split]
    aurocs = [(_val_auroc(build_detector(name, **p).fit(fit_bank), banks), p) for p in grid_points(cls.grid)]
    best = max(a for a, _ in aurocs)
    first_best = next(p for a, p in aurocs if a == best)
    assert {k: det.hparams[k] for k in first_best} == first_best
    assert _val_auroc(det, banks) == best


def test_fixed_params_and_tune_false_are_not_searched(banks: dict[str, FeatureBank]) -> None:
    det, tuned = fit_detector("knn", {"k": 7}, banks, tune=True)
    assert (det.k, tuned) == (7, False)
    det, tuned = fit_detector("react", {}, banks, tune=False)
    assert (det.percentile, tuned) == (90, False)
    no_val_ood = {k: v for k, v in banks.items() if k != "val_ood"}
    assert fit_detector("knn", {}, no_val_ood, tune=True)[1] is False


def test_knn_tuning_searches_once_per_split(banks: dict[str, FeatureBank], monkeypatch: pytest.MonkeyPatch) -> None:
    """Five k values, one search each on val and val_ood (at the largest k), and one index."""
    searches: list[int] = []
    adds: list[int] = []
    search, add = KNNIndex.search, KNNIndex.add
    monkeypatch.setattr(KNNIndex, "search", lambda self, q, k: searches.append(k) or search(self, q, k))
    monkeypatch.setattr(KNNIndex, "add", lambda self, x: adds.append(len(x)) or add(self, x))
    fit_detector("knn", {}, banks, tune=True)
    assert searches == [400, 400] and adds == [400]  # k=1000 clipped to the 400-row bank


def test_vim_drops_inapplicable_grid_points(banks: dict[str, FeatureBank], caplog: pytest.LogCaptureFixture) -> None:
    """D=16: OpenOOD's grid {256, 1000} has no valid point, so the run skips vim and says why."""
    with pytest.raises(DetectorNotApplicable, match="dim < feature dim D=16"):
        fit_detector("vim", {}, banks, tune=True)
    with caplog.at_level(logging.WARNING):
        scorers = detector_scorers(["vim", "msp"], {}, banks, tune=True)
    assert [s.name for s in scorers] == ["msp"]
    assert "skipping detector vim" in caplog.text and "D=16" in caplog.text
    scorers = detector_scorers(["vim"], {"vim": SYNTHETIC_PARAMS["vim"]}, banks, tune=True)
    assert scorers[0].hparams == {"dim": 8} and not scorers[0].tuned


def test_model_detectors_tune_through_model_scores(banks: dict[str, FeatureBank]) -> None:
    """ODIN is tuned on val / val_ood through the callback's scorer, once per grid point and split."""
    calls: list[tuple[str, float, float]] = []

    def model_scores(det: Detector, split: str) -> torch.Tensor:
        calls.append((split, det.temperature, det.noise))
        # a fake model score whose val AUROC peaks at T=100, noise=0.0028
        shift = 1.0 if (det.temperature, det.noise) == (100, 0.0028) else 0.1
        base = torch.arange(50, dtype=torch.float64)
        return base + (shift * 50 if split == "val" else 0.0)

    det, tuned = fit_detector("odin", {}, banks, tune=True, model_scores=model_scores)
    assert tuned and (det.temperature, det.noise) == (100, 0.0028)
    assert {split for split, *_ in calls} == {"val", "val_ood"} and len(calls) == 2 * 8
    with pytest.raises(DetectorNotApplicable, match="needs the model"):
        fit_detector("odin", {}, banks, tune=True)
    assert detector_scorers(["odin"], {}, banks, tune=True) == []


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
