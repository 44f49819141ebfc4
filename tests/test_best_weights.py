"""`evaluation.weights=best_val_acc`: the epoch of highest ID-val accuracy is kept in `checkpoints/best.ckpt` and
evaluated, as OpenOOD evaluates its `best.ckpt` (a later epoch wins a tie: its recorder's `acc >= best_acc`); a resume
keeps the best so far; `ood-eval ckpt_path=<run>` evaluates the same file; what cannot work is refused in one line.

The callback's rules are tested on a scripted module (`val/acc` of each epoch given, < 1 s each); the run itself on
digits (`slow`)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from helpers import FAST, NO_FIGURES, compose_config, run_config
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ood.errors import CheckpointError, ConfigError
from ood.models.checkpoint import read_weights_file
from ood.runs.checkpoints import AtomicCheckpoint, BestValAccuracy, resolve_ckpt_path
from ood.runs.checks import check_run
from ood.runs.identity import read_identity
from ood.train import build


class Scripted(L.LightningModule):
    """Logs the given `val/acc` at each epoch (None: logs none); one SGD step an epoch, so each epoch's weights differ."""

    def __init__(self, accs: Sequence[float | None], val_size: int = 2) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.accs, self.val_size = list(accs), val_size
        self.weights: dict[int, float] = {}  # epoch -> the weight validated then

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).sum()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.weights[self.current_epoch] = self.layer.weight.item()
        if self.accs[self.current_epoch] is not None:
            self.log("val/acc", self.accs[self.current_epoch])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.ones(2, 1)), batch_size=2)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.ones(self.val_size, 1)), batch_size=2)


def fit(folder: Path, module: Scripted, epochs: int, ckpt_path: str | None = None, best: bool = True,
        check_val_every_n_epoch: int = 1) -> BestValAccuracy:
    """Fit as `ood-train` does: the best-epoch callback before `last.ckpt`'s (`ood.train.build`)."""
    keep = BestValAccuracy(folder / "checkpoints", getattr(module, "first_complete_epoch", 0))
    last = AtomicCheckpoint(dirpath=folder / "checkpoints", filename="last", monitor=None, save_top_k=1,
                            every_n_epochs=1, enable_version_counter=False)
    trainer = L.Trainer(max_epochs=epochs, callbacks=[keep, last] if best else [last], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        accelerator="cpu", check_val_every_n_epoch=check_val_every_n_epoch)
    trainer.fit(module, ckpt_path=ckpt_path)
    return keep


def saved(path: Path) -> tuple[int, float]:
    """(epoch, weight) of a checkpoint of `Scripted`."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt["epoch"], ckpt["state_dict"]["layer.weight"].item()


def test_the_best_epoch_is_kept_and_a_later_tie_replaces_it(tmp_path: Path) -> None:
    """Epochs 1 and 2 tie at 0.7: OpenOOD's recorder keeps epoch 2 (`>=`), Lightning's strict `>` would keep 1."""
    module = Scripted([0.5, 0.7, 0.7, 0.6])
    fit(tmp_path, module, 4)
    assert saved(tmp_path / "checkpoints" / "best.ckpt") == (2, pytest.approx(module.weights[2]))
    assert saved(tmp_path / "checkpoints" / "last.ckpt")[0] == 3
    assert module.weights[2] != module.weights[3]


def test_validating_every_other_epoch_keeps_last_ckpt_at_the_last_epoch(tmp_path: Path) -> None:
    """`trainer.check_val_every_n_epoch=2`, 3 epochs: best.ckpt is the one validated epoch (1); last.ckpt was epoch 1
    too (Lightning saved it after validations only), not the epoch-2 weights the run evaluated and a resume or
    `ood-eval ckpt_path=<run>` should continue from; now epoch 2, with the best score in its state."""
    module = Scripted([0.5, 0.7, 0.6])
    fit(tmp_path, module, 3, check_val_every_n_epoch=2)
    assert saved(tmp_path / "checkpoints" / "best.ckpt") == (1, pytest.approx(module.weights[1]))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2 and last["state_dict"]["layer.weight"].item() == pytest.approx(module.layer.weight.item())
    assert [s["best_model_score"].item() for k, s in last["callbacks"].items() if k.startswith("BestValAccuracy")] == [
        pytest.approx(0.7)]


def test_a_resumed_run_keeps_the_best_so_far(tmp_path: Path) -> None:
    """Stopped after epoch 1 (0.9, the best), resumed from `last.ckpt` to epoch 3: epoch 2's 0.7 does not replace
    the best (a resume that forgot the score would keep epoch 2). Resumed into another run folder, the best so far
    comes along (copied into that folder's checkpoints/)."""
    accs = [0.5, 0.9, 0.7, 0.6]
    first = Scripted(accs)
    fit(tmp_path / "a", first, 2)
    fit(tmp_path / "a", Scripted(accs), 4, ckpt_path=str(tmp_path / "a" / "checkpoints" / "last.ckpt"))
    assert saved(tmp_path / "a" / "checkpoints" / "best.ckpt") == (1, pytest.approx(first.weights[1]))
    elsewhere = Scripted(accs)
    fit(tmp_path / "b", elsewhere, 2)
    keep = fit(tmp_path / "c", Scripted(accs), 4, ckpt_path=str(tmp_path / "b" / "checkpoints" / "last.ckpt"))
    assert keep.best_model_path == str((tmp_path / "c" / "checkpoints" / "best.ckpt").resolve())
    assert saved(tmp_path / "c" / "checkpoints" / "best.ckpt") == (1, pytest.approx(elsewhere.weights[1]))


def test_a_copied_run_folder_resumes_with_the_best_beside_its_checkpoint(tmp_path: Path) -> None:
    """A run folder copied elsewhere (off a cluster) and resumed from there: its checkpoint names the old folder's
    best.ckpt, which had since been replaced by a longer training there (its epoch 2 was copied into the new run) or
    was gone (the resume in the copy's own folder was refused, "resume it in its own folder"); now the best.ckpt
    beside the resumed last.ckpt is the one kept."""
    accs = [0.5, 0.9, 0.7, 0.6]
    first = Scripted(accs)
    fit(tmp_path / "a", first, 2)
    for copy in ("b", "c"):
        shutil.copytree(tmp_path / "a", tmp_path / copy)
    fit(tmp_path / "a", Scripted([0.5, 0.9, 1.0, 0.6]), 4, ckpt_path=str(tmp_path / "a" / "checkpoints" / "last.ckpt"))
    fit(tmp_path / "d", Scripted(accs), 4, ckpt_path=str(tmp_path / "b" / "checkpoints" / "last.ckpt"))
    assert saved(tmp_path / "d" / "checkpoints" / "best.ckpt") == (1, pytest.approx(first.weights[1]))
    shutil.rmtree(tmp_path / "a")
    fit(tmp_path / "c", Scripted(accs), 4, ckpt_path=str(tmp_path / "c" / "checkpoints" / "last.ckpt"))
    assert saved(tmp_path / "c" / "checkpoints" / "best.ckpt") == (1, pytest.approx(first.weights[1]))


def test_what_cannot_choose_an_epoch_is_refused_in_one_line(tmp_path: Path) -> None:
    """No `val/acc` logged, no ID-val batches, `trainer.limit_val_batches=0`, a checkpoint trained without the
    switch resumed with it, an unknown value: each a one-line ConfigError naming the way out."""
    with pytest.raises(ConfigError, match=r"does not log in validation_step: log it, or use evaluation.weights=last"):
        fit(tmp_path / "a", Scripted([None, None]), 2)
    with pytest.raises(ConfigError, match=r"the ID-val split gave no batches"):
        fit(tmp_path / "b", Scripted([0.5, 0.5], val_size=0), 2)
    fit(tmp_path / "c", Scripted([0.5, 0.5]), 1, best=False)
    with pytest.raises(ConfigError, match=r"trained with evaluation.weights=last, so its epochs' ID-val accuracy"):
        fit(tmp_path / "c", Scripted([0.5, 0.5]), 2, ckpt_path=str(tmp_path / "c" / "checkpoints" / "last.ckpt"))
    with pytest.raises(ConfigError) as err:
        check_run(compose_config(tmp_path, ["evaluation.weights=best_val_acc", "+trainer.limit_val_batches=0"]), None)
    assert str(err.value) == ("evaluation.weights=best_val_acc keeps the epoch of best ID-val accuracy, but "
                              "trainer.limit_val_batches=0 validates no epoch: drop one of them")
    with pytest.raises(ConfigError, match=r"^evaluation.weights=best is unknown; choices: last, best_val_acc$"):
        check_run(compose_config(tmp_path, ["evaluation.weights=best"]), None)


def test_validating_every_other_epoch_refuses_before_training_what_cannot_choose(tmp_path: Path) -> None:
    """With `trainer.check_val_every_n_epoch=2`, one epoch (no validation at all) and an empty ID-val split were
    refused only after the whole training ("no epoch's weights were kept"), the latter not by the epoch-end check
    (it looked at every-epoch validation only); now before the first epoch, and at the first validating epoch."""
    with pytest.raises(ConfigError, match=r"^evaluation.weights=best_val_acc keeps the epoch of best ID-val accuracy, "
                       r"but trainer.check_val_every_n_epoch=2 validates none of trainer.max_epochs=1: lower it, or "
                       r"use evaluation.weights=last$"):
        fit(tmp_path / "a", Scripted([0.5]), 1, check_val_every_n_epoch=2)
    assert not (tmp_path / "a" / "checkpoints").exists()
    module = Scripted([0.5, 0.5, 0.5, 0.5], val_size=0)
    with pytest.raises(ConfigError, match=r"the ID-val split gave no batches"):
        fit(tmp_path / "b", module, 4, check_val_every_n_epoch=2)
    assert module.current_epoch == 1


def test_a_run_folder_gives_the_checkpoint_its_training_evaluated(tmp_path: Path) -> None:
    """`ood-eval ckpt_path=<run>` (evaluation.weights=null): `best.ckpt` of a run trained with best_val_acc (its
    config.yaml), `last.ckpt` otherwise or when asked; a resume always `last.ckpt`; best_val_acc of a run without
    one is refused."""
    for name, weights in (("best", "best_val_acc"), ("plain", "last")):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "config.yaml").write_text(f"evaluation:\n  weights: {weights}\n")
        for file in ("last.ckpt", "best.ckpt") if weights != "last" else ("last.ckpt",):
            (tmp_path / name / "checkpoints" / file).write_bytes(b"")
    best, plain = tmp_path / "best", tmp_path / "plain"
    assert resolve_ckpt_path(str(best), tmp_path, tmp_path, weights=None) == str(best / "checkpoints" / "best.ckpt")
    assert resolve_ckpt_path(str(best), tmp_path, tmp_path) == str(best / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path(str(plain), tmp_path, tmp_path, weights=None) == str(plain / "checkpoints" / "last.ckpt")
    with pytest.raises(CheckpointError, match=r"has no checkpoints/best.ckpt \(it was trained with evaluation.weights=last\)"):
        resolve_ckpt_path(str(plain), tmp_path, tmp_path, weights="best_val_acc")


def test_an_evaluation_without_training_reads_the_file_its_training_evaluated(tmp_path: Path) -> None:
    """`ood-train train=false ckpt_path=<run>` (train.yaml's `evaluation.weights=last`, a training's default) evaluated
    `last.ckpt` of a run trained with best_val_acc, where `ood-eval ckpt_path=<run>` evaluated its `best.ckpt`; now
    both `best.ckpt`, and `last.ckpt` where the command line names `evaluation.weights=last`. The files are unreadable
    stand-ins: the one-line error names the file the run chose."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("evaluation:\n  weights: best_val_acc\n")
    for file in ("last.ckpt", "best.ckpt"):
        (run / "checkpoints" / file).write_bytes(b"")

    def evaluated(overrides: list[str], config_name: str = "train") -> str:
        with pytest.raises(CheckpointError, match=r"^could not read checkpoint ") as err:
            run_config(tmp_path / "eval", [f"ckpt_path={run}", *overrides], config_name)
        return str(err.value).split()[4].rstrip(":")

    best, last = str(run / "checkpoints" / "best.ckpt"), str(run / "checkpoints" / "last.ckpt")
    assert evaluated(["train=false"]) == best
    assert evaluated([], config_name="eval") == best
    assert evaluated(["train=false", "evaluation.weights=last"]) == last
    assert evaluated(["evaluation.weights=last"], config_name="eval") == last


def test_a_run_folder_given_as_weights_names_its_best_ckpt(tmp_path: Path) -> None:
    """A run folder where a checkpoint file belongs (`method.init.ckpt=<run>`) was answered "did you mean
    <run>/checkpoints/last.ckpt?" also for a run trained with best_val_acc, whose evaluation read its best.ckpt; now
    both files are named, best.ckpt first (a plain run's last.ckpt alone, as before)."""
    for name, files in (("best", ("last.ckpt", "best.ckpt")), ("plain", ("last.ckpt",))):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        for file in files:
            (tmp_path / name / "checkpoints" / file).write_bytes(b"")
    best, plain = tmp_path / "best", tmp_path / "plain"
    with pytest.raises(CheckpointError) as err:
        read_weights_file(best)
    assert str(err.value) == (f"{best} is a folder, not a checkpoint file; did you mean {best}/checkpoints/best.ckpt "
                              f"(the epoch its evaluation read) or {best}/checkpoints/last.ckpt?")
    with pytest.raises(CheckpointError) as err:
        read_weights_file(plain)
    assert str(err.value) == f"{plain} is a folder, not a checkpoint file; did you mean {plain}/checkpoints/last.ckpt?"


class FlipHead(L.Callback):
    """Negates the classifier's last layer as epoch `epoch` validates: its accuracy falls to about nothing, so the
    last epoch is not the best."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch and not trainer.sanity_checking:
            head = [m for m in pl_module.modules() if isinstance(m, nn.Linear)][-1]
            with torch.no_grad():
                head.weight.neg_()
                head.bias.neg_()


@pytest.mark.slow
def test_the_run_evaluates_the_best_epoch_and_ood_eval_the_same_file(tmp_path: Path) -> None:
    """Two digits epochs, the second's head flipped: the rows are epoch 0's weights (`evaluated_epoch: 0`), the same
    rows and scores as `ood-eval ckpt_path=<run>`, which picks `best.ckpt`; `evaluation.weights=last` evaluates the
    flipped last epoch (other accuracy, no `evaluated_epoch`)."""
    run = tmp_path / "run"
    common = [*FAST, "trainer.max_epochs=2", "detectors.names=[msp]", "logger=none", NO_FIGURES]
    rows = run_config(run, [*common, "evaluation.weights=best_val_acc", "+callbacks.flip._target_=test_best_weights.FlipHead",
                            "+callbacks.flip.epoch=1"])
    assert {r["evaluated_epoch"] for r in rows} == {0}
    assert torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)["epoch"] == 0
    scores = dict(np.load(run / "scores.npz"))
    again = run_config(tmp_path / "eval", [*common, f"ckpt_path={run}"], config_name="eval")
    assert again == rows
    assert run_config(tmp_path / "train_false", [*common, f"ckpt_path={run}", "train=false"]) == rows  # ood-train's
    assert all(np.array_equal(v, np.load(tmp_path / "eval" / "scores.npz")[k]) for k, v in scores.items())
    last = run_config(tmp_path / "last", [*common, f"ckpt_path={run}", "evaluation.weights=last"], config_name="eval")
    assert "evaluated_epoch" not in last[0] and last[0]["id_acc"] < rows[0]["id_acc"] - 0.1
    # ood-report: the evaluation of best.ckpt is the training run's model, that of last.ckpt another
    trained, evaluated, flipped = (json.loads((d / "identity.json").read_text()) for d in (run, tmp_path / "eval", tmp_path / "last"))
    assert trained["model"] == evaluated["model"] == str((run / "checkpoints" / "best.ckpt").resolve())
    assert trained["config"] == evaluated["config"] and trained["config"]["evaluation.weights"] == "best_val_acc"
    assert flipped["model"].endswith("last.ckpt") and "evaluation.weights" not in flipped["config"]
    moved = shutil.copytree(run, tmp_path / "copied")  # off a cluster: its model is its own best.ckpt there
    assert read_identity(moved).model == str((moved / "checkpoints" / "best.ckpt").resolve())


def test_the_best_epoch_callback_comes_before_the_last_checkpoint(tmp_path: Path) -> None:
    """`ood.train.build` lists `BestValAccuracy` before the `last.ckpt` callback, so `last.ckpt` holds the epoch's best
    score (`test_a_resumed_run_keeps_the_best_so_far`); none with `evaluation.weights=last` (the default)."""
    _, _, trainer, _ = build(compose_config(tmp_path, ["evaluation.weights=best_val_acc"]))
    assert [type(c).__name__ for c in trainer.checkpoint_callbacks] == ["BestValAccuracy", "AtomicCheckpoint"]
    _, _, trainer, _ = build(compose_config(tmp_path, []))
    assert [type(c).__name__ for c in trainer.checkpoint_callbacks] == ["AtomicCheckpoint"]


def test_no_epoch_before_the_methods_first_complete_epoch_is_kept(tmp_path: Path) -> None:
    """heatmap with a CE phase (`method.classifier_epochs`): its classifier's accuracy peaks in that phase and stays
    frozen after, so best.ckpt was a CE-phase epoch with an untrained decoder; epochs before the method's
    `first_complete_epoch` are never kept."""
    module = Scripted([0.5, 0.9, 0.8, 0.8])
    module.first_complete_epoch = 2
    fit(tmp_path, module, 4)
    assert saved(tmp_path / "checkpoints" / "best.ckpt") == (3, module.weights[3])


def test_a_fit_that_ends_before_the_methods_first_complete_epoch_validates_is_refused_before_training(
        tmp_path: Path) -> None:
    """heatmap with `method.classifier_epochs` >= `trainer.max_epochs` (its decoder never trains a validated epoch)
    trained to the end and then failed ("no epoch's weights were kept (none): no validation ran", though every
    epoch validated); now refused before the first epoch in one line. `ood.train.build` gives the callback the
    method's first complete epoch (it read it through the trainer); a fit with a validated epoch from there runs."""
    module = Scripted([0.5, 0.9])
    module.first_complete_epoch = 2
    with pytest.raises(ConfigError, match=r"^evaluation.weights=best_val_acc keeps the epoch of best ID-val accuracy "
                       r"from epoch 2 on \(0-based; the method trains only a part of itself before it, heatmap's "
                       r"method.classifier_epochs\), but trainer.max_epochs=2 with trainer.check_val_every_n_epoch=1 "
                       r"validates none of those: raise trainer.max_epochs, or use evaluation.weights=last$"):
        fit(tmp_path / "a", module, 2)
    assert module.weights == {} and not (tmp_path / "a" / "checkpoints").exists()
    module = Scripted([0.5, 0.9, 0.8])
    module.first_complete_epoch = 2
    with pytest.raises(ConfigError, match=r"from epoch 2 on .* trainer.max_epochs=3 with "
                                          r"trainer.check_val_every_n_epoch=2 validates none of those"):
        fit(tmp_path / "b", module, 3, check_val_every_n_epoch=2)
    module = Scripted([0.5, 0.9, 0.8, 0.7])
    module.first_complete_epoch = 2
    fit(tmp_path / "c", module, 4, check_val_every_n_epoch=2)
    assert saved(tmp_path / "c" / "checkpoints" / "best.ckpt") == (3, module.weights[3])
    heatmap = ["method=heatmap", "method.classifier_epochs=3", "evaluation.weights=best_val_acc"]
    _, _, trainer, _ = build(compose_config(tmp_path / "d", heatmap))
    assert trainer.checkpoint_callbacks[0].first_complete_epoch == 3
