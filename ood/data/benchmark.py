"""The benchmark DataModule: one ID dataset with its named near/far OOD sets, validation OOD and outliers.

A `Benchmark` (digits, CIFAR, ...) only knows how to build datasets; `OODDataModule` turns it into loaders.
Evaluation loaders come in a fixed order described by `eval_splits`, and every evaluation sample carries its
dataset index so results can be deduplicated after a DDP gather.

Training streams: a method declares `streams` (`("id",)` or `("id", "outliers")`) and the DataModule
serves exactly those. With outliers, Lightning's `CombinedLoader` pairs every ID batch with an outlier batch of its
own size (`outlier_batch_size`); the ID stream sets the epoch, the outlier stream cycles through reshuffled
permutations of the outlier set. Both orders are functions of `(seed, epoch)` only, so a resumed run sees the same
batches as an uninterrupted one; under DDP each rank gets its own shard of both streams. Steps receive a `Batch`.

Batch sizes are global: `batch_size` and `outlier_batch_size` are what one optimisation step sees over all DDP ranks
together, so each rank loads `batch_size / world_size` (a warning when it does not divide). A sweep result thus
means the same on one GPU or eight. Every rank has the same number of training batches (Lightning's
`DistributedSampler` pads the ID shard to ceil(N / world_size), the outlier stream is sized per rank), so no rank
waits on a collective another rank never reaches.

`drop_last` (`data.drop_last`): training leaves out the last partial ID batch of an epoch (floor(N / B) steps, the
default), or keeps it (ceil(N / B) steps, its N mod B images the tail of the same permutation: OpenOOD's and
energy_ood's loaders); the outlier stream has one full outlier batch per ID batch either way, as theirs pair a full
outlier batch with the partial ID batch. Under DDP the counts are per rank, of the padded shard ceil(N / world_size).
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset

from ood.data.batch import Batch, collate_batch
from ood.data.fit import FitData, LazyDatasets, no_outliers
from ood.data.memory import PadCropFlip, batch_augmentation, to_memory
from ood.data.samples import item_names
from ood.errors import ConfigError, check_range
from ood.features.bank import FeatureBank
from ood.utils import capped_workers, get_logger

log = get_logger(__name__)

Role = Literal["fit", "id_val", "id_test", "ood_val", "ood", "csid"]
Stream = Literal["id", "outliers"]
STREAMS = ("id", "outliers")
OOD_SUBSETS = ("all", "first_fifth")
#: DataLoader workers of `num_workers=None`, on a machine with at least this many CPUs
DEFAULT_WORKERS = 4
#: the loader options of `OODDataModule` that are whole numbers (counts, and the fit split's seed: a fraction failed
#: in torch.manual_seed after the training, as the fit split was drawn) -> their lowest value
LOADER_COUNTS = {"batch_size": 1, "eval_batch_size": 1, "outlier_batch_size": 1, "num_workers": 0, "fit_seed": 0}


@dataclass(frozen=True)
class OODSet:
    """A named test OOD set and its group."""

    name: str
    group: Literal["near", "far"]
    dataset: Dataset


@dataclass(frozen=True)
class CSIDSet:
    """A named covariate-shifted ID test set (labelled with the ID classes): ID in full-spectrum evaluation."""

    name: str
    dataset: Dataset


@dataclass(frozen=True)
class EvalSplit:
    """One evaluation loader: `name` (e.g. `test`, `svhn`), its `role`, and its near/far `group` for OOD sets."""

    name: str
    role: Role
    group: str | None = None


class Indexed(Dataset):
    """Wraps a dataset of `(x, y)` so items become `(x, y, index)`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        x, y = self.dataset[i]
        return x, y, i

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int, int]]:
        """A batch at once when the dataset gathers batches (`MemoryImages`)."""
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(indices) if getitems is not None else [self.dataset[i] for i in indices]
        return [(x, y, i) for (x, y), i in zip(items, indices)]


class Benchmark(ABC):
    """Builds the datasets of one ID/OOD benchmark. Items are `(image tensor, label)`; OOD labels are -1."""

    name: str
    num_classes: int
    in_channels: int
    #: the selected outlier-exposure set (`data.benchmark.outliers`) and the choices this benchmark offers
    outlier_set: str = "none"
    outlier_choices: tuple[str, ...] = ("none",)
    #: the config key that selects the outlier set (for messages)
    outliers_key: str = "data.benchmark.outliers"
    #: how to give this benchmark covariate-shifted ID sets (for the message when full-spectrum evaluation has none)
    csid_how: str = ("add `csid: {name: set spec}` to its protocol, or use a benchmark that has them (digits, cifar10, "
                     "imagenet1k, imagenet200)")
    #: decode every split once into memory and augment per batch on the device (`ood.data.memory`)
    in_memory: bool = False

    @property
    def cache_dir(self) -> Path | None:
        """Where `in_memory` caches decoded images (None: kept in memory for the run only)."""
        return None

    @property
    def input_mean(self) -> tuple[float, ...]:
        """Per-channel mean of the input normalisation (see `input_std`); methods that work in pixel space (the
        heatmap decoder's targets) undo the normalisation with both."""
        return (0.0,) * self.in_channels

    @property
    def input_std(self) -> tuple[float, ...]:
        """Per-channel std of the input normalisation (inputs are (pixel - mean) / std, pixels in [0, 1]); input
        perturbations given in pixel units (ODIN) are divided by it."""
        return (1.0,) * self.in_channels

    def prepare(self, download: bool = False, evaluate: bool = True) -> None:  # noqa: B027 - optional hook
        """Check files, downloading what is missing when `download` (on local rank 0 of each node, at each `fit` and
        `test`: Lightning's `prepare_data`); the
        protocol's OOD sets only when the run `evaluate`s (`ood-train evaluate=false` trains before they are there)."""

    @abstractmethod
    def train(self, augment: bool = True) -> Dataset:
        """ID training set; `augment=False` gives the evaluation transform (for fitting detectors)."""

    @abstractmethod
    def val(self) -> Dataset:
        """ID validation set (detector tuning, model selection)."""

    @abstractmethod
    def test(self) -> Dataset:
        """ID test set."""

    @abstractmethod
    def ood_test(self) -> list[OODSet]:
        """Test OOD sets, each named and grouped near/far."""

    def ood_val(self) -> Dataset | None:
        """Validation OOD set for tuning (never a test OOD set); None when the benchmark has none."""
        return None

    def outliers(self) -> Dataset | None:
        """Outlier-exposure training set; None when the benchmark has none."""
        return None

    def check_model_input(self, model: torch.nn.Module) -> None:
        """Refuse a model that cannot take this benchmark's images, before training (a benchmark whose input size
        the user sets beside the model's: `FolderBenchmark`); the fixed benchmarks' configs fit their backbones."""
        return None

    def outliers_unused(self, method: str) -> None:
        """Training of `method` starts without the outlier stream; a benchmark whose outliers the user gives warns
        when no fit-time pass read them either (the default outlier sets of the paper benchmarks go unsaid)."""
        return None

    @property
    def csid_names(self) -> tuple[str, ...]:
        """Names of the covariate-shifted ID sets the benchmark lists (known before any file is read)."""
        return ()

    def csid_test(self) -> list[CSIDSet]:
        """The covariate-shifted ID test sets, labelled with the ID classes (full-spectrum evaluation); a missing
        one raises `DataNotFoundError` naming it and where to get it (optional ones are skipped with a warning)."""
        return []

    def screen(
        self, banks: Mapping[str, FeatureBank], splits: Sequence[EvalSplit], datasets: Mapping[str, Dataset]
    ) -> tuple[dict[str, FeatureBank], dict[str, dict[str, Any]]]:
        """Check the cached banks before the metrics (e.g. ID/OOD duplicates, `ood.data.folder`): returns the banks
        to score and extra result-row fields per OOD set; default: unchanged, none."""
        return dict(banks), {}


class EpochShuffle(RandomSampler):
    """A random permutation per epoch that depends on `(seed, epoch)` only (Lightning calls `set_epoch`), so a run
    resumed at an epoch boundary draws the batches an uninterrupted run would. Under DDP Lightning replaces it with
    its `DistributedSampler` (seeded with the global seed, reshuffled per epoch)."""

    def __init__(self, data_source: Dataset, seed: int) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)


class OutlierSampler(DistributedSampler):
    """`num_samples` outlier indices per epoch (all ranks together) from successive random permutations of the
    outlier set, seeded by `(seed, epoch)`; each rank takes every `num_replicas`-th. Being a `DistributedSampler`,
    Lightning keeps it as is under DDP and calls `set_epoch`."""

    def __init__(self, dataset: Dataset, num_samples: int, seed: int) -> None:
        ddp = dist.is_available() and dist.is_initialized()
        replicas, rank = (dist.get_world_size(), dist.get_rank()) if ddp else (1, 0)
        super().__init__(dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.total = num_samples

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 7_919)
        stream = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(self.total / n))])
        return iter(stream[: self.total][self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.total // self.num_replicas


def world_size() -> int:
    """Number of DDP ranks (1 outside an initialised process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def check_loader_options(values: Mapping[str, Any], names: Mapping[str, str] | None = None) -> None:
    """Refuse a loader count (`LOADER_COUNTS`) that is a fraction or below its lowest value, and a `fit_fraction`
    outside (0, 1], each named `names[key]` when given (a caller's keyword: `ood.evaluate`'s `batch_size` is
    `data.eval_batch_size`), else `data.<key>`: a fraction or a negative count ended in the DataLoader's traceback."""
    for key, value in values.items():
        name = (names or {}).get(key, f"data.{key}")
        if key == "fit_fraction":
            if isinstance(value, bool) or not (isinstance(value, numbers.Real) and 0 < value <= 1):  # True: 1
                raise ConfigError(f"{name} must be in (0, 1], got {value}")
        else:
            check_range(name, value, LOADER_COUNTS[key], integer=True)


def loader_workers(num_workers: int | None) -> int:
    """`num_workers`, or for None `capped_workers(DEFAULT_WORKERS)`."""
    return capped_workers(DEFAULT_WORKERS) if num_workers is None else num_workers


def per_rank_batch(global_batch: int, key: str, world: int) -> int:
    """The per-rank share of a global batch of `global_batch` over `world` ranks; warns (naming config `key`) when
    it does not divide, the global batch then being `world * (global_batch // world)`."""
    share = global_batch // world
    if share < 1:
        raise ConfigError(f"{key}={global_batch} is smaller than the number of DDP ranks ({world}); raise it")
    if global_batch % world:
        rank_zero_warn(
            f"{key}={global_batch} (the global batch) does not divide across {world} DDP ranks: each rank loads "
            f"{share}, so a step sees {share * world} samples"
        )
    return share


class OODDataModule(LightningDataModule):
    """Loaders for training (ID train, optional outliers) and for the evaluation pass over every split.

    `batch_size` / `outlier_batch_size` are global (all DDP ranks together, split per rank in `train_dataloader`);
    `eval_batch_size` is per rank (evaluation results do not depend on it). `num_workers`: loader processes per rank
    (None: 4, or fewer on a machine with fewer CPUs, `loader_workers`; the configs' `${ood.workers:N}`: N, or fewer
    likewise); evaluation results do not depend on it, the training augmentation does (each worker draws its random
    crops from a stream of its own). `csid`: add the benchmark's
    covariate-shifted ID sets to the evaluation pass (after the OOD sets, role `csid`); full-spectrum evaluation
    (`evaluation.fsood=true`) needs them, and the data configs set it from that key. `evaluate`: the run evaluates
    (`ood-train evaluate=false`: no, so `csid` asks for no set and reads none). `ood_subset`: `all`, or
    `first_fifth` (every test OOD set cut to its first len(ID test) // 5 samples before the evaluation pass, for every
    scorer alike: the heatmap paper's protocol). `drop_last`: the training loader leaves out the last partial ID
    batch of an epoch (false: keeps it; see the module docstring).
    """

    def __init__(
        self,
        benchmark: Benchmark,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        outlier_batch_size: int | None = None,
        num_workers: int | None = 0,
        pin_memory: bool = False,
        download: bool = False,
        seed: int = 0,
        fit_fraction: float = 1.0,
        fit_seed: int = 0,
        csid: bool = False,
        ood_subset: str = "all",
        drop_last: bool = True,
        evaluate: bool = True,
    ) -> None:
        super().__init__()
        check_loader_options({"fit_fraction": fit_fraction, "batch_size": batch_size, "eval_batch_size": eval_batch_size,
                              "outlier_batch_size": outlier_batch_size, "num_workers": num_workers, "fit_seed": fit_seed})
        csid = csid and evaluate
        #: the run evaluates: without it (`ood-train evaluate=false`) the protocol's OOD sets are not asked for
        self.evaluate = bool(evaluate)
        if csid and not benchmark.csid_names:
            raise ConfigError(
                f"full-spectrum evaluation (evaluation.fsood=true) needs covariate-shifted ID sets, and benchmark "
                f"{benchmark.name} lists none: {benchmark.csid_how}"
            )
        self.csid = bool(csid)
        if ood_subset not in OOD_SUBSETS:
            raise ConfigError(f"data.ood_subset={ood_subset!r}; choices: {list(OOD_SUBSETS)}")
        self.ood_subset = ood_subset
        if not isinstance(drop_last, bool):
            raise ConfigError(f"data.drop_last={drop_last!r}; choices: [true, false]")
        #: training leaves out the last partial ID batch of an epoch (false: keeps it, as OpenOOD and energy_ood)
        self.drop_last = drop_last
        self.benchmark = benchmark
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.outlier_batch_size = outlier_batch_size or 2 * batch_size
        self.num_workers = loader_workers(num_workers)
        # page-locked batches only for a GPU to copy them to: on a CPU-only machine torch warns at every loader
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.download = download
        self.seed = seed
        #: detectors fit on this fraction of the ID training split, drawn with `fit_seed` (ImageNet scale)
        self.fit_fraction = fit_fraction
        self.fit_seed = fit_seed
        self.streams: tuple[Stream, ...] = ("id",)
        #: the method the streams are served to (`use_streams`), for messages
        self.method = "the method"
        self._eval: list[tuple[EvalSplit, Dataset]] | None = None
        self._sources: dict[str, Dataset] = {}
        #: per-batch crop/flip of in-memory training streams, applied on the device (`on_after_batch_transfer`)
        self._augment: dict[str, PadCropFlip | None] = {}

    @property
    def name(self) -> str:
        return self.benchmark.name

    @property
    def num_classes(self) -> int:
        return self.benchmark.num_classes

    def use_streams(self, streams: Sequence[str], method: str) -> None:
        """Serve exactly the training `streams` method `method` declares; fails now (before any training) when the
        benchmark lacks one, naming the method, the benchmark and the choices."""
        unknown = [s for s in streams if s not in STREAMS]
        if unknown or "id" not in streams:
            raise ConfigError(f"method {method}: streams {list(streams)} must include 'id', choices: {list(STREAMS)}")
        if "outliers" in streams and self.benchmark.outlier_set == "none":
            b = self.benchmark
            raise no_outliers(method, self.name, b.outlier_set, b.outlier_choices, b.outliers_key)
        self.streams = tuple(streams)  # type: ignore[assignment]
        self.method = method

    def prepare_data(self) -> None:
        self.benchmark.prepare(download=self.download, evaluate=self.evaluate)
        if self.csid:
            self.benchmark.csid_test()  # names every missing csid set now, before training

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Any = None, drop_last: bool = False) -> DataLoader:
        """A loader of `Batch`es that leaves out the last partial batch when `drop_last`; every loader keeps its
        workers (validation runs every epoch, ODIN re-reads the evaluation splits)."""
        return DataLoader(
            Indexed(dataset),
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_batch,
        )

    def _dataset(self, dataset: Dataset) -> Dataset:
        """The benchmark's dataset, decoded once into memory when the benchmark is `in_memory`."""
        return to_memory(dataset, self.benchmark.cache_dir) if self.benchmark.in_memory else dataset

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        world = world_size()
        batch = per_rank_batch(self.batch_size, "data.batch_size", world)
        train = self._dataset(self.benchmark.train(augment=True))
        id_batches = self.id_batches(len(train), batch, world)  # type: ignore[arg-type]
        self._augment = {"id": batch_augmentation(train)}
        loader = self._loader(train, batch, EpochShuffle(train, self.seed), drop_last=self.drop_last)
        if "outliers" not in self.streams:
            self.benchmark.outliers_unused(self.method)
            return loader
        outliers = self.benchmark.outliers()
        assert outliers is not None, "use_streams checked that the benchmark has outliers"
        outliers = self._dataset(outliers)
        self._augment["outliers"] = batch_augmentation(outliers)
        out_batch = per_rank_batch(self.outlier_batch_size, "data.outlier_batch_size", world)
        # one full outlier batch per ID batch of a rank (the partial last one too), plus one spare, so the ID stream
        # sets the epoch length on every rank
        sampler = OutlierSampler(outliers, (id_batches + 1) * out_batch * world, self.seed)
        return CombinedLoader(
            {"id": loader, "outliers": self._loader(outliers, out_batch, sampler, drop_last=True)},
            mode="min_size",
        )

    def id_batches(self, n: int, batch: int, world: int) -> int:
        """The ID training batches of one rank in an epoch: its shard (`DistributedSampler` pads it to
        ceil(n / world)) in batches of `batch`, the partial last one left out when `drop_last`. Refuses an epoch without
        a step (a batch larger than the shard, dropped) and a kept last batch of one image (BatchNorm cannot train on
        one: torch's "Expected more than 1 value per channel")."""
        shard = math.ceil(n / world)
        if self.drop_last and shard < batch:
            raise ConfigError(f"data.batch_size={self.batch_size} is larger than the {n} ID training images "
                              f"({world} rank(s)): the partial last batch is dropped, so no training step would run; "
                              "lower data.batch_size")
        if not self.drop_last and shard % batch == 1:
            raise ConfigError(f"data.drop_last=false keeps a last training batch of 1 image ({n} ID training images, "
                              f"{world} rank(s), data.batch_size={self.batch_size}), on which BatchNorm cannot train: "
                              "change data.batch_size or set data.drop_last=true")
        return shard // batch if self.drop_last else math.ceil(shard / batch)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Batch:
        """The combined `{"id": Batch, "outliers": Batch}` of an outlier method becomes one `Batch` with `x_out`;
        in-memory training images (`x`, `x_out`) get their random crop and flip here, per sample, on the device."""
        if isinstance(batch, dict):
            ident, out = batch["id"], batch["outliers"]
            batch = Batch(ident.x, ident.y, ident.index, x_out=out.x)
        if self.trainer is not None and self.trainer.training:
            augment_id, augment_out = self._augment.get("id"), self._augment.get("outliers")
            if augment_id is not None:
                batch.x = augment_id(batch.x)
            if augment_out is not None and batch.x_out is not None:
                batch.x_out = augment_out(batch.x_out)
        return batch

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset(self.benchmark.val()), self.eval_batch_size)

    def _eval_sets(self) -> list[tuple[EvalSplit, Dataset]]:
        if self._eval is None:
            sets: list[tuple[EvalSplit, Dataset]] = [
                (EvalSplit("train", "fit"), self.fit_subset(self.benchmark.train(augment=False))),
                (EvalSplit("val", "id_val"), self.benchmark.val()),
                (EvalSplit("test", "id_test"), self.benchmark.test()),
            ]
            ood_val = self.benchmark.ood_val()
            if ood_val is not None:
                sets.append((EvalSplit("val_ood", "ood_val"), ood_val))
            sets += [(EvalSplit(s.name, "ood", s.group), s.dataset) for s in self.benchmark.ood_test()]
            if self.ood_subset == "first_fifth":
                limit = len(sets[2][1]) // 5  # type: ignore[arg-type]
                sets = [(sp, Subset(ds, range(min(limit, len(ds)))) if sp.role == "ood" else ds) for sp, ds in sets]  # type: ignore[arg-type]
            if self.csid:
                sets += [(EvalSplit(s.name, "csid"), s.dataset) for s in self.benchmark.csid_test()]
            self._eval = [(split, self._dataset(dataset)) for split, dataset in sets]
            self._sources = {split.name: dataset for split, dataset in sets}  # before decoding into memory
        return self._eval

    def sample_names(self, split: str, rows: Sequence[int]) -> list[str]:
        """The image file of each of the dataset `rows` of evaluation split `split` (`<split>[row]` for an item
        without one): what per-image scores are traced back to (`ood.data.samples`)."""
        self._eval_sets()
        return item_names(self._sources[split], rows, split)

    def fit_subset(self, train: Dataset) -> Dataset:
        """The fit split: `train` itself, or `fit_fraction` of it (sorted indices, drawn with `fit_seed`)."""
        if self.fit_fraction == 1:
            return train
        n = len(train)  # type: ignore[arg-type]
        keep = max(1, round(self.fit_fraction * n))
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(self.fit_seed))[:keep].sort().values
        # the rows record the fraction, not the count: said once as the evaluation starts (3 of 32 at 0.1 fitted knn)
        log.info("detectors fit on %d of the %d ID train images (data.fit_fraction=%s, data.fit_seed=%d)", keep, n,
                 self.fit_fraction, self.fit_seed)
        return Subset(train, rows.tolist())

    @property
    def eval_splits(self) -> list[EvalSplit]:
        """The evaluation splits, in the order of `test_dataloader()`."""
        return [split for split, _ in self._eval_sets()]

    def screen(self, banks: Mapping[str, FeatureBank]) -> tuple[dict[str, FeatureBank], dict[str, dict[str, Any]]]:
        """The benchmark's `screen` of the evaluation banks (keyed by split name), given the evaluation datasets."""
        return self.benchmark.screen(banks, self.eval_splits, {s.name: ds for s, ds in self._eval_sets()})

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(ds, self.eval_batch_size) for _, ds in self._eval_sets()]

    def fit_data(
        self,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        world_size: int = 1,
        rank: int = 0,
        barrier: Any = None,
    ) -> FitData:
        """What a method's `prepare` may read (`ood.data.fit`): the datasets by name, built on first use, the
        batch sizes, the seed, and the given device, dtype and ranks (the trainer's; defaults: one CPU process)."""
        evals = {split.name: (lambda ds=ds: ds) for split, ds in self._eval_sets()}
        fit = evals.pop("train")
        builders = {
            "train": lambda: self.benchmark.train(augment=False),
            "train_augmented": lambda: self.benchmark.train(augment=True),
            "fit": fit,
            **evals,
        }
        if self.benchmark.outlier_set != "none":
            builders["outliers"] = self.benchmark.outliers  # type: ignore[dict-item]
        extra = {"barrier": barrier} if barrier is not None else {}
        return FitData(
            datasets=LazyDatasets(builders),
            benchmark=self.name,
            num_classes=self.num_classes,
            seed=self.seed,
            batch_size=self.batch_size,
            eval_batch_size=self.eval_batch_size,
            input_mean=tuple(self.benchmark.input_mean),
            input_std=tuple(self.benchmark.input_std),
            outlier_set=self.benchmark.outlier_set,
            outlier_choices=tuple(self.benchmark.outlier_choices),
            outliers_key=self.benchmark.outliers_key,
            device=torch.device(device),
            dtype=dtype,
            world_size=world_size,
            rank=rank,
            num_workers=self.num_workers,
            **extra,
        )
