"""`otod` against an independent transcription of the authors' released scoring (HengGao12/OTOD,
`openood/postprocessors/otdp_postprocessor.py`: per-row `scipy.stats.wasserstein_distance` to a constant vector),
and known answers. The registry contract (pickling, NaN rows, empty banks, float64 scores) runs over every registered
detector in `test_detectors.py` / `test_detectors_fidelity.py`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import softmax
from scipy.stats import wasserstein_distance

from ood.detectors import build_detector
from ood.detectors.otod import w1_to_references
from ood.errors import ConfigError
from ood.features.bank import FeatureBank


def normalizer(x: np.ndarray) -> np.ndarray:
    """The released `normalizer`."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True) + 1e-10


def released_scores(logits: np.ndarray, feat: np.ndarray, temperature: float = 3.0) -> np.ndarray:
    """`OTDP.postprocess`, line by line: softmax(logits / T), the three rows normalised, and per row the smaller
    scipy W1 distance to the constant vectors 1/D and 0, averaged with weights 1/3 and negated."""
    probs = normalizer(softmax(logits / temperature, axis=1))
    logits, feat = normalizer(logits), normalizer(feat)
    scores = np.zeros(len(logits))
    for i in range(len(logits)):
        parts = [min(wasserstein_distance(v[i], (1 / v[i].shape[0]) * np.ones_like(v[i])),
                     wasserstein_distance(v[i], np.zeros_like(v[i]))) for v in (feat, logits, probs)]
        scores[i] = -((1 / 3) * parts[0] + (1 / 3) * parts[1] + (1 / 3) * parts[2])
    return scores


@pytest.mark.parametrize("temperature", [3.0, 1.0])
def test_otod_equals_the_released_scoring(temperature: float) -> None:
    gen = torch.Generator().manual_seed(0)
    features = (torch.randn(40, 16, generator=gen) * 2).relu().double()  # post-ReLU, as the penultimate layer
    logits = (torch.randn(40, 5, generator=gen) * 4).double()
    bank = FeatureBank(logits=logits, features=features)
    got = build_detector("otod", temperature=temperature).fit(bank).score(bank)
    want = released_scores(logits.numpy(), features.numpy(), temperature)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    # per sample: a row scored alone gets the score it gets among the others
    alone = build_detector("otod", temperature=temperature).fit(bank).score(FeatureBank(logits=logits[3:4], features=features[3:4]))
    assert float(alone[0]) == pytest.approx(want[3], abs=1e-12)


def test_otod_known_answers() -> None:
    """One-hot features: min(|1 - 1/4| + 3/4, 1) / 4 = 1/4 (the zero reference is nearer); uniform logits (3 classes):
    each entry 1/sqrt(3), distances 1/sqrt(3) - 1/3 to the mean and 1/sqrt(3) to zero; the softmax of equal logits is
    uniform too. Score = -(1/4 + 2 * (1/sqrt(3) - 1/3)) / 3, up to the authors' 1e-10."""
    bank = FeatureBank(logits=torch.zeros(1, 3).double() + 2.0, features=torch.tensor([[0.0, 5.0, 0.0, 0.0]]).double())
    want = -(1 / 4 + 2 * (1 / math.sqrt(3) - 1 / 3)) / 3
    assert float(build_detector("otod").fit(bank).score(bank)[0]) == pytest.approx(want, abs=1e-9)
    # one-hot logits: the zero reference is nearer, 1/3 (the uniform one: (2/3 + 2 * 1/3) / 3 = 4/9); softmax(f / 3)
    # of logits (60, 0, 0) is one-hot to within e^-20, 1/3 as well
    confident = FeatureBank(logits=torch.tensor([[60.0, 0.0, 0.0]]).double(), features=bank.features)
    assert float(build_detector("otod").score(confident)[0]) == pytest.approx(-(1 / 4 + 1 / 3 + 1 / 3) / 3, abs=1e-8)


def test_otod_zero_features_are_finite_and_temperature_is_checked() -> None:
    """A zero feature row (NaN in the released code, 0 / 0) scores finitely: its entries are the authors' 1e-10."""
    bank = FeatureBank(logits=torch.tensor([[2.0, 0.0]]).double(), features=torch.zeros(1, 4).double())
    score = float(build_detector("otod").score(bank)[0])
    probs = torch.softmax(torch.tensor([2.0, 0.0]).double() / 3, 0)
    unit = probs / probs.norm()
    softmax_part = min(float((unit - 0.5).abs().mean()), float(unit.mean()))
    logit_part = min(abs(1 - 0.5) / 2 + 0.5 / 2, 0.5)  # logits (1, 0) after normalising
    assert score == pytest.approx(-(1e-10 + logit_part + softmax_part) / 3, abs=1e-9)
    with pytest.raises(ConfigError, match=r"^detector 'otod': temperature=0\.0 is outside its range \(0, inf\]$"):
        build_detector("otod", temperature=0.0)


@pytest.mark.parametrize(("classes", "one_hot_more_id"), [(2, False), (3, False), (10, True), (100, True)])
def test_otod_softmax_term_ranks_a_one_hot_prediction_as_id_only_beyond_four_classes(classes: int, one_hot_more_id: bool) -> None:
    """The softmax term is 1/C for a one-hot prediction and 1/sqrt(C) - 1/C for a uniform one: the confident row is the
    more ID one only when C > 4 (equal at C = 4, inverted below). Why the 4-class synthetic banks of
    `test_detectors.py` do not separate (AUROC 0.02) while the 6-class digits network does (0.91)."""
    one_hot, uniform = torch.eye(classes)[:1].double(), torch.full((1, classes), 1.0 / classes).double()
    assert float(w1_to_references(one_hot)[0]) == pytest.approx(1 / classes, abs=1e-9)
    assert float(w1_to_references(uniform)[0]) == pytest.approx(1 / math.sqrt(classes) - 1 / classes, abs=1e-9)
    assert (float(w1_to_references(one_hot)[0]) < float(w1_to_references(uniform)[0])) == one_hot_more_id
