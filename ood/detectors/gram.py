"""Gram-matrix deviations, Sastry & Oore, "Detecting Out-of-Distribution Examples with Gram Matrices", ICML 2020
(arXiv 1912.12510), as OpenOOD's `gram` postprocessor (`openood/postprocessors/gram_postprocessor.py`,
`configs/postprocessors/gram.yml`: powers 1..5, no sweep).

For every output z_l [C_l, HW] of a Conv2d or ReLU module of the backbone (OpenOOD hooks exactly those) and power
p in 1..5: G_lp = row sums of (z_l^p)(z_l^p)^T, signed p-th root ([C_l]). On the train split, per true class c,
90 % of the samples (random, `seed`) give elementwise min/max m_lpc, M_lpc; the other 10 % give the layer's
normaliser n_l = mean over them of sum_p delta(G_lp; m_lpc, M_lpc), with
delta(g; m, M) = sum_i relu(m_i - g_i) / |m_i + 1e-6| + relu(g_i - M_i) / |M_i + 1e-6|.
score(x) = -sum_l sum_p delta(G_lp(x); m_lpc, M_lpc) / n_l / max_c softmax(f(x))_c, c = argmax f(x).

The G_lp rows are computed in the single evaluation pass (layer taps, `ood.detectors.network`) and cached as
`extras['gram.<module>']`: 5 * sum_l C_l floats per sample, never the maps (a module that runs several times per
pass, e.g. a shared ReLU, counts once per run): 6.4 KB per sample for the digits small CNN (320 channels over 6
modules), 174 KB for the CIFAR ResNet-18 (8,704 channels: 8.7 GB for its 50 k train split), about 1 MB for an
ImageNet ResNet-50. That is why `gram` is in `detectors=full` only, not `all`. pytorch-ood's `Gram` differs (per-layer min/max over all train samples without the held-out normaliser,
and no division by the softmax confidence); we follow OpenOOD.
Deviations: G_lp in float32 as OpenOOD, but a chunk of samples whose p=5 products overflow float32 is recomputed in
float64 (OpenOOD's would be inf), and the roots and deviations are float64; a layer whose held-out deviation is
0 is normalised by 1 (OpenOOD divides by 0); a class without train samples gets the bounds [0, 0].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ood.detectors.base import Detector
from ood.detectors.network import Tap, tapped_keys
from ood.features.bank import FeatureBank

POWERS = (1, 2, 3, 4, 5)
PREFIX = "gram."


#: map elements per chunk of samples on the CPU: the powers of a chunk stay in cache, 3-4x faster than whole
#: batches on the small CNN's maps (one thread); accelerators take the batch at once
CHUNK_ELEMENTS = 2**20


def gram_rows(z: torch.Tensor) -> torch.Tensor:
    """[B, C, ...] map -> [B, len(POWERS), C] float64: signed p-th root of the row sums of (z^p)(z^p)^T."""
    z = z.flatten(2)
    per = max(1, CHUNK_ELEMENTS // (z.shape[1] * z.shape[2])) if z.device.type == "cpu" else len(z)
    return torch.cat([_gram_rows(chunk.float()) for chunk in z.split(per)])


def _gram_rows(z: torch.Tensor) -> torch.Tensor:
    """`gram_rows` of one chunk: the products in z's dtype (float32 as OpenOOD; a chunk whose products overflow is
    redone in float64), the roots in float64."""
    rows, zp = [], z
    for p in POWERS:  # 1, 2, ..., 5: each power one product on from the last
        if p > 1:
            zp = zp * z
        # row sums of zp zp^T without the [C, C] product: (zp zp^T) 1 = zp (zp^T 1), the sum over channels first
        rows.append((zp @ zp.sum(1).unsqueeze(2)).squeeze(2))
    g = torch.stack(rows, 1)
    if z.dtype != torch.float64 and not bool(torch.isfinite(g).all()):
        return _gram_rows(z.double())
    g = g.double()
    return g.sign() * g.abs() ** (1.0 / torch.tensor(POWERS, dtype=torch.float64, device=g.device))[:, None]


def deviation(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """[N] sum over powers and channels of the relative excursion of g [N, P, C] outside [lo, hi]."""
    below = F.relu(lo - g) / (lo + 1e-6).abs()
    above = F.relu(g - hi) / (hi + 1e-6).abs()
    return (below + above).flatten(1).sum(1)


class Gram(Detector):
    """Class-conditional min/max deviations of Gram-matrix rows over every conv and ReLU output."""

    name = "gram"
    #: its cached Gram rows are too large for the default run at CIFAR scale (module docstring): `detectors=full` only
    full_only = True

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @classmethod
    def taps(cls, backbone: nn.Module) -> dict[str, Tap]:
        """Every Conv2d and ReLU module of the backbone, reduced to its Gram rows."""
        return {
            f"{PREFIX}{name}": (module, gram_rows)
            for name, module in backbone.named_modules()
            if isinstance(module, (nn.Conv2d, nn.ReLU))
        }

    def _layers(self, bank: FeatureBank) -> list[torch.Tensor]:
        """The cached Gram rows as a list of [N, P, C] float64, one per module run."""
        out = []
        for key in tapped_keys(bank, PREFIX, self.name):
            t = bank.extras[key].double()
            out.extend([t] if t.dim() == 3 else t.unbind(1))
        return out

    def fit(self, bank: FeatureBank) -> Gram:
        assert bank.labels is not None, "gram needs labelled ID features"
        y, num_classes = bank.labels, bank.logits.shape[1]
        gen = torch.Generator().manual_seed(self.seed)
        holdout = torch.zeros(len(y), dtype=torch.bool)
        for c in y.unique().tolist():
            rows = (y == c).nonzero().flatten().cpu()
            holdout[rows[torch.randperm(len(rows), generator=gen)[: int(0.1 * len(rows))]]] = True
        self.holdout_ = holdout.to(y.device)
        fit_rows, y_fit = ~self.holdout_, y[~self.holdout_]
        self.mins_, self.maxs_, self.norms_ = [], [], []
        for g in self._layers(bank):
            index = y_fit[:, None, None].expand(-1, *g.shape[1:])
            lo = torch.full((num_classes, *g.shape[1:]), torch.inf, dtype=g.dtype, device=g.device)
            hi = torch.full_like(lo, -torch.inf)
            lo = lo.scatter_reduce(0, index, g[fit_rows], "amin")
            hi = hi.scatter_reduce(0, index, g[fit_rows], "amax")
            lo, hi = lo.nan_to_num(0.0, 0.0, 0.0), hi.nan_to_num(0.0, 0.0, 0.0)
            held = y[self.holdout_]
            norm = deviation(g[self.holdout_], lo[held], hi[held]).mean() if len(held) else torch.zeros(())
            self.mins_.append(lo)
            self.maxs_.append(hi)
            self.norms_.append(float(norm) if float(norm) > 0 else 1.0)
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        pred = bank.logits.argmax(1)
        dev = torch.zeros(len(bank), dtype=torch.float64, device=bank.logits.device)
        for g, lo, hi, norm in zip(self._layers(bank), self.mins_, self.maxs_, self.norms_):
            dev += deviation(g, lo[pred], hi[pred]) / norm
        confidence = torch.softmax(bank.logits.double(), 1).max(1).values
        return -dev / confidence
