"""The conditional DCGAN-style decoder of heatmap-based OOD detection (`method=heatmap`).

Hornauer & Belagiannis, WACV 2023 (arXiv 2211.08115), released code jhornauer/heatmap_ood `Networks/generator.py`.
Input: the (min-max scaled) penultimate feature concatenated with the one-hot predicted class; Linear to `latent`
(d0), reshape to d0 x 1 x 1; a ConvT (kernel s0, stride 1) to s0 x s0, then ConvT(k4, s2, p1) blocks doubling the
resolution, every block bias-free + BN + ReLU; a 1x1 ConvT to the image channels; tanh. The output has the input's
shape.

`decoder_plan` derives the plan from (feature dim D, input size, channels): s0 = the input size halved while it
stays even and above 4 (32 -> 4 with k = 3 doublings, 224 -> 7 with 5); channels `width, width/2, ...` (k + 1
blocks) with width = max(D, 32 * 2^k), so the last block keeps at least 32 channels; latent d0 = min(D, 512).
This reproduces every released setting in docs/methods/heatmap.md (ResNet-18 CIFAR-100 512/(512..64), WRN-40-2 128/(256..32),
ResNet-50 Tiny ImageNet 512/(2048..128)) except ResNet-18 CIFAR-10's d0 = 100 (the DCGAN default), which
`experiment=cifar10_heatmap` sets; the digits plan of docs/methods/heatmap.md is 16 px with `method.width=64` (64/(64, 32, 16)). The released CIFAR decoders
start with a k4 ConvT to 4x4 exactly like s0 = 4 here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DecoderPlan:
    """latent d0, the first kernel s0 (1 -> s0 pixels), one channel count per up-block, image channels."""

    latent: int
    start: int
    channels: tuple[int, ...]
    out_channels: int

    @property
    def output_size(self) -> int:
        """The side of the images it draws: `start` doubled by every up-block after the first."""
        return self.start << (len(self.channels) - 1)


def decoder_plan(
    feature_dim: int, input_size: int, out_channels: int, latent: int | None = None, width: int | None = None
) -> DecoderPlan:
    """The decoder plan for a classifier with `feature_dim` features on `input_size`-pixel, `out_channels` images;
    `latent` / `width` override d0 / the first block's channels (module doc)."""
    if input_size < 1:
        raise ValueError(f"input_size must be positive, got {input_size}")
    start, doublings = input_size, 0
    while start % 2 == 0 and start > 4:
        start, doublings = start // 2, doublings + 1
    width = width or max(feature_dim, 32 << doublings)
    channels = tuple(max(width >> i, 8) for i in range(doublings + 1))
    return DecoderPlan(latent or min(feature_dim, 512), start, channels, out_channels)


def _block(cin: int, cout: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, kernel, stride, padding, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class HeatmapDecoder(nn.Module):
    """M(h, y_hat) in [-1, 1]^{C x H x W} from features h [B, D] and predicted classes y_hat [B] (module doc)."""

    def __init__(self, feature_dim: int, num_classes: int, plan: DecoderPlan) -> None:
        super().__init__()
        self.num_classes, self.plan = num_classes, plan
        self.fc = nn.Linear(feature_dim + num_classes, plan.latent)
        blocks = [_block(plan.latent, plan.channels[0], plan.start, 1, 0)]
        blocks += [_block(cin, cout, 4, 2, 1) for cin, cout in zip(plan.channels, plan.channels[1:])]
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.ConvTranspose2d(plan.channels[-1], plan.out_channels, 1, 1, 0, bias=False)

    def forward(self, h: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
        z = self.fc(torch.cat([h, F.one_hot(y_hat, self.num_classes).to(h.dtype)], dim=1))
        return torch.tanh(self.out(self.blocks(z[:, :, None, None])))
