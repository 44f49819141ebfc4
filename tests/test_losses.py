"""`ood.losses`: each loss against a value computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from ood.losses import outlier_exposure


def test_outlier_exposure_on_a_2x3_example() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    # row 1: log(e + e^2 + e^3) - 2 = 3 + log(1 + e^-1 + e^-2) - 2; row 2: log 3 - 0
    row1 = 1 + math.log(1 + math.exp(-1) + math.exp(-2))
    expected = (row1 + math.log(3)) / 2
    assert float(outlier_exposure(logits)) == pytest.approx(expected, abs=1e-12)
    assert float(outlier_exposure(logits)) == pytest.approx(1.2531091265, abs=1e-9)


def test_outlier_exposure_is_cross_entropy_to_the_uniform_distribution() -> None:
    logits = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    uniform_ce = -(torch.log_softmax(logits, dim=1).mean(1)).mean()
    assert float(outlier_exposure(logits)) == pytest.approx(float(uniform_ce), abs=1e-12)
    assert float(outlier_exposure(torch.zeros(2, 4))) == pytest.approx(math.log(4), abs=1e-6)  # its minimum
