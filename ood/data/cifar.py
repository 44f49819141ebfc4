"""CIFAR-10 / CIFAR-100 under the OpenOOD v1.5 protocol (`data=cifar10`, `data=cifar100`).

| ID        | near-OOD         | far-OOD                          | validation OOD | outliers (OE)          |
|-----------|------------------|----------------------------------|----------------|------------------------|
| cifar10   | cifar100, tin    | mnist, svhn, texture, places365  | TIN (`val_tin`)| TIN-597 or 300K .npy   |
| cifar100  | cifar10, tin     | mnist, svhn, texture, places365  | TIN (`val_tin`)| TIN-597 or 300K .npy   |

Two sources, chosen by `source=auto` (the default):

- `openood`: OpenOOD's own files under `data_dir`, read as-is (used when
  `benchmark_imglist/<id>/train_<id>.txt` exists): `images_classic/...` plus the lists `train_<id>`, `val_<id>`,
  `test_<id>`, `val_tin`, `test_<near>`, `test_tin`, `test_mnist`, `test_svhn`, `test_texture`,
  `test_places365`, `train_tin597`. These are the lists the OpenOOD leaderboard is computed on.
- `torchvision`: CIFAR-10/100, MNIST, SVHN, DTD (Textures) and Places365 from torchvision under
  `data_dir/torchvision/<set>/`, downloaded by `prepare(download=True)` (`data.download=true`). TinyImageNet (near-OOD,
  validation OOD, TIN-597 outliers) only exists as OpenOOD's files: when they are absent the run goes on without
  TIN and says so. Deviations from OpenOOD's lists in this mode: Textures = all 5,640 DTD images (the three
  partition-1 splits), Places365 = torchvision's whole small validation split (36,500 images; OpenOOD's list is a
  filtered subset), MNIST = the 10,000 test images (OpenOOD lists all 70,000).

ID validation = 1,000 images held out of the official test set (OpenOOD's `val_<id>` list when present, else a
stratified split with a fixed seed); the ID test set is the rest. Preprocessing follows OpenOOD: RGB (grey
images get 3 channels), resize 32 (bilinear), centre crop 32, normalise with the ID dataset's statistics; training
adds a horizontal flip and a 4-pixel padded random crop (OpenOOD's `BasePreprocessor`), both configurable.
Outliers use the training transform.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Subset
from torchvision import transforms as T

from ood.data.benchmark import Benchmark, OODSet
from ood.data.imglist import ImageList
from ood.data.npy import NpyImages
from ood.errors import ConfigError, DataNotFoundError
from ood.utils import get_logger

log = get_logger(__name__)

FAR = ("mnist", "svhn", "texture", "places365")
SOURCES = ("auto", "openood", "torchvision")
OUTLIERS = ("tin597", "random300k", "none")
OPENOOD_DOWNLOAD = (
    "git clone https://github.com/Jingkang50/OpenOOD && cd OpenOOD && pip install gdown && python scripts/download/download.py "
    "--contents datasets --datasets cifar-10 cifar-100 --dataset_mode benchmark --save_dir {data_dir}"
)


class RGB:
    """PIL image -> RGB (grey images get three identical channels), as OpenOOD's `Convert('RGB')`."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.convert("RGB")


class Transformed(Dataset):
    """Applies `transform` to the images of a `(image, label)` dataset; `label` overrides every label (-1 for OOD)."""

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any], label: int | None = None) -> None:
        self.dataset = dataset
        self.transform = transform
        self.label = label

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.dataset[i]
        return self.transform(image), (int(label) if self.label is None else self.label)


def stratified_split(targets: Sequence[int], size: int, seed: int) -> tuple[list[int], list[int]]:
    """(held-out indices, remaining indices): `size` items spread evenly over the classes, chosen with `seed`."""
    labels = torch.as_tensor(list(targets))
    classes = labels.unique().tolist()
    if not 0 < size < len(labels):
        raise ConfigError(f"val_size must be between 1 and {len(labels) - 1} (the ID test set size), got {size}")
    gen = torch.Generator().manual_seed(seed)
    held: list[int] = []
    for k, cls in enumerate(classes):
        idx = torch.nonzero(labels == cls)[:, 0]
        take = size // len(classes) + (1 if k < size % len(classes) else 0)
        held += idx[torch.randperm(len(idx), generator=gen)[:take]].tolist()
    chosen = set(held)
    return sorted(held), [i for i in range(len(labels)) if i not in chosen]


class CIFARBenchmark(Benchmark):
    """CIFAR ID benchmark with OpenOOD v1.5's OOD sets (see the module docstring); subclasses fix the ID set.

    Args:
        data_dir: where OpenOOD's tree (`images_classic/`, `benchmark_imglist/`) or `torchvision/` lives.
        source: `auto` (OpenOOD's lists when present, else torchvision), `openood` or `torchvision`.
        augment: random flip + padded crop for training.
        crop_padding: padding of the random crop (0 = no crop).
        hflip: random horizontal flip.
        val_size: ID validation images held out of the test set when there is no `val_<id>` list.
        split_seed: seed of that split.
        outliers: `tin597` (OpenOOD's `train_tin597` list), `random300k` (`outliers_file`), or `none`.
        outliers_file: the `.npy` of the 300K random images, relative to `data_dir` unless absolute.
        in_memory: decode every set once into a uint8 array cached in `data_dir/ood_cache/` and flip/crop per
            batch on the training device (`ood.data.memory`); false reads and transforms each image per item.
    """

    in_channels = 3
    #: the other CIFAR (near-OOD), torchvision class name, normalisation (OpenOOD `preprocessor.py`)
    near_id: ClassVar[str]
    torchvision_class: ClassVar[str]
    mean: ClassVar[tuple[float, float, float]]
    std: ClassVar[tuple[float, float, float]]

    outlier_choices = OUTLIERS

    def __init__(
        self,
        data_dir: str | Path,
        source: str = "auto",
        augment: bool = True,
        crop_padding: int = 4,
        hflip: bool = True,
        val_size: int = 1000,
        split_seed: int = 0,
        outliers: str = "tin597",
        outliers_file: str = "300K_random_images.npy",
        in_memory: bool = True,
    ) -> None:
        if source not in SOURCES:
            raise ConfigError(f"unknown data source {source!r}; choices: {list(SOURCES)}")
        if outliers not in OUTLIERS:
            raise ConfigError(f"unknown outlier set {outliers!r}; choices: {list(OUTLIERS)}")
        self.data_dir = Path(data_dir)
        self.source = source
        self.augment = augment
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.val_size = val_size
        self.split_seed = split_seed
        self.outlier_set = outliers
        self.outliers_file = outliers_file
        self.in_memory = in_memory

    # ----- where things are ---------------------------------------------------------------------------------------
    @property
    def lists_dir(self) -> Path:
        return self.data_dir / "benchmark_imglist" / self.name

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "ood_cache"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images_classic"

    @property
    def torchvision_dir(self) -> Path:
        return self.data_dir / "torchvision"

    def list_file(self, name: str) -> Path:
        """`benchmark_imglist/<id>/<name>.txt` under `data_dir`."""
        return self.lists_dir / f"{name}.txt"

    @property
    def resolved_source(self) -> str:
        """`openood` or `torchvision` (what `auto` picks: OpenOOD's lists when the ID train list exists)."""
        if self.source != "auto":
            return self.source
        return "openood" if self.list_file(f"train_{self.name}").is_file() else "torchvision"

    @property
    def input_std(self) -> tuple[float, ...]:
        return self.std

    def _openood_required(self) -> list[str]:
        return [f"train_{self.name}", f"test_{self.name}", "val_tin", f"test_{self.near_id}", "test_tin"] + [
            f"test_{s}" for s in FAR
        ]

    def _how_to_get(self) -> str:
        return (
            f"Get OpenOOD's benchmark with its download script "
            f"({OPENOOD_DOWNLOAD.format(data_dir=self.data_dir.resolve())}), "
            f"or set data.download=true to fetch CIFAR-10/100, MNIST, SVHN, DTD and Places365 with "
            f"torchvision into {self.torchvision_dir} (TinyImageNet and TIN-597 come only from OpenOOD's files)"
        )

    # ----- transforms ---------------------------------------------------------------------------------------------
    def eval_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """OpenOOD's test preprocessing: RGB, resize 32 (bilinear), centre crop 32, tensor, normalise."""
        return T.Compose([RGB(), *self._resize(), T.ToTensor(), T.Normalize(self.mean, self.std)])

    def train_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """OpenOOD's training preprocessing: as the test one plus flip and padded random crop (when enabled)."""
        if not self.augment:
            return self.eval_transform()
        steps: list[Any] = [RGB(), *self._resize()]
        if self.hflip:
            steps.append(T.RandomHorizontalFlip())
        if self.crop_padding > 0:
            steps.append(T.RandomCrop(32, padding=self.crop_padding))
        return T.Compose([*steps, T.ToTensor(), T.Normalize(self.mean, self.std)])

    @staticmethod
    def _resize() -> list[Any]:
        return [T.Resize(32, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(32)]

    # ----- preparation --------------------------------------------------------------------------------------------
    def prepare(self, download: bool = False) -> None:
        """Check that every file the protocol needs is there (downloading with torchvision when `download`)."""
        source = self.resolved_source
        if source == "openood":
            missing = [str(self.list_file(n)) for n in self._openood_required() if not self.list_file(n).is_file()]
            if not self.images_dir.is_dir():
                missing.append(f"{self.images_dir}/ (the images)")
            if missing:
                raise DataNotFoundError(
                    f"{self.name}: OpenOOD data incomplete under {self.data_dir}; missing: {', '.join(missing)}. "
                    + self._how_to_get()
                )
        else:
            if self.source == "auto" and not download and not self._tv_present():
                raise DataNotFoundError(
                    f"{self.name}: no data found: looked for OpenOOD's lists in {self.lists_dir} and for torchvision's "
                    f"{self.torchvision_class} in {self.torchvision_dir / self.name}. " + self._how_to_get()
                )
            for name, build in self._tv_builders().items():
                self._tv_build(name, build, download=download)
            if not self._tin_available():
                log.warning(
                    "%s (torchvision source): TinyImageNet not found (looked for %s, %s and %s): near-OOD has no 'tin' "
                    "set and there is no validation OOD (detector grids are not tuned); results are not comparable "
                    "with the OpenOOD leaderboard. TIN comes only from OpenOOD's files: %s",
                    self.name,
                    self.list_file("test_tin"),
                    self.list_file("val_tin"),
                    self.images_dir,
                    OPENOOD_DOWNLOAD.format(data_dir=self.data_dir.resolve()),
                )
        log.info("%s: reading %s data from %s", self.name, source, self.data_dir)

    # ----- OpenOOD lists ------------------------------------------------------------------------------------------
    def _list(self, name: str, transform: Callable[[Image.Image], torch.Tensor], ood: bool = False) -> ImageList:
        if not self.list_file(name).is_file():
            raise DataNotFoundError(
                f"{self.name}: image list {self.list_file(name)} not found. " + self._how_to_get()
            )
        return ImageList(self.list_file(name), self.images_dir, transform, label=-1 if ood else None)

    def _tin_available(self) -> bool:
        return self.list_file("test_tin").is_file() and self.list_file("val_tin").is_file() and self.images_dir.is_dir()

    # ----- torchvision --------------------------------------------------------------------------------------------
    def _tv_present(self) -> bool:
        return (self.torchvision_dir / self.name).is_dir()

    def _tv_builders(self) -> dict[str, Callable[[Path, bool], Dataset]]:
        """Constructors `(root, download) -> dataset of (PIL image, label)` for every torchvision set."""
        from torchvision import datasets as tvd

        def cifar(cls_name: str, train: bool) -> Callable[[Path, bool], Dataset]:
            return lambda root, download: getattr(tvd, cls_name)(str(root), train=train, download=download)

        other = CIFAR100Benchmark if self.name == "cifar10" else CIFAR10Benchmark
        return {
            f"{self.name}:train": cifar(self.torchvision_class, True),
            f"{self.name}:test": cifar(self.torchvision_class, False),
            f"{self.near_id}:test": cifar(other.torchvision_class, False),
            "mnist": lambda root, download: tvd.MNIST(str(root), train=False, download=download),
            "svhn": lambda root, download: tvd.SVHN(str(root), split="test", download=download),
            "texture": lambda root, download: ConcatDataset(
                [tvd.DTD(str(root), split=s, partition=1, download=download) for s in ("train", "val", "test")]
            ),
            "places365": lambda root, download: tvd.Places365(str(root), split="val", small=True, download=download),
        }

    def _tv_build(self, name: str, build: Callable[[Path, bool], Dataset], download: bool = False) -> Dataset:
        root = self.torchvision_dir / name.split(":")[0]
        try:
            return build(root, download)
        except RuntimeError as err:  # torchvision's "Dataset not found or corrupted. You can use download=True"
            raise DataNotFoundError(
                f"{self.name}: torchvision dataset {name.split(':')[0]!r} not found in {root} ({err}). " + self._how_to_get()
            ) from err

    @cached_property
    def _tv(self) -> dict[str, Dataset]:
        return {name: self._tv_build(name, build) for name, build in self._tv_builders().items()}

    # ----- ID splits ----------------------------------------------------------------------------------------------
    @cached_property
    def _id_test_split(self) -> tuple[list[int], list[int]] | None:
        """(val, test) indices into the official test set, or None when OpenOOD's `val_<id>` list is used."""
        if self.resolved_source == "openood" and self.list_file(f"val_{self.name}").is_file():
            return None
        if self.resolved_source == "openood":
            targets = self._list(f"test_{self.name}", self.eval_transform()).targets
        else:
            targets = self._tv[f"{self.name}:test"].targets  # type: ignore[attr-defined]
        return stratified_split(targets, self.val_size, self.split_seed)

    def _official_test(self) -> Dataset:
        if self.resolved_source == "openood":
            return self._list(f"test_{self.name}", self.eval_transform())
        return Transformed(self._tv[f"{self.name}:test"], self.eval_transform())

    def train(self, augment: bool = True) -> Dataset:
        transform = self.train_transform() if augment else self.eval_transform()
        if self.resolved_source == "openood":
            return self._list(f"train_{self.name}", transform)
        return Transformed(self._tv[f"{self.name}:train"], transform)

    def val(self) -> Dataset:
        split = self._id_test_split
        if split is None:
            return self._list(f"val_{self.name}", self.eval_transform())
        return Subset(self._official_test(), split[0])

    def test(self) -> Dataset:
        split = self._id_test_split
        return self._official_test() if split is None else Subset(self._official_test(), split[1])

    # ----- OOD ----------------------------------------------------------------------------------------------------
    def ood_test(self) -> list[OODSet]:
        groups = {self.near_id: "near", "tin": "near", **dict.fromkeys(FAR, "far")}
        if self.resolved_source == "openood":
            return [OODSet(n, g, self._list(f"test_{n}", self.eval_transform(), ood=True)) for n, g in groups.items()]
        sets = []
        for name, group in groups.items():
            if name == "tin":
                if self._tin_available():
                    sets.append(OODSet(name, group, self._list("test_tin", self.eval_transform(), ood=True)))
                continue
            key = f"{name}:test" if name == self.near_id else name
            sets.append(OODSet(name, group, Transformed(self._tv[key], self.eval_transform(), label=-1)))
        return sets

    def ood_val(self) -> Dataset | None:
        if self.resolved_source == "torchvision" and not self._tin_available():
            return None
        return self._list("val_tin", self.eval_transform(), ood=True)

    def outliers(self) -> Dataset | None:
        if self.outlier_set == "none":
            return None
        if self.outlier_set == "tin597":
            return self._list("train_tin597", self.train_transform(), ood=True)
        path = Path(self.outliers_file)
        path = path if path.is_absolute() else self.data_dir / path
        if not path.is_file():
            raise DataNotFoundError(
                f"{self.name}: outlier images {path} not found; download "
                "https://people.eecs.berkeley.edu/~hendrycks/300K_random_images.npy into data_dir "
                "(or set data.benchmark.outliers_file), or use data.benchmark.outliers=tin597"
            )
        return NpyImages(path, self.train_transform())


class CIFAR10Benchmark(CIFARBenchmark):
    """CIFAR-10 as ID; near-OOD CIFAR-100 and TIN (OpenOOD v1.5)."""

    name = "cifar10"
    num_classes = 10
    near_id = "cifar100"
    torchvision_class = "CIFAR10"
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


class CIFAR100Benchmark(CIFARBenchmark):
    """CIFAR-100 as ID; near-OOD CIFAR-10 and TIN (OpenOOD v1.5)."""

    name = "cifar100"
    num_classes = 100
    near_id = "cifar10"
    torchvision_class = "CIFAR100"
    mean = (0.5071, 0.4867, 0.4408)
    std = (0.2675, 0.2565, 0.2761)
