"""Activation-shaping detectors: modify the pooled penultimate vector h (or the head), then score the energy
LSE(W h' + b). All act on the pooled vector, as OpenOOD v1.5 does, so they run from the cached features.

- ReAct, Sun, Guo & Li, NeurIPS 2021 (arXiv 2111.12797): h' = min(h, t), t the `percentile`-th percentile
  (0-100, linear interpolation as `np.percentile`) of all ID-val activations (OpenOOD fits t on ID-val).
- ASH-B, Djurisic et al., "Extremely Simple Activation Shaping for Out-of-Distribution Detection", ICLR 2023
  (arXiv 2209.09858): keep the top k = D - round(D p / 100) entries of h, set them to sum(h) / k, zero the rest.
  Deviation from the paper (as OpenOOD): applied to the pooled vector, not to the feature maps.
- DICE, Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution Detection", ECCV 2022
  (arXiv 2111.09805): keep the weights w_cd whose contribution mean_train(h_d) * w_cd exceeds the p-th
  percentile of all C x D contributions; score LSE((W * M) h + b).
- SCALE, Xu et al., "Scaling for Training Time and Post-hoc Out-of-Distribution Detection Enhancement",
  ICLR 2024 (arXiv 2310.00227): h' = h * exp(sum(h) / sum(top-k h)), k as ASH.
- VRA, Xu et al., "VRA: Variational Rectified Activation for Out-of-distribution Detection", NeurIPS 2023
  (arXiv 2302.11716), in OpenOOD's penultimate form (openood/postprocessors/vra_postprocessor.py):
  h' = clip(h, t_low, t_high), both thresholds percentiles of all ID-val activations; grid OpenOOD's
  percentile_high {85, 90, 95, 99} x percentile_low {1, 5, 10, 15}. The paper's full VRA also shifts the kept
  band (z + gamma), OpenOOD's does not; pytorch-ood's `VRA` clips feature maps with per-dimension percentiles of
  the train features, OpenOOD (followed here) one pair of thresholds over all pooled ID-val activations.
- LTS (Logit Scaling), Djurisic, Liu & Nikolic, "Logit Scaling for Out-of-Distribution Detection", arXiv
  2409.01175, as the authors' code (andrijazz/lts, `lts.py` and its README's `get_score(logits * s)`; OpenOOD has
  none): score = LSE(f * s), s = (sum(h+) / sum(top-k h+))^2 with h+ = max(h, 0) and k as ASH/SCALE (the authors'
  `percentile`, default 65). No published grid: tuned over SCALE's OpenOOD grid {65, ..., 95}.
  pytorch-ood's `LTS` (detector/lts.py) differs: it divides the logits by s (T = s, LSE(f / T)) and takes the top
  fraction p = 0.05 without the ReLU; on the digits benchmark that form ranks far OOD above ID (AUROC 0.19 on
  Gaussian noise), so the authors' form is followed. Deviation: a row whose top-k sum is 0 (h+ = 0) gets s = 1.
Deviation (ASH, SCALE, LTS): k is at least 1. The references' k = D - round(D p / 100) is 0 once D p / 100
rounds to D (e.g. p = 99 on D <= 50 features), where they zero every feature: ASH scores the constant LSE(b),
SCALE and LTS divide by the zero top-k sum (non-finite scores).
ASH, SCALE and LTS need nothing fitted; ReAct and VRA fit thresholds on ID-val, DICE its mask on train (OpenOOD's
choices). State: two floats (ReAct, VRA), the C x D mask (DICE). ReAct, VRA and LTS score chunk by chunk in float64
(float16 banks too); the percentiles go through one float64 copy of the ID-val activations.
"""

from __future__ import annotations

import numpy as np
import torch

from ood.detectors.base import PERCENTILE, Detector
from ood.detectors.logits import energy_score, head_logits
from ood.detectors.mahalanobis import row_chunks
from ood.errors import ConfigError
from ood.features.bank import FeatureBank


def percentile(values: torch.Tensor, q: float) -> float:
    """The q-th percentile (0-100) of all entries, linear interpolation (`np.percentile`), any size."""
    return float(np.percentile(values.detach().to("cpu", torch.float64).numpy().reshape(-1), q))


def clipped_energy(bank: FeatureBank, low: float | None, high: float) -> torch.Tensor:
    """LSE(W clip(h, low, high) + b) (`low` None: no lower bound), clipped and through the head in float64 chunk by
    chunk: clipped in a float16 or bfloat16 bank's own dtype, the thresholds were rounded to it (react's scores ~3e-4
    relative off those of the float32 bank of the same values)."""
    clipped = (bank.features[rows].double().clamp(low, high) for rows in row_chunks(len(bank)))
    return torch.cat([energy_score(head_logits(h, bank)) for h in clipped])


def kept_count(dim: int, p: float) -> int:
    """ASH/SCALE's k = D - round(D p / 100), at least 1."""
    return max(1, dim - int(np.round(dim * p / 100.0)))


class ReAct(Detector):
    """LSE(W min(h, t) + b), t a percentile of the ID-val activations."""

    name = "react"
    reads_head = True
    float16_features = True
    ranges = {"percentile": PERCENTILE}
    fit_split = "val"
    grid = {"percentile": [85, 90, 95, 99]}

    def __init__(self, percentile: float = 90) -> None:
        self.percentile = percentile

    def fit(self, bank: FeatureBank) -> ReAct:
        self.threshold_ = percentile(bank.features, self.percentile)
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return clipped_energy(bank, None, self.threshold_)


class ASH(Detector):
    """LSE(W a + b), a = ASH-B of h: top-k entries set to sum(h)/k, the rest zeroed."""

    name = "ash"
    reads_head = True
    ranges = {"percentile": PERCENTILE}
    grid = {"percentile": [65, 70, 75, 80, 85, 90, 95]}
    score_params = frozenset({"percentile"})

    def __init__(self, percentile: float = 90) -> None:
        self.percentile = percentile

    def score(self, bank: FeatureBank) -> torch.Tensor:
        h = bank.features.double()
        k = kept_count(h.shape[1], self.percentile)
        _, idx = h.topk(k, dim=1)
        shaped = torch.zeros_like(h).scatter_(1, idx, (h.sum(1, keepdim=True) / k).expand(-1, k))
        return energy_score(head_logits(shaped, bank))


class DICE(Detector):
    """LSE((W * M) h + b), M keeping the weights whose mean train contribution exceeds its p-th percentile."""

    name = "dice"
    reads_head = True
    ranges = {"p": PERCENTILE}
    grid = {"p": [90]}

    def __init__(self, p: float = 90) -> None:
        self.p = p

    def fit(self, bank: FeatureBank) -> DICE:
        w, _ = bank.head()
        contrib = bank.features.double().mean(0)[None, :] * w.double()
        self.mask_ = contrib > percentile(contrib, self.p)
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        w, _ = bank.head()
        return energy_score(head_logits(bank.features, bank, weight=w * self.mask_.to(w.device)))


class Scale(Detector):
    """LSE(W h e^r + b), r = sum(h) / sum(top-k h)."""

    name = "scale"
    reads_head = True
    ranges = {"percentile": PERCENTILE}
    grid = {"percentile": [65, 70, 75, 80, 85, 90, 95]}
    score_params = frozenset({"percentile"})

    def __init__(self, percentile: float = 85) -> None:
        self.percentile = percentile

    def score(self, bank: FeatureBank) -> torch.Tensor:
        h = bank.features.double()
        top = h.topk(kept_count(h.shape[1], self.percentile), dim=1).values
        total = top.sum(1)
        # an all-zero h is unchanged by any scale: r = 0 there instead of 0/0
        r = torch.where(total != 0, h.sum(1) / torch.where(total != 0, total, 1.0), 0.0)
        return energy_score(head_logits(h * r.exp()[:, None], bank))


class VRA(Detector):
    """LSE(W clip(h, t_low, t_high) + b), both thresholds percentiles of the ID-val activations."""

    name = "vra"
    reads_head = True
    ranges = {"percentile_high": PERCENTILE, "percentile_low": PERCENTILE}
    fit_split = "val"
    grid = {"percentile_high": [85, 90, 95, 99], "percentile_low": [1, 5, 10, 15]}
    float16_features = True

    def __init__(self, percentile_high: float = 90, percentile_low: float = 10) -> None:
        if not percentile_low < percentile_high:  # the clip would map every activation to one value: constant scores
            raise ConfigError(f"detector 'vra': percentile_low={percentile_low!r} must be below percentile_high={percentile_high!r}")
        self.percentile_high = percentile_high
        self.percentile_low = percentile_low

    def fit(self, bank: FeatureBank) -> VRA:
        values = bank.features.detach().to("cpu", torch.float64).numpy().reshape(-1)
        self.threshold_low_, self.threshold_high_ = (float(t) for t in np.percentile(values, [self.percentile_low, self.percentile_high]))
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return clipped_energy(bank, self.threshold_low_, self.threshold_high_)


class LTS(Detector):
    """LSE(f * s), s = (sum(h+) / sum(top-k h+))^2: the logits scaled by a per-sample factor from the activations."""

    name = "lts"
    ranges = {"percentile": PERCENTILE}
    grid = {"percentile": [65, 70, 75, 80, 85, 90, 95]}
    score_params = frozenset({"percentile"})
    float16_features = True

    def __init__(self, percentile: float = 65) -> None:
        self.percentile = percentile

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return torch.cat([self._score(bank.features[rows].double(), bank.logits[rows]) for rows in row_chunks(len(bank))])

    def _score(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        h = h.clamp_min(0)
        top = h.topk(kept_count(h.shape[1], self.percentile), dim=1).values.sum(1)
        factor = torch.where(top > 0, h.sum(1) / torch.where(top > 0, top, 1.0), 1.0).square()
        return energy_score(logits.double() * factor[:, None])
