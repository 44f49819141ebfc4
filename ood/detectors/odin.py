"""ODIN, Liang, Li & Srikant, "Enhancing the Reliability of Out-of-distribution Image Detection in Neural
Networks", ICLR 2018 (arXiv 1706.02690), as OpenOOD's `odin` postprocessor.

score(x) = max_c log softmax(f(x_tilde) / T)_c, with the input perturbation
x_tilde = x - noise * sign(grad_x CE(f(x) / T, yhat)) / sigma_ch, yhat = argmax f(x), sigma_ch the per-channel
std of the input normalisation (the perturbation is `noise` in [0, 1] pixel units). The evaluation sets
`input_std` from the benchmark (`Benchmark.input_std`) unless it is given; 1 takes the step in normalised units. sign(0) counts as +1 as in OpenOOD (`ge(grad, 0)`).
The only detector that needs the network: two forward passes and one backward pass per input and grid point,
through `score_inputs` (the evaluation runs it over the split loaders with gradients enabled). Tuning scores the
whole grid per batch (`score_inputs_grid`): one forward pass, one input gradient per temperature, one perturbed
forward per grid point (9 forwards + 4 backwards per batch for OpenOOD's 8 points instead of 16 + 8). Scoring a
batch together with i-ODIN, the forward pass and the gradient at a shared temperature are run once for both.
Deviations: max log-softmax in float64 instead of max softmax (monotone, no ties); the input gradient is
taken with `torch.autograd.grad`, so parameter gradients are never touched.

`odin_energy_ood` is the same score over wetliu/energy_ood's `CIFAR/run.sh Odin` grid (T in {1000, 100, 10, 1} x
noise in {0, 0.0004, ..., 0.0048}), the energy paper's ODIN row (`experiment=energy_ce`); reported under `odin` in
reference tables (`reproduces`). Its scores equal energy_ood's `utils/score_calculation.py` `ODIN` (tested). Its
defaults (used untuned) are ODIN's, OpenOOD's T = 1000, noise = 0.0014, not energy_ood's `test.py` argument defaults
(T = 1, noise = 0: the plain MSP), which run.sh never runs for ODIN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ood.detectors.base import NON_NEGATIVE, POSITIVE, Detector, SharedPasses
from ood.detectors.logits import max_log_softmax
from ood.features.bank import FeatureBank


class InputGradients:
    """One forward pass of a batch with autograd on, and the input gradient of CE(f(x) / T, yhat) for each
    temperature T asked for, each computed once (the graph is kept until the object is dropped)."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        self.x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            self.logits = model(self.x)
        self.predicted = self.logits.detach().argmax(1)
        self._grads: dict[float, torch.Tensor] = {}

    def at(self, temperature: float) -> torch.Tensor:
        """grad_x CE(f(x) / temperature, yhat)."""
        if temperature not in self._grads:
            with torch.enable_grad():
                loss = F.cross_entropy(self.logits / temperature, self.predicted)
                (self._grads[temperature],) = torch.autograd.grad(loss, self.x, retain_graph=True)
        return self._grads[temperature]


class ODIN(Detector):
    """Max log-softmax at temperature T of the input nudged towards higher confidence."""

    name = "odin"
    reads_features = False
    min_classes = 2
    ranges = {"temperature": POSITIVE, "noise": NON_NEGATIVE, "input_std": POSITIVE}
    needs_model = True
    pass_group = "odin"
    grid = {"temperature": [1, 10, 100, 1000], "noise": [0.0014, 0.0028]}
    score_params = frozenset({"temperature", "noise"})

    def __init__(self, temperature: float = 1000, noise: float = 0.0014, input_std: float | Sequence[float] = 1.0) -> None:
        self.temperature = temperature
        self.noise = noise
        self.input_std = input_std

    def score(self, bank: FeatureBank) -> torch.Tensor:
        raise NotImplementedError("odin perturbs the inputs: score it with score_inputs(model, x)")

    def score_inputs(self, model: nn.Module, x: torch.Tensor, shared: SharedPasses | None = None) -> torch.Tensor:
        return self.score_inputs_grid(model, x, [{}], shared)[0]

    def score_inputs_grid(
        self, model: nn.Module, x: torch.Tensor, points: Sequence[dict[str, Any]], shared: SharedPasses | None = None
    ) -> list[torch.Tensor]:
        """ODIN at every (temperature, noise) in `points` from one forward pass of `x` with gradients and one input
        gradient per temperature, reused for each of its noise values (and by i-ODIN scoring the same batch through
        `shared`): the same operations as scoring the points one by one, so the scores are bit-identical, without
        repeating the shared passes."""
        passes = (shared or SharedPasses()).get("odin.input_gradients", lambda: InputGradients(model, x))
        std = torch.as_tensor(self.input_std, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.dim() - 2)))
        scores = []
        for point in points:
            self.set_params(**point)
            step = self.input_step(passes.at(self.temperature)) / std
            with torch.no_grad():
                nudged = model(passes.x.detach() - self.noise * step)
            scores.append(max_log_softmax(nudged.double() / self.temperature))
        return scores

    def input_step(self, grad: torch.Tensor) -> torch.Tensor:
        """The direction the input moves against (before the noise scale and the std): sign(grad), sign(0) = +1."""
        return torch.where(grad >= 0, 1.0, -1.0).to(grad.dtype)


class EnergyOODODIN(ODIN):
    """ODIN tuned over energy_ood's run.sh grid (40 points) instead of OpenOOD's (8)."""

    name = "odin_energy_ood"
    reproduces = "odin"
    grid = {"temperature": [1, 10, 100, 1000],
            "noise": [0, 0.0004, 0.0008, 0.0014, 0.002, 0.0024, 0.0028, 0.0032, 0.0038, 0.0048]}
