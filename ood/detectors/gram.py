"""Gram-matrix deviations, Sastry & Oore, "Detecting Out-of-Distribution Examples with Gram Matrices", ICML 2020
(arXiv 1912.12510), as OpenOOD's `gram` postprocessor (`openood/postprocessors/gram_postprocessor.py`,
`configs/postprocessors/gram.yml`: powers 1..5, no sweep), as rewritten by its commit bdf6a55 ("fix gram-matrix
detector", 2024-02-19). The OpenOOD v1.5 leaderboard's Gram rows predate it: they are `gram_v15`'s
(ood.detectors.gram_v15, the code as released), and this detector has no leaderboard value.

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

`gram_stream` is the same detector without the cache, for ImageNet (the parity presets run it; `reproduces` names
`gram`, whose row reference tables give it): a `StreamFitted` detector (`ood.detectors.network`) that hooks `Gram.taps` for its own
forward passes only. Its fit folds the Gram rows of the fit rows, batch by batch, into the running per-class min/max
(a pass over those 90 % of the train split), then the deviations of the held-out rows into the normalisers (a pass
over that tenth only: one train pass in all), with the same held-out draw; each split is scored from its own pass
in the evaluation's joint run of the network-pass detectors. It keeps the bounds only, whatever the number of
samples: num_classes x 5 x sum_l C_l float64, twice (min, max), on the model's device: 1000 x 5 x 49,280 x 8 B x 2 =
3.9 GB for the ImageNet-1K ResNet-50 (49,280 channels over 102 module runs), 0.14 GB for the ImageNet-200 ResNet-18
(8,704). Its Gram rows are computed and rounded to float32 as the cache's are, so where the network gives a sample the
same rows in any batch (the tiny CNN of the tests) its bounds equal `gram`'s exactly, and its normalisers and scores
up to float64 summation order (1e-10). Where float32 kernels depend on the batch (CPU batched matmuls on a ResNet-50's
maps, cuDNN's choices), a train sample's rows differ by float32 rounding between its batch in the cached pass and in
these passes (the 90 % and the tenth are batched apart), as the cached form's own rows do when the evaluation batch
size changes; delta's division by |m + 1e-6| magnifies that where a bound is near 0. Measured on a random-weight
ResNet-50 at 64 px (CPU, 80 train images, batches of 16): normalisers up to 1 % apart, scores up to 4e-4 relative
(the cached form in batches of 16 vs 80: 6e-6); on the trained digits CNN (`ood-eval`, CPU) the scores are bitwise equal.
Deviations: G_lp in float32 as OpenOOD, but a chunk of samples whose p=5 products overflow float32 is recomputed in
float64 (OpenOOD's would be inf), and the roots and deviations are float64; a layer whose held-out deviation is
0 is normalised by 1 (OpenOOD divides by 0); a class without train samples gets the bounds [0, 0].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ood.detectors.base import Detector, DetectorNotApplicable, SharedPasses
from ood.detectors.network import LayerTaps, PassFn, StreamFitted, Tap, backbone_of, tapped_keys
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
    """`gram_rows` of one chunk: the products in z's dtype (float32 as OpenOOD; the samples whose products overflow
    are redone in float64, each alone, so that a sample's rows never depend on the others in its batch), the roots
    in float64."""
    rows, zp = [], z
    for p in POWERS:  # 1, 2, ..., 5: each power one product on from the last
        if p > 1:
            zp = zp * z
        # row sums of zp zp^T without the [C, C] product: (zp zp^T) 1 = zp (zp^T 1), the sum over channels first
        rows.append((zp @ zp.sum(1).unsqueeze(2)).squeeze(2))
    g = torch.stack(rows, 1).double()
    overflow = ~torch.isfinite(g).flatten(1).all(1) if z.dtype != torch.float64 else None
    g = g.sign() * g.abs() ** (1.0 / torch.tensor(POWERS, dtype=torch.float64, device=g.device))[:, None]
    if overflow is not None and bool(overflow.any()):
        g[overflow] = _gram_rows(z[overflow].double())
    return g


def deviation(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """[N] sum over powers and channels of the relative excursion of g [N, P, C] outside [lo, hi]."""
    below = F.relu(lo - g) / (lo + 1e-6).abs()
    above = F.relu(g - hi) / (hi + 1e-6).abs()
    return (below + above).flatten(1).sum(1)


def holdout_rows(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """[N] bool on `labels`' device: per class, a random tenth (rounded down) of its rows, drawn in class order from
    one generator seeded with `seed`: the held-out rows that give the normalisers."""
    gen = torch.Generator().manual_seed(seed)
    holdout = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten().cpu()
        holdout[rows[torch.randperm(len(rows), generator=gen)[: int(0.1 * len(rows))]]] = True
    return holdout.to(labels.device)


def empty_bounds(num_classes: int, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class (min, max) [num_classes, P, C] before any row: +inf and -inf, in g's dtype and on its device."""
    lo = torch.full((num_classes, *g.shape[1:]), torch.inf, dtype=g.dtype, device=g.device)
    return lo, torch.full_like(lo, -torch.inf)


def fold_bounds(lo: torch.Tensor, hi: torch.Tensor, g: torch.Tensor, y: torch.Tensor) -> None:
    """Widen the per-class bounds, in place, to the rows g [N, P, C] of classes y [N] (min / max are exact, so folding
    batch by batch gives the bounds of all rows at once, with no second copy of them)."""
    index = y.to(g.device)[:, None, None].expand(-1, *g.shape[1:])
    lo.scatter_reduce_(0, index, g, "amin")
    hi.scatter_reduce_(0, index, g, "amax")


def settle(bound: torch.Tensor) -> torch.Tensor:
    """Finish a bound in place: a class without fit rows gets 0 (for its +-inf)."""
    return bound.nan_to_num_(0.0, 0.0, 0.0)


def normaliser(mean_deviation: float) -> float:
    """n_l from the layer's mean held-out deviation: 1 where it is 0 (no held-out rows, or none outside the bounds)."""
    return mean_deviation if mean_deviation > 0 else 1.0


def gram_scores(
    layers: list[torch.Tensor], logits: torch.Tensor, mins: list[torch.Tensor], maxs: list[torch.Tensor], norms: list[float]
) -> torch.Tensor:
    """[N] -sum_l delta(G_l; bounds of the predicted class) / n_l / max softmax, from the Gram rows [N, P, C] per layer."""
    pred = logits.argmax(1)
    dev = torch.zeros(len(logits), dtype=torch.float64, device=logits.device)
    for g, lo, hi, norm in zip(layers, mins, maxs, norms):
        dev += (deviation(g, lo[pred], hi[pred]) / norm).to(dev.device)
    confidence = torch.softmax(logits.double(), 1).max(1).values
    return -dev / confidence


def layer_rows(tapped: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Tapped Gram rows (`Gram.taps`, in tap order) as a list of [N, P, C] float64, one per module run."""
    out = []
    for t in tapped.values():
        t = t.double()
        out.extend([t] if t.dim() == 3 else t.unbind(1))
    return out


class Gram(Detector):
    """Class-conditional min/max deviations of Gram-matrix rows over every conv and ReLU output."""

    name = "gram"
    per_class = True
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
        return layer_rows({key: bank.extras[key] for key in tapped_keys(bank, PREFIX, self.name)})

    def fit(self, bank: FeatureBank) -> Gram:
        assert bank.labels is not None, "gram needs labelled ID features"
        y, num_classes = bank.labels, bank.logits.shape[1]
        self.holdout_ = holdout_rows(y, self.seed)
        fit_rows, held = ~self.holdout_, y[self.holdout_]
        self.mins_, self.maxs_, self.norms_ = [], [], []
        for g in self._layers(bank):
            lo, hi = empty_bounds(num_classes, g)
            fold_bounds(lo, hi, g[fit_rows], y[fit_rows])
            lo, hi = settle(lo), settle(hi)
            norm = deviation(g[self.holdout_], lo[held], hi[held]).mean() if len(held) else torch.zeros(())
            self.mins_.append(lo)
            self.maxs_.append(hi)
            self.norms_.append(normaliser(float(norm)))
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return gram_scores(self._layers(bank), bank.logits, self.mins_, self.maxs_, self.norms_)


class GramStream(StreamFitted):
    """`gram` without the cache: the same bounds, normalisers and scores from network passes (module docstring)."""

    name = "gram_stream"
    per_class = True
    #: a train pass and a pass per evaluation split of its own: `detectors=full` only, as `gram`
    full_only = True
    #: another form of `gram`: a reference table's `gram` row is its row (the parity presets run it on ImageNet)
    reproduces = "gram"
    #: it reads the bank's labels and logits, never its features (its rows come from passes of its own): the
    #: ImageNet-scale form runs beside float16 feature banks (`evaluation.feature_dtype=float16`)
    float16_features = True

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @staticmethod
    def _forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The logits of `x` and its Gram rows per module run, from `Gram.taps` hooked for this forward only (so
        rounded to float32 as the cache stores them)."""
        backbone_of(model)  # DetectorNotApplicable, saying why, for a network without stages
        taps = LayerTaps(model, [Gram])
        try:
            with torch.no_grad():
                logits = model(x)
            tapped = taps.pop()
        finally:
            taps.remove()
        return logits, layer_rows(tapped)

    def fit_stream(self, bank: FeatureBank, run: PassFn) -> GramStream:
        if bank.labels is None:
            raise DetectorNotApplicable(f"{self.name} needs the labels of its {self.fit_split} split")
        labels, num_classes = bank.labels, bank.logits.shape[1]
        self.holdout_ = holdout_rows(labels, self.seed)
        mins: list[torch.Tensor] = []
        maxs: list[torch.Tensor] = []

        def widen(model: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> None:
            layers = self._forward(model, x)[1]
            if not mins:
                for lo, hi in (empty_bounds(num_classes, g) for g in layers):
                    mins.append(lo)
                    maxs.append(hi)
            y = labels[rows.to(labels.device)]
            for g, lo, hi in zip(layers, mins, maxs):
                fold_bounds(lo, hi, g, y)

        run(widen, (~self.holdout_).nonzero().flatten().cpu())
        self.mins_, self.maxs_ = [settle(lo) for lo in mins], [settle(hi) for hi in maxs]
        held = self.holdout_.nonzero().flatten().cpu()
        totals = [torch.zeros((), dtype=torch.float64, device=lo.device) for lo in self.mins_]

        def measure(model: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> None:
            y = labels[rows.to(labels.device)]
            for i, (g, lo, hi) in enumerate(zip(self._forward(model, x)[1], self.mins_, self.maxs_)):
                y_g = y.to(g.device)
                totals[i] += deviation(g, lo[y_g], hi[y_g]).sum()

        if len(held):
            run(measure, held)
        self.norms_ = [normaliser(float(total) / len(held)) if len(held) else 1.0 for total in totals]
        return self

    def score_inputs(self, model: nn.Module, x: torch.Tensor, shared: SharedPasses | None = None) -> torch.Tensor:
        logits, layers = self._forward(model, x)
        return gram_scores(layers, logits, self.mins_, self.maxs_, self.norms_)
