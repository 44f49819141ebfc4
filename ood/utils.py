"""Small shared helpers: the one `instantiate`, rank-aware logging, progress bars, finiteness checks, a linear head's
(W, b)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from tqdm.asyncio import tqdm as console_tqdm
from tqdm.auto import tqdm
from tqdm.std import tqdm as std_tqdm

from ood.errors import ConfigError, NonFiniteError, OODError, check_range

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's or `taskset`'s share), as torch's DataLoader
    counts them when it warns of more workers than CPUs."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def capped_workers(cap: int) -> int:
    """`cap` DataLoader workers, or the CPUs this process may use when fewer: 4 workers on a 2-CPU machine made torch
    warn of 'excessive worker creation' at every loader. The data configs' default, `num_workers: ${ood.workers:N}`:
    on a machine with N CPUs or more the count is N, as the configs had it (training augmentation draws per worker)."""
    check_range("the worker cap of ${ood.workers:N}", cap, 0, integer=True)
    return min(cap, usable_cpus())


# registered with the one instantiate helper, so whatever composes and instantiates a config resolves the data
# configs' `${ood.workers:N}` (each run, each DDP rank: the CPUs of the machine that loads the data)
OmegaConf.register_new_resolver("ood.workers", capped_workers, replace=True)


#: a call's refusal of its keywords (`C.__init__() got an unexpected keyword argument 'x'`, `missing 1 required ...`),
#: the refusing callable's qualified name first
_BAD_KEYWORDS = re.compile(r"^([\w.<>]+)\(\) (?:got an unexpected keyword argument|missing \d+ required .*argument)")


def instantiate(node: Any, **kwargs: Any) -> Any:
    """Build an object from a `_target_` config node: the single entry point for dependency injection.

    `kwargs` are runtime objects (a backbone, callbacks) that the config cannot hold. A node without `_target_` (a
    user's `conf/method/<name>.yaml` that forgot it: Hydra returned a plain dict, which failed far away) and a key
    its `_target_` does not take (Hydra's five-line `TypeError`) are refused in one line naming the node.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    key = node._get_full_key(None) if isinstance(node, DictConfig) else "the config"
    if isinstance(node, DictConfig | dict) and "_target_" not in node:
        raise ConfigError(f"{key} has no _target_: add `_target_: <module>.<Class>`, the class it builds (a method: "
                          "your OODMethod subclass), or inherit one with `defaults: [<option>, _self_]`")
    try:
        return hydra_instantiate(node, _convert_="partial", **kwargs)
    except InstantiationException as err:
        # surface our own user-facing errors (unknown names, missing data) instead of Hydra's wrapper
        cause = err.__cause__
        while cause is not None and not isinstance(cause, OODError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        refusal = _keyword_refusal(err, node, key, set(kwargs))
        if refusal is not None:
            raise refusal from None
        raise


def _keyword_refusal(err: Exception, node: Any, key: str, given: Collection[str] = ()) -> ConfigError | None:
    """The one line for `node` (at `key`), or the nested `_target_` node Hydra's error names, having a key its
    `_target_` does not take, naming that node and its `_target_` as written (or, for a keyword ood passes at run
    time, `given`: a backbone's `num_classes` / `in_channels`, that the class must take it); None when the TypeError
    is not the target's own refusal of its keywords (one raised inside its constructor is a bug of the class, not of
    the config)."""
    from hydra.utils import get_object

    text, cause = str(err), err.__cause__
    refused = _BAD_KEYWORDS.match(str(cause)) if isinstance(cause, TypeError) else None
    target = re.search(r"call to target '([^']+)'", text)
    if refused is None or target is None:
        return None
    try:
        called = get_object(target[1])
    except Exception:  # noqa: BLE001 - not locatable again: no claim about it
        return None
    own = {f"{c.__qualname__}.__init__" for c in getattr(called, "__mro__", ())} | {getattr(called, "__qualname__", "")}
    if refused[1] not in own:
        return None
    where = re.search(r"^full_key: (\S+)$", text, re.M)
    if where is not None:  # the node Hydra refused, by its key in the whole config
        key, node = where[1], OmegaConf.select(node._get_root(), where[1]) if isinstance(node, DictConfig) else None
    written = node.get("_target_", target[1]) if isinstance(node, DictConfig | dict) else target[1]
    passed = re.search(r"unexpected keyword argument '(\w+)'", str(cause))
    if passed is not None and passed[1] in given and passed[1] not in (node or {}):
        return ConfigError(f"{key}: {cause} (_target_: {written}); ood passes {passed[1]}= to it at run time (from the "
                           f"data): give the class an `{passed[1]}` argument")
    return ConfigError(f"{key}: {cause} (_target_: {written}); every key of {key} but _target_ is a keyword of that "
                       f"class: fix the key, or set {key}._target_ to the class that takes it")


@contextlib.contextmanager
def warnings_in_log_files() -> Iterator[None]:
    """Python warnings (Lightning's, torch's) also written to the root logger's log files (Hydra's `train.log`) as
    `py.warnings` records, and shown as before: they used to reach the console only. Wraps `warnings.showwarning`,
    so `warnings.catch_warnings(record=True)` (`pytest.warns`) still records them."""
    previous = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        previous(message, category, filename, lineno, file, line)
        text = f"{filename}:{lineno}: {category.__name__}: {message}"  # one line, without the source line
        record = logging.LogRecord("py.warnings", logging.WARNING, filename, lineno, text, None, None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


#: where Lightning reads a process's rank as it is imported, first found first (`_get_rank` of
#: lightning/fabric/utilities/rank_zero.py): a SLURM task or a torchrun rank is known before Lightning is imported
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def global_rank() -> int:
    """This process's global rank as Lightning has it (`rank_zero_only.rank`, set from the launcher's environment as
    Lightning is imported and by its strategy as ranks start); before Lightning is imported, the launcher's
    environment as Lightning reads it (`RANK_VARIABLES`), else 0 (this module does not import Lightning: `ood-report`
    and the entry points' start-up stay without it)."""
    rank_zero = sys.modules.get("lightning_utilities.core.rank_zero")
    rank = getattr(rank_zero.rank_zero_only, "rank", None) if rank_zero is not None else None
    if rank is None:
        rank = next((int(os.environ[key]) for key in RANK_VARIABLES if key in os.environ), 0)
    return rank


def _on_rank_zero(log: Callable[..., None]) -> Callable[..., None]:
    """`log` called on global rank zero only (`global_rank`, read at each call)."""

    @functools.wraps(log)
    def wrapped(*args: Any, **kwargs: Any) -> None:
        if global_rank() == 0:
            log(*args, **kwargs)

    return wrapped


def get_logger(name: str) -> logging.Logger:
    """A logger whose records are emitted on global rank zero only (DDP ranks stay quiet)."""
    logger = logging.getLogger(name)
    if getattr(logger, "_ood_rank_zero", False):
        return logger
    logger._ood_rank_zero = True  # type: ignore[attr-defined]
    for level in ("debug", "info", "warning", "error", "exception", "fatal", "critical"):
        setattr(logger, level, _on_rank_zero(getattr(logger, level)))
    return logger


#: whether ood's own progress bars (passes, detector fitting and scoring, image decoding) may show: the entry points
#: follow `trainer.enable_progress_bar` (`progress_bars`); the Python API keeps them with Lightning's bar off
_BARS: ContextVar[bool] = ContextVar("ood_progress_bars", default=True)


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Show (on a terminal) or hide every `progress` bar started inside the block."""
    token = _BARS.set(enabled)
    try:
        yield
    finally:
        _BARS.reset(token)


#: off a terminal (a batch job's log file), a loop's progress is logged once it has run this long, then this often
LOG_EVERY_S = 30.0


class _LogLines:
    """A file for tqdm that logs each refresh of a bar as one INFO line of the `ood.progress` logger."""

    def write(self, text: str) -> None:
        line = text.strip()
        if line:
            get_logger("ood.progress").info(line)

    def flush(self) -> None:
        pass


def progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar that is not left on screen, hidden inside `progress_bars(False)`. Shown on a terminal (or as a
    notebook widget); elsewhere, a batch job's log, a loop that runs past `LOG_EVERY_S` is logged every
    `LOG_EVERY_S` (before, a 10-minute network pass on the CPU logged nothing)."""
    if not _BARS.get():
        return tqdm(iterable, disable=True, **kwargs)
    file = kwargs.pop("file", None) or sys.stderr
    if tqdm is not console_tqdm or getattr(file, "isatty", lambda: False)():  # tqdm.auto's is console_tqdm unless in a notebook
        return tqdm(iterable, leave=False, file=file, **kwargs)
    return std_tqdm(iterable, leave=False, file=_LogLines(), mininterval=LOG_EVERY_S, delay=LOG_EVERY_S,
                    bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]", **kwargs)


@contextlib.contextmanager
def loader_batches(loader: DataLoader) -> Iterator[Iterator[Any]]:
    """The batches of `loader`, its worker processes ended when the block ends, by an exception too. Left to the
    garbage collector (an exception's traceback holds the iterator in a reference cycle), torch's shutdown of a
    loader's workers finds the queue that tells them to stop already closed, and waits 5 s for each before killing
    it. A persistent loader's workers are its own to keep."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multiprocessing iterator (what `del` calls)
        if shutdown is not None and not loader.persistent_workers:
            shutdown()


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """float32 convolutions and matrix products in full float32 precision (no TF32 or bf16 shortcuts: cuDNN runs
    convolutions in TF32 by default on Ampere and later GPUs) by deterministic algorithms (no cuDNN benchmark
    choice); the caller's settings put back after, also on an exception. Through the per-operator `fp32_precision`
    on torch >= 2.9 (its legacy `allow_tf32` getters refuse a state set through those, cuDNN conv and RNN differing),
    else `allow_tf32` and the float32 matmul precision (whose string `allow_tf32` would not put back)."""
    import torch

    cudnn = torch.backends.cudnn
    per_operator = hasattr(cudnn, "conv")
    if per_operator:
        settings = [(op, "fp32_precision", "ieee") for op in (cudnn.conv, torch.backends.cuda.matmul,
                                                            torch.backends.mkldnn.conv, torch.backends.mkldnn.matmul)]
    else:
        settings = [(cudnn, "allow_tf32", False)]
    settings += [(cudnn, "deterministic", True), (cudnn, "benchmark", False)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in settings]
    precision = None if per_operator else torch.get_float32_matmul_precision()  # torch >= 2.9 refuses a mixed state
    try:
        for owner, name, value in settings:
            setattr(owner, name, value)
        if precision is not None:
            torch.set_float32_matmul_precision("highest")
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        if precision is not None:
            torch.set_float32_matmul_precision(precision)


def check_finite(values: torch.Tensor, what: str) -> None:
    """Raise `NonFiniteError` naming `what` when `values` holds NaN or +-inf."""
    bad = ~values.isfinite()
    if bool(bad.any()):
        n_bad = int(bad.sum())
        raise NonFiniteError(f"{what}: {n_bad} of {values.numel()} values are NaN or infinite")


def linear_params(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [C, D], b [C]) of a final linear layer; b is zeros for a layer built with `bias=False` (cosine or bias-free
    heads), which computes W h + 0."""
    weight = layer.weight
    bias = layer.bias if layer.bias is not None else weight.new_zeros(weight.shape[0])
    return weight, bias
