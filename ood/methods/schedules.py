"""`OpenOODCosine`: the learning-rate schedule of OpenOOD's trainers and energy_ood, a cosine over the run's length.

OpenOOD v1.5 (`openood/trainers/base_trainer.py`, `lr_scheduler.cosine_annealing`; OAL's `oal_trainer.py`) and
energy_ood (`CIFAR/train.py`) step a `LambdaLR(cosine_annealing(step, epochs * len(loader), 1, lr_min / lr))` once
per iteration. A preset picks it with `override /method/scheduler: openood` (`conf/method/scheduler/openood.yaml`);
`OODMethod.configure_optimizers` calls it with the optimiser and the number of times Lightning will
step it (`trainer.estimated_stepping_batches` for `interval: step`, `trainer.max_epochs` for `epoch`) and hands it
to Lightning with that `interval`. Any other `method.scheduler` stays a `_partial_` torch scheduler stepped per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch

from ood.errors import ConfigError, check_range

Interval = Literal["step", "epoch"]
INTERVALS: tuple[Interval, ...] = ("step", "epoch")


def cosine_annealing(step: int, total: int, lr_min_ratio: float) -> float:
    """OpenOOD's / energy_ood's `cosine_annealing(step, total, 1, lr_min_ratio)`: the lr multiplier at `step` of
    `total` (1 at step 0, `lr_min_ratio` at `total`)."""
    return lr_min_ratio + (1 - lr_min_ratio) * 0.5 * (1 + math.cos(step / total * math.pi))


class OpenOODCosine:
    """Cosine from the optimiser's lr to `eta_min` over the run, stepped per `interval`.

    Args:
        eta_min: the last lr (torch's name, as `CosineAnnealingLR`'s; the released `lr_min`: 1e-6 in OpenOOD and
            energy_ood, 1e-8 in OAL); every parameter group is multiplied by `eta_min / lr` of the first group, as
            the released single `LambdaLR`.
        interval: `step` (per iteration, as released) or `epoch`.
        offset: steps the schedule runs ahead: 0 = OpenOOD (`scheduler.step()` after `optimizer.step()`: the first
            update at the full lr); 1 = energy_ood (`scheduler.step()` before it: update t uses the lr of step t + 1,
            the last one `eta_min`).
    """

    def __init__(self, eta_min: float, interval: Interval = "step", offset: int = 0) -> None:
        check_range("method.scheduler.eta_min", eta_min, 0)
        check_range("method.scheduler.offset", offset, 0, integer=True)
        if interval not in INTERVALS:
            raise ConfigError(f"method.scheduler.interval={interval!r}; choices: {list(INTERVALS)}")
        self.eta_min, self.interval, self.offset = eta_min, interval, offset

    def __call__(self, optimizer: torch.optim.Optimizer, total: int) -> CosineLambdaLR:
        """The `LambdaLR` of `optimizer` over `total` scheduler steps."""
        lr = optimizer.param_groups[0]["lr"]
        if lr <= 0:
            raise ConfigError(f"method.scheduler: the cosine anneals to eta_min={self.eta_min} as a fraction of "
                              f"method.optimizer.lr, which is {lr}; set a positive lr")
        ratio, offset = self.eta_min / lr, self.offset
        return CosineLambdaLR(optimizer, lambda step: cosine_annealing(step + offset, total, ratio), total)


class CosineLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """The `LambdaLR` of an `OpenOODCosine`, whose state (in a checkpoint) holds its length `total`: a fit resumed
    with another length (the step count follows the number of devices, `data.batch_size`, `data.drop_last`,
    `trainer.accumulate_grad_batches`, `trainer.max_steps`) would go on along another cosine from the step reached,
    its lr jumping; it is refused in one line instead."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_lambda: Callable[[int], float], total: int) -> None:
        self.total = total
        super().__init__(optimizer, lr_lambda)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("total", self.total)  # a checkpoint written before `total` was stored: not checked
        if saved != self.total:
            raise ConfigError(
                f"method.scheduler: the checkpoint's cosine anneals over {saved} scheduler steps and this fit's over "
                f"{self.total} (trainer.estimated_stepping_batches: the number of devices, data.batch_size, "
                "data.drop_last, trainer.accumulate_grad_batches or trainer.max_steps differ); resume with the checkpoint's settings, "
                "or start a new run from its weights (method.init.ckpt=<checkpoint> without ckpt_path)"
            )
        super().load_state_dict(state_dict)
