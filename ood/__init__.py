"""ood: out-of-distribution detection for image classification (Lightning + Hydra)."""

from pathlib import Path
from typing import Any

__version__ = "0.1.0"

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "conf"

#: the Python API (`ood.api`), imported on first use so `import ood` stays light
_API = ("evaluate", "extract", "Results")


def __getattr__(name: str) -> Any:
    if name in _API:
        from ood import api

        return getattr(api, name)
    raise AttributeError(f"module 'ood' has no attribute {name!r}")
