"""The identity of a run: which configuration its numbers belong to, whatever the seed.

A run computes its identity once, as it starts, and writes it to `identity.json` in its folder:
- `config`: the flattened resolved config keys that name a configuration (`IDENTITY_PREFIXES`: method and its
  parameters, backbone, data, epochs), without the seed, loader plumbing and starting weights (`NOT_IDENTITY`),
  folders, and the keys whose unresolved value interpolates `${seed}` (OAL's `method.sampling_seed`: they vary with
  the seed); and the evaluation keys that change the numbers when not at their default (`EVALUATION_KEYS`:
  `evaluation.feature_dtype=float16`, `evaluation.weights=best_val_acc`), but not the keys added later at the value
  that applied before (`ADDED_KEYS`: `data.outlier_batch_size=null`, `augment_outliers=true`, `data.drop_last=true`, so earlier runs keep
  their hash), and keys respelled hashed as spelled before (`RENAMED_KEYS`: OAL's per-step cosine, now
  `method/scheduler=openood`). An evaluation run (`train=false`) of a checkpoint takes the training keys
  (`TRAINING_KEYS`: epochs, optimiser, training batches, augmentation, outliers, starting weights) of the run that wrote it, so
  re-evaluating a checkpoint is recognised as the same model; a checkpoint from elsewhere adds `ckpt` = its path
  instead.
- `hash`: 8 hex digits of the SHA-1 of `config` (canonical JSON); `group`: `<method>-<data>-<backbone>-<hash>`, the
  wandb group, so the seeds of one configuration, and only they, share a group.
- `seeded`: the `${seed}` keys left out; `model`: the checkpoint the numbers come from (the run's own
  `checkpoints/last.ckpt`, or `best.ckpt` with `evaluation.weights=best_val_acc`, or the evaluated one, whose
  `evaluation.weights` is the file's: `best_val_acc` for a run's `checkpoints/best.ckpt`, so an `ood-eval` of it is
  the training run's model).

`ood-report` groups runs by `config` and counts each `model` once. `read_identity` re-derives the identity of a run
folder written before `identity.json` existed from its `config.yaml` and Hydra's `.hydra/` copies, with the same
function the run uses.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ood.errors import ConfigError
from ood.files import atomic_write_text
from ood.runs.failures import IDENTITY_FILE as IDENTITY_FILE
from ood.runs.failures import remove_earlier_results

#: flattened-config prefixes that name a configuration (method and its parameters, backbone, data, epochs)
IDENTITY_PREFIXES = ("method.", "backbone.", "data.", "trainer.max_epochs")
#: the data configs' copies of the run's `evaluate` switch (data=folder's `data.evaluate`: OOD sets needed): no
#: configuration (a run trained with evaluate=false is the model `ood-eval ckpt_path=<run>` evaluates) and, as
#: `evaluate` itself (`NOT_SETTINGS`), no setting
SWITCHES = ("data.evaluate",)
#: flattened keys under those prefixes that do not name a configuration: loader plumbing, the starting weights
#: of a fine-tune (one CE run per seed: `method.init.ckpt=.../ce_s${seed}/...` must not split the seeds), `SWITCHES`
NOT_IDENTITY = ("data.num_workers", "data.pin_memory", "data.download", "data.eval_batch_size", "method.init.ckpt",
                "data.csid", *SWITCHES)
#: evaluation keys that change the numbers -> their default: part of the identity only when set otherwise, so a
#: float16 evaluation of a checkpoint is not merged with its float32 one, and runs at the default keep their hash
EVALUATION_KEYS = {"evaluation.feature_dtype": "float32", "evaluation.weights": "last"}
#: `evaluation.weights` -> the file of a run folder's `checkpoints/` that holds those weights: the last epoch's, or
#: the epoch of best ID-val accuracy (`ood.runs.checkpoints.BestValAccuracy`, what OpenOOD evaluates)
WEIGHTS_FILES = {"last": "last.ckpt", "best_val_acc": "best.ckpt"}


def untracked_best(ckpt_path: str | Path) -> ConfigError:
    """The refusal of resuming with `evaluation.weights=best_val_acc` a checkpoint trained with `last`."""
    return ConfigError(f"checkpoint {ckpt_path} was trained with evaluation.weights=last, so its epochs' ID-val accuracy "
                       "is not known: resume it with evaluation.weights=last, or train anew")
#: keys added to the configs at the value that applied before they were keys -> that value: part of the identity only
#: when set otherwise, so a run made before keeps its hash (its seeds and a rerun are the same configuration)
ADDED_KEYS = {"data.outlier_batch_size": None, "data.benchmark.augment_outliers": True, "data.augment_outliers": True,
              "method.knn_features": None, "data.drop_last": True}
#: config keys that only matter for training (epochs, optimiser, the training batches, their augmentation and outlier
#: set, the starting weights): an evaluation run takes them from the run that trained its checkpoint
#: (`method.scheduler` with its null value, and OAL's schedule keys as spelled before `RENAMED_KEYS`)
TRAINING_KEYS = ("trainer.max_epochs", "method.optimizer.", "method.scheduler", "method.cosine_per_step", "method.lr_min",
                 "data.batch_size", "data.outlier_batch_size", "data.drop_last",
                 "data.augment", "data.benchmark.augment", "data.benchmark.crop_padding", "data.benchmark.hflip",
                 "data.benchmark.outliers", "backbone.weights")
#: the config groups whose chosen option names a wandb group
NAME_GROUPS = ("method", "data", "backbone")

#: the backbone config groups that build any network of a library (their `library` key): `backbone.name` (`module`:
#: `backbone.target`) says which
GENERIC_BACKBONES = ("timm", "torchvision", "module")


def backbone_label(choice: str | None, node: Mapping[str, Any]) -> str:
    """The `backbone` result rows name (`ood-report` groups and matches references by it) and the wandb tag: the
    Hydra choice, and for a generic group (`choice` is the node's `library`, or None outside Hydra) the network too,
    `timm/resnet50`, `module/my_pkg.Net`: `timm` alone made two networks of a sweep over `backbone.name` one backbone,
    averaged as seeds under `--by`. Not `ood.evaluate`'s `backbone.shapes` digest: its rows equal `ood-eval`'s of the
    same network, which records none (the digest is in the run's configuration, whose columns keep two widths of one
    class apart). A named group (`resnet18_32x32`, a user's config extending `timm`) names itself."""
    library = node.get("library")
    if library not in GENERIC_BACKBONES or choice not in (None, library):
        return str(choice if choice is not None else node["_target_"].rsplit(".", 1)[-1])
    return f"{library}/{node.get('target' if library == 'module' else 'name')}"


def flatten(container: Mapping[str, Any]) -> dict[str, Any]:
    """`{"a": {"b": 1}, "c": {}}` -> `{"a.b": 1, "c": {}}` (an empty mapping inside stays a value)."""
    out: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, Mapping) and (value or not prefix):
            for key, sub in value.items():
                walk(sub, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = value

    walk(container, "")
    return out


def flat_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config as `{"method.optimizer.lr": 0.05, ...}` (without Hydra's own `hydra` node)."""
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False) if isinstance(cfg, DictConfig) else dict(cfg)
    assert isinstance(container, dict)
    return flatten({k: v for k, v in container.items() if k != "hydra"})


def seed_keys(raw: DictConfig | Mapping[str, Any]) -> set[str]:
    """Flattened keys whose unresolved value interpolates `${seed}` (e.g. OAL's `method.sampling_seed`): they vary
    with the seed, so they are part of the seed, not of the configuration."""
    container = OmegaConf.to_container(raw, resolve=False) if isinstance(raw, DictConfig) else dict(raw)
    assert isinstance(container, dict)
    flat = flatten({k: v for k, v in container.items() if k != "hydra"})
    return {k for k, v in flat.items() if isinstance(v, str) and "${seed}" in v}


@dataclass(frozen=True)
class Renamed:
    """A config node respelled: where `where`'s keys have these values and `node` holds exactly `fixed` (values) and
    `moved` (keys), the config was spelled `before` (keys and values) with each `moved` value under its old key."""

    where: dict[str, Any]
    node: str
    fixed: dict[str, Any]
    moved: dict[str, str]
    before: dict[str, Any]


#: nodes respelled with their meaning kept: a config holding the new spelling is hashed as spelled before, so a run
#: made before keeps its hash (its seeds and a rerun are the same configuration)
RENAMED_KEYS = (
    # OAL's own per-step cosine (`cosine_per_step: true`, `lr_min`, `scheduler: null`) became method/scheduler=openood
    # (`OpenOODCosine`, per step, offset 0): the same LambdaLR on every parameter group
    Renamed({"method._target_": "ood.methods.oal.OAL"}, "method.scheduler",
            {"_target_": "ood.methods.schedules.OpenOODCosine", "interval": "step", "offset": 0},
            {"eta_min": "method.lr_min"}, {"method.cosine_per_step": True, "method.scheduler": None}),
)


def spelled_before(flat: Mapping[str, Any]) -> Mapping[str, Any]:
    """`flat` with a `RENAMED_KEYS` node it holds spelled as before; unchanged otherwise (another key or value under
    the node, a `T_max`, another offset, is another configuration and keeps its spelling)."""
    for r in RENAMED_KEYS:
        under = {k.removeprefix(f"{r.node}."): v for k, v in flat.items() if k.startswith(f"{r.node}.")}
        if (all(k in flat and flat[k] == v for k, v in r.where.items()) and under.keys() == {*r.fixed, *r.moved}
                and all(under[k] == v for k, v in r.fixed.items())):
            kept = {k: v for k, v in flat.items() if not k.startswith(f"{r.node}.")}
            flat = {**kept, **{old: under[k] for k, old in r.moved.items()}, **r.before}
    return flat


def spelled_now(flat: Mapping[str, Any]) -> Mapping[str, Any]:
    """`flat` with a `RENAMED_KEYS` node spelled as before written as now (`spelled_before` undone): a checkpoint's
    stored config compared with today's, its values named with today's keys."""
    for r in RENAMED_KEYS:
        if all(k in flat and flat[k] == v for k, v in {**r.where, **r.before}.items()) and all(
                old in flat for old in r.moved.values()):
            kept = {k: v for k, v in flat.items() if k not in r.before and k not in r.moved.values()}
            flat = {**kept, **{f"{r.node}.{k}": v for k, v in r.fixed.items()},
                    **{f"{r.node}.{k}": flat[old] for k, old in r.moved.items()}}
    return flat


def identity(flat: Mapping[str, Any], seeded: Collection[str] = ()) -> dict[str, str]:
    """The flattened keys that name a configuration, seed and the `seeded` keys (`seed_keys`) excluded, and the
    `EVALUATION_KEYS` not at their default (values as canonical JSON strings); `ADDED_KEYS` at theirs are left out.
    A run's hashed identity spells `RENAMED_KEYS` as before (`derive_identity`); checks compare today's spelling."""
    return {
        k: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        for k, v in sorted(flat.items())
        if (k.startswith(IDENTITY_PREFIXES) and k not in NOT_IDENTITY and k not in seeded
            and not k.endswith(("_dir", ".root")) and not (k in ADDED_KEYS and v == ADDED_KEYS[k]))
        or (k in EVALUATION_KEYS and v not in (EVALUATION_KEYS[k], None))  # None: ood-eval's "as it was trained"
    }


@dataclass(frozen=True)
class RunIdentity:
    """What `identity.json` holds (see the module docstring)."""

    config: dict[str, str]
    model: str
    seeded: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    @property
    def hash(self) -> str:
        return hashlib.sha1(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:8]

    @property
    def group(self) -> str:
        return "-".join([*filter(None, self.names), self.hash])

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "hash": self.hash, "group": self.group, "seeded": self.seeded,
                "model": self.model, "names": self.names}


def derive_identity(
    flat: Mapping[str, Any], seeded: Collection[str], names: Sequence[str], run_dir: str | Path, evaluated: str | None
) -> RunIdentity:
    """The identity of the run in `run_dir` with resolved config `flat`; `evaluated` is the checkpoint an evaluation
    run (`train=false`) scores, None for a training run (whose model is its own `checkpoints/last.ckpt`)."""
    config = identity(spelled_before(flat), seeded)
    if not evaluated:
        own = WEIGHTS_FILES.get(str(flat.get("evaluation.weights", "last")), "last.ckpt")
        return RunIdentity(config, str((Path(run_dir) / "checkpoints" / own).resolve()), sorted(seeded), list(names))
    ckpt = Path(evaluated)
    ckpt = ckpt / "checkpoints" / "last.ckpt" if ckpt.is_dir() else ckpt
    trained = ckpt.parent.parent
    config = {k: v for k, v in config.items() if not k.startswith((*TRAINING_KEYS, "evaluation.weights"))}
    if ckpt.parent.name == "checkpoints" and ckpt.name == WEIGHTS_FILES["best_val_acc"]:
        config["evaluation.weights"] = "best_val_acc"
    if ckpt.parent.name == "checkpoints" and ((trained / IDENTITY_FILE).is_file() or (trained / "config.yaml").is_file()):
        config.update({k: v for k, v in read_identity(trained).config.items() if k.startswith(TRAINING_KEYS)})
    elif "ckpt_path" not in seeded:  # `ckpt_path=.../s${seed}/...`: one network per seed, not a configuration
        config["ckpt"] = str(ckpt)
    return RunIdentity(dict(sorted(config.items())), str(ckpt.resolve()), sorted(seeded), list(names))


def run_identity(cfg: DictConfig, choices: Mapping[str, Any], run_dir: str | Path, ckpt_path: str | None) -> RunIdentity:
    """The identity of the run `cfg` describes (Hydra's chosen group options name its wandb group); `ckpt_path` is
    the resolved checkpoint (the evaluated model when `cfg.train` is false). An evaluation without a checkpoint
    (`backbone.weights=`, `ood.evaluate`'s model) with `evaluation.weights=best_val_acc` is refused: no training chose
    an epoch, and its identity would name that setting and a `checkpoints/best.ckpt` that does not exist as its model."""
    if not cfg.train and not ckpt_path and (cfg.get("evaluation") or {}).get("weights") == "best_val_acc":
        raise ConfigError("evaluation.weights=best_val_acc evaluates a training run's checkpoints/best.ckpt, but this "
                          "evaluation has no checkpoint (ckpt_path): set evaluation.weights=null, or pass "
                          "ckpt_path=<run folder>")
    names = [str(choices.get(g, "")) for g in NAME_GROUPS]
    return derive_identity(flat_config(cfg), seed_keys(cfg), names, run_dir, None if cfg.train else ckpt_path)


#: top-level keys of `config.yaml` that say nothing of how results were made: the checkpoint a resumed rerun names
#: (`ckpt_path=last`; `identity.json`'s `model` says whether it is the same network), whether this attempt evaluates
#: (a rerun that does not write results leaves the earlier ones to the settings they were made with) and Hydra's own
#: node (its run folder's timestamp and the command line)
NOT_SETTINGS = ("ckpt_path", "evaluate", "hydra")
#: flattened keys that say nothing of them either, left out of the identity too (`NOT_IDENTITY`): the machine's loader
#: plumbing (`data.num_workers: ${ood.workers:N}` resolves to the CPUs of the node an attempt runs on), and folders
#: (`*_dir`, `*dirpath`: a requeued job's `OOD_DATA_DIR` staged on its node's own disk, the run folder's own path)
PLUMBING = ("data.num_workers", "data.pin_memory", "data.download")
#: keys of `config.yaml` (a top-level node, or a flattened key) that only say how a run is watched, never a number of
#: its results: the loggers (`logger`: csv, tensorboard, wandb or none, wandb's project, group, name and tags), what
#: feeds wandb's name and tags (`run_name`, `tags`), the console's progress bar and model summary, and how often
#: Lightning logs; a resumed rerun that only watches otherwise keeps the finished results
WATCHING = ("logger", "run_name", "tags", "trainer.enable_progress_bar", "trainer.enable_model_summary",
            "trainer.log_every_n_steps")


def _watching(key: str) -> bool:
    """Whether the flattened `key` is, or lies under, one of `WATCHING`."""
    return any(key == w or key.startswith(f"{w}.") for w in WATCHING)


def _settings(config: str) -> Any:
    """A resolved `config.yaml`'s text as flattened data, without `NOT_SETTINGS`, `PLUMBING`, `SWITCHES`, `WATCHING`
    and folders."""
    data = OmegaConf.to_container(OmegaConf.create(config))
    if not isinstance(data, dict):
        return data
    flat = spelled_before(flatten({k: v for k, v in data.items() if k not in NOT_SETTINGS}))
    return {k: v for k, v in flat.items()
            if k not in PLUMBING and k not in SWITCHES and not _watching(k) and not k.endswith(("_dir", "dirpath"))}


def write_identity(run_dir: str | Path, ident: RunIdentity, config: str | None = None) -> None:
    """`<run_dir>/identity.json`, and with `config` the run's resolved `config.yaml` before it, each atomically. An
    earlier attempt's results there go first, before either file lands, when they are another configuration's or
    model's, or, with `config`, were made with other settings (a key outside `NOT_SETTINGS`, `PLUMBING`, `WATCHING`
    and the folders differs: other detectors, evaluation modes, batches...), which `ood-report` would read beside the
    new `config.yaml` should this attempt be killed before its own replace them (`ood.runs.failures.clear_failure`
    kept them for a rerun of this one). So a `results.jsonl` in a run folder was always made with the settings of the
    `config.yaml` beside it, but for its folders, DataLoader plumbing and how the run was watched."""
    run_dir = Path(run_dir)
    path, config_file = run_dir / IDENTITY_FILE, run_dir / "config.yaml"
    new = json.loads(json.dumps(ident.to_json()))
    if path.is_file():
        old = json.loads(path.read_text())
        if (old.get("config"), old.get("model")) != (new["config"], new["model"]) or (
                config is not None and config_file.is_file() and _settings(config_file.read_text()) != _settings(config)):
            remove_earlier_results(run_dir)
    if config is not None:
        atomic_write_text(config_file, config)
    atomic_write_text(path, json.dumps(new, indent=2) + "\n")


def read_identity(run_dir: str | Path) -> RunIdentity:
    """The identity a run wrote (`identity.json`); for a folder without one, re-derived from its `config.yaml`, the
    unresolved `.hydra/config.yaml` (its `${seed}` keys) and `.hydra/hydra.yaml` (the chosen group options). A
    folder without `config.yaml` has an empty configuration."""
    run_dir = Path(run_dir)
    path = run_dir / IDENTITY_FILE
    if path.is_file():
        data = json.loads(path.read_text())
        model = str(data["model"])
        own = run_dir / "checkpoints" / Path(model).name  # last.ckpt, or best.ckpt (`WEIGHTS_FILES`)
        if own.is_file() and Path(model).parts[-2:] == own.parts[-2:]:
            # a training run's model is its own checkpoint, wherever the folder now is (copied from a cluster): an
            # evaluation of it there names the new path, and must count as the same model
            model = str(own.resolve())
        return RunIdentity(dict(data["config"]), model, list(data.get("seeded", [])), list(data.get("names", [])))
    if not (run_dir / "config.yaml").is_file():
        return derive_identity({}, (), (), run_dir, None)
    flat = flat_config(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")))  # type: ignore[arg-type]
    raw, hydra = run_dir / ".hydra" / "config.yaml", run_dir / ".hydra" / "hydra.yaml"
    seeded = seed_keys(OmegaConf.load(raw)) if raw.is_file() else set()
    choices = OmegaConf.select(OmegaConf.load(hydra), "hydra.runtime.choices", default={}) if hydra.is_file() else {}
    names = [str(choices.get(g, "")) for g in NAME_GROUPS] if choices else []
    evaluated = None if flat.get("train", True) else flat.get("ckpt_path")
    return derive_identity(flat, seeded, names, run_dir, str(evaluated) if evaluated else None)
