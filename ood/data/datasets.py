"""In-memory tensor datasets and small tensor transforms shared by the embedded benchmarks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset


class TensorImages(Dataset):
    """Images [N, C, H, W] (already normalised) with labels [N] (-1 for OOD) and an optional transform."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.images = images
        self.labels = labels if labels is not None else torch.full((len(images),), -1, dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])


class RandomShift:
    """Shift an image by up to `pixels` in each direction, padding with `fill` (the background value of the
    normalised images): digits-sized augmentation."""

    def __init__(self, pixels: int = 1, fill: float = 0.0) -> None:
        self.pixels = pixels
        self.fill = fill

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pixels
        dy, dx = (int(v) for v in torch.randint(-p, p + 1, (2,)))
        padded = torch.nn.functional.pad(x, (p, p, p, p), value=self.fill)
        h, w = x.shape[-2:]
        return padded[..., p + dy : p + dy + h, p + dx : p + dx + w]
