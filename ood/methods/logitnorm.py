"""LogitNorm (`method=logitnorm`): cross-entropy on L2-normalised logits, scored by MSP.

Paper: H. Wei, R. Xie, H. Cheng, L. Feng, B. An, Y. Li, "Mitigating Neural Network Overconfidence with Logit
Normalization", ICML 2022, arXiv 2205.09310. Released code hongxin001/logitnorm_ood (`common/loss_function.py`);
the leaderboard rows come from OpenOOD v1.5 `configs/pipelines/train/train_logitnorm.yml` (tau 0.04, the CE
optimiser: SGD lr 0.1, momentum 0.9, wd 5e-4, 100 epochs).

Loss: L = CE(f / (tau (||f||_2 + 1e-7)), y) (`ood.losses.logitnorm`). Score: MSP of the raw logits f, as max
log-softmax in float64 (`detector=logitnorm`; the same values as the `msp` row), as OpenOOD scores it.
Deviations: tau = 0.04 (OpenOOD), not the released README's 0.01 for CIFAR-10 WRN-40-2; trained from scratch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ood.data.batch import Batch
from ood.detectors import build_detector
from ood.errors import check_range
from ood.features.bank import FeatureBank
from ood.losses import logitnorm
from ood.methods.base import OODMethod, OptimizerFactory, SchedulerFactory
from ood.models.base import Backbone


class LogitNorm(OODMethod):
    """CE on logits normalised to norm 1/tau; scored by MSP.

    Args:
        backbone, optimizer, scheduler, init: as `OODMethod`.
        tau: the temperature (OpenOOD: 0.04).
    """

    name = "logitnorm"

    def __init__(
        self,
        backbone: Backbone,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        init: Mapping[str, Any] | None = None,
        tau: float = 0.04,
    ) -> None:
        super().__init__(backbone, optimizer, scheduler, init)
        check_range("method.tau", tau, 0, open_low=True)
        self.tau = tau

    def training_loss(self, batch: Batch) -> torch.Tensor:
        return logitnorm(self.backbone(batch.x), batch.y, self.tau)

    def ood_score(self, bank: FeatureBank) -> torch.Tensor:
        return build_detector("msp").score(bank)
