"""End-to-end on the embedded digits benchmark, through the compose API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import FAST, NO_FIGURES, rows_by, run_config

from ood.metrics import ood_metrics  # noqa: F401 - imported to fail early if metrics break

REQUIRED = {
    "method", "detector", "backbone", "id_dataset", "ood_dataset", "ood_group", "seed",
    "auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_oodpos", "id_acc", "n_id", "n_ood",
}


@pytest.mark.slow
def test_default_run_meets_floors(tmp_path: Path) -> None:
    """Default config (15 epochs): ID acc >= 0.9, >= 5 detectors x 4 OOD sets, MSP above its floors. No figures
    (1-2 s; none is read here: test_fsood and test_scoring check them)."""
    rows = run_config(tmp_path, ["trainer.enable_progress_bar=false", NO_FIGURES])
    written = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert written == json.loads(json.dumps(rows))
    assert all(set(row) >= REQUIRED for row in rows)
    assert {r["ood_dataset"] for r in rows} == {"digits_6_9", "flower_patches", "gaussian_noise", "uniform_noise"}
    assert len({r["detector"] for r in rows}) >= 5
    assert rows[0]["id_acc"] >= 0.9
    msp = rows_by(rows, "msp")
    assert msp["digits_6_9"]["auroc"] >= 0.9
    assert sum(r["auroc"] for r in msp.values()) / 4 >= 0.75
    assert rows_by(rows, "mahalanobis")["flower_patches"]["auroc"] >= 0.9
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "config.yaml").is_file()
    assert list((tmp_path / "csv").rglob("metrics.csv"))
    assert {r["backbone"] for r in rows} == {"small_cnn"} and {r["id_dataset"] for r in rows} == {"digits"}


@pytest.mark.slow
def test_seeded_run_is_reproducible(tmp_path: Path) -> None:
    """Same machine, same versions, same seed: every number of every row is equal to the last digit (the README's
    reproducibility claim). Two epochs: the second starts a new shuffle and augmentation stream."""
    a = run_config(tmp_path / "a", [*FAST, "trainer.max_epochs=2", NO_FIGURES, "seed=3"])
    b = run_config(tmp_path / "b", [*FAST, "trainer.max_epochs=2", NO_FIGURES, "seed=3"])
    keys = ("detector", "ood_dataset", "auroc", "fpr95", "fpr95_oodpos", "aupr_in", "aupr_out", "id_acc", "detector_params")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
