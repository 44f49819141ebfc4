"""ResNets: OpenOOD's CIFAR ResNet-18 (`resnet18_32x32`), the heatmap paper's 64-px ResNet-50 (`resnet50_64x64`) and
torchvision's ResNet-50 (`resnet50`, 224 px).

`ResNet18_32x32` is OpenOOD v1.5's `openood/networks/resnet18_32x32.py`: a 3x3 stride-1 stem conv + BN + ReLU
(no max-pool), four stages of two basic blocks (64, 128, 256, 512 channels; stride 1, 2, 2, 2), global average
pooling, a linear head: 11,173,962 parameters for 10 classes. Its basic block (conv-BN-ReLU-conv-BN + shortcut,
1x1 conv + BN when the shape changes, ReLU) is exactly torchvision's `BasicBlock`, which is reused here. Weights
keep PyTorch's default initialisation, as OpenOOD's do. `ResNet50_64x64` is the same body (kuangliu/pytorch-cifar's)
with torchvision's `Bottleneck` (kuangliu's: 1x1, 3x3 carrying the stride, 1x1, expansion 4, a 1x1 conv + BN
shortcut) and a 2x2 max-pool after the stem, as jhornauer/heatmap_ood's Tiny ImageNet classifier.

`ResNet18` / `ResNet50` are torchvision's `resnet18/50(weights=None)` (never download), regrouped into stages;
parameter-for-parameter the same networks (ResNet-50: 25,557,032 parameters for 1000 classes; ResNet-18 at 224 px is
OpenOOD's `ResNet18_224x224` and OAL's student). The max-pool opens the `layer1` stage so that `stem` ends with its
ReLU. `weights=<file>` loads a torchvision state dict (e.g. `IMAGENET1K_V1`, the file torchvision caches
as `<torch hub dir>/checkpoints/resnet50-0676ba61.pth`) strictly, through `ood.models.checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import BasicBlock, Bottleneck

from ood.errors import CheckpointError
from ood.models.base import Backbone, GlobalPool
from ood.models.checkpoint import load_modules, read_state_dict

#: torchvision's IMAGENET1K_V1 ResNet-50 weights: file name in the torch hub cache and download URL
RESNET50_V1 = "resnet50-0676ba61.pth"
RESNET50_V1_URL = f"https://download.pytorch.org/models/{RESNET50_V1}"


def resnet_stage(block: type[BasicBlock | Bottleneck], in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """`blocks` torchvision residual blocks; the first changes stride/width through a 1x1 conv + BN shortcut."""
    out_planes = planes * block.expansion
    downsample = None
    if stride != 1 or in_planes != out_planes:
        downsample = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes))
    layers = [block(in_planes, planes, stride, downsample)]
    layers += [block(out_planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def kuangliu_stages(block: type[BasicBlock | Bottleneck], blocks: tuple[int, ...], in_channels: int,
                    stem_pool: bool = False) -> nn.ModuleDict:
    """kuangliu/pytorch-cifar's ResNet body (OpenOOD's, heatmap_ood's): `stem` (3x3 stride-1 conv + BN + ReLU, then a
    2x2 max-pool when `stem_pool`: no parameters, so the keys stay those of the pool-less stem), `layer1`..`layer4` of
    `blocks` blocks (64, 128, 256, 512 planes; stride 1, 2, 2, 2)."""
    stem = [nn.Conv2d(in_channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    stages: dict[str, nn.Module] = {"stem": nn.Sequential(*stem, *([nn.MaxPool2d(2)] if stem_pool else []))}
    in_planes = 64
    for i, (planes, stride, n) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2), blocks, strict=True), start=1):
        stages[f"layer{i}"] = resnet_stage(block, in_planes, planes, n, stride)
        in_planes = planes * block.expansion
    return nn.ModuleDict(stages)


class ResNet18_32x32(Backbone):  # noqa: N801 - OpenOOD's name
    """OpenOOD's CIFAR ResNet-18. Layer names: `stem` (conv+BN+ReLU), `layer1`..`layer4`; 512-d features."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.stages = kuangliu_stages(BasicBlock, (2, 2, 2, 2), in_channels)
        self.pool = GlobalPool()
        self.fc = nn.Linear(512, num_classes)


class ResNet50_64x64(Backbone):  # noqa: N801 - named as ResNet18_32x32
    """The heatmap paper's Tiny ImageNet ResNet-50 (jhornauer/heatmap_ood `ResNet50(img_size=64)` +
    `ResNet_Linear(expansion=4)`): kuangliu's body with Bottleneck blocks (3, 4, 6, 3) and a 2x2 max-pool closing the
    `stem` (64 px -> 32); `layer1`..`layer4`; 2048-d features (their `AvgPool2d(4)` over layer4's 4x4 at 64 px is our
    global pool). 23,910,152 parameters for 200 classes."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.stages = kuangliu_stages(Bottleneck, (3, 4, 6, 3), in_channels, stem_pool=True)
        self.pool = GlobalPool()
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)


def require_weights_file(path: str | Path) -> Path:
    """`path` if it is a file; else a `CheckpointError` saying where torchvision keeps IMAGENET1K_V1 and how to fetch
    it once."""
    path = Path(path).expanduser()
    if not path.is_file():
        cache = Path(torch.hub.get_dir()) / "checkpoints" / RESNET50_V1
        raise CheckpointError(
            f"backbone weights not found: {path}. torchvision keeps IMAGENET1K_V1 at {cache}; fetch it once on a "
            f"machine with internet (python -c \"import torchvision; torchvision.models.resnet50(weights='IMAGENET1K_V1')\" "
            f"or download {RESNET50_V1_URL}) and pass backbone.weights=<that file>"
        )
    return path


class _TorchvisionResNet(Backbone):
    """A torchvision ResNet regrouped into stages: `stem` (conv+BN+ReLU), `layer1` (max-pool + layer1) .. `layer4`.

    `weights`: a file `ood.models.checkpoint` reads (a torchvision state dict such as IMAGENET1K_V1, a backbone or
    Lightning checkpoint), loaded strictly; None = random init.
    """

    def __init__(self, net: nn.Module, in_channels: int, weights: str | None, name: str) -> None:
        super().__init__()
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.stages = nn.ModuleDict(
            {
                "stem": nn.Sequential(net.conv1, net.bn1, net.relu),
                "layer1": nn.Sequential(net.maxpool, net.layer1),
                "layer2": net.layer2,
                "layer3": net.layer3,
                "layer4": net.layer4,
            }
        )
        self.pool = GlobalPool()
        self.fc = net.fc
        if weights is not None:
            path = require_weights_file(weights)
            state = {k.removeprefix("backbone."): v for k, v in read_state_dict(path).items() if k.startswith("backbone.")}
            load_modules(self, state, None, path, hint=f"torchvision's {name} with {net.fc.out_features} classes")


class ResNet18(_TorchvisionResNet):
    """torchvision's ResNet-18 for 224-pixel inputs; 512-d features (see `_TorchvisionResNet` for `weights`)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, weights: str | None = None) -> None:
        super().__init__(resnet18(weights=None, num_classes=num_classes), in_channels, weights, "resnet18")


class ResNet50(_TorchvisionResNet):
    """torchvision's ResNet-50. Layer names: `stem` (conv+BN+ReLU), `layer1`..`layer4`; 2048-d features.

    Args:
        num_classes: classes of the head.
        in_channels: input channels (3 unless a new stem is wanted; then no weights fit).
        weights: see `_TorchvisionResNet`.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, weights: str | None = None) -> None:
        super().__init__(resnet50(weights=None, num_classes=num_classes), in_channels, weights, "resnet50")
