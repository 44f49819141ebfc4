"""Every method config (`conf/method/*.yaml`) fits and evaluates on digits in a few seconds: a new method enrols
itself here the day its config exists (the config group is the registry)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import NO_FIGURES, run_config
from hydra.utils import get_class
from omegaconf import OmegaConf

from ood import CONFIG_DIR
from ood.methods.base import OODMethod

METHODS = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_method_fits_and_reports_its_own_score(name: str, ce_checkpoint: Path, tmp_path: Path) -> None:
    # methods that first train a model of their own (OAL's teacher) keep it short and in tmp_path, and sample 200
    # boundary candidates a point (not 1500); heatmap draws one image a row of its diagnostic grids (not 8); no
    # figures: the checks read the rows
    extra = {"oal": ["method.teacher.epochs=2", f"method.cache_dir={tmp_path}", "method.n_candidates=200"],
             "heatmap": ["method.n_images=1"]}.get(name, [])
    rows = run_config(tmp_path, [f"method={name}", f"method.init.ckpt={ce_checkpoint}", "trainer.max_epochs=2",
                                 "trainer.enable_progress_bar=false", "detectors.names=[msp]", "logger=none",
                                 NO_FIGURES, *extra])
    reported = rows[0]["method"]
    ood_sets = {"digits_6_9", "flower_patches", "gaussian_noise", "uniform_noise"}
    assert {r["ood_dataset"] for r in rows if r["detector"] == "msp"} == ood_sets
    assert all(r["method"] == reported for r in rows)
    own = {r["ood_dataset"]: r for r in rows if r["detector"] == reported}
    if has_own_score(name):  # its score under its name, finite, for every OOD set; a lost score fails here
        assert set(own) == ood_sets, f"{name} reported its own score for {sorted(own)}, not every OOD set"
        assert all(math.isfinite(r["auroc"]) and 0 <= r["auroc"] <= 1 for r in own.values())
    else:
        assert {r["detector"] for r in rows} == {"msp"}, f"{name} has no score of its own but reported one"
    assert rows[0]["method_params"]["init"]["ckpt"] == str(ce_checkpoint)


def has_own_score(name: str) -> bool:
    """Whether the method of `conf/method/<name>.yaml` defines a score (overrides `ood_score` or `ood_scores`)."""
    cls = get_class(OmegaConf.load(CONFIG_DIR / "method" / f"{name}.yaml")._target_)
    return cls.ood_score is not OODMethod.ood_score or cls.ood_scores is not OODMethod.ood_scores


def test_own_score_detection() -> None:
    """The expectation above is derived from the classes: the CE baseline has none, the paper methods do."""
    assert not has_own_score("ce")
    assert all(has_own_score(m) for m in ("cluster", "energy_cfl", "energy_oe", "grood", "heatmap", "oal", "oe"))
