"""Read OpenOOD's released checkpoints (bare `net.state_dict()` files) into our backbones, for parity runs.

OpenOOD v1.5's leaderboard numbers come from its released CIFAR ResNet18_32x32 checkpoints
(openood/networks/resnet18_32x32.py). Their parameter names differ from ours only by module paths:
`conv1`/`bn1` are our `stem` stage, `layerN.i.shortcut` our `layerN.i.downsample`, `layerN` our `stages.layerN`;
`fc` is the same. A DataParallel `module.` prefix is dropped. Other OpenOOD architectures are not mapped yet.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

_RESNET18_32X32 = (
    (re.compile(r"^conv1\."), "stages.stem.0."),
    (re.compile(r"^bn1\."), "stages.stem.1."),
    (re.compile(r"^(layer\d)\.(\d+)\.shortcut\."), r"stages.\1.\2.downsample."),
    (re.compile(r"^(layer\d)\."), r"stages.\1."),
)


def is_openood_state_dict(checkpoint: object) -> bool:
    """True for a bare OpenOOD ResNet state dict (no Lightning `state_dict` wrapper)."""
    if not isinstance(checkpoint, Mapping) or "state_dict" in checkpoint:
        return False
    keys = {k.removeprefix("module.") for k in checkpoint}
    return {"conv1.weight", "bn1.weight", "fc.weight"} <= keys


def from_openood(state: Mapping[str, torch.Tensor], prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """OpenOOD ResNet18_32x32 parameter names -> ours (with `prefix`, the method's attribute for its backbone)."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        for pattern, replacement in _RESNET18_32X32:
            key, n = pattern.subn(replacement, key)
            if n:
                break
        out[prefix + key] = value
    return out
