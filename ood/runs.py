"""Run plumbing that makes a run trustworthy: atomic files, resumable checkpoints, the run's identity.

- Atomic files live in `ood.files`. `AtomicCheckpoint`: Lightning's `ModelCheckpoint` writing `<file>.tmp` then `os.replace` (a crash never leaves
  a half-written checkpoint). `RunState`: the resolved config in every checkpoint, and the global RNG states
  across a resume, so an interrupted and resumed CPU run draws the same augmentations as an uninterrupted one.
- `resolve_ckpt_path`: `ckpt_path=last` / a run folder / a file -> the checkpoint file, with one-line errors.
- `check_run`: refuses `trainer.max_epochs < 1`, a GPU preset without a GPU, and resuming with a different
  `trainer.max_epochs` (the cosine schedule's `T_max` lives in the checkpoint and would not follow).
- `flat_config` / `identity` / `config_group`: the resolved config flattened (the hyper-parameters of every
  logger and checkpoint), and the part of it that names a configuration regardless of the seed.
- `CSVLogger`: Lightning's CSV logger keeping the columns already in `metrics.csv` (spawned DDP: fit, then test).
- `build_loggers`: the configured loggers with the flattened config as hyper-parameters; wandb also gets
  `group` = configuration without the seed, `job_type` = task, tags from method, data and backbone.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import itertools
import json
import os
import random
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import csv_logs
from omegaconf import DictConfig, OmegaConf

from ood.errors import CheckpointError, ConfigError
from ood.files import atomic_write_text
from ood.utils import get_logger, instantiate

log = get_logger(__name__)

#: flattened-config prefixes that name a configuration (method and its parameters, backbone, data, epochs)
IDENTITY_PREFIXES = ("method.", "backbone.", "data.", "trainer.max_epochs")
#: flattened keys under those prefixes that do not name a configuration: loader plumbing, and the starting weights
#: of a fine-tune (one CE run per seed: `method.init.ckpt=.../ce_s${seed}/...` must not split the seeds)
NOT_IDENTITY = ("data.num_workers", "data.pin_memory", "data.download", "data.eval_batch_size", "method.init.ckpt",
                "data.csid")
#: the file a failed run leaves in its folder (read by `ood-report`)
FAILED_FILE = "FAILED.txt"


# ----- checkpoints -------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and builtins (Lightning resumes with `torch.load(weights_only=True)`)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
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
        tmp = f"{filepath}.tmp"
        super()._save_checkpoint(trainer, tmp)
        if trainer.is_global_zero:
            os.replace(tmp, filepath)
        trainer.strategy.barrier("AtomicCheckpoint")


class RunState(Callback):
    """Puts the flattened resolved config into every checkpoint (`hyper_parameters["config"]`) and carries the
    global RNG states (torch, NumPy, Python) across a resume.

    The states are restored as the checkpoint is loaded: between that and the creation of the next epoch's
    training iterator nothing draws random numbers (Lightning isolates the RNG around its sanity check), just as
    nothing does between the save and that point in the uninterrupted run.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault("hyper_parameters", {})["config"] = self.config

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng" in state_dict:
            _set_rng_state(state_dict["rng"])


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path, runs_dir: str | Path) -> str | None:
    """The checkpoint file `ckpt_path` means.

    `last`: `<output_dir>/checkpoints/last.ckpt` when it exists (a rerun into the same folder, e.g. a multirun
    with a fixed `hydra.sweep.dir`), else the newest `*/checkpoints/last.ckpt` under `runs_dir`. A folder: its
    `checkpoints/last.ckpt`. A file: itself.
    """
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        own = Path(output_dir) / "checkpoints" / "last.ckpt"
        if own.is_file():
            return str(own)
        found = sorted(Path(runs_dir).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise CheckpointError(f"ckpt_path=last: no checkpoints/last.ckpt in {output_dir} or under {runs_dir}/*/")
        log.info("ckpt_path=last resumes %s", found[-1])
        return str(found[-1])
    path = Path(ckpt_path)
    if path.is_dir():
        inner = path / "checkpoints" / "last.ckpt"
        if not inner.is_file():
            raise CheckpointError(f"{path} is a folder without checkpoints/last.ckpt: pass ckpt_path=<run folder> or the .ckpt file")
        return str(inner)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (pass a run folder or its checkpoints/last.ckpt)")
    return str(path)


def checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The flattened config stored in a checkpoint by `AtomicCheckpoint` (empty for other checkpoints)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CheckpointError(f"could not read checkpoint {path}: {type(err).__name__}: {err}") from err
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    return dict((hparams or {}).get("config") or {})


def check_run(cfg: DictConfig, ckpt_path: str | None) -> None:
    """Refuse configurations that would waste a run: no epochs, a GPU preset without a GPU, a changed schedule."""
    max_epochs = cfg.trainer.get("max_epochs")
    if cfg.train and (max_epochs is None or int(max_epochs) < 1):
        raise ConfigError(f"trainer.max_epochs={max_epochs}: must be >= 1 (Lightning's -1 would train forever)")
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but no GPU is available: this preset needs a GPU; "
            "add trainer=cpu to try it on CPU"
        )
    if cfg.train and ckpt_path is not None:
        before = checkpoint_config(ckpt_path).get("trainer.max_epochs")
        if before is not None and int(before) != int(max_epochs):
            raise ConfigError(
                f"checkpoint {ckpt_path} was trained for trainer.max_epochs={before}; resuming with "
                f"trainer.max_epochs={max_epochs} would keep its learning-rate schedule (T_max={before}). Resume with "
                f"trainer.max_epochs={before}, or start a new run from its weights"
            )


# ----- the run's configuration -------------------------------------------------------------------------------
def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for key, sub in value.items():
            _flatten(sub, f"{prefix}{key}.", out)
    else:
        out[prefix[:-1]] = value


def flat_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config as `{"method.optimizer.lr": 0.05, ...}` (without Hydra's own `hydra` node)."""
    if isinstance(cfg, DictConfig):
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    else:
        container = dict(cfg)
    assert isinstance(container, dict)
    out: dict[str, Any] = {}
    _flatten({k: v for k, v in container.items() if k != "hydra"}, "", out)
    return out


def seed_keys(raw: DictConfig | Mapping[str, Any]) -> set[str]:
    """Flattened keys whose unresolved value interpolates `${seed}` (e.g. OAL's `method.sampling_seed`): they vary
    with the seed, so they are part of the seed, not of the configuration."""
    container = OmegaConf.to_container(raw, resolve=False) if isinstance(raw, DictConfig) else dict(raw)
    out: dict[str, Any] = {}
    _flatten({k: v for k, v in container.items() if k != "hydra"}, "", out)
    return {k for k, v in out.items() if isinstance(v, str) and "${seed}" in v}


def identity(flat: Mapping[str, Any], seeded: Collection[str] = ()) -> dict[str, str]:
    """The flattened keys that name a configuration, seed and the `seeded` keys (`seed_keys`) excluded (values as
    canonical JSON strings)."""
    return {
        k: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        for k, v in sorted(flat.items())
        if k.startswith(IDENTITY_PREFIXES) and k not in NOT_IDENTITY and k not in seeded
        and not k.endswith(("_dir", ".root"))
    }


def config_group(cfg: DictConfig, choices: Mapping[str, Any]) -> str:
    """`<method>-<data>-<backbone>-<hash of the configuration without the seed>`: the wandb group of a run."""
    digest = hashlib.sha1(json.dumps(identity(flat_config(cfg), seed_keys(cfg))).encode()).hexdigest()[:8]
    names = [str(choices.get(g, "")) for g in ("method", "data", "backbone")]
    return "-".join([*filter(None, names), digest])


class _KeepColumnsWriter(csv_logs.ExperimentWriter):
    """Writes `metrics.csv` with the union of its own keys and the columns already in the file."""

    def save(self) -> None:
        if self.metrics and self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                header = next(csv.reader(file), [])
            self.metrics_keys = sorted(set(self.metrics_keys) | set(header))
        super().save()


class CSVLogger(csv_logs.CSVLogger):
    """Lightning's `CSVLogger` whose writer keeps the file's existing columns. Under a spawning strategy
    (`trainer=ddp_cpu`) each stage pickles the parent's writer, which never saw the keys an earlier stage's child
    wrote: Lightning's writer would rewrite the file with the test keys only and fail on the training rows."""

    @property
    @rank_zero_experiment
    def experiment(self) -> csv_logs.ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepColumnsWriter(log_dir=self.log_dir)
        return self._experiment


def build_loggers(cfg: DictConfig, choices: Mapping[str, Any]) -> list[Any]:
    """Instantiate `cfg.logger`, each with the flattened resolved config as hyper-parameters."""
    flat = flat_config(cfg)
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        target = str(node.get("_target_", ""))
        extra: dict[str, Any] = {}
        if target.endswith("WandbLogger"):
            tags = [*(node.get("tags") or []), *(str(choices[g]) for g in ("method", "data", "backbone") if g in choices)]
            extra = {"group": config_group(cfg, choices), "tags": list(dict.fromkeys(tags))}
        logger = instantiate(node, **extra)
        logger.log_hyperparams(flat)
        loggers.append(logger)
    return loggers


def clear_failure(output_dir: str | Path) -> None:
    """Forget an earlier attempt's `FAILED.txt` (a resumed run starts clean)."""
    (Path(output_dir) / FAILED_FILE).unlink(missing_ok=True)


def record_failure(output_dir: str | Path, err: BaseException) -> None:
    """Leave `FAILED.txt` (the error) in a failed run's folder, so `ood-report` can name the job."""
    path = Path(output_dir)
    if path.is_dir():
        atomic_write_text(path / FAILED_FILE, f"{type(err).__name__}: {err}\n")


# ----- command-line checks -----------------------------------------------------------------------------------
def check_overrides(config_dir: str | Path, config_name: str, argv: Sequence[str]) -> None:
    """Refuse a misspelt `key=value` override before Hydra does, naming the closest real key (Hydra's own advice,
    `+key=value`, adds the misspelt key and fails later with a TypeError)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if any(a.startswith(("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir")) for a in argv):
        return  # another primary config: Hydra checks its keys
    args, skip = [], False
    for arg in argv:  # overrides only: no flags, nor the value of a flag that takes one (`--cfg job`)
        if not skip and not arg.startswith("-"):
            args.append(arg)
        skip = arg in ("-c", "--cfg", "-p", "--package", "--info", "-i") and not skip
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except HydraException:
        return  # Hydra reports syntax errors itself
    groups = [o for o in overrides if _is_group(o.key_or_group, config_dir)]
    choices = [
        [f"{o.key_or_group}={v}" for v in (o.sweep_string_iterator() if o.is_sweep_override() else [o.value()])]
        for o in groups
    ]
    known: set[str] = set()
    open_dicts: set[str] = set()  # empty mappings (`detectors.params: {}`) take any sub-key
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        try:  # a key is known when any swept combination of config groups has it
            for combination in itertools.islice(itertools.product(*choices), 16):
                flat = flat_config_with_hydra(compose(config_name, list(combination), return_hydra_config=True))
                known |= set(flat)
                open_dicts |= {k for k, v in flat.items() if v == {}}
        except Exception:  # noqa: BLE001 - a bad group choice is Hydra's to report
            return
        finally:
            GlobalHydra.instance().clear()
    for o in overrides:
        key = o.key_or_group
        if o.is_add() or o.is_force_add() or o.is_delete() or _is_group(key, config_dir):
            continue
        parents = {".".join(key.split(".")[:i]) for i in range(1, key.count(".") + 1)}
        if key not in known and not parents & open_dicts and not any(k.startswith(key + ".") for k in known):
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}=...?" if close else "see `ood-train --cfg job` for the keys"
            raise ConfigError(f"unknown config key {key!r}: {hint} (+{key}=... would add it as a new key)")


def _is_group(key: str, config_dir: str | Path) -> bool:
    return "/" in key or (Path(config_dir) / key).is_dir()


def flat_config_with_hydra(cfg: DictConfig) -> dict[str, Any]:
    """Every flattened key of `cfg` including `hydra.*` (unresolved: only the names matter)."""
    out: dict[str, Any] = {}
    _flatten(OmegaConf.to_container(cfg, resolve=False), "", out)
    return out


# ----- sweeps ------------------------------------------------------------------------------------------------
#: per-scorer AUROC of ID val vs validation OOD, written next to `results.jsonl` (the sweep objective)
VALIDATION_FILE = "validation.json"


def validation_aurocs(scorers: Sequence[Any], split_names: Sequence[str]) -> dict[str, float]:
    """AUROC of ID val vs validation OOD for each scorer (`.name`, `.score(split)`); never touches a test split.

    Empty when the benchmark has no validation OOD set.
    """
    from ood.metrics import ood_metrics

    if not {"val", "val_ood"} <= set(split_names):
        return {}
    return {s.name: ood_metrics(s.score("val"), s.score("val_ood"), name=f"{s.name} on val_ood")["auroc"] for s in scorers}


def sweep_objective(output_dir: str | Path, detector: str | None) -> float | None:
    """The validation-OOD AUROC a sweeper maximises: of `detector`, or the method's own score when it has one,
    else the first detector. None when the run wrote no validation numbers."""
    path = Path(output_dir) / VALIDATION_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    aurocs: dict[str, float] = data["auroc"]
    if not aurocs:
        return None
    name = detector or (data["method"] if data["method"] in aurocs else next(iter(aurocs)))
    if name not in aurocs:
        raise ConfigError(f"objective={name}: not scored in this run; choose one of {sorted(aurocs)}")
    return float(aurocs[name])
