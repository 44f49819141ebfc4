"""Gram-matrix deviations as the OpenOOD v1.5 leaderboard ran them: Sastry & Oore, "Detecting Out-of-Distribution
Examples with Gram Matrices", ICML 2020 (arXiv 1912.12510), transcribing OpenOOD's
`openood/postprocessors/gram_postprocessor.py` before commit bdf6a55 ("fix gram-matrix detector", 2024-02-19; the
code of the v1.5 release, `configs/postprocessors/gram.yml`: powers 1..5, no sweep), which produced the leaderboard's
Gram rows (results/*.csv: their Gram numbers unchanged since 2023-06-17). `gram` (ood.detectors.gram) is OpenOOD's
code since that commit.

Taps: the network's `return_feature_list` maps, feature1..feature5 of OpenOOD's ResNets: the stem's output (ResNet-50 /
224 px: after the max-pool), layer1..layer3's outputs and the average-pooled layer4 ([B, C, 1, 1]). On ood's staged
backbones (`network.first_map`): the input of the second stage (after the max-pool a torchvision ResNet regroups into
`layer1`: its output), the outputs of the stages between, the last stage's channel means (any staged backbone: a
network of n stages has n taps). For each tap l and power p in 1..5, G_lp = row sums of (z_l^p)(z_l^p)^T, signed
p-th root ([C_l], `gram_rows`).
Fit (every train sample, no held-out split): OpenOOD extends one flat list per (class, layer, power) with every channel
value of every sample, so the bounds are scalars, m_lpc = min and M_lpc = max over the class's samples and channels.
score(x) = sum_l sum_p [relu(m_lpc - s_lp) / |m_lpc + 1e-6| + relu(s_lp - M_lpc) / |M_lpc + 1e-6|] / 50, with
s_lp = sum_i G_lp(x)_i (the row's sum over channels) and c = argmax f(x): OpenOOD's confidence, so more deviation
reads as MORE in-distribution (higher = more ID, ood's convention too).
A sample needs only, per (layer, power), its row's min, max and sum over channels: 75 floats for a ResNet, cached as
`extras['gram_v15.feature<k>']` ([N, 5, 3] float32 each) in the single evaluation pass: 300 B per sample (`gram`'s
cache: 174 KB on the CIFAR ResNet-18). Its reductions add 13 % to the CPU forward of the CIFAR ResNet-18 (batch 64, one
thread; combood's taps 11 %, gram's 86 %) and 7 % to a 224 px ResNet-50's (batch 8; combood's 11 %). It is a
reproduction of the leaderboard's rows rather than a detector to choose (its bounds ignore the channels), so it is in
`detectors=full` (which the parity presets run), not in the default `all`.
Deviations: G_lp's products in float32 as OpenOOD's, but a sample whose p=5 products overflow float32 is recomputed in
float64 (OpenOOD's would be inf), the roots and the sum over channels are float64 (OpenOOD: float32 roots, a Python
float sum), stored as float32; a class without train samples is refused (`per_class`; OpenOOD fails on an empty
list); the pooled tap is the mean over positions (OpenOOD's `AdaptiveAvgPool2d(1)`, equal up to float rounding).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ood.detectors.base import Detector
from ood.detectors.gram import POWERS, deviation, gram_rows
from ood.detectors.network import InputTap, Tap, channel_mean, channels_first, first_map, tapped_keys
from ood.features.bank import FeatureBank

PREFIX = "gram_v15."
#: OpenOOD's divisor of the summed deviations (`conf = [i / 50 for i in dev]`)
SCALE = 50.0


def row_stats(backbone: nn.Module, z: torch.Tensor, pooled: bool = False) -> torch.Tensor:
    """A map of `backbone` ([B, C, ...], or its channel means with `pooled`) -> [B, len(POWERS), 3] float64: per
    power, the min, max and sum over channels of the map's Gram row."""
    z = channel_mean(backbone, z)[:, :, None] if pooled else channels_first(backbone, z)
    g = gram_rows(z)
    return torch.stack([g.amin(2), g.amax(2), g.sum(2)], 2)


class GramV15(Detector):
    """OpenOOD v1.5's released Gram detector: scalar per-class bounds, row sums, deviation as confidence."""

    name = "gram_v15"
    per_class = True
    #: the leaderboard's pre-fix Gram, for parity: `full` runs it, the default `all` leaves it out
    full_only = True
    #: it reads the bank's labels, logits and cached row statistics, never its features
    float16_features = True

    @classmethod
    def taps(cls, backbone: nn.Module) -> dict[str, Tap | InputTap]:
        """OpenOOD's feature list (module docstring): feature1 .. feature<n-1> from the stages' maps, feature<n>
        pooled; a stage that ends in no module call (a functional step) gives no tap."""
        names = backbone.layer_names
        taps: dict[str, Tap | InputTap] = {}
        first = first_map(backbone)
        if first is not None:
            taps[f"{PREFIX}feature1"] = first.tap(partial(row_stats, backbone))
        for k, name in enumerate(names[1:-1], start=2):
            module = backbone.stage_module(name)
            if module is not None:
                taps[f"{PREFIX}feature{k}"] = (module, partial(row_stats, backbone))
        last = backbone.stage_module(names[-1])
        if last is not None:
            taps[f"{PREFIX}feature{len(names)}"] = (last, partial(row_stats, backbone, pooled=True))
        return taps

    def _stats(self, bank: FeatureBank) -> torch.Tensor:
        """[N, L, P, 3] float64: the cached per-row (min, max, sum) of every tap (a module run more than once: each
        run a layer)."""
        tapped = [bank.extras[key].double() for key in tapped_keys(bank, PREFIX, self.name)]
        return torch.cat([t.reshape(len(t), -1, len(POWERS), 3) for t in tapped], 1)

    def fit(self, bank: FeatureBank) -> GramV15:
        assert bank.labels is not None, "gram_v15 needs labelled ID features"
        stats, num_classes = self._stats(bank), bank.logits.shape[1]
        index = bank.labels.to(stats.device)[:, None, None].expand(-1, *stats.shape[1:3])
        self.mins_ = torch.full((num_classes, *stats.shape[1:3]), torch.inf, dtype=stats.dtype, device=stats.device)
        self.maxs_ = torch.full_like(self.mins_, -torch.inf)
        self.mins_.scatter_reduce_(0, index, stats[..., 0], "amin")
        self.maxs_.scatter_reduce_(0, index, stats[..., 1], "amax")
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        stats = self._stats(bank)
        pred = bank.logits.argmax(1).to(stats.device)
        return deviation(stats[..., 2], self.mins_[pred], self.maxs_[pred]) / SCALE
