"""Contrastive-learning pieces for `method=cluster`: projection head and two-view tensor augmentation (the loss is
`ood.losses.supcon`).

- Head: SupContrast's `mlp` head, Linear(D, hidden) - ReLU - Linear(hidden, out); its output is L2-normalised.
- Augmentation: made on the batch tensors (already normalised) inside the method, so any benchmark gets two views
  without a two-crop dataset. One random affine warp per sample (`grid_sample`, border padding) covers shifts,
  rotations, random-resized crops (fixed aspect ratio) and horizontal flips; then per-image brightness /
  contrast jitter (on all channels together, no hue/saturation) and Gaussian noise. Presets: `digits` (1 px
  shifts, +-10 degree rotations, noise 0.1, no flip), `natural` (crop of 20-100 % of the area, flip, jitter 0.4:
  a simplified version of SupContrast's RandomResizedCrop + flip + ColorJitter + RandomGrayscale), `auto`
  (`digits` for one-channel inputs, `natural` otherwise), `none`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ood.errors import ConfigError


class ProjectionHead(nn.Sequential):
    """SupContrast's `mlp` head: Linear(in_dim, hidden) - ReLU - Linear(hidden, out_dim)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


@dataclass(frozen=True)
class TensorAugment:
    """Random per-sample augmentation of a normalised image batch [N, C, H, W] (see the module docstring).

    Args:
        shift: maximal translation in pixels (each axis).
        rotation: maximal rotation in degrees.
        min_area: smallest crop area fraction of a random resized crop (1.0 = no crop).
        flip: random horizontal flips.
        jitter: brightness shift and contrast factor drawn from +-`jitter` (0 = off).
        noise: standard deviation of added Gaussian noise (0 = off).
    """

    shift: float = 0.0
    rotation: float = 0.0
    min_area: float = 1.0
    flip: bool = False
    jitter: float = 0.0
    noise: float = 0.0

    @classmethod
    def preset(cls, name: str, channels: int) -> TensorAugment:
        """The named preset; `auto` picks `digits` for one-channel inputs and `natural` otherwise."""
        if name == "auto":
            name = "digits" if channels == 1 else "natural"
        presets = {
            "digits": cls(shift=1.0, rotation=10.0, noise=0.1),
            "natural": cls(min_area=0.2, flip=True, jitter=0.4),
            "none": cls(),
        }
        if name not in presets:
            raise ConfigError(f"unknown augmentation preset {name!r}; choices: {['auto', *presets]}")
        return presets[name]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        u = lambda: torch.rand(n, device=x.device, dtype=x.dtype) * 2 - 1  # noqa: E731 - U(-1, 1) per sample
        angle = u() * math.radians(self.rotation)
        side = torch.sqrt(self.min_area + (1 - self.min_area) * (u() + 1) / 2)  # crop side as a fraction
        mirror = torch.where(u() < 0, -1.0, 1.0).to(x) if self.flip else torch.ones_like(side)
        tx = u() * (1 - side) + u() * 2 * self.shift / w
        ty = u() * (1 - side) + u() * 2 * self.shift / h
        cos, sin = torch.cos(angle) * side, torch.sin(angle) * side
        theta = torch.stack([torch.stack([cos * mirror, -sin, tx], 1), torch.stack([sin * mirror, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.jitter > 0:
            mean = out.mean(dim=(1, 2, 3), keepdim=True)
            out = (out - mean) * (1 + self.jitter * u())[:, None, None, None] + mean + self.jitter * u()[:, None, None, None]
        if self.noise > 0:
            out = out + self.noise * torch.randn_like(out)
        return out
