"""Images stored in one `.npy` array, e.g. Hendrycks' 300K random images for outlier exposure.

`300K_random_images.npy` (https://people.eecs.berkeley.edu/~hendrycks/300K_random_images.npy, used by the
OE and Energy code bases) is a uint8 array [300000, 32, 32, 3]. It is memory-mapped, so only the items a batch
needs are read. Grey arrays [N, H, W] or [N, H, W, 1] become 3-channel RGB.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ood.errors import DataNotFoundError, OODError


def load_npy(path: str | Path, what: str, mmap: bool = False) -> np.ndarray:
    """The array in the `.npy` file `path` (memory-mapped with `mmap`), `what` naming its setting in messages: a
    missing file is a `DataNotFoundError`, one that is no numeric `np.save` array (a text or `.npz` file, one cut
    short, an object array) an `OODError` naming it. NumPy's own errors named no file and advised unpickling it."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"{what}: {path} not found" + (" (it is a folder)" if path.is_dir() else ""))
    with path.open("rb") as f:
        magic = f.read(6)
    if magic[:2] != b"PK" and magic != b"\x93NUMPY":  # else NumPy tries it as a pickle, and advises trusting it
        raise OODError(f"{what}: {path} is not a .npy file (no NumPy header: {magic!r}...); write it with np.save")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:  # cut short, an object array
        raise OODError(f"{what}: {path} is not a readable .npy array (cut short, or not numbers?): "
                       f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if not isinstance(array, np.ndarray):  # an `.npz` archive of arrays
        array.close()
        raise OODError(f"{what}: {path} is an .npz archive of {sorted(array.files)}; give one array saved with np.save")
    return array


class NpyImages(Dataset):
    """Items `(transform(RGB image), label)` from a uint8 array [N, H, W(, C)] in a `.npy` file; label -1."""

    def __init__(self, path: str | Path, transform: Callable[[Image.Image], Any], label: int = -1) -> None:
        self.path = Path(path)
        self.images = load_npy(self.path, "image array", mmap=True)
        shape = self.images.shape
        if self.images.dtype != np.uint8 or not (len(shape) == 3 or (len(shape) == 4 and shape[-1] in (1, 3))):
            fixes = [fix for wrong, fix in (
                (len(shape) == 4 and shape[1] in (1, 3) and shape[-1] not in (1, 3),
                 "channels first: np.ascontiguousarray(a.transpose(0, 2, 3, 1))"),
                (self.images.dtype.kind == "f", "floats: (a * 255).round().astype(np.uint8) for values in [0, 1]"),
            ) if wrong]
            raise OODError(f"{self.path}: expected uint8 images [N, H, W] or [N, H, W, 1|3], got {self.images.dtype} "
                           f"{shape}" + (f"; convert it ({'; '.join(fixes)})" if fixes else ""))
        if not shape[0]:  # no outlier batch can be drawn from it
            raise OODError(f"{self.path}: the image array holds no image (shape {shape})")
        self.transform = transform
        self.label = label

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        array = np.asarray(self.images[i])
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        return self.transform(Image.fromarray(array).convert("RGB")), self.label

    def describe(self, i: int) -> str:
        return f"{self.path}[{i}]"
