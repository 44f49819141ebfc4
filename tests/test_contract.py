"""Method contract (ood/methods/base.py): training streams, `method.init` (start from / freeze weights), the method's
linear head, errors that name the file, key and shapes."""

from __future__ import annotations

import copy
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from fabricate import synthetic_banks
from helpers import run_config
from torch import nn
from torchvision.models import resnet50

from ood.data import DigitsBenchmark, OODDataModule
from ood.data.batch import Batch
from ood.data.benchmark import EvalSplit
from ood.errors import CheckpointError, ConfigError, NonFiniteError
from ood.evaluation.callback import OODEvaluation
from ood.evaluation.evaluator import Evaluator
from ood.features.bank import FeatureBank
from ood.features.collector import RankZeroRows
from ood.methods import CrossEntropy
from ood.methods.oe import OutlierExposure
from ood.metrics import ood_metrics
from ood.models import SmallCNN
from ood.models.checkpoint import checkpoint_format, load_modules, read_state_dict
from ood.models.resnet import ResNet50


def _datamodule(**kwargs: object) -> OODDataModule:
    return OODDataModule(DigitsBenchmark(), batch_size=32, outlier_batch_size=48, seed=0, **kwargs)


def _first_batches(loader: object, n: int = 2) -> list[dict[str, Batch]]:
    it = iter(loader)
    return [next(it)[0] for _ in range(n)]


# ----- streams --------------------------------------------------------------------------------------------------
def test_outlier_stream_sizes_content_and_epochs() -> None:
    dm = _datamodule()
    dm.use_streams(("id", "outliers"), "oe")
    loader = dm.train_dataloader()
    n_train, outliers = len(dm.benchmark.train()), dm.benchmark.outliers()
    assert sum(1 for _ in loader) == n_train // 32  # the ID stream sets the epoch
    first = _first_batches(loader)
    id_rows = {tuple(r.flatten().tolist()) for r in dm.benchmark.train(augment=False).images}
    for combined in first:
        ident, out = combined["id"], combined["outliers"]
        assert ident.x.shape[0] == 32 and out.x.shape[0] == 48
        assert torch.equal(out.x, torch.stack([outliers[int(i)][0] for i in out.index]))  # outlier images only
        assert not any(tuple(r.flatten().tolist()) in id_rows for r in out.x)
        merged = dm.on_after_batch_transfer(combined, 0)
        assert torch.equal(merged.x, ident.x) and torch.equal(merged.x_out, out.x) and torch.equal(merged.y, ident.y)
    # a whole epoch draws from every outlier before repeating one (successive permutations)
    seen = torch.cat([batch["outliers"].index for batch in _first_batches(loader, 10)])
    assert len(seen.unique()) == min(len(seen), len(outliers))
    epoch0 = first[0]["outliers"].index
    for dataloader in loader.flattened:
        dataloader.sampler.set_epoch(1)
    assert not torch.equal(_first_batches(loader, 1)[0]["outliers"].index, epoch0)
    for dataloader in loader.flattened:
        dataloader.sampler.set_epoch(0)
    assert torch.equal(_first_batches(loader, 1)[0]["outliers"].index, epoch0)  # a function of (seed, epoch)


def test_id_only_method_never_loads_outliers(monkeypatch: pytest.MonkeyPatch) -> None:
    dm = _datamodule()
    monkeypatch.setattr(dm.benchmark, "outliers", lambda: pytest.fail("outliers were loaded"))
    dm.use_streams(("id",), "ce")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Batch) and batch.x_out is None and len(batch) == 32


def test_id_order_is_a_function_of_seed_and_epoch() -> None:
    dm = _datamodule()
    a, b = dm.train_dataloader(), dm.train_dataloader()
    assert torch.equal(next(iter(a)).index, next(iter(b)).index)
    a.sampler.set_epoch(3)
    assert not torch.equal(next(iter(a)).index, next(iter(b)).index)


@pytest.mark.parametrize("method", ["oe", "heatmap"])
def test_benchmark_without_outliers_fails_before_training(tmp_path: Path, method: str) -> None:
    """The same one line for every outlier method (heatmap's said "no dataset 'outliers' in this benchmark's fit
    data": `in` on the fit datasets raised instead of answering False)."""
    with pytest.raises(ConfigError, match=rf"method {method} trains on outliers, but benchmark digits has none .*\['china_patches'\]"):
        extra = ["method.classifier_epochs=1", "trainer.max_epochs=2"] if method == "heatmap" else ["trainer.max_epochs=1"]
        run_config(tmp_path, [f"method={method}", "data.benchmark.outliers=none", *extra])
    assert not (tmp_path / "checkpoints").exists()


# ----- init and freeze ------------------------------------------------------------------------------------------
def _oe(**init: object) -> OutlierExposure:
    torch.manual_seed(1)
    return OutlierExposure(SmallCNN(6), optimizer=partial(torch.optim.SGD, lr=0.1), init=init or None)


def test_init_from_a_lightning_checkpoint_and_bare_state_dicts(ce_checkpoint: Path, tmp_path: Path) -> None:
    reference = torch.load(ce_checkpoint, weights_only=False)["state_dict"]
    assert checkpoint_format(torch.load(ce_checkpoint, weights_only=False)) == "lightning"
    method = _oe(ckpt=str(ce_checkpoint))
    method.apply_init()
    assert all(torch.equal(method.state_dict()[k], v) for k, v in reference.items())
    backbone_only = {k.removeprefix("backbone."): v for k, v in reference.items()}
    for name, state in (("method.pt", reference), ("backbone.pt", backbone_only)):
        torch.save(state, tmp_path / name)
        assert read_state_dict(tmp_path / name).keys() == reference.keys()


def test_torchvision_resnet50_state_dict_maps_onto_ours(tmp_path: Path) -> None:
    torch.manual_seed(0)
    theirs = resnet50(weights=None, num_classes=5).eval()
    torch.save(theirs.state_dict(), tmp_path / "resnet50.pth")
    assert checkpoint_format(theirs.state_dict()) == "torchvision"
    ours = CrossEntropy(ResNet50(5), optimizer=torch.optim.SGD, init={"ckpt": str(tmp_path / "resnet50.pth")})
    ours.apply_init()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours.backbone.eval()(x), theirs(x))


def test_checkpoint_that_does_not_fit_names_file_key_and_shapes(ce_checkpoint: Path) -> None:
    wide = OutlierExposure(SmallCNN(6, width=16), optimizer=torch.optim.SGD, init={"ckpt": str(ce_checkpoint)})
    with pytest.raises(CheckpointError, match=rf"{ce_checkpoint}.*backbone\.\S+ has shape \(\d+.*\) in the file and \(\d+.*\) in the model"):
        wide.apply_init()
    with pytest.raises(CheckpointError, match=r"did you mean .*checkpoints/last.ckpt"):
        read_state_dict(ce_checkpoint.parent.parent)
    with pytest.raises(ConfigError, match="has no sub-module 'decoder'; choices"):
        _oe(ckpt=str(ce_checkpoint), freeze=["decoder"]).apply_init()


def test_init_modules_maps_a_source_prefix_onto_another_submodule(ce_checkpoint: Path) -> None:
    class WithTeacher(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.teacher = SmallCNN(6), SmallCNN(6)

    model = WithTeacher()
    state = read_state_dict(ce_checkpoint)
    assert load_modules(model, state, {"teacher": "backbone"}, ce_checkpoint) == ["teacher"]
    assert all(torch.equal(model.state_dict()[f"teacher.{k[9:]}"], v) for k, v in state.items())
    assert not torch.equal(model.backbone.fc.weight, model.teacher.fc.weight)


def test_frozen_submodule_is_bit_identical_after_training(ce_checkpoint: Path, tmp_path: Path) -> None:
    """Weights and batch-norm buffers of a frozen sub-module do not move; the rest trains."""
    method = _oe(ckpt=str(ce_checkpoint), freeze=["backbone.stages"])
    method.apply_init()
    before = {k: v.clone() for k, v in method.state_dict().items()}
    dm = _datamodule()
    dm.use_streams(method.streams, method.name)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(method, datamodule=dm)
    # Lightning's 'Found N module(s) in eval mode at the start of training' is not made by the frozen parts
    assert not [w for w in caught if "in eval mode at the start of training" in str(w.message)]
    after = method.state_dict()
    stages = [k for k in before if k.startswith("backbone.stages.")]
    assert any("running_mean" in k for k in stages) and any("num_batches_tracked" in k for k in stages)
    assert all(torch.equal(before[k], after[k]) for k in stages)
    assert not torch.equal(before["backbone.fc.weight"], after["backbone.fc.weight"])
    assert not method.backbone.stages.training and all(not p.requires_grad for p in method.backbone.stages.parameters())


def test_a_module_left_in_eval_mode_beside_the_frozen_ones_is_still_warned_of(ce_checkpoint: Path, tmp_path: Path) -> None:
    method = _oe(ckpt=str(ce_checkpoint), freeze=["backbone.stages"])
    method.apply_init()
    method.backbone.fc.eval()  # not frozen: training it in eval mode is what Lightning's warning is for
    dm = _datamodule()
    dm.use_streams(method.streams, method.name)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    frozen = len(list(method.backbone.stages.modules()))
    with pytest.warns(UserWarning, match=rf"^Found {frozen + 1} module\(s\) in eval mode at the start of training"):
        trainer.fit(method, datamodule=dm)


def test_the_frozen_parts_warning_filter_ends_with_their_fit(ce_checkpoint: Path, tmp_path: Path) -> None:
    """The filter that silences Lightning's eval-mode warning for a fit's frozen parts stayed in the process: a later
    fit (a Hydra multirun's next job) with as many modules left in eval mode by mistake was not warned of."""
    def fit(method: OutlierExposure) -> None:
        dm = _datamodule()
        dm.use_streams(method.streams, method.name)
        L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=tmp_path).fit(method, datamodule=dm)

    frozen = _oe(ckpt=str(ce_checkpoint), freeze=["backbone.stages"])
    frozen.apply_init()
    forgotten = _oe()
    forgotten.backbone.stages.eval()  # not frozen: the same count of modules in eval mode, by mistake
    count = len(list(forgotten.backbone.stages.modules()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # set before the first fit, as a process's filters are
        fit(frozen)
        fit(forgotten)
    assert [str(w.message) for w in caught if "in eval mode at the start" in str(w.message)] == [
        f"Found {count} module(s) in eval mode at the start of training. This may lead to unexpected behavior during "
        "training. If this is intentional, you can ignore this warning."]


def test_detectors_use_the_methods_linear_head() -> None:
    class ProbeHead(CrossEntropy):
        name = "probe_head"

        def __init__(self) -> None:
            super().__init__(SmallCNN(6), optimizer=torch.optim.SGD)
            self.probe = nn.Linear(self.backbone.feature_dim, 6)

        def linear_head(self) -> tuple[torch.Tensor, torch.Tensor]:
            return self.probe.weight, self.probe.bias

    method = ProbeHead()
    callback = OODEvaluation(Evaluator(detectors=[]))
    callback._collectors = {0: RankZeroRows(2)}
    callback._collectors[0].update(index=torch.arange(2), labels=torch.zeros(2, dtype=torch.long),
                                   logits=torch.zeros(2, 6), features=torch.zeros(2, method.backbone.feature_dim))
    bank = callback._banks([EvalSplit("test", "id_test")], method)["test"]
    assert torch.equal(bank.weight, method.probe.weight) and torch.equal(bank.bias, method.probe.bias)


def test_a_sink_written_for_the_trainer_and_module_is_refused_when_the_evaluation_is_built() -> None:
    """Sinks get `write(result, context)` (`SinkContext`); one with the earlier `write(result, trainer, pl_module)`
    was accepted and failed with a bare TypeError only after the whole evaluation. It is refused when built, named."""
    from ood.evaluation.sinks import MetricLogger, RunTable

    class Earlier:
        def write(self, result: object, trainer: object, pl_module: object) -> None: ...

    with pytest.raises(ConfigError, match=r"^evaluation\.sinks\.mine: Earlier needs a method write\(result, context\)"):
        OODEvaluation(Evaluator(detectors=[]), sinks={"log": MetricLogger(), "mine": Earlier()})
    with pytest.raises(ConfigError, match=r"^evaluation\.sinks\.1: object needs a method write"):
        OODEvaluation(Evaluator(detectors=[]), sinks=[RunTable(), object()])
    assert len(OODEvaluation(Evaluator(detectors=[]), sinks={"log": MetricLogger(), "table": RunTable()}).sinks) == 2
    # a write whose signature cannot be read (a builtin such as print) is taken at its word, not refused
    from types import SimpleNamespace

    assert len(OODEvaluation(Evaluator(detectors=[]), sinks={"print": SimpleNamespace(write=print)}).sinks) == 1


def test_ood_callbacks_on_a_module_or_datamodule_not_of_ood_are_one_line() -> None:
    """`OODEvaluation` / `PrepareMethod` on a user's own LightningModule or loaders (no OODDataModule) stopped with a
    bare AssertionError (and with nothing, under `python -O`); one line names what they need."""
    from types import SimpleNamespace

    from ood.evaluation.prepare import PrepareMethod

    method = CrossEntropy(SmallCNN(6), optimizer=torch.optim.SGD)
    evaluation = OODEvaluation(Evaluator(detectors=["msp"]))
    with pytest.raises(ConfigError, match=r"^OODEvaluation runs on an ood method \(ood\.methods\.base\.OODMethod\); "
                                          r"the trainer's module is a LightningModule$"):
        evaluation.on_test_epoch_start(SimpleNamespace(datamodule=None), L.LightningModule())
    with pytest.raises(ConfigError, match=r"^OODEvaluation reads its data from an ood\.data\.benchmark\.OODDataModule "
                                          r"given as trainer\.fit/test\(\.\.\., datamodule=\.\.\.\); the trainer's datamodule is NoneType$"):
        evaluation.on_test_epoch_start(SimpleNamespace(datamodule=None), method)
    with pytest.raises(ConfigError, match=r"^PrepareMethod reads its data from .*; the trainer's datamodule is dict$"):
        PrepareMethod().on_fit_start(SimpleNamespace(datamodule={}), method)
    PrepareMethod().on_fit_start(SimpleNamespace(datamodule=None), L.LightningModule())  # not ood's method: left alone


def test_the_callbacks_run_facts_reach_its_rows_and_leave_the_evaluator_as_built() -> None:
    """`OODEvaluation(evaluator, info=...)` wrote its run facts into the evaluator's own dict: a second callback
    given the same evaluator changed the rows of the first (its seed, its backbone). The callback keeps them and
    hands them to each evaluation."""
    evaluator = Evaluator(detectors=["msp"])
    before = copy.deepcopy(vars(evaluator))
    first = OODEvaluation(evaluator, info={"seed": 1, "backbone": "a"})
    OODEvaluation(evaluator, info={"seed": 2})
    assert vars(evaluator) == before
    splits = [EvalSplit("test", "id_test"), EvalSplit("ood", "ood", "far")]
    method = CrossEntropy(SmallCNN(6), optimizer=torch.optim.SGD)
    (row,) = evaluator.evaluate(method, synthetic_banks(), splits, "synthetic", info=first.info).rows
    assert (row["detector"], row["seed"], row["backbone"], row["method"]) == ("msp", 1, "a", "ce")


class _NormGap(CrossEntropy):
    """docs/adding_a_method.md's example: its score reads a statistic `prepare` measures at fit start."""

    name = "norm_gap"

    def __init__(self) -> None:
        super().__init__(SmallCNN(6), optimizer=torch.optim.SGD)
        self.register_buffer("train_norm", torch.tensor(float("nan")))

    def ood_score(self, bank: FeatureBank) -> torch.Tensor:
        return -(bank.logits.norm(dim=1) - self.train_norm.to(bank.logits)).abs()

    def fitted(self) -> dict[str, float]:
        return {"train_logit_norm": float(self.train_norm)}


def test_a_score_whose_prepare_never_ran_says_so() -> None:
    """`ood.evaluate(model, method="norm_gap")` (no training, so no `prepare`) stopped on "detector norm_gap on test:
    200 of 200 values are NaN or infinite", which does not say why; the line names the unmeasured values and
    `prepare`. Measured, the same evaluation reports the score and the value."""
    banks = synthetic_banks()
    splits = [EvalSplit("test", "id_test"), EvalSplit("ood", "ood", "far")]
    method = _NormGap()
    with pytest.raises(NonFiniteError, match=r"^norm_gap: its own score is NaN or infinite on test and its fitted values "
                                             r"\['train_logit_norm'\] are NaN: prepare\(\) measures them at fit start"):
        Evaluator(detectors=[]).evaluate(method, banks, splits, "synthetic")
    method.train_norm.fill_(float(banks["train"].logits.norm(dim=1).mean()))
    (row,) = Evaluator(detectors=[]).evaluate(method, banks, splits, "synthetic").rows
    assert row["detector"] == "norm_gap" and row["method_params"]["fitted"] == {"train_logit_norm": float(method.train_norm)}
    assert row["auroc"] == ood_metrics(method.ood_score(banks["test"]), method.ood_score(banks["ood"]))["auroc"]


def test_a_method_score_named_as_a_detector_is_refused() -> None:
    """A method named as a registered detector (an energy fine-tune called `energy`) was scored twice under one name:
    two rows per OOD set, and one scorer's scores and logged metrics replaced by the other's."""

    class Energy(_NormGap):
        name = "energy"

    method = Energy()
    method.train_norm.fill_(1.0)
    banks = synthetic_banks()
    splits = [EvalSplit("test", "id_test"), EvalSplit("ood", "ood", "far")]
    with pytest.raises(ConfigError, match=r"^energy: its own score \['energy'\] has the name of a detector this run "
                                          r"scores; .* \(detectors\.exclude=\['energy'\]\)$"):
        Evaluator(detectors=["msp", "energy"]).evaluate(method, banks, splits, "synthetic")
    rows = Evaluator(detectors=["msp"]).evaluate(method, banks, splits, "synthetic").rows
    assert [r["detector"] for r in rows] == ["energy", "msp"]


class EnergyNamed(CrossEntropy):
    """A method named as a registered detector (built by `_target_: test_contract.EnergyNamed`)."""

    name = "energy"


def test_ood_train_refuses_a_method_named_as_a_detector_before_training(tmp_path: Path) -> None:
    """The evaluation's refusal came after the whole training; `ood-train`'s set-up now checks the method's name."""
    from helpers import compose_config
    from omegaconf import open_dict

    from ood.train import build

    def configured(detectors: str) -> object:
        cfg = compose_config(tmp_path, [f"detectors.names={detectors}", "logger=none", "callbacks=none"])
        with open_dict(cfg):
            cfg.method._target_ = "test_contract.EnergyNamed"
        return cfg

    with pytest.raises(ConfigError, match=r"^energy: its own score \['energy'\] has the name of a detector this run scores"):
        build(configured("[msp,energy]"))
    method, *_ = build(configured("[msp]"))
    assert method.name == "energy"


def test_fitted_tensors_and_numpy_values_are_written_as_numbers() -> None:
    """A `fitted()` that returns its buffer (`{"train_norm": self.train_norm}`) or a NumPy statistic reached
    results.jsonl as the strings "tensor(1.5000)" and "2.5"; they are numbers and lists now."""
    import numpy as np

    from ood.evaluation.evaluator import plain

    fitted = {"norm": torch.tensor(1.5), "margins": torch.tensor([0.25, -2.0], dtype=torch.float64),
              "quantile": np.float32(2.5), "counts": np.array([[1, 2]]), "seen": np.bool_(True)}
    assert plain({"fitted": fitted}) == {"fitted": {"norm": 1.5, "margins": [0.25, -2.0], "quantile": 2.5,
                                                    "counts": [[1, 2]], "seen": True}}


def test_methods_read_no_datamodule_and_write_no_hparams() -> None:
    """Fit-time data reaches a method through `prepare(FitData)`, fitted values through `fitted()`: no file under
    ood/methods/ reaches through the trainer for the DataModule or writes into its hyper-parameters."""
    import re

    import ood.methods

    files = sorted(Path(ood.methods.__file__).parent.rglob("*.py"))
    assert len(files) > 5
    for path in files:
        text = path.read_text()
        assert "trainer.datamodule" not in text, f"{path.name} reads trainer.datamodule"
        assert not re.search(r"hparams\[[^\]]+\]\s*=[^=]", text), f"{path.name} writes into its hparams"


def test_hyper_parameters_are_written_as_plain_values() -> None:
    """`method_params` in results.jsonl: containers as lists and dicts, a `_partial_: true` factory (OAL's teacher
    backbone) as its target and keywords, a class as its import path; never a Python repr."""
    from functools import partial

    from omegaconf import OmegaConf

    from ood.evaluation.evaluator import plain
    from ood.models import SmallCNN

    hparams = {"teacher": {"backbone": partial(SmallCNN, width=64, feature_dim=128), "ckpt": None},
               "cls": SmallCNN, "sizes": OmegaConf.create([1, 2]), "pair": (0.5, "a")}
    assert plain(hparams) == {"teacher": {"backbone": {"_target_": "ood.models.small_cnn.SmallCNN", "width": 64,
                                                       "feature_dim": 128}, "ckpt": None},
                              "cls": "ood.models.small_cnn.SmallCNN", "sizes": [1, 2], "pair": [0.5, "a"]}


def test_detectors_fit_and_score_in_full_float32_whatever_the_callers_matmul_precision() -> None:
    """A script following Lightning's Ampere hint (`torch.set_float32_matmul_precision("high")`: TF32 matmuls on a
    GPU) had every detector's distances and projections computed in TF32; the evaluation now runs at "highest" and
    puts the caller's setting back."""
    seen = []

    class Spy(_NormGap):
        def ood_score(self, bank: FeatureBank) -> torch.Tensor:
            seen.append(torch.get_float32_matmul_precision())
            return super().ood_score(bank)

    method = Spy()
    method.train_norm.fill_(1.0)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        Evaluator(detectors=["msp"]).evaluate(method, synthetic_banks(), [EvalSplit("test", "id_test"),
                                                                           EvalSplit("ood", "ood", "far")], "synthetic")
        assert seen and set(seen) == {"highest"} and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)
