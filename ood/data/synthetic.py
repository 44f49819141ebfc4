"""Outlier Exposure's and the energy paper's validation OOD sets, built from data at hand (`{synthetic: hendrycks}`).

hendrycks/outlier-exposure and wetliu/energy_ood choose their post-hoc points (ODIN's temperature and noise, the
Mahalanobis noise) with `CIFAR/test.py -v` (OE test.py:287-424, energy_ood test.py:290-429) on eight validation
distributions, never on a real OOD set; each holds `ood_num_examples = len(test_data) // 5` images (2,000 for a
CIFAR test set), from the *other* CIFAR's test set where it uses images (CIFAR-100's for CIFAR-10 ID):

| set               | reference (energy_ood CIFAR/test.py)                                          | here (uint8 pixels)        |
|-------------------|-------------------------------------------------------------------------------|----------------------------|
| `uniform`         | 297-307: `np.random.uniform(-1, 1)` [N, 3, 32, 32] float32, fed as the *normalised* input | u * std + mean |
| `arithmetic_mean` | 318-340: `test_transform(a) / 2 + test_transform(b) / 2` (normalised), b random, b != a | (a + b) / 2 |
| `geometric_mean`  | 351-373: `Normalize(sqrt(ToTensor(a) * ToTensor(b)))`, b as above              | sqrt(a * b)                |
| `jigsaw`          | 380-390: `ToTensor`, quadrants moved (top-left's row halves swapped; bottom-left to the top right; bottom-right to the bottom left; top-right's column halves swapped, to the bottom right), `Normalize` | the same moves |
| `speckle`         | 394-398: `ToTensor`, `clamp(x + x * randn_like(x), 0, 1)`, `Normalize`         | the same, seeded           |
| `pixelate`        | 402-406: PIL `resize((6, 6), BOX)` then `resize((32, 32), BOX)`, `ToTensor`, `Normalize` | the same (`int(side * 0.2)`) |
| `rgb_shift`       | 410-415: `ToTensor`, channels (G mirrored left-right, B, R), `Normalize`       | the same                   |
| `invert`          | 420-424: `ToTensor`, channels (R, 1 - G, 1 - B), `Normalize`                   | (R, 255 - G, 255 - B)      |

outlier-exposure's CIFAR/test.py:294-424 is the same block, line for line. The references draw with NumPy's and
torch's global generators, unseeded (`np.random.seed(1)` is commented out), each loader shuffled and cut at the first
`ood_num_examples` items: every image set is a random subset of distinct source images, each pair partner uniform
over the other images. Here the draws come from `np.random.default_rng(seed)`, in the order of the table.

Deviations, all stated where they are made: ood's validation OOD is one set, the union of the eight in equal parts
(`per_set` each), in the table's order, where the references print each set's measures and their mean; every set is
stored as uint8 pixels, so that it goes through the benchmark's evaluation transform (and the in-memory pipeline,
`ood.data.memory`) like any other set: the uniform noise, drawn in normalised space, is mapped back to pixels with
the benchmark's normalisation (`u * std + mean`, the references' own statistics under `experiment=energy_ce`), and the
noise and the two means, not whole grey levels, are rounded to the nearest one (at most half a grey level off: 0.5 /
255 / std in the normalised input); the images are the source set after the benchmark's resize and centre crop (CIFAR
at 32 pixels: unchanged), and the fixed 32-pixel geometry of jigsaw, pixelate and rgb_shift is read as fractions of
the side.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ood.data.memory import split_transform
from ood.errors import ConfigError
from ood.utils import get_logger

log = get_logger(__name__)

#: the sets of recipe `hendrycks`, in the references' order
HENDRYCKS_SETS = ("uniform", "arithmetic_mean", "geometric_mean", "jigsaw", "speckle", "pixelate", "rgb_shift", "invert")
RECIPES = {"hendrycks": HENDRYCKS_SETS}


def quantise(pixels: np.ndarray) -> np.ndarray:
    """Pixels in [0, 1] (clipped) -> the nearest uint8 grey levels."""
    return np.rint(np.clip(pixels, 0.0, 1.0) * np.float32(255)).astype(np.uint8)


def unit(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1], as `ToTensor` (a division by 255)."""
    return images.astype(np.float32) / np.float32(255)


def uniform_noise(rng: np.random.Generator, n: int, side: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """`n` images of Uniform[-1, 1] noise in normalised space [n, 3, side, side] (float32, as the references' array),
    mapped back to pixels with the input normalisation (`u * std + mean`): uint8 [n, side, side, 3]."""
    u = rng.uniform(-1.0, 1.0, size=(n, 3, side, side)).astype(np.float32)
    pixels = u * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    return quantise(pixels.transpose(0, 2, 3, 1))


def arithmetic_mean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The mean of two images (`Normalize` is affine: the mean of the normalised images is the mean's)."""
    return quantise(unit(a) / 2 + unit(b) / 2)


def geometric_mean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The per-pixel geometric mean of two images."""
    return quantise(np.sqrt(unit(a) * unit(b)))


def jigsaw(x: np.ndarray) -> np.ndarray:
    """Quadrants of [..., H, W, C] images moved as the references' `jigsaw` (on 32 pixels: rows 8-16 and 0-8 of the
    top-left quadrant, then the bottom-left quadrant, on top; the bottom-right quadrant, then columns 24-32 and 16-24
    of the top-right one, below)."""
    side = x.shape[-2]
    if x.shape[-3] != side or side % 2:
        raise ConfigError(f"synthetic jigsaw: needs square images of an even side, got {x.shape[-3]}x{side}")
    h = side // 2
    top = np.concatenate([np.roll(x[..., :h, :h, :], -(h // 2), axis=-3), x[..., h:, :h, :]], axis=-2)
    bottom = np.concatenate([x[..., h:, h:, :], np.roll(x[..., :h, h:, :], -(h // 2), axis=-2)], axis=-2)
    return np.concatenate([top, bottom], axis=-3)


def speckle(x: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Speckle noise: `clip(x + x * noise, 0, 1)` on pixels in [0, 1], `noise` standard normal of `x`'s shape."""
    f = unit(x)
    return quantise(f + f * noise)


def pixelate(x: np.ndarray) -> np.ndarray:
    """Each [H, W, 3] image box-downsampled to `int(side * 0.2)` pixels and box-upsampled back (PIL, as released)."""
    side = x.shape[-2]
    small = int(side * 0.2)
    return np.stack([np.asarray(Image.fromarray(image).resize((small, small), Image.BOX).resize((side, side), Image.BOX))
                     for image in x])


def rgb_shift(x: np.ndarray) -> np.ndarray:
    """Channels (G mirrored left-right, B, R) of [..., H, W, 3] images."""
    return np.stack([x[..., :, ::-1, 1], x[..., 2], x[..., 0]], axis=-1)


def invert(x: np.ndarray) -> np.ndarray:
    """Green and blue inverted, red kept (the references leave one channel to make the image OOD more surely)."""
    return np.concatenate([x[..., :1], 255 - x[..., 1:]], axis=-1)


def partners(rng: np.random.Generator, first: np.ndarray, n: int) -> np.ndarray:
    """For each index of `first`, another index uniform over the other n - 1 (the references redraw until it differs)."""
    other = rng.integers(0, n - 1, size=len(first))
    return other + (other >= first)


def hendrycks_sets(source: np.ndarray, per_set: int, seed: int, mean: Sequence[float], std: Sequence[float]
                   ) -> dict[str, np.ndarray]:
    """The eight sets (`HENDRYCKS_SETS`, `per_set` uint8 images each) from the source images [N, H, W, 3], every draw
    from `np.random.default_rng(seed)`: distinct source images per set, as the references' shuffled loaders."""
    n, side = len(source), source.shape[1]
    if per_set < 2 or n < 2:
        raise ConfigError(f"synthetic sets: per_set={per_set} and the source's {n} images must be at least 2")
    if per_set > n:  # a small source (a subset, fabricated data): each set takes all of it, in another order
        log.warning("synthetic sets: per_set=%d but the source holds %d images: %d per set", per_set, n, n)
        per_set = n
    rng = np.random.default_rng(seed)

    def draw() -> np.ndarray:
        return source[rng.choice(n, size=per_set, replace=False)]

    def pair(mean_of: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
        first = rng.choice(n, size=per_set, replace=False)
        return mean_of(source[first], source[partners(rng, first, n)])

    sets = {"uniform": uniform_noise(rng, per_set, side, mean, std)}
    sets["arithmetic_mean"] = pair(arithmetic_mean)
    sets["geometric_mean"] = pair(geometric_mean)
    sets["jigsaw"] = jigsaw(draw())
    images = draw()
    sets["speckle"] = speckle(images, rng.standard_normal(images.shape, dtype=np.float32))
    for name, transform in (("pixelate", pixelate), ("rgb_shift", rgb_shift), ("invert", invert)):
        sets[name] = transform(draw())
    return sets


class SyntheticImages(Dataset):
    """Items `(transform(RGB image), label)` of uint8 images [N, H, W, 3] held in memory: the union of named sets
    (`parts`: (name, count) in order). Its repr keys the in-memory cache (`ood.data.memory.cache_name`) by content."""

    def __init__(self, images: np.ndarray, parts: Sequence[tuple[str, int]], transform: Callable[[Image.Image], Any],
                 label: int = -1, recipe: str = "") -> None:
        self.images = images
        self.parts = tuple(parts)
        self.transform = transform
        self.label = label
        self.recipe = recipe
        self.digest = hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.transform(Image.fromarray(self.images[i])), self.label

    def __repr__(self) -> str:
        return f"SyntheticImages({self.recipe}, {len(self)} images, sha1 {self.digest})"

    def describe(self, i: int) -> str:
        """`<recipe>:<set>[<index in the set>]`."""
        start = 0
        for name, count in self.parts:
            if i < start + count:
                return f"{self.recipe}:{name}[{i - start}]"
            start += count
        raise IndexError(i)


def decoding(transform: Callable[[Image.Image], Any]) -> Callable[[Image.Image], np.ndarray]:
    """The deterministic head of an evaluation transform (RGB, resize, centre crop) ending in a uint8 array: how a
    synthetic set reads its source, so that its images are the size the evaluation transform gives."""
    return split_transform(transform).decode


def synthetic_set(recipe: str, source: Dataset, transform: Callable[[Image.Image], Any], per_set: int, seed: int,
                  label: int = -1) -> SyntheticImages:
    """The union of recipe `recipe`'s sets made from `source` (items `(uint8 image [H, W, 3], label)`, read through
    `decoding(transform)`), served through `transform` (the evaluation transform; its normalisation maps the uniform
    noise to pixels)."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown synthetic recipe {recipe!r}; choices: {sorted(RECIPES)}")
    images = np.stack([np.asarray(source[i][0]) for i in range(len(source))])  # type: ignore[arg-type]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(f"synthetic sets: the source images decode to {images.shape[1:]}, not [H, W, 3]")
    parts = split_transform(transform)
    sets = hendrycks_sets(images, per_set, seed, parts.mean.tolist(), parts.std.tolist())
    return SyntheticImages(np.concatenate(list(sets.values())), [(n, len(s)) for n, s in sets.items()], transform, label,
                           recipe)
