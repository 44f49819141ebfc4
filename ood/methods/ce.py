"""Cross-entropy baseline (`method=ce`): the standard classifier every post-hoc detector is applied to.

OpenOOD v1.5 recipe on CIFAR (`configs/pipelines/train/baseline.yml` + `BaseTrainer`): SGD lr 0.1, momentum 0.9,
Nesterov, wd 5e-4, 100 epochs, cosine per iteration to 1e-6, batch 128 (`experiment=cifar10_ce`, its deviations
listed there; `conf/method/ce.yaml` holds the digits defaults). Score: none of its own; every configured detector
scores its cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ood.data.batch import Batch
from ood.methods.base import OODMethod


class CrossEntropy(OODMethod):
    """Plain cross-entropy training."""

    name = "ce"

    def training_loss(self, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.backbone(batch.x), batch.y)
