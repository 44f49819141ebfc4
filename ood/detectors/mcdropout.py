"""MC-Dropout, Gal & Ghahramani, "Dropout as a Bayesian Approximation", ICML 2016 (arXiv 1506.02142), as OpenOOD's
`dropout` postprocessor (`openood/postprocessors/dropout_postprocessor.py`, `configs/postprocessors/dropout.yml`).

score(x) = max_c softmax(mean_t f_t(x))_c, t = 1..`samples` forward passes with dropout active (`dropout_times`: 5).
Only the dropout of the network is switched on (batch-norm stays in eval mode); it draws from torch's global RNG,
so scores are reproducible under a fixed seed. Dropout is found as `nn.Dropout*` modules with p > 0 and as modules
with a positive `dropout` or `p` attribute that apply `F.dropout` while training (our WRN and DenseNet blocks); a
network without either raises `DetectorNotApplicable` ("no dropout") at fit time: its "fit" is that check on the
first batch of the ID val loader (no forward pass), so the run skips it with the reason.
Reference difference: pytorch-ood's `MCD` averages the softmax of the passes instead of the logits; we follow
OpenOOD. Deviation: max log-softmax in float64 instead of max softmax (monotone).
"""

from __future__ import annotations

import torch
from torch import nn

from ood.detectors.base import COUNT, DetectorNotApplicable, SharedPasses
from ood.detectors.logits import max_log_softmax
from ood.detectors.network import ModelFitted
from ood.features.bank import FeatureBank


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    """Modules of `model` that drop activations while training: `nn.Dropout*` with p > 0, or a positive `dropout`/`p`."""
    found = []
    for module in model.modules():
        rate = module.p if isinstance(module, nn.modules.dropout._DropoutNd) else getattr(module, "dropout", getattr(module, "p", 0))
        if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0:
            found.append(module)
    return found


def check_dropout(model: nn.Module) -> list[nn.Module]:
    """The dropout modules of `model`; `DetectorNotApplicable` when there are none."""
    modules = dropout_modules(model)
    if not modules:
        raise DetectorNotApplicable(f"no dropout in the network ({type(model).__name__}): MC-Dropout needs dropout layers")
    return modules


class MCDropout(ModelFitted):
    """Max softmax of the mean logits over forward passes with dropout on."""

    name = "mcdropout"
    ranges = {"samples": COUNT}
    fit_split = "val"

    def __init__(self, samples: int = 5) -> None:
        self.samples = samples

    def score(self, bank: FeatureBank) -> torch.Tensor:
        raise NotImplementedError("mcdropout samples the network: score it with score_inputs(model, x)")

    def fit_statistics(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        check_dropout(model)
        return x.new_zeros(len(x), 0)

    def fit_inputs(self, bank: FeatureBank, statistics: torch.Tensor) -> MCDropout:
        return self

    def score_inputs(self, model: nn.Module, x: torch.Tensor, shared: SharedPasses | None = None) -> torch.Tensor:
        modules = check_dropout(model)
        modes = [m.training for m in modules]
        try:
            for m in modules:
                m.training = True  # this module only: its batch-norm children keep their own mode
            with torch.no_grad():
                logits = torch.stack([model(x).double() for _ in range(self.samples)]).mean(0)
        finally:
            for m, mode in zip(modules, modes):
                m.training = mode
        return max_log_softmax(logits)
