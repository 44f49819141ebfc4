"""`ood_metrics` against scikit-learn (all ROC vertices) on fixtures that are not separable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from ood.errors import NonFiniteError
from ood.metrics import auroc_pairs, ood_metrics


def sklearn_reference(id_s: np.ndarray, ood_s: np.ndarray) -> dict[str, float]:
    """The four metrics computed OpenOOD's way with scikit-learn, but keeping every ROC vertex."""
    s = np.concatenate([id_s, ood_s]).astype(np.float64)
    y = np.concatenate([np.ones(len(id_s)), np.zeros(len(ood_s))])

    def fpr_at_95(labels: np.ndarray, scores: np.ndarray) -> float:
        fpr, tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
        return float(fpr[np.argmax(tpr >= 0.95)])

    p_in, r_in, _ = skm.precision_recall_curve(y, s)
    p_out, r_out, _ = skm.precision_recall_curve(1 - y, -s)
    return {
        "auroc": skm.roc_auc_score(y, s),
        "aupr_in": skm.auc(r_in, p_in),
        "aupr_out": skm.auc(r_out, p_out),
        "fpr95": fpr_at_95(y, s),
        "fpr95_oodpos": fpr_at_95(1 - y, -s),
    }


def _fixtures() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    logits_id = rng.normal(0, 1, (400, 10)) + 25 * np.eye(10)[rng.integers(0, 10, 400)] * (rng.random((400, 1)) < 0.3)
    logits_ood = rng.normal(0, 1, (900, 10)) + 20 * np.eye(10)[rng.integers(0, 10, 900)] * (rng.random((900, 1)) < 0.18)
    msp32 = lambda z: torch.softmax(torch.tensor(z, dtype=torch.float32), 1).max(1).values.numpy()  # noqa: E731
    return {
        "asymmetric": (rng.normal(1.0, 1.0, 300), rng.normal(0.0, 2.0, 1700)),
        "tied": (np.round(rng.normal(0.8, 1.0, 500)), np.round(rng.normal(0.0, 1.0, 800))),
        "float32_saturated_msp": (msp32(logits_id), msp32(logits_ood)),
        "large_magnitude": (rng.normal(-1.0e4, 30.0, 600) , rng.normal(-1.0e4 - 25.0, 40.0, 250)),
        "energy_scale": (rng.normal(300.0, 20.0, 1000), rng.normal(280.0, 20.0, 2000)),
        "all_tied": (np.ones(50), np.ones(70)),
        "tiny": (np.array([0.3, 0.9, 0.1]), np.array([0.2, 0.3])),
    }


@pytest.mark.parametrize("fixture", list(_fixtures()))
def test_matches_sklearn(fixture: str) -> None:
    id_s, ood_s = _fixtures()[fixture]
    ours = ood_metrics(torch.as_tensor(id_s), torch.as_tensor(ood_s))
    ref = sklearn_reference(id_s, ood_s)
    assert set(ours) == set(ref)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
        assert 0.0 <= ours[key] <= 1.0


def test_fixtures_exercise_the_hard_cases() -> None:
    """Guard against fixtures drifting into the easy regime where bugs hide."""
    fx = _fixtures()
    assert 0.6 < ood_metrics(*fx["asymmetric"])["auroc"] < 0.8
    id_msp, ood_msp = fx["float32_saturated_msp"]
    assert (id_msp == 1.0).mean() > 0.2 and (ood_msp == 1.0).mean() > 0.1
    m = ood_metrics(*fx["energy_scale"])
    assert 0.7 < m["auroc"] < 0.8
    assert m["fpr95"] != pytest.approx(m["fpr95_oodpos"])


def test_known_toy_values() -> None:
    """Hand-checkable: ID {3, 2}, OOD {2, 1}: one tie between classes counts half."""
    m = ood_metrics(torch.tensor([3.0, 2.0]), torch.tensor([2.0, 1.0]))
    assert m["auroc"] == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert m["fpr95"] == pytest.approx(0.5)  # accepting both ID needs threshold 2, which accepts one OOD
    assert m["fpr95_oodpos"] == pytest.approx(0.5)


def test_score_direction_is_id_high() -> None:
    m = ood_metrics(torch.arange(10.0) + 100, torch.arange(10.0))
    assert m == pytest.approx({"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0, "fpr95_oodpos": 0.0})


def test_large_input_no_loss_of_precision() -> None:
    rng = np.random.default_rng(1)
    id_s, ood_s = rng.normal(0.5, 1, 200_000), rng.normal(0, 1, 300_000)
    ours, ref = ood_metrics(id_s, ood_s), sklearn_reference(id_s, ood_s)
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], abs=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_are_named(bad: float) -> None:
    with pytest.raises(NonFiniteError, match=r"^energy on svhn: 1 of 2 values are NaN or infinite$"):
        ood_metrics(torch.tensor([1.0, bad]), torch.tensor([0.0]), name="energy on svhn")


#: two tie-free rankings of 6 ID and 7 OOD scores with the same AUROC, 25/42, whose trapezoid sums round apart
EQUAL_AUROC_LOW = ([0, 3, 7, 9, 10, 11], [1, 2, 4, 5, 6, 8, 12])  # 0.5952380952380952
EQUAL_AUROC_HIGH = ([1, 5, 6, 8, 9, 11], [0, 2, 3, 4, 7, 10, 12])  # 0.5952380952380953


def test_auroc_pairs_is_exact_where_the_auroc_rounds_apart() -> None:
    """Twice the correctly ordered (ID, OOD) pairs, a tie once: equal for the two rankings whose floats differ."""
    low, high = (ood_metrics(*map(np.array, r))["auroc"] for r in (EQUAL_AUROC_LOW, EQUAL_AUROC_HIGH))
    assert low < high  # the fault auroc_pairs avoids
    assert auroc_pairs(*map(np.array, EQUAL_AUROC_LOW)) == auroc_pairs(*map(np.array, EQUAL_AUROC_HIGH)) == 50
    assert auroc_pairs(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 0.0])) == 2 * 2 + 1  # (2, 0), (1, 0), tie (2, 2)
