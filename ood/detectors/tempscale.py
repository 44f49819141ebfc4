"""Temperature scaling, Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (arXiv 1706.04599).

score(x) = max_c softmax(f / T)_c with T fitted on ID-val by minimising the NLL with L-BFGS, as OpenOOD's
`temp_scaling` postprocessor (T initialised at 1.5, lr 0.01, 50 iterations, one `step` with a closure).
Deviations: the fit runs in float64 on the cached logits instead of re-running the network, and the score is
the max log-softmax (monotone in MSP, no float32 saturation ties).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ood.detectors.base import Detector, check_labels
from ood.detectors.logits import max_log_softmax
from ood.errors import ConfigError
from ood.features.bank import FeatureBank


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, init: float = 1.5, lr: float = 0.01, max_iter: int = 50) -> float:
    """The temperature minimising the cross-entropy of `logits / T` on `labels` (L-BFGS, OpenOOD's settings)."""
    z = logits.detach().double()
    temperature = torch.full((1,), init, dtype=torch.float64, device=z.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([temperature], lr=lr, max_iter=max_iter)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z / temperature, labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(temperature.detach())


class TempScale(Detector):
    """max_c log softmax(f / T)_c, T fitted on ID-val."""

    name = "tempscale"
    reads_features = False
    min_classes = 2
    float16_features = True
    fit_split = "val"

    def fit(self, bank: FeatureBank) -> TempScale:
        if bank.labels is None:
            raise ConfigError("tempscale: its fit bank has no labels, and the temperature is fitted to them "
                              "(FeatureBank(labels=...): the ID class of each row)")
        check_labels(self, bank)
        self.temperature_ = fit_temperature(bank.logits, bank.labels)
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return max_log_softmax(bank.logits.double() / self.temperature_)
