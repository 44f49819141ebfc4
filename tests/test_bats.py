"""`bats` (BATS, Zhu et al., NeurIPS 2022) against a literal transcription of the authors' released code
(alibaba/easyrobust examples/ood_detection/BATS/test_ood.py `iterate_data_energy` with bats=True: two `torch.where`
and `forward_head`, temper 1), its mean / std the ID-train statistics `ood/detectors/bats.py` states, and a known
answer by hand. lam is score-only with the default `score_grid`: tests/test_sensitivity.py (`-k registered_cached`)
checks each tuned point bit for bit; the registry contract runs in test_detectors*.py."""

from __future__ import annotations

import math

import pytest
import torch
from fabricate import centred_banks

from ood.detectors import DetectorNotApplicable, build_detector
from ood.features.bank import FeatureBank


def released_scores(bank: FeatureBank, lam: float, feature_std: torch.Tensor, feature_mean: torch.Tensor) -> torch.Tensor:
    """`iterate_data_energy(..., temper=1, lam, feature_std, feature_mean, bats=True)` on the cached pooled features
    (`forward_features`), `forward_head` the bank's final layer; the code's float32 (its .pt files are float32)."""
    temper = 1
    features = bank.features
    features = torch.where(features < (feature_std * lam + feature_mean), features, feature_std * lam + feature_mean)
    features = torch.where(features > (-feature_std * lam + feature_mean), features, -feature_std * lam + feature_mean)
    logits = torch.nn.functional.linear(features, bank.weight, bank.bias)
    return temper * (torch.logsumexp(logits / temper, dim=1))


@pytest.fixture(scope="module")
def banks() -> dict[str, FeatureBank]:
    return centred_banks(11, {"train": 240, "test": 90, "ood": 90}, ood_labelled=False)


@pytest.mark.parametrize("lam", [0.5, 1.05, 3.25])
def test_bats_equals_the_released_code(banks: dict[str, FeatureBank], lam: float) -> None:
    """The transcription fed the statistics bats.py states (per-dimension mean and sample std of the ID-train
    features, as float32 tensors like the code's files), on ID and OOD rows: to 1e-5 (its float32 vs float64 here).
    The fitted statistics are those, to float64 rounding; the clip changes the scores (the comparison tells it)."""
    train = banks["train"].features.double()
    mean, std = train.mean(0), train.std(0)
    det = build_detector("bats", lam=lam).fit(banks["train"])
    torch.testing.assert_close(det.mean_, mean, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(det.std_, std, rtol=1e-13, atol=1e-13)
    for split in ("test", "ood"):
        expected = released_scores(banks[split], lam, std.float(), mean.float()).double()
        torch.testing.assert_close(det.score(banks[split]), expected, rtol=1e-5, atol=1e-5)
        unclipped = released_scores(banks[split], 1e10, std.float(), mean.float()).double()
        assert (unclipped - expected).abs().max() > 1e-2


def test_bats_known_answer() -> None:
    """Train features (0, 1), (2, 3), (4, 2): means (2, 2), sample stds (2, 1) (population ones would be sqrt(8/3),
    sqrt(2/3)). Identity head, zero bias. lam = 1: bands [0, 4] x [1, 3]: (5, 0) -> (4, 1), (1, 2.5) kept,
    (-1, 10) -> (0, 3). lam = 2: bands [-2, 6] x [0, 4]: (5, 0) kept, (1, 2.5) kept, (-1, 10) -> (-1, 4)."""
    weight, bias = torch.eye(2), torch.zeros(2)
    h = torch.tensor([[0.0, 1], [2, 3], [4, 2]])
    train = FeatureBank(logits=h @ weight.T + bias, features=h, labels=torch.tensor([0, 1, 0]), weight=weight, bias=bias)
    x = torch.tensor([[5.0, 0], [1, 2.5], [-1, 10]])
    test = FeatureBank(logits=x @ weight.T + bias, features=x, weight=weight, bias=bias)
    det = build_detector("bats", lam=1).fit(train)
    assert det.mean_.tolist() == [2.0, 2.0] and det.std_.tolist() == [2.0, 1.0]

    def lse(a: float, b: float) -> float:
        return math.log(math.exp(a) + math.exp(b))

    expected = {1: [lse(4, 1), lse(1, 2.5), lse(0, 3)], 2: [lse(5, 0), lse(1, 2.5), lse(-1, 4)]}
    for lam, scores in expected.items():
        got = build_detector("bats", lam=lam).fit(train).score(test)
        torch.testing.assert_close(got, torch.tensor(scores, dtype=torch.float64), rtol=1e-15, atol=1e-15)


def test_bats_refuses_a_one_row_fit_bank_in_one_line(banks: dict[str, FeatureBank]) -> None:
    """A sample std of one row is NaN (every score NaN): refused, the run skips the detector saying why."""
    with pytest.raises(DetectorNotApplicable, match=r"^bats fits a sample standard deviation per feature, and its fit bank has 1 row"):
        build_detector("bats").fit(banks["train"].subset(torch.arange(1)))
