"""`PrepareMethod`: the callback that hands a method its fit-time data (`OODMethod.prepare`) once, at fit start.

Lightning calls callbacks' `on_fit_start` after the weights are restored and moved to their device, before the
method's own hook, so `prepare` sees the model it will train. The `FitData` comes from the DataModule
(`OODDataModule.fit_data`) with the trainer's device, precision (the dtype of the method's parameters), ranks and
barrier: the method itself never reads the trainer's DataModule.
"""

from __future__ import annotations

import torch
from lightning import Callback, LightningModule, Trainer

from ood.data.benchmark import OODDataModule
from ood.errors import ConfigError
from ood.methods.base import OODMethod


def check_roles(callback: str, pl_module: LightningModule, datamodule: object) -> None:
    """One line (`ConfigError`) when ood's callbacks run on a module or datamodule that is not ood's (a Python user's
    own `trainer.fit(model, loaders)`): it was an AssertionError, and nothing at all under `python -O`."""
    if not isinstance(pl_module, OODMethod):
        raise ConfigError(f"{callback} runs on an ood method (ood.methods.base.OODMethod); the trainer's module is a "
                          f"{type(pl_module).__name__}")
    if not isinstance(datamodule, OODDataModule):
        raise ConfigError(f"{callback} reads its data from an ood.data.benchmark.OODDataModule given as "
                          f"trainer.fit/test(..., datamodule=...); the trainer's datamodule is {type(datamodule).__name__}")


class PrepareMethod(Callback):
    """Calls `pl_module.prepare(trainer.datamodule.fit_data(...))` once per fit.

    The datamodule is read from the trainer at `on_fit_start`, not given when the callback is built: it is an argument
    of each `trainer.fit(model, datamodule=...)` (Lightning's fact of the running fit, as its ranks and barrier are),
    while the callback lives on the trainer; one held from construction could differ from the one being fitted and
    would prepare the method on other data than it trains on."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not isinstance(pl_module, OODMethod):
            return
        datamodule = trainer.datamodule
        check_roles(type(self).__name__, pl_module, datamodule)
        dtype = next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), torch.float32)
        pl_module.prepare(
            datamodule.fit_data(
                device=pl_module.device,
                dtype=dtype,
                world_size=trainer.world_size,
                rank=trainer.global_rank,
                barrier=trainer.strategy.barrier,
            )
        )
