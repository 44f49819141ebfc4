"""Mahalanobis scores of inputs nudged towards their closest class Gaussian (input pre-processing), Lee et al.,
"A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018
(arXiv 1807.03888).

With class means mu_c and the shared precision P of class-centred train features (as `mahalanobis`),
M_c(h) = -1/2 (h - mu_c)^T P (h - mu_c), c* = argmax_c M_c(h(x)) and the perturbed input
x_tilde = x - noise * sign(grad_x [-M_c*(h(x))]) / sigma_ch (sigma_ch: the input normalisation std, `input_std`):

- `mahalanobis_odin` (pytorch-ood `detector/mahalanobis.py`, `MahalanobisODIN`; OpenOOD has no counterpart):
  h = penultimate features, score(x) = max_c M_c(h(x_tilde)); sign(0) = 0 (torch.sign, as pytorch-ood). Grid: the
  paper code's noise list (0 .. 0.01; sorted here: ties keep the smaller noise), scored from one forward pass and
  one input gradient per batch plus one perturbed forward per noise value; default noise 0.002 (pytorch-ood's `eps`).
- `mds_ensemble` (OpenOOD `openood/postprocessors/mds_ensemble_postprocessor.py`, `configs/postprocessors/
  mds_ensemble.yml`; pytorch-ood `MultiMahalanobis`): h_l = channel means of every stage output l (OpenOOD's feature
  type `mean`, no dimension reduction), one Gaussian fit, gradient and perturbed pass per layer (sign(0) = +1, as
  OpenOOD's `ge`), score(x) = sum_l alpha_l max_c M_lc(h_l(x_tilde_l)), alpha_l = 1 (OpenOOD's predefined
  `alpha_list`), noise 0.0014 (OpenOOD's single sweep value); `stages` picks the layers (None: every stage), and
  `feature1` names OpenOOD's first feature map (its networks' `return_feature_list[0]`, `network.first_map`): the
  first stage's output, after the max-pool where the next stage starts with one (OpenOOD's 224 px ResNets take it
  after the max-pool, which ood's torchvision ResNets regroup into `layer1`), perturbed through that stage and the
  max-pool. The train means of every stage and of feature1 are cached in the single evaluation pass (layer taps:
  `extras['stage_mean.<layer>']`, their channels in floats per sample: 768 B on the digits small CNN); the perturbed
  passes need the network.
Deviations: the shared covariance is OpenOOD's (class-centred, divided by N, pseudo-inverse in float64);
pytorch-ood's MahalanobisODIN inverts the unnormalised scatter plus 1e-6 I (a positive scale of the same precision:
same gradient signs and ranking up to that ridge). OpenOOD's mds_ensemble divides the step by a fixed 0.5 and its
config (`feature_type_list: [mean]`) uses the first entry of its network's feature list only: `feature1` (for
ResNet18_32x32 the stem's output, the same map as our `stem`; for its 224 px ResNets the stem after the max-pool). By
default we divide by the data's normalisation std (as ODIN) and use every stage, as the paper; `stages=[feature1],
input_std=0.5` is OpenOOD's leaderboard setting (the ImageNet parity experiments use it; the CIFAR ones `stem`, the
same map there). The logistic-regression weights
fitted on validation OOD (OpenOOD's empty `alpha_list` path, Lee et al.'s "feature ensemble") are not fitted: every
layer weighs 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from ood.detectors.base import NON_NEGATIVE, POSITIVE, Detector, SharedPasses
from ood.detectors.mahalanobis import class_means, mahalanobis_sq, shared_precision
from ood.detectors.network import (
    FEATURE1,
    InputTap,
    Tap,
    channel_mean,
    first_map,
    staged_forward,
    tapped_keys,
)
from ood.errors import ConfigError
from ood.features.bank import FeatureBank

STAGE_PREFIX = "stage_mean."
#: one layer's fitted Gaussians: class means [C, D] and shared precision [D, D]
Gaussian = tuple[torch.Tensor, torch.Tensor]


def gaussians_on(fitted: list[Gaussian], copies: dict[torch.device, list[Gaussian]], device: torch.device) -> list[Gaussian]:
    """`fitted` on `device`, copied there on first use and kept in `copies` (emptied by `fit`): fitted from a
    memory-mapped bank (`evaluation.bank_dir`) they lie on the CPU, and moving them in every batch's perturbed passes
    copied them host-to-device each batch (~45 MB of float64 precision at ResNet-50 scale, blocking the host)."""
    if device not in copies:
        copies[device] = [(means.to(device), precision.to(device)) for means, precision in fitted]
    return copies[device]


def gaussian_scores(h: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """[N, C] M_c(h) = -1/2 (h - mu_c)^T P (h - mu_c) in float64, differentiable in h."""
    return -0.5 * mahalanobis_sq(h, means, precision)


def closest_class_loss(h: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -M_c*(h), c* the class of highest M_c (the loss whose input gradient is followed)."""
    closest = gaussian_scores(h.detach(), means, precision).argmax(1)
    centred = h.double() - means[closest]
    return (0.5 * ((centred @ precision) * centred).sum(1)).mean()


def input_std_like(input_std: float | Sequence[float], x: torch.Tensor) -> torch.Tensor:
    """The normalisation std broadcastable over the channels of `x`."""
    return torch.as_tensor(input_std, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.dim() - 2)))


class MahalanobisODIN(Detector):
    """max_c M_c of the penultimate features of the input nudged towards its closest class Gaussian."""

    name = "mahalanobis_odin"
    per_class = True
    ranges = {"noise": NON_NEGATIVE, "input_std": POSITIVE}
    needs_model = True
    pass_group = "staged"
    #: the extra network passes would slow the default run: `detectors=full` runs it, `all` does not
    full_only = True
    grid = {"noise": [0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01]}
    score_params = frozenset({"noise"})

    def __init__(self, noise: float = 0.002, input_std: float | Sequence[float] = 1.0) -> None:
        self.noise = noise
        self.input_std = input_std

    def fit(self, bank: FeatureBank) -> MahalanobisODIN:
        assert bank.labels is not None, "mahalanobis_odin needs labelled ID features"
        self.means_ = class_means(bank.features, bank.labels, bank.logits.shape[1])
        self.precision_ = shared_precision(bank.features, bank.labels, self.means_)
        self._copies: dict[torch.device, list[Gaussian]] = {}
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        raise NotImplementedError("mahalanobis_odin perturbs the inputs: score it with score_inputs(model, x)")

    def score_inputs(self, model: nn.Module, x: torch.Tensor, shared: SharedPasses | None = None) -> torch.Tensor:
        return self.score_inputs_grid(model, x, [{}], shared)[0]

    def score_inputs_grid(
        self, model: nn.Module, x: torch.Tensor, points: Sequence[dict[str, Any]], shared: SharedPasses | None = None
    ) -> list[torch.Tensor]:
        """Every noise value of `points` from one forward pass (the batch's clean pass, `staged_forward`) and one input
        gradient."""
        backbone, clean = staged_forward(model, x, shared)
        noises = [self.set_params(**point).noise for point in points]
        [(means, precision)] = gaussians_on([(self.means_, self.precision_)], self._copies, x.device)
        with torch.enable_grad():
            grad = clean.input_grad(closest_class_loss(clean.out.features, means, precision))
        step = torch.sign(grad) / input_std_like(self.input_std, x)
        with torch.no_grad():
            return [gaussian_scores(backbone.features(clean.x.detach() - noise * step)[0], means, precision).max(1).values
                    for noise in noises]


class MDSEnsemble(Detector):
    """sum over stages of max_c M_lc of the stage's channel means, each from its own perturbed input."""

    name = "mds_ensemble"
    per_class = True
    ranges = {"noise": NON_NEGATIVE, "input_std": POSITIVE}
    needs_model = True
    pass_group = "staged"
    #: a gradient and a perturbed pass per stage would slow the default run: `detectors=full` runs it, `all` does not
    full_only = True

    def __init__(
        self, noise: float = 0.0014, input_std: float | Sequence[float] = 1.0, stages: Sequence[str] | None = None
    ) -> None:
        self.noise = noise
        self.input_std = input_std
        self.stages = None if stages is None else list(stages)

    @classmethod
    def taps(cls, backbone: nn.Module) -> dict[str, Tap | InputTap]:
        """Every stage output (the stages that end in a module call) and OpenOOD's feature1 (`FEATURE1`), reduced to
        their channel means."""
        modules = {name: backbone.stage_module(name) for name in backbone.layer_names}
        reduce = partial(channel_mean, backbone)
        taps: dict[str, Tap | InputTap] = {
            f"{STAGE_PREFIX}{name}": (module, reduce) for name, module in modules.items() if module is not None}
        first = first_map(backbone)
        if first is not None:
            taps[f"{STAGE_PREFIX}{FEATURE1}"] = first.tap(reduce)
        return taps

    def fit(self, bank: FeatureBank) -> MDSEnsemble:
        assert bank.labels is not None, "mds_ensemble needs labelled ID features"
        keys = tapped_keys(bank, STAGE_PREFIX, self.name)
        if self.stages is None:  # every stage: feature1 is the stem's output or a max-pool of it, not a stage
            keys = [k for k in keys if k != f"{STAGE_PREFIX}{FEATURE1}"]
        else:
            cached = [k[len(STAGE_PREFIX) :] for k in keys]
            unknown = [name for name in self.stages if name not in cached]
            if unknown:
                raise ConfigError(f"mds_ensemble: stages {unknown} have no cached means; choices: {cached}")
            keys = [f"{STAGE_PREFIX}{name}" for name in self.stages]
        self.layers_ = [k[len(STAGE_PREFIX) :] for k in keys]
        self.gaussians_ = []
        for key in keys:
            h = bank.extras[key]
            means = class_means(h, bank.labels, bank.logits.shape[1])
            self.gaussians_.append((means, shared_precision(h, bank.labels, means)))
        self._copies: dict[torch.device, list[Gaussian]] = {}
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        raise NotImplementedError("mds_ensemble perturbs the inputs: score it with score_inputs(model, x)")

    def score_inputs(self, model: nn.Module, x: torch.Tensor, shared: SharedPasses | None = None) -> torch.Tensor:
        backbone, clean = staged_forward(model, x, shared)
        std = input_std_like(self.input_std, x)
        maps = clean.out.layers
        first = first_map(backbone)
        total = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        for layer, (means, precision) in zip(self.layers_, gaussians_on(self.gaussians_, self._copies, x.device)):
            with torch.enable_grad():
                if layer == FEATURE1 and first is not None:  # fit found it cached, so the backbone has it
                    clean_map, forward_to = first.of(maps[first.stem]), partial(first.forward_to, backbone)
                else:
                    clean_map, forward_to = maps[layer], partial(backbone.forward_to, layer)
                grad = clean.input_grad(closest_class_loss(channel_mean(backbone, clean_map), means, precision))
            step = torch.where(grad >= 0, 1.0, -1.0).to(x.dtype) / std
            with torch.no_grad():
                nudged = forward_to(clean.x.detach() - self.noise * step)  # later stages not read
                total += gaussian_scores(channel_mean(backbone, nudged), means, precision).max(1).values
        return total
