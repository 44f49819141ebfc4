"""Checks before a run starts, each failing with one line that says what to type instead.

- `check_overrides`: a misspelt `key=value` override names the closest real key, a sweep without `-m` says what a
  list is, a word where the config holds a number or a boolean (`seed=abc`) names the expected type, and a word in
  place of a config node (`method.optimizer=sgd`) names its keys, and an unknown option of a config group
  (`method=cel`) names the closest one and the choices, before Hydra composes (and long before `int(seed)`).
- `check_run`: refuses `trainer.max_epochs < 1`, a GPU preset without a GPU, an evaluation without a checkpoint of
  a method whose score needs its training (`OODMethod.trained_parts`), and resuming with a different
  `trainer.max_epochs` (a per-epoch cosine's `T_max` lives in the checkpoint and would not follow; a per-step one would jump) or any other
  change of the configuration or seed (`check_resume`).
- `check_evaluated`: refuses evaluating a checkpoint with data, a backbone or a method other than its training run's
  unless the command line names the difference (the default `data=digits` of a forgotten `data=` would otherwise score a
  checkpoint on the wrong data whenever the class counts agree).
- `check_launch`: refuses a Hydra multirun with the subprocess DDP launcher.
- `check_eval_dir`: refuses `ood-eval hydra.run.dir=<a training run's folder>` before Hydra writes there.
- `check_timm_preprocessing` (from `check_run`): warns when `backbone=timm` loads `backbone.weights` and the data
  config's mean / std (or interpolation) differ from timm's pretrained config of that model; `ood.evaluate` of a
  timm model object on a benchmark compares the model's own `pretrained_cfg` alike.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import os
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from ood.errors import CheckpointError, ConfigError, check_range
from ood.runs.identity import (
    ADDED_KEYS,
    EVALUATION_KEYS,
    IDENTITY_FILE,
    NAME_GROUPS,
    TRAINING_KEYS,
    WEIGHTS_FILES,
    flat_config,
    flatten,
    identity,
    read_identity,
    seed_keys,
    spelled_now,
    untracked_best,
)
from ood.runs.trained import ADOPTED_ENV, checkpoint_config
from ood.utils import get_logger

log = get_logger(__name__)


def check_run(cfg: DictConfig, ckpt_path: str | None, given: Sequence[str] = ()) -> None:
    """Refuse configurations that would waste a run: no epochs, a seed NumPy cannot take, a GPU preset without a GPU,
    a changed schedule, a checkpoint evaluated on other data than it was trained on unless `given` (the command
    line's overrides) asks."""
    check_values(cfg)
    import torch  # at call: `check_overrides` runs at the entry points' start-up, before they import torch

    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but no GPU is available: this preset needs a GPU; "
            "add trainer=cpu to try it on CPU"
        )
    max_epochs = cfg.trainer.get("max_epochs")
    if cfg.train and ckpt_path is not None:
        stored = checkpoint_config(ckpt_path)
        if not stored:  # no run's config: another program's file (Lightning failed on it with a KeyError traceback)
            raise CheckpointError(
                f"checkpoint {ckpt_path} holds no ood run's config (another program's file, or a run of ood before it "
                f"could resume), so there is no run to resume: start a new run from its weights with "
                f"{_override('method.init.ckpt', ckpt_path)} instead of ckpt_path="
            )
        before = stored.get("trainer.max_epochs")
        if before is not None and int(before) != int(max_epochs):
            raise ConfigError(
                f"checkpoint {ckpt_path} was trained for trainer.max_epochs={before}; resuming with "
                f"trainer.max_epochs={max_epochs} would keep its learning-rate schedule (annealed over {before} epochs). Resume with "
                f"trainer.max_epochs={before}, or start a new run from its weights: "
                f"{_override('method.init.ckpt', ckpt_path)} without ckpt_path (another hydra.run.dir)"
            )
        check_resume(cfg, stored, ckpt_path)
    if not cfg.train and ckpt_path is not None:
        check_evaluated(cfg, checkpoint_config(ckpt_path), ckpt_path, given)
    if ckpt_path is None:  # a checkpoint's network was trained on the data config's preprocessing
        check_timm_preprocessing(cfg)
    if not cfg.train and ckpt_path is None:  # evaluated from backbone.weights: the method's own parts untrained
        from hydra.utils import get_class

        parts = untrained_parts(cfg.method)
        if parts:
            files = "".join(f" or give {o}" for o in part_file_overrides(cfg.method, parts))
            raise ConfigError(f"method {get_class(cfg.method._target_).name!r} scores with parts trained with the "
                              f"network ({', '.join(parts)}), which backbone.weights does not hold: evaluate a "
                              f"checkpoint of its training run (ckpt_path=<run folder>){files}")


def _data_preprocessing(cfg: DictConfig) -> tuple[str, dict[str, Any], bool]:
    """(key prefix, {mean, std, interpolation}, whether the node has an `interpolation` key): what the data config
    normalises and resizes with, known before any image is read. A benchmark node's (`data.benchmark.*`; a null mean
    / std is its class's own, CIFAR's dataset statistics; ood's benchmarks resize bilinearly), else the folder
    data's (`data.*`, whose nulls are the timm model's own: `ood.data.folder.resolve_preprocessing`). A value left
    out is unknown (data=digits: its pixel statistics) or the model's own."""
    from hydra.utils import get_class

    node, prefix = (cfg.data.benchmark, "data.benchmark.") if "benchmark" in cfg.data else (cfg.data, "data.")
    target = str(node.get("_target_", ""))
    values = {key: node.get(key) for key in ("mean", "std", "interpolation") if node.get(key) is not None}
    if prefix == "data.benchmark.":
        try:
            cls = get_class(target)
        except (ImportError, ValueError):  # the build says so, in its own words
            cls = None
        for key in ("mean", "std"):
            own = getattr(cls, key, None) if key in node and key not in values else None
            if isinstance(own, tuple):
                values[key] = own
        if "interpolation" not in node and target.startswith("ood.data."):
            values["interpolation"] = "bilinear"
    return prefix, values, "interpolation" in node


#: (architecture, timm's preprocessing, the data config's) that `check_timm_preprocessing` warned of for a model object:
#: said once per process (a training loop calling `ood.evaluate` each epoch was warned each epoch)
_TIMM_SAID: set[tuple[str, str, str]] = set()


def check_timm_preprocessing(cfg: DictConfig, pretrained: Mapping[str, Any] | None = None) -> None:
    """Warn, before any image is read, when `backbone=timm` loads `backbone.weights` and the data config normalises
    (or resizes) otherwise than timm's pretrained config of that model: ViT-B/16's is mean = std = 0.5, bicubic, while
    data=imagenet200 gives ImageNet's mean / std, bilinear, which silently degrades timm-pretrained weights (data=folder
    and `ood.evaluate(model, id_data=<folders>)` take timm's config). Not for a name timm has no config of, nor for
    weights trained here (`backbone.weights=null`), nor for a resize alone that the data config has no key for.
    `pretrained`: the `pretrained_cfg` of the timm model object `ood.evaluate(model, benchmark=...)` was given,
    compared alike, its remedy written as that call's `overrides=[...]`; said once per process for one architecture
    and the two preprocessings, and said to matter only for timm's pretrained weights (a timm model built with
    `pretrained=False` keeps its `pretrained_cfg`, though trained with the benchmark's normalisation)."""
    backbone = cfg.get("backbone") or {}
    python_api = pretrained is not None
    if not python_api:
        if backbone.get("library") != "timm" or backbone.get("weights") is None or not backbone.get("name"):
            return
        try:
            import timm
        except ImportError:  # the backbone's build says what to install
            return
        try:
            found = timm.get_pretrained_cfg(backbone.name)
        except RuntimeError:  # an unknown pretrained tag: the backbone's build names the model's tags
            return
        if found is None:
            return
        pretrained = {key: getattr(found, key) for key in ("mean", "std", "interpolation")}
    prefix, data, has_interpolation = _data_preprocessing(cfg)
    theirs = {key: pretrained.get(key) for key in ("mean", "std", "interpolation")}

    def differs(key: str) -> bool:
        ours, want = data.get(key), theirs[key]
        if ours is None or not want:
            return False
        if key == "interpolation":
            return ours != want
        ours = list(ours) * len(want) if len(ours) == 1 else list(ours)  # one value: every channel's
        return len(ours) != len(want) or any(abs(a - b) > 1e-3 for a, b in zip(ours, want, strict=True))

    keys = [key for key in ("mean", "std", "interpolation") if differs(key)]
    settable = [key for key in keys if key != "interpolation" or has_interpolation]
    if not settable:  # the resize alone, which the data config cannot change: a warning at every run, no remedy
        return
    overrides = [f"{prefix}{key}={_hydra_value(theirs[key])}" for key in settable]
    fixes = f"overrides={overrides}" if python_api else " ".join(map(shlex.quote, overrides))
    if len(settable) < len(keys):
        folder = "id_data=<folders> take timm's " if python_api else "data=folder takes data.interpolation="
        fixes += f" (its {data['interpolation']} resize has no key: {folder}{theirs['interpolation']})"

    def said(values: Mapping[str, Any]) -> str:
        return ", ".join(f"{key}={values[key] if key == 'interpolation' else list(values[key])}" for key in keys)

    if python_api:
        architecture = pretrained.get("architecture") or "no architecture"
        if (architecture, said(theirs), said(data)) in _TIMM_SAID:
            return
        _TIMM_SAID.add((architecture, said(theirs), said(data)))
        who = f"the model's timm pretrained_cfg ({architecture})"
        advice = ("it matters only for timm's pretrained weights (a model trained with the benchmark's own "
                  "normalisation, from scratch as timm's pretrained=False or fine-tuned, can ignore it); for those")
        fixes += "; said once per process for this architecture and normalisation"
    else:
        who = f"backbone=timm backbone.name={backbone.name} loads backbone.weights; timm's pretrained config of that model"
        advice = ("if the weights were trained with timm's preprocessing (timm's own pretrained ones; weights you "
                  "fine-tuned may not be)")
    log.warning("%s preprocesses with %s, the data config with %s: %s, use timm's: %s", who, said(theirs), said(data),
                advice, fixes)


def check_values(cfg: DictConfig) -> None:
    """The part of `check_run` that reads the configuration alone (no checkpoint, GPU or file): epochs, seed,
    full-spectrum switch, `evaluation.weights`. A sweep runs it on every job's config before the first job starts
    (`ood.runs.sweeps.check_sweep_jobs`), where a SLURM job's GPU is not there to be seen."""
    max_epochs = cfg.trainer.get("max_epochs")
    if cfg.train and (max_epochs is None or int(max_epochs) < 1):
        raise ConfigError(f"trainer.max_epochs={max_epochs}: must be >= 1 (Lightning's -1 would train forever)")
    if cfg.train:  # a fraction failed Lightning's assertion (no message) after the run folder was made
        check_range("trainer.max_epochs", max_epochs, 1, integer=True)
    # NumPy's bounds, whole numbers: Lightning's seed_everything raises past them, torch.manual_seed on a fraction
    check_range("seed", cfg.get("seed"), 0, 2**32 - 1, integer=True)
    if cfg.get("evaluate", True) and OmegaConf.select(cfg, "evaluation.fsood") and not OmegaConf.select(cfg, "data.csid"):
        # a data config without the switch trained the whole run, then found no csid set to score
        raise ConfigError(
            "evaluation.fsood=true but the data config loads no covariate-shifted ID sets (data.csid is not true): "
            "give it `csid: ${oc.select:evaluation.fsood,false}` as ood's data configs and conf/data/base/files.yaml "
            "do, or add data.csid=true"
        )
    check_weights(cfg)


def part_file_overrides(method: DictConfig, parts: Sequence[str]) -> list[str]:
    """The overrides that give the files of `parts` (`part_files`), as Hydra takes them: `+method.<key>=<file>` where
    the method's config lacks the key (method=heatmap's decoder_ckpt), `method.<key>=<file>` where it holds it (a
    `???`, as experiment=heatmap_released's)."""
    from hydra.utils import get_class

    files = getattr(get_class(method._target_), "part_files", {})
    held = list(method)  # its keys, a `???` one too (`in` leaves those out)
    return [f"{'' if files[p] in held else '+'}method.{files[p]}=<file>" for p in parts if p in files]


def untrained_parts(method: DictConfig) -> list[str]:
    """The parts the configured method's score reads that only its training gives (`OODMethod.trained_parts`) and no
    file of its configuration fills (`part_files`: heatmap's `method.decoder_ckpt`, the authors' decoder file): what a
    checkpoint must hold beyond the network. The method class's own list is not it: with its decoder file,
    `method=heatmap` is complete from `backbone.weights` or a released classifier file."""
    from hydra.utils import get_class

    cls = get_class(method._target_)
    files = getattr(cls, "part_files", {})
    return [part for part in getattr(cls, "trained_parts", ())
            if part not in files or OmegaConf.select(method, files[part], throw_on_missing=False) is None]


def check_weights(cfg: DictConfig) -> None:
    """Refuse an unknown `evaluation.weights`, and `best_val_acc` for a training without ID validation
    (`trainer.limit_val_batches=0`: no epoch would have an accuracy to choose by)."""
    weights = (cfg.get("evaluation") or {}).get("weights", "last")
    choices = [*WEIGHTS_FILES, *([] if cfg.train else [None])]
    if weights not in choices:
        shown = ", ".join("null" if c is None else c for c in choices)
        raise ConfigError(f"evaluation.weights={_hydra_value(weights)} is unknown; choices: {shown}")
    if cfg.train and weights == "best_val_acc" and cfg.trainer.get("limit_val_batches") == 0:
        raise ConfigError("evaluation.weights=best_val_acc keeps the epoch of best ID-val accuracy, but "
                          "trainer.limit_val_batches=0 validates no epoch: drop one of them")


def check_evaluated(cfg: DictConfig, stored: Mapping[str, Any], ckpt_path: str, given: Sequence[str]) -> None:
    """Refuse evaluating a checkpoint with a `data.*` or `backbone.*` value or a method class other than its training
    run's (training-only keys aside: batches, augmentation, outliers, starting weights; a forgotten `method=` labels an
    OE or LogitNorm network's rows `ce`) unless the command line `given` sets that key or
    a node above it (`data=...`, `data.benchmark.protocol=...`) or an `experiment=` preset; asked-for differences are
    logged; an override `ood-eval` took from the training run's command line (`ADOPTED_ENV`) asks for no
    difference, and a relative path it made absolute is none. Keys only one side has, and checkpoints without a stored
    config (another framework's), are not compared."""
    if not stored:
        return
    changed = _evaluated_changes(cfg, stored, lambda k: k.startswith(("data.", "backbone.")) or k == "method._target_")
    flat = flat_config(cfg)
    changed = {k: v for k, v in changed.items() if not _made_absolute(flat.get(k), stored[k])}
    adopted = set(json.loads(os.environ.get(ADOPTED_ENV, "[]")))  # what `ood-eval` took from the run asks nothing
    named = [arg.partition("=")[0].lstrip("+~") for arg in given if arg not in adopted]
    unasked = {k: v for k, v in changed.items()
               if "experiment" not in named and not any(k == n or k.startswith(f"{n}.") for n in named)}
    listed = list((unasked or changed).values())
    shown = ", ".join(listed[:3]) + (f" and {len(listed) - 3} more" if len(listed) > 3 else "")
    if unasked:
        names = _trained_names(ckpt_path)
        # the training values of the keys that differ: `data=digits` alone composes their defaults, not these
        keys = [_override(k, stored[k]) for k in unasked if k != "method._target_"]
        again = (f"ood-eval {' '.join([*(f'{g}={n}' for g, n in zip(NAME_GROUPS, names) if n), *keys])} "
                 f"ckpt_path={ckpt_path}" if names else
                 "the method=, data= and backbone= options it was trained with" + (f" and {' '.join(keys)}" if keys else ""))
        raise ConfigError(
            f"checkpoint {ckpt_path} was trained with {shown}: pass {again}, or name the keys on the command line to "
            "evaluate it so on purpose"
        )
    if changed:
        log.info("evaluating %s with %s, as asked", ckpt_path, shown)


def _trained_names(ckpt_path: str) -> list[str]:
    """The config-group options (`NAME_GROUPS`: method, data, backbone) the run that wrote `ckpt_path` was composed
    with, read from its run folder's identity; [] for a checkpoint outside a run folder."""
    trained = Path(ckpt_path).parent.parent
    return read_identity(trained).names if (trained / IDENTITY_FILE).is_file() else []


def _override(key: str, value: Any) -> str:
    """`key=value` as one shell word that Hydra reads back as `value` (a string it would read as another type, or
    with characters its grammar or the shell would take, such as a space or a comma, quoted for both)."""
    return shlex.quote(f"{key}={_hydra_value(value)}")


def _hydra_value(value: Any) -> str:
    """`value` in Hydra's override grammar. Hydra's own parser decides whether a string may go bare: YAML's reading
    (kept '1e-4', 'inf' and 'nan' strings, which Hydra reads as floats) and JSON's (quoted dict keys, which Hydra's
    dicts refuse; `Infinity`, which Hydra reads as a string) are not Hydra's."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # inf, -inf, nan
    if not isinstance(value, str):
        return json.dumps(value)
    if re.fullmatch(r"[\w./@:+-]+", value) and OverridesParser.create().parse_override(f"k={value}").value() == value:
        return value
    # Hydra's quoted strings: a backslash escapes only before a quote (or the closing one)
    return '"' + re.sub(r'(\\*)("|$)', lambda m: m[1] * 2 + ("\\" + m[2] if m[2] else ""), value) + '"'


def _made_absolute(now: Any, then: Any) -> bool:
    """Whether `now` is the relative path `then` made absolute (`ood-eval` anchors a run's relative paths at the
    folder its training started in: the same files, not a difference to report)."""
    if not (isinstance(now, str) and isinstance(then, str)) or Path(then).is_absolute() or not Path(now).is_absolute():
        return False
    parts = Path(then).parts
    return bool(parts) and Path(now).parts[-len(parts):] == parts


def as_trained_paths(cfg: DictConfig, stored: Mapping[str, Any]) -> DictConfig:
    """`cfg` with each path `ood-eval` made absolute (`_made_absolute`) at the evaluated checkpoint's own relative
    value: the evaluation's identity (ood-report's grouping, wandb's group) is then its training run's, as when it is
    started from the folder the training started in (its rows stood beside the run's as another configuration)."""
    flat = flat_config(cfg)
    back = {k: stored[k] for k in flat.keys() & stored.keys() if _made_absolute(flat[k], stored[k])}
    if not back:
        return cfg
    out = cfg.copy()
    for key, value in back.items():
        OmegaConf.update(out, key, value)
    return out


def method_changes(cfg: DictConfig, stored: Mapping[str, Any]) -> str:
    """The `method.*` values an evaluated checkpoint was trained with where `cfg` differs (`method.objective=supcon
    (now ce)`; training-only keys aside), or "": what a checkpoint that does not fit the configured method needs."""
    return ", ".join(_evaluated_changes(cfg, stored, lambda k: k.startswith("method.")).values())


def _evaluated_changes(cfg: DictConfig, stored: Mapping[str, Any], compared: Callable[[str], bool]) -> dict[str, str]:
    """`key -> "key=stored (now current)"` for the `compared` configuration keys, training-only keys aside, that
    differ between `cfg` and a checkpoint's `stored` config (keys only one side has are not compared)."""
    seeded = seed_keys(cfg)
    now, then = identity(flat_config(cfg), seeded), identity(spelled_now(stored), seeded)
    return {k: f"{k}={then[k]} (now {now[k]})" for k in sorted(now.keys() & then.keys())
            if compared(k) and not k.startswith(TRAINING_KEYS) and now[k] != then[k]}


#: keys a resumed run may change: `data.bad_images` (the unreadable-image error says to rerun with `skip`, and a run that
#: finished training before an OOD set's unreadable file stopped its evaluation was refused that resume); every file
#: the checkpoint's epochs read decoded, since with `error` an unreadable one stops the run, so skipping the
#: unreadable ones leaves those epochs' data as it was
RESUME_MAY_CHANGE = ("data.bad_images",)


def check_resume(cfg: DictConfig, stored: Mapping[str, Any], ckpt_path: str) -> None:
    """Refuse resuming a checkpoint with another configuration: the seed or a key that names the configuration
    (`ood.runs.identity`: method, backbone, data, epochs; not folders, loader plumbing or `RESUME_MAY_CHANGE`). Lightning restores the
    weights, optimizer, schedule and RNG from the checkpoint: a changed optimizer setting would not be used, a changed
    data or preprocessing key would apply from the resumed epoch on, and either way the run would record only the new
    values. Keys only one side has are not compared; those only this configuration has (added by a newer version, e.g.
    `method.base_temperature`) are named in a warning, since the resumed epochs run with them and the earlier ones did
    not (but the evaluation-only keys, absent at their default; `evaluation.weights=best_val_acc` of a run trained with
    `last` is refused: its epochs' accuracies are unknown); a checkpoint without a stored config (another framework's)
    is refused before (`check_run`)."""
    stored = spelled_now(stored)  # a checkpoint's keys respelled since (`RENAMED_KEYS`) compared and named as today's
    seeded = seed_keys(cfg)
    now, then = identity(flat_config(cfg), seeded), identity(stored, seeded)
    now, then = _added_spelled_out(now, then), _added_spelled_out(then, now)
    differing = [k for k in sorted(now.keys() & then.keys()) if now[k] != then[k] and k not in RESUME_MAY_CHANGE]
    changed = [f"{k}={then[k]} (now {now[k]})" for k in differing]
    settings = [_override(k, stored[k] if k in stored else ADDED_KEYS[k]) for k in differing
                if k not in {f"{g}._target_" for g in NAME_GROUPS}]
    if "seed" in stored and str(stored["seed"]) != str(cfg.get("seed")):
        changed.insert(0, f"seed={stored['seed']} (now {cfg.get('seed')})")
        settings.insert(0, _override("seed", stored["seed"]))
    if changed:
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise ConfigError(
            f"checkpoint {ckpt_path} was trained with {', '.join(changed[:4])}{more}: resuming keeps its weights, "
            "optimizer and schedule, so the finished run would follow neither configuration yet be recorded as the new "
            f"one. Resume with the checkpoint's settings ({_group_options(ckpt_path, differing, settings)}), "
            f"or start a new run from its weights: {_override('method.init.ckpt', ckpt_path)} without ckpt_path (another "
            "hydra.run.dir)"
        )
    # an `EVALUATION_KEYS` key only this run names: the checkpoint's run had it at its default (identities leave it out)
    if now.get("evaluation.weights") == "best_val_acc" and "evaluation.weights" not in then:
        raise untracked_best(ckpt_path)  # (else a "predates" warning, then this at the fit's start)
    new = sorted(k for k in now.keys() - then.keys() if k not in EVALUATION_KEYS)
    if new:
        shown = ", ".join(f"{k}={now[k]}" for k in new[:4]) + (f" and {len(new) - 4} more" if len(new) > 4 else "")
        log.warning("checkpoint %s predates %s: the resumed epochs run with these values, the earlier ones did without "
                    "them", ckpt_path, shown)


def _added_spelled_out(ident: Mapping[str, str], other: Mapping[str, str]) -> dict[str, str]:
    """`ident` (an `identity`) with each `ADDED_KEYS` key that `other` names and it leaves out set to the value that
    applied before the key (its configuration had the key there, or predates it): an identity leaves such a key out,
    so a resume that changed it (`data.drop_last` true -> false) was taken for a new key (a warning) or not seen."""
    return {**{k: json.dumps(ADDED_KEYS[k]) for k in other.keys() - ident.keys() if k in ADDED_KEYS}, **ident}


def _group_options(ckpt_path: str, differing: Sequence[str], settings: Sequence[str]) -> str:
    """`settings` (overrides) after the config-group options (`method=ce`) the run that wrote `ckpt_path` chose where
    this run chose another (or, outside Hydra, all of them); a group whose class differs in `differing`
    (`method._target_`) while the checkpoint names no option is asked for in words: its keys cannot be typed back."""
    trained = dict(zip(NAME_GROUPS, _trained_names(ckpt_path)))
    chosen = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    options = [f"{g}={trained[g]}" for g in NAME_GROUPS if trained.get(g) and trained[g] != chosen.get(g)]
    unknown = [f"{g}=" for g in NAME_GROUPS if not trained.get(g) and f"{g}._target_" in differing]
    typed = " ".join([*options, *settings])
    return f"the {' and '.join(unknown)} it was trained with{', ' if typed else ''}{typed}" if unknown else typed


def _reexecutes_per_rank(strategy: Any) -> bool:
    """Whether `trainer.strategy` starts its ranks by re-executing the command line: Lightning's `ddp` (and its
    `find_unused_parameters` variants), or a
    `DDPStrategy` node with the start method `popen` (its default)."""
    if isinstance(strategy, str):  # "ddp", "ddp_find_unused_parameters_true", ...; not ddp_spawn, ddp_fork, ddp_notebook
        return strategy.startswith("ddp") and not any(m in strategy for m in ("spawn", "fork", "notebook"))
    return (isinstance(strategy, Mapping) and str(strategy.get("_target_", "")).endswith("DDPStrategy")
            and strategy.get("start_method", "popen") == "popen")


def check_launch(cfg: DictConfig, multirun: bool) -> None:
    """Refuse a Hydra multirun with the subprocess DDP launcher: it re-executes the whole sweep per rank."""
    if multirun and _reexecutes_per_rank(cfg.trainer.get("strategy")):
        raise ConfigError(
            "trainer=ddp (subprocess launcher) cannot run inside a Hydra multirun: each rank would re-launch the "
            "sweep. Sweep with one device per job, use ranks the main process starts as trainer=ddp_cpu does "
            "(strategy.start_method=forkserver or spawn), or pre-launch ranks with torchrun/SLURM (see README)."
        )


def check_eval_dir(argv: Sequence[str]) -> None:
    """Refuse an evaluation into a training run's folder (`hydra.run.dir=` one holding `checkpoints/`): Hydra would
    replace the run's `.hydra/` copies and the evaluation its `config.yaml` (read with the checkpoint by `ood-eval`
    and `ood-heatmap`), `results.jsonl`, scores and figures. Checked on the command line, before Hydra starts."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") == "hydra.run.dir" and "${" not in value and (Path(value) / "checkpoints").is_dir():
            raise ConfigError(
                f"hydra.run.dir={value} is a training run's folder: evaluating there would replace its config.yaml "
                "and results; leave hydra.run.dir out (a new folder under logs/eval/) or name another folder"
            )


def parse_overrides(overrides: Sequence[str]) -> list[Any]:
    """`overrides` as Hydra parses them; one that is neither `key=value` nor `~key` (`seed 3`, `detectors.names`:
    Hydra's parse error, with a traceback from `ood.evaluate`, three lines from an entry point) is one line naming it
    and the form to give. Shared by `ood.evaluate` and the entry points (`check_overrides`)."""
    from hydra.errors import HydraException

    if isinstance(overrides, str):  # its characters were taken as overrides, one by one
        raise ConfigError(f"overrides={overrides!r} is one string: give a list, overrides=[{overrides!r}]")
    parser, parsed = OverridesParser.create(), []
    for item in overrides:
        if not isinstance(item, str):
            raise ConfigError(f"overrides holds {item!r}: each override is a 'key=value' string")
        if not item.strip():  # `"$EXTRA"` of an unset variable: "give its value, '=<value>'" said nothing of use
            raise ConfigError(f"an empty override ({item!r}): remove it (a quoted shell variable that is unset gives one)")
        try:
            parsed.append(parser.parse_override(item))
        except HydraException as err:
            fix = re.sub(r"\s*=\s*|\s+", "=", item.strip(), count=1)  # `seed 3`, `seed = 3` -> `seed=3`
            if fix != item and _parses(parser, fix):
                raise ConfigError(f"override {item!r} is not key=value: give {fix!r}") from None
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value: give its value, '{item.strip()}=<value>' "
                                  f"(or '~{item.strip()}' to delete the key)") from None
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"override {item!r} is not key=value as Hydra reads it ({reason}): quote a value with "
                              "spaces or brackets, key='...'") from None
    return parsed


def _parses(parser: Any, override: str) -> bool:
    """Whether Hydra's `parser` reads `override`."""
    from hydra.errors import HydraException

    try:
        parser.parse_override(override)
    except HydraException:
        return False
    return True


#: Hydra's flags after which the other words are no overrides of a run: the shell completion's commands
#: (`-sc install=bash`, and `-sc query=bash`, which its installed completion runs at each Tab) and a rerun from a
#: pickled config (`--experimental-rerun <file>`, which ignores overrides)
HYDRA_COMMANDS = ("-sc", "--shell-completion", "--experimental-rerun")


def check_overrides(config_dir: str | Path, config_name: str, argv: Sequence[str]) -> list[str]:
    """Refuse a misspelt `key=value` override before Hydra does, naming the closest real key (Hydra's own advice,
    `+key=value`, adds the misspelt key and fails later with a TypeError). Returns `argv` with `+` put before an
    override of a new key under a mapping that starts empty (`detectors.params.knn.k=5`, as the detectors' warnings
    write it: Hydra refused it, "Key 'knn' is not in struct")."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    if any(a.startswith(("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir")) for a in argv):
        return list(argv)  # another primary config: Hydra checks its keys
    if any(a in HYDRA_COMMANDS or a.startswith("--experimental-rerun=") for a in argv):
        return list(argv)  # no overrides to check: the shell completion's words, or a rerun that ignores them
    args = override_words(argv)
    overrides = parse_overrides(args)
    if not any(a in ("-m", "--multirun") for a in argv):
        _check_no_sweep(args, overrides, config_dir)
    groups = [o for o in overrides if _is_group(o.key_or_group, config_dir)]
    if not any(o.key_or_group == "hydra.searchpath" for o in overrides):  # more options may live elsewhere
        for o in groups:
            _check_choice(o, Path(config_dir))
    try:
        choices = [
            [f"{o.key_or_group}={v}" for v in (o.sweep_string_iterator() if o.is_sweep_override() else [o.value()])]
            for o in groups
        ]
    except HydraException:
        return list(argv)  # a `glob(...)` sweep of options: Hydra expands and checks it

    known: dict[str, Any] = {}
    open_dicts: set[str] = set()  # empty mappings (`detectors.params: {}`) take any sub-key
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        try:  # a key is known when any swept combination of config groups has it
            for combination in itertools.islice(itertools.product(*choices), 16):
                flat = _all_keys(compose(config_name, list(combination), return_hydra_config=True))
                known.update(flat)
                open_dicts |= {k for k, v in flat.items() if v == {}}
        except Exception:  # noqa: BLE001 - a bad group choice is Hydra's to report
            return list(argv)
        finally:
            GlobalHydra.instance().clear()
    added = set()  # new keys under an empty mapping: Hydra adds them only with `+`
    for arg, o in zip(args, overrides, strict=True):
        key = o.key_or_group
        if o.is_add() or o.is_force_add() or o.is_delete() or _is_group(key, config_dir):
            continue
        parents = {".".join(key.split(".")[:i]) for i in range(1, key.count(".") + 1)}
        if key not in known and parents & open_dicts:
            added.add(arg)
        if key not in known and not parents & open_dicts and not any(k.startswith(key + ".") for k in known):
            close = _closest(key, known)
            hint = f"did you mean {close}=...?" if close else "see `ood-train --cfg job` for the keys"
            raise ConfigError(f"unknown config key {key!r}: {hint} (+{key}=... would add it as a new key)")
        children = sorted(k[len(key) + 1 :] for k in known if k.startswith(key + "."))
        if key not in known and children and isinstance(o.value(), str | int | float | bool) and not o.is_sweep_override():
            keys = ", ".join(children[:4]) + (", ..." if len(children) > 4 else "")
            example = next((c for c in children if not c.startswith("_")), children[0])
            raise ConfigError(f"{key}={o.value()}: {key} is a config node ({keys}); set one of its keys, e.g. {key}.{example}=...")
        if key in known and not key.startswith(FREE_KEYS):
            try:
                values = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
            except HydraException:
                continue  # an interval sweep: the sweeper draws numbers
            for value in values:
                expected = _expected_type(known[key], value)
                if expected:
                    raise ConfigError(
                        f"{key}={value}: expected {expected} (the default is {known[key]!r}); ++{key}={value} forces it"
                    )
    return [f"+{arg}" if arg in added else arg for arg in argv]


def override_words(argv: Sequence[str]) -> list[str]:
    """The overrides of an entry point's command line `argv`: no flags, nor the value of a flag that takes one
    (`--cfg job`)."""
    args, skip = [], False
    for arg in argv:
        if not skip and not arg.startswith("-"):
            args.append(arg)
        skip = arg in ("-c", "--cfg", "-p", "--package", "--info", "-i") and not skip
    return args


def _check_no_sweep(args: Sequence[str], overrides: Sequence[Any], config_dir: str | Path) -> None:
    """Refuse a sweep (`detectors.names=msp,energy`) without `-m` in one line (Hydra's "Ambiguous value" takes five),
    saying how to write a list or a string with commas instead where the key is not a config group."""
    from hydra.core.override_parser.types import ChoiceSweep

    for arg, o in zip(args, overrides, strict=True):
        if o.is_sweep_override():
            key, _, value = arg.partition("=")
            commas = isinstance(o.value(), ChoiceSweep) and o.value().simple_form  # `a,b`, not `choice(a,b)`
            other = f"; a list is {key}=[{value}], a string with commas {key}='{value}'" \
                if commas and not _is_group(o.key_or_group, config_dir) else ""
            raise ConfigError(f"{arg} is a sweep, which runs only with -m{other}")


def _check_choice(override: Any, config_dir: Path) -> None:
    """Refuse an unknown option of one of our config groups (`method=cel`) in one line with the closest option and
    the choices (Hydra's own error is 20 lines with its search path). Hydra's groups (`hydra/launcher=joblib` comes
    from a plugin) are Hydra's to check."""
    folder = config_dir / override.key_or_group
    if override.is_delete() or override.key_or_group.startswith("hydra") or not folder.is_dir():
        return
    try:
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
    except Exception:  # noqa: BLE001 - an unusual sweep form: Hydra reports it
        return
    options = sorted(p.stem for p in folder.glob("*.yaml"))
    for value in values:
        for choice in value if isinstance(value, list) else [value]:
            if isinstance(choice, str) and choice not in options and not choice.startswith("${"):
                close = difflib.get_close_matches(choice, options, n=1, cutoff=0.6)
                hint = f"did you mean {override.key_or_group}={close[0]}? " if close else ""
                # `detectors=msp` (ood.evaluate takes detectors="msp"): the group's configs, or the names key
                names = f"; detectors by name: detectors.names=[{choice}]" if override.key_or_group == "detectors" else ""
                raise ConfigError(f"unknown {override.key_or_group} {choice!r}: {hint}choices: {', '.join(options)}{names}")


#: keys whose values Lightning accepts in several types (`trainer.devices=auto`, `trainer.deterministic=warn`), and
#: Hydra's own
FREE_KEYS = ("trainer.devices", "trainer.precision", "trainer.deterministic", "hydra.")


def _expected_type(default: Any, value: Any) -> str | None:
    """The type a word or list `value` should have had where the config holds the number or boolean `default`, or a
    word where it holds a list (`method.init.freeze=backbone` froze 'b', 'a', ...); None when it fits (numbers for
    numbers, booleans for booleans, null and interpolations anywhere)."""
    if isinstance(value, str) and value.startswith("${"):
        return None
    if isinstance(default, bool) and value is not None and not isinstance(value, bool):
        return "true or false"  # a number too: `evaluation.fsood=2` was taken, as true
    if isinstance(default, list):
        return f"a list, e.g. [{value}]" if isinstance(value, str) else None
    if not isinstance(value, str | list | dict):
        return None
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    return None


def _closest(key: str, known: Mapping[str, Any]) -> str | None:
    """The real key or node nearest a misspelt `key`: among its siblings when its parent exists (`method.lamm` under
    method=ce has none, rather than `method._target_`; `metod` -> `method`), its parent's spelling found first
    (`methd.lam` -> `method.lam`); never a `_target_`-style key. Below a mapping that starts empty any name is a key
    (`detectors.parms.knn.k` -> `detectors.params.knn.k`: `params` has no sub-keys to match `knn` against)."""
    nodes = {".".join(k.split(".")[:i]) for k in known for i in range(1, k.count(".") + 2)}
    nodes = {n for n in nodes if not n.rpartition(".")[2].startswith("_")}
    parent, _, name = key.rpartition(".")
    if parent and parent not in nodes:
        fixed = _closest(parent, known)
        if fixed and any(fixed == k or fixed.startswith(f"{k}.") for k, v in known.items() if v == {}):
            return f"{fixed}.{name}"
        return _closest(f"{fixed}.{name}", known) if fixed else None
    siblings = {n.rpartition(".")[2]: n for n in nodes if n.rpartition(".")[0] == parent}
    return next((siblings[c] for c in difflib.get_close_matches(name, sorted(siblings), n=1, cutoff=0.6)), None)


def _is_group(key: str, config_dir: str | Path) -> bool:
    return "/" in key or (Path(config_dir) / key).is_dir()


def _all_keys(cfg: DictConfig) -> dict[str, Any]:
    """Every flattened key of `cfg` including `hydra.*` (unresolved: only the names matter)."""
    container = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(container, dict)
    return flatten(container)
