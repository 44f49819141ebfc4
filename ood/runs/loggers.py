"""The run's loggers: the configured ones built with the flattened config as hyper-parameters, a CSV logger that
survives spawned DDP stages, and the one wandb run per job.

- `CSVLogger`: Lightning's CSV logger keeping the columns already in `metrics.csv` (spawned DDP: fit, then test);
  a run resumed from its own checkpoint continues its `version_N` folder, without the rows logged after that
  checkpoint (the resumed run logs them again), instead of starting `version_N+1`.
- `build_loggers`: `cfg.logger`, each with the flattened resolved config; wandb also gets `group` = the run's
  identity group (`ood.runs.identity`: configuration without the seed), tags from method, data and backbone (the
  result rows' label, `backbone_label`: `timm/resnet50` of a generic group), and unless `run_name` is given, the
  name `<group>-s<seed>` (the group's hash tells apart what the group options do not: `backbone.name`, a swept
  learning rate).
- `WandbLogger`: Lightning's, without the `anonymous=None` it hands `wandb.init` (wandb warned at every run that the
  setting has no effect).
- `finish_wandb`: closes the job's wandb run, even in a multirun or after an error, with the job's exit status
  (a run stopped by SIGTERM or Ctrl-C, or failed, is marked failed in wandb, not finished).
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Mapping
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import csv_logs
from lightning.pytorch.loggers import wandb as wandb_logs
from omegaconf import DictConfig

from ood.runs.identity import NAME_GROUPS, TRAINING_KEYS, backbone_label, flat_config
from ood.utils import instantiate


class _KeepColumnsWriter(csv_logs.ExperimentWriter):
    """Writes `metrics.csv` with the union of its own keys and the columns already in the file; with `resume_epoch`
    an existing file is kept with its rows of epochs up to `resume_epoch` (Lightning's writer deletes it)."""

    def __init__(self, log_dir: str, resume_epoch: int | None = None) -> None:
        self.resume_epoch = resume_epoch
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if self.resume_epoch is None or not self._fs.isfile(self.metrics_file_path):
            super()._check_log_dir_exists()
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            header, rows = reader.fieldnames or [], list(reader)
        kept = [row for row in rows if row.get("epoch") and float(row["epoch"]) <= self.resume_epoch]
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=header)
            writer.writeheader()
            writer.writerows(kept)

    def save(self) -> None:
        if self.metrics and self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                header = next(csv.reader(file), [])
            self.metrics_keys = sorted(set(self.metrics_keys) | set(header))
        super().save()


class CSVLogger(csv_logs.CSVLogger):
    """Lightning's `CSVLogger` whose writer keeps the file's existing columns. Under a spawning strategy
    (`trainer=ddp_cpu`) each stage pickles the parent's writer, which never saw the keys an earlier stage's child
    wrote: Lightning's writer would rewrite the file with the test keys only and fail on the training rows.

    `resume_epoch`: the run resumes its own checkpoint saved at the end of that epoch: the newest `version_N` is
    continued, keeping its rows up to that epoch (the checkpoint flushes the loggers first, `AtomicCheckpoint`)."""

    def __init__(self, *args: Any, resume_epoch: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_epoch = resume_epoch

    @property
    def version(self) -> int | str:
        if self._version is None and self.resume_epoch is not None:
            self._version = max(self._get_next_version() - 1, 0)
        return super().version

    @property
    @rank_zero_experiment
    def experiment(self) -> csv_logs.ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepColumnsWriter(log_dir=self.log_dir, resume_epoch=self.resume_epoch)
        return self._experiment


class WandbLogger(wandb_logs.WandbLogger):
    """Lightning's wandb logger, less the `anonymous` key it passes `wandb.init` when not asked for: wandb warns of any
    value given ("The anonymous setting has no effect and will be removed"), None included."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


def build_loggers(cfg: DictConfig, choices: Mapping[str, Any], group: str, resume_epoch: int | None = None,
                  trained: Mapping[str, Any] | None = None) -> list[Any]:
    """Instantiate `cfg.logger`, each with the flattened resolved config as hyper-parameters (an evaluated
    checkpoint's training keys, `TRAINING_KEYS`, from `trained`, its stored config: the evaluation's own config holds
    its defaults there); a wandb logger joins `group` (the run's identity group), is named `<group>-s<seed>` unless its
    `name` (`run_name`) is set, and is tagged with the chosen method, data and backbone (as the result rows name
    it: `timm/resnet50`); our CSV logger gets `resume_epoch` (a run resuming its own checkpoint)."""
    flat = flat_config(cfg) | {k: v for k, v in (trained or {}).items() if k.startswith(TRAINING_KEYS)}
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        target = str(node.get("_target_", ""))
        extra: dict[str, Any] = {}
        if target.endswith("WandbLogger"):
            chosen = [backbone_label(str(choices[g]), cfg.backbone) if g == "backbone" else str(choices[g])
                      for g in NAME_GROUPS if g in choices]
            tags = [*(node.get("tags") or []), *chosen]
            name = node.get("name") or f"{group}-s{cfg.seed}"
            extra = {"group": group, "tags": list(dict.fromkeys(tags)), "name": name}
        elif target == f"{CSVLogger.__module__}.{CSVLogger.__qualname__}":
            extra = {"resume_epoch": resume_epoch}
        logger = instantiate(node, **extra)
        logger.log_hyperparams(flat)
        loggers.append(logger)
    return loggers


def finish_wandb() -> None:
    """One wandb run per job, even in multirun or after an error. Called in a `finally` while the job's error
    propagates, it closes the run with the status the process ends with (143 for SIGTERM, 130 for Ctrl-C, else 1):
    wandb then shows the run failed; with exit code 0 a stopped run read as finished beside the run resuming it."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=_exit_status(sys.exc_info()[1]))


def _exit_status(error: BaseException | None) -> int:
    """The process status of a job ending with `error` (None: a success)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if error is None:
        return 0
    return 143 if isinstance(error, SIGTERMException) else 130 if isinstance(error, KeyboardInterrupt) else 1
