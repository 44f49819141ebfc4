"""The Python API: `ood.evaluate(model, id_data, ood_data)` (or `benchmark=<name>`) and `ood.extract(model, data)`.

`evaluate` is `ood-eval` called from Python: it composes the same Hydra config (`data=folder`, or `data=<benchmark>`
for a benchmark of the data group; `backbone=timm | torchvision | module`, the method, the detectors, the trainer),
builds the same objects with `ood.train.build` (the user's model wrapped by `ood.models.adapters.as_backbone`, Python
objects such as Datasets or a transform handed to the folder data node), and runs the same `trainer.test` pass: the
one cached pass, the same evaluator and sinks, DDP-exact under a multi-device trainer (`overrides=["trainer=ddp_cpu"]`).
Its `Results` are read back from the run folder the sinks wrote (`results.jsonl`, `scores.npz`, `samples.csv`,
`overlap.json`), as a CLI run leaves them.

`extract` runs one pass over a folder or Dataset (`ood.features.passes.forward_dataset`) and returns the
`FeatureBank` every detector takes (`build_detector(name).fit(bank).score(bank)`).
"""

from __future__ import annotations

import atexit
import functools
import inspect
import itertools
import json
import logging
import numbers
import os
import pickle
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ood.errors import ConfigError
from ood.files import atomic_write_text

METRIC_COLUMNS = ("auroc", "fpr95", "fpr95_oodpos", "aupr_in", "aupr_out")
#: the keyword of `evaluate` / `extract` for each loader option of the datamodule (`check_loader_options`)
LOADER_KEYWORDS = {"eval_batch_size": "batch_size", "num_workers": "num_workers", "fit_fraction": "fit_fraction"}
#: the keywords of `evaluate` that set a config key -> that key, which the caller's overrides must not set to another
#: value (`_check_keywords_against`); `detectors` a config of its group by name (`all`, `fast`) sets the `detectors`
#: group, and each `data` keyword (`image_size=`, `classes=`, ...) sets `data.<name>`
KEYWORD_KEYS = {"seed": "seed", "batch_size": "data.eval_batch_size", "num_workers": "data.num_workers",
                "fsood": "evaluation.fsood", "method": "method", "detectors": "detectors.names", "benchmark": "data",
                "data_dir": "paths.data_dir"}
#: the folder-data keys (conf/data/folder.yaml) that `evaluate` sets from its own arguments -> those arguments: as
#: `data` keywords they replaced them in silence (`root=` evaluated another folder than `id_data`)
ARGUMENT_KEYS = {
    "eval_batch_size": "batch_size= (the evaluation's batch size)",
    "root": "id_data=<folder>", "train": "id_data={'train': ...}", "test": "id_data={'test': ...}",
    "val": "id_data={'val': ...}", "ood": "ood_data=",
    "csid": "fsood= (the full-spectrum rows; the sets: ood_data={..., 'csid': {name: folder}})",
    "report_dir": "output_dir=",
}
#: those set after the compose from `id_data` / `ood_data` (an override of them was dropped without a word)
DATA_ARGUMENTS = ("root", "train", "test", "val", "ood")
_OUTLIERS = "it reads no outlier-exposure set; the OOD sets it scores are ood_data"
#: the folder-data options only a training reads (conf/data/folder.yaml) -> what `evaluate` does instead, refused
#: (`data.batch_size`, the training batch, cannot come as a data keyword: `batch_size=` sets the evaluation's)
TRAINING_OPTIONS = {
    "augment": "every split gets the evaluation preprocessing (transform=, or image_size / resize / mean / std)",
    "augment_outliers": _OUTLIERS,
    "drop_last": "its pass scores every image, the last partial batch too",
    "outlier_batch_size": _OUTLIERS,
    "outliers": _OUTLIERS,
    # data=folder's copy of ood-train's `evaluate` (OOD sets needed): an evaluation has them
    "evaluate": "it evaluates the OOD sets of ood_data, always (ood-train evaluate=false trains without them)",
}


@dataclass
class Results:
    """What one evaluation wrote: `rows` (results.jsonl), `scores` ({detector: {split: array}}), `overlap`
    (overlap.json), `samples` (samples.csv: the image of each score), `sensitivity` (sensitivity.jsonl: every grid
    point of the swept detectors on every test set, with `overrides=["detectors.sensitivity=true"]`; empty without),
    in `run_dir`; `table` is the pandas view, `metrics()` the scalars as one flat dict for a logger, `per_image()` the
    scores image by image."""

    run_dir: Path
    rows: list[dict[str, Any]]
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    overlap: dict[str, Any] = field(default_factory=dict)
    #: `pandas.DataFrame` of samples.csv (split, row, dataset_index, label, file); None when the run saved no scores
    samples: Any = None
    #: the sensitivity.jsonl rows, one per swept detector x grid point x (mode, OOD set): `params`, `chosen`,
    #: `val_auroc` and the test metrics (`ood.evaluation.scoring.sensitivity_rows`); empty when the option was off
    sensitivity: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dir(cls, run_dir: str | Path) -> Results:
        """The results a run (CLI or Python) left in `run_dir`."""
        run_dir = Path(run_dir)
        path = run_dir / "results.jsonl"
        if not run_dir.is_dir():  # "the evaluation did not finish" sent a mistyped path looking for a failure
            raise ConfigError(f"{run_dir}: {'a file, not a folder' if run_dir.exists() else 'no such folder'}; give the "
                              "run folder an evaluation wrote (its output_dir, or the `run folder:` ood-eval printed)")
        if not path.is_file():
            runs = sorted(p.parent.name for p in run_dir.glob("*/results.jsonl"))
            if runs:  # a folder of runs (logs/eval/runs, a sweep): not one that failed
                raise ConfigError(f"{run_dir} holds run folders, not one run's results: give one of them, e.g. "
                                  f"{run_dir / runs[-1]} ({len(runs)} here: {', '.join(runs[:4])}"
                                  f"{', ...' if len(runs) > 4 else ''}); `ood-report {run_dir}` compares them all")
            raise ConfigError(f"{run_dir} holds no results.jsonl: the evaluation did not finish")
        rows = _read_rows(path)
        scores: dict[str, dict[str, np.ndarray]] = {}
        if (run_dir / "scores.npz").is_file():
            with _readable(run_dir / "scores.npz", "a NumPy .npz archive", detail=False), np.load(run_dir / "scores.npz") as npz:
                for key in npz.files:
                    detector, _, split = key.rpartition("/")
                    scores.setdefault(detector, {})[split] = npz[key]
        overlap_file = run_dir / "overlap.json"
        overlap = json.loads(overlap_file.read_text()) if overlap_file.is_file() else {}
        from ood.evaluation.sinks import SAMPLES_FILE, SENSITIVITY_FILE  # here: `import ood.api` stays light

        samples = None
        if (run_dir / SAMPLES_FILE).is_file():
            import pandas as pd

            # file names as written: "NA" or "null.png" would otherwise become NaN
            with _readable(run_dir / SAMPLES_FILE, "a CSV table"):
                samples = pd.read_csv(run_dir / SAMPLES_FILE, dtype={"split": str, "file": str}, keep_default_na=False)
        swept = run_dir / SENSITIVITY_FILE
        return cls(run_dir, rows, scores, overlap, samples, _read_rows(swept) if swept.is_file() else [])

    def per_image(self, detectors: str | Sequence[str] | None = None) -> Any:
        """`pandas.DataFrame`, one row per scored image (ID test, every OOD set, csid sets): `split`, `dataset_index`
        (its item in the split's dataset), `label` (ID class, -1 for OOD), `file` (the image file, or
        `<split>[<dataset_index>]` for an image held only in memory), then one score column per detector (all, or
        `detectors`; higher = more ID).
        E.g. the OOD images a detector takes for most ID: `df[df.label == -1].nlargest(10, "energy")`."""
        if self.samples is None:
            raise ConfigError(f"{self.run_dir} holds no samples.csv: the run saved no per-image scores "
                              "(evaluation.save_scores=false, or a run made before ood wrote it)")
        names = list(self.scores) if detectors is None else list(_names("detectors", detectors))
        unknown = [d for d in names if d not in self.scores]
        if unknown:
            raise ConfigError(f"no scores of {unknown} in {self.run_dir}; choices: {sorted(self.scores)}")
        table = self.samples.drop(columns="row")
        groups = self.samples.groupby("split", sort=False)["row"]  # each split's lines are contiguous, in file order
        for d in names:
            table[d] = np.concatenate([self.scores[d][split][rows.to_numpy()] for split, rows in groups])
        return table

    @property
    def table(self) -> Any:
        """`pandas.DataFrame` indexed by (detector, set): every OOD set, then the `near` and `far` means (OpenOOD's
        unweighted means); columns auroc, fpr95, fpr95_oodpos, aupr_in, aupr_out (fractions) and id_acc. With
        full-spectrum rows the index is (mode, detector, set), each mode with its own means, and a `csid_acc` column
        (ID test and every csid set pooled) follows, empty on standard rows."""
        import pandas as pd

        from ood.evaluation.scoring import group_means, rows_by_mode

        modes = rows_by_mode(self.rows)
        full = "fsood" in modes
        records, index = [], []
        for mode, rows in modes.items():
            means = group_means(rows)
            for detector in dict.fromkeys(r["detector"] for r in rows):
                mine = [r for r in rows if r["detector"] == detector]
                lines = [(r["ood_dataset"], r) for r in mine]
                lines += [(g, means[detector, g]) for g in ("near", "far") if (detector, g) in means]
                accuracy = {"id_acc": mine[0]["id_acc"]} | ({"csid_acc": mine[0].get("csid_acc")} if full else {})
                for name, values in lines:
                    index.append((mode, detector, name) if full else (detector, name))
                    records.append({**{m: values[m] for m in METRIC_COLUMNS}, **accuracy})
        names = ["mode", "detector", "set"] if full else ["detector", "set"]
        return pd.DataFrame(records, index=pd.MultiIndex.from_tuples(index, names=names))

    def metrics(self, prefix: str = "test") -> dict[str, float]:
        """Every scalar of the rows in one flat dict, for a logger, under the keys ood's own runs log them
        (`ood.evaluation.sinks.scalar_metrics`) with `prefix` for their `test`: `<prefix>/<detector>/<set>/<metric>`
        for each OOD set and the `near` / `far` means, `<prefix>/id/acc`, and the full-spectrum ones under
        `<prefix>_fsood/`. E.g. `self.log_dict(results.metrics("ood"))` in a LightningModule, or
        `wandb.log(results.metrics())`."""
        from ood.evaluation.evaluator import EvaluationResult
        from ood.evaluation.sinks import scalar_metrics

        if not self.rows:  # detectors="none": nothing was scored
            return {}
        result = EvaluationResult(self.rows, {}, id_acc=self.rows[0]["id_acc"], method=self.rows[0]["method"])
        return {prefix + key.removeprefix("test"): value for key, value in scalar_metrics(result).items()}

    def save(self, directory: str | Path) -> Path:
        """Copy the run folder (results.jsonl, scores.npz, figures/, overlap.json, ...) to `directory`, a new or empty
        folder: copied over another run's files, theirs (its scores.npz, bad_images.json) would read as this run's.
        Refused once `run_dir` holds another evaluation's results (a later one into the same `output_dir`), which
        would be copied under this one's name."""
        path = self.run_dir / "results.jsonl"
        if not path.is_file() or json.dumps(_read_rows(path)) != json.dumps(self.rows):  # as text: NaN != NaN
            raise ConfigError(f"{self.run_dir} no longer holds these results (another evaluation into the same "
                              "output_dir replaced them): give each evaluation its own output_dir to save it")
        directory = Path(directory)
        if directory.resolve() != self.run_dir.resolve():
            if self.run_dir.resolve() in directory.resolve().parents:  # copytree would copy the copy into itself
                raise ConfigError(f"{directory} is inside the run folder {self.run_dir}: save the results elsewhere")
            if directory.is_dir() and any(directory.iterdir()):
                raise ConfigError(f"{directory} is not empty: save the results into a new or empty folder")
            shutil.copytree(self.run_dir, directory, dirs_exist_ok=True)
        return directory


def _names(key: str, value: str | Sequence[str]) -> tuple[str, ...]:
    """A keyword that takes a name or a list of names, as a tuple; one line for anything else (an int ended in
    Python's "'int' object is not iterable")."""
    if isinstance(value, str):
        return (value,)
    names = tuple(value) if isinstance(value, Iterable) else None
    if names is None or not all(isinstance(v, str) for v in names):
        raise ConfigError(f"{key}={value!r}: give a name or a list of names")
    return names


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's `results.jsonl` or `sensitivity.jsonl`, as `ood-report` reads them: a line that is no JSON
    (cut short, edited) is one line naming the file and line (it was json's error alone, naming neither)."""
    from ood.report.reading import parse_rows  # here: `import ood.api` stays light

    return parse_rows(path, keys=())


@contextmanager
def _readable(path: Path, what: str, detail: bool = True) -> Iterator[None]:
    """One line for a run file that cannot be read as `what`, with the reader's message (`detail`; NumPy's for a
    `scores.npz` cut short is advice to unpickle it, which is not shown)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - NumPy's, zipfile's and pandas' errors: the file is what to name
        said = f" ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})" if detail else ""
        raise ConfigError(f"{path} cannot be read as {what}{said}: cut short by a crash while it was written? rerun "
                          "the evaluation") from None


def _temporary_run_dir() -> Path:
    """A fresh `ood-eval-*` temporary folder for a run without `output_dir`, deleted when the Python process ends
    (one per call: a session of evaluations left them all behind), or as the call fails; `Results.save` keeps a
    copy."""
    out = Path(tempfile.mkdtemp(prefix="ood-eval-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    return out


def _other_rank() -> bool:
    """Whether this process is a global rank but 0 of the caller's process group (`ood.evaluate` on every rank of
    their DDP training, for a `ModelCheckpoint` monitoring its numbers): its run goes to a temporary folder, and rank
    0 alone writes `output_dir`. Ranks sharing one folder each cleared it as they started and rewrote its files, so a
    rank read the other's half-written run or found its results removed; each evaluates every image alike, so every
    rank's `Results` hold the same rows."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and dist.get_rank() != 0


def _library(model: nn.Module) -> str:
    """The backbone config group that describes `model`: timm, torchvision or module."""
    module = type(model).__module__
    if module.startswith("timm."):
        return "timm"
    if module.startswith("torchvision."):
        return "torchvision"
    return "module"


def _network(model: nn.Module) -> nn.Module:
    """The network to evaluate: a loaded ood method's backbone; the module inside a `torch.compile`, `nn.DataParallel`
    or `DistributedDataParallel` wrapper (`_unwrapped`), which the adapters would otherwise take as one opaque module
    (the stage-by-stage detectors skipped; DDP's forward a collective). The evaluation runs a compiled module
    eagerly, as it does ood's own (`ood.precision.eager`), and a parallel one as its own strategy places it."""
    from ood.methods.base import OODMethod

    if not isinstance(model, nn.Module):  # the file a user has: "'str' object has no attribute 'parameters'"
        raise ConfigError(_not_a_network(model))
    model = _unwrapped(model)  # first: a compiled ood method is a method
    net = _unwrapped(model.backbone) if isinstance(model, OODMethod) else model
    if any(t.is_meta for t in itertools.chain(net.parameters(), net.buffers())):  # "Cannot copy out of meta tensor"
        raise ConfigError("the model's parameters are on the meta device (shapes without values): load its weights "
                          "first (model.to_empty(device='cpu'), then model.load_state_dict(...))")
    return net


def _unwrapped(model: nn.Module) -> nn.Module:
    """`model` without its `torch.compile` (`_orig_mod`) and data-parallel (`.module`) wrappers, in any nesting."""
    while True:
        if getattr(model, "_orig_mod", None) is not None:
            model = model._orig_mod
        elif isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


@contextmanager
def one_line_errors() -> Iterator[None]:
    """An `OODError` raised in a DataLoader worker (or a DDP rank) comes back with its traceback as its text: raise
    it as the one-line error it was (`ood.cli.user_error`); a batch of images of different sizes (the caller's
    `transform` keeps each image's own size), of RGB images for a network that reads other channels, or of a
    Dataset's tensors with another channel count than the network reads, or of an object the spawned DDP ranks cannot
    receive (a lambda transform) says what to pass; any other exception passes unchanged."""
    from ood.cli import user_error

    try:
        yield
    except Exception as err:
        user = user_error(err)
        text = str(err).splitlines()[-1] if str(err) else ""
        if user is None and isinstance(err, RuntimeError) and "stack expects each tensor to be equal size" in text:
            raise ConfigError(f"images of different sizes in one batch ({text.split('but got ', 1)[-1]}): transform= "
                              "must give every image one size, e.g. T.Compose([T.Resize(R), T.CenterCrop(S), "
                              "T.ToTensor(), T.Normalize(...)])") from None
        channels = re.search(r"to have (\d+) channels, but got (\d+) channels instead", text) if user is None else None
        if channels and channels.group(2) == "3":  # a grey-level (or multispectral) network on images decoded as RGB
            k = channels.group(1)
            raise ConfigError(f"the model's first convolution reads {k} channel(s) and images are decoded as RGB: pass "
                              f"transform= making {k}-channel tensors, e.g. T.Compose([T.Grayscale({k}), T.Resize(R), "
                              "T.CenterCrop(S), T.ToTensor(), T.Normalize(...)])") from None
        if channels:  # a Dataset's own tensors, or a transform's, with another channel count
            raise ConfigError(f"the model's first convolution reads {channels.group(1)} channel(s) and the input tensors "
                              f"have {channels.group(2)}: the Dataset's tensors (or the transform's output) must have "
                              f"{channels.group(1)}") from None
        unpicklable = isinstance(err, pickle.PicklingError) or (
            isinstance(err, AttributeError | TypeError) and re.search(r"[Cc]an't pickle|cannot pickle", text))
        if user is None and unpicklable:  # spawned DDP ranks (trainer=ddp_cpu) get everything by pickling
            raise ConfigError(f"the run starts its ranks in new processes, which receive the model, data and transform "
                              f"pickled, and: {text[:160]}; pass picklable objects (module-level functions and classes, "
                              "torchvision transforms; no lambdas or local classes), or run in one process") from None
        if user is None or user is err:
            raise
        raise user from None


def _not_a_network(model: Any) -> str:
    """What to pass instead of `model`, no `nn.Module`: the file a user has (a path), or its weights alone (a state
    dict, `torch.load` of the file), which go into the network built first."""
    build = "model = torchvision.models.resnet18(num_classes=K); model.load_state_dict"
    if isinstance(model, str | os.PathLike) and (Path(model) / "checkpoints").is_dir():
        last = Path(model) / "checkpoints" / "last.ckpt"
        return (f"model={str(model)!r} is an ood run folder, not a network (nn.Module): evaluate its checkpoint with "
                f"ood-eval ckpt_path={last} (its data and method as trained; the other ood-eval keys as overrides)")
    if isinstance(model, str | os.PathLike):
        return (f"model={str(model)!r} is a path, not a network (nn.Module): build it and load the file ({build}"
                f"(torch.load(path))), or evaluate the file with ood-eval backbone.weights={model} "
                "backbone=torchvision|timm|module backbone.name=<architecture> data=folder ...")
    if isinstance(model, Mapping):
        return (f"model= is a mapping of {len(model)} entries (a state dict or checkpoint: weights without their "
                f"network): build the network and load them ({build}(state))")
    name = type(model).__name__
    return f"model= takes a network (nn.Module), got {'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


@contextmanager
def _console_logs() -> Iterator[None]:
    """The entry points' console inside the call: Lightning's start-up chatter ("Seed set to 0", "GPU available",
    its "Tip" advert: INFO of `LIGHTNING_LOGGERS`) off, and ood's own INFO lines (the preprocessing) shown on stderr
    when the caller's program set up no logging that takes them: no handler on `ood`, above it or on an ood logger
    below it (that one's lines came twice), and from the level the caller gave `ood`, if any (`WARNING`: quieted);
    the caller's levels and handlers as they were."""
    from ood.runs.console import LIGHTNING_LOGGERS

    quiet = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    levels = [logger.level for logger in quiet]
    ours = logging.getLogger("ood")
    below = [logger for name, logger in list(logging.root.manager.loggerDict.items())
             if name.startswith("ood.") and isinstance(logger, logging.Logger)]
    handler = None if ours.hasHandlers() or any(logger.handlers for logger in below) else logging.StreamHandler()
    level = ours.level
    for logger in quiet:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    if handler is not None:
        ours.addHandler(handler)
        ours.setLevel(level or logging.INFO)
    try:
        yield
    finally:
        for logger, previous in zip(quiet, levels, strict=True):
            logger.setLevel(previous)
        if handler is not None:
            ours.removeHandler(handler)
            ours.setLevel(level)


@contextmanager
def _caller_state() -> Iterator[None]:
    """The process-wide state a run sets, put back afterwards: `seed_everything`'s global RNG states (torch, its
    CUDA generators: `_cuda_rng_restorer`, NumPy, Python) and `PL_GLOBAL_SEED` / `PL_SEED_WORKERS`, and the trainer's
    `torch.use_deterministic_algorithms` and cuDNN benchmark flags, with the `CUBLAS_WORKSPACE_CONFIG` that
    Lightning's deterministic mode sets (left behind, every later cuBLAS handle of the caller's took its workspace).
    `evaluate` is a call inside the user's program: their training loop goes on with its own random stream and
    settings (a CPU evaluation left deterministic algorithms on, which CUDA ops without a deterministic kernel then
    refuse)."""
    import random

    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate(), _cuda_rng_restorer())
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark)
    env = {key: os.environ.get(key) for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG")}
    try:
        yield
    finally:
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        rng[3]()
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.benchmark = flags[2]
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _cuda_rng_restorer() -> Callable[[], None]:
    """A function that puts the caller's CUDA generators back as they are now. Once CUDA is initialised, their
    states. Before, the seeds queued for CUDA's first use (`torch.manual_seed` before any CUDA call): the run's
    `seed_everything` replaces them, so the caller's first CUDA use would seed with the run's seed; and when the run
    initialises CUDA itself, its generators would stay seeded and advanced by the run, so the caller's CUDA draws
    after the call (dropout, `torch.randn(device='cuda')`) differed from those without it. They get what CUDA's
    initialisation would have given the caller: torch's default seed, then the caller's queued seeds."""
    if torch.cuda.is_initialized():
        states = torch.cuda.get_rng_state_all()
        return lambda: torch.cuda.set_rng_state_all(states)
    # torch keeps the latest manual_seed(_all) callbacks here until CUDA's initialisation (private: a torch without
    # it leaves the caller's CUDA stream as the run left it)
    tracker = getattr(torch.cuda, "_lazy_seed_tracker", None)
    if not all(hasattr(tracker, k) for k in ("manual_seed_all_cb", "manual_seed_cb", "call_order")):
        return lambda: None
    queued = (tracker.manual_seed_all_cb, tracker.manual_seed_cb, list(tracker.call_order))

    def restore() -> None:
        tracker.manual_seed_all_cb, tracker.manual_seed_cb, tracker.call_order = queued[0], queued[1], list(queued[2])
        if torch.cuda.is_initialized():  # the run initialised CUDA
            torch.cuda.manual_seed_all(torch.Generator().initial_seed())  # a fresh generator's seed: CPU's and CUDA's
            for call in queued[2]:  # in the order torch's initialisation runs them
                if call is not None:
                    call[0]()

    return restore


@contextmanager
def _caller_model(net: nn.Module) -> Iterator[None]:
    """The caller's model as it was: on its device (Lightning's teardown moves the module it tested to the CPU, so a
    CUDA model came back on the CPU), in its train/eval modes, module by module, with its gradients (Lightning's
    `trainer.test` sets them to None: a loop accumulating gradients over batches lost those before the call) and its
    `requires_grad` flags (a method freezing its backbone, `method=heatmap`, left the caller's network frozen). A model
    spread over several devices is left where the run put it."""
    devices = {t.device for t in itertools.chain(net.parameters(), net.buffers())}
    modes = [(module, module.training) for module in net.modules()]
    trainable = [(p, p.grad, p.requires_grad) for p in net.parameters()]
    try:
        yield
    finally:
        if len(devices) == 1:
            net.to(next(iter(devices)))
        for module, training in modes:
            module.train(training)
        for p, grad, requires_grad in trainable:
            p.requires_grad_(requires_grad)
            p.grad = None if grad is None else grad.to(p.device)


def _checked_device(device: str | torch.device | None) -> str:
    """`device` as `cpu`, `cuda` or `cuda:<i>` (None: cuda when available), refused in one line when torch cannot
    use it."""
    device = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, number = device.partition(":")
    if kind == "cpu":
        return "cpu"
    if kind != "cuda" or (number and not number.isdigit()):
        raise ConfigError(f"device={device!r} is unknown; choices: cpu, cuda, cuda:<index>")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but torch {torch.__version__} sees no CUDA GPU; use device='cpu'")
    if number and int(number) >= torch.cuda.device_count():
        raise ConfigError(f"device={device!r} but torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    return device


def _device_overrides(device: str | torch.device | None) -> list[str]:
    kind, _, number = _checked_device(device).partition(":")
    if kind == "cpu":
        return ["trainer=cpu"]
    return ["trainer=gpu", f"trainer.devices=[{number}]" if number else "trainer.devices=1"]


def _method_override(method: str | None) -> str:
    """`method=<name>` for a config of the `method` group (None: `ce`); another name is refused in one line naming
    the choices (Hydra's own error said "In 'train': Could not find 'method/<name>'")."""
    from ood import CONFIG_DIR

    method = method or "ce"
    if not (CONFIG_DIR / "method" / f"{method}.yaml").is_file():
        choices = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))
        raise ConfigError(f"method={method!r} is no method config; choices: {', '.join(choices)}")
    return f"method={method}"


def _detector_overrides(detectors: str | type | Sequence[str | type]) -> list[str]:
    """A config of the `detectors` group by name (`all`, `fast`, `none`), else `detectors.names=` a registry
    selection (`cached`) or a list of names, selections and `Detector` classes (by their registered names), one of
    them the list of it."""
    from ood import CONFIG_DIR
    from ood.detectors.base import SELECTIONS

    if isinstance(detectors, str) and (CONFIG_DIR / "detectors" / f"{detectors}.yaml").is_file():
        return [f"detectors={detectors}"]
    if isinstance(detectors, str) and "," in detectors:  # Hydra's sweep refusal named `-m` and the CLI's list syntax
        raise ConfigError(f"detectors={detectors!r} is one string, not a list of names: give "
                          f"detectors={[name.strip() for name in detectors.split(',')]!r}")
    if isinstance(detectors, str) and detectors in SELECTIONS:
        return ["detectors=all", f"detectors.names={detectors}"]
    # one name (or class) as a one-name list: a misspelt one is named with the detectors, not with the selections
    listed = [detectors] if isinstance(detectors, str | type) else detectors
    if not isinstance(listed, Sequence):  # an int or a set: Python's TypeError on iterating or joining it
        choices = sorted({p.stem for p in (CONFIG_DIR / "detectors").glob("*.yaml")} | set(SELECTIONS))
        raise ConfigError(f"detectors={detectors!r}: give a detector selection ({', '.join(choices)}), a detector name "
                          "or class, or a list of them")
    return ["detectors=all", f"detectors.names=[{','.join(map(_detector_name, listed))}]"]


def _detector_name(detector: Any) -> str:
    """A detector given by name as it is; a `Detector` subclass (defined in the caller's code, registered when it was
    defined) by its registered `name`: the list went into the config by `','.join`, a TypeError for a class. One
    line for a class that is not registered under its name (a subclass inheriting its parent's: its rows would be the
    parent's)."""
    from ood.detectors import detector_class

    if isinstance(detector, str):
        return detector
    cls = detector_class(detector)  # a class without a name, or not a Detector, is one line there
    if detector_class(cls.name) is not cls:
        raise ConfigError(f"detector class {cls.__module__}.{cls.__qualname__} inherits the name {cls.name!r} of "
                          f"{detector_class(cls.name).__qualname__}: give it its own, name = '<name>', under which "
                          "it registers and its rows are reported")
    return cls.name


def _data_kwargs(id_data: Any, ood_data: Any, model: nn.Module, transform: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config values, Python objects) for the folder data node."""
    from ood.data.folder import ood_mapping

    values: dict[str, Any] = {}
    objects: dict[str, Any] = {}
    ood = _plain(ood_mapping(ood_data, python_api=True))  # paths as text: recorded in config.yaml, as ood-eval records them
    (objects if _is_object(ood) else values)["ood"] = ood
    if isinstance(id_data, str | os.PathLike):
        values["root"] = str(id_data)
    elif isinstance(id_data, Mapping):
        unknown = set(id_data) - {"train", "test", "val"}
        if unknown:
            raise ConfigError(f"id_data has unknown keys {sorted(unknown)}; valid keys: train, test, val")
        values["root"] = None
        objects |= {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in id_data.items()}
    else:
        raise ConfigError(f"id_data must be a folder or a mapping {{train, test, val}}; got {type(id_data).__name__}")
    if transform is not None:
        objects["transform"] = transform
    elif getattr(model, "pretrained_cfg", None):
        import timm.data

        objects["data_config"] = timm.data.resolve_data_config(model=model)
    return values, objects


def _check_data_options(given: Mapping[str, Any], node: Any) -> None:
    """One line for a keyword of `evaluate` that is no option of the folder data (a typo would surface as an
    instantiation error deep in Hydra)."""
    import difflib

    choices = sorted(k for k in node if k not in ("_target_", "model", *ARGUMENT_KEYS, *TRAINING_OPTIONS))
    for key in given:
        if key not in node:
            close = difflib.get_close_matches(key, choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"ood.evaluate got an unknown keyword {key!r}{hint}; data options: {choices}")


def _check_refused_options(data: Mapping[str, Any]) -> None:
    """One line for a data keyword that is a key the call sets from its own arguments (it overrode them in silence)
    or a training option (it changed nothing but config.yaml)."""
    refused = sorted(data.keys() & (ARGUMENT_KEYS.keys() | TRAINING_OPTIONS.keys()))
    if refused:
        key = refused[0]
        raise ConfigError(f"ood.evaluate got {key}={data[key]!r}, a folder-data key this call sets from "
                          f"{ARGUMENT_KEYS[key]}: give it there" if key in ARGUMENT_KEYS else
                          f"ood.evaluate got {key}={data[key]!r}: {key} is a training option; ood.evaluate never "
                          f"trains: {TRAINING_OPTIONS[key]}")


def _data_choices() -> list[str]:
    """The benchmarks of ood's data group: its configs but `folder` (the caller's own folders: id_data, ood_data)."""
    from ood import CONFIG_DIR

    return sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml") if p.stem != "folder")


def _check_data_source(benchmark: str | None, id_data: Any, ood_data: Any, transform: Any, data_dir: Any) -> None:
    """One line unless the data is either the caller's (`id_data` and `ood_data`) or a benchmark's; with a
    benchmark, no `transform` (its preprocessing is part of its protocol) and no `data_dir` without one."""
    if benchmark is None:
        if id_data is None or ood_data is None:
            raise ConfigError(f"ood.evaluate needs id_data= and ood_data= (your folders, image lists or Datasets), or "
                              f"benchmark=<name> for a benchmark of ood's ({', '.join(_data_choices())})")
        if data_dir is not None:
            raise ConfigError(f"data_dir={str(data_dir)!r} is where a benchmark's files are: give it with benchmark=; "
                              "your own sets are named by id_data= and ood_data=")
        return
    if not isinstance(benchmark, str) or benchmark == "folder":
        raise ConfigError(f"benchmark={benchmark!r}: give the name of a data config "
                          f"({', '.join(_data_choices())}); your own folders go in id_data= and ood_data=")
    given = [name for name, value in (("id_data", id_data), ("ood_data", ood_data)) if value is not None]
    if given:
        raise ConfigError(f"ood.evaluate got benchmark={benchmark!r} and {' and '.join(given)}: give one (the "
                          "benchmark brings its ID and OOD sets)")
    if transform is not None:
        raise ConfigError(f"transform= with benchmark={benchmark!r}: the benchmark's preprocessing (its image size and "
                          "normalisation) is part of its protocol, as ood-eval applies it; change it in the benchmark's "
                          "config if you must, e.g. overrides=['data.benchmark.image_size=224']")


def _check_call_values(seed: Any, fsood: Any, output_dir: Any, transform: Any) -> None:
    """One line for a keyword of the wrong type or range, before a folder is made or an image read: `seed=1.5` ran
    and was written into the rows as the seed, `fsood='yes'` read as True, and the others ended in Python's TypeErrors
    (`'str' object is not callable`)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed={seed!r}: must be a whole number in [0, 2**32 - 1] (the seeds NumPy takes)")
    if fsood is not None and not isinstance(fsood, bool | np.bool_):
        raise ConfigError(f"fsood={fsood!r}: must be True, False or None (None: full-spectrum rows when ood_data has "
                          "csid sets)")
    if output_dir is not None and not isinstance(output_dir, str | os.PathLike):
        raise ConfigError(f"output_dir={output_dir!r}: must be a folder path (str or os.PathLike) or None (a temporary "
                          "folder)")
    _check_transform(transform)


def _check_transform(transform: Any) -> None:
    """One line for a `transform` that cannot be applied to an image (`'str' object is not callable` in the pass)."""
    if transform is not None and not callable(transform):
        raise ConfigError(f"transform={transform!r}: must be a callable from a PIL image to a tensor (a torchvision "
                          "transform) or None")


def _check_benchmark(benchmark: str, overrides: Sequence[str]) -> None:
    """One line naming the choices for a benchmark the data group lacks: ood's configs, and with a
    `hydra.searchpath` override those of the caller's folders too (Hydra's own error was 15 lines)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    from ood import CONFIG_DIR
    from ood.runs.checks import parse_overrides

    if benchmark in _data_choices():
        return
    searchpath = [item for item, o in zip(overrides, parse_overrides(overrides), strict=True)
                  if o.key_or_group == "hydra.searchpath"]
    choices = _data_choices()
    if searchpath:
        try:
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                compose(config_name="eval", overrides=[f"data={benchmark}", *searchpath])
            return
        except MissingConfigException as err:
            if err.missing_cfg_file != f"data/{benchmark}":  # the config is there; a default it names is not
                raise ConfigError(f"benchmark={benchmark!r}: {str(err).splitlines()[0]}") from None
            choices = sorted(set(err.options or ()) - {"folder"})
        finally:
            GlobalHydra.instance().clear()
    own = "" if searchpath else (" (a config of your own: overrides=['hydra.searchpath=[file://<folder holding "
                                 "data/<name>.yaml>]'])")
    raise ConfigError(f"benchmark={benchmark!r} is no data config; choices: {', '.join(choices)}{own}")


def _check_benchmark_options(given: Mapping[str, Any], node: Any, benchmark: str) -> None:
    """One line naming the data keywords that are no option of the benchmark's data node (`image_size`, `classes`,
    ...: the folder data's), with the `data.benchmark.<key>` override of those its benchmark has; then the keys the
    call sets and the training options, refused as with the folder data."""
    foreign = [key for key in given if key not in node or key in ("_target_", "benchmark")]
    if foreign:
        own = [key for key in foreign if key in node.get("benchmark", {}) and key not in TRAINING_OPTIONS]
        hint = f"; the benchmark's own: overrides=[{', '.join(repr(f'data.benchmark.{k}=...') for k in own)}]" if own else ""
        raise ConfigError(f"ood.evaluate got {', '.join(foreign)} with benchmark={benchmark!r}: folder-data "
                          f"option(s), which data={benchmark} has not (its sets and preprocessing are its protocol's)"
                          f"{hint}")
    _check_refused_options(given)


def _check_channels(net: nn.Module, data: Any, benchmark: str) -> None:
    """One line when the model's first convolution reads another channel count than the benchmark's images have
    (PyTorch's error said to pass transform=, which a benchmark takes not); a model whose first registered
    convolution is not the one its forward runs first is tried on one image of the benchmark's (`input_channels`)."""
    from ood.models.base import input_channels

    reads = input_channels(net, data.in_channels, getattr(data, "image_size", 224))
    if reads is not None and reads != data.in_channels:
        raise ConfigError(f"the model's first convolution reads {reads} channel(s) and benchmark={benchmark!r} has "
                          f"{data.in_channels}-channel images: give a model made for them")


#: the preprocessing keywords of `extract` (`resolve_preprocessing`'s, less the objects it is handed)
PREPROCESSING = ("image_size", "resize", "mean", "std", "interpolation")


def _check_preprocessing(given: Mapping[str, Any]) -> None:
    """One line for a keyword of `extract` that is no preprocessing option (it surfaced as a TypeError of an inner
    function, `resolve_preprocessing()`)."""
    import difflib

    for key in given:
        if key not in PREPROCESSING:
            close = difflib.get_close_matches(key, PREPROCESSING, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"ood.extract got an unknown keyword {key!r}{hint}; preprocessing options: {list(PREPROCESSING)}")


def evaluate(
    model: nn.Module,
    id_data: str | os.PathLike | Mapping[str, Any] | None = None,
    ood_data: Any = None,
    *,
    benchmark: str | None = None,
    data_dir: str | os.PathLike | None = None,
    detectors: str | type | Sequence[str | type] = "all",
    method: str | None = None,
    transform: Any = None,
    feature_layer: str | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    output_dir: str | os.PathLike | None = None,
    seed: int = 0,
    fsood: bool | None = None,
    overrides: Sequence[str] = (),
    **data: Any,
) -> Results:
    """Evaluate `model` on `id_data` vs `ood_data`, or on a `benchmark`, with every detector (and a post-hoc
    `method`), as `ood-eval`.

    Args:
        model: images -> logits (a tensor, or an output with `logits`: a dict, Hugging Face's `ImageClassifierOutput`):
            a timm / torchvision model, any `nn.Module` (features: the input of its final linear layer, or
            `feature_layer`), an ood `Backbone`, or a loaded ood method (its backbone is used); of a `torch.compile`d,
            `nn.DataParallel` or `DistributedDataParallel` model, the module inside (a compiled one run eagerly).
        id_data: an ImageFolder-style root (`train/`, `test/`, optional `val/`), or `{train, test, val}` sources
            (folders, `{imglist, images}` lists, Datasets). Required unless `benchmark` is given.
        ood_data: `{near: {name: source}, far: {name: source}, val: source, csid: {name: source}}`, `{name: source}`
            or a list; `csid`: covariate-shifted ID sets (class folders or labelled lists, as the ID test split).
            Required unless `benchmark` is given.
        benchmark: a config of the data group instead of `id_data` / `ood_data` (`cifar10`, `cifar100`,
            `imagenet200`, `imagenet1k`, `tinyimagenet`, `digits`, or one of yours through
            `overrides=["hydra.searchpath=[file://my_conf]"]`): `ood-eval data=<benchmark>`, its ID splits, the OOD
            sets of its protocol (`overrides=["data.benchmark.protocol=classic"]`), its validation OOD for tuning,
            its csid sets (`fsood=True`), and its preprocessing, which is part of the protocol: `transform=`, the
            model's timm data config and the folder-data keywords are not used with it (refused in one line; its
            own options as `overrides=["data.benchmark.image_size=224"]`). The model's head must have its classes.
        data_dir: where the benchmark's files are (`paths.data_dir`); None: `$OOD_DATA_DIR`, else `data/` under `$OOD_ROOT` or `.`, as
            `ood-eval`.
        detectors: `all`, `full` (adds the slow network-pass ones), `cached` (those of `all` that score from the cache alone: no network pass),
            `fast`, `none`, or a list of names, selections and detector classes of your own (`["full", "gram_stream"]`,
            `["msp", FeatureNorm]`: a `Detector` subclass with its own `name`), or one of them.
        method: a post-hoc method config (`grood`, `cluster`, ...) scored beside the detectors; None: `ce`.
        transform: a torchvision transform for every split (its `Normalize`, or `mean` / `std` in `data`, is the
            input normalisation); None: the model's timm data config, else `data`'s `image_size` / `resize` /
            `mean` / `std`, else ImageNet's defaults.
        batch_size, num_workers: evaluation loading (per device).
        device: `cpu`, `cuda`, `cuda:<i>`; None: cuda when available.
        output_dir: the run folder; None: a new temporary folder, deleted when the process ends (`Results.save`
            copies it). Called on every rank of the caller's DDP training, global rank 0 alone writes it, the
            others a temporary folder each (the same rows). An earlier run's results.jsonl / scores.npz there go once the call passes its checks (one
            refused by them leaves the folder as it was); a failed run leaves FAILED.txt there (its temporary
            folder, without `output_dir`, goes at once).
        seed: the run seed, recorded as the rows' `seed`: pass the seed that trained the model, so ood-report takes
            models of several seeds as seeds of one configuration (all at 0 it warns that they are one seed).
        fsood: full-spectrum rows too (`mode: fsood`, ID = ID test + every csid set; `evaluation.fsood`); None: when
            `ood_data` has csid sets (with a benchmark: off, as `ood-eval`). True without them is refused before
            the pass.
        overrides: further Hydra overrides, e.g. `["trainer=ddp_cpu"]` or `["+detectors.params.knn.k=5"]`.
        data: further `data=folder` options: `image_size`, `resize`, `mean`, `std`, `bad_images`,
            `overlap_threshold`, `drop_overlap`, `exact_duplicates`, `val_fraction`, `fit_fraction`, `classes` (the
            class names in label order, for a model trained with another class order), ... (conf/data/folder.yaml);
            its training options (`augment`, `outliers`, `drop_last`, ...: `TRAINING_OPTIONS`) are refused. With a
            `benchmark`: only the options of its data node (`fit_fraction`, `fit_seed`, `ood_subset`, ...).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from ood import CONFIG_DIR
    from ood.cli import expand_home
    from ood.data.benchmark import check_loader_options
    from ood.evaluation.evaluator import without_autocast
    from ood.features.collector import alone
    from ood.models.adapters import as_backbone, check_classes
    from ood.runs.checks import (
        check_overrides,
        check_timm_preprocessing,
        part_file_overrides,
        untrained_parts,
    )
    from ood.runs.console import quiet_warnings
    from ood.runs.failures import clear_failure, ctrl_c_raised, folder_state, record_failure
    from ood.train import build

    arguments = locals()  # the parameters (and the imports above), before anything else is bound
    keywords = {k: arguments[k] for k in KEYWORD_KEYS}
    if not isinstance(overrides, str):  # one string is refused below, naming the list to give
        # `~` at the start of a path, as the entry points expand it (Hydra's grammar refuses it in a value)
        overrides = expand_home(list(overrides))
    net = _network(model)  # first: a path given as the model (a run folder) is that, not missing data keywords
    _check_data_source(benchmark, id_data, ood_data, transform, data_dir)
    _check_call_values(seed, fsood, output_dir, transform)
    seed, fsood = int(seed), None if fsood is None else bool(fsood)  # NumPy's: the rows' seed a plain int
    detector_args = _detector_overrides(detectors)
    if benchmark is None:  # a benchmark's data keywords are checked against its data node, once composed
        _check_refused_options(data)
    # the datamodule's own checks name the config keys (`data.eval_batch_size`), which this call does not have
    given = {"fit_fraction": data["fit_fraction"]} if "fit_fraction" in data else {}
    check_loader_options({"eval_batch_size": batch_size, "num_workers": num_workers, **given}, LOADER_KEYWORDS)
    defaults = inspect.signature(evaluate).parameters
    _check_keywords_against(overrides, {**{k: v for k, v in keywords.items() if v != defaults[k].default}, **data},
                            folder=benchmark is None)
    dtypes = sorted({str(p.dtype) for p in net.parameters() if p.is_floating_point()} - {"torch.float32"})
    if dtypes:  # the pass feeds float32 images: a half model failed in its first layer with PyTorch's dtype error
        raise ConfigError(f"the model's parameters are {', '.join(dtypes)} and the evaluation feeds float32 images: "
                          "pass model.float() (bf16 mixed precision on a GPU: overrides=['trainer=gpu_fast'])")
    method_arg = _method_override(method)
    backbone = as_backbone(net, feature_layer)
    if benchmark is None:
        values, objects = _data_kwargs(id_data, ood_data, net, transform)
        objects["python_api"] = True  # messages name the keywords (bad_images='skip'), not the config keys
        fsood = bool({**values, **objects}["ood"]["csid"]) if fsood is None else fsood
    else:  # the benchmark's sets and preprocessing, as `ood-eval data=<benchmark>` reads them
        values, objects = {}, {}
        fsood = bool(fsood)
    folder = Path(output_dir) if output_dir is not None else None
    owned = [name for name in ("checkpoints", "identity.json") if folder is not None and (folder / name).exists()]
    if owned:  # an ood-train / ood-eval run: its checkpoint would be left beside another run's config and results
        raise ConfigError(f"output_dir={folder} holds an ood run ({', '.join(owned)}): ood.evaluate would replace its "
                          "config.yaml, results.jsonl and scores.npz; give a folder of its own")
    out = folder if folder is not None and not _other_rank() else _temporary_run_dir()
    out.mkdir(parents=True, exist_ok=True)
    earlier = folder_state(out)  # a call refused by its checks below leaves an earlier evaluation's folder as it was
    values |= {k: v for k, v in data.items() if not _is_object(v)}
    objects |= {k: v for k, v in data.items() if k not in values}
    args = [
        f"data={benchmark or 'folder'}", f"backbone={_library(net)}", method_arg, "logger=none", "callbacks=none",
        "train=false", f"seed={seed}", f"data.eval_batch_size={batch_size}", f"data.num_workers={num_workers}",
        "trainer.enable_progress_bar=false", f"evaluation.fsood={str(fsood).lower()}", *_device_overrides(device),
        *detector_args, *overrides,
    ]
    previous, caller_hydra = HydraConfig.instance().cfg, GlobalHydra.instance().hydra  # a caller's @hydra.main app
    GlobalHydra.instance().clear()
    # a caller's `torch.inference_mode()` made the banks inference tensors, and detectors that fit by gradient
    # (tempscale) failed in it: the run is the trainer's, which chooses its own grad mode
    with warnings.catch_warnings(), _console_logs(), _caller_state(), _caller_model(net), torch.inference_mode(False):
        quiet_warnings()
        try:
            # the caller's, as `ood-eval`'s: a misspelt key is one line, and a new key under an empty mapping
            # (`detectors.params.knn.k=5`, as the detectors' warnings write it) needs no `+` (the check composes the
            # config once more: only when there are any; the call's own overrides are well-formed)
            if benchmark is not None:
                _check_benchmark(benchmark, overrides)
            if overrides:
                args = check_overrides(CONFIG_DIR, "eval", args)
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                cfg = compose(config_name="eval", overrides=args, return_hydra_config=True)
            if benchmark is None:
                _check_data_options(data, cfg.data)
            else:
                _check_benchmark_options(data, cfg.data, benchmark)
                if getattr(net, "pretrained_cfg", None):  # a timm model: normalised as its pretrained config says?
                    check_timm_preprocessing(cfg, net.pretrained_cfg)
            # the command line's rule (`ood-eval` without a checkpoint): the configured parts no file fills, before
            # any image is read; scored untrained, they gave numbers that say nothing (a random decoder)
            parts = untrained_parts(cfg.method)
            if parts:
                # the configured method (`method=` in `overrides` leaves the keyword None); a file key its config
                # lacks (method=heatmap's decoder_ckpt; a `???` one is there) is added with '+', else Hydra refuses it
                name = cfg.hydra.runtime.choices.method
                keys = "".join(f", or give its file: overrides=['{o}']" for o in part_file_overrides(cfg.method, parts))
                raise ConfigError(f"method={name!r} scores with parts trained with the network ({', '.join(parts)}), "
                                  f"which ood.evaluate neither trains nor loads: train it (ood-train method={name}) "
                                  f"and evaluate its run (ood-eval ckpt_path=<run>){keys}")
            with open_dict(cfg):
                cfg.hydra.runtime.output_dir = str(out)
                cfg.hydra.job.num = 0
                if data_dir is not None:  # here, not as an override: any path, commas and spaces too
                    cfg.paths.data_dir = str(data_dir)
                for key, value in values.items():
                    cfg.data[key] = value
                _describe_backbone(cfg.backbone, net)
            HydraConfig.instance().set_config(cfg)
            method_, datamodule, trainer, _ = build(cfg, backbone=backbone, data=objects)
            classes = getattr(datamodule.benchmark, "classes", None)  # class folders, when the data has them
            named = f": {classes[:8]}{' ...' if len(classes) > 8 else ''}" if classes else ""
            check_classes(backbone, datamodule.num_classes, f"the ID data ({datamodule.name}{named})")
            if benchmark is not None:
                _check_channels(net, datamodule.benchmark, benchmark)
            method_.apply_init(load=False)
            earlier = clear_failure(out)  # as `ood-eval`: an earlier run's results would read as this one's should it fail
            earlier.begin()
            atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
            # a one-process run inside a rank of the caller's DDP training (its process group) evaluates alone, on
            # whichever ranks call it: rank 0 alone waited for the other ranks' rows, and in Lightning's barrier
            # around `prepare_data` (a group over all ranks), forever; that one runs here, without the barrier
            caller_group = trainer.world_size == 1 and torch.distributed.is_available() and \
                torch.distributed.is_initialized()
            # the caller's Ctrl-C back; its autocast (a training script's validation block) off, as in `ood-eval`:
            # the run's own precision (`trainer=gpu_fast`) still applies inside the test steps
            with one_line_errors(), ctrl_c_raised(trainer), without_autocast(), \
                    alone() if caller_group else nullcontext():
                if caller_group:
                    datamodule.prepare_data()
                    datamodule.prepare_data = None  # Lightning's `is_overridden` then skips it
                    # its advice to sync each logged metric over the caller's ranks (a dozen lines), which this
                    # run's are not
                    warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\(.*sync_dist=True")
                trainer.test(method_, datamodule=datamodule, verbose=False)
        except (Exception, KeyboardInterrupt) as err:  # `FAILED.txt`, as `ood-eval` leaves it: ood-report names it
            if out == folder:
                record_failure(out, err, earlier)
            else:  # a temporary folder no `Results` names: a session's failed calls each left one until it ended
                shutil.rmtree(out, ignore_errors=True)
            raise
        finally:
            GlobalHydra.instance().clear()
            if caller_hydra is not None:  # its compose() failed afterwards: "GlobalHydra is not initialized"
                GlobalHydra.instance().initialize(caller_hydra)
            HydraConfig.instance().cfg = previous  # type: ignore[assignment]
    return Results.from_dir(out)


def _check_keywords_against(overrides: Sequence[str], given: Mapping[str, Any], folder: bool = True) -> None:
    """Parse the caller's overrides (`ood.runs.checks.parse_overrides`) and refuse, in one line naming both, one that sets a config
    key which a keyword the caller gave (`given`: keyword -> value, `KEYWORD_KEYS`) sets to another value: one of
    the two was dropped without a word (`image_size=64` won over `data.image_size=32`, set after the compose; an
    override won over `seed=`, `method=`, ... applied before it). The same value twice is fine. An override of a
    training option (`data.drop_last`: it changed nothing) or, with the folder data (`folder`), of the data the
    call's arguments set (`data.root`, `data.ood`: set after the compose, the override was dropped) is refused as the
    keyword would be."""
    from ood import CONFIG_DIR
    from ood.runs.checks import parse_overrides

    keys = {}
    for name, value in given.items():
        group = name == "detectors" and isinstance(value, str) and (CONFIG_DIR / "detectors" / f"{value}.yaml").is_file()
        keys["detectors" if group else KEYWORD_KEYS.get(name, f"data.{name}")] = (name, value)
    for item, override in zip(overrides, parse_overrides(overrides), strict=True):
        data_key = override.key_or_group.removeprefix("data.").split(".")[0] if override.key_or_group.startswith(
            "data.") else None
        if data_key in TRAINING_OPTIONS:
            raise ConfigError(f"ood.evaluate got overrides {item}: data.{data_key} is a training option; ood.evaluate "
                              f"never trains: {TRAINING_OPTIONS[data_key]}")
        if folder and data_key in DATA_ARGUMENTS:
            raise ConfigError(f"ood.evaluate got overrides {item}, a folder-data key this call sets from "
                              f"{ARGUMENT_KEYS[data_key]}: give it there")
        if folder and override.key_or_group == "data" and not override.is_delete():  # the folders' data=folder
            raise ConfigError(f"ood.evaluate got overrides {item} beside id_data / ood_data (folders): for a "
                              f"benchmark's own data give benchmark={_plain(override.value())!r} instead of the folders")
        if override.key_or_group not in keys or override.is_delete() or override.is_sweep_override():
            continue
        name, value = keys[override.key_or_group]
        got, want = _plain(override.value()), _plain(value)
        if name == "detectors":  # one name (or a selection) is the list of it: "msp" and [msp] agree
            got, want = ([x] if isinstance(x, str) else x for x in (got, want))
        if got != want:
            raise ConfigError(f"{name}={value!r} and overrides {item} disagree: give one")


def _plain(value: Any) -> Any:
    """`value` with lists for tuples and text for paths: as Hydra's parser gives an override's value, and as a config
    records it (OOD sets given as `Path`s were taken as objects a config cannot hold: `data.ood: {}` was recorded)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, os.PathLike) else value


def _is_object(value: Any) -> bool:
    """True for values a config cannot hold (Datasets, transforms, ...)."""
    if isinstance(value, Mapping):
        return any(_is_object(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_is_object(v) for v in value)
    return not (value is None or isinstance(value, bool | int | float | str))


def _describe_backbone(node: Any, net: nn.Module) -> None:
    """Fill the composed backbone node with what the model is (recorded in config.yaml; the object itself is used)."""
    library = node.get("library")
    if library == "timm":
        node.name = (getattr(net, "pretrained_cfg", None) or {}).get("architecture", type(net).__name__)
        return
    from torchvision import models

    from ood.models.adapters import architecture_digest

    if library == "module":
        node.target = f"{type(net).__module__}.{type(net).__qualname__}"
    else:
        node.name = torchvision_name(net)
    if library == "module" or node.name not in models.list_models(module=models):
        # a class name alone made two widths of one class one configuration, averaged as seeds by ood-report
        node.shapes = architecture_digest(net)


def torchvision_name(net: nn.Module) -> str:
    """The torchvision builder name of `net` (`resnet34`, what `backbone.name=` takes), found by building each builder
    of its class's module on the meta device (no memory, no weights) and comparing parameter names and shapes; the
    class name, lower-cased, when none fits (a changed head). The class name alone (`resnet`) made resnet18 and
    resnet50 one configuration, whose runs ood-report averaged as seeds. Remembered per class and shapes: the builds
    took about 0.3 s of every `ood.evaluate` call."""
    from ood.models.adapters import find_head

    shapes = tuple(sorted((k, tuple(v.shape)) for k, v in net.state_dict().items()))
    return _torchvision_name(type(net), shapes, net.get_submodule(find_head(net)).out_features)


@functools.lru_cache(maxsize=32)
def _torchvision_name(cls: type[nn.Module], shapes: tuple[tuple[str, tuple[int, ...]], ...], num_classes: int) -> str:
    """`torchvision_name` of a network of class `cls` with these (sorted) parameter and buffer shapes and head width."""
    from torchvision import models

    family = [n for n in models.list_models(module=models) if models.get_model_builder(n).__module__ == cls.__module__]
    for name in family:
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                candidate = models.get_model(name, weights=None, num_classes=num_classes)
        except Exception:  # a builder that needs other arguments cannot be the one that built `net`
            continue
        if type(candidate) is cls and tuple(sorted((k, tuple(v.shape)) for k, v in candidate.state_dict().items())) == shapes:
            return name
    return cls.__name__.lower()


def _label_order(data: str | os.PathLike | Dataset, classes: Sequence[str]) -> torch.Tensor:
    """The index in `classes` (the model's class order) of each label of `data` (an index into its sorted class
    folders, or its Dataset's `classes`), then -1: indexed by a label, -1 (no class folder) stays -1."""
    from ood.data.sets import class_folders, class_key, same_name_twice

    if isinstance(classes, str) or not classes:
        raise ConfigError(f"classes must be a non-empty list of class names in label order; got {classes!r}")
    named = getattr(data, "classes", None) if isinstance(data, Dataset) else class_folders(Path(data))
    if not named:
        raise ConfigError(f"classes= needs class folders or a Dataset with `classes` to follow by name; {data} has neither")
    given = [str(c) for c in classes]
    twice = sorted({class_key(c) for c in same_name_twice(given)})
    if twice:
        raise ConfigError(f"classes= names {twice} more than once (names are compared in Unicode NFC form)")
    # by NFC form, as the folder reader matches them: `café` typed or copied from macOS (NFD) is one name
    index = {class_key(c): i for i, c in enumerate(given)}
    unlisted = sorted(str(c) for c in named if class_key(str(c)) not in index)
    if unlisted:
        raise ConfigError(f"classes={given} does not name the class(es) {unlisted} of {data}")
    return torch.tensor([index[class_key(str(c))] for c in named] + [-1])


def extract(
    model: nn.Module,
    data: str | os.PathLike | Dataset,
    *,
    transform: Any = None,
    feature_layer: str | None = None,
    layers: Sequence[str] = (),
    taps: str | Sequence[str] = (),
    classes: Sequence[str] | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    **preprocessing: Any,
) -> Any:
    """One pass of `model` over `data` (a folder: every image under it, labelled by its first-level class folder, or
    -1 without one; or a Dataset of `(image, label)` or of images alone): a `FeatureBank` with logits, penultimate
    features, labels (None when unknown), the final linear layer and the outputs of `layers` as extras, with the
    layer taps that the detectors named in `taps` read, cached as an evaluation's pass caches them (`"combood"`:
    its activation extremes; gram, mds_ensemble: stage maps of a staged network). `classes`:
    the class names in label order, as `evaluate`'s (a model trained with another class order), which the class
    folders or the Dataset's `classes` follow by name. Preprocessing as in `evaluate` (`image_size`, `resize`,
    `mean`, `std`, `interpolation` in `preprocessing`); the pass runs on `device` (None: the model's), and the model
    is handed back on its own."""
    from ood.data.benchmark import check_loader_options
    from ood.data.folder import folder_dataset, preprocessing_transform, resolve_preprocessing
    from ood.detectors import available_detectors, detector_class
    from ood.detectors.network import LayerTaps
    from ood.evaluation.evaluator import without_autocast
    from ood.features.bank import FeatureBank
    from ood.features.passes import forward_dataset
    from ood.models.adapters import as_backbone
    from ood.utils import linear_params

    _check_preprocessing(preprocessing)
    _check_transform(transform)
    check_loader_options({"eval_batch_size": batch_size, "num_workers": num_workers}, LOADER_KEYWORDS)  # not torch's ValueError
    net = _network(model)
    backbone = as_backbone(net, feature_layer)
    if device is not None:
        device = _checked_device(device)
    if transform is None:
        config = None
        if getattr(net, "pretrained_cfg", None):
            import timm.data

            config = timm.data.resolve_data_config(model=net)
        transform = preprocessing_transform(resolve_preprocessing(data_config=config, python_api=True, **preprocessing))
    else:  # size options beside it would be ignored: refused, as by `evaluate`
        resolve_preprocessing(transform=transform, python_api=True, **preprocessing)
    dataset = folder_dataset(data, transform)
    order = None if classes is None else _label_order(data, classes)
    layers, taps = _names("layers", layers), _names("taps", taps)
    tapping = [n for n in available_detectors() if hasattr(detector_class(n), "taps")]
    if set(taps) - set(tapping):
        raise ConfigError(f"taps={list(taps)}: {sorted(set(taps) - set(tapping))} read no layer taps; detectors that "
                          f"do: {tapping}")
    hooks = LayerTaps(backbone, taps)

    def outputs(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = backbone.run(x, layers)  # layers apart: a stage may be called `features` (torchvision's VGG, MobileNet)
        return {"logits": out.logits, "features": out.features, **{f"layer/{k}": v for k, v in out.layers.items()},
                **{f"tap/{k}": v for k, v in hooks.pop().items()}}

    try:
        # the model handed back on its device; the caller's autocast off, as `evaluate`'s pass (a float32 bank)
        with one_line_errors(), _caller_model(net), without_autocast():
            if device is not None:
                backbone.to(device)
            result = forward_dataset(outputs, dataset, module=backbone, batch_size=batch_size, device=device,
                                     num_workers=num_workers, desc="extract")
    finally:
        hooks.remove()  # the caller's network keeps no hook of ours
    labels = result.pop("labels")
    labels = labels if order is None else order.to(labels.device)[labels]
    # the head beside the rows (a bank on the GPU is scored there: react / vim multiply features by it)
    weight, bias = (t.detach().float().to(result["features"].device) for t in linear_params(backbone.fc))
    return FeatureBank(
        logits=result.pop("logits"),
        features=result.pop("features"),
        labels=labels if bool((labels >= 0).all()) else None,
        weight=weight,
        bias=bias,
        extras={**{name: result[f"layer/{name}"] for name in layers},
                **{key[len("tap/"):]: value for key, value in result.items() if key.startswith("tap/")}},
    )
