"""Wide ResNet (`wrn40_2`): the WRN-40-2 of the OE, Energy and OpenOOD code bases (dropout 0.3 in the configs).

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016, arXiv:1605.07146; the implementation followed is
OpenOOD's `openood/networks/wrn.py` (= hendrycks/outlier-exposure `CIFAR/models/wrn.py`): pre-activation basic
blocks (BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3), the shortcut taking the activated input through a 1x1 conv when
the width changes, widths 16, 16k, 32k, 64k, a final BN-ReLU and global average pooling (= their `avg_pool2d(8)` at
32 px). He-normal conv init (fan-out), BN 1/0, zero head bias. WRN-40-2: 2,243,546 parameters for 10 classes.
Each block's two ReLUs and the final one are in-place modules (`relu1`, `relu2`, OpenOOD's), not `F.relu` calls, so
detectors that hook activation modules see every call (CombOOD's `extreme` taps) and what OpenOOD's WRN leaves of its
input (`extreme_as_released`); ReLU has no parameters: the state dict is unchanged.

Layer names: `stem` (the first conv; a pre-activation net has no ReLU there), `block1`..`block3`; the final BN-ReLU
closes `block3`, so `block3` is the last feature map and its pooled output is the 64k-d penultimate feature.

`MeliketoyWideResNet` (`wrn40_2_heatmap`) is the other WRN-40-2 in use: meliketoy/wide-resnet.pytorch's, the one the
heatmap paper trained (jhornauer/heatmap_ood `Networks/wideresnet.py`): biased convs, dropout between conv1 and bn2,
the block's stride in conv2, the shortcut (a biased 1x1 conv) on the block's raw input, the final BN with momentum
0.9, PyTorch's default init. Same stage names and widths; 2,246,474 parameters for 10 classes.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ood.models.base import Backbone, GlobalPool


class WideBasic(nn.Module):
    """Pre-activation basic block with optional dropout between the two convs."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = (
            nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False) if in_planes != out_planes or stride != 1 else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(act))


def he_init(module: nn.Module) -> None:
    """OE/OpenOOD initialisation: conv N(0, sqrt(2 / (k*k*out_channels))), BN weight 1 bias 0, linear bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            m.bias.data.zero_()


class MeliketoyBasic(nn.Module):
    """meliketoy/wide-resnet.pytorch's `wide_basic` (the heatmap paper's block), under its parameter names:
    BN-ReLU-conv3x3-dropout-BN-ReLU-conv3x3(stride), biased convs, `shortcut` (a biased 1x1 conv when the shape
    changes) on the block's raw input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=stride, padding=1)
        changes = in_planes != out_planes or stride != 1
        self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride) if changes else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(self.relu1(self.bn1(x))))
        return self.conv2(self.relu2(self.bn2(out))) + self.shortcut(x)


class WideResNet(Backbone):
    """WRN-`depth`-`widen_factor` for 32x32 inputs (see the module docstring)."""

    #: the block; whether the stem conv has a bias; the final BN's momentum (the layout's, see MeliketoyWideResNet)
    block: ClassVar[type[nn.Module]] = WideBasic
    stem_bias: ClassVar[bool] = False
    final_bn_momentum: ClassVar[float] = 0.1

    def __init__(
        self, num_classes: int, in_channels: int = 3, depth: int = 40, widen_factor: int = 2, dropout: float = 0.3
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        stages: dict[str, nn.Module] = {"stem": nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=self.stem_bias)}
        for i, stride in enumerate((1, 2, 2), start=1):
            blocks = [self.block(widths[i - 1] if j == 0 else widths[i], widths[i], stride if j == 0 else 1, dropout) for j in range(n)]
            stages[f"block{i}"] = nn.Sequential(*blocks)
        stages["block3"].append(nn.BatchNorm2d(widths[3], momentum=self.final_bn_momentum))
        stages["block3"].append(nn.ReLU(inplace=True))
        self.stages = nn.ModuleDict(stages)
        self.pool = GlobalPool()
        self.fc = nn.Linear(widths[3], num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """OE / OpenOOD's initialisation (`he_init`)."""
        he_init(self)


class MeliketoyWideResNet(WideResNet):
    """The heatmap paper's WRN (meliketoy's layout, module docstring) under ood's stage names: `stem` = their
    `conv1`, `blockN` = their `layerN` (then, closing `block3`, their final `bn1` and ReLU), `fc` = their
    `WideResNet_Linear.linear`; `avgpool(8)` at 32 px is the global pool."""

    block = MeliketoyBasic
    stem_bias = True
    final_bn_momentum = 0.9

    def init_weights(self) -> None:
        """PyTorch's default init: heatmap_ood defines meliketoy's `conv_init` (xavier_uniform, gain sqrt 2) but
        never applies it (meliketoy's own `main.py` does), so its classifiers trained from the defaults."""
