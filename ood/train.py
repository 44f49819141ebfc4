"""`ood-train`: train a method on a benchmark, then evaluate it with its own score and every detector."""

from __future__ import annotations

import gc
import importlib
import json
import logging
import multiprocessing
import sys
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ood import CONFIG_DIR
from ood.cli import check_argv, friendly_errors, in_multirun, load_weights, require_config_dir, user_error
from ood.errors import ConfigError
from ood.runs.checks import as_trained_paths, check_launch, check_run
from ood.runs.failures import (
    RESUMED_FILE,
    Started,
    clear_failure,
    ctrl_c_raised,
    record_failure,
    record_resumed,
    remove_earlier_results,
)
from ood.runs.identity import RunIdentity, backbone_label, flat_config, run_identity, write_identity
from ood.runs.sweeps import check_objective, failed_jobs_listed, sweep_jobs_checked, sweep_objective
from ood.runs.trained import checkpoint_config
from ood.termination import (
    exit_terminated,
    forget_sigterm,
    sigterm_noted,
    stop_if_terminated,
    stop_when_orphaned,
)
from ood.utils import get_logger, global_rank, instantiate

if TYPE_CHECKING:
    import lightning as L

    from ood.evaluation.callback import OODEvaluation

# torch, Lightning and the modules that import them (`RUN_MODULES`) are imported in the functions that run a job: an
# entry point's start-up (`--help`, a config error, a sweep's launcher) does without them (seconds of CPU)

log = get_logger(__name__)

#: what a run imports (torch, Lightning, ood's evaluation and run plumbing): `run_modules` imports them at a job's start
RUN_MODULES = ("lightning", "ood.evaluation.callback", "ood.evaluation.prepare", "ood.runs.checkpoints",
               "ood.runs.console", "ood.runs.loggers")


def run_modules() -> None:
    """Import `RUN_MODULES`, then freeze what exists: the ~0.5M objects the imports made live until exit, and freezing
    them spares every later collection (and the ones at exit) from rescanning them, a fifth of a default digits run.
    Called as an entry point's job starts; nothing when they are imported already (a sweep's later jobs in the same
    process: an earlier job's garbage must not be frozen), nor by the Python API (the caller's objects are not ours
    to freeze)."""
    if all(name in sys.modules for name in RUN_MODULES):
        return
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)  # import-time INFO lines (faiss's loader) stay off the job's log, as before it began
    try:
        for name in RUN_MODULES:
            importlib.import_module(name)
    finally:
        logging.disable(previous)
    gc.freeze()


def _choices() -> dict[str, Any]:
    """Hydra's selected config-group options (method, data, backbone, ...), empty outside a Hydra run."""
    if not HydraConfig.initialized():
        return {}
    return dict(HydraConfig.get().runtime.choices)


def build(
    cfg: DictConfig, ident: RunIdentity | None = None, backbone: Any = None, data: dict[str, Any] | None = None,
    trained_seed: int | None = None, resume_epoch: int | None = None, trained: Mapping[str, Any] | None = None,
) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer, OODEvaluation]:
    """Instantiate datamodule, backbone, method, callbacks, loggers and trainer from the composed config; `ident`
    (default: derived from `cfg`) names the wandb group; the Python API (`ood.evaluate`) passes its model as
    `backbone` and Python objects for the data node (`data`); `trained_seed` (default `cfg.seed`) is the seed the
    result rows record: an evaluated checkpoint's training seed; `resume_epoch`: the run resumes its own checkpoint
    of that epoch (its CSV log continues); `trained`: an evaluated checkpoint's stored config (the loggers record its
    training values)."""
    import lightning as L

    from ood.evaluation.prepare import PrepareMethod
    from ood.runs.checkpoints import BestValAccuracy, RunState, StopAtSigterm
    from ood.runs.console import ProgressBar
    from ood.runs.loggers import build_loggers

    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, seed=cfg.seed, **(data or {}))
    benchmark = datamodule.benchmark
    if backbone is None:
        backbone = instantiate(cfg.backbone, num_classes=benchmark.num_classes, in_channels=benchmark.in_channels)
    benchmark.check_model_input(backbone)
    method = instantiate(cfg.method, backbone=backbone)
    if cfg.get("train", True) and method.first_complete_epoch >= int(cfg.trainer.max_epochs):
        # heatmap with its CE phase as long as the run: the decoder never trained, its heatmaps scored silently
        raise ConfigError(
            f"{method.name} trains only a part of itself before epoch {method.first_complete_epoch} (0-based; heatmap's "
            f"method.classifier_epochs), and trainer.max_epochs={cfg.trainer.max_epochs} ends the run there, the rest "
            f"untrained: raise trainer.max_epochs above {method.first_complete_epoch}"
        )
    # evaluation only serves no training stream: an outlier method's checkpoint evaluates without an outlier set
    datamodule.use_streams(method.streams if cfg.get("train", True) else ("id",), method.name)
    choices = _choices()
    evaluation = instantiate(
        cfg.evaluation,
        info={
            "backbone": backbone_label(choices.get("backbone"), cfg.backbone),
            "seed": cfg.seed if trained_seed is None else trained_seed,
            "fit_fraction": datamodule.fit_fraction,
            "fit_seed": datamodule.fit_seed,
        },
    )
    evaluation.evaluator.check_own_names(method.name, [method.name])  # before training, not after it
    if cfg.get("evaluate", True):
        check_objective(cfg.get("objective"), method.name, [d.name for d in evaluation.evaluator.detectors])
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values()]
    if cfg.get("train", True) and evaluation.weights == "best_val_acc":  # before last.ckpt's callback: `BestValAccuracy`
        callbacks.insert(0, BestValAccuracy(Path(cfg.paths.output_dir) / "checkpoints", method.first_complete_epoch))
    # before the evaluation callback: the pass's bar closes before the evaluation prints
    progress = [ProgressBar()] if cfg.trainer.get("enable_progress_bar", True) else []
    ident = ident or run_identity(cfg, choices, cfg.paths.output_dir, cfg.get("ckpt_path"))
    loggers = build_loggers(cfg, choices, ident.group, resume_epoch, trained)
    trainer = instantiate(
        cfg.trainer, callbacks=[*callbacks, *progress, RunState(flat_config(cfg)), PrepareMethod(), StopAtSigterm(), evaluation], logger=loggers or False
    )
    return method, datamodule, trainer, evaluation


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Train (unless `train=false`) and evaluate; returns the result rows also written to `results.jsonl`. SIGTERM,
    whenever it comes, ends the run as failed (`ood.termination`): status 143 and `FAILED.txt`."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    output_dir = Path(cfg.paths.output_dir)
    earlier = clear_failure(output_dir)
    with sigterm_noted():
        if in_multirun() and multiprocessing.parent_process() is not None:  # a parallel launcher's worker
            stop_when_orphaned()
        try:  # the launch checks too: a job of a sweep refused by them is named with its error by ood-report
            check_launch(cfg, in_multirun())
            if not cfg.train and not cfg.get("ckpt_path") and not cfg.backbone.get("weights"):
                raise ConfigError(
                    "evaluation without training needs a checkpoint: add ckpt_path=<run folder> (or its "
                    "checkpoints/last.ckpt), or backbone.weights=FILE for a backbone that loads pretrained weights "
                    "(e.g. backbone=resnet50)"
                )
            rows = _run(cfg, output_dir, earlier)
            stop_if_terminated()  # came after the evaluation, as it wrote its results
            return rows
        except SIGTERMException:
            # Lightning stops at the next training step with a SystemExit of status 0, which would pass for a success
            forget_sigterm()
            again = "resume with ckpt_path=last" if cfg.train else "rerun the evaluation"
            record_failure(output_dir, SIGTERMException(f"terminated by SIGTERM; {again}"), earlier)
            if global_rank() == 0:
                print(_stopped_line(cfg, output_dir), file=sys.stderr)
            exit_terminated()
        except KeyboardInterrupt:  # Ctrl-C: FAILED.txt as for SIGTERM (the run exited 1 and left nothing)
            forget_sigterm()
            again = "resume with ckpt_path=last" if cfg.train else "rerun the evaluation"
            record_failure(output_dir, KeyboardInterrupt(f"interrupted (Ctrl-C); {again}"), earlier)
            if global_rank() == 0:
                print(_stopped_line(cfg, output_dir, "Ctrl-C"), file=sys.stderr)
            raise
        except Exception as err:
            forget_sigterm()  # a SIGTERM noted before this failure must not stop the process's next run
            # the user's mistake as the console shows it (a DataLoader worker's or a DDP rank's error arrives as its
            # whole traceback text, which ood-report would print as one long line)
            record_failure(output_dir, user_error(err) or err, earlier)
            raise


def _sweep_dir() -> Path | None:
    """The sweep folder of a multirun's job (`hydra.sweep.dir`; its job folders may lie deeper than one level), else
    None."""
    return Path(HydraConfig.get().sweep.dir) if in_multirun() else None


def _unnamed_sweep_dir() -> Path | None:
    """`_sweep_dir` when the command line did not name it (Hydra's dated default): there a `ckpt_path=last` that finds
    no checkpoint is the usual mistake, a stopped sweep resumed into a new folder; where it names the folder
    (`make reproduce-* RESUME=1` before a stage's first checkpoint), its jobs just start."""
    named = in_multirun() and any(o.lstrip("+").split("=", 1)[0] == "hydra.sweep.dir"
                                  for o in HydraConfig.get().overrides.hydra)
    return None if named else _sweep_dir()


def _stopped_line(cfg: DictConfig, output_dir: Path, by: str = "SIGTERM") -> str:
    """The console's line for a run stopped `by` SIGTERM (it ended with status 143 and nothing on the console, a
    cluster job's log showing no reason) or Ctrl-C (a traceback alone): the folder, and what to add to the command to
    go on in that folder."""
    if not cfg.train:
        return f"stopped by {by}: {output_dir}: rerun the evaluation"
    where = f"hydra.sweep.dir={_sweep_dir()}" if in_multirun() else f"hydra.run.dir={output_dir}"
    if (output_dir / "checkpoints" / "last.ckpt").is_file():
        state = "keeps its last completed epoch's checkpoint; resume it"
    elif (output_dir / RESUMED_FILE).is_file():  # `ckpt_path=last` goes on from the checkpoint this attempt resumed
        state = "saved no checkpoint of its own yet (stopped in the first epoch it ran); resume the one it started from"
    else:
        state = "has no checkpoint yet (stopped in its first epoch); start it again there"
    return f"stopped by {by}: {output_dir} {state} with the same command plus ckpt_path=last {where}"


def evaluated_weights(cfg: DictConfig, given: Sequence[str]) -> str | None:
    """`evaluation.weights` as the run reads it (the command line's overrides `given`): train.yaml's `last` is a
    training's default, so an evaluation (`train=false`) that does not name the key reads a run folder's checkpoint
    as `ood-eval` does, the one its training evaluated (None: `best.ckpt` of a `best_val_acc` run); `ood-train
    train=false ckpt_path=<run>` evaluated its `last.ckpt` where `ood-eval ckpt_path=<run>` evaluated `best.ckpt`."""
    weights = cfg.evaluation.get("weights", "last")
    named = any(o.partition("=")[0].lstrip("+~") == "evaluation.weights" for o in given)
    return None if not cfg.train and weights == "last" and not named else weights


def _best_weights(trainer: L.Trainer) -> str:
    """The `checkpoints/best.ckpt` a fit with `evaluation.weights=best_val_acc` kept (`BestValAccuracy`)."""
    from ood.errors import CheckpointError
    from ood.runs.checkpoints import BestValAccuracy

    best = next(c for c in trainer.callbacks if isinstance(c, BestValAccuracy)).best_model_path  # type: ignore[attr-defined]
    if not best or not Path(best).is_file():
        raise CheckpointError(f"evaluation.weights=best_val_acc: no epoch's weights were kept ({best or 'none'}): no "
                              "validation ran; use evaluation.weights=last")
    return str(best)


def _run(cfg: DictConfig, output_dir: Path, attempt: Started) -> list[dict[str, Any]]:
    from ood.runs.checkpoints import (
        checkpoint_epoch,
        own_checkpoint_epoch,
        resolve_ckpt_path,
        resume_warnings_off,
    )
    from ood.runs.identity import WEIGHTS_FILES
    from ood.runs.loggers import finish_wandb

    # a sweep's job or a rerun into a folder of ours (its config.yaml, or the FAILED.txt of an attempt stopped before
    # that landed: `_stopped_line` tells it to add ckpt_path=last) resumes only its own checkpoint
    own_only = bool(cfg.train) and (in_multirun() or (output_dir / "config.yaml").is_file() or attempt.failed is not None)
    given = HydraConfig.get().overrides.task if HydraConfig.initialized() else ()
    weights = evaluated_weights(cfg, given)
    if not cfg.train:  # its config.yaml says which: null, the file the training evaluated (as ood-eval's)
        cfg.evaluation.weights = weights
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir, Path(cfg.paths.log_dir) / "train" / "runs", own_only,
                                  _unnamed_sweep_dir() if cfg.train else None, "last" if cfg.train else weights)
    check_run(cfg, ckpt_path, given)
    if cfg.evaluate and cfg.data.get("evaluate") is False:  # set in evaluate's place: it evaluated without OOD sets
        raise ConfigError("data.evaluate=false is the data config's copy of evaluate, which is true: this run would "
                          "evaluate without OOD sets; give evaluate=false (data.evaluate follows it), or data.evaluate=true")
    stop_if_terminated()  # also one that came while Hydra started: the run folder is there for FAILED.txt
    # an evaluated checkpoint's rows name the seed that trained it (its stored config), not the evaluation's, and its
    # paths made absolute by `ood-eval` started elsewhere are the same files as the training's relative ones
    stored = checkpoint_config(ckpt_path) if ckpt_path and not cfg.train else {}
    ident = run_identity(as_trained_paths(cfg, stored), _choices(), output_dir, ckpt_path)
    trained_seed = stored.get("seed")
    resume_epoch = own_checkpoint_epoch(ckpt_path, output_dir) if cfg.train else None
    if cfg.train and ckpt_path:  # the epoch read once: of the folder's own checkpoint just above, else of the file
        saved = resume_epoch if resume_epoch is not None else checkpoint_epoch(ckpt_path)
        log.info("resuming %s%s", ckpt_path, "" if saved is None else
                 f" from the end of epoch {saved} (counted from 0, as the progress bar and the CSV log count)")
    method, datamodule, trainer, evaluation = build(cfg, ident, trained_seed=trained_seed, resume_epoch=resume_epoch,
                                                    trained=stored)
    # `method.init` starts a new run from weights; a resumed run or an evaluated checkpoint brings its own
    method.apply_init(load=not ckpt_path)
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        if cfg.train and resume_epoch is None:  # trained anew, not resumed: an earlier attempt's results are another model's
            remove_earlier_results(output_dir)
        # config.yaml too: the earlier attempt's results go before it lands when they were made with other settings
        write_identity(output_dir, ident, OmegaConf.to_yaml(cfg, resolve=True))
    attempt.begin()  # from here a failure is this attempt's (its config.yaml has landed)
    if trainer.is_global_zero and cfg.train:
        record_resumed(output_dir, ckpt_path)
    try:
        # between the stages too (Lightning's handler and checks are there only during one), in one process; ranks
        # launched apart (trainer=ddp, torchrun) stop together at a step instead (ood.strategies.DDPStrategy)
        between_stages = stop_if_terminated if trainer.world_size == 1 else lambda: None
        between_stages()
        with ctrl_c_raised(trainer):  # recorded by `run` as the interruption it is
            if cfg.train:
                with resume_warnings_off() if ckpt_path else nullcontext():
                    trainer.fit(method, datamodule=datamodule, ckpt_path=ckpt_path)
                evaluated = _best_weights(trainer) if weights == "best_val_acc" and cfg.evaluate else None
                if evaluated:
                    load_weights(method, evaluated, cfg)
            else:
                evaluated = ckpt_path
                if ckpt_path:
                    load_weights(method, ckpt_path, cfg)
            # the rows of the best-ID-val-accuracy epoch's weights say which epoch that was (0-based, as the CSV log)
            epoch = checkpoint_epoch(evaluated) if evaluated and Path(evaluated).name == WEIGHTS_FILES["best_val_acc"] else None
            if epoch is not None:  # not OpenOOD's own best.ckpt (a state dict without its epoch)
                evaluation.info["evaluated_epoch"] = epoch
                log.info("evaluating %s: the weights of epoch %d, the best ID-val accuracy", evaluated, epoch)
            between_stages()
            if cfg.evaluate:
                trainer.test(method, datamodule=datamodule, verbose=False)
    finally:
        finish_wandb()
    results = output_dir / "results.jsonl"
    if not (cfg.evaluate and trainer.is_global_zero and results.is_file()):
        return evaluation.rows
    # read back from the file: with spawned DDP ranks the rows were computed in the child processes
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
@friendly_errors
def _main(cfg: DictConfig) -> float | None:
    run_modules()
    run(cfg)
    return sweep_objective(cfg.paths.output_dir, cfg.get("objective"))


def main() -> None:
    """`ood-train` entry point."""
    require_config_dir()
    check_argv("train")
    sweep_jobs_checked("train")
    with sigterm_noted(), failed_jobs_listed():  # sigterm: from here on, before Hydra makes the run folder
        _main()


if __name__ == "__main__":
    main()
