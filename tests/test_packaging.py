"""ood installs as a library: the wheel carries the Hydra configs (`ood/conf/`), so `pip install <repo>` gives entry
points and an `ood.evaluate` that compose their configs from any directory, without the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ood import CONFIG_DIR, PROJECT_ROOT


@pytest.mark.slow
def test_the_wheel_carries_every_config(tmp_path: Path) -> None:
    """Build the wheel from a copy of the sources (no network, no build isolation: the venv's setuptools, a dev
    extra) and compare its `ood/conf/` with the checkout's `conf/`, file by file; it carries ood's Hydra launchers."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(PROJECT_ROOT / name, src / name)
    for package in ("ood", "hydra_plugins"):
        shutil.copytree(PROJECT_ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = (tmp_path / "dist").glob("ood-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n: zf.read(n) for n in zf.namelist() if n.startswith("ood/conf/")}
        plugins = {n for n in zf.namelist() if n.startswith("hydra_plugins/")}
    configs = {f"ood/conf/{p.relative_to(CONFIG_DIR).as_posix()}": p.read_bytes() for p in CONFIG_DIR.rglob("*.yaml")}
    assert len(configs) > 50 and "ood/conf/train.yaml" in configs and "ood/conf/reference/openood_v1.5/cifar10.yaml" in configs
    assert shipped == configs
    # ood's Hydra launchers (`hydra/launcher=slurm`): Hydra takes plugins only from the hydra_plugins namespace
    assert plugins == {"hydra_plugins/ood_launchers/__init__.py"}


def test_the_top_level_conf_is_the_package_configs() -> None:
    """The checkout's `conf/` (Makefile, README, `--reference conf/reference/...`) and the package's are one folder."""
    assert Path(__file__).resolve().parent.parent / "ood" / "conf" == CONFIG_DIR
    assert (PROJECT_ROOT / "conf").resolve() == CONFIG_DIR
