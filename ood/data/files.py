"""Benchmarks whose every split is a set spec in YAML: `data=tinyimagenet`, `data=imagenet1k`, `data=imagenet200`.

The ID train / val / test splits and the protocol's OOD sets are all `ood.data.sets.SetSpec`s, so these benchmarks
hold no dataset-specific code: `conf/data/imagenet1k.yaml` names OpenOOD v1.5's lists
(`benchmark_imglist/imagenet/{train,val,test}_imagenet.txt`, `test_<set>.txt`, `val_openimage_o.txt`) over
`images_largescale/` and `images_classic/`, exactly as OpenOOD's `configs/datasets/imagenet/*.yml`;
`conf/data/tinyimagenet.yaml` reads the official `tiny-imagenet-200/` download (train folders, val annotations) and
the heatmap paper's OOD folders.

Preprocessing follows OpenOOD's: evaluation = RGB, resize the shorter side to `resize` (bilinear), centre crop
`image_size`, normalise (a `resize` pair `[h, w]` resizes to that size, aspect not kept: the heatmap code's Tiny
ImageNet `Resize((64, 64))`); training (`augment`) = RGB, `RandomResizedCrop(image_size)` (bilinear), horizontal flip,
normalise (OpenOOD's ImageNet `BasePreprocessor`; the heatmap code trains Tiny ImageNet the same way). Without a
`val` spec the ID validation split is `val_size` images held out of the training set, stratified, with
`split_seed` (the heatmap paper holds out 1 % of Tiny ImageNet's training set). Before the run (`prepare`) the ID
splits are checked against each other: every label one of the `num_classes`, every class of `val` / `test` with
training images, and class-folder splits with the same class folders (matched in Unicode NFC form), each mismatch a
line naming the class and the split.

A protocol may bring covariate-shifted ID sets (`csid`, labelled with the ID classes: OpenOOD v1.5's ImageNet-V2,
-C, -R, -ES lists), read only for full-spectrum evaluation, and its own ID task (`id`: `num_classes` and
`train` / `val` / `test` specs replacing the benchmark's, e.g. ImageNet-X's half of the ImageNet-1K classes). A set
with `preprocess: tensor` is only converted and normalised (OpenOOD feeds ImageNet-C's 224-pixel images as they are).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import transforms as T

from ood.data.benchmark import Benchmark, CSIDSet, OODSet
from ood.data.cifar import RGB, check_crop, check_sizes, stratified_split
from ood.data.folder import first_few, fixed_input_size
from ood.data.imglist import ImageFiles
from ood.data.sets import (
    Protocol,
    SetSpec,
    check_csid_labels,
    class_folders,
    class_key,
    describe_missing,
    missing_csid_error,
    resolve,
    warn_skipped_csid,
)
from ood.errors import ConfigError, DataNotFoundError
from ood.utils import get_logger

log = get_logger(__name__)


class FileBenchmark(Benchmark):
    """An ID/OOD benchmark read from files named in config (see the module docstring).

    Args:
        data_dir: the root every relative path is under.
        name: the ID dataset name reported in results.
        num_classes: number of ID classes.
        train, test: set specs of the ID training and test splits (labelled).
        val: set spec of the ID validation split; None = `val_size` images held out of `train`.
        protocol, protocols: the OOD protocol and the mapping it is taken from (`ood.data.sets.Protocol`).
        image_size, resize: centre-crop size and the resize before it (evaluation): the shorter side, or a `[h, w]`
            pair resized to exactly (torchvision `Resize`'s two forms).
        mean, std: input normalisation.
        augment: random resized crop + flip for training.
        val_size, split_seed: the held-out validation split when `val` is None.
        how: how to get the ID data, printed when it is missing.
        outliers: set spec of an outlier-exposure pool, e.g. the heatmap paper's Places365 for Tiny ImageNet;
            None = no outliers.
        augment_outliers: the outliers get the training transform; false: the evaluation transform (OpenOOD's
            `oe` split).
    """

    in_channels = 3

    def __init__(
        self,
        data_dir: str | Path,
        name: str,
        num_classes: int,
        train: Mapping[str, Any],
        test: Mapping[str, Any],
        protocols: Mapping[str, Any],
        protocol: str,
        val: Mapping[str, Any] | None = None,
        image_size: int = 224,
        resize: int | Sequence[int] = 256,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        augment: bool = True,
        val_size: int = 1000,
        split_seed: int = 0,
        how: str = "",
        outliers: Mapping[str, Any] | None = None,
        augment_outliers: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser()  # `~/data`: the shell leaves it after `paths.data_dir=`
        self.name = name
        self.protocol = Protocol.select(protocols, protocol)
        ident = {"num_classes": num_classes, "train": train, "val": val, "test": test, **(self.protocol.id or {})}
        self.num_classes = int(ident["num_classes"])
        self.splits = {
            split: SetSpec.parse(f"{name}:{split}", ident[split])
            for split in ("train", "val", "test")
            if ident[split] is not None
        }
        check_sizes({"image_size": image_size, "val_size": val_size, "split_seed": split_seed,
                     **({"resize": resize} if isinstance(resize, int) else {})})
        self.resize = resize if isinstance(resize, int) else tuple(int(side) for side in resize)
        if not isinstance(self.resize, int) and len(self.resize) != 2:
            raise ConfigError(f"data.benchmark.resize={list(self.resize)}: give one side (the shorter one) or [height, width]")
        check_crop(self.resize if isinstance(self.resize, int) else min(self.resize), image_size, "data.benchmark.")
        self.image_size = image_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.augment = augment
        self.val_size = val_size
        self.split_seed = split_seed
        self.how = how
        self.outlier_spec = None if outliers is None else SetSpec.parse(f"{name}:outliers", outliers)
        self.outlier_set = "none" if outliers is None else "configured"
        self.outlier_choices = ("none", "<a set spec such as {folder: places365}>")
        self.augment_outliers = augment_outliers

    @property
    def input_std(self) -> tuple[float, ...]:
        return self.std

    # ----- transforms ---------------------------------------------------------------------------------------------
    def eval_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """RGB, resize (bilinear; the shorter side, or to `[h, w]`), centre crop, tensor, normalise (OpenOOD's
        `TestStandardPreProcessor`; the heatmap code's Tiny ImageNet `select_ood_transform` with a pair)."""
        return T.Compose(
            [
                RGB(),
                T.Resize(self.resize, interpolation=T.InterpolationMode.BILINEAR),
                T.CenterCrop(self.image_size),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def train_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """RGB, random resized crop (bilinear), flip, tensor, normalise (OpenOOD's ImageNet `BasePreprocessor`)."""
        if not self.augment:
            return self.eval_transform()
        return T.Compose(
            [
                RGB(),
                T.RandomResizedCrop(self.image_size, interpolation=T.InterpolationMode.BILINEAR),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    # ----- files --------------------------------------------------------------------------------------------------
    def _specs(self, evaluate: bool = True) -> list[tuple[str, SetSpec]]:
        outliers = [] if self.outlier_spec is None else [(f"{self.name}:outliers", self.outlier_spec)]
        protocol = self.protocol.all_specs() if evaluate else []
        return [(f"{self.name}:{split}", spec) for split, spec in self.splits.items()] + protocol + outliers

    def prepare(self, download: bool = False, evaluate: bool = True) -> None:
        """Check every split and set (nothing here is downloadable; the protocol's OOD sets only when the run
        `evaluate`s): all missing ones are named in one error; then the classes of the ID splits
        (`check_id_classes`)."""
        missing = []
        for name, spec in self._specs(evaluate):
            # the listed images of the sets read after training too: a missing one stopped the run hours in
            read_later = evaluate and not name.endswith((":train", ":outliers"))
            absent = spec.missing(self.data_dir, spec.kinds[0], images=read_later)
            if absent and spec.optional:
                log.warning("%s: optional set %r not found (looked for %s): skipped", self.name, name, ", ".join(absent))
            elif absent:
                missing.append(describe_missing(name, spec, absent))
        if missing:
            raise DataNotFoundError(
                f"{self.name} ({self.protocol.name} protocol): data incomplete under {self.data_dir}; missing: "
                f"{', '.join(missing)}." + (f" {self.how}" if self.how else "")
            )
        self.check_id_classes()
        self._check_outliers_apart()
        log.info("%s: reading files from %s (%s protocol); preprocessing: %s", self.name, self.data_dir,
                 self.protocol.name, self.describe_preprocessing())

    def check_model_input(self, model: torch.nn.Module) -> None:
        """Refuse a model built for one input size (a timm ViT or Swin, torchvision's ViT) beside another
        `image_size`, before any image is read: it failed at the first batch with an AssertionError traceback."""
        fixed = fixed_input_size(model)
        if fixed is None or fixed == (self.image_size, self.image_size):
            return
        height, width = fixed
        raise ConfigError(
            f"the model takes {height}x{width} images only, but data.benchmark.image_size={self.image_size}: set "
            f"data.benchmark.image_size={height} data.benchmark.resize=<its resize>, or build the model for "
            f"{self.image_size} px (+backbone.img_size={self.image_size} for timm)"
        )

    def describe_preprocessing(self) -> str:
        """The evaluation and training transforms in words, printed as the run starts (`data=folder` prints its own):
        a config that leaves out `image_size`, `resize`, `mean` or `std` gets ImageNet's, which went unsaid."""
        resize = self.resize if isinstance(self.resize, int) else f"to {self.resize[0]}x{self.resize[1]}"
        training = (f"random resized crop {self.image_size} + horizontal flip" if self.augment else
                    "the same (augment=false)")
        return (f"resize {resize} (bilinear), centre crop {self.image_size}, mean {list(self.mean)}, std "
                f"{list(self.std)}; training: {training}")

    def _check_outliers_apart(self) -> None:
        """Refuse an outlier folder that is, holds or lies inside the folder of an ID split or csid set (outlier
        exposure would train ID images as OOD) or of a test OOD set (it would train on the images it is then scored
        on); the validation OOD set may be the pool (it tunes only). Image lists are not compared."""
        pool = self.outlier_spec
        if pool is None or pool.folder is None:
            return
        outside = resolve(self.data_dir, pool.folder).resolve()
        sets = [*((f"{self.name}:{split}", spec, "ID split") for split, spec in self.splits.items()),
                *((name, spec, "csid set") for name, spec in self.protocol.csid.items()),
                *((name, spec, "test OOD set") for name, _, spec in self.protocol.sets)]
        for name, spec, what in sets:
            if spec.folder is None:
                continue
            inside = resolve(self.data_dir, spec.folder).resolve()
            if outside == inside or outside.is_relative_to(inside) or inside.is_relative_to(outside):
                relation = "is" if outside == inside else "is inside" if outside.is_relative_to(inside) else "holds"
                harm = ("train on images it is then scored on as test OOD" if what == "test OOD set" else
                        "train ID images as OOD")
                raise ConfigError(f"{self.name}: data.benchmark.outliers {outside} {relation} the {what} {name!r} "
                                  f"({inside}): outlier exposure would {harm}; give a pool of images of none of them")

    def _class_names(self, split: str) -> list[str] | None:
        """The class of each label of ID split `split` when its labels index class folders (a folder's sorted
        sub-folders, an annotation file's `classes` folder); None when they are indices themselves (an image list, a
        `keep_classes` subset)."""
        spec = self.splits[split]
        folder = {"folder": spec.folder, "annotations": spec.classes}.get(spec.kinds[0])
        return None if folder is None or spec.keep_classes else class_folders(resolve(self.data_dir, folder))

    def check_id_classes(self) -> None:
        """One line for ID splits whose classes disagree, before any training: a label outside the `num_classes`
        classes; a class of `val` / `test` without training images (its detectors' statistics empty); class-folder
        splits without the train split's folders (labelled by their own sorted folders, a folder missing from one of
        them shifted the labels of every class after it), named by class and split."""
        labels = {split: set(self._split(split, self.eval_transform()).targets) for split in self.splits}  # type: ignore[attr-defined]
        names = {split: self._class_names(split) for split in self.splits}
        for split, found in labels.items():
            outside = sorted(y for y in found if not 0 <= y < self.num_classes)
            if outside:
                raise DataNotFoundError(f"{self.name}:{split}: label(s) {first_few(outside)} are no ID class (the "
                                        f"{self.num_classes} classes are 0..{self.num_classes - 1})")
        train = names["train"]
        for split in [s for s in ("val", "test") if s in self.splits]:
            own = names[split]
            keys, train_keys = ([class_key(c) for c in n] if n is not None else None for n in (own, train))
            if keys is not None and train_keys is not None and keys != train_keys:
                lacking = [c for c, k in zip(own, keys) if k not in train_keys]  # type: ignore[arg-type]
                absent = [c for c, k in zip(train, train_keys) if k not in keys]  # type: ignore[arg-type]
                which = (f"train has no class folder {first_few(lacking)}, which {self.name}:{split} has" if lacking else
                         f"{split} has no class folder {first_few(absent)}, which {self.name}:train has" if absent else
                         f"{split} has the class folders of {self.name}:train in another order")
                raise DataNotFoundError(f"{self.name}:{which}: the labels are the index of each sorted class folder "
                                        "of a split, so every ID split needs the same class folders")
            missing = sorted(labels[split] - labels["train"])
            if missing:
                classes = [train[y] if train is not None and y < len(train) else y for y in missing]
                raise DataNotFoundError(f"{self.name}:train has no image of class(es) {first_few(classes)}, which "
                                        f"{self.name}:{split} has (every ID class needs training images)")
        self._warn_unseen_classes(labels["train"])

    def _warn_unseen_classes(self, train: set[int]) -> None:
        """One warning for ID classes of `num_classes` that no ID split has (a `num_classes` above the data's, or
        their images missing from every split): the network gets outputs never trained to fire and class-conditional
        detectors no statistics of those classes. A warning, not an error: a subset of a benchmark's classes (a
        smoke run on part of ImageNet's lists, a 1000-class model scored on some of its classes) is legitimate."""
        unseen = sorted(set(range(self.num_classes)) - train)
        if not unseen:
            return
        key = (f"data.benchmark.protocols.{self.protocol.name}.id.num_classes" if "num_classes" in (self.protocol.id or {})
               else "data.benchmark.num_classes")
        seen = len(train)
        fix = (f"if the data has {seen} classes, set {key}={seen}" if train == set(range(seen)) else
               "give them training images if they are ID classes")
        log.warning("%s: %d of the %d ID classes (%s=%d) have no image in any ID split: %s; the network's outputs for "
                    "them are never trained and class-conditional detectors have no statistics of them; %s", self.name,
                    len(unseen), self.num_classes, key, self.num_classes, first_few(unseen), fix)

    def tensor_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """RGB, tensor, normalise: for sets stored at the input size (`preprocess: tensor`, OpenOOD's ImageNet-C)."""
        return T.Compose([RGB(), T.ToTensor(), T.Normalize(self.mean, self.std)])

    def _open(self, name: str, spec: SetSpec, transform: Callable[[Image.Image], Any], label: int | None,
              num_classes: int | None = None) -> Dataset | None:
        """Set `name` (None: optional and missing); `num_classes`: the class folders a labelled folder must hold (csid
        sets, `SetSpec.open`)."""
        if spec.preprocess == "tensor":
            transform = self.tensor_transform()
        absent = spec.missing(self.data_dir, spec.kinds[0])
        if absent and spec.optional:
            return None
        if absent:
            raise DataNotFoundError(f"{self.name}: set {describe_missing(name, spec, absent)} not found. {self.how}".rstrip())
        dataset = spec.open(self.data_dir, spec.kinds[0], transform, label=label, num_classes=num_classes)
        if spec.preprocess == "tensor":
            self._check_stored_size(name, dataset)
        return dataset

    def _check_stored_size(self, name: str, dataset: Dataset) -> None:
        """Refuse a `preprocess: tensor` set whose first image is not `image_size` square: fed as stored (OpenOOD's
        ImageNet-C, 224 px), it went through the network at another resolution than every other set, silently."""
        if not isinstance(dataset, ImageFiles) or not len(dataset):
            return
        try:
            with Image.open(dataset.describe(0)) as image:
                width, height = image.size
        except OSError:  # unreadable: the pass names it
            return
        if (width, height) != (self.image_size, self.image_size):
            # a square stored size is an image_size to evaluate at; a non-square one is none
            at = f"evaluate at data.benchmark.image_size={width}, or " if width == height else ""
            raise ConfigError(
                f"{self.name}: set {name!r} is fed as stored (preprocess: tensor, OpenOOD's ImageNet-C preprocessing) and "
                f"its images are {width}x{height}, not data.benchmark.image_size={self.image_size} like every other set: "
                f"{at}give the set preprocess: eval (resized and centre-cropped as the ID test)"
            )

    def _split(self, split: str, transform: Callable[[Image.Image], Any]) -> Dataset:
        dataset = self._open(f"{self.name}:{split}", self.splits[split], transform, label=None)
        assert dataset is not None, f"the ID {split} split cannot be optional"
        return dataset

    @cached_property
    def _held_out(self) -> tuple[list[int], list[int]] | None:
        """(val, train) indices into the training split when there is no `val` spec."""
        if "val" in self.splits:
            return None
        targets = self._split("train", self.eval_transform()).targets  # type: ignore[attr-defined]
        if not 0 < self.val_size < len(targets):
            raise ConfigError(
                f"{self.name}: data.benchmark.val_size={self.val_size}: the train images held out as the ID "
                f"validation split (there is no data.benchmark.val spec) must be 1 to {len(targets) - 1} of its "
                f"{len(targets)}; give a val spec, or a val_size in that range"
            )
        return stratified_split(targets, self.val_size, self.split_seed)

    # ----- splits -------------------------------------------------------------------------------------------------
    def train(self, augment: bool = True) -> Dataset:
        dataset = self._split("train", self.train_transform() if augment else self.eval_transform())
        return dataset if self._held_out is None else Subset(dataset, self._held_out[1])

    def val(self) -> Dataset:
        if self._held_out is None:
            return self._split("val", self.eval_transform())
        return Subset(self._split("train", self.eval_transform()), self._held_out[0])

    def test(self) -> Dataset:
        return self._split("test", self.eval_transform())

    def ood_test(self) -> list[OODSet]:
        sets = [(n, g, self._open(n, s, self.eval_transform(), label=-1)) for n, g, s in self.protocol.sets]
        return [OODSet(n, g, d) for n, g, d in sets if d is not None]

    def ood_val(self) -> Dataset | None:
        spec = self.protocol.val_ood
        return None if spec is None else self._open("val_ood", spec, self.eval_transform(), label=-1)

    @property
    def csid_names(self) -> tuple[str, ...]:
        return tuple(self.protocol.csid)

    def csid_test(self) -> list[CSIDSet]:
        # the listed images too (read after training); an optional set missing any is left out, not opened
        absent = {n: s.missing(self.data_dir, s.kinds[0], images=True) for n, s in self.protocol.csid.items()}
        missing = [describe_missing(n, s, absent[n]) for n, s in self.protocol.csid.items() if absent[n] and not s.optional]
        if missing:
            raise missing_csid_error(self.name, self.protocol.name, self.data_dir, missing)
        skipped = tuple(describe_missing(n, s, absent[n]) for n, s in self.protocol.csid.items() if absent[n])
        if skipped:
            warn_skipped_csid(self.name, self.protocol.name, skipped)
        sets = [(n, self._open(n, s, self.eval_transform(), None, self.num_classes))
                for n, s in self.protocol.csid.items() if not absent[n]]
        for n, d in sets:
            check_csid_labels(self.name, n, d, self.num_classes)
        return [CSIDSet(n, d) for n, d in sets if d is not None]

    def outliers(self) -> Dataset | None:
        if self.outlier_spec is None:
            return None
        transform = self.train_transform() if self.augment_outliers else self.eval_transform()
        return self._open(f"{self.name}:outliers", self.outlier_spec, transform, label=-1)
