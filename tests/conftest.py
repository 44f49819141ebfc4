"""Test-wide settings: no network, no wandb account, few threads (CI has 2 cores)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _no_wandb_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "disabled"))


@pytest.fixture(scope="session")
def ce_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CE small-CNN digits run (seed 0, 8 epochs, no evaluation) shared by every test that starts a method from
    a trained classifier (`method.init.ckpt=`): trained once per session."""
    from helpers import run_config

    out = tmp_path_factory.mktemp("ce_init")
    run_config(out, ["trainer.max_epochs=8", "trainer.enable_progress_bar=false", "evaluate=false", "logger=none"])
    return out / "checkpoints" / "last.ckpt"
