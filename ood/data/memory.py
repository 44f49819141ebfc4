"""In-memory uint8 input pipeline for small-image benchmarks (CIFAR-style 32/64 px): decode once, augment per batch.

Decoding every PNG with PIL and transforming it per item, every epoch (OpenOOD's pipeline), caps a CIFAR loader at
a few thousand images/s, slower than a GPU trains ResNet-18 at 32 px. `to_memory` turns a dataset whose items are
`(transform(PIL image), label)` (an `ImageList`, a torchvision set behind `Transformed`, `NpyImages`, or a `Subset`
of one) into a `MemoryImages`:

- the deterministic head of its transform (RGB, resize, centre crop) runs once over the whole set, with a progress
  bar, into one uint8 array [N, H, W, C], cached as `.npy` in the benchmark's cache folder next to the data
  (named after the list file, keyed by its content, the image root and the transform) and memory-mapped afterwards;
- items are normalised a batch at a time (`__getitems__`) with exactly the float operations of `ToTensor` +
  `Normalize`, so they equal the PIL path's tensors bit for bit;
- the random tail of a training transform (`RandomHorizontalFlip`, `RandomCrop(size, padding=p)`) becomes a
  `PadCropFlip` that the DataModule applies per batch on the training device (`augment`), with independent
  per-sample draws from the same distributions (offsets uniform on 0..2p per axis, flip with probability p),
  from torch's global generator (seeded by `seed_everything`).
Datasets too big for memory (ImageNet-size) stay on the per-item streaming path (`data.benchmark.in_memory=false`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T

from ood.errors import ConfigError
from ood.files import atomic_write
from ood.utils import get_logger, loader_batches, progress

log = get_logger(__name__)

#: torchvision steps that may run once at decoding (other torchvision steps are random or tensor-level)
DETERMINISTIC = (T.Resize, T.CenterCrop, T.Grayscale, T.Pad)
#: datasets with at least this many images are decoded with worker processes
PARALLEL_DECODE = 5000


@functools.cache
def _fill(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The fill [1, C, 1, 1] on `device`, made once (a host-to-device copy per batch would sync with the GPU)."""
    return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)


@dataclass(frozen=True)
class PadCropFlip:
    """Per-sample random crop of the image padded by `padding` pixels of `fill` (offsets uniform on 0..2*padding in
    each axis, as `RandomCrop(size, padding)`), after a horizontal flip with probability `flip` (as
    `RandomHorizontalFlip(flip)`), for a normalised batch [N, C, H, W]. `fill` is the normalised value of a black
    pixel per channel, as `RandomCrop` pads the image with 0 before `ToTensor` + `Normalize`."""

    padding: int
    flip: float
    fill: tuple[float, ...]

    def draw(self, n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Independent per-sample (row offset, column offset, flip) for a batch of `n`."""
        dy = torch.randint(0, 2 * self.padding + 1, (n,), device=device)
        dx = torch.randint(0, 2 * self.padding + 1, (n,), device=device)
        return dy, dx, torch.rand(n, device=device) < self.flip

    def apply(self, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """The batch cropped at offsets (`dy`, `dx`) of its padded images, flipped where `flip`: two gathers from the
        unpadded images at clamped source coordinates, `fill` where the crop reads the padding."""
        n, c, h, w = x.shape
        p = self.padding
        rows = dy[:, None] - p + torch.arange(h, device=x.device)
        cols = dx[:, None] - p + torch.arange(w, device=x.device)
        # flip, then crop: column j of the crop is column dx + j of the flipped padded image
        cols = torch.where(flip[:, None], w - 1 - cols, cols)
        inside = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :]
        out = x.gather(2, rows.clamp(0, h - 1)[:, None, :, None].expand(n, c, h, w))
        out = out.gather(3, cols.clamp(0, w - 1)[:, None, None, :].expand(n, c, h, w))
        return torch.where(inside, out, _fill(self.fill, x.dtype, x.device))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, *self.draw(x.shape[0], x.device))


def normalise(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 [N, C, H, W] with the operations of `ToTensor` + `Normalize` (equal bits)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    return x.to(torch.float32).div(255).sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


@dataclass(frozen=True)
class SplitTransform:
    """A per-item transform cut into its deterministic PIL head, its random tail and its normalisation."""

    decode: Callable[[Any], Any]
    augment: PadCropFlip | None
    mean: torch.Tensor
    std: torch.Tensor
    head: tuple[Any, ...]


def split_transform(transform: Callable[[Any], Any]) -> SplitTransform:
    """Cut `Compose([deterministic PIL steps..., RandomHorizontalFlip?, RandomCrop?, ToTensor, Normalize?])`;
    anything else cannot be batched and is a `ConfigError`. Steps from outside torchvision (e.g. `RGB`) must be
    deterministic: they run once, when the cache is built."""
    steps = list(transform.transforms) if isinstance(transform, T.Compose) else [transform]
    fail = f"in_memory: cannot batch the transform {transform}; set data.benchmark.in_memory=false"
    head: list[Any] = []
    flip, padding, tail = 0.0, 0, []
    for step in steps:
        if isinstance(step, T.RandomHorizontalFlip) and not tail:
            flip = float(step.p)
        elif isinstance(step, T.RandomCrop) and not tail:
            pad = step.padding if isinstance(step.padding, int) else tuple(step.padding)
            if isinstance(pad, tuple):
                pad = pad[0] if len(set(pad)) == 1 else -1
            if pad < 0 or step.fill != 0 or step.padding_mode != "constant" or step.pad_if_needed:
                raise ConfigError(f"{fail} (only RandomCrop(size, padding=p) with a black constant fill)")
            padding = pad
        elif isinstance(step, (T.ToTensor, T.Normalize)):
            tail.append(step)
        elif flip or padding or tail:
            raise ConfigError(f"{fail} ({step} comes after a random or tensor step)")
        elif type(step).__module__.startswith("torchvision") and not isinstance(step, DETERMINISTIC):
            raise ConfigError(f"{fail} ({step} is not one of the deterministic steps {[c.__name__ for c in DETERMINISTIC]})")
        else:
            head.append(step)
    if not tail or not isinstance(tail[0], T.ToTensor) or len(tail) > 2:
        raise ConfigError(f"{fail} (expected ToTensor, then optionally Normalize, at the end)")
    norm = tail[1] if len(tail) == 2 else T.Normalize(0.0, 1.0)
    channels = len(norm.mean) if isinstance(norm.mean, Sequence) else 1
    mean = torch.as_tensor(norm.mean, dtype=torch.float32).reshape(-1).expand(channels).clone()
    std = torch.as_tensor(norm.std, dtype=torch.float32).reshape(-1).expand(channels).clone()
    augment = None
    if flip or padding:
        fill = torch.zeros(channels).sub_(mean).div_(std)  # a black pixel through Normalize
        augment = PadCropFlip(padding, flip, tuple(fill.tolist()))
    return SplitTransform(T.Compose([*head, np.asarray]), augment, mean, std, tuple(head))


class MemoryImages(Dataset):
    """Items `(normalised image [C, H, W], label)` gathered from uint8 images [N, H, W, C] (possibly memory-mapped),
    a batch at a time through `__getitems__`; `augment` is the per-batch augmentation the loader's consumer applies.
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, mean: torch.Tensor, std: torch.Tensor, augment: PadCropFlip | None = None
    ) -> None:
        self.images = images
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.mean, self.std = mean, std
        self.augment = augment

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images [B, C, H, W] and labels [B] of `indices`."""
        index = np.asarray(indices, dtype=np.int64)
        return normalise(self.images[index], self.mean, self.std), self.labels[torch.from_numpy(index)]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        x, y = self.batch(indices)
        return list(zip(x.unbind(0), y.tolist()))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([i])[0]


def _stable_repr(obj: Any) -> str:
    """`repr` of a transform step or dataset, whitespace collapsed; objects without a repr of their own (no memory
    address in the key) give their class name, length and, for a `ConcatDataset`, its parts."""
    if type(obj).__repr__ is not object.__repr__:
        return " ".join(repr(obj).split())
    parts = [_stable_repr(part) for part in getattr(obj, "datasets", ())]
    size = f"[{len(obj)}]" if hasattr(obj, "__len__") else ""
    return f"{type(obj).__qualname__}{size}({', '.join(parts)})"


def cache_name(dataset: Dataset, head: Sequence[Any]) -> str:
    """`<list file stem or dataset name>-<key>.npy`: the key hashes the list file's content and image root (or the
    dataset's description), its length and forced label, and the decoding steps."""
    list_file = getattr(dataset, "list_file", None)
    path = getattr(dataset, "path", None)
    parts = [type(dataset).__qualname__, str(len(dataset)), repr(getattr(dataset, "label", None)), *map(_stable_repr, head)]  # type: ignore[arg-type]
    if list_file is not None:
        stem = Path(list_file).stem
        parts += [str(Path(list_file).resolve()), hashlib.sha1(Path(list_file).read_bytes()).hexdigest()]
        parts.append(str(Path(dataset.root).resolve()))  # type: ignore[attr-defined]
    elif path is not None:
        stem, stat = Path(path).stem, Path(path).stat()
        parts += [str(Path(path).resolve()), str(stat.st_size), str(stat.st_mtime_ns)]
    else:
        inner = getattr(dataset, "dataset", dataset)
        stem = type(inner).__name__.lower()
        parts.append(_stable_repr(inner))
    return f"{stem}-{hashlib.sha1(chr(0).join(parts).encode()).hexdigest()[:12]}.npy"


def _first(batch: list[Any]) -> list[Any]:
    return batch


def decode_all(dataset: Dataset, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Every item of `dataset` (a copy whose transform yields uint8 arrays) stacked: images [N, H, W, C], labels [N]."""
    n = len(dataset)  # type: ignore[arg-type]
    workers = min(4, os.cpu_count() or 1) if n >= PARALLEL_DECODE else 0
    # a generator of its own: the loader's iterator draws its workers' base seed from the global generator, which
    # advanced it in the run that builds the cache only (its augmentation draws then differed from a rerun's)
    loader = DataLoader(dataset, batch_size=256, num_workers=workers, collate_fn=_first, generator=torch.Generator())
    images: np.ndarray | None = None
    labels = np.empty(n, dtype=np.int64)
    start = 0
    with progress(total=n, desc=desc, unit="img") as bar, loader_batches(loader) as chunks:
        for chunk in chunks:
            for offset, (array, label) in enumerate(chunk):
                array = array[..., None] if array.ndim == 2 else array
                if images is None:
                    images = np.empty((n, *array.shape), dtype=np.uint8)
                if array.shape != images.shape[1:]:
                    raise ConfigError(
                        f"in_memory: {desc}: images decode to different sizes ({images.shape[1:]} and {array.shape}); "
                        "set data.benchmark.in_memory=false"
                    )
                images[start + offset] = array
                labels[start + offset] = label
            start += len(chunk)
            bar.update(len(chunk))
    assert images is not None, f"{desc} is empty"
    return images, labels


def _save_npy(tmp: Path, array: np.ndarray) -> None:
    with tmp.open("wb") as f:  # a file object: `np.save` to a path adds `.npy` to a name without it
        np.save(f, array)


def load_or_build(dataset: Dataset, cache: Path | None, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels from `cache` (memory-mapped) when it exists, else decoded and written there atomically."""
    labels_path = cache.with_suffix(".labels.npy") if cache is not None else None
    if cache is not None and cache.is_file() and labels_path is not None and labels_path.is_file():
        return np.load(cache, mmap_mode="r"), np.load(labels_path)
    images, labels = decode_all(dataset, desc)
    if cache is None or labels_path is None:
        return images, labels
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        for path, array in ((labels_path, labels), (cache, images)):  # a killed writer's temporary is removed here
            atomic_write(path, functools.partial(_save_npy, array=array))
    except OSError as err:
        log.warning("in_memory: could not cache %s in %s (%s); keeping it in memory for this run", desc, cache.parent, err)
        return images, labels
    log.info("in_memory: decoded %d images of %s into %s", len(images), desc, cache)
    return np.load(cache, mmap_mode="r"), labels


def to_memory(dataset: Dataset, cache_dir: Path | None) -> Dataset:
    """`dataset` (items `(transform(image), label)`, or a `Subset` of such) as `MemoryImages`, decoded once and
    cached under `cache_dir` (None: in memory only); see the module docstring."""
    if isinstance(dataset, Subset):
        return Subset(to_memory(dataset.dataset, cache_dir), dataset.indices)
    transform = getattr(dataset, "transform", None)
    if transform is None:
        raise ConfigError(f"in_memory: {type(dataset).__name__} has no per-item transform to batch; set data.benchmark.in_memory=false")
    parts = split_transform(transform)
    decoding = copy.copy(dataset)
    decoding.transform = parts.decode  # type: ignore[attr-defined]
    name = cache_name(dataset, parts.head)
    images, labels = load_or_build(decoding, cache_dir / name if cache_dir is not None else None, desc=name.rsplit("-", 1)[0])
    return MemoryImages(images, labels, parts.mean, parts.std, parts.augment)


def batch_augmentation(dataset: Dataset) -> PadCropFlip | None:
    """The per-batch augmentation a (possibly `Subset`-wrapped) `MemoryImages` asks its consumer to apply."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return getattr(dataset, "augment", None) if isinstance(dataset, MemoryImages) else None
