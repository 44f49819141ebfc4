"""`trainer=gpu_fast`: bf16 mixed precision, channels_last memory format and optional `torch.compile`, as one
Lightning precision plugin, so choosing the trainer config alone switches them on.

`trainer=gpu` stays fp32 (OpenOOD's setting, for leaderboard parity). `gpu_fast` is faster on GPUs with bf16
tensor cores; its numbers may differ slightly from the leaderboard's (bf16 rounding of activations and gradients,
other convolution algorithms), so reproduce published rows with `trainer=gpu`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """Image batches [N, C, H, W] in channels_last memory format; other tensors as they are."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


class FastMixedPrecision(MixedPrecision):
    """Autocast at `precision` (default bf16) on `device`, plus channels_last weights and image batches and, when
    `compile`, `torch.compile` of every top-level sub-module of the method (the backbone, heads), in place so that
    checkpoints keep their keys."""

    def __init__(
        self,
        precision: Literal["16-mixed", "bf16-mixed"] = "bf16-mixed",
        device: str = "cuda",
        channels_last: bool = True,
        compile: bool = False,  # noqa: A002 - the config key users set
    ) -> None:
        super().__init__(precision, device)
        self.channels_last = channels_last
        self.compile = compile

    def convert_module(self, module: nn.Module) -> nn.Module:
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if self.compile:
            for child in module.children():
                child.compile()
        return module

    def convert_input(self, data: Any) -> Any:
        return apply_to_collection(data, torch.Tensor, to_channels_last) if self.channels_last else data
