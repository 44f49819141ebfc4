"""`FitData`: what a method may read before training (its fit-time passes: statistics, prototypes, a teacher's
features, an outlier pool), handed to `OODMethod.prepare` once by the framework.

The framework builds it from the DataModule (`OODDataModule.fit_data`) and the trainer (device, dtype, ranks); a
test or a notebook builds it the same way without any `Trainer`. A method never reaches through the trainer for
these facts.

Datasets by name (built on first use, then kept): `train` (the whole ID training set, evaluation transform),
`train_augmented` (with the training augmentation), `fit` (the split detectors fit on: `data.fit_fraction` of
`train`), `val`, `test`, `val_ood` (when the benchmark has one), `outliers` (when an outlier set is selected) and
every test OOD set under its own name. Items are `(image, label)`; OOD labels are -1. The evaluation splits (`fit`,
`val`, `test`, OOD sets) are the very datasets the evaluation pass reads (decoded into memory for an `in_memory`
benchmark, cut by `data.ood_subset`); `train`, `train_augmented` and `outliers` are built by the benchmark on
first use (a method that draws a few outliers does not decode the whole outlier set).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

from ood.errors import ConfigError
from ood.features.passes import forward_dataset


class LazyDatasets(Mapping[str, Dataset]):
    """A read-only name -> dataset mapping whose datasets are built on first access (then kept)."""

    def __init__(self, builders: Mapping[str, Callable[[], Dataset]]) -> None:
        self._builders = dict(builders)
        self._built: dict[str, Dataset] = {}

    def __getitem__(self, name: str) -> Dataset:
        if name not in self._builders:
            raise ConfigError(f"no dataset {name!r} in this benchmark's fit data; choices: {sorted(self._builders)}")
        if name not in self._built:
            self._built[name] = self._builders[name]()
        return self._built[name]

    def __contains__(self, name: object) -> bool:
        """Membership without building (Mapping's default calls `__getitem__`, whose unknown-name error is not a
        KeyError)."""
        return name in self._builders

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)


def no_outliers(method: str, benchmark: str, outlier_set: str, choices: Sequence[str], key: str) -> ConfigError:
    """The one line for an outlier method on a benchmark without an outlier set: what to set (`key`), and to what
    (the named sets of `choices`, or the one `<description>` of what to give)."""
    options = [c for c in choices if c != "none"]
    if len(options) == 1 and options[0].startswith("<"):
        fix = f"set {key}={options[0]}"
    else:
        fix = f"set {key}= one of {options}" if options else "use a benchmark that has outliers"
    return ConfigError(f"method {method} trains on outliers, but benchmark {benchmark} has none ({key}={outlier_set}); {fix}")


def _no_barrier() -> None:
    """One process: nothing to wait for."""


@dataclass(frozen=True)
class FitData:
    """The benchmark's datasets and the run's facts a fit-time pass needs (module doc).

    Attributes:
        datasets: name -> dataset (module doc for the names).
        benchmark: the benchmark's name (e.g. `digits`), for cache keys and messages.
        num_classes, input_mean, input_std: the benchmark's classes and input normalisation (pixels = x std + mean).
        outlier_set, outlier_choices, outliers_key: the selected outlier set (`none` when there is none), the
            choices and the config key that selects it (for messages).
        seed: the run seed.
        batch_size: the global training batch (all ranks together).
        eval_batch_size: the per-rank batch of evaluation passes (the batch size of fit-time passes).
        device, dtype: where the method's parameters live and their floating dtype (the trainer's precision).
        world_size, rank: DDP ranks (1, 0 on one process).
        num_workers: DataLoader workers for passes.
        barrier: waits for every rank (a no-op on one process): e.g. after rank 0 wrote a shared cache file.
    """

    datasets: Mapping[str, Dataset]
    benchmark: str
    num_classes: int
    seed: int
    batch_size: int
    eval_batch_size: int
    input_mean: tuple[float, ...] = (0.0,)
    input_std: tuple[float, ...] = (1.0,)
    outlier_set: str = "none"
    outlier_choices: tuple[str, ...] = ("none",)
    outliers_key: str = "data.benchmark.outliers"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    world_size: int = 1
    rank: int = 0
    num_workers: int = 0
    barrier: Callable[[], None] = _no_barrier

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    def forward(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor | Mapping[str, torch.Tensor]],
        dataset: Dataset | torch.Tensor,
        module: nn.Module,
        desc: str,
        batch_size: int | None = None,
        distributed: bool = False,
    ) -> dict[str, torch.Tensor]:
        """`ood.features.passes.forward_dataset` with this run's device, dtype, workers and (unless given) the
        evaluation batch size: the one fit-time pass every method uses."""
        return forward_dataset(
            fn,
            dataset,
            module=module,
            batch_size=batch_size or self.eval_batch_size,
            device=self.device,
            dtype=self.dtype,
            num_workers=self.num_workers,
            desc=desc,
            distributed=distributed,
        )

    def require(self, name: str, method: str) -> Dataset:
        """Dataset `name`, or one clear line naming the method and what to set (e.g. an outlier set)."""
        if name == "outliers" and "outliers" not in self.datasets:
            raise no_outliers(method, self.benchmark, self.outlier_set, self.outlier_choices, self.outliers_key)
        return self.datasets[name]
