"""The installed entry points, end to end in subprocesses: a multirun over seeds, then `ood-report` on it."""

from __future__ import annotations

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
