"""The error hints before a run starts: the closest real key for a misspelt override, a GPU preset on a CPU machine, a run
folder as `ckpt_path`, a checkpoint of another method; and the sweep objective reads validation splits only."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FAST, compose_config, run_config
from omegaconf import DictConfig, OmegaConf

from ood import CONFIG_DIR
from ood.errors import CheckpointError, ConfigError
from ood.evaluation.scoring import Scorer
from ood.methods import CrossEntropy
from ood.metrics import validation_aurocs
from ood.models import SmallCNN
from ood.models.checkpoint import load_modules
from ood.runs.checks import _override, check_launch, check_overrides, check_run
from ood.runs.sweeps import check_objective, sweep_objective
from ood.train import run


@pytest.mark.parametrize(
    ("argv", "closest"),
    [
        (["trainer.max_epoch=1"], "trainer.max_epochs"),
        (["method=cluster", "method.objectiv=ce"], "method.objective"),
        (["-m", "method=ce,cluster", "method.objectiv=ce"], "method.objective"),  # a key of one swept choice
        (["hydra.sweep.dri=x"], "hydra.sweep.dir"),
        (["--cfg", "job", "seed=1", "trainer.max_epoch=1"], "trainer.max_epochs"),
        (["metod=oe"], "method"),  # a group's name: the keys are its leaves
        (["method=oe", "method.lamm=1"], "method.lam"),
        (["method=oe", "methd.lam=1"], "method.lam"),  # parent misspelt too
    ],
)
def test_misspelt_key_names_the_closest_real_key(argv: list[str], closest: str) -> None:
    with pytest.raises(ConfigError, match=rf"unknown config key .*did you mean {closest}=\.\.\.\?"):
        check_overrides(CONFIG_DIR, "train", argv)


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("method.optimizer.lr=[1]", r"method.optimizer.lr=\[1\]: expected a number \(the default is 0.05\)"),
        ("method.init.freeze=backbone", r"method.init.freeze=backbone: expected a list, e.g. \[backbone\]"),
    ],
)
def test_a_list_for_a_number_or_a_word_for_a_list_names_the_type(arg: str, message: str) -> None:
    """A list where a number belongs ended in a traceback; a word where a list belongs was iterated letter by letter
    (`method.init.freeze=backbone`: "ce has no sub-module 'b'")."""
    with pytest.raises(ConfigError, match=rf"^{message}"):
        check_overrides(CONFIG_DIR, "train", [arg])


def test_a_key_of_no_sibling_names_none() -> None:
    """`method.lam` under method=ce (lam is oe's) named `method._target_` as the closest key: no hint, not a wrong one."""
    with pytest.raises(ConfigError, match=r"^unknown config key 'method.lamm': see `ood-train --cfg job` for the keys"):
        check_overrides(CONFIG_DIR, "train", ["method.lamm=1"])


def test_real_and_added_keys_pass() -> None:
    check_overrides(CONFIG_DIR, "train", ["-m", "seed=0,1", "method=ce,cluster", "method.objective=ce", "+extra=1",
                                          "detectors.params.knn.k=10",
                                          "trainer.max_epochs=2", "hydra/launcher=parallel", "logger=wandb"])


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_numpy_cannot_take_is_refused_by_name(tmp_path: Path, seed: int) -> None:
    """`seed=-1` ended in Lightning's traceback (ValueError from seed_everything) after the run folder was made."""
    with pytest.raises(ConfigError, match=rf"^seed={seed} is outside its range whole numbers in \[0, 4294967295\]$"):
        check_run(compose_config(tmp_path, [f"seed={seed}"]), None)


@pytest.mark.parametrize(("seed", "message"), [
    (1.5, r"seed=1.5 is outside its range whole numbers in \[0, 4294967295\]"),
    (2.0, r"seed=2.0 is a count: write 2 \(Hydra reads 2.0 and 1e4 as floats\)"),
])
def test_a_fractional_seed_is_refused_by_name(tmp_path: Path, seed: float, message: str) -> None:
    """`seed=1.5` passed the range check and ended in torch's traceback (manual_seed expected a long) after the run
    folder was made."""
    with pytest.raises(ConfigError, match=rf"^{message}$"):
        check_run(compose_config(tmp_path, [f"seed={seed}"]), None)


def test_a_fractional_epoch_count_is_refused_by_name(tmp_path: Path) -> None:
    """`trainer.max_epochs=1.5` passed the >= 1 check and failed Lightning's bare `assert isinstance(self.max_epochs,
    int)` after the run folder was made."""
    with pytest.raises(ConfigError, match=r"^trainer.max_epochs=1.5 is outside its range whole numbers in \[1, inf\]$"):
        check_run(compose_config(tmp_path, ["trainer.max_epochs=1.5"]), None)


def test_evaluating_a_trained_method_without_its_checkpoint_is_refused(tmp_path: Path) -> None:
    """`ood-eval method=heatmap backbone.weights=<classifier>` (no ckpt_path) scored with a random decoder, and
    `method=energy_cfl` with zero class centres: refused, as `ood.evaluate` refuses them; ce from weights passes."""
    for method, name, parts, files in (("heatmap", "heatmap", "decoder", r" or give \+method.decoder_ckpt=<file>"),
                                       ("energy_cfl", "energy_cfl_recon", "centres, head", "")):
        cfg = compose_config(tmp_path, [f"method={method}"], config_name="eval")
        with pytest.raises(ConfigError, match=rf"^method '{name}' scores with parts trained with the network \({parts}\), "
                                              r"which backbone.weights does not hold: evaluate a checkpoint of its "
                                              rf"training run \(ckpt_path=<run folder>\){files}$"):
            check_run(cfg, None)
    # the file key as Hydra takes it: '+' where method=heatmap lacks it, none where the preset holds it as ???
    with pytest.raises(ConfigError, match=r"\(ckpt_path=<run folder>\) or give method.decoder_ckpt=<file>$"):
        check_run(compose_config(tmp_path, ["experiment=heatmap_released", "trainer=cpu"], config_name="eval"), None)
    check_run(compose_config(tmp_path, [], config_name="eval"), None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_preset_on_cpu_says_add_trainer_cpu(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, ["experiment=cifar10_ce"])
    with pytest.raises(ConfigError, match="this preset needs a GPU; add trainer=cpu to try it on CPU"):
        check_run(cfg, None)


def test_a_sweep_with_the_subprocess_ddp_launcher_is_refused(tmp_path: Path) -> None:
    """`trainer=ddp` re-executes the command line per rank (each rank would re-launch the sweep); spawned ranks
    (`trainer=ddp_cpu`, or `trainer.strategy.start_method=spawn`) and single runs pass."""
    with pytest.raises(ConfigError, match=r"trainer=ddp \(subprocess launcher\) cannot run inside a Hydra multirun"):
        check_launch(compose_config(tmp_path, ["trainer=ddp"]), multirun=True)
    check_launch(compose_config(tmp_path, ["trainer=ddp"]), multirun=False)
    check_launch(compose_config(tmp_path, ["trainer=ddp", "trainer.strategy.start_method=spawn"]), multirun=True)
    check_launch(compose_config(tmp_path, ["trainer=ddp_cpu"]), multirun=True)
    # Lightning's strategy names: its subprocess-launched variants are refused too, spawned and forked ones pass
    for name, refused in (("ddp_find_unused_parameters_true", True), ("ddp_spawn", False), ("ddp_fork", False)):
        cfg = compose_config(tmp_path, [f"+trainer.strategy={name}"])
        if refused:
            with pytest.raises(ConfigError, match="cannot run inside a Hydra multirun"):
                check_launch(cfg, multirun=True)
        else:
            check_launch(cfg, multirun=True)


def test_eval_accepts_a_run_folder(tmp_path: Path) -> None:
    """`ood-eval ckpt_path=<run folder>` evaluates its checkpoints/last.ckpt (here: one that does not fit, so the
    error names the file inside the folder)."""
    other = CrossEntropy(SmallCNN(6, width=8), optimizer=torch.optim.SGD)
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": other.state_dict()}, ckpt)
    with pytest.raises(CheckpointError, match=f"checkpoint {ckpt} does not fit"):
        run_config(tmp_path / "eval", [*FAST, f"ckpt_path={tmp_path / 'train'}"], config_name="eval")


def test_evaluation_without_a_checkpoint_says_a_run_folder_is_one(tmp_path: Path) -> None:
    """`ood-eval` without a checkpoint said to add `ckpt_path=PATH/checkpoints/last.ckpt`, never that the run folder
    itself is taken (test_eval_accepts_a_run_folder): the message names both."""
    with pytest.raises(ConfigError, match=r"^evaluation without training needs a checkpoint: add ckpt_path=<run folder> "
                                          r"\(or its checkpoints/last.ckpt\), or backbone.weights=FILE for a backbone "
                                          r"that loads pretrained weights \(e.g. backbone=resnet50\)$"):
        run(compose_config(tmp_path, [], config_name="eval"))


def test_method_mismatch_says_method() -> None:
    model = CrossEntropy(SmallCNN(6), optimizer=torch.optim.SGD)
    state = {**model.state_dict(), "probe.weight": torch.zeros(6, 64)}
    with pytest.raises(CheckpointError, match="pass the method= it was trained with.*unexpected 'probe.weight'"):
        load_modules(model, state, None, "x.ckpt")
    del state["probe.weight"], state["backbone.fc.bias"]
    with pytest.raises(CheckpointError, match="pass the data=/backbone= it was trained with"):
        load_modules(model, state, None, "x.ckpt")


def test_a_checkpoint_that_does_not_fit_names_the_method_keys_it_was_trained_with(tmp_path: Path) -> None:
    """`ood-eval method=cluster ckpt_path=<a supcon run>` said "pass the method= it was trained with" (it was): the
    error names the `method.*` values that differ, here the objective that adds the projection head."""
    from hydra.utils import instantiate

    from ood.cli import load_weights
    from ood.runs.identity import flat_config

    trained = compose_config(tmp_path, ["method=cluster", "method.objective=supcon"])
    method = instantiate(trained.method, backbone=SmallCNN(6))
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": method.state_dict(), "hyper_parameters": {"config": flat_config(trained)}}, ckpt)
    now = compose_config(tmp_path, ["method=cluster"])
    with pytest.raises(CheckpointError) as err:
        load_weights(instantiate(now.method, backbone=SmallCNN(6)), ckpt, now)
    assert str(err.value) == (
        f"checkpoint {ckpt} does not fit the configured model (pass the method= it was trained with: the checkpoint's "
        "modules differ outside the backbone): unexpected 'head.0.bias' (0 missing, 4 unexpected keys); it was trained "
        "with method.objective=supcon (now ce)"
    )


def test_sweep_objective_reads_only_validation_splits(tmp_path: Path) -> None:
    asked: list[str] = []

    def score(split: str) -> torch.Tensor:
        asked.append(split)
        return {"val": torch.tensor([3.0, 4.0, 5.0]), "val_ood": torch.tensor([1.0, 3.5, 2.0])}[split]

    splits = ["train", "val", "test", "val_ood", "digits_6_9", "gaussian_noise"]
    aurocs = validation_aurocs([Scorer("msp", score), Scorer("energy", score)], splits)
    assert set(asked) == {"val", "val_ood"}, "test splits are never scored for the objective"
    assert aurocs == {"msp": pytest.approx(8 / 9), "energy": pytest.approx(8 / 9)}  # 8 of 9 (ID, OOD) pairs ordered
    assert validation_aurocs([Scorer("msp", score)], ["val", "test"]) == {}
    (tmp_path / "validation.json").write_text('{"method": "ce", "auroc": {"msp": 0.7, "energy": 0.9}}')
    assert sweep_objective(tmp_path, None) == 0.7 and sweep_objective(tmp_path, "energy") == 0.9
    with pytest.raises(ConfigError, match=r"objective=knn: not scored in this run; choose one of \['energy', 'msp'\]"):
        sweep_objective(tmp_path, "knn")



def test_an_objective_the_run_does_not_score_is_refused_before_training(tmp_path: Path) -> None:
    """`objective=nope` (a sweep's typo) was refused by `sweep_objective` only after the run had trained and
    evaluated; a part of the method's own score (`energy_cfl_recon_dist`) is one of its scores."""
    message = (r"^objective=nope: not scored in this run; choose one of the detectors \['energy', 'msp'\] or the "
               r"method's own score \(ce, where it has one\)$")
    with pytest.raises(ConfigError, match=message):
        run_config(tmp_path, [*FAST, "objective=nope", "detectors.names=[msp,energy]"])
    assert not (tmp_path / "checkpoints").exists(), "refused before the first epoch"
    check_objective("energy_cfl_recon_dist", "energy_cfl_recon", ["msp"])
    check_objective(None, "ce", [])

def test_license_file_matches_pyproject() -> None:
    import tomllib

    root = Path(__file__).parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]  # an SPDX expression, setuptools>=77
    assert (root / "LICENSE").read_text().startswith("MIT License\n")


def test_a_checkpoint_evaluated_on_other_data_needs_the_command_line_to_say_so(
    tmp_path: Path, ce_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`ood-eval ckpt_path=...` without the training run's `data=` would score the checkpoint on the default data
    whenever the class counts agree: a `data.*` / `backbone.*` value other than the training run's is refused unless
    the command line sets that key, a node above it or an `experiment=`; training-only keys are not compared."""
    from ood.runs.checks import check_evaluated
    from ood.runs.trained import checkpoint_config

    stored, ckpt = checkpoint_config(ce_checkpoint), str(ce_checkpoint)
    same = ["train=false", f"ckpt_path={ckpt}", "data.batch_size=7", "data.benchmark.augment=false"]
    check_evaluated(compose_config(tmp_path, same), stored, ckpt, given=())
    other = compose_config(tmp_path, [*same, "data.benchmark.seed=3", "backbone.width=32"])
    with pytest.raises(ConfigError) as err:
        check_evaluated(other, stored, ckpt, given=["data.batch_size=7"])
    assert str(err.value) == (
        f"checkpoint {ckpt} was trained with data.benchmark.seed=0 (now 3): pass ood-eval method=ce data=digits "
        f"backbone=small_cnn data.benchmark.seed=0 ckpt_path={ckpt}, or name the keys on the command line to evaluate "
        "it so on purpose"
    )
    for given in (["data.benchmark.seed=3"], ["+data=digits"], ["experiment=heatmap"]):
        caplog.clear()
        with caplog.at_level("INFO"):
            check_evaluated(other, stored, ckpt, given=given)
        assert f"evaluating {ckpt} with data.benchmark.seed=0 (now 3), as asked" in caplog.text
    # through check_run, with the overrides Hydra records for the job
    with pytest.raises(ConfigError, match="was trained with data.benchmark.seed=0 \\(now 3\\)"):
        check_run(other, ckpt, ["data.batch_size=7"])


def test_the_command_a_refused_evaluation_prints_evaluates_the_checkpoint_as_trained(tmp_path: Path) -> None:
    """The command the refusal said to type, `ood-eval method=ce data=digits backbone=small_cnn ckpt_path=...`,
    composed `data=digits`'s defaults (16 px) for a network trained at 12 px and passed, `data` being named: an
    evaluation of other data than the training's. It names the training value of every key that differs, quoted
    for the shell and Hydra (a value with a space or a comma, a string that reads as a number)."""
    import shlex

    from ood.runs.checks import check_evaluated
    from ood.runs.identity import RunIdentity, flat_config, identity, write_identity

    ckpt = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    trained = ["data.benchmark.image_size=12", "+data.benchmark.name='my set, v2'", "+data.benchmark.tag='7'"]
    stored = flat_config(compose_config(tmp_path, trained))
    write_identity(tmp_path / "run", RunIdentity(identity(stored), ckpt, names=["ce", "digits", "small_cnn"]))
    with pytest.raises(ConfigError) as err:
        check_evaluated(compose_config(tmp_path, ["train=false", "+data.benchmark.name=x", "+data.benchmark.tag=8"]),
                        stored, ckpt, given=())
    typed = shlex.split(str(err.value).partition(": pass ood-eval ")[2].partition(", or name")[0])
    assert typed == ["method=ce", "data=digits", "backbone=small_cnn", "data.benchmark.image_size=12",
                     'data.benchmark.name="my set, v2"', 'data.benchmark.tag="7"', f"ckpt_path={ckpt}"]
    # typed (the new keys with their +), it composes the training run's values and passes
    typed[4:6] = [f"+{arg}" for arg in typed[4:6]]
    now = compose_config(tmp_path, ["train=false", *typed])
    assert (now.data.benchmark.image_size, now.data.benchmark.name, now.data.benchmark.tag) == (12, "my set, v2", "7")
    check_evaluated(now, stored, ckpt, given=typed)


@pytest.mark.parametrize("value", ["1e-4", "inf", "true", "x y", 'a\\"b', "digits", float("inf"), -float("inf"), 1e-4,
                                   None, {"noise": 0.08, "blur": 1.0}, [{"a": [1, "b c"]}]])
def test_an_override_a_refusal_prints_reads_back_as_the_checkpoints_value(value: object) -> None:
    """The overrides a refused resume or evaluation says to type went through YAML's and JSON's reading: the string
    '1e-4' (or 'inf') went bare and Hydra read a float, float('inf') became the string 'Infinity', and a dict
    (quoted keys) did not parse."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    (word,) = shlex.split(_override("data.x", value))
    got = OverridesParser.create().parse_override(word).value()
    assert got == value and type(got) is type(value)


def test_a_checkpoint_of_another_method_needs_method_on_the_command_line(tmp_path: Path) -> None:
    """`ood-eval ckpt_path=<logitnorm run>` without `method=logitnorm` scored it as `ce`, every row labelled so; a
    post-hoc method named on the command line (`method=grood` on a CE checkpoint) passes."""
    from ood.runs.checks import check_evaluated
    from ood.runs.identity import flat_config

    ckpt = str(tmp_path / "last.ckpt")
    stored = flat_config(compose_config(tmp_path, ["method=logitnorm"]))
    with pytest.raises(ConfigError) as err:
        check_evaluated(compose_config(tmp_path, ["train=false"]), stored, ckpt, given=())
    assert str(err.value) == (
        f"checkpoint {ckpt} was trained with method._target_=ood.methods.logitnorm.LogitNorm (now "
        "ood.methods.CrossEntropy): pass the method=, data= and backbone= options it was trained with, or name the "
        "keys on the command line to evaluate it so on purpose"
    )
    ce = flat_config(compose_config(tmp_path, []))
    check_evaluated(compose_config(tmp_path, ["train=false", "method=grood"]), ce, ckpt, given=["method=grood"])


def test_overrides_taken_from_the_training_run_ask_for_no_difference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ood-eval ckpt_path=<run>` adds the run's own `data=digits` (and says so in `OOD_EVAL_ADOPTED`): that is not
    the user naming `data`, so a `data.*` value that moved since (another default) is still refused; typed by the
    user (the same `data=digits`), it is asked for."""
    from ood.runs.checks import check_evaluated
    from ood.runs.identity import flat_config

    ckpt = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    stored = flat_config(compose_config(tmp_path, ["data.benchmark.seed=5"]))
    now = compose_config(tmp_path, ["train=false"])
    monkeypatch.setenv("OOD_EVAL_ADOPTED", '["data=digits"]')
    with pytest.raises(ConfigError, match=r"was trained with data.benchmark.seed=5 \(now 0\)"):
        check_evaluated(now, stored, ckpt, given=["data=digits"])
    check_evaluated(now, stored, ckpt, given=["data=digits", "data.benchmark.seed=0"])
    monkeypatch.delenv("OOD_EVAL_ADOPTED")
    check_evaluated(now, stored, ckpt, given=["data=digits"])  # typed: asked for



@functools.cache
def _eval_config(data: str) -> DictConfig:
    """`ood-eval data=<data> backbone=timm`, composed once per data config (the cases vary keys of it)."""
    return compose_config(Path("unused"), [f"data={data}", "backbone=timm"], "eval")


@pytest.mark.parametrize(("data", "keys", "said"), [
    ("imagenet200", {"backbone.name": "vit_base_patch16_224"},
     "timm's pretrained config of that model preprocesses with mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], "
     "interpolation=bicubic, the data config with mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], "
     "interpolation=bilinear: if the weights were trained with timm's preprocessing (timm's own pretrained ones; "
     "weights you fine-tuned may not be), use timm's: 'data.benchmark.mean=[0.5, 0.5, 0.5]' "
     "'data.benchmark.std=[0.5, 0.5, 0.5]' (its bilinear resize has no key: data=folder takes "
     "data.interpolation=bicubic)"),
    # CIFAR's null mean / std: the dataset's own; a ViT-Tiny built for 32 px keeps its name's config
    ("cifar10", {"backbone.name": "vit_tiny_patch16_224", "backbone.img_size": 32},
     "with mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], interpolation=bicubic, the data config with "
     "mean=[0.4914, 0.4822, 0.4465], std=[0.247, 0.2435, 0.2616], interpolation=bilinear"),
    # the folder data's nulls are timm's own; values given are compared, each with its key
    ("folder", {"backbone.name": "vit_tiny_patch16_224", "data.mean": [0.4], "data.interpolation": "bilinear"},
     "the data config with mean=[0.4], interpolation=bilinear: if the weights were trained with timm's preprocessing "
     "(timm's own pretrained ones; weights you fine-tuned may not be), use timm's: 'data.mean=[0.5, 0.5, 0.5]' "
     "data.interpolation=bicubic"),
    ("imagenet200", {"backbone.name": "vit_base_patch16_224", "backbone.weights": None}, None),  # trained here
    ("imagenet200", {"backbone.name": "resnet18.tv_in1k"}, None),  # the same preprocessing
    ("imagenet200", {"backbone.name": "my_vit"}, None),  # no timm config of that name
    ("folder", {"backbone.name": "vit_tiny_patch16_224"}, None),  # timm's own
    ("tinyimagenet", {"backbone.name": "vit_tiny_patch16_224"}, None),  # the resize alone, which has no key
])
def test_timm_weights_on_data_preprocessed_otherwise_than_timms_config_warn_before_the_run(
    caplog: pytest.LogCaptureFixture, data: str, keys: dict[str, Any], said: str | None
) -> None:
    """`ood-eval data=imagenet200 backbone=timm backbone.name=vit_base_patch16_224 backbone.weights=<file>`
    normalised with ImageNet's mean / std while timm's config of the model says 0.5 (as data=folder and the Python
    API's folders take it), without a word; checked before any image is read."""
    cfg = copy.deepcopy(_eval_config(data))
    for key, value in {"backbone.weights": "weights.pth", **keys}.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    with caplog.at_level("WARNING", logger="ood.runs.checks"):
        check_run(cfg, None)
    warned = [r.getMessage() for r in caplog.records if "timm's pretrained config" in r.getMessage()]
    assert len(warned) == (said is not None)
    if said is not None:
        assert warned[0].startswith(f"backbone=timm backbone.name={keys['backbone.name']} loads backbone.weights; ")
        assert said in warned[0]
