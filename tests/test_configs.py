"""Every config in conf/method, conf/data, conf/backbone, conf/experiment, conf/trainer and conf/logger
composes and builds; new files enrol themselves (the config group is the registry)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import compose_config, folder_overrides

from ood import CONFIG_DIR
from ood.data.batch import Batch
from ood.errors import ConfigError
from ood.methods.base import OODMethod
from ood.models.base import Backbone
from ood.utils import instantiate


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("name", options("backbone"))
def test_backbone_builds_and_runs(tmp_path: Path, name: str) -> None:
    # backbone=module wraps any importable class: it needs one named
    extra = ["backbone.target=torchvision.models.mobilenet_v3_small"] if name == "module" else []
    cfg = compose_config(tmp_path, [f"backbone={name}", *extra])
    backbone = instantiate(cfg.backbone, num_classes=7, in_channels=3)
    assert isinstance(backbone, Backbone)
    size = 64 if name in ("resnet50", "resnet50_64x64") else 32
    out = backbone.eval().run(torch.randn(2, 3, size, size), backbone.layer_names[:1])
    assert out.logits.shape == (2, 7) and out.features.shape == (2, backbone.feature_dim)
    assert torch.allclose(backbone.fc(out.features), out.logits)


@pytest.mark.parametrize("name", options("method"))
def test_method_builds_with_small_cnn(tmp_path: Path, name: str) -> None:
    cfg = compose_config(tmp_path, [f"method={name}"])
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone, num_classes=6, in_channels=1))
    assert isinstance(method, OODMethod)
    # a documented reconstruction (`reconstruction: true` in its config) reports as <config name>_recon
    expected = f"{name}_recon" if cfg.method.get("reconstruction") else name
    assert method.name == expected, "the method's reported name must equal its config file name"
    assert method.configure_optimizers()


def test_a_method_without_a_name_is_refused_in_one_line(tmp_path: Path) -> None:
    """A method class that sets no `name` (docs/adding_a_method.md: "set `name`") stopped the run's set-up on
    `AttributeError: 'Unnamed' object has no attribute 'name'` under Hydra's wrapper; now one line names the class."""

    class Unnamed(OODMethod):
        def training_loss(self, batch: Batch) -> torch.Tensor:
            return self.backbone(batch.x).logsumexp(1).mean()

    backbone = instantiate(compose_config(tmp_path, []).backbone, num_classes=6, in_channels=1)
    with pytest.raises(ConfigError, match=r"^Unnamed sets no `name`, the class attribute its results are reported under"):
        Unnamed(backbone, optimizer=torch.optim.SGD)


@pytest.mark.parametrize("name", options("data"))
def test_datamodule_builds_without_touching_data(tmp_path: Path, name: str) -> None:
    # data=folder reads the user's folders named on the command line: fabricated ones here
    extra = folder_overrides(tmp_path) if name == "folder" else []
    # data.outlier_batch_size is a key of every data config (it needed a `+` when the configs lacked it)
    cfg = compose_config(tmp_path, [f"data={name}", f"paths.data_dir={tmp_path / 'no_data_here'}",
                                    "data.outlier_batch_size=96", *extra])
    datamodule = instantiate(cfg.data)
    assert datamodule.num_classes > 1 and datamodule.outlier_batch_size == 96


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_image_side_and_normalisation_are_plain_overrides(tmp_path: Path, name: str) -> None:
    """`data.benchmark.image_size=64` (and mean / std) without Hydra's `+`: the keys were missing from the yaml, so the
    documented override failed with "Key 'image_size' is not in struct"."""
    cfg = compose_config(tmp_path, [f"data={name}", "data.benchmark.image_size=64", "data.benchmark.mean=[0.5,0.5,0.5]",
                                    "data.benchmark.std=[0.25,0.25,0.25]"])
    benchmark = instantiate(cfg.data).benchmark
    assert (benchmark.image_size, benchmark.mean, benchmark.std) == (64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    default = instantiate(compose_config(tmp_path, [f"data={name}"]).data).benchmark
    assert (default.image_size, default.mean) == (32, type(default).mean)


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_composes(tmp_path: Path, name: str) -> None:
    from omegaconf import OmegaConf

    defaults = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "experiment" / f"{name}.yaml")).get("defaults") or []
    methods = [d["override /method"] for d in defaults if isinstance(d, dict) and "override /method" in d]
    missing = [m for m in methods if not (CONFIG_DIR / "method" / f"{m}.yaml").is_file()]
    if missing:
        pytest.skip(f"experiment {name} is ready for conf/method/{missing[0]}.yaml, which does not exist yet")
    cfg = compose_config(tmp_path, [f"experiment={name}"])
    assert cfg.method._target_ and cfg.data._target_ and cfg.backbone._target_


@pytest.mark.parametrize("group", ["trainer", "logger", "detectors", "callbacks"])
def test_group_options_compose(tmp_path: Path, group: str) -> None:
    """`<group>=<name>` selects conf/<group>/<name>.yaml: every value the file sets is in the composed node (over its
    own defaults), and a file that sets nothing gives an empty node."""
    from omegaconf import OmegaConf

    from ood.runs.identity import flatten

    for name in options(group):
        cfg = compose_config(tmp_path, [f"{group}={name}"])
        assert cfg.hydra.runtime.choices[group] == name
        file = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / f"{name}.yaml"))
        defaults = file.pop("defaults", [])
        composed = flatten(OmegaConf.to_container(cfg[group]) or {})
        own = flatten(file)
        assert own.items() <= composed.items(), f"{group}={name}: {[(k, v, composed.get(k)) for k, v in own.items() if composed.get(k) != v]}"
        if not own and not defaults:
            assert composed == {}, f"{group}={name} sets nothing, yet composes to {composed}"


def test_eval_config_requires_checkpoint(tmp_path: Path) -> None:
    from ood.errors import ConfigError
    from ood.train import run

    with pytest.raises(ConfigError, match="needs a checkpoint: add ckpt_path="):
        run(compose_config(tmp_path, [], config_name="eval"))
    # the job's folder names its error for ood-report (not "still running or killed")
    assert (tmp_path / "FAILED.txt").read_text().startswith("ConfigError: evaluation without training needs a checkpoint")


def test_help_says_reference_is_not_a_run_choice(tmp_path: Path) -> None:
    """`--help` lists every conf/ folder as a group, reference/ included; its footer says what reference/ is for
    (ood-report's published numbers, not a choice for a run)."""
    for config_name in ("train", "eval"):
        footer = compose_config(tmp_path, [], config_name=config_name).hydra.help.footer
        assert footer.startswith("reference/*: published AUROC / FPR95 that ood-report prints"), footer
        # data/base/files (listed as a group too) is the base of a data config of one's own, not a choice either
        assert "data/base/files: what a data config of your own starts from (docs/adding_a_benchmark.md" in footer
