"""Checkpoints a run can trust: written atomically, carrying the config and the RNG state, found from a short name.

- `AtomicCheckpoint`: Lightning's `ModelCheckpoint` writing `<file>.tmp`, flushing it and renaming it onto the file
  (neither a crash nor a power loss leaves a half-written or empty checkpoint).
- `RunState`: the flattened resolved config in every checkpoint, the method's hyper-parameters as builtins (so
  Lightning's weights-only load accepts the file on resume), and the global RNG states (torch, NumPy, Python,
  and the current GPU's on CUDA) across a resume, so an interrupted and resumed run draws the same augmentations as
  an uninterrupted one.
- `BestValAccuracy` (`evaluation.weights=best_val_acc`): `checkpoints/best.ckpt`, the weights of the epoch of
  highest ID-val accuracy (`val/acc`), written atomically as `last.ckpt` is; a later epoch that ties replaces it
  (OpenOOD's recorder keeps `acc >= best_acc`), and a resumed run keeps the best so far (its state is in `last.ckpt`).
- `StopAtSigterm`: a single-process run stops at its next step once SIGTERM came (`ood.termination`), its last
  complete checkpoint standing.
- `resolve_ckpt_path`: `ckpt_path=last` / a run folder / a file -> the checkpoint file, with one-line errors; a run
  folder's `last.ckpt` or `best.ckpt` as `evaluation.weights` says (`WEIGHTS_FILES`).
- `resume_warnings_off`: around a resumed fit, Lightning's warnings about the checkpoint folder, which a resume as
  ood does it always meets, stay off the console.

What needs neither torch nor Lightning (the config a checkpoint was trained with, what `ood-eval ckpt_path=<run>`
takes from the training run's command line) is `ood.runs.trained`, which the entry points import at start-up.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from ood.errors import CheckpointError, ConfigError
from ood.evaluation.evaluator import plain
from ood.files import durable_replace, read_torch_file
from ood.runs.failures import resumed_checkpoint
from ood.runs.identity import WEIGHTS_FILES, untracked_best
from ood.runs.trained import trained_weights
from ood.termination import stop_if_terminated
from ood.utils import get_logger

log = get_logger(__name__)


def _rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and builtins (Lightning resumes with `torch.load(weights_only=True)`), with the
    current GPU's once the run uses CUDA (the on-device crop / flip and dropout draw from it)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


class AtomicCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` that writes `<file>.tmp` and renames it onto the file (Lightning's own save goes through
    an fsspec transaction whose temporary file lives in /tmp, so the final move may be a copy).

    Configured with `save_top_k=1, monitor=None, filename="last", every_n_epochs=N`: `checkpoints/last.ckpt` is
    replaced every N epochs (Lightning's `save_last` only follows top-k saves, so never with `save_top_k=0`), at the
    epoch's end also when the epoch does not validate (`trainer.check_val_every_n_epoch` > 1, where Lightning saves
    after validations only, so `last.ckpt` lagged the weights the run evaluated).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("monitor") is None:
            kwargs.setdefault("save_on_train_epoch_end", True)
        super().__init__(*args, **kwargs)

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        for logger in trainer.loggers:  # what was logged up to the checkpoint is on disk when it lands (CSVLogger)
            logger.save()
        tmp = f"{filepath}.tmp"
        super()._save_checkpoint(trainer, tmp)
        if trainer.is_global_zero:
            durable_replace(tmp, filepath)  # flushed first: a power loss kept the rename, not the data (0 bytes)
        trainer.strategy.barrier("AtomicCheckpoint")


class BestValAccuracy(AtomicCheckpoint):
    """`checkpoints/best.ckpt`: the weights of the epoch of highest `val/acc` (the ID-val accuracy `OODMethod` logs,
    averaged over DDP ranks, so every rank takes the same decision), what OpenOOD evaluates (`best.ckpt` of its
    `BaseRecorder`). A tie replaces the file, as OpenOOD's `val_metrics['acc'] >= self.best_acc` does (Lightning's
    own comparison is strict). Listed before the `last.ckpt` callback (Lightning keeps the order of checkpoint
    callbacks), so `last.ckpt` holds this epoch's best score and a resume from it keeps the best so far; a resume
    from another run folder copies that run's `best.ckpt` (the one beside the resumed file, so also of a run folder
    copied elsewhere) into this one's. No epoch before `first_complete_epoch` is kept (the method's: heatmap's CE
    phase), and a fit none of whose epochs from there validates is refused before it starts. A validation without
    `val/acc` (a method whose `validation_step` logs none, no ID-val batches) is refused in one line."""

    def __init__(self, dirpath: str | Path, first_complete_epoch: int = 0) -> None:
        super().__init__(dirpath=dirpath, filename="best", monitor="val/acc", mode="max", save_top_k=1,
                         every_n_epochs=1, save_last=False, enable_version_counter=False, auto_insert_metric_name=False)
        self._restored = False
        self._carried: str | None = None  # the best.ckpt of the run folder a resume from another folder continues
        #: the first epoch (0-based) whose weights are the whole trained method (`OODMethod.first_complete_epoch`)
        self.first_complete_epoch = first_complete_epoch

    def check_monitor_top_k(self, trainer: Trainer, current: torch.Tensor | None = None) -> bool:
        # a method whose first epochs train only a part of it offers none of them (heatmap's CE phase, its decoder
        # untrained, would win as the frozen classifier's accuracy stops changing)
        if current is None or trainer.current_epoch < self.first_complete_epoch:
            return False
        if self.best_model_score is None:
            return True
        return trainer.strategy.reduce_boolean_decision(bool(current >= self.best_model_score))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = True
        moved = state_dict.get("dirpath", self.dirpath) != self.dirpath
        super().load_state_dict(state_dict)
        if moved and state_dict.get("best_model_score") is not None:  # Lightning keeps only the path then
            self._carried, self.best_model_score = state_dict["best_model_path"], state_dict["best_model_score"]

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.ckpt_path is not None and not self._restored:
            raise untracked_best(trainer.ckpt_path)
        every, epochs, first = trainer.check_val_every_n_epoch, trainer.max_epochs, self.first_complete_epoch
        # the first epoch that validates and may be kept ends at the first multiple of `every` above `first`; a fit
        # that ends before it was refused only once the training was over ("no epoch's weights were kept")
        if every and epochs is not None and epochs >= 0 and -(-(first + 1) // every) * every > epochs:
            if not first:
                raise ConfigError(f"evaluation.weights=best_val_acc keeps the epoch of best ID-val accuracy, but "
                                  f"trainer.check_val_every_n_epoch={every} validates none of "
                                  f"trainer.max_epochs={epochs}: lower it, or use evaluation.weights=last")
            raise ConfigError(f"evaluation.weights=best_val_acc keeps the epoch of best ID-val accuracy from epoch "
                              f"{first} on (0-based; the method trains only a part of itself before it, heatmap's "
                              f"method.classifier_epochs), but trainer.max_epochs={epochs} with "
                              f"trainer.check_val_every_n_epoch={every} validates none of those: raise "
                              "trainer.max_epochs, or use evaluation.weights=last")
        if self._carried is None:
            return
        target = os.path.join(str(self.dirpath), f"{self.filename}.ckpt")
        # the best.ckpt beside the resumed file, written with it: a run folder copied elsewhere (off a cluster) names
        # its old path, gone or since replaced by a longer training there
        beside = Path(str(trainer.ckpt_path)).with_name(f"{self.filename}.ckpt")
        carried = beside if beside.is_file() else Path(self._carried)
        if not carried.is_file():  # on every rank: one rank alone raising would leave the others waiting
            raise CheckpointError(f"{trainer.ckpt_path} continues a run whose best-epoch weights ({beside.name} beside "
                                  f"it, or {self._carried}) are gone: resume it in its own folder, or train anew")
        if trainer.is_global_zero and carried.resolve() != Path(target).resolve():
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(carried, f"{target}.tmp")
            durable_replace(f"{target}.tmp", target)
        trainer.strategy.barrier("BestValAccuracy")
        self.best_model_path = self.kth_best_model_path = target
        self.best_k_models = {target: self.best_model_score}
        self.kth_value = self.best_model_score

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking and self.monitor not in trainer.callback_metrics:
            raise ConfigError(f"evaluation.weights=best_val_acc keeps the epoch of best {self.monitor}, which method "
                              f"{getattr(pl_module, 'name', type(pl_module).__name__)} does not log in validation_step: "
                              f"log it, or use evaluation.weights=last")
        super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        every = trainer.check_val_every_n_epoch
        validated = bool(every) and (trainer.current_epoch + 1) % every == 0  # this epoch's validation ran, if any
        if self.best_model_score is None and validated and not sum(trainer.num_val_batches):
            raise ConfigError("evaluation.weights=best_val_acc keeps the epoch of best ID-val accuracy, but the ID-val "
                              "split gave no batches: give the benchmark a val split, or use evaluation.weights=last")
        super().on_train_epoch_end(trainer, pl_module)


def checkpoint_epoch(path: str | Path) -> int | None:
    """The epoch (0-based, as the CSV log's) whose end saved the Lightning checkpoint `path`; None for a file without
    one (OpenOOD's `best.ckpt`, a bare state dict)."""
    ckpt = read_torch_file(path, mmap=True)
    return int(ckpt["epoch"]) if isinstance(ckpt, Mapping) and "epoch" in ckpt else None


class RunState(Callback):
    """Puts the flattened resolved config into every checkpoint (`hyper_parameters["config"]`, beside the method's
    hyper-parameters as builtins: `ood.evaluation.evaluator.plain`) and carries the global RNG states (torch, NumPy,
    Python) across a resume.

    The states are restored as the checkpoint is loaded: between that and the creation of the next epoch's
    training iterator nothing draws random numbers (Lightning isolates the RNG around its sanity check), just as
    nothing does between the save and that point in the uninterrupted run.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # the method's hyper-parameters as builtins: a `_partial_: true` factory (OAL's teacher backbone, heatmap's
        # classifier optimizer) pickled as itself made Lightning's weights-only load refuse the file on resume
        checkpoint["hyper_parameters"] = {**plain(checkpoint.get("hyper_parameters") or {}), "config": self.config}

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng" in state_dict:
            _set_rng_state(state_dict["rng"])


class StopAtSigterm(Callback):
    """`stop_if_terminated` (`ood.termination`) before each training, validation and test step of a single-process
    run: also a signal that came before Lightning registered its handler (setup, checkpoint restore), which
    Lightning's flag misses. Several ranks stop together through ood's `DDPStrategy` instead (one rank alone would
    leave the others waiting)."""

    def _check(self, trainer: Trainer) -> None:
        if trainer.world_size == 1:
            stop_if_terminated()

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        self._check(trainer)

    def on_validation_batch_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        self._check(trainer)

    def on_test_batch_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        self._check(trainer)


#: Lightning's warnings about the checkpoint folder on every resume: into the folder that holds the checkpoint (the
#: file it continues), and into a new folder (the best-k state it "won't reload", which a monitor-less `last.ckpt`
#: lacks); either read like a fault
RESUME_WARNINGS = (r"Checkpoint directory .* exists and is not empty", r"The dirpath has changed from ")


@contextlib.contextmanager
def resume_warnings_off() -> Iterator[None]:
    """`RESUME_WARNINGS` ignored inside (around a resumed `trainer.fit`; DDP ranks take the filters with them,
    `ood.strategies`). A fit from scratch into a folder with a checkpoint still gets the first: it replaces that file."""
    with warnings.catch_warnings():
        for message in RESUME_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


def resolve_ckpt_path(
    ckpt_path: str | None, output_dir: str | Path, runs_dir: str | Path, own_only: bool = False,
    sweep_dir: str | Path | None = None, weights: str | None = "last",
) -> str | None:
    """The checkpoint file `ckpt_path` means.

    `weights` (`evaluation.weights`): the file a run folder gives (`last.ckpt`, or `best.ckpt` for `best_val_acc`);
    None (an evaluation's default, `ood-eval` or `ood-train train=false`: `ood.train.evaluated_weights`): the one its
    training evaluated (`ood.runs.trained.trained_weights`). A training run resumes from `last.ckpt` (`weights=last`,
    the default).

    `last`: `<output_dir>/checkpoints/last.ckpt` when it exists (a rerun into the same folder, e.g. a multirun
    with a fixed `hydra.sweep.dir`); else, when `own_only` (a job of a sweep, or a folder whose earlier attempt died
    before its first checkpoint: another run's checkpoint is not this one's), the checkpoint this folder's run resumed
    (`resumed.json`), or None (start from scratch); else the newest `*/checkpoints/last.ckpt` under `runs_dir`. A folder: its `checkpoints/last.ckpt`. A file: itself.
    A job of a sweep (`sweep_dir`: its `hydra.sweep.dir`) whose sweep folder holds no job's checkpoint, in a folder without an earlier
    attempt (`config.yaml`), is a new sweep, every job from scratch: a warning says how to resume the stopped one (its
    folder, `hydra.sweep.dir=`), the usual mistake; a job requeued by `hydra/launcher=slurm` before any checkpoint
    was saved is no such mistake.
    """
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        own = Path(output_dir) / "checkpoints" / "last.ckpt"
        if own.is_file():
            return str(own)
        earlier = (Path(output_dir) / "config.yaml").is_file()  # an attempt here before: a requeue, a rerun in place
        # the jobs' folders may lie deeper than one level (hydra.sweep.subdir=a/b)
        if sweep_dir is not None and not earlier and not any(Path(sweep_dir).rglob("checkpoints/last.ckpt")):
            log.warning("ckpt_path=last: the sweep folder %s holds no checkpoint, so this job starts from scratch; a "
                        "stopped sweep resumes only rerun into its own folder: add hydra.sweep.dir=<its folder>",
                        sweep_dir)
            return None
        if own_only:
            # this folder's run resumed another folder's checkpoint and saved none of its own yet: that one (trainer=ddp's
            # ranks 1.. start once rank 0 wrote config.yaml and resumed.json, and trained from scratch beside it)
            resumed = resumed_checkpoint(output_dir)
            if resumed is not None and resumed.is_file():
                log.info("ckpt_path=last resumes %s, which %s resumed", resumed, output_dir)
                return str(resumed)
            log.info("ckpt_path=last: no checkpoint in %s yet, training starts from scratch", output_dir)
            return None
        found = sorted(Path(runs_dir).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise CheckpointError(f"ckpt_path=last: no checkpoints/last.ckpt in {output_dir} or under {runs_dir}/*/")
        log.info("ckpt_path=last resumes %s", found[-1])
        return str(_run_checkpoint(found[-1].parent.parent, weights))
    path = Path(ckpt_path)
    if path.is_dir():
        inner = path / "checkpoints" / "last.ckpt"
        if not inner.is_file():
            resumed = resumed_checkpoint(path)
            if resumed is not None:  # resumed a finished run: no epoch left to train, so no checkpoint of its own
                raise CheckpointError(
                    f"{path} has no checkpoints/last.ckpt: it resumed {resumed} and saved no checkpoint of its own "
                    f"(training was done, or it stopped before its first epoch ended): pass ckpt_path={resumed}")
            # a sweep's folder: its jobs are the run folders
            jobs = sorted(str(p.parent.parent) for p in path.glob("*/checkpoints/last.ckpt"))
            fix = (f"it holds {len(jobs)} run folder(s) with one: pass one, e.g. ckpt_path={jobs[0]}" if jobs
                   else "pass ckpt_path=<run folder> or the .ckpt file")
            raise CheckpointError(f"{path} is a folder without checkpoints/last.ckpt: {fix}")
        return str(_run_checkpoint(path, weights))
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (pass a run folder or its checkpoints/last.ckpt)")
    return str(path)


def _run_checkpoint(run: Path, weights: str | None) -> Path:
    """The checkpoint of the run folder `run` (which has a `checkpoints/last.ckpt`) that `weights` names; None: the
    one its training evaluated."""
    chosen = trained_weights(run) if weights is None else weights
    file = run / "checkpoints" / WEIGHTS_FILES[chosen]
    if not file.is_file():
        how = ("it was trained with evaluation.weights=last" if trained_weights(run) == "last" else
               "no epoch of it was validated yet")
        raise CheckpointError(f"{run} has no checkpoints/{file.name} ({how}): pass evaluation.weights=last, or "
                              "ckpt_path=<its checkpoints/last.ckpt>")
    return file


def own_checkpoint_epoch(ckpt_path: str | None, output_dir: str | Path) -> int | None:
    """The epoch whose end saved `ckpt_path` when it is the run folder's own `checkpoints/last.ckpt` (a resume of
    this run: its CSV log continues), else None."""
    if ckpt_path is None or Path(ckpt_path).resolve() != (Path(output_dir) / "checkpoints" / "last.ckpt").resolve():
        return None
    epoch = read_torch_file(ckpt_path, mmap=True).get("epoch")
    return int(epoch) if epoch is not None else None
