"""CIFAR-10 / CIFAR-100 as ID (`data=cifar10`, `data=cifar100`) under a selectable OOD protocol.

`data.benchmark.protocol` picks the OOD sets, each listed in the data YAML (`protocols:`; see `ood.data.sets`):

- `openood_v1.5` (default), the table below;
- `classic`: far-OOD Textures, SVHN, Places365, LSUN-Crop, LSUN-Resize, iSUN (ODIN, Energy, heatmap papers), no
  near-OOD, read from energy_ood's folder layout (`dtd/images`, `svhn/test_32x32.mat`, `places365/`, `LSUN_C/`,
  `LSUN_resize/`, `iSUN/` under `data_dir`); validation OOD = OpenOOD's TIN list when present (`experiment=energy_ce`:
  the OE / energy papers' sets made from the other CIFAR's test set, `ood.data.synthetic`);
- `oodformer`: CIFAR-10 ID vs CIFAR-100, ImageNet-resize, LSUN-resize, SVHN (CIFAR-100 ID: CIFAR-10 + the same),
  read from OODformer's layout (`cifar100-data/`, `Imagenet_resize/`, `LSUN_resize/`, `svhn-data/`).

OpenOOD v1.5:

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
Outliers use the training transform (Hendrycks' OE and energy_ood augment them), or with `augment_outliers=false`
the evaluation one (OpenOOD's `oe` split gets its `TestStandardPreProcessor`: the `experiment=cifar*_oe` presets).
The classic and OODformer sets get the same test preprocessing (their papers feed 32-pixel sets as is and resize +
centre-crop the larger ones, which is what resize 32 + centre crop 32 does).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Subset
from torchvision import transforms as T

from ood.data.benchmark import Benchmark, CSIDSet, OODSet
from ood.data.imglist import ImageList, check_id_labels
from ood.data.npy import NpyImages
from ood.data.samples import item_name
from ood.data.sets import (
    Protocol,
    SetSpec,
    TorchvisionBuilder,
    check_csid_labels,
    describe_missing,
    missing_csid_error,
    warn_skipped_csid,
)
from ood.data.synthetic import decoding, synthetic_set
from ood.errors import ConfigError, DataNotFoundError, check_range
from ood.utils import get_logger

log = get_logger(__name__)

SOURCES = ("auto", "openood", "torchvision")
OUTLIERS = ("tin597", "random300k", "none")
#: torchvision's sets by their usual names, for messages
TORCHVISION_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "mnist": "MNIST", "svhn": "SVHN", "texture": "DTD",
                     "places365": "Places365"}
OPENOOD_DOWNLOAD = (
    "git clone https://github.com/Jingkang50/OpenOOD && cd OpenOOD && pip install gdown && python scripts/download/download.py "
    "--contents datasets --datasets cifar-10 cifar-100 --dataset_mode benchmark --save_dir {data_dir}"
)


class RGB:
    """PIL image -> RGB (grey images get three identical channels), as OpenOOD's `Convert('RGB')`."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.convert("RGB")


#: the whole-number options of the file benchmarks (`data.benchmark.<key>`) -> their lowest value
BENCHMARK_COUNTS = {"image_size": 1, "resize": 1, "val_size": 1, "crop_padding": 0, "split_seed": 0}


def check_sizes(values: Mapping[str, Any]) -> None:
    """Refuse a `data.benchmark.<key>` size or seed (`BENCHMARK_COUNTS`) that is a fraction or below its lowest value
    as the benchmark is built: image_size=0 or crop_padding=-1 failed in torchvision's transforms at the first
    batch, split_seed=0.5 in torch.manual_seed as the validation split was drawn, each in a traceback."""
    for key, value in values.items():
        check_range(f"data.benchmark.{key}", value, BENCHMARK_COUNTS[key], integer=True)


def check_crop(resize: int, image_size: int, prefix: str, source: str = "") -> None:
    """A centre crop of `image_size` after a resize of the shorter side to `resize` must fit in it: `CenterCrop` pads
    a smaller image with black (data.resize=32 alone fed 224 pixels of mostly 0, silently). `prefix`: the config keys'
    (`data.`, `data.benchmark.`); `source`: where `image_size` came from, when not given."""
    if resize < image_size:
        raise ConfigError(f"{prefix}resize={resize} is below the centre crop {prefix}image_size={image_size}"
                          f"{f' ({source})' if source else ''}, which would pad every image with black: set "
                          f"{prefix}image_size={resize} too, or a resize >= image_size")


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

    def describe(self, i: int) -> str | None:
        return item_name(self.dataset, i)


def stratified_split(targets: Sequence[int], size: int, seed: int) -> tuple[list[int], list[int]]:
    """(held-out indices, remaining indices): `size` items, each class's share in proportion to its size (the
    largest remainders round up, ties to the first classes; at least one, beyond `size` if need be), chosen with
    `seed`. A balanced set gives every class size / K; an unbalanced one keeps its class proportions (an even split
    took half of a small class)."""
    labels = torch.as_tensor(list(targets))
    classes, counts = labels.unique(return_counts=True)
    n = len(labels)
    if not 0 < size < n:
        raise ConfigError(f"val_size must be between 1 and {n - 1} (the ID test set size), got {size}")
    shares = [size * c for c in counts.tolist()]
    take = [max(1, s // n) for s in shares]
    for k in sorted(range(len(shares)), key=lambda k: (-(shares[k] % n), k))[: max(0, size - sum(take))]:
        take[k] += 1
    gen = torch.Generator().manual_seed(seed)
    held: list[int] = []
    for cls, count in zip(classes.tolist(), take):
        idx = torch.nonzero(labels == cls)[:, 0]
        held += idx[torch.randperm(len(idx), generator=gen)[:count]].tolist()
    chosen = set(held)
    return sorted(held), [i for i in range(len(labels)) if i not in chosen]


class CIFARBenchmark(Benchmark):
    """CIFAR ID benchmark with the OOD sets of one protocol (see the module docstring); subclasses fix the ID set.

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
        protocol: the OOD protocol, a key of `protocols` (`openood_v1.5`, `classic`, `oodformer`).
        protocols: protocol name -> `{near: {set: spec}, far: {set: spec}, val_ood: spec}` (`ood.data.sets`);
            default: the `protocols` of `conf/data/<id>.yaml`.
        mean, std: input normalisation; None = the ID set's statistics (the heatmap paper uses 0.5, 0.5).
        image_size: side after resize + centre crop (32; 224 for OAL's 224-pixel ResNet-18 student and ViT teacher).
        in_memory: decode every set once into a uint8 array cached in `data_dir/ood_cache/` and flip/crop per
            batch on the training device (`ood.data.memory`); false reads and transforms each image per item.
        augment_outliers: the outliers get the training transform (as the ID training set: Hendrycks' OE,
            energy_ood); false: the evaluation transform (OpenOOD's `oe` split).
    """

    in_channels = 3
    #: torchvision class name, normalisation (OpenOOD `preprocessor.py`)
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
        protocol: str = "openood_v1.5",
        protocols: Mapping[str, Any] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        image_size: int = 32,
        in_memory: bool = True,
        augment_outliers: bool = True,
    ) -> None:
        if source not in SOURCES:
            raise ConfigError(f"unknown data source {source!r}; choices: {list(SOURCES)}")
        if outliers not in OUTLIERS:
            raise ConfigError(f"unknown outlier set {outliers!r}; choices: {list(OUTLIERS)}")
        check_sizes({"image_size": image_size, "val_size": val_size, "crop_padding": crop_padding,
                     "split_seed": split_seed})
        self.data_dir = Path(data_dir).expanduser()  # `~/data`: the shell leaves it after `paths.data_dir=`
        self.source = source
        self.augment = augment
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.val_size = val_size
        self.split_seed = split_seed
        self.outlier_set = outliers
        self.outliers_file = outliers_file
        self.protocol = Protocol.select(self._default_protocols() if protocols is None else protocols, protocol)
        self._tv_cache: dict[tuple[str, Path], Dataset] = {}
        self.mean = type(self).mean if mean is None else tuple(mean)  # type: ignore[assignment]
        self.std = type(self).std if std is None else tuple(std)  # type: ignore[assignment]
        self.image_size = image_size
        self.in_memory = in_memory
        self.augment_outliers = augment_outliers

    def _default_protocols(self) -> Mapping[str, Any]:
        from omegaconf import OmegaConf

        from ood import CONFIG_DIR

        return OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "data" / f"{self.name}.yaml").benchmark.protocols)

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
    def input_mean(self) -> tuple[float, ...]:
        return self.mean

    @property
    def input_std(self) -> tuple[float, ...]:
        return self.std

    @property
    def prefer(self) -> str:
        """The kind of set spec read when a spec offers several: OpenOOD's lists, or torchvision's files."""
        return "imglist" if self.resolved_source == "openood" else "torchvision"

    def _how_to_get(self) -> str:
        """What to download: OpenOOD's benchmark, or torchvision's files of the ID set and of the protocol's sets it
        can fetch (named by protocol: the classic one's differ from OpenOOD v1.5's)."""
        specs = [(n, s.source or s) for n, s in self.protocol.all_specs()]  # a synthetic set: its source's files
        fetched = sorted({TORCHVISION_NAMES.get(s.torchvision, s.torchvision) for _, s in specs if s.torchvision})
        by_file = sorted({"validation OOD" if n == "val_ood" else n for n, s in specs if not s.torchvision})
        by_file += ["TIN-597 outliers"] if self.outlier_set == "tin597" else []  # OpenOOD's train_tin597 list
        return (
            f"Get OpenOOD's benchmark with its download script "
            f"({OPENOOD_DOWNLOAD.format(data_dir=self.data_dir.resolve())}), "
            f"or set data.download=true to fetch {TORCHVISION_NAMES[self.name]}"
            + (f" (and the {self.protocol.name} protocol's {', '.join(fetched)})" if fetched else "")
            + f" with torchvision into {self.torchvision_dir}"
            + (f" ({', '.join(by_file)} only from their own files)" if by_file else "")
        )

    # ----- transforms ---------------------------------------------------------------------------------------------
    def eval_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """OpenOOD's test preprocessing: RGB, resize `image_size` (bilinear), centre crop, tensor, normalise."""
        return T.Compose([RGB(), *self._resize(), T.ToTensor(), T.Normalize(self.mean, self.std)])

    def train_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """OpenOOD's training preprocessing: as the test one plus flip and padded random crop (when enabled)."""
        if not self.augment:
            return self.eval_transform()
        steps: list[Any] = [RGB(), *self._resize()]
        if self.hflip:
            steps.append(T.RandomHorizontalFlip())
        if self.crop_padding > 0:
            steps.append(T.RandomCrop(self.image_size, padding=self.crop_padding))
        return T.Compose([*steps, T.ToTensor(), T.Normalize(self.mean, self.std)])

    def _resize(self) -> list[Any]:
        size = self.image_size
        return [T.Resize(size, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(size)]

    # ----- preparation --------------------------------------------------------------------------------------------
    def prepare(self, download: bool = False, evaluate: bool = True) -> None:
        """Check that every file the ID set and the protocol need is there (downloading with torchvision when
        `download`; the protocol's OOD sets only when the run `evaluate`s); every missing set is named with what was
        looked for and how to get it."""
        source = self.resolved_source
        missing = []
        if source == "openood":
            missing += [str(self.list_file(n)) for n in (f"train_{self.name}", f"test_{self.name}") if not self.list_file(n).is_file()]
            for split in ("train", "val", "test"):  # their labels, before any training
                if self.list_file(f"{split}_{self.name}").is_file():
                    check_id_labels(self.list_file(f"{split}_{self.name}"), self.num_classes)
            if not self.images_dir.is_dir():
                missing.append(f"{self.images_dir}/ (the images)")
            elif evaluate and self.list_file(f"test_{self.name}").is_file():  # the ID test images, read after training
                missing += SetSpec(imglist=str(self.list_file(f"test_{self.name}")),
                                   images=str(self.images_dir)).missing_images(self.data_dir)
        else:
            if self.source == "auto" and not download and not self._tv_present():
                raise DataNotFoundError(
                    f"{self.name}: no data found: looked for OpenOOD's lists in {self.lists_dir} and for torchvision's "
                    f"{self.torchvision_class} in {self.torchvision_dir / self.name}. " + self._how_to_get()
                )
            for key in (f"{self.name}:train", f"{self.name}:test"):
                self._tv_build(key, self.torchvision_dir / self.name, download=download)
        for name, spec in self.protocol.all_specs() if evaluate else []:
            missing += self._check(name, spec, download)
        if missing:
            raise DataNotFoundError(
                f"{self.name} ({self.protocol.name} protocol): data incomplete under {self.data_dir}; missing: "
                f"{', '.join(missing)}. " + self._how_to_get()
            )
        log.info("%s: reading %s data from %s (%s protocol)", self.name, source, self.data_dir, self.protocol.name)

    def _check(self, name: str, spec: SetSpec, download: bool) -> list[str]:
        """`describe_missing` of set `name` when it is absent and not optional (a torchvision set is built, downloaded
        when `download`; a synthetic set is checked by its source)."""
        kind = spec.kind(self.prefer)  # type: ignore[arg-type]
        if kind == "synthetic":
            assert spec.source is not None
            return self._check(f"{name} (source of its synthetic sets)", spec.source, download)
        if kind == "torchvision":
            self._tv_build(str(spec.torchvision), spec.torchvision_root(self.data_dir), download=download, how=spec.how,
                           name=name)
        elif absent := spec.missing(self.data_dir, kind, images=True):  # its listed images too: read after training
            if not self._optional(spec, kind):
                return [describe_missing(name, spec, absent)]
            self._warn_skipped(name, spec, absent)
        return []

    def _optional(self, spec: SetSpec, kind: str) -> bool:
        """A missing `optional` set is skipped, except OpenOOD's lists when reading OpenOOD's tree (incomplete)."""
        return spec.optional and not (self.resolved_source == "openood" and kind == "imglist")

    def _warn_skipped(self, name: str, spec: SetSpec, absent: list[str]) -> None:
        log.warning(
            "%s (%s protocol): set %r not found (looked for %s): skipped%s; results are not comparable with the "
            "protocol's published numbers. %s",
            self.name,
            self.protocol.name,
            name,
            ", ".join(absent),
            " (no validation OOD: detector grids are not tuned)" if name.startswith("val_ood") else "",
            spec.how or self._how_to_get(),
        )

    # ----- OpenOOD lists ------------------------------------------------------------------------------------------
    def _list(self, name: str, transform: Callable[[Image.Image], torch.Tensor], ood: bool = False) -> ImageList:
        if not self.list_file(name).is_file():
            raise DataNotFoundError(
                f"{self.name}: image list {self.list_file(name)} not found. " + self._how_to_get()
            )
        return ImageList(self.list_file(name), self.images_dir, transform, label=-1 if ood else None)

    # ----- torchvision --------------------------------------------------------------------------------------------
    def _tv_present(self) -> bool:
        return (self.torchvision_dir / self.name).is_dir()

    def _tv_builders(self) -> dict[str, TorchvisionBuilder]:
        """Constructors `(root, download) -> dataset of (PIL image, label)`: the ID splits (`<id>:train`,
        `<id>:test`) and the sets a protocol may name with `torchvision:` (the CIFARs' test splits and the rest)."""
        from torchvision import datasets as tvd

        def cifar(cls_name: str, train: bool) -> TorchvisionBuilder:
            return lambda root, download: getattr(tvd, cls_name)(str(root), train=train, download=download)

        return {
            f"{self.name}:train": cifar(self.torchvision_class, True),
            f"{self.name}:test": cifar(self.torchvision_class, False),
            "cifar10": cifar(CIFAR10Benchmark.torchvision_class, False),
            "cifar100": cifar(CIFAR100Benchmark.torchvision_class, False),
            "mnist": lambda root, download: tvd.MNIST(str(root), train=False, download=download),
            "svhn": lambda root, download: tvd.SVHN(str(root), split="test", download=download),
            "texture": lambda root, download: ConcatDataset(
                [tvd.DTD(str(root), split=s, partition=1, download=download) for s in ("train", "val", "test")]
            ),
            "places365": lambda root, download: tvd.Places365(str(root), split="val", small=True, download=download),
        }

    def _tv_build(self, key: str, root: Path, download: bool = False, how: str | None = None,
                  name: str | None = None) -> Dataset:
        """torchvision set `key` under `root` (built once per root); a missing one names the folder, the protocol set
        `name` it is read for (e.g. the source of synthetic sets) and how to get it: `how`, a protocol set's own hint
        (the classic protocol's SVHN lives in data_dir/svhn, which OpenOOD's download does not fill), else OpenOOD's
        download or data.download."""
        if (key, root) in self._tv_cache:
            return self._tv_cache[key, root]
        builders = self._tv_builders()
        if key not in builders:
            raise ConfigError(f"unknown torchvision set {key!r}; choices: {sorted(builders)}")
        try:
            dataset = builders[key](root, download)
        except RuntimeError as err:  # torchvision's "Dataset not found or corrupted. You can use download=True"
            files = self._cifar_files(key, root)
            absent = [p.name for p in files if not p.is_file()]
            detail = (f"missing {absent} in {files[0].parent}" if absent else
                      "its files are there but fail torchvision's checksum (cut short, or not the official download): "
                      f"re-download {[p.name for p in files] if len(files) < 3 else 'them'} into {files[0].parent}"
                      if files else str(err))
            raise DataNotFoundError(
                f"{self.name}: {f'set {name!r}: ' if name else ''}torchvision dataset {key.split(':')[0]!r} not found in {root} ({detail}). "
                + (how or self._how_to_get())
            ) from err
        self._tv_cache[key, root] = dataset
        return dataset

    def _cifar_files(self, key: str, root: Path) -> list[Path]:
        """The files torchvision's class for set `key` reads under `root` and checks (`cifar-10-batches-py/...`,
        SVHN's `test_32x32.mat`; none for the other sets): torchvision's error named no file, and called a file that
        is there but fails its checksum (cut short, another dataset's) "not found"."""
        from torchvision import datasets as tvd

        if key == "svhn":  # the tests' fakes have no split_list
            return [root / tvd.SVHN.split_list["test"][1]] if hasattr(tvd.SVHN, "split_list") else []
        cls_name = {f"{self.name}:train": self.torchvision_class, f"{self.name}:test": self.torchvision_class,
                    "cifar10": "CIFAR10", "cifar100": "CIFAR100"}.get(key)
        cls = getattr(tvd, cls_name) if cls_name else None
        batches = [*getattr(cls, "train_list", []), *getattr(cls, "test_list", [])]  # the tests' fakes have none
        return [root / cls.base_folder / name for name, _ in batches]  # type: ignore[union-attr]

    def _tv(self, split: str) -> Dataset:
        """The ID `train` or `test` split from torchvision."""
        return self._tv_build(f"{self.name}:{split}", self.torchvision_dir / self.name)

    # ----- ID splits ----------------------------------------------------------------------------------------------
    @cached_property
    def _id_test_split(self) -> tuple[list[int], list[int]] | None:
        """(val, test) indices into the official test set, or None when OpenOOD's `val_<id>` list is used."""
        if self.resolved_source == "openood" and self.list_file(f"val_{self.name}").is_file():
            return None
        if self.resolved_source == "openood":
            targets = self._list(f"test_{self.name}", self.eval_transform()).targets
        else:
            targets = self._tv("test").targets  # type: ignore[attr-defined]
        return stratified_split(targets, self.val_size, self.split_seed)

    def _official_test(self) -> Dataset:
        if self.resolved_source == "openood":
            return self._list(f"test_{self.name}", self.eval_transform())
        return Transformed(self._tv("test"), self.eval_transform())

    def train(self, augment: bool = True) -> Dataset:
        transform = self.train_transform() if augment else self.eval_transform()
        if self.resolved_source == "openood":
            return self._list(f"train_{self.name}", transform)
        return Transformed(self._tv("train"), transform)

    def val(self) -> Dataset:
        split = self._id_test_split
        if split is None:
            return self._list(f"val_{self.name}", self.eval_transform())
        return Subset(self._official_test(), split[0])

    def test(self) -> Dataset:
        split = self._id_test_split
        return self._official_test() if split is None else Subset(self._official_test(), split[1])

    # ----- OOD ----------------------------------------------------------------------------------------------------
    def _open(self, name: str, spec: SetSpec, label: int | None = -1,
              transform: Callable[[Image.Image], Any] | None = None) -> Dataset | None:
        """Set `name` as its spec says, through `transform` (default: the evaluation transform), every label `label`
        (-1: OOD; None: the file's, for csid sets); None for a missing optional set. A synthetic set reads its source
        at the evaluation size (`ood.data.synthetic.decoding`) and builds its images from it, seeded."""
        kind = spec.kind(self.prefer)  # type: ignore[arg-type]
        transform = self.eval_transform() if transform is None else transform
        if kind == "synthetic":
            assert spec.source is not None and spec.synthetic is not None
            source = self._open(f"{name} (source of its synthetic sets)", spec.source, transform=decoding(transform))
            return None if source is None else synthetic_set(spec.synthetic, source, transform, spec.per_set, spec.seed,
                                                             -1 if label is None else label)
        if kind == "torchvision":
            dataset = self._tv_build(str(spec.torchvision), spec.torchvision_root(self.data_dir), how=spec.how, name=name)
            return Transformed(dataset, transform, label=label)
        absent = spec.missing(self.data_dir, kind)
        if absent and self._optional(spec, kind):
            return None
        if absent:
            raise DataNotFoundError(f"{self.name}: set {describe_missing(name, spec, absent)} not found. " + self._how_to_get())
        return spec.open(self.data_dir, kind, transform, label=label, num_classes=self.num_classes)

    def ood_test(self) -> list[OODSet]:
        sets = [(name, group, self._open(name, spec)) for name, group, spec in self.protocol.sets]
        return [OODSet(name, group, dataset) for name, group, dataset in sets if dataset is not None]

    def ood_val(self) -> Dataset | None:
        spec = self.protocol.val_ood
        return None if spec is None else self._open("val_ood", spec)

    @property
    def csid_names(self) -> tuple[str, ...]:
        return tuple(self.protocol.csid)

    def csid_test(self) -> list[CSIDSet]:
        missing, skipped, left_out = [], [], set()
        for name, spec in self.protocol.csid.items():
            kind = spec.kind(self.prefer)  # type: ignore[arg-type]
            # the listed images too (read after training); an optional set missing any is left out, not opened
            if kind != "torchvision" and (absent := spec.missing(self.data_dir, kind, images=True)):
                optional = self._optional(spec, kind)
                (skipped if optional else missing).append(describe_missing(name, spec, absent))
                left_out |= {name} if optional else set()
        if missing:
            raise missing_csid_error(self.name, self.protocol.name, self.data_dir, missing)
        if skipped:
            warn_skipped_csid(self.name, self.protocol.name, tuple(skipped))
        sets = [(name, self._open(name, spec, label=None)) for name, spec in self.protocol.csid.items()
                if name not in left_out]
        for name, dataset in sets:
            check_csid_labels(self.name, name, dataset, self.num_classes)
        return [CSIDSet(name, dataset) for name, dataset in sets if dataset is not None]

    def outliers(self) -> Dataset | None:
        if self.outlier_set == "none":
            return None
        transform = self.train_transform() if self.augment_outliers else self.eval_transform()
        if self.outlier_set == "tin597":
            return self._list("train_tin597", transform, ood=True)
        path = Path(self.outliers_file)
        path = path if path.is_absolute() else self.data_dir / path
        if not path.is_file():
            raise DataNotFoundError(
                f"{self.name}: outlier images {path} not found; download "
                "https://people.eecs.berkeley.edu/~hendrycks/300K_random_images.npy into data_dir "
                "(or set data.benchmark.outliers_file), or use data.benchmark.outliers=tin597"
            )
        return NpyImages(path, transform)


class CIFAR10Benchmark(CIFARBenchmark):
    """CIFAR-10 as ID (OpenOOD v1.5: near-OOD CIFAR-100 and TIN)."""

    name = "cifar10"
    num_classes = 10
    torchvision_class = "CIFAR10"
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


class CIFAR100Benchmark(CIFARBenchmark):
    """CIFAR-100 as ID (OpenOOD v1.5: near-OOD CIFAR-10 and TIN)."""

    name = "cifar100"
    num_classes = 100
    torchvision_class = "CIFAR100"
    mean = (0.5071, 0.4867, 0.4408)
    std = (0.2675, 0.2565, 0.2761)
