"""A small CNN for the embedded `digits` benchmark (16x16 grey images): three conv blocks, 64-d features."""

from __future__ import annotations

from torch import nn

from ood.models.base import Backbone, GlobalPool


def _block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class SmallCNN(Backbone):
    """conv(32)-pool, conv(64)-pool, conv(`feature_dim`), global average pool, linear head.

    Layer names: `block1`, `block2`, `block3`.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        self.stages = nn.ModuleDict(
            {
                "block1": _block(in_channels, width, pool=True),
                "block2": _block(width, 2 * width, pool=True),
                "block3": _block(2 * width, feature_dim, pool=False),
            }
        )
        self.pool = GlobalPool()
        self.fc = nn.Linear(feature_dim, num_classes)
