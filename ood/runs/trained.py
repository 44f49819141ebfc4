"""What the entry points read of a training run before a run starts, without importing torch or Lightning (at
start-up: `ood-eval` reads its command line here before Hydra starts):

- `training_overrides`: what `ood-eval ckpt_path=<run>` takes from the training run's command line.
- `checkpoint_config`: the config a checkpoint was trained with (torch is imported when it reads one).
- `trained_weights`: which of a run folder's checkpoints its training evaluated (`evaluation.weights`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ood.files import read_torch_file
from ood.runs.identity import TRAINING_KEYS

#: the training run's overrides `ood-eval` adopts (and every key under the groups), unless its command line names them;
#: `detectors` / `detectors.names`: the selection the run evaluated (a detector named at training by its import path,
#: `my_detectors.FeatureNorm`, had to be named again; a `detectors=fast` run was re-evaluated with `all`)
ADOPTED = ("experiment", "method", "data", "backbone", "paths.data_dir", "detectors", "detectors.names")
#: the environment variable through which `ood-eval` tells its run which overrides it added (`check_evaluated`)
ADOPTED_ENV = "OOD_EVAL_ADOPTED"


def training_overrides(argv: Sequence[str]) -> tuple[list[Path], list[str]]:
    """The run folders `ckpt_path=` names in `argv` (run folders, or checkpoints in their `checkpoints/`) and the
    overrides of their training command line that say what they trained, for `ood-eval` to use as its own: `method=`,
    `data=`, `backbone=` (and their sub-groups, `method/teacher=`), their keys, `paths.data_dir` and the detectors it
    evaluated (`detectors=`, `detectors.names=`, unless the command line names `detectors.names=` or `detectors=`); not
    training-only keys (`TRAINING_KEYS`: batches, augmentation, outliers, starting weights) nor `method.init` (weights
    the checkpoint replaces). An override whose key the command line names (`key=`, `~key`), or one under a group it
    names, is left out. A training `experiment=` is taken whole when the command line names none of method, data,
    backbone and is a single run; otherwise (a post-hoc `method=grood` on a preset's run: the preset's method keys would
    not fit it; a multirun: a preset's `hydra.sweep.dir` would put the evaluation into the training runs' folders) the
    groups it chose are taken instead (`.hydra/hydra.yaml`), with the detectors the run evaluated (its `config.yaml`'s
    `detectors.names`: a preset's own selection). So `ood-eval ckpt_path=<run of ood-train method=oe
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
        # the preset's own selection (`detectors.names` in its body, over its `override /detectors: none`) goes with
        # it: without it `detectors=none` left the method's score alone where the run evaluated msp, energy, ...
        names = _evaluated_detectors(run)
        if "detectors.names" not in adopted and wanted("detectors.names") and names is not None:
            adopted["detectors.names"] = f"detectors.names={names}"
    return list(adopted.values())


def _evaluated_detectors(run: Path) -> str | None:
    """The run's `detectors.names` (its `config.yaml`) as an override value (`[msp,energy]`, `all`); None without
    one."""
    config = run / "config.yaml"
    names = OmegaConf.select(OmegaConf.load(config), "detectors.names") if config.is_file() else None
    if names is None:
        return None
    return f"[{','.join(str(n) for n in names)}]" if OmegaConf.is_list(names) else str(names)


def run_folder(ckpt_path: str | Path) -> Path | None:
    """The run folder of `ckpt_path` (the folder itself, or the one above its `checkpoints/`) when it holds the
    run's command line (`.hydra/overrides.yaml`); else None."""
    path = Path(ckpt_path)
    run = path if path.is_dir() else path.parent.parent if path.parent.name == "checkpoints" else None
    return run if run is not None and (run / ".hydra" / "overrides.yaml").is_file() else None


def run_command_line(run: Path) -> list[str]:
    """The overrides `run` was started with (Hydra's `.hydra/overrides.yaml`, a job's own values in a sweep)."""
    return [str(o) for o in OmegaConf.load(run / ".hydra" / "overrides.yaml")]


def checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The flattened config stored in a checkpoint by `RunState` (empty for other checkpoints)."""
    ckpt = read_torch_file(path, mmap=True)  # only its stored config is read
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    return dict((hparams or {}).get("config") or {})


def trained_weights(run: Path) -> str:
    """The `evaluation.weights` the run folder `run` was trained with (its `config.yaml`): `last` or `best_val_acc`;
    `last` for a folder without one, or from before the key."""
    config = run / "config.yaml"
    return str(OmegaConf.select(OmegaConf.load(config), "evaluation.weights", default="last") or "last") \
        if config.is_file() else "last"
