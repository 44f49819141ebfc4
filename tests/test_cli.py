"""The installed entry points, end to end in subprocesses: a multirun over seeds, then `ood-report` on it; a sweep
whose Hydra plugin is not installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import NO_FIGURES


@pytest.mark.slow
def test_multirun_then_report(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    train = subprocess.run(
        [sys.executable, "-m", "ood.train", "-m", "seed=0,1", "trainer.max_epochs=2",
         "trainer.enable_progress_bar=false", "detectors.names=[msp,energy]", NO_FIGURES,
         f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    assert sorted(p.parent.name for p in sweep.glob("*/results.jsonl")) == ["0", "1"]
    report = subprocess.run(
        [sys.executable, "-m", "ood.report", str(sweep)], capture_output=True, text=True, timeout=120
    )
    assert report.returncode == 0, report.stderr
    table = (sweep / "report.md").read_text()
    (msp,) = [line for line in table.splitlines() if line.startswith("| ce | msp | small_cnn | digits | 2 |")]
    assert " ± " in msp


@pytest.mark.parametrize(("override", "plugin"), [("hydra/launcher=slurm", "hydra_submitit_launcher"),
                                                  ("hydra/launcher=parallel", "hydra_joblib_launcher"),
                                                  ("hydra/sweeper=optuna_val", "hydra_optuna_sweeper")])
def test_a_sweep_plugin_not_installed_says_to_install_the_sweep_extra(tmp_path: Path, override: str, plugin: str) -> None:
    """Without the `sweep` extra, `hydra/launcher=slurm` ended in Hydra's "Could not load
    'hydra/launcher/submitit_slurm'" and its config search path; one line now says what to install. The plugin is
    made missing for the subprocess only (`None` in `sys.modules`: its import fails, Hydra's plugin scan skips it)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nsys.modules['hydra_plugins.{plugin}'] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "ood.train", "-m", override, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 1
    assert proc.stderr == (f"error: {override} needs Hydra's {plugin.replace('_', '-')} plugin, which is not "
                           "installed: pip install 'ood[sweep]'\n")
    assert not (tmp_path / "sweep").exists()
