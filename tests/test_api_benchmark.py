"""`ood.evaluate(model, benchmark=<name>)`: the caller's network on a benchmark of the data group gives the rows of
`ood-eval data=<name>` of the same weights (digits, with its csid sets; fabricated OpenOOD CIFAR-10 files, with its
validation OOD); what does not fit a benchmark is one line."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torchvision
from fabricate import make_openood_tree
from helpers import capture_warnings_of, run_config
from torch import nn

import ood
from ood.data.files import DataNotFoundError
from ood.errors import ConfigError

#: the run figures (matplotlib) cost seconds and are not what these tests check
pytestmark = pytest.mark.usefixtures("no_figures")

#: one detector that tunes on the validation OOD (knn's k), one that does not
DETECTORS = ["msp", "knn", "react"]
#: what `ood.evaluate` sets beside the benchmark (`batch_size=1024`: few steps), given to the command line alike
EVAL = ["logger=none", "callbacks=none", "trainer.enable_progress_bar=false", "data.eval_batch_size=1024",
        "data.num_workers=0", f"detectors.names=[{','.join(DETECTORS)}]"]


class TinyNet(nn.Module):
    """A network of the caller's own: one convolution, pooled, a linear head; imported by the command line's
    `backbone=module backbone.target=test_api_benchmark.TinyNet`."""

    def __init__(self, num_classes: int = 6, in_channels: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.pool = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x)))


def _saved(model: nn.Module, path: Path) -> nn.Module:
    torch.save(model.state_dict(), path)
    return model.eval()


def _assert_rows_equal(api: list[dict[str, Any]], cli: list[dict[str, Any]]) -> None:
    """The same rows, in order, key for key; numbers to 1e-9."""
    assert [sorted(r) for r in api] == [sorted(r) for r in cli]
    for a, c in zip(api, cli, strict=True):
        for key, value in c.items():
            if isinstance(value, float) and not isinstance(a[key], bool):
                assert math.isclose(a[key], value, rel_tol=0, abs_tol=1e-9) or (math.isnan(a[key]) and math.isnan(value)), key
            else:
                assert a[key] == value, key


def test_digits_benchmark_rows_equal_ood_eval_with_its_csid_sets(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _saved(TinyNet(), tmp_path / "tiny.pth")
    # fit_fraction: an option of the benchmark's data node, taken as a keyword (and a shorter pass)
    results = ood.evaluate(model, benchmark="digits", detectors=DETECTORS, fsood=True, fit_fraction=0.1,
                           batch_size=1024, device="cpu", output_dir=tmp_path / "api")
    cli = run_config(tmp_path / "cli", [
        "data=digits", "backbone=module", f"backbone.target={__name__}.TinyNet",
        f"backbone.weights={tmp_path / 'tiny.pth'}", "evaluation.fsood=true", "data.fit_fraction=0.1", *EVAL],
        config_name="eval")
    _assert_rows_equal(results.rows, cli)
    # the protocol's near and far sets, and the full-spectrum rows over its three csid sets
    assert {(r["mode"], r["ood_group"]) for r in cli} == {(m, g) for m in ("standard", "fsood") for g in ("near", "far")}
    assert {r["detector"] for r in cli} == set(DETECTORS)


@pytest.fixture(scope="module")
def openood_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_openood_tree(tmp_path_factory.mktemp("openood"))


def test_cifar10_benchmark_rows_equal_ood_eval_on_openood_files(openood_tree: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _saved(TinyNet(num_classes=10, in_channels=3), tmp_path / "tiny.pth")
    results = ood.evaluate(model, benchmark="cifar10", data_dir=openood_tree, detectors=DETECTORS, batch_size=1024,
                           device="cpu", output_dir=tmp_path / "api")
    cli = run_config(tmp_path / "cli", [
        "data=cifar10", f"paths.data_dir={openood_tree}", "backbone=module", f"backbone.target={__name__}.TinyNet",
        f"backbone.weights={tmp_path / 'tiny.pth'}", *EVAL], config_name="eval")
    _assert_rows_equal(results.rows, cli)
    # OpenOOD v1.5's sets, react's percentile tuned on the validation OOD (val_tin); knn's grid has one k within the
    # fabricated train split's rows, so knn is recorded untuned, as a one-point grid
    assert {r["ood_dataset"] for r in cli} == {"cifar100", "tin", "mnist", "svhn", "texture", "places365"}
    assert {r["detector"]: r["tuned"] for r in cli} == {"msp": False, "knn": False, "react": True}


def test_a_protocol_override_reaches_the_benchmark(openood_tree: Path, tmp_path: Path) -> None:
    """`data.benchmark.protocol=classic` asks for the classic sets, which the OpenOOD tree has not: one is named."""
    with pytest.raises(DataNotFoundError, match=r"^cifar10: set '(texture|svhn|places365|lsun_crop|lsun_resize|isun)'"):
        ood.evaluate(TinyNet(10, 3), benchmark="cifar10", data_dir=openood_tree, detectors="msp", device="cpu",
                     overrides=["data.benchmark.protocol=classic"], output_dir=tmp_path)


@pytest.mark.parametrize(("call", "message"), [
    ({"id_data": "data/id"}, r"needs id_data= and ood_data= .*benchmark=<name> .*cifar10, cifar100, digits"),
    ({"benchmark": "digits", "id_data": "data/id", "ood_data": ["data/dtd"]},
     r"^ood.evaluate got benchmark='digits' and id_data and ood_data: give one"),
    ({"benchmark": "digits", "transform": torchvision.transforms.ToTensor()},
     r"^transform= with benchmark='digits': the benchmark's preprocessing .* part of its protocol"),
    ({"benchmark": "folder"}, r"^benchmark='folder': give the name of a data config \(cifar10, "),
    ({"id_data": "data/id", "ood_data": ["data/dtd"], "data_dir": "data"}, r"^data_dir='data' is where a benchmark"),
    ({"benchmark": "cifar11"}, r"^benchmark='cifar11' is no data config; choices: cifar10, cifar100, digits, "
                               r"imagenet1k, imagenet200, tinyimagenet \("),
    ({"benchmark": "digits", "image_size": 32, "classes": ["a"]},
     r"^ood.evaluate got image_size, classes with benchmark='digits': folder-data option\(s\), .*; the benchmark's "
     r"own: overrides=\['data.benchmark.image_size=...'\]$"),
    ({"benchmark": "digits", "drop_last": False}, r"drop_last is a training option"),
    ({"benchmark": "cifar10", "overrides": ["data=cifar100"]}, r"^benchmark='cifar10' and overrides data=cifar100 disagree"),
    # beside folders, a data= override was taken without a word (the folders set into another data config)
    ({"id_data": "data/id", "ood_data": ["data/dtd"], "overrides": ["data=cifar10"]},
     r"^ood.evaluate got overrides data=cifar10 beside id_data / ood_data \(folders\): for a benchmark's own data give "
     r"benchmark='cifar10' instead of the folders$"),
    ({"benchmark": "digits", "model": TinyNet(num_classes=10)},
     r"^the model's head, layer 'fc', has 10 outputs but the ID data \(digits\) has 6 classes"),
    ({"benchmark": "digits", "model": TinyNet(in_channels=3)},
     r"^the model's first convolution reads 3 channel\(s\) and benchmark='digits' has 1-channel images"),
])
def test_what_does_not_fit_a_benchmark_is_one_line(tmp_path: Path, call: dict[str, Any], message: str) -> None:
    call = {"model": TinyNet(), **call}
    with pytest.raises(ConfigError, match=message) as err:
        ood.evaluate(call.pop("model"), detectors="msp", device="cpu", output_dir=tmp_path, **call)
    assert "\n" not in str(err.value)


class AuxHeadFirstNet(TinyNet):
    """`TinyNet` with an auxiliary head (a 1x1 convolution on the stem's output) defined before its stem."""

    def __init__(self, num_classes: int = 6, in_channels: int = 1) -> None:
        nn.Module.__init__(self)
        self.aux = nn.Conv2d(8, num_classes, 1)
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.pool = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, num_classes)


class GreyToRGBNet(TinyNet):
    """An RGB `TinyNet` that reads grey images: its forward repeats the one channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.expand(-1, 3, -1, -1))


@pytest.mark.parametrize(("model", "refused"), [
    (AuxHeadFirstNet(), None), (GreyToRGBNet(in_channels=3), None), (AuxHeadFirstNet(in_channels=3), 3),
])
def test_the_benchmark_channel_check_follows_the_convolution_run_first(model: nn.Module, refused: int | None) -> None:
    """`ood.evaluate(model, benchmark=...)` read the first registered convolution: a model whose auxiliary head is
    defined before its stem, or that makes grey images RGB itself, was refused for 1-channel digits though it runs on
    them; one image of the benchmark's size decides, and a real mismatch names the stem's channels (not the head's)."""
    from types import SimpleNamespace

    from ood.api import _check_channels

    digits = SimpleNamespace(in_channels=1, image_size=16)
    if refused is None:
        _check_channels(model, digits, "digits")
    else:
        with pytest.raises(ConfigError, match=rf"^the model's first convolution reads {refused} channel\(s\) and "
                                              r"benchmark='digits' has 1-channel images: give a model made for them$"):
            _check_channels(model, digits, "digits")


def test_an_unknown_benchmark_lists_the_configs_of_the_callers_search_path_too(tmp_path: Path) -> None:
    (tmp_path / "my_conf" / "data").mkdir(parents=True)
    (tmp_path / "my_conf" / "data" / "skin.yaml").write_text("defaults: [base/files@_here_, _self_]\n")
    with pytest.raises(ConfigError, match=r"^benchmark='skn' is no data config; choices: cifar10, .*, skin, tinyimagenet"):
        ood.evaluate(TinyNet(), benchmark="skn", device="cpu", output_dir=tmp_path / "run",
                     overrides=[f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]"])


def test_a_config_of_ones_own_that_fails_to_compose_is_named_as_such(tmp_path: Path) -> None:
    """A data config of the caller's whose defaults name a missing config (`base/filez`) was called no data config,
    with no choices: the compose's own reason is the line."""
    (tmp_path / "my_conf" / "data").mkdir(parents=True)
    (tmp_path / "my_conf" / "data" / "skin.yaml").write_text("defaults: [base/filez@_here_, _self_]\n")
    with pytest.raises(ConfigError, match=r"^benchmark='skin': In 'data/skin': Could not load 'data/base/filez'\.$"):
        ood.evaluate(TinyNet(), benchmark="skin", device="cpu", output_dir=tmp_path / "run",
                     overrides=[f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]"])


def test_a_timm_model_on_a_benchmark_normalised_otherwise_is_warned_of_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`ood.evaluate(timm_model, benchmark="cifar10")` normalised with CIFAR's mean / std while the model's
    `pretrained_cfg` says ImageNet's, without a word (`ood-eval backbone=timm` warns): one warning now, before any
    image is read (here: none are there), whose `overrides=` silence it; none for a model without `pretrained_cfg`
    or with the benchmark's own values. It warned at every call (a training loop evaluating each epoch: each epoch),
    with advice that did not say a model trained with the benchmark's normalisation (timm's `pretrained=False`, as
    here) can ignore it: once per process now for one architecture and normalisation, saying so."""
    from ood.runs import checks

    capture_warnings_of("ood.runs.checks", monkeypatch, caplog)
    monkeypatch.setattr(checks, "_TIMM_SAID", set())
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    own = TinyNet(10, 3)
    own.pretrained_cfg = {"mean": (0.4914, 0.4822, 0.4465), "std": (0.247, 0.2435, 0.2616)}  # CIFAR's: no warning
    said = ("the model's timm pretrained_cfg (resnet18) preprocesses with mean=[0.485, 0.456, 0.406], std=[0.229, "
            "0.224, 0.225], interpolation=bicubic, the data config with mean=[0.4914, 0.4822, 0.4465], std=[0.247, "
            "0.2435, 0.2616], interpolation=bilinear: it matters only for timm's pretrained weights (a model trained "
            "with the benchmark's own normalisation, from scratch as timm's pretrained=False or fine-tuned, can ignore "
            "it); for those, use timm's: overrides=['data.benchmark.mean=[0.485, 0.456, 0.406]', "
            "'data.benchmark.std=[0.229, 0.224, 0.225]'] (its bilinear resize has no key: id_data=<folders> take "
            "timm's bicubic); said once per process for this architecture and normalisation")
    fix = ["data.benchmark.mean=[0.485, 0.456, 0.406]", "data.benchmark.std=[0.229, 0.224, 0.225]"]
    for net, overrides, warned in [(model, [], [said]), (model, fix, []), (TinyNet(10, 3), [], []), (own, [], []),
                                   (model, [], [])]:
        caplog.clear()
        with pytest.raises(DataNotFoundError, match=r"^cifar10: "):
            ood.evaluate(net, benchmark="cifar10", data_dir=tmp_path, detectors="msp", device="cpu",
                         output_dir=tmp_path / "run", overrides=overrides)
        assert [r.getMessage() for r in caplog.records if r.name == "ood.runs.checks"] == warned
