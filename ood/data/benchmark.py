"""The benchmark DataModule: one ID dataset with its named near/far OOD sets, validation OOD and outliers.

A `Benchmark` (digits, CIFAR, ...) only knows how to build datasets; `OODDataModule` turns it into loaders.
Evaluation loaders come in a fixed order described by `eval_splits`, and every evaluation sample carries its
dataset index so results can be deduplicated after a DDP gather (DESIGN §4).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

Role = Literal["fit", "id_val", "id_test", "ood_val", "ood"]


@dataclass(frozen=True)
class OODSet:
    """A named test OOD set and its group."""

    name: str
    group: Literal["near", "far"]
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


class Benchmark(ABC):
    """Builds the datasets of one ID/OOD benchmark. Items are `(image tensor, label)`; OOD labels are -1."""

    name: str
    num_classes: int
    in_channels: int

    @property
    def input_std(self) -> tuple[float, ...]:
        """Per-channel std of the input normalisation (inputs are (pixel - mean) / std, pixels in [0, 1]); input
        perturbations given in pixel units (ODIN) are divided by it."""
        return (1.0,) * self.in_channels

    def prepare(self, download: bool = False) -> None:  # noqa: B027 - optional hook
        """Check files, downloading what is missing when `download` (called once, on global rank zero)."""

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


class OODDataModule(LightningDataModule):
    """Loaders for training (ID train, optional outliers) and for the evaluation pass over every split."""

    def __init__(
        self,
        benchmark: Benchmark,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        outlier_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        download: bool = False,
    ) -> None:
        super().__init__()
        self.benchmark = benchmark
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.outlier_batch_size = outlier_batch_size or 2 * batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.download = download
        self._eval: list[tuple[EvalSplit, Dataset]] | None = None

    @property
    def name(self) -> str:
        return self.benchmark.name

    @property
    def num_classes(self) -> int:
        return self.benchmark.num_classes

    def prepare_data(self) -> None:
        self.benchmark.prepare(download=self.download)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, train: bool = False) -> DataLoader:
        """Training loaders drop the last partial batch and keep their workers; evaluation loaders (about a dozen,
        each used once per evaluation) do neither."""
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=train and self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(Indexed(self.benchmark.train(augment=True)), self.batch_size, shuffle=True, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(Indexed(self.benchmark.val()), self.eval_batch_size, shuffle=False)

    def outlier_dataloader(self) -> DataLoader | None:
        """Shuffled outlier-exposure loader, or None when the benchmark has no outlier set."""
        outliers = self.benchmark.outliers()
        if outliers is None:
            return None
        return self._loader(Indexed(outliers), self.outlier_batch_size, shuffle=True, train=True)

    def _eval_sets(self) -> list[tuple[EvalSplit, Dataset]]:
        if self._eval is None:
            sets: list[tuple[EvalSplit, Dataset]] = [
                (EvalSplit("train", "fit"), self.benchmark.train(augment=False)),
                (EvalSplit("val", "id_val"), self.benchmark.val()),
                (EvalSplit("test", "id_test"), self.benchmark.test()),
            ]
            ood_val = self.benchmark.ood_val()
            if ood_val is not None:
                sets.append((EvalSplit("val_ood", "ood_val"), ood_val))
            sets += [(EvalSplit(s.name, "ood", s.group), s.dataset) for s in self.benchmark.ood_test()]
            self._eval = sets
        return self._eval

    @property
    def eval_splits(self) -> list[EvalSplit]:
        """The evaluation splits, in the order of `test_dataloader()`."""
        return [split for split, _ in self._eval_sets()]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(Indexed(ds), self.eval_batch_size, shuffle=False) for _, ds in self._eval_sets()]
