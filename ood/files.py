"""Atomic files: every result, score file, figure, report and cache is written to a temporary file next to its
target and renamed onto it, so a crash never leaves a half-written file (POSIX rename is atomic)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file next to `path`, then rename it onto `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_savez(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """`np.savez_compressed` to `path` atomically."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save(obj)` to `path` atomically (caches such as a teacher's features)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
