"""Neuron Activation Coverage (NAC-UE), Liu, Lochman & Zach, "Neuron Activation Coverage: Rethinking
Out-of-distribution Detection and Generalization", ICLR 2024 (arXiv 2306.02879), as pytorch-ood's `NACUE`
(`detector/nac.py`; OpenOOD v1.5 has no NAC postprocessor).

For every stage output z_l (the tapped layers) of an input x, with the KL-to-uniform loss
L(x) = -1/C sum_c log p_c(x): the neuron state s = sigmoid(alpha * mean_spatial(z_l * dL/dz_l)) in [0, 1], binned
into `bins` symmetric geometric intervals on (0, 1) (dense near 0 and 1). Fit: per neuron and bin, the count o of
fit-split samples in it. score(x) = sum_l mean_neurons min(o[neuron, bin(x)] / o_star, 1).
It needs input gradients, so it is a `needs_model` detector fitted from its own pass over the train split (one
forward + one backward per batch; `ModelFitted`); the fit keeps one byte per neuron and sample until the counts
are formed (sum_l C_l bytes per train sample: 160 B on the digits small CNN).
Defaults: pytorch-ood's (bins 50, alpha 100, o_star 50, every layer alike); layers: every backbone stage (pytorch-ood
takes a user list, its ResNet example layer1..layer4). No OpenOOD grid.
Reference differences: the paper's code (BierOne/ood_coverage) pools state and gradient separately (spatial sums),
bins uniformly on [0, 1] and averages over layers with per-layer hyper-parameters; we follow pytorch-ood.
Deviations: log_softmax for pytorch-ood's log(softmax + 1e-12) (equal unless a probability is below 1e-12); coverage
means in float64, as the exact sum of the clamped counts over the neurons divided once (the same value in any batch).
"""

from __future__ import annotations

import torch
from torch import nn

from ood.detectors.base import POSITIVE, Range, SharedPasses
from ood.detectors.network import ModelFitted, backbone_of, channel_mean
from ood.features.bank import FeatureBank


def geometric_bins(s: torch.Tensor, bins: int, eps: float = 1e-6) -> torch.Tensor:
    """Bin index in 0..bins-1 of s in [0, 1]: bins//2 log-spaced edges on [eps, 0.5], mirrored on [0.5, 1 - eps]."""
    half = bins // 2
    left = torch.logspace(torch.log10(torch.tensor(eps)).item(), torch.log10(torch.tensor(0.5)).item(), half + 1,
                          dtype=s.dtype, device=s.device)
    edges = torch.cat([left, (1.0 - left.flip(0))[1:]])
    return (torch.bucketize(s.clamp(eps, 1 - eps), edges) - 1).clamp(0, bins - 1)


class NAC(ModelFitted):
    """Coverage of each neuron's gradient-weighted state by the train distribution."""

    name = "nac"
    #: bins: two halves of at least one bin each
    ranges = {"bins": Range(2, integer=True), "alpha": POSITIVE, "o_star": POSITIVE}
    min_classes = 2

    def __init__(self, bins: int = 50, alpha: float = 100.0, o_star: int = 50) -> None:
        self.bins = bins
        self.alpha = alpha
        self.o_star = o_star

    def states(self, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """Per stage: [B, C_l] bin index of each neuron's state."""
        backbone = backbone_of(model)
        names = list(backbone.layer_names)
        with torch.enable_grad():  # an input that requires grad: the maps have a graph under a frozen backbone too
            out = backbone.run(x.detach().requires_grad_(True), names)
            maps = [out.layers[n] for n in names]
            loss = -torch.log_softmax(out.logits, 1).mean(1).sum()
            grads = torch.autograd.grad(loss, maps)
        return [geometric_bins(torch.sigmoid(self.alpha * channel_mean(backbone, z * g)).detach(), self.bins) for z, g in zip(maps, grads)]

    def fit_statistics(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.uint8 if self.bins <= 256 else torch.int16
        return torch.cat(self.states(model, x), 1).to(dtype)

    def fit_inputs(self, bank: FeatureBank, statistics: torch.Tensor) -> NAC:
        """Counts [neurons, bins] of the fit split's bin indices (neurons of every stage side by side)."""
        idx = statistics.long()
        neurons = idx.shape[1]
        flat = (torch.arange(neurons, device=idx.device) * self.bins + idx).flatten()
        self.counts_ = torch.bincount(flat, minlength=neurons * self.bins).view(neurons, self.bins)
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        raise NotImplementedError("nac needs input gradients: score it with score_inputs(model, x)")

    def score_inputs(self, model: nn.Module, x: torch.Tensor, shared: SharedPasses | None = None) -> torch.Tensor:
        total = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        start = 0
        counts = self.counts_.to(x.device)
        for idx in self.states(model, x):
            layer = counts[start : start + idx.shape[1]]
            # mean_neurons min(o / o_star, 1) as sum_neurons min(o, o_star) / (o_star C_l): a sum of whole numbers,
            # exact in float64 in any order, so an image's score does not depend on its batch (the mean of the
            # fractions over the transposed [B, C_l] gather was summed in a batch-size-dependent order: last-bit
            # differences that broke NAC's many exact ties differently, moving the AUROC)
            o = layer.gather(1, idx.T).T.double().clamp(max=self.o_star)
            total += o.sum(1) / (self.o_star * idx.shape[1])
            start += idx.shape[1]
        return total
