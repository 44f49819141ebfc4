"""`OODMethod`: the LightningModule every method extends, and the contract with the evaluation callback.

Training: subclasses implement `training_loss(batch)`; the base logs it and stops on a NaN/inf loss with the
step number. Evaluation (`trainer.test`): one forward pass per split; `eval_outputs` returns the per-sample
tensors that go into the feature cache (`logits`, `features`, plus any `cache_layers`), then the callback hands
the cached `FeatureBank`s to `setup_ood` (post-hoc fitting, e.g. GROOD's prototypes) and asks `ood_score`
for the method's own score, reported as `detector = <method name>`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import nn

from ood.data.benchmark import EvalSplit
from ood.errors import NonFiniteError
from ood.evaluation.bank import FeatureBank
from ood.models.base import Backbone

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class OODMethod(LightningModule):
    """Base method: a backbone trained with `training_loss`, evaluated through the shared callback.

    Args:
        backbone: any `Backbone` (logits, features, named stages, `forward_from`).
        optimizer: a `_partial_` optimizer factory taking the parameters.
        scheduler: an optional `_partial_` LR-scheduler factory taking the optimizer (stepped per epoch).
    """

    #: the name results are reported under (`method` field; `detector` for the method's own score)
    name: ClassVar[str]
    #: backbone stages whose outputs are cached during evaluation (as `FeatureBank.extras`)
    cache_layers: tuple[str, ...] = ()

    def __init__(
        self,
        backbone: Backbone,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "optimizer", "scheduler"])
        self.backbone = backbone
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

    # ----- training -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def training_loss(self, batch: Batch) -> torch.Tensor:
        """The loss of one training batch `(x, y, index)`; subclasses log any extra terms themselves."""
        raise NotImplementedError

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"{self.name}: training loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}); lower the learning rate or check the inputs"
            )
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        x, y, _ = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=False)
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer)}}

    # ----- evaluation contract --------------------------------------------------------------------------------
    def eval_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample tensors to cache for one evaluation batch: `logits`, `features` and `cache_layers`."""
        out = self.backbone.run(x, self.cache_layers)
        return {"logits": out.logits, "features": out.features, **out.layers}

    def eval_split(self, dataloader_idx: int) -> EvalSplit:
        """The evaluation split (name, role, group) of test loader `dataloader_idx`."""
        return self.trainer.datamodule.eval_splits[dataloader_idx]

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        x, y, index = batch
        return {"index": index, "labels": y, **self.eval_outputs(x)}

    def setup_ood(self, banks: Mapping[str, FeatureBank]) -> None:
        """Post-hoc fitting on cached banks keyed by split name (`train`, `val`, `val_ood`); default: nothing."""

    def ood_score(self, bank: FeatureBank) -> torch.Tensor | None:
        """The method's own ID score for `bank` (higher = more ID), or None when it only uses detectors."""
        return None

    def predict(self, bank: FeatureBank) -> torch.Tensor:
        """Class predictions used for ID accuracy; argmax of the logits unless a method says otherwise."""
        return bank.predictions
