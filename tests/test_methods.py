"""Every method config (`conf/method/*.yaml`) fits and evaluates on digits in a few seconds: a new method enrols
itself here the day its config exists (DESIGN §2)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import run_config

from ood import CONFIG_DIR

METHODS = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_method_fits_and_reports_its_own_score(name: str, ce_checkpoint: Path, tmp_path: Path) -> None:
    # methods that first train a model of their own (OAL's teacher) keep it short and in tmp_path
    extra = {"oal": ["method.teacher.epochs=2", f"method.cache_dir={tmp_path}"]}.get(name, [])
    rows = run_config(tmp_path, [f"method={name}", f"method.init.ckpt={ce_checkpoint}", "trainer.max_epochs=2",
                                 "trainer.enable_progress_bar=false", "detectors.names=[msp]", "logger=none", *extra])
    reported = rows[0]["method"]
    own = [r for r in rows if r["detector"] != "msp"]
    assert {r["ood_dataset"] for r in rows if r["detector"] == "msp"} == {
        "digits_6_9", "flower_patches", "gaussian_noise", "uniform_noise"}
    assert all(r["method"] == reported for r in rows)
    if own:  # methods with a score of their own report it under their name, finite, for every OOD set
        assert any(r["detector"] == reported for r in own)
        assert all(math.isfinite(r["auroc"]) and 0 <= r["auroc"] <= 1 for r in own)
    assert rows[0]["method_params"]["init"]["ckpt"] == str(ce_checkpoint)
