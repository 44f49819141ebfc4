"""`OODEvaluation`: the one evaluation callback behind `ood-train` (after fit) and `ood-eval`.

During `trainer.test` it caches, from one forward pass per split, whatever the method's `eval_outputs` returns
(a `RankZeroRows` per split: global rank 0 writes its rows in place, the other ranks keep theirs); at the end of the
epoch the other ranks' shards go to rank 0 only (DDP-exact: deduplicated on the dataset index), which builds a
`FeatureBank` per split (with the method's own linear head), hands them to the pure `Evaluator` (method score, every
detector, metrics) and broadcasts the `EvaluationResult`; every rank passes it to each configured sink (results file,
logger scalars, wandb, run table) with a `SinkContext` (its rank, loggers and `log_dict`). The datamodule under test
and its splits are read once, at the start of the test epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler, Subset

from ood import termination
from ood.data.benchmark import EvalSplit, OODDataModule
from ood.detectors.base import Detector, float16_detectors
from ood.detectors.network import LayerTaps
from ood.errors import ConfigError
from ood.evaluation.evaluator import EvaluationResult, Evaluator, NonFiniteBankError, Samples
from ood.evaluation.prepare import check_roles
from ood.evaluation.sinks import Sink, SinkContext, check_sink
from ood.features.bank import FeatureBank
from ood.features.collector import RankZeroRows, broadcast_from_rank_zero, rank_zero_group, release_group
from ood.features.reduce import sync_reducers
from ood.files import disk_usage
from ood.methods.base import OODMethod
from ood.precision import eager
from ood.utils import get_logger, loader_batches, progress

log = get_logger(__name__)

#: what global rank 0 broadcasts when SIGTERM stopped its evaluation: every rank then stops as by SIGTERM
STOPPED = "evaluation stopped by SIGTERM"
#: the lock file of each `<bank_dir>/banks-*` folder, locked by the evaluation that writes the folder for as long as it
#: runs: the kernel releases it however the process ends, so a folder whose lock is free was left by an evaluation
#: that died without cleaning up (SIGKILL, the out-of-memory killer, a dead machine). A POSIX record lock (`lockf`),
#: not an flock: the DataLoader workers the evaluation forks inherit an flock, which held a killed evaluation's folder
#: until they exited; a record lock is the process's own and no child's
SPILL_LOCK = ".lock"
#: seconds after which a hidden `.banks-*` staging folder without its lock file in place is taken for abandoned (its
#: evaluation was killed after making it, before locking it: nothing was written in it yet); a running evaluation
#: spends an instant there, so only one made this long ago (by the folder's time, with room for hosts' clocks to
#: differ on a shared disk) can be a dead one's
STAGING_GRACE_S = 3600
#: the lock files this process holds, (device, inode) -> the descriptor holding the lock: a record lock does not
#: keep the process's own probe out, and closing any descriptor of the file would release it, so
#: `remove_abandoned_spills` leaves them unopened
_HELD: dict[tuple[int, int], int] = {}


class OODEvaluation(Callback):
    """Cache one pass per split, evaluate, hand the result to the sinks.

    Args:
        evaluator: the pure evaluator (detectors, fixed parameters, tuning).
        sinks: named sinks (`ood.evaluation.sinks`), called in order.
        info: run facts copied into every result row (backbone, seed, ...).
        feature_dtype: `float32`, or `float16` to collect, gather and keep the penultimate features in half
            precision (half the memory of every bank at ImageNet scale; detectors with `float16_features` only).
        bank_dir: None keeps the gathered banks in RAM (on the module's device); a directory puts them in
            memory-mapped `<bank_dir>/banks-*/<split>/<field>.npy` files on rank 0 (CPU; deleted after the
            evaluation, and those of an evaluation killed before it could delete them by the next one there).
        fsood: add full-spectrum rows (OpenOOD's `fsood`: ID = ID test + every covariate-shifted ID set), computed
            from the same pass; the datamodule must serve the csid sets (`data.csid`, set from this key).
        standard: the standard rows (ID = ID test); `standard=false fsood=true` is OpenOOD's fsood-only table.
        weights: which weights of a training run its evaluation reads, for the entry point that loads them
            (`ood.train`): `last` (the last epoch's), `best_val_acc` (`checkpoints/best.ckpt`, the epoch of highest
            ID-val accuracy, as OpenOOD) or None (`ood-eval`: those the run was trained to evaluate).

    Under DDP each rank's shard goes to global rank 0 only, which builds the banks and evaluates; the other ranks
    receive the result (rows, scores, diagnostics) and run the same sinks (those that write act on rank 0).
    """

    def __init__(
        self,
        evaluator: Evaluator,
        sinks: Mapping[str, Sink] | Sequence[Sink] = (),
        info: Mapping[str, Any] | None = None,
        feature_dtype: str = "float32",
        bank_dir: str | Path | None = None,
        fsood: bool = False,
        standard: bool = True,
        weights: str | None = "last",
    ) -> None:
        self.weights = weights
        self.modes = tuple(m for m, on in (("standard", standard), ("fsood", fsood)) if on)
        if not self.modes:
            raise ConfigError("evaluation.standard=false and evaluation.fsood=false leave nothing to evaluate; turn one on")
        if feature_dtype not in ("float32", "float16"):
            raise ConfigError(f"evaluation.feature_dtype={feature_dtype!r} is unknown; choices: ['float32', 'float16']")
        unsafe = sorted(c.name for c in evaluator.detectors if not c.float16_features) if feature_dtype == "float16" else []
        if unsafe:
            raise ConfigError(f"evaluation.feature_dtype=float16 supports the detectors {float16_detectors()}; not {unsafe}: "
                              f"add detectors.exclude=[{','.join(unsafe)}] to score the others in float16, or keep "
                              f"evaluation.feature_dtype=float32")
        self.feature_dtype = getattr(torch, feature_dtype)
        self.bank_dir = Path(bank_dir).expanduser() if bank_dir is not None else None  # `~/x`: a folder named ~ else
        self.evaluator = evaluator
        named = list(sinks.items()) if isinstance(sinks, Mapping) else [(str(i), sink) for i, sink in enumerate(sinks)]
        for name, sink in named:
            check_sink(name, sink)
        self.sinks = [sink for _, sink in named]
        #: run facts for every result row, handed to the evaluator with each evaluation (its own state stays its own)
        self.info = dict(info or {})
        self.result: EvaluationResult | None = None
        self._collectors: dict[int, RankZeroRows] = {}
        self._sizes: list[int] = []
        self._spill: Path | None = None
        self._spill_lock: int | None = None  # the descriptor holding `self._spill`'s lock
        self._taps: LayerTaps | None = None
        #: the datamodule of the running test pass and its splits, read once at its start (`on_test_epoch_start`)
        self._data: OODDataModule | None = None
        self._splits: list[EvalSplit] = []

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The result rows of the last evaluation (empty before one)."""
        return self.result.rows if self.result is not None else []

    # ----- collection ----------------------------------------------------------------------------------------
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the datamodule Lightning tests (its loaders are this pass's), read once: the later hooks use it and its splits
        datamodule = trainer.datamodule
        check_roles(type(self).__name__, pl_module, datamodule)
        self._collectors, self.result = {}, None
        self._data, self._splits = datamodule, datamodule.eval_splits
        loaders = trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, Sequence) else [loaders]
        self._sizes = [split_rows(loader, batches) for loader, batches in zip(loaders, trainer.num_test_batches)]
        if trainer.is_global_zero:
            self._open_spill()
        pl_module.begin_evaluation(self._splits)
        # per-sample maps the detectors declare (`taps`: Gram features, stage means) cached from this same pass
        self._taps = LayerTaps(pl_module, self.evaluator.detectors)

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._taps is not None:
            outputs = {**outputs, **self._taps.pop()}
        if dataloader_idx not in self._collectors:
            name = self._splits[dataloader_idx].name
            out_dir = None if self._spill is None else self._spill / name
            self._collectors[dataloader_idx] = RankZeroRows(self._sizes[dataloader_idx], pl_module.device, out_dir)
        # banks are float32 whatever the trainer precision (bf16/fp16 autocast outputs would break float64 detectors)
        self._collectors[dataloader_idx].update(**{
            k: v.to(self.feature_dtype) if k == "features" else v.float() if v.is_floating_point() else v
            for k, v in outputs.items()
        })

    def _open_spill(self) -> None:
        """With `bank_dir`: a fresh directory under it for this evaluation's memory-mapped banks (`self._spill`),
        locked as this evaluation's until `_release`. The folders that evaluations killed there left are removed
        first: each held a copy of every bank (15.6 GB for ImageNet's fit split), and a rerun made one more."""
        if self.bank_dir is None:
            return
        self.bank_dir.mkdir(parents=True, exist_ok=True)
        remove_abandoned_spills(self.bank_dir)
        # made and locked under a hidden name, then renamed: a `banks-*` folder is never seen without its lock
        staging = Path(tempfile.mkdtemp(prefix=".banks-", dir=self.bank_dir))
        self._spill_lock = lock_spill(staging)
        self._spill = staging.with_name(staging.name[1:])
        staging.rename(self._spill)

    def _release(self) -> None:
        """Drop the collected rows, this evaluation's memory-mapped banks and the datamodule read at its start (after
        it, or when it failed)."""
        self._collectors, self._data, self._splits = {}, None, []
        if self._spill is not None:
            remove_spill(self._spill)
            self._spill = None
        if self._spill_lock is not None:
            unlock_spill(self._spill_lock)
            self._spill_lock = None

    def _remove_taps(self) -> None:
        """Unhook the layer taps (after the pass, or when it failed: left hooked, every later forward of the network
        would keep appending maps nothing reads)."""
        if self._taps is not None:
            self._taps.remove()
            self._taps = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._remove_taps()
        self._release()

    def _banks(self, splits: Sequence[EvalSplit], pl_module: OODMethod, group: Any = None) -> dict[str, FeatureBank] | None:
        """Every split's bank on global rank 0 (None elsewhere): the other ranks send their shards to rank 0 only
        (`RankZeroRows.gather`), into RAM or, with `bank_dir`, into memory-mapped files; shards are freed as sent."""
        weight, bias = (t.detach().float() for t in pl_module.linear_head())
        banks = {}
        for i, split in enumerate(splits):
            if i not in self._collectors:
                raise RuntimeError(f"evaluation split {split.name!r} produced no batches")
            data = self._collectors.pop(i).gather(group)
            if data is None:
                continue
            labels = data.pop("labels")
            device = data["logits"].device  # a memory-mapped bank (bank_dir) of a GPU run is scored on the CPU
            banks[split.name] = FeatureBank(
                logits=data.pop("logits"),
                features=data.pop("features"),
                labels=labels if split.role in ("fit", "id_val", "id_test", "csid") else None,
                weight=weight.to(device),
                bias=bias.to(device),
                index=data.pop("index"),
                extras=data,
            )
        return banks or None

    # ----- evaluation ----------------------------------------------------------------------------------------
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Gather to global rank 0, evaluate there, broadcast the (small) result to every rank, run the sinks.

        Collectives a method needs (its `ood.features.reduce` reducers) run first, on every rank; the evaluation
        itself (setup, detectors, input-perturbing passes over the raw loaders) uses no collective.
        """
        assert isinstance(pl_module, OODMethod)
        self._remove_taps()
        datamodule, splits = self._data, self._splits
        assert datamodule is not None, "on_test_epoch_start reads the datamodule"
        sync_reducers()
        group = rank_zero_group()
        try:
            banks = self._banks(splits, pl_module, group)
            outcome: EvaluationResult | str | None = None
            error: Exception | None = None
            if banks is not None:
                try:
                    outcome = self._evaluate(datamodule, splits, pl_module, banks,
                                             lambda: stop_if_terminated(trainer), trainer.precision)
                except SIGTERMException:
                    outcome = STOPPED  # every rank stops below, once they know
                except Exception as err:  # noqa: BLE001 - re-raised below, once the other ranks know
                    outcome, error = f"evaluation failed on global rank 0: {err!r}", err
                del banks
            outcome = broadcast_from_rank_zero(outcome, group)
        finally:
            release_group(group)
            self._release()
        if outcome == STOPPED:
            raise SIGTERMException
        if error is not None:
            raise error
        if isinstance(outcome, str):
            raise RuntimeError(outcome)
        assert isinstance(outcome, EvaluationResult)
        self.result = outcome
        context = SinkContext(trainer.is_global_zero, trainer.loggers, pl_module.log_dict)
        for sink in self.sinks:
            sink.write(self.result, context)

    def _evaluate(
        self, datamodule: OODDataModule, splits: Sequence[EvalSplit], pl_module: OODMethod,
        banks: dict[str, FeatureBank], stop: Callable[[], None], precision: str,
    ) -> EvaluationResult:
        """The evaluation on global rank 0; `stop()` raises `SIGTERMException` once SIGTERM came, checked before it
        starts and at every batch of its network passes (hours on ImageNet: a scheduler's SIGKILL would otherwise
        end it with nothing recorded); `precision`: the trainer's, which a NaN bank's error names."""
        stop()
        loaders = dict(zip([s.name for s in splits], datamodule.test_dataloader()))
        banks, notes = datamodule.screen(banks)  # e.g. ID/OOD duplicates listed, or dropped before the metrics

        def model_scores(det: Detector, split: str, rows: torch.Tensor | None = None) -> torch.Tensor:
            # the bank's rows are the dataset rows a screen kept, when it dropped some
            return self._model_scores(det, pl_module, loaders[split], banks[split].index, rows,
                                      desc=f"network pass over {split}", stop=stop)

        try:
            result = self.evaluator.evaluate(
                pl_module,
                banks,
                splits,
                id_dataset=datamodule.name,
                data_facts={"input_std": datamodule.benchmark.input_std},
                model_scores=model_scores,
                modes=self.modes,
                info=self.info,
            )
        except NonFiniteBankError as err:  # the pass's own output (a detector's network passes run without autocast)
            if precision != "16-mixed":
                raise
            raise NonFiniteBankError(f"{err}; the pass ran in float16 (trainer precision 16-mixed), whose activations overflow "
                                 "above 65504: use bf16-mixed, or fp32 (trainer=gpu)") from err
        for row in result.rows:
            row.update(notes.get(row["ood_dataset"], {}))
        return dataclasses.replace(result, samples=split_samples(datamodule, banks, result.scores))

    @staticmethod
    def _model_scores(
        det: Detector,
        pl_module: LightningModule,
        loader: DataLoader,
        index: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        desc: str = "network pass",
        stop: Callable[[], None] = lambda: None,
    ) -> torch.Tensor:
        """Scores of an input-perturbing detector (an extra pass for it alone, with gradients enabled) on the bank's
        rows, or with `rows` on those bank rows only, in that order (the loader's dataset restricted to them);
        `index`: the dataset row of each bank row (None: the same). The detector sees the method's own logits
        (`pl_module(x)`), e.g. a contrastive method's linear probe; modules compiled by `trainer=gpu_fast` run
        eagerly here (`ood.precision.eager`: input gradients with `retain_graph`)."""
        if rows is not None:
            loader = rows_loader(loader, rows.cpu() if index is None else index.cpu()[rows.cpu()])
        chunks = []
        with torch.inference_mode(False), torch.enable_grad(), eager(), loader_batches(loader) as batches:
            for batch in progress(batches, desc=desc):
                stop()
                chunks.append(det.score_inputs(pl_module, batch.x.to(pl_module.device)).detach())
        scores = torch.cat(chunks)
        if rows is not None or index is None or len(index) == len(scores):
            return scores
        return scores[index.to(scores.device)]


def lock_spill(folder: Path) -> int:
    """Lock `folder` as the running evaluation's (see `SPILL_LOCK`); returns the descriptor that holds the
    lock until `unlock_spill`. The lock is taken on a temporary name and renamed into place, so
    `remove_abandoned_spills` never finds the lock file unlocked while its evaluation runs."""
    tmp = folder / f"{SPILL_LOCK}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
    except OSError as err:  # a file system without locks (some network mounts): no `.lock`, so never taken for dead
        log.warning("evaluation.bank_dir=%s cannot lock files (%s): should this evaluation be killed, delete %s "
                    "yourself", folder.parent, err, folder)
        return fd
    st = os.fstat(fd)
    _HELD[st.st_dev, st.st_ino] = fd
    os.replace(tmp, folder / SPILL_LOCK)
    return fd


def unlock_spill(fd: int) -> None:
    """Release the lock `lock_spill` returned (closing its descriptor)."""
    st = os.fstat(fd)
    _HELD.pop((st.st_dev, st.st_ino), None)
    os.close(fd)


def remove_spill(folder: Path) -> None:
    """Remove a `banks-*` folder, its lock file last: until then an evaluation looking for abandoned folders finds it
    locked, so kept, not without a lock file (named as an older version's; removing gigabytes takes seconds)."""
    try:
        children = [child for child in folder.iterdir() if child.name != SPILL_LOCK]
    except OSError:
        children = []
    for child in children:
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # as rmtree's ignore_errors
                child.unlink()
    shutil.rmtree(folder, ignore_errors=True)


def _held_here(lock: Path) -> bool:
    """Whether this process holds `lock` (`_HELD`; a descriptor closed without `unlock_spill` holds nothing)."""
    try:
        st = lock.stat()
        fd = _HELD[st.st_dev, st.st_ino]
        held = os.fstat(fd)
    except (OSError, KeyError):
        return False
    return (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino)


def _lock_free(lock: Path) -> bool | None:
    """Whether no process holds the lock file `lock` (its evaluation ended or died); None when there is no such file.
    One that cannot be opened (another user's, mode 0700) or probed (the file system cannot tell) reads as held."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return None
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # its evaluation is running (or the file system cannot tell)
        return False
    finally:
        os.close(fd)
    return True


def _staged_long_ago(folder: Path) -> bool:
    """Whether the entries of `folder` last changed over `STAGING_GRACE_S` ago (False for a folder gone meanwhile:
    renamed to `banks-*` by its evaluation)."""
    try:
        return time.time() - folder.stat().st_mtime > STAGING_GRACE_S
    except OSError:
        return False


def remove_abandoned_spills(bank_dir: Path) -> list[Path]:
    """Remove the `banks-*` folders under `bank_dir` whose evaluation died without cleaning up (their lock is free);
    those of evaluations still running (this machine's, or another's on a shared disk) stay. Those without a lock
    file (left by versions of ood before the locks, or by one on a file system without them) stay too, named in a
    warning with their size: nothing tells them from a running evaluation's. The hidden `.banks-*` folders a new one
    is staged in (`OODEvaluation._open_spill`) go by the same rule, and one an evaluation killed before its lock was
    in place (nothing written in it) once made `STAGING_GRACE_S` ago. Returns the removed."""
    removed, lockless = [], []
    for folder in sorted([*bank_dir.glob("banks-*"), *bank_dir.glob(".banks-*")]):
        lock = folder / SPILL_LOCK
        if _held_here(lock):  # this process's own evaluation
            continue
        free = _lock_free(lock)
        if free is None and folder.name.startswith("."):
            free = _staged_long_ago(folder)
        elif free is None:  # an evaluation's that took no lock (no file locks there, or an older ood)
            if folder.is_dir():
                lockless.append(folder)
            continue
        if free:
            remove_spill(folder)
            removed.append(folder)
    if removed:
        log.warning("removed %d memory-mapped bank folder(s) of evaluations killed before cleaning up: %s",
                    len(removed), ", ".join(map(str, removed)))
    if lockless:
        log.warning("evaluation.bank_dir=%s holds bank folder(s) without a lock file, so kept (left by a version of "
                    "ood before the locks, or by an evaluation on a file system without them): %s; remove it if no "
                    "evaluation is running", bank_dir, ", ".join(f"{f} ({disk_usage(f)})" for f in lockless))
    return removed


def split_rows(loader: DataLoader, batches: float) -> int:
    """The dataset rows the first `batches` batches of `loader` can hold (its dataset length at most): the rows rank 0
    allocates for the split. An unshuffled loader (sequential, or Lightning's unshuffled `DistributedSampler`) reads
    its dataset in order, so under `trainer.limit_test_batches` its rows lie below that bound; another sampler may read
    any row. A GPU smoke test of ImageNet with `limit_test_batches=5` otherwise allocated the 15.6 GB fit bank."""
    size = len(loader.dataset)  # type: ignore[arg-type]
    sampler, per_batch = loader.sampler, loader.batch_size
    if type(sampler) is DistributedSampler and not sampler.shuffle:
        per_batch = None if per_batch is None else per_batch * sampler.num_replicas
    elif not isinstance(sampler, SequentialSampler):
        return size
    if per_batch is None or batches == float("inf"):
        return size
    return min(size, int(batches) * per_batch)


def split_samples(
    datamodule: OODDataModule, banks: Mapping[str, FeatureBank], scores: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[str, Samples]:
    """The image of each score row of every scored split: the bank's rows are the dataset rows it kept (sorted)."""
    out = {}
    for split in dict.fromkeys(s for per_split in scores.values() for s in per_split):
        bank = banks[split]
        index = bank.index.tolist() if bank.index is not None else list(range(len(bank.logits)))
        labels = bank.labels.tolist() if bank.labels is not None else [-1] * len(index)
        out[split] = Samples(index, labels, datamodule.sample_names(split, index))
    return out


def stop_if_terminated(trainer: Trainer) -> None:
    """Raise `SIGTERMException` when this process was sent SIGTERM: Lightning's flag, or ood's record
    (`ood.termination`; under ood's `DDPStrategy`, which replaces Lightning's handler, the only one)."""
    if trainer.received_sigterm:
        raise SIGTERMException
    termination.stop_if_terminated()


def rows_loader(loader: DataLoader, dataset_rows: torch.Tensor) -> DataLoader:
    """`loader` over the rows `dataset_rows` of its dataset only, in that order (same batches, collation and workers;
    the workers are not kept after the pass)."""
    return DataLoader(
        Subset(loader.dataset, dataset_rows.tolist()),
        batch_size=loader.batch_size,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        collate_fn=loader.collate_fn,
    )
