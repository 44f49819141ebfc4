"""Output-space detectors: functions of the logits alone (nothing to fit).

- MSP, Hendrycks & Gimpel, ICLR 2017 (arXiv 1610.02136): max softmax probability, computed as the max
  log-softmax in float64 through log1p (`max_log_softmax`) so that saturated softmax values (margin > ~17 nats in
  float32, > ~37 nats for float64's `log_softmax`) do not tie.
  Monotone in MSP, hence identical AUROC/FPR to OpenOOD's `msp` without its float32 ties.
- MaxLogit (MLS), Hendrycks et al., ICML 2022 (arXiv 1911.11132): max_c f_c.
- Energy (EBO), Liu et al., NeurIPS 2020 (arXiv 2010.03759): T * logsumexp(f / T) (= -energy).
- Entropy: -H(p) = sum_c p_c log p_c, the negative predictive entropy; a classic uncertainty baseline (used as
  an OOD score e.g. by Hendrycks et al., Deep Anomaly Detection with Outlier Exposure, ICLR 2019,
  arXiv 1812.04606; pytorch-ood's `Entropy`). Not in OpenOOD; no hyper-parameters.
- OE's cross-entropy score, Hendrycks, Mazeika & Dietterich, "Deep Anomaly Detection with Outlier Exposure",
  ICLR 2019 (arXiv 1812.04606; code github.com/hendrycks/outlier-exposure, `test.py --use_xent`):
  logsumexp_c f_c - mean_c f_c = -(1/C) sum_c log p_c, the cross-entropy from the uniform distribution to the softmax
  (what OE's loss pushes up on outliers), with the sign flipped to an ID score (the code scores OOD-high
  `mean - logsumexp`). Not in OpenOOD; no hyper-parameters.
- GEN, Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution Detection",
  CVPR 2023 (no arXiv version; code github.com/XixiLiu95/GEN): -sum over the top-M probabilities of
  p^gamma (1 - p)^gamma. As OpenOOD's `gen` postprocessor; M larger than C uses all C classes. Tuning sorts
  the probabilities once for the whole (gamma, M) grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ood.detectors.base import COUNT, POSITIVE, Detector
from ood.features.bank import FeatureBank
from ood.losses.energy import free_energy


def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T * logsumexp(f / T) in float64: the negative free energy (`free_energy`, the loss's E), an ID score."""
    return -free_energy(logits.double(), temperature)


def max_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """max_c log softmax(f)_c in float64, as -log1p(sum_{c != argmax} exp(f_c - f_max)): distinct values up to a margin
    of ~745 nats, where `log_softmax(f).max()` rounds to 0 (a tie) beyond a margin of ~37 nats."""
    z = logits.double()
    top = z.max(1, keepdim=True)
    return -torch.log1p(torch.exp(z - top.values).scatter(1, top.indices, 0.0).sum(1))


def head_logits(features: torch.Tensor, bank: FeatureBank, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Logits W h + b (float64) of modified features `h` through the bank's final layer (or `weight`, e.g. masked)."""
    w, b = bank.head()
    w = w if weight is None else weight
    return features.double() @ w.double().T + b.double()


class MSP(Detector):
    """max_c softmax(f)_c, scored as its logarithm (monotone, tie-free in float64)."""

    name = "msp"
    reads_features = False
    min_classes = 2
    float16_features = True

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return max_log_softmax(bank.logits)


class MaxLogit(Detector):
    """max_c f_c."""

    name = "maxlogit"
    reads_features = False
    float16_features = True

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return bank.logits.double().max(1).values


class Energy(Detector):
    """T * logsumexp(f / T)."""

    name = "energy"
    reads_features = False
    ranges = {"temperature": POSITIVE}
    float16_features = True
    grid = {"temperature": [1.0]}
    score_params = frozenset({"temperature"})

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return energy_score(bank.logits, self.temperature)


class Entropy(Detector):
    """sum_c p_c log p_c (negative entropy of the softmax)."""

    name = "entropy"
    reads_features = False
    min_classes = 2
    float16_features = True

    def score(self, bank: FeatureBank) -> torch.Tensor:
        logp = torch.log_softmax(bank.logits.double(), dim=1)
        return (logp.exp() * logp).sum(1)


class OEXent(Detector):
    """logsumexp_c f_c - mean_c f_c (cross-entropy from the uniform distribution to the softmax)."""

    name = "oe_xent"
    reads_features = False
    min_classes = 2
    float16_features = True

    def score(self, bank: FeatureBank) -> torch.Tensor:
        z = bank.logits.double()
        return torch.logsumexp(z, dim=1) - z.mean(1)


class GEN(Detector):
    """-sum_{top-M} p^gamma (1 - p)^gamma (generalised entropy of the largest M probabilities)."""

    name = "gen"
    reads_features = False
    min_classes = 2
    ranges = {"gamma": POSITIVE, "M": COUNT}
    float16_features = True
    grid = {"gamma": [0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0], "M": [10, 50, 100, 200, 500, 1000]}
    score_params = frozenset({"gamma", "M"})

    def __init__(self, gamma: float = 0.1, M: int = 100) -> None:  # noqa: N803 - the paper's name
        self.gamma = gamma
        self.M = M

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return self.score_grid(bank, [{}])[0]

    def score_grid(self, bank: FeatureBank, points: Sequence[dict[str, Any]]) -> list[torch.Tensor]:
        """One softmax and one descending sort shared by every (gamma, M) point."""
        p = torch.softmax(bank.logits.double(), dim=1).sort(dim=1, descending=True).values
        scores = []
        for point in points:
            self.set_params(**point)
            top = p[:, : self.M]
            scores.append(-(top**self.gamma * (1 - top) ** self.gamma).sum(1))
        return scores
