"""`ood-train`: train a method on a benchmark, then evaluate it with its own score and every detector."""

from __future__ import annotations

import gc
import json
import re
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.multiprocessing import ProcessRaisedException

from ood import CONFIG_DIR, errors
from ood.errors import ConfigError, OODError
from ood.evaluation.callback import OODEvaluation
from ood.runs import (
    RunState,
    build_loggers,
    check_overrides,
    check_run,
    clear_failure,
    flat_config,
    record_failure,
    resolve_ckpt_path,
    sweep_objective,
)
from ood.utils import get_logger, instantiate

log = get_logger(__name__)


def _choices() -> dict[str, Any]:
    """Hydra's selected config-group options (method, data, backbone, ...), empty outside a Hydra run."""
    if not HydraConfig.initialized():
        return {}
    return dict(HydraConfig.get().runtime.choices)


def build(
    cfg: DictConfig, backbone: Any = None, data: dict[str, Any] | None = None
) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer, OODEvaluation]:
    """Instantiate datamodule, backbone, method, callbacks, loggers and trainer from the composed config; the Python
    API (`ood.evaluate`) passes its model as `backbone` and Python objects for the data node (`data`)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, seed=cfg.seed, **(data or {}))
    benchmark = datamodule.benchmark
    if backbone is None:
        backbone = instantiate(cfg.backbone, num_classes=benchmark.num_classes, in_channels=benchmark.in_channels)
    method = instantiate(cfg.method, backbone=backbone)
    datamodule.use_streams(method.streams, method.name)
    choices = _choices()
    evaluation = instantiate(
        cfg.evaluation,
        info={
            "backbone": choices.get("backbone", cfg.backbone._target_.rsplit(".", 1)[-1]),
            "seed": cfg.seed,
            "fit_fraction": datamodule.fit_fraction,
            "fit_seed": datamodule.fit_seed,
        },
    )
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values()]
    loggers = build_loggers(cfg, choices)
    trainer = instantiate(cfg.trainer, callbacks=[*callbacks, RunState(flat_config(cfg)), evaluation], logger=loggers or False)
    return method, datamodule, trainer, evaluation


def load_weights(method: L.LightningModule, path: str | Path) -> None:
    """Load a whole method from any checkpoint `ood.models.checkpoint` reads (Lightning, bare, OpenOOD, torchvision),
    strictly; every failure names the file and the first mismatched key."""
    from ood.models.checkpoint import load_modules, read_state_dict

    load_modules(method, read_state_dict(path), None, path)


def check_launch(cfg: DictConfig) -> None:
    """Refuse Hydra multirun with the subprocess DDP launcher: it re-executes the whole sweep per rank."""
    from hydra.types import RunMode

    strategy = cfg.trainer.get("strategy")
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN and strategy == "ddp":
        raise ConfigError(
            "trainer=ddp (subprocess launcher) cannot run inside a Hydra multirun: each rank would re-launch the "
            "sweep. Sweep with one device per job, use trainer=ddp_cpu-style spawn (strategy.start_method=spawn), "
            "or pre-launch ranks with torchrun/SLURM (see README)."
        )


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Train (unless `train=false`) and evaluate; returns the result rows also written to `results.jsonl`."""
    check_launch(cfg)
    if not cfg.train and not cfg.get("ckpt_path") and not cfg.backbone.get("weights"):
        raise ConfigError(
            "evaluation without training needs a checkpoint: add ckpt_path=PATH/checkpoints/last.ckpt "
            "(or backbone.weights=FILE for a backbone that loads pretrained weights, e.g. backbone=resnet50)"
        )
    output_dir = Path(cfg.paths.output_dir)
    clear_failure(output_dir)
    try:
        return _run(cfg, output_dir)
    except Exception as err:
        record_failure(output_dir, err)
        raise


def _run(cfg: DictConfig, output_dir: Path) -> list[dict[str, Any]]:
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir, Path(cfg.paths.log_dir) / "train" / "runs")
    check_run(cfg, ckpt_path)
    method, datamodule, trainer, evaluation = build(cfg)
    # `method.init` starts a new run from weights; a resumed run or an evaluated checkpoint brings its own
    method.apply_init(load=not ckpt_path)
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    try:
        if cfg.train:
            trainer.fit(method, datamodule=datamodule, ckpt_path=ckpt_path)
        elif ckpt_path:
            load_weights(method, ckpt_path)
        if cfg.evaluate:
            trainer.test(method, datamodule=datamodule, verbose=False)
    finally:
        _finish_wandb()
    results = output_dir / "results.jsonl"
    if not (cfg.evaluate and trainer.is_global_zero and results.is_file()):
        return evaluation.rows
    # read back from the file: with spawned DDP ranks the rows were computed in the child processes
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def _finish_wandb() -> None:
    """One wandb run per job, even in multirun or after an error."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def friendly_errors(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Turn `OODError`s (user mistakes, missing data, NaNs) into a one-line message and exit code 1."""

    @wraps(task)
    def wrapper(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except Exception as err:
            user = user_error(err)
            if user is None:
                raise
            print(f"error: {user}", file=sys.stderr)
            if _in_multirun():
                raise user from None  # Hydra marks this job failed and runs the others (SystemExit ends the sweep)
            sys.exit(1)

    return wrapper


def user_error(err: BaseException) -> OODError | None:
    """The user's mistake behind `err`: itself when it is an `OODError`, or the `OODError` a spawned DDP rank raised
    (`trainer=ddp_cpu`: torch's `ProcessRaisedException` carries only the rank's traceback text, whose last line is
    `ood.errors.<Class>: <message>`); None for anything else (a bug: its traceback is shown)."""
    if isinstance(err, OODError):
        return err
    if isinstance(err, ProcessRaisedException):
        lines = str(err).strip().splitlines()
        match = re.fullmatch(r"(?:ood\.errors\.)?(\w+): (.*)", lines[-1]) if lines else None
        cls = getattr(errors, match[1], None) if match else None
        if isinstance(cls, type) and issubclass(cls, OODError):
            return cls(match[2])
    return None


def _in_multirun() -> bool:
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def check_argv(config_name: str) -> None:
    """Refuse a misspelt override key with the closest real key, before Hydra composes the config."""
    try:
        check_overrides(CONFIG_DIR, config_name, sys.argv[1:])
    except OODError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def require_config_dir() -> None:
    """The configs live in the repository's top-level `conf/`: say so instead of Hydra's generic error."""
    if not CONFIG_DIR.is_dir():
        print(
            f"error: config folder {CONFIG_DIR} not found; install ood from a checkout with `pip install -e .` "
            "(the configs live in the repository's conf/, next to the package)",
            file=sys.stderr,
        )
        sys.exit(1)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
@friendly_errors
def _main(cfg: DictConfig) -> float | None:
    run(cfg)
    return sweep_objective(cfg.paths.output_dir, cfg.get("objective"))


def main() -> None:
    """`ood-train` entry point."""
    require_config_dir()
    check_argv("train")
    # the ~0.5M objects the imports made live until exit: freezing them spares every later collection (and the
    # ones at exit) from rescanning them, a fifth of a default digits run
    gc.freeze()
    _main()


if __name__ == "__main__":
    main()
