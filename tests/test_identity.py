"""A run's identity (`ood.runs.identity`): computed once from the composed config, written to `identity.json`, the
same for every seed, and for an evaluation run the training keys of the run that wrote its checkpoint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers import NO_FIGURES, compose_config, run_config
from omegaconf import OmegaConf, open_dict

from ood.runs.identity import (
    IDENTITY_FILE,
    flat_config,
    identity,
    read_identity,
    run_identity,
    seed_keys,
    write_identity,
)

CHOICES = {"method": "ce", "data": "digits", "backbone": "small_cnn"}


def test_seeds_share_an_identity_and_the_group_hash_is_unchanged(tmp_path: Path) -> None:
    a = run_identity(compose_config(tmp_path / "a", ["seed=0"]), CHOICES, tmp_path / "a", None)
    b = run_identity(compose_config(tmp_path / "b", ["seed=1"]), CHOICES, tmp_path / "b", None)
    c = run_identity(compose_config(tmp_path / "c", ["method.optimizer.lr=0.01"]), CHOICES, tmp_path / "c", None)
    assert a.config == b.config and a.group == b.group != c.group and a.config["method.optimizer.lr"] == "0.05"
    assert "seed" not in a.config and a.model == str((tmp_path / "a" / "checkpoints" / "last.ckpt").resolve())
    cfg = compose_config(tmp_path / "a", ["seed=0"])  # the wandb group of runs logged before identity.json existed
    before = hashlib.sha1(json.dumps(identity(flat_config(cfg), seed_keys(cfg))).encode()).hexdigest()[:8]
    assert a.group == f"ce-digits-small_cnn-{before}"


def test_the_outlier_batch_at_its_default_leaves_the_identity_as_before_it_was_a_key(tmp_path: Path) -> None:
    """`data.outlier_batch_size: null` (2 x batch_size, as before it was a key) in every data config entered every
    run's identity: each hash changed, so ood-report split a configuration's earlier seeds from its later ones and a
    rerun of an earlier finished job removed its results as another configuration's. At null it is left out; set, it
    names the configuration."""
    default = run_identity(compose_config(tmp_path / "a", []), CHOICES, tmp_path / "a", None)
    doubled = run_identity(compose_config(tmp_path / "b", ["data.outlier_batch_size=256"]), CHOICES, tmp_path / "b", None)
    assert "data.outlier_batch_size" not in default.config
    assert doubled.config == {**default.config, "data.outlier_batch_size": "256"}


@pytest.mark.parametrize(("data", "key"), [("cifar10", "data.benchmark.augment_outliers"),
                                         ("folder", "data.augment_outliers")])
def test_augment_outliers_at_its_default_leaves_the_identity_as_before_it_was_a_key(tmp_path: Path, data: str,
                                                                                   key: str) -> None:
    """`augment_outliers: true` (the outliers' training transform, as before it was a key) is listed in the data
    configs: at true a run's identity is that of the same config without the key (earlier runs keep their hash); false
    (OpenOOD's `oe` split) names the configuration."""
    choices = {**CHOICES, "data": data}
    cfg = compose_config(tmp_path / "a", [f"data={data}"])
    default = run_identity(cfg, choices, tmp_path / "a", None)
    with open_dict(cfg):
        parent, _, leaf = key.rpartition(".")
        del OmegaConf.select(cfg, parent)[leaf]
    before = run_identity(cfg, choices, tmp_path / "a", None)
    off = run_identity(compose_config(tmp_path / "b", [f"data={data}", f"{key}=false"]), choices, tmp_path / "b", None)
    assert default.hash == before.hash and key not in default.config
    assert off.config == {**default.config, key: "false"}


def test_written_once_read_back(tmp_path: Path) -> None:
    ident = run_identity(compose_config(tmp_path, []), CHOICES, tmp_path, None)
    write_identity(tmp_path, ident)
    data = json.loads((tmp_path / IDENTITY_FILE).read_text())
    assert (data["group"], data["hash"], data["config"]) == (ident.group, ident.hash, ident.config)
    assert read_identity(tmp_path) == ident


def test_evaluation_run_takes_the_trained_epochs(tmp_path: Path) -> None:
    """An evaluation cannot know its checkpoint's training settings (epochs, optimiser, training batch size,
    augmentation): it takes them from the run that trained it, so ood-report counts the re-evaluation once."""
    train = tmp_path / "train"
    trained = run_identity(compose_config(train, ["trainer.max_epochs=7", "data.batch_size=16", "data.benchmark.augment=false"]),
                           CHOICES, train, None)
    write_identity(train, trained)
    ckpt = train / "checkpoints" / "last.ckpt"
    cfg = compose_config(tmp_path / "eval", [f"ckpt_path={ckpt}"], config_name="eval")
    evaluated = run_identity(cfg, CHOICES, tmp_path / "eval", str(ckpt))
    assert evaluated.config["trainer.max_epochs"] == "7" and evaluated.config == trained.config
    assert (evaluated.config["data.batch_size"], evaluated.config["data.benchmark.augment"]) == ("16", "false")
    assert evaluated.model == str(ckpt.resolve()) and evaluated.group == trained.group
    elsewhere = run_identity(cfg, CHOICES, tmp_path / "eval", str(tmp_path / "model.pt"))
    assert elsewhere.config["ckpt"] == str(tmp_path / "model.pt") and "trainer.max_epochs" not in elsewhere.config


@pytest.mark.slow
def test_an_evaluation_records_its_checkpoints_training_seed(tmp_path: Path) -> None:
    """`ood-eval` of a checkpoint trained with seed 3 writes seed 3 in its rows (the model its numbers describe), not
    its own seed (0 by default); a checkpoint without a stored config keeps the evaluation's seed."""
    quick = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none", "detectors.names=[msp]", NO_FIGURES]
    run_config(tmp_path / "train", [*quick, "seed=3", "evaluate=false"])
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    rows = run_config(tmp_path / "eval", [*quick, f"ckpt_path={ckpt}"], config_name="eval")
    assert {r["seed"] for r in rows} == {3}
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]}, bare)
    rows = run_config(tmp_path / "eval_bare", [*quick, f"ckpt_path={bare}", "seed=5"], config_name="eval")
    assert {r["seed"] for r in rows} == {5}


def test_a_float16_evaluation_is_its_own_configuration(tmp_path: Path) -> None:
    """`evaluation.feature_dtype=float16` changes the numbers: its evaluation of a checkpoint is not the float32 one
    (ood-report would merge them as seeds of one configuration); float32, the default, leaves the identity as it was."""
    train = tmp_path / "train"
    trained = run_identity(compose_config(train, []), CHOICES, train, None)
    write_identity(train, trained)
    ckpt = train / "checkpoints" / "last.ckpt"
    idents = {
        dtype: run_identity(compose_config(tmp_path / dtype, [f"ckpt_path={ckpt}", f"evaluation.feature_dtype={dtype}"],
                                           config_name="eval"), CHOICES, tmp_path / dtype, str(ckpt))
        for dtype in ("float32", "float16")
    }
    assert idents["float32"].config == trained.config and "evaluation.feature_dtype" not in trained.config
    assert idents["float16"].config == {**trained.config, "evaluation.feature_dtype": "float16"}
    assert idents["float16"].group != idents["float32"].group == trained.group
