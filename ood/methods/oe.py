"""Outlier Exposure (`method=oe`): cross-entropy on ID plus a uniform-target term on auxiliary outliers.

Paper: D. Hendrycks, M. Mazeika, T. Dietterich, "Deep Anomaly Detection with Outlier Exposure", ICLR 2019,
arXiv 1812.04606. Released code: hendrycks/outlier-exposure `CIFAR/oe_tune.py` (the fine-tune) and
`CIFAR/oe_scratch.py` (from scratch), scored by `CIFAR/test.py`; OpenOOD v1.5 `OETrainer` +
`configs/pipelines/train/train_oe.yml` (the leaderboard's OE rows).

Loss (one forward pass over the concatenated ID and outlier batch, as both released codes do, so batch-norm
statistics see both: oe_tune.py:160-174):
  L = CE(f(x_in), y) + lambda * mean_{x_out} [ LSE(f(x_out)) - mean_c f_c(x_out) ]   (`ood.losses.outlier_exposure`)
lambda = 0.5. Score: MSP, computed as max log-softmax in float64 (`detector=oe`; the same values as the `msp` row;
test.py's default score, -max softmax with OOD positive).

Two uses: the OE fine-tune, `experiment=energy_ft method=oe ++method.init.ckpt=<experiment=energy_ce run>` (oe_tune.py's
recipe: 10 epochs from the CE model of `CIFAR/baseline.py`, SGD Nesterov lr 1e-3, 128 ID + 256 outliers, cosine per
iteration stepped before the update, the last partial ID batch kept), or from scratch with OpenOOD's recipe
(`experiment=cifar10_oe`), which differs from oe_scratch.py on purpose: ResNet-18 32x32 (oe_scratch: WRN-40-2), TIN-597
outliers with the test transform (80M Tiny Images, augmented), each dataset's own normalisation (CIFAR-10's for both),
the cosine stepped after the update (before: offset 1), `best.ckpt` evaluated (the last epoch); lr 0.1, 100 epochs,
128 + 256, lambda 0.5 are the same.

Deviations: outlier batches come from a stream that cycles through reshuffled permutations of the outlier set
(`ood.data.benchmark.OutlierSampler`); Hendrycks reads 80M Tiny Images in order from a random offset each epoch
(oe_tune.py:93-96, 158; 80M Tiny Images is withdrawn: 300K Random Images or TIN-597 stand in), OpenOOD iterates a
shuffled loader and restarts it when exhausted: same distribution, different order. Outliers get the training
flip + padded crop, as Hendrycks' (oe_tune.py:84-86) and energy_ood's code; OpenOOD's `oe` split gets its test
transform (resize + centre crop only), which `experiment=cifar10_oe` sets (`data.benchmark.augment_outliers=false`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ood.data.batch import Batch
from ood.data.benchmark import Stream
from ood.detectors import build_detector
from ood.errors import check_range
from ood.features.bank import FeatureBank
from ood.losses import outlier_exposure
from ood.methods.base import OODMethod, OptimizerFactory, SchedulerFactory
from ood.models.base import Backbone


class OutlierExposure(OODMethod):
    """CE + `lam` x outlier exposure; scored by MSP.

    Args:
        backbone, optimizer, scheduler, init: as `OODMethod`.
        lam: weight of the outlier-exposure term (paper and OpenOOD: 0.5).
    """

    name = "oe"
    streams: ClassVar[tuple[Stream, ...]] = ("id", "outliers")

    def __init__(
        self,
        backbone: Backbone,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        init: Mapping[str, Any] | None = None,
        lam: float = 0.5,
    ) -> None:
        super().__init__(backbone, optimizer, scheduler, init)
        check_range("method.lam", lam, 0)
        self.lam = lam

    def training_loss(self, batch: Batch) -> torch.Tensor:
        assert batch.x_out is not None, "oe trains on outliers: the DataModule serves them (streams)"
        n = len(batch)
        logits = self.backbone(torch.cat([batch.x, batch.x_out]))
        ce, oe = F.cross_entropy(logits[:n], batch.y), outlier_exposure(logits[n:])
        self.log_metrics({"train/ce": ce, "train/oe": oe}, n)
        return ce + self.lam * oe

    def ood_score(self, bank: FeatureBank) -> torch.Tensor:
        return build_detector("msp").score(bank)
