"""Every method config (`conf/method/*.yaml`) fits and evaluates on digits in a few seconds: a new method enrols
itself here the day its config exists (the config group is the registry)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from helpers import NO_FIGURES, compose_config, run_config
from hydra.utils import get_class, instantiate
from lightning import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ood import CONFIG_DIR
from ood.data.batch import collate_batch
from ood.errors import ConfigError
from ood.methods.base import OODMethod
from ood.methods.ce import CrossEntropy
from ood.methods.schedules import OpenOODCosine
from ood.models import SmallCNN

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
    if has_own_score(name):  # its score under its name for every OOD set; a lost score fails here
        assert set(own) == ood_sets, f"{name} reported its own score for {sorted(own)}, not every OOD set"
        scores = np.load(tmp_path / "scores.npz")  # its rows are the ranking of the scores it wrote: ID test positive
        for ood_set, row in own.items():
            ident, ood = scores[f"{reported}/test"], scores[f"{reported}/{ood_set}"]
            assert np.isfinite(ident).all() and np.isfinite(ood).all()
            truth = np.r_[np.ones(len(ident)), np.zeros(len(ood))]
            assert row["auroc"] == pytest.approx(roc_auc_score(truth, np.r_[ident, ood]), abs=1e-12), ood_set
            assert (row["n_id"], row["n_ood"]) == (len(ident), len(ood))
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


# ----- the learning-rate schedule: OpenOOD's / energy_ood's per-iteration cosine ----------------------------------
def released_cosine(step: int, total_steps: int, lr_max: float, lr_min: float) -> float:
    """`cosine_annealing` as OpenOOD (`trainers/lr_scheduler.py`) and energy_ood (`CIFAR/train.py`) write it."""
    return lr_min + (lr_max - lr_min) * 0.5 * (1 + np.cos(step / total_steps * np.pi))


class RecordLR(Callback):
    """The lr each optimiser update uses, by global step."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.lrs[trainer.global_step] = optimizer.param_groups[0]["lr"]


def fit_preset_schedule(tmp_path: Path, preset: str, resume: bool = False, resumed_batches: int = 3
                        ) -> tuple[dict[int, float], float]:
    """Fit a small CE model for 2 epochs of 3 batches with `experiment=<preset>`'s optimiser and scheduler: the lr of
    each update by step, and the optimiser's lr. `resume`: then fit again from the checkpoint of step 4 (mid-epoch 2),
    on `resumed_batches` batches an epoch, and give the lrs of that resumed fit instead."""
    cfg = compose_config(tmp_path, [f"experiment={preset}"])
    generator = torch.Generator().manual_seed(0)

    def loader(batches: int) -> DataLoader:
        n = 4 * batches
        data = TensorDataset(torch.randn(n, 1, 16, 16, generator=generator), torch.arange(n) % 3, torch.arange(n))
        return DataLoader(data, batch_size=4, collate_fn=collate_batch)

    callbacks = [ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)] if resume else []
    for ckpt_path in [None, *([tmp_path / "ckpt" / "epoch=1-step=4.ckpt"] if resume else [])]:
        method = CrossEntropy(SmallCNN(3), instantiate(cfg.method.optimizer), instantiate(cfg.method.scheduler))
        record = RecordLR()
        L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  limit_val_batches=0, default_root_dir=tmp_path, enable_checkpointing=resume,
                  callbacks=[record, *callbacks]).fit(method, loader(resumed_batches if ckpt_path else 3),
                                                      ckpt_path=ckpt_path)
    return record.lrs, cfg.method.optimizer.lr


@pytest.mark.parametrize(("preset", "offset"), [("cifar10_ce", 0), ("cifar10_energy_oe", 1)])
def test_presets_anneal_per_iteration_as_released(tmp_path: Path, preset: str, offset: int) -> None:
    """OpenOOD's BaseTrainer and energy_ood's train.py step LambdaLR(cosine_annealing(step, epochs * len(loader), 1,
    1e-6 / lr)) every iteration: OpenOOD after `optimizer.step()` (update k uses step k), energy_ood before it
    (update k uses step k + 1, the last one 1e-6). The presets stepped a CosineAnnealingLR per epoch."""
    lrs, lr = fit_preset_schedule(tmp_path, preset)
    expected = {k: lr * released_cosine(k + offset, 6, 1, 1e-6 / lr) for k in range(6)}
    assert lrs.keys() == expected.keys()
    assert [lrs[k] for k in range(6)] == pytest.approx([expected[k] for k in range(6)], rel=1e-12)
    if offset:
        assert lrs[5] == pytest.approx(1e-6)


def test_a_run_resumed_mid_epoch_keeps_the_per_iteration_schedule(tmp_path: Path) -> None:
    """Lightning stores the LambdaLR's step in the checkpoint: the updates after a mid-epoch resume use the lrs of
    the uninterrupted run."""
    resumed, lr = fit_preset_schedule(tmp_path, "cifar10_ce", resume=True)
    assert resumed.keys() == {4, 5}
    assert [resumed[4], resumed[5]] == pytest.approx([lr * released_cosine(k, 6, 1, 1e-6 / lr) for k in (4, 5)], rel=1e-12)


def test_a_run_resumed_with_another_step_count_is_refused_not_jumped(tmp_path: Path) -> None:
    """The per-iteration cosine's length is the fit's optimiser-step count (devices, batch size, accumulation,
    max_steps): resumed with another one (here 4 batches an epoch, 8 steps, where the checkpoint's run had 6), the
    LambdaLR went on from step 4 along the 8-step cosine, its lr jumping from the checkpoint's; now one line."""
    with pytest.raises(ConfigError, match=r"^method.scheduler: the checkpoint's cosine anneals over 6 scheduler steps "
                                          r"and this fit's over 8 \(trainer.estimated_stepping_batches"):
        fit_preset_schedule(tmp_path, "cifar10_ce", resume=True, resumed_batches=4)


def test_the_digits_default_still_anneals_per_epoch(tmp_path: Path) -> None:
    """The digits default (conf/method/ce.yaml) keeps torch's CosineAnnealingLR stepped per epoch: every update of
    an epoch at that epoch's lr, digits results unchanged."""
    cfg = compose_config(tmp_path, ["method=ce", "trainer.max_epochs=2"])
    method = CrossEntropy(SmallCNN(3), instantiate(cfg.method.optimizer), instantiate(cfg.method.scheduler))
    optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.05)
    config = method.lr_scheduler_config(optimizer)
    assert config.keys() == {"scheduler"}  # Lightning's default interval: epoch
    assert type(config["scheduler"]) is torch.optim.lr_scheduler.CosineAnnealingLR
    lrs = []
    for _ in range(3):  # epochs 0, 1 and the end of the run: 0.05 * (1 + cos(pi * epoch / 2)) / 2
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        config["scheduler"].step()
    assert lrs == pytest.approx([0.05, 0.025, 0.0], abs=1e-15)


def test_openood_cosine_refuses_what_it_cannot_anneal() -> None:
    """A bad interval or offset is named as the method is built; a zero lr (no ratio to lr_min) when the optimiser
    is; a fit without an end (`max_epochs=-1`, no `max_steps`) has no length to anneal over."""
    with pytest.raises(ConfigError, match=r"method.scheduler.interval='batch'; choices: \['step', 'epoch'\]"):
        OpenOODCosine(1e-6, interval="batch")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"method.scheduler.offset=-1 is outside"):
        OpenOODCosine(1e-6, offset=-1)
    with pytest.raises(ConfigError, match="which is 0.0; set a positive lr"):
        OpenOODCosine(1e-6)(torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.0), 10)
    method = CrossEntropy(SmallCNN(3), partial(torch.optim.SGD, lr=0.1), OpenOODCosine(1e-6))
    method.trainer = L.Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ConfigError, match="set trainer.max_epochs or trainer.max_steps"):
        method.scheduler_steps("epoch")


def test_methods_that_step_their_scheduler_per_epoch_refuse_the_per_iteration_cosine() -> None:
    """The contrastive cluster game and heatmap's CE phase step their scheduler themselves once an epoch (manual
    optimisation): an `OpenOODCosine` there died in a TypeError for its missing step count; now one line naming the
    key and the fix."""
    from ood.methods.cluster import ClusterMethod
    from ood.methods.heatmap import HeatmapOOD

    cluster = ClusterMethod(SmallCNN(3, feature_dim=8), partial(torch.optim.SGD, lr=0.1), OpenOODCosine(1e-6),
                            objective="supcon")
    with pytest.raises(ConfigError, match=r"^method.scheduler: ClusterMethod steps this scheduler itself once an "
                                          r"epoch.*give a per-epoch torch scheduler \(method/scheduler=cosine\)$"):
        cluster.configure_optimizers()
    heatmap = HeatmapOOD(SmallCNN(3, feature_dim=8), partial(torch.optim.Adam, lr=1e-3), input_size=16,
                         classifier_epochs=1, classifier_optimizer=partial(torch.optim.SGD, lr=0.1),
                         classifier_scheduler=OpenOODCosine(1e-6))
    with pytest.raises(ConfigError, match=r"^method.classifier_scheduler: HeatmapOOD steps this scheduler itself"):
        heatmap.configure_optimizers()


def test_the_per_iteration_cosine_counts_the_kept_partial_batch(tmp_path: Path) -> None:
    """With `data.drop_last=false` an epoch of 650 digits at batch 64 is 11 steps (the last of 10 images), and
    `trainer.estimated_stepping_batches` counts them: cifar10_ce's cosine anneals over 11 updates, OpenOOD's
    `epochs * len(train_loader)`, not the 10 of the dropped-batch loader."""
    from ood.data import DigitsBenchmark, OODDataModule

    cfg = compose_config(tmp_path, ["experiment=cifar10_ce"])
    loader = OODDataModule(DigitsBenchmark(), batch_size=64, seed=0, drop_last=cfg.data.drop_last).train_dataloader()
    torch.manual_seed(0)
    method = CrossEntropy(SmallCNN(6), instantiate(cfg.method.optimizer), instantiate(cfg.method.scheduler))
    record = RecordLR()
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              limit_val_batches=0, default_root_dir=tmp_path, enable_checkpointing=False,
              callbacks=[record]).fit(method, loader)
    lr = cfg.method.optimizer.lr
    assert sorted(record.lrs) == list(range(11))
    assert [record.lrs[k] for k in range(11)] == pytest.approx([lr * released_cosine(k, 11, 1, 1e-6 / lr) for k in range(11)],
                                                               rel=1e-12)


def test_a_cosine_resumed_with_the_last_batch_kept_names_data_drop_last() -> None:
    """A checkpoint of 10 steps an epoch (the partial batch dropped) resumed with `data.drop_last=false` (11) is
    refused by the cosine's length; its line listed what sets that length but not data.drop_last."""
    from ood.methods.schedules import OpenOODCosine

    saved = OpenOODCosine(1e-6)(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), 10).state_dict()
    resumed = OpenOODCosine(1e-6)(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), 11)
    with pytest.raises(ConfigError, match=r"^method.scheduler: the checkpoint's cosine anneals over 10 scheduler steps "
                                          r"and this fit's over 11 \(trainer.estimated_stepping_batches: the number of "
                                          r"devices, data.batch_size, data.drop_last, "):
        resumed.load_state_dict(saved)


def test_the_energy_ood_schedule_is_an_option_of_the_group(tmp_path: Path) -> None:
    """`method/scheduler=energy_ood` gives energy_ood's per-iteration cosine (offset 1) to any method, the same node
    the energy presets build by overriding `openood`'s offset (`method=energy_oe method/scheduler=openood` alone has
    OpenOOD's offset 0)."""
    chosen = compose_config(tmp_path, ["method=energy_oe", "method/scheduler=energy_ood"]).method.scheduler
    preset = compose_config(tmp_path, ["experiment=cifar10_energy_oe"]).method.scheduler
    assert OmegaConf.to_container(chosen) == OmegaConf.to_container(preset) == {
        "_target_": "ood.methods.schedules.OpenOODCosine", "eta_min": 1e-6, "interval": "step", "offset": 1}
    assert compose_config(tmp_path, ["method=energy_oe", "method/scheduler=openood"]).method.scheduler.offset == 0
