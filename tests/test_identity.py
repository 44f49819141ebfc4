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

from ood.errors import ConfigError
from ood.runs.identity import (
    IDENTITY_FILE,
    RunIdentity,
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


def test_drop_last_at_its_default_leaves_the_identity_as_before_it_was_a_key(tmp_path: Path) -> None:
    """`data.drop_last: true` (the dropped last partial batch, as before it was a key) is in every data config: at
    true a run's identity is that of the same config without the key (earlier runs keep their hash); false (OpenOOD's
    and energy_ood's loaders, their presets) names the configuration, and an evaluation takes it from the run that
    trained its checkpoint (a training key)."""
    cfg = compose_config(tmp_path / "a", [])
    default = run_identity(cfg, CHOICES, tmp_path / "a", None)
    with open_dict(cfg):
        del cfg.data["drop_last"]
    before = run_identity(cfg, CHOICES, tmp_path / "a", None)
    kept = run_identity(compose_config(tmp_path / "b", ["data.drop_last=false"]), CHOICES, tmp_path / "b", None)
    assert default.hash == before.hash and "data.drop_last" not in default.config
    assert kept.config == {**default.config, "data.drop_last": "false"}
    write_identity(tmp_path / "b", kept)
    ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    evaluation = compose_config(tmp_path / "eval", [f"ckpt_path={ckpt}"], config_name="eval")
    assert run_identity(evaluation, CHOICES, tmp_path / "eval", str(ckpt)).config == kept.config


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


def _oal_spelled_before(config: dict[str, str], lr_min: str = "1e-08") -> dict[str, str]:
    """An OAL identity as a run made before `method/scheduler=openood` wrote it: OAL's own `cosine_per_step`,
    `lr_min` and `scheduler: null`, no `knn_features` key."""
    kept = {k: v for k, v in config.items() if not k.startswith("method.scheduler") and k != "method.knn_features"}
    return {**kept, "method.cosine_per_step": "true", "method.lr_min": lr_min, "method.scheduler": "null"}


OAL_CHOICES = {"method": "oal", "data": "digits", "backbone": "small_cnn"}


def test_oal_runs_keep_their_hash_across_the_scheduler_respelling(tmp_path: Path) -> None:
    """OAL's per-step cosine moved from its own keys (cosine_per_step, lr_min) to method/scheduler=openood, the same
    schedule, and `method.knn_features: null` (the teacher's features, as before) was added: every OAL hash changed,
    so ood-report split a configuration's earlier seeds from its later ones. Now the new spelling is hashed as the
    old one; another schedule (an offset, a per-epoch cosine, CE's openood) keeps its own keys."""
    def ident(name: str, overrides: list[str]) -> dict[str, str]:
        return run_identity(compose_config(tmp_path / name, overrides), OAL_CHOICES, tmp_path / name, None).config

    default = ident("a", ["method=oal"])
    assert default == _oal_spelled_before(default)
    assert ident("b", ["method=oal", "method.scheduler.eta_min=1e-6"]) == _oal_spelled_before(default, "1e-06")
    offset = ident("c", ["method=oal", "method.scheduler.offset=1"])
    assert (offset["method.scheduler.offset"], "method.lr_min" in offset) == ("1", False)
    cosine = ident("d", ["method=oal", "method/scheduler=cosine"])
    assert cosine["method.scheduler._target_"] == "torch.optim.lr_scheduler.CosineAnnealingLR"
    ce = ident("e", ["method=ce", "method/scheduler=openood"])
    assert (ce["method.scheduler.eta_min"], "method.lr_min" in ce) == ("1e-06", False)
    with_file = ident("f", ["method=oal", "method.knn_features=id_feat.npy"])
    assert with_file == {**default, "method.knn_features": "id_feat.npy"}


@pytest.mark.parametrize("trained", ["before_the_respelling", "with_a_per_epoch_cosine"])
def test_an_evaluation_of_an_oal_run_takes_its_schedule_in_either_spelling(tmp_path: Path, trained: str) -> None:
    """An OAL checkpoint trained before the respelling (its identity.json holds lr_min, cosine_per_step, scheduler:
    null) was evaluated without its schedule keys (only `method.scheduler.*` were training keys): another hash than
    its training run's, so ood-report counted the re-evaluation as another configuration. The schedule keys, in
    either spelling, are training keys taken from that run; so are those of a run trained with another schedule
    than the evaluation composes."""
    train = tmp_path / "train"
    overrides = ["method=oal", *(["method/scheduler=cosine"] if trained == "with_a_per_epoch_cosine" else [])]
    made = run_identity(compose_config(train, overrides), OAL_CHOICES, train, None)
    if trained == "before_the_respelling":
        made = RunIdentity(_oal_spelled_before(made.config), made.model, made.seeded, made.names)
    write_identity(train, made)
    ckpt = train / "checkpoints" / "last.ckpt"
    cfg = compose_config(tmp_path / "eval", ["method=oal", f"ckpt_path={ckpt}"], config_name="eval")
    evaluated = run_identity(cfg, OAL_CHOICES, tmp_path / "eval", str(ckpt))
    assert evaluated.config == made.config and evaluated.group == made.group


def test_resuming_an_oal_checkpoint_compares_and_names_todays_keys(tmp_path: Path) -> None:
    """check_resume compares a checkpoint's stored config with today's spelling: a checkpoint stored before the
    respelling resumes with the same schedule (no spurious "predates" keys), another lr_min is refused naming
    `method.scheduler.eta_min`, and a checkpoint trained with another schedule than the default is refused."""
    from ood.errors import ConfigError
    from ood.runs.checks import check_resume

    cfg = compose_config(tmp_path, ["method=oal"])
    today = flat_config(cfg)
    before = {**{k: v for k, v in today.items() if not k.startswith("method.scheduler") and k != "method.knn_features"},
              "method.cosine_per_step": True, "method.lr_min": 1e-8, "method.scheduler": None}
    check_resume(cfg, before, "old.ckpt")
    with pytest.raises(ConfigError, match=r"trained with method.scheduler.eta_min=1e-07 \(now 1e-08\).*"
                                          r"Resume with the checkpoint's settings \(method.scheduler.eta_min=1e-07\)"):
        check_resume(cfg, {**before, "method.lr_min": 1e-7}, "old.ckpt")
    cosine = flat_config(compose_config(tmp_path, ["method=oal", "method/scheduler=cosine"]))
    with pytest.raises(ConfigError, match=r"trained with method.scheduler._target_=torch.optim.lr_scheduler."
                                          r"CosineAnnealingLR \(now ood.methods.schedules.OpenOODCosine\)"):
        check_resume(cfg, cosine, "cosine.ckpt")


def test_best_val_acc_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    """`ood-eval backbone.weights=FILE evaluation.weights=best_val_acc` (no training, no checkpoint) recorded
    `evaluation.weights=best_val_acc` and a `checkpoints/best.ckpt` that does not exist as its model: one line now;
    at `ood-eval`'s null the identity is as before (its own `last.ckpt`, no such key)."""
    weights = ["backbone=resnet50", f"backbone.weights={tmp_path / 'net.pth'}"]
    cfg = compose_config(tmp_path, [*weights, "evaluation.weights=best_val_acc"], config_name="eval")
    with pytest.raises(ConfigError, match=r"^evaluation.weights=best_val_acc evaluates a training run's "
                       r"checkpoints/best.ckpt, but this evaluation has no checkpoint \(ckpt_path\): set "
                       r"evaluation.weights=null, or pass ckpt_path=<run folder>$"):
        run_identity(cfg, CHOICES, tmp_path, None)
    plain = run_identity(compose_config(tmp_path, weights, config_name="eval"), CHOICES, tmp_path, None)
    assert plain.model == str((tmp_path / "checkpoints" / "last.ckpt").resolve())
    assert "evaluation.weights" not in plain.config


@pytest.mark.parametrize("stored", ["at_the_default", "before_the_key"])
def test_resuming_with_an_added_key_changed_from_its_old_value_is_refused(tmp_path: Path, stored: str) -> None:
    """An `ADDED_KEYS` key at its old value is left out of an identity, so check_resume took a change of it for a
    key the checkpoint predates (a warning) and the way back for no change at all: a run trained dropping the last
    partial batch (`data.drop_last=true`, or before the key) resumed with false (today's cifar10_ce preset), and one
    trained with false resumed with the default, each switching its loader mid-run. Both are refused now, naming the
    checkpoint's value; the same config resumes."""
    from ood.runs.checks import check_resume

    default = flat_config(compose_config(tmp_path, []))
    trained = default if stored == "at_the_default" else {k: v for k, v in default.items() if k != "data.drop_last"}
    check_resume(compose_config(tmp_path, []), trained, "a.ckpt")
    with pytest.raises(ConfigError, match=r"^checkpoint a.ckpt was trained with data.drop_last=true \(now false\): .*"
                                          r"Resume with the checkpoint's settings \(data.drop_last=true\)"):
        check_resume(compose_config(tmp_path, ["data.drop_last=false"]), trained, "a.ckpt")
    with pytest.raises(ConfigError, match=r"trained with data.outlier_batch_size=null \(now 256\): .*"
                                          r"\(data.outlier_batch_size=null\)"):
        check_resume(compose_config(tmp_path, ["data.outlier_batch_size=256"]), trained, "a.ckpt")
    kept = flat_config(compose_config(tmp_path, ["data.drop_last=false"]))
    with pytest.raises(ConfigError, match=r"trained with data.drop_last=false \(now true\): .*"
                                          r"\(data.drop_last=false\)"):
        check_resume(compose_config(tmp_path, []), kept, "a.ckpt")


def test_ood_eval_of_a_presets_run_by_its_groups_takes_the_detectors_it_evaluated(tmp_path: Path) -> None:
    """`ood-eval ckpt_path=<run of experiment=energy_ce> method=logitnorm` (or `-m` over a seed sweep's runs) takes
    the preset's groups, not the preset: since the `detectors` group is taken, that was `detectors=none` without the
    preset's `detectors.names: [msp, odin, mahalanobis, energy]`, so only the method's score was evaluated (before
    the group was taken: all detectors). The names the run evaluated (its config.yaml) go with the group now; a
    command line's `detectors.names=` or `detectors=` wins."""
    from ood.runs.trained import training_overrides

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- experiment=energy_ce\n- seed=0\n")
    choices = {"experiment": "energy_ce", "method": "ce", "data": "cifar10", "backbone": "wrn40_2", "detectors": "none"}
    OmegaConf.save({"hydra": {"runtime": {"choices": choices}}}, run / ".hydra" / "hydra.yaml")
    OmegaConf.save({"detectors": {"names": ["msp", "odin", "mahalanobis", "energy"]}}, run / "config.yaml")
    names = "detectors.names=[msp,odin,mahalanobis,energy]"
    assert training_overrides([f"ckpt_path={run}", "method=logitnorm"]) == (
        [run], ["data=cifar10", "backbone=wrn40_2", "detectors=none", names])
    assert training_overrides(["-m", f"ckpt_path={run}"])[1] == [
        "method=ce", "data=cifar10", "backbone=wrn40_2", "detectors=none", names]
    assert training_overrides([f"ckpt_path={run}", "method=logitnorm", "detectors.names=[energy]"])[1] == [
        "data=cifar10", "backbone=wrn40_2", "detectors=none"]
    assert training_overrides([f"ckpt_path={run}", "method=logitnorm", "detectors=fast"])[1] == [
        "data=cifar10", "backbone=wrn40_2"]
    assert training_overrides([f"ckpt_path={run}"])[1] == ["experiment=energy_ce"]  # the preset whole
