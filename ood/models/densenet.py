"""DenseNet-BC-100 (`densenet100`, growth 12): the DenseNet of the ODIN, Mahalanobis and OpenOOD code bases.

Huang et al., "Densely Connected Convolutional Networks", CVPR 2017, arXiv:1608.06993; the implementation followed
is OpenOOD's `openood/networks/densenet.py` (`DenseNet3`, from ODIN's code): 3x3 stem conv to 2k channels, three
dense blocks of 16 bottleneck layers (BN-ReLU-conv1x1 to 4k, BN-ReLU-conv3x3 to k, concatenated), transitions
(BN-ReLU-conv1x1 halving the channels, 2x2 average pool) after the first two, a final BN-ReLU and global average
pooling (= their `avg_pool2d(8)` at 32 px): 342-d features, 769,162 parameters for 10 classes. Same
initialisation as the WRN (He-normal fan-out convs, BN 1/0, zero head bias). Dropout (default 0) after each conv.

Layer names: `stem` (the first conv), `block1` (dense block + transition), `block2` (same), `block3` (dense block
+ final BN-ReLU), mirroring OpenOOD's feature list.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ood.models.base import Backbone, GlobalPool
from ood.models.wrn import he_init


class _Dropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, p=self.p, training=self.training) if self.p > 0 else x


class Bottleneck(nn.Module):
    """BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k); output concatenated to the input."""

    def __init__(self, in_planes: int, growth: int, dropout: float) -> None:
        super().__init__()
        inter = 4 * growth
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_planes), nn.ReLU(), nn.Conv2d(in_planes, inter, 1, bias=False), _Dropout(dropout),
            nn.BatchNorm2d(inter), nn.ReLU(), nn.Conv2d(inter, growth, 3, padding=1, bias=False), _Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


def transition(in_planes: int, out_planes: int, dropout: float) -> nn.Sequential:
    """BN-ReLU-conv1x1-[dropout]-avgpool2."""
    return nn.Sequential(
        nn.BatchNorm2d(in_planes), nn.ReLU(), nn.Conv2d(in_planes, out_planes, 1, bias=False), _Dropout(dropout), nn.AvgPool2d(2)
    )


class DenseNet(Backbone):
    """DenseNet-BC-`depth` with growth rate `growth` and compression `reduction` (see the module docstring)."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        depth: int = 100,
        growth: int = 12,
        reduction: float = 0.5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        n = (depth - 4) // 6
        planes = 2 * growth
        stages: dict[str, nn.Module] = {"stem": nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)}
        for i in (1, 2, 3):
            layers: list[nn.Module] = [Bottleneck(planes + j * growth, growth, dropout) for j in range(n)]
            planes += n * growth
            if i < 3:
                out = int(math.floor(planes * reduction))
                layers.append(transition(planes, out, dropout))
                planes = out
            else:
                layers += [nn.BatchNorm2d(planes), nn.ReLU()]
            stages[f"block{i}"] = nn.Sequential(*layers)
        self.stages = nn.ModuleDict(stages)
        self.pool = GlobalPool()
        self.fc = nn.Linear(planes, num_classes)
        he_init(self)
