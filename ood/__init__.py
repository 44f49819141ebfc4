"""ood: out-of-distribution detection for image classification (Lightning + Hydra)."""

import importlib
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

#: the source checkout (Makefile, benchmarks/, tests/); not needed by an installed package
PROJECT_ROOT = Path(__file__).resolve().parent.parent
#: the Hydra configs: package data (`ood/conf/`, shipped in the wheel), also reachable as the checkout's top-level `conf/`
CONFIG_DIR = Path(__file__).resolve().parent / "conf"

#: the Python API (`ood.api`), imported on first use so `import ood` stays light (and so the entry points, which
#: read `CONFIG_DIR` from here, do not import the layer above them)
_API = ("evaluate", "extract", "Results")


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f"{__name__}.api"), name)
    raise AttributeError(f"module 'ood' has no attribute {name!r}")
