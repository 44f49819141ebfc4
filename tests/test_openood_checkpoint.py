"""OpenOOD's released checkpoints (bare ResNet18_32x32 state dicts) load into our backbone unchanged."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ood.cli import load_weights
from ood.methods import CrossEntropy
from ood.models import ResNet18_32x32
from ood.models.checkpoint import checkpoint_format, from_openood


def _as_openood(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our backbone's state dict renamed to OpenOOD's module paths (written independently of the loader)."""
    out = {}
    for key, value in state.items():
        key = key.replace("stages.stem.0.", "conv1.").replace("stages.stem.1.", "bn1.")
        key = re.sub(r"^stages\.(layer\d\.\d+)\.downsample\.", r"\1.shortcut.", key)
        out["module." + key.removeprefix("stages.")] = value
    return out


def test_openood_names_map_to_ours(tmp_path: Path) -> None:
    source = ResNet18_32x32(10)
    for p in source.parameters():
        torch.nn.init.normal_(p)
    openood = _as_openood(source.state_dict())
    assert {"module.conv1.weight", "module.bn1.running_var", "module.layer2.0.shortcut.0.weight",
            "module.layer4.1.conv2.weight", "module.fc.bias"} <= set(openood)
    assert checkpoint_format(openood) == "openood" and checkpoint_format({"state_dict": {}}) == "lightning"
    assert set(from_openood(openood)) == {f"backbone.{k}" for k in source.state_dict()}

    path = tmp_path / "s0" / "best.ckpt"
    path.parent.mkdir()
    torch.save(openood, path)
    method = CrossEntropy(ResNet18_32x32(10), optimizer=torch.optim.SGD)
    load_weights(method, path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(method.backbone.eval()(x), source.eval()(x))
