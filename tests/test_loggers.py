"""Loggers: CSV (default) gets the slash-named metrics; wandb works offline with no account and finishes its run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from helpers import FAST, run_config

SHORT = [*FAST, "trainer.max_epochs=1", "detectors.names=[msp,energy]"]


def _logged_keys(run_dir: Path) -> set[str]:
    (metrics,) = run_dir.rglob("metrics.csv")
    with metrics.open() as f:
        return set(next(csv.reader(f)))


@pytest.mark.slow
def test_csv_logger_gets_slash_named_metrics(tmp_path: Path) -> None:
    run_config(tmp_path, SHORT)
    keys = _logged_keys(tmp_path)
    assert {"test/id/acc", "test/msp/digits_6_9/auroc", "test/energy/near/fpr95", "test/msp/far/auroc",
            "test/energy/uniform_noise/fpr95_oodpos", "train/loss", "val/acc"} <= keys


@pytest.mark.slow
def test_wandb_offline_one_run_per_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for job in ("a", "b"):
        run_config(tmp_path / job, [*SHORT, "logger=wandb", "tags=[test]"])
        assert wandb.run is None, "wandb.finish() must close each job's run"
        (run_dir,) = (tmp_path / job / "wandb").glob("offline-run-*")
        assert list(run_dir.glob("*.wandb"))
        assert list(run_dir.rglob("test/results*.table.json")), "the results table is logged for the dashboard"


def test_tensorboard_logger(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    run_config(tmp_path, [*SHORT, "logger=tensorboard"])
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
