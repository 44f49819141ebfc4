"""docs/adding_a_method.md: its example module and config, copied out of the page, work as written: the method is
prepared without a Trainer, then trained, evaluated and reported by `ood-train`; the module touches no trainer."""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

import pytest
import torch
from helpers import compose_config, doc_blocks
from omegaconf import OmegaConf, open_dict

from ood import PROJECT_ROOT
from ood.models.checkpoint import read_state_dict
from ood.utils import instantiate

DOC = PROJECT_ROOT / "docs" / "adding_a_method.md"


def _blocks() -> tuple[str, str]:
    """The page's python and yaml blocks (one each)."""
    (code,), (yaml,) = doc_blocks(DOC, "python"), doc_blocks(DOC, "yaml")
    return code, yaml


@pytest.fixture
def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example module importable as `ood.methods.norm_gap` (a file in tmp_path, never in the checkout) and its
    config file."""
    code, yaml = _blocks()
    assert len(code.splitlines()) <= 40 and "trainer" not in code
    (tmp_path / "norm_gap.py").write_text(code)
    (tmp_path / "norm_gap.yaml").write_text(yaml)
    spec = importlib.util.spec_from_file_location("ood.methods.norm_gap", tmp_path / "norm_gap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(__import__("sys").modules, "ood.methods.norm_gap", module)
    return tmp_path


def _config(run_dir: Path, example: Path, ckpt: Path, *overrides: str):
    cfg = compose_config(run_dir, [f"method.init.ckpt={ckpt}", *overrides])
    with open_dict(cfg):
        cfg.method = OmegaConf.merge(OmegaConf.load(example / "norm_gap.yaml"), {"init": {"ckpt": str(ckpt)}})
    return cfg


def test_example_prepares_without_a_trainer(example: Path, ce_checkpoint: Path) -> None:
    cfg = _config(example / "run", example, ce_checkpoint)
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone, num_classes=6, in_channels=1))
    method.apply_init()
    data = instantiate(cfg.data, seed=0).fit_data()
    method.prepare(data)
    state = {k.removeprefix("backbone."): v for k, v in read_state_dict(ce_checkpoint).items() if k.startswith("backbone.")}
    reference = instantiate(cfg.backbone, num_classes=6, in_channels=1)
    reference.load_state_dict(state)
    fit = data.datasets["fit"]
    with torch.no_grad():
        logits = reference.eval()(torch.stack([fit[i][0] for i in range(len(fit))]))
    assert method.fitted()["train_logit_norm"] == pytest.approx(logits.norm(dim=1).mean().item(), rel=1e-5)
    method.train_norm.fill_(123.0)  # a resumed checkpoint's value: prepare (every fit start) keeps it
    method.prepare(data)
    assert method.fitted()["train_logit_norm"] == 123.0


@pytest.mark.slow
def test_example_trains_and_reports_its_score(example: Path, ce_checkpoint: Path) -> None:
    from ood.train import run

    cfg = _config(example / "run", example, ce_checkpoint, "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                  "detectors.names=[msp]", "logger=none")
    rows = run(cfg)
    own = {r["ood_dataset"]: r for r in rows if r["detector"] == "norm_gap"}
    assert set(own) == {"digits_6_9", "flower_patches", "gaussian_noise", "uniform_noise"}
    assert all(0 <= r["auroc"] <= 1 for r in own.values())
    assert rows[0]["method_params"]["fitted"]["train_logit_norm"] > 0


def test_a_method_without_training_loss_stops_in_one_line() -> None:
    """A user's method that forgot `training_loss` stopped its first training step on a bare `NotImplementedError`
    (Hydra's traceback, no word of what is missing); it is one line naming the method and what to implement."""
    from ood.cli import user_error
    from ood.data.batch import Batch
    from ood.errors import ConfigError
    from ood.methods.base import OODMethod

    class NoLoss(OODMethod):
        name = "no_loss"

    method = NoLoss(torch.nn.Linear(2, 2), functools.partial(torch.optim.SGD, lr=0.1))
    with pytest.raises(ConfigError) as err:
        method.training_loss(Batch(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)))
    want = ("method 'no_loss' (test_adding_a_method.NoLoss) implements no training_loss(batch): return the loss of one "
            "Batch, or subclass ood.methods.CrossEntropy for a method that trains with cross-entropy")
    assert str(err.value) == want.replace("NoLoss", "test_a_method_without_training_loss_stops_in_one_line.<locals>.NoLoss")
    assert str(user_error(err.value)) == str(err.value)


def test_a_method_config_without_target_or_with_a_key_its_class_lacks_is_one_line() -> None:
    """`conf/method/<name>.yaml` without `_target_`: Hydra built a plain dict, which failed far away ("'dict' object
    has no attribute 'streams'"); one that inherits ce's `_target_` (`defaults: [ce, _self_]`) but adds its own key,
    or misspells one, stopped on Hydra's five-line TypeError. Each is one line naming the node and the fix."""
    from ood.errors import ConfigError

    optimizer = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}
    bare = OmegaConf.create({"method": {"optimizer": optimizer, "alpha": 0.1}}).method
    with pytest.raises(ConfigError, match=r"^method has no _target_: add `_target_: <module>\.<Class>`, the class it "
                                          r"builds \(a method: your OODMethod subclass\), or inherit one with "
                                          r"`defaults: \[<option>, _self_\]`$"):
        instantiate(bare, backbone=torch.nn.Linear(2, 2))
    inherited = OmegaConf.create({"method": {"_target_": "ood.methods.CrossEntropy", "optimizer": optimizer, "alpha": 0.1}})
    with pytest.raises(ConfigError, match=r"^method: OODMethod\.__init__\(\) got an unexpected keyword argument 'alpha' "
                                          r"\(_target_: ood\.methods\.CrossEntropy\); every key of method but _target_ "
                                          r"is a keyword of that class: fix the key, or set method\._target_ to the class "
                                          r"that takes it$"):
        instantiate(inherited.method, backbone=torch.nn.Linear(2, 2))


class _Miscalled:
    """A class whose constructor has a bug of its own: it calls another with a keyword that one does not take."""

    def __init__(self, scale: float = 1.0) -> None:
        torch.nn.Linear(2, 2, bais=False)


def test_a_key_refusal_names_the_nested_node_and_never_blames_the_config_for_a_constructors_own_bug() -> None:
    """The one line for a key a class does not take named the top node and its `_target_` even when Hydra refused a
    nested `_target_` node (`evaluation.evaluator.detector`), and blamed the node's keys for a TypeError raised inside a
    constructor (its own call with a wrong keyword): the nested node is named with its own `_target_`, and a
    constructor's own TypeError is left as it was raised."""
    from hydra.errors import InstantiationException

    from ood.errors import ConfigError

    nested = OmegaConf.create({"evaluation": {"_target_": "ood.evaluation.callback.OODEvaluation",
                                              "evaluator": {"_target_": "ood.evaluation.evaluator.Evaluator",
                                                            "detector": ["msp"]}}})
    with pytest.raises(ConfigError, match=r"^evaluation\.evaluator: Evaluator\.__init__\(\) got an unexpected keyword "
                                          r"argument 'detector' \(_target_: ood\.evaluation\.evaluator\.Evaluator\); "
                                          r"every key of evaluation\.evaluator but _target_ is a keyword of that class"):
        instantiate(nested.evaluation)
    buggy = OmegaConf.create({"method": {"_target_": f"{__name__}._Miscalled", "scale": 2.0}})
    with pytest.raises(InstantiationException, match=r"Linear\.__init__\(\) got an unexpected keyword argument 'bais'"):
        instantiate(buggy.method)
