"""Checkpoints a run can trust: written atomically, carrying the config and the RNG state, found from a short name.

- `AtomicCheckpoint`: Lightning's `ModelCheckpoint` writing `<file>.tmp`, flushing it and renaming it onto the file
  (neither a crash nor a power loss leaves a half-written or empty checkpoint).
- `RunState`: the flattened resolved config in every checkpoint, the method's hyper-parameters as builtins (so
  Lightning's weights-only load accepts the file on resume), and the global RNG states (torch, NumPy, Python,
  and the current GPU's on CUDA) across a resume, so an interrupted and resumed run draws the same augmentations as
  an uninterrupted one.
- `resolve_ckpt_path`: `ckpt_path=last` / a run folder / a file -> the checkpoint file, with one-line errors.
- `checkpoint_config`: the config a checkpoint was trained with.
- `training_overrides`: what `ood-eval ckpt_path=<run>` takes from the training run's command line.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from ood.errors import CheckpointError
from ood.evaluation.evaluator import plain
from ood.files import durable_replace
from ood.runs.identity import TRAINING_KEYS
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
    replaced every N epochs (Lightning's `save_last` only follows top-k saves, so never with `save_top_k=0`).
    """

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        for logger in trainer.loggers:  # what was logged up to the checkpoint is on disk when it lands (CSVLogger)
            logger.save()
        tmp = f"{filepath}.tmp"
        super()._save_checkpoint(trainer, tmp)
        if trainer.is_global_zero:
            durable_replace(tmp, filepath)  # flushed first: a power loss kept the rename, not the data (0 bytes)
        trainer.strategy.barrier("AtomicCheckpoint")


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


def resolve_ckpt_path(
    ckpt_path: str | None, output_dir: str | Path, runs_dir: str | Path, own_only: bool = False
) -> str | None:
    """The checkpoint file `ckpt_path` means.

    `last`: `<output_dir>/checkpoints/last.ckpt` when it exists (a rerun into the same folder, e.g. a multirun
    with a fixed `hydra.sweep.dir`); else None (start from scratch) when `own_only` (a job of a sweep, or a folder
    whose earlier attempt died before its first checkpoint: another run's checkpoint is not this one's), else the
    newest `*/checkpoints/last.ckpt` under `runs_dir`. A folder: its `checkpoints/last.ckpt`. A file: itself.
    """
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        own = Path(output_dir) / "checkpoints" / "last.ckpt"
        if own.is_file():
            return str(own)
        if own_only:
            log.info("ckpt_path=last: no checkpoint in %s yet, training starts from scratch", output_dir)
            return None
        found = sorted(Path(runs_dir).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise CheckpointError(f"ckpt_path=last: no checkpoints/last.ckpt in {output_dir} or under {runs_dir}/*/")
        log.info("ckpt_path=last resumes %s", found[-1])
        return str(found[-1])
    path = Path(ckpt_path)
    if path.is_dir():
        inner = path / "checkpoints" / "last.ckpt"
        if not inner.is_file():
            # a sweep's folder: its jobs are the run folders
            jobs = sorted(str(p.parent.parent) for p in path.glob("*/checkpoints/last.ckpt"))
            fix = (f"it holds {len(jobs)} run folder(s) with one: pass one, e.g. ckpt_path={jobs[0]}" if jobs
                   else "pass ckpt_path=<run folder> or the .ckpt file")
            raise CheckpointError(f"{path} is a folder without checkpoints/last.ckpt: {fix}")
        return str(inner)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (pass a run folder or its checkpoints/last.ckpt)")
    return str(path)


#: the training run's overrides `ood-eval` adopts (and every key under the groups), unless its command line names them
ADOPTED = ("experiment", "method", "data", "backbone", "paths.data_dir")
#: the environment variable through which `ood-eval` tells its run which overrides it added (`check_evaluated`)
ADOPTED_ENV = "OOD_EVAL_ADOPTED"


def training_overrides(argv: Sequence[str]) -> tuple[list[Path], list[str]]:
    """The run folders `ckpt_path=` names in `argv` (run folders, or checkpoints in their `checkpoints/`) and the
    overrides of their training command line that say what they trained, for `ood-eval` to use as its own: `method=`,
    `data=`, `backbone=` (and their sub-groups, `method/teacher=`), their keys and `paths.data_dir`; not
    training-only keys (`TRAINING_KEYS`: batches, augmentation, outliers, starting weights) nor `method.init` (weights
    the checkpoint replaces). An override whose key the command line names (`key=`, `~key`), or one under a group it
    names, is left out. A training `experiment=` is taken whole when the command line names none of method, data,
    backbone and is a single run; otherwise (a post-hoc `method=grood` on a preset's run: the preset's method keys would
    not fit it; a multirun: a preset's `hydra.sweep.dir` would put the evaluation into the training runs' folders) the
    groups it chose are taken instead (`.hydra/hydra.yaml`). So `ood-eval ckpt_path=<run of ood-train method=oe
    data=cifar10>` evaluates OE on CIFAR-10, not the default CE on digits. A multirun over checkpoints
    (`-m ckpt_path=<run0>,<run1>`: a training sweep's seeds) takes them only when every run trained alike (the same
    overrides to take), as the overrides apply to every job. Nothing is taken for an interpolated `ckpt_path`,
    `last`, or a checkpoint outside a run folder (no `.hydra/overrides.yaml`)."""
    overrides = [arg for arg in argv if not arg.startswith("-") and ("=" in arg or arg.startswith("~"))]
    named = [arg.partition("=")[0].lstrip("+~") for arg in overrides]
    multirun = any(arg in ("-m", "--multirun") for arg in argv)
    ckpt = [arg for arg in overrides if arg.partition("=")[0].lstrip("+") == "ckpt_path"]
    if len(ckpt) != 1 or "experiment" in named:
        return [], []
    paths = _checkpoint_values(ckpt[0], multirun)
    runs = [run_folder(p) for p in paths if "${" not in p and p not in ("last", "null")]
    if not paths or len(runs) != len(paths) or None in runs:
        return [], []
    taken = [_trained_overrides(run, named, multirun) for run in runs]  # type: ignore[arg-type]
    return (runs, taken[0]) if all(t == taken[0] for t in taken) else ([], [])  # type: ignore[return-value]


def _checkpoint_values(override: str, multirun: bool) -> list[str]:
    """The checkpoint paths of a `ckpt_path=` override: one, or a multirun's sweep of them; none where Hydra's parser
    cannot tell (it reports the syntax itself) or for a sweep without `-m`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides([override])[0]
        if not parsed.is_sweep_override():
            return [str(parsed.value())]
        return list(parsed.sweep_string_iterator()) if multirun else []
    except HydraException:
        return []


def _trained_overrides(run: Path, named: Sequence[str], multirun: bool) -> list[str]:
    """What `training_overrides` takes from one run folder, given the keys the command line `named`."""

    def under(key: str, node: str) -> bool:
        return key == node or key.startswith((f"{node}.", f"{node}/"))

    def wanted(key: str) -> bool:
        return (
            (key in ADOPTED or key.startswith(("method.", "data.", "backbone.", "method/", "data/", "backbone/")))
            and not key.startswith((*TRAINING_KEYS, "method.init"))
            and not any(under(key, n) for n in named)
        )

    trained = {o.partition("=")[0].lstrip("+~"): o for o in run_command_line(run)}
    adopted = {key: o for key, o in trained.items() if wanted(key)}
    whole = not any(under(g, n) for g in ("method", "data", "backbone") for n in named)
    chosen = run / ".hydra" / "hydra.yaml"
    if "experiment" in adopted and (not whole or multirun) and chosen.is_file():
        del adopted["experiment"]
        choices = OmegaConf.load(chosen).hydra.runtime.choices
        for group, option in choices.items():
            if group not in adopted and option is not None and wanted(group) and group != "experiment":
                adopted[group] = f"{group}={option}"
    return list(adopted.values())


def run_folder(ckpt_path: str | Path) -> Path | None:
    """The run folder of `ckpt_path` (the folder itself, or the one above its `checkpoints/`) when it holds the
    run's command line (`.hydra/overrides.yaml`); else None."""
    path = Path(ckpt_path)
    run = path if path.is_dir() else path.parent.parent if path.parent.name == "checkpoints" else None
    return run if run is not None and (run / ".hydra" / "overrides.yaml").is_file() else None


def run_command_line(run: Path) -> list[str]:
    """The overrides `run` was started with (Hydra's `.hydra/overrides.yaml`, a job's own values in a sweep)."""
    return [str(o) for o in OmegaConf.load(run / ".hydra" / "overrides.yaml")]


def own_checkpoint_epoch(ckpt_path: str | None, output_dir: str | Path) -> int | None:
    """The epoch whose end saved `ckpt_path` when it is the run folder's own `checkpoints/last.ckpt` (a resume of
    this run: its CSV log continues), else None."""
    if ckpt_path is None or Path(ckpt_path).resolve() != (Path(output_dir) / "checkpoints" / "last.ckpt").resolve():
        return None
    epoch = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True).get("epoch")
    return int(epoch) if epoch is not None else None


def checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The flattened config stored in a checkpoint by `RunState` (empty for other checkpoints)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # only its stored config is read
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CheckpointError(f"could not read checkpoint {path}: {type(err).__name__}: {err}") from err
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    return dict((hparams or {}).get("config") or {})
