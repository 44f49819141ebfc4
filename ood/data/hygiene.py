"""Data hygiene for users' image folders: one decoder for every set, unreadable files, ID/OOD overlap.

- `load_image(path)` decodes a file completely (a truncated JPEG fails here, naming the file, not later as a
  garbled tensor) and `to_rgb` converts every mode the same way for ID and OOD sets alike: greyscale -> three equal
  channels; RGBA / LA / palette with transparency -> the colour channels (alpha dropped, no compositing);
  16-bit and 32-bit integer greyscale (`I;16`, `I`) -> 8 bits by `round(v / 257)` (PIL's own `convert("RGB")`
  clips them to 255, turning most 16-bit images white); 32-bit float greyscale (`F`, float TIFFs) with values in
  [0, 1] -> `round(255 v)`, other float ranges clipped to [0, 255] (PIL's `convert` truncates, so [0, 1] images
  load black); CMYK / YCbCr -> RGB.
- `pixel_digest` hashes decoded pixels (mode, size, bytes): two files with the same pixels are exact duplicates
  whatever their encoding or name.
- `overlapping_rows` finds near duplicates between an OOD set and the ID splits by the cosine of their
  penultimate features (from the evaluation's one cached pass). Popular OOD sets contain ID images (NINCO,
  Bitterwolf et al., ICML 2023, arXiv 2306.00826); these checks list them instead of scoring them as OOD.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ood.errors import OODError

#: the end of an unreadable-image error of `data=folder` run from the command line: the option that skips such files
SKIP_HINT = " (data.bad_images=skip skips such files)"


class BadImageError(OODError):
    """An image file cannot be decoded (truncated, corrupt, not an image); names the file."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, the same conversion for every set (module docstring)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(np.rint(values * 255.0 / peak), 0, 255).astype(np.uint8))
    elif image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        scale = 255.0 if values.size and values.min() >= 0.0 and values.max() <= 1.0 else 1.0
        image = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(path: str | Path, hint: str = SKIP_HINT) -> Image.Image:
    """Decode `path` completely and convert it (`to_rgb`); a missing or undecodable file is one line naming it,
    ending with `hint` (the data option that skips such files, where the data has one)."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except FileNotFoundError:
        raise BadImageError(f"image not found: {path}{hint}") from None
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for bad files
        raise BadImageError(
            f"unreadable image {path}: {type(err).__name__}: {err}{hint}"
        ) from None


def pixel_digest(image: Image.Image | torch.Tensor) -> str:
    """Hash of decoded pixels (an RGB image, or an item tensor of a Dataset source)."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    else:
        h.update(f"{image.mode}{image.size}".encode())
        h.update(image.tobytes())
    return h.hexdigest()


def _digest_or_none(path: Path) -> str | None:
    try:
        return pixel_digest(load_image(path))
    except BadImageError:
        return None


def scan_files(paths: Iterable[Path], workers: int = 8) -> dict[Path, str | None]:
    """Decode every file (threads: PIL releases the GIL while decoding): path -> pixel digest, None if unreadable."""
    paths = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return dict(zip(paths, pool.map(_digest_or_none, paths)))


def overlapping_rows(ood: torch.Tensor, ident: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row of `ood` [M, D]: (highest cosine similarity to a row of `ident` [N, D], that row's index),
    in blocks of `chunk` x `chunk` similarities."""
    b = torch.nn.functional.normalize(ident.float(), dim=1)
    best, which = [], []
    for part in ood.split(chunk):
        a = torch.nn.functional.normalize(part.float().to(b.device), dim=1)
        top = torch.full((len(a),), -2.0, device=b.device)
        arg = torch.zeros(len(a), dtype=torch.long, device=b.device)
        for start in range(0, len(b), chunk):
            sims, idx = (a @ b[start : start + chunk].T).max(1)
            better = sims > top
            top, arg = torch.where(better, sims, top), torch.where(better, idx + start, arg)
        best.append(top.cpu())
        which.append(arg.cpu())
    return torch.cat(best), torch.cat(which)
