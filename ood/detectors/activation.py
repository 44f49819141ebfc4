"""Activation-shaping detectors: modify the pooled penultimate vector h (or the head), then score the energy
LSE(W h' + b). All act on the pooled vector, as OpenOOD v1.5 does, so they run from the cached features.

- ReAct, Sun, Guo & Li, NeurIPS 2021 (arXiv 2111.12797): h' = min(h, t), t the `percentile`-th percentile
  (0-100, linear interpolation as `np.percentile`) of all ID-val activations (OpenOOD fits t on ID-val).
- ASH, Djurisic et al., "Extremely Simple Activation Shaping for Out-of-Distribution Detection", ICLR 2023
  (arXiv 2209.09858), its three variants as the authors' code (andrijazz/ash, ash.py `ash_b`, `ash_p`, `ash_s`):
  keep the top k = D - round(D p / 100) entries of h, zero the rest, and
  `ash` (ASH-B): set the kept entries to sum(h) / k (what OpenOOD v1.5's `ash` postprocessor applies, ash_net.py);
  `ash_p` (ASH-P): leave them as they are;
  `ash_s` (ASH-S, the variant the authors' configs run): scale them by exp(s1 / s2), s1 = sum(h) before pruning,
  s2 = sum(top-k h) after. ASH-S on the pooled vector is SCALE's h * exp(s1 / s2) (the same factor) with the
  D - k pruned entries zeroed, where SCALE keeps every entry, scaled.
  Where: on the pooled vector, as the authors' code applies it for its results (`apply_ash` right after the
  average pool in models/resnet_imagenet.py, densenet.py, mobilenetv2.py, on [B, D, 1, 1]) and OpenOOD (ash_net.py,
  the pooled feature); shaping an earlier layer's maps (the code's block-level `use_ash`, off in every model) is
  not offered. Grid: OpenOOD's `ash` percentile_list {65, ..., 95} for all three, default 90 (OpenOOD's `ash`; the
  authors' configs run ash_s@90 on ImageNet ResNet-50 and MobileNet, @95 on CIFAR and ViT, @99 on DenseNet, ash_b@99
  on VGG-16, none ash_p; 99 is a fixed value away: `detectors.params.ash_s.percentile=99`). pytorch-ood's
  `ASH` defaults to variant "ash-s" with the percentile as a fraction (0.65), shaping what its `backbone` gives
  (feature maps in its example): its ASH-S on pooled features is `ash_s` here, not `ash`.
  Deviation (ASH-S, as SCALE): a row whose top-k sum is 0 (its kept entries all 0) gets the factor 1: its shaped
  vector is 0 (score LSE(b)) where the authors' 0 * exp(0 / 0) is NaN.
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
Deviation (the three ASH, SCALE, LTS): k is at least 1. The references' k = D - round(D p / 100) is 0 once D p / 100
rounds to D (e.g. p = 99 on D <= 50 features), where they zero every feature: ASH-B and ASH-P score the constant
LSE(b), ASH-S, SCALE and LTS divide by the zero top-k sum (non-finite scores).
ASH, SCALE and LTS need nothing fitted; ReAct and VRA fit thresholds on ID-val, DICE its mask on train (OpenOOD's
choices). State: two floats (ReAct, VRA), the C x D mask (DICE). Every detector here scores chunk by chunk in float64
and takes float16 banks (`evaluation.feature_dtype=float16`), DICE's train mean summed chunk by chunk too; the percentiles go through one partition copy of the ID-val activations in their own dtype
(float16, float32 or float64; bfloat16 widened to float32: `percentile`).
"""

from __future__ import annotations

import numpy as np
import torch

from ood.detectors.base import PERCENTILE, Detector
from ood.detectors.logits import energy_score, head_logits
from ood.detectors.mahalanobis import feature_mean, row_chunks
from ood.errors import ConfigError
from ood.features.bank import FeatureBank


def percentile(values: torch.Tensor, q: float) -> float:
    """The q-th percentile (0-100) of all entries, linear interpolation: bit for bit `np.percentile` of their float64
    copy, without that copy. The two order statistics around NumPy's virtual index (q / 100) (n - 1) are found by one
    partition of the values in their own float16, float32 or float64 (a bfloat16 bank, which NumPy lacks, widened to
    float32: exact, and the order is the same), then interpolated in float64 by NumPy's own steps (`_lerp`). So a bank
    of 1.28 M x 2048 float32 ImageNet-train features costs one 10 GB float32 partition copy, not a 21 GB float64 copy,
    and a float16 one a 5 GB float16 copy, not a float32 copy and its partition (20 GB); NaN anywhere gives NaN, as
    NumPy's."""
    t = values.detach().cpu()
    flat = (t if t.dtype in (torch.float16, torch.float32, torch.float64) else t.float()).numpy().reshape(-1)
    n = flat.size
    if n == 0:
        raise ValueError("percentile of no values")
    virtual = np.float64(n - 1) * np.true_divide(np.float64(q), 100)
    below = int(np.floor(virtual))
    above = min(below + 1, n - 1)
    part = np.partition(flat, sorted({0, below, above, n - 1}))
    if np.isnan(part[-1]):
        return float("nan")
    a, b = np.float64(part[below]), np.float64(part[above])
    gamma = virtual - np.float64(below)
    diff = b - a
    return float(b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma)


def clipped_energy(bank: FeatureBank, low: float | None, high: float) -> torch.Tensor:
    """LSE(W clip(h, low, high) + b) (`low` None: no lower bound), clipped and through the head in float64 chunk by
    chunk: clipped in a float16 or bfloat16 bank's own dtype, the thresholds were rounded to it (react's scores ~3e-4
    relative off those of the float32 bank of the same values)."""
    clipped = (bank.features[rows].double().clamp(low, high) for rows in row_chunks(len(bank)))
    return torch.cat([energy_score(head_logits(h, bank)) for h in clipped])


def kept_count(dim: int, p: float) -> int:
    """ASH/SCALE's k = D - round(D p / 100), at least 1."""
    return max(1, dim - int(np.round(dim * p / 100.0)))


def top_entries(h: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's top k = `kept_count(D, p)` values and their indices ([N, k] each)."""
    return h.topk(kept_count(h.shape[1], p), dim=1)


def sharpening(h: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """ASH-S's and SCALE's per-row factor exp(sum(h) / sum(top)) ([N]); 1 where the top-k sum is 0 (h is then
    unchanged by SCALE's scaling, its kept entries all 0 for ASH-S) instead of 0/0."""
    total = top.sum(1)
    return torch.where(total != 0, h.sum(1) / torch.where(total != 0, total, 1.0), 0.0).exp()


def ash_b(h: torch.Tensor, p: float) -> torch.Tensor:
    """ASH-B: the top-k entries set to sum(h) / k, the rest zeroed."""
    top, idx = top_entries(h, p)
    return torch.zeros_like(h).scatter_(1, idx, (h.sum(1, keepdim=True) / top.shape[1]).expand_as(top))


def ash_p(h: torch.Tensor, p: float) -> torch.Tensor:
    """ASH-P: the top-k entries kept, the rest zeroed."""
    top, idx = top_entries(h, p)
    return torch.zeros_like(h).scatter_(1, idx, top)


def ash_s(h: torch.Tensor, p: float) -> torch.Tensor:
    """ASH-S: the top-k entries scaled by exp(sum(h) / sum(top-k h)), the rest zeroed."""
    top, idx = top_entries(h, p)
    return torch.zeros_like(h).scatter_(1, idx, top * sharpening(h, top)[:, None])


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
    float16_features = True
    ranges = {"percentile": PERCENTILE}
    grid = {"percentile": [65, 70, 75, 80, 85, 90, 95]}
    score_params = frozenset({"percentile"})
    shaping = staticmethod(ash_b)

    def __init__(self, percentile: float = 90) -> None:
        self.percentile = percentile

    def score(self, bank: FeatureBank) -> torch.Tensor:
        shaped = (self.shaping(bank.features[rows].double(), self.percentile) for rows in row_chunks(len(bank)))
        return torch.cat([energy_score(head_logits(h, bank)) for h in shaped])


class ASHP(ASH):
    """LSE(W a + b), a = ASH-P of h: top-k entries kept, the rest zeroed."""

    name = "ash_p"
    shaping = staticmethod(ash_p)


class ASHS(ASH):
    """LSE(W a + b), a = ASH-S of h: top-k entries scaled by exp(sum(h) / sum(top-k h)), the rest zeroed."""

    name = "ash_s"
    shaping = staticmethod(ash_s)


class DICE(Detector):
    """LSE((W * M) h + b), M keeping the weights whose mean train contribution exceeds its p-th percentile."""

    name = "dice"
    reads_head = True
    float16_features = True
    ranges = {"p": PERCENTILE}
    grid = {"p": [90]}

    def __init__(self, p: float = 90) -> None:
        self.p = p

    def fit(self, bank: FeatureBank) -> DICE:
        w, _ = bank.head()
        contrib = feature_mean(bank.features)[None, :] * w.double()
        self.mask_ = contrib > percentile(contrib, self.p)
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        w, _ = bank.head()
        masked = w * self.mask_.to(w.device)
        return torch.cat([energy_score(head_logits(bank.features[rows], bank, weight=masked)) for rows in row_chunks(len(bank))])


class Scale(Detector):
    """LSE(W h e^r + b), r = sum(h) / sum(top-k h)."""

    name = "scale"
    reads_head = True
    float16_features = True
    ranges = {"percentile": PERCENTILE}
    grid = {"percentile": [65, 70, 75, 80, 85, 90, 95]}
    score_params = frozenset({"percentile"})

    def __init__(self, percentile: float = 85) -> None:
        self.percentile = percentile

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return torch.cat([self._score(bank.features[rows].double(), bank) for rows in row_chunks(len(bank))])

    def _score(self, h: torch.Tensor, bank: FeatureBank) -> torch.Tensor:
        return energy_score(head_logits(h * sharpening(h, top_entries(h, self.percentile).values)[:, None], bank))


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
        self.threshold_low_ = percentile(bank.features, self.percentile_low)
        self.threshold_high_ = percentile(bank.features, self.percentile_high)
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
        top = top_entries(h, self.percentile).values.sum(1)
        factor = torch.where(top > 0, h.sum(1) / torch.where(top > 0, top, 1.0), 1.0).square()
        return energy_score(logits.double() * factor[:, None])
