"""Output-space detectors: functions of the logits alone.

- MSP, Hendrycks & Gimpel, ICLR 2017 (arXiv 1610.02136): max softmax probability, computed as the max
  log-softmax in float64 so that saturated softmax values (margin > ~17 nats in float32) do not tie.
  Monotone in MSP, hence identical AUROC/FPR to OpenOOD's `msp` without its float32 ties.
- MaxLogit (MLS), Hendrycks et al., ICML 2022 (arXiv 1911.11132): max_c f_c.
- Energy (EBO), Liu et al., NeurIPS 2020 (arXiv 2010.03759): T * logsumexp(f / T) (= -energy).
"""

from __future__ import annotations

import torch

from ood.detectors.base import Detector
from ood.evaluation.bank import FeatureBank


def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T * logsumexp(f / T) in float64: the negative free energy, an ID score."""
    return temperature * torch.logsumexp(logits.double() / temperature, dim=1)


class MSP(Detector):
    """max_c softmax(f)_c, scored as its logarithm (monotone, tie-free in float64)."""

    name = "msp"

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return torch.log_softmax(bank.logits.double(), dim=1).max(1).values


class MaxLogit(Detector):
    """max_c f_c."""

    name = "maxlogit"

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return bank.logits.double().max(1).values


class Energy(Detector):
    """T * logsumexp(f / T)."""

    name = "energy"
    grid = {"temperature": [1.0]}

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return energy_score(bank.logits, self.temperature)
