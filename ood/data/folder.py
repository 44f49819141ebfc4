"""`data=folder`: a benchmark from the user's own image folders, OpenOOD image lists or torch Datasets.

ID data: an ImageFolder-style `root` with `train/<class>/*` and `test/<class>/*` (and `val/<class>/*`; without it
`val_fraction` of train is held out, stratified, with `split_seed`); class names and indices come from the sorted
folders of `train/` (torchvision `ImageFolder`'s rule), test and val folders are mapped by name, in Unicode NFC form
as macOS writes a copied `café` in NFD (and so are the
labels of a Dataset naming its `classes`, e.g. an `ImageFolder` lacking a class; names of another vocabulary, none
of them a train class, keep their indices). Each split can be
given instead as a source: a folder, a set spec mapping (`{imglist: list.txt, images: root}`, `ood.data.sets`; the
listed paths are relative to `images`, by default the list file's folder) or, in Python, a torch `Dataset` of
`(image, label)` (an OOD set's may give images alone; PIL images are converted and transformed like files, float
tensors are used as they are; anything else is refused in one line). An ID image
list's labels are class indices: the train list's must be 0..K-1, each with images (K classes), and every other ID
list's must be among them. OOD sets: `{near: {name: source}, far: {name: source}, val: source, csid: {name:
source}}`, a `{name: source}` mapping (all far) or a list of sources (all far, named by their folder); `val` is the
validation-OOD set used for tuning; `csid` are covariate-shifted ID sets (the ID classes under other image
statistics), labelled and checked as the ID test split is, and scored as ID in full-spectrum evaluation
(`evaluation.fsood=true`, which refuses to start without them).

Preprocessing (evaluation): RGB (`ood.data.hygiene.to_rgb`), resize the shorter side to `resize`, centre crop
`image_size`, normalise with `mean`/`std`. Unset values come from the model's timm data config when it has one
(`timm.data.resolve_data_config`: resize = floor(image_size / crop_pct), its interpolation), else from ImageNet's
defaults (224 px, resize = image_size / 0.875, bilinear; train images under half of that, the first few's
shorter side, with neither size given are warned of, naming the options to give); a `transform` object (Python)
replaces all of it. What was used is printed once and written to `preprocessing.json` in the run folder. Training (`augment`): random
resized crop and horizontal flip at `image_size`.

Hygiene (`ood.data.hygiene`): an unreadable image stops the run naming it, or with `bad_images=skip` every file is
decoded once up front and unreadable ones are left out, counted and listed in `bad_images.json`; a missing
`train/`, an empty set, test classes (or list labels) absent from train are one line each. After the cached pass,
`screen` lists exact duplicates (same decoded pixels) and near duplicates (cosine of penultimate features >
`overlap_threshold`) between every ID split (the csid sets included: an OOD image copying one is an ID-class image)
and every OOD set in `overlap.json` (one warning line per set); with `drop_overlap` they are removed from the OOD sets before the metrics, and every
row records `overlap` and `overlap_dropped`. The exact check decodes the files of the ID splits and OOD sets once
more on rank 0 after the pass (once in total with `bad_images=skip`, which decodes them up front);
`exact_duplicates=false` skips it (minutes at ImageNet size), and same-pixel copies are then found by the feature
cosine alone (listed as `near`, similarity 1.0). With `fit_fraction` < 1 the pass holds the features of the fit split
alone: near duplicates of the other train images are not looked for (their features would take the pass
`fit_fraction` leaves out; `overlap.json` records `near_train: {compared, of}`), exact ones are (files and image
lists; a Dataset train split's fit rows only).
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import transforms as T

from ood.data.benchmark import Benchmark, CSIDSet, EvalSplit, OODDataModule, OODSet
from ood.data.cifar import check_crop, stratified_split
from ood.data.hygiene import SKIP_HINT, load_image, overlapping_rows, pixel_digest, scan_files, to_rgb
from ood.data.imglist import read_imglist
from ood.data.sets import (
    IMAGE_EXTENSIONS,
    SetSpec,
    class_folders,
    class_key,
    folder_entries,
    image_files,
    resolve,
    same_name_twice,
)
from ood.errors import ConfigError, DataNotFoundError
from ood.features.bank import FeatureBank
from ood.files import atomic_write_text
from ood.utils import get_logger

log = get_logger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BAD_IMAGES = ("error", "skip")
#: the end of the error for an unreadable image of `ood.extract`, which has no option to skip files
EXTRACT_HINT = " (ood.extract reads every file: remove it, or pass a Dataset that leaves it out)"
#: names an OOD set cannot have: the evaluation splits and the near/far groups of the results table
RESERVED_NAMES = frozenset({"train", "val", "test", "val_ood", "fit", "near", "far"})
#: the keys of the OOD-set mapping: test OOD groups, validation OOD, covariate-shifted ID
OOD_KEYS = ("near", "far", "val", "csid")
#: timm's crop modes that `preprocessing_transform` does: resize the shorter side, or both sides (aspect not kept)
CROP_MODES = ("center", "squash")
INTERPOLATIONS = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}
Source = str | Path | Mapping[str, Any] | Dataset
#: the keyword of `ood.evaluate` for a `data=folder` key named otherwise there
PYTHON_NAMES = {"root": "id_data", "train": "id_data['train']", "test": "id_data['test']", "ood": "ood_data",
                "ood.val": "ood_data['val']", "ood.csid": "ood_data['csid']"}
_NAME_ONLY = object()
#: the preprocessing source of ImageNet's defaults (`resolve_preprocessing`), and how many train images are looked
#: at for a size far under their 224 px (`FolderBenchmark._warn_small_images`)
DEFAULT_SOURCE = "defaults (ImageNet)"
SIZE_PROBE = 4


def option(key: str, python_api: bool, value: Any = _NAME_ONLY) -> str:
    """Data option `key` (and `=value`) as its caller gives it: a config override (`data.drop_overlap=true`), or for
    a caller of `ood.evaluate` / `ood.extract` (`python_api`) a keyword (`drop_overlap=True`): a message naming the
    override sent a Python caller looking for a key its call does not have."""
    name = PYTHON_NAMES.get(key, key) if python_api else f"data.{key}"
    if value is _NAME_ONLY:
        return name
    if python_api:
        return f"{name}={value!r}"
    return f"{name}={json.dumps(value) if value is None or isinstance(value, bool) else value}"


class FileImages(Dataset):
    """`(transform(to_rgb(image)), label)` for `(path, label)` entries; `label` overrides all labels (OOD: -1); `hint`
    ends the error for an unreadable file (the option that skips such files, as the caller gives it)."""

    def __init__(self, entries: Sequence[tuple[Path, int]], transform: Callable[[Image.Image], Any], label: int | None = None,
                 hint: str = SKIP_HINT) -> None:
        self.entries = list(entries)
        self.transform = transform
        self.label = label
        self.hint = hint

    @property
    def targets(self) -> list[int]:
        return [y if self.label is None else self.label for _, y in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, y = self.entries[i]
        return self.transform(load_image(path, self.hint)), (y if self.label is None else self.label)

    def describe(self, i: int) -> str:
        return str(self.entries[i][0])

    def digest(self, i: int, known: Mapping[Path, str | None]) -> str | None:
        path = self.entries[i][0]
        return known[path] if path in known else pixel_digest(load_image(path))


class SourceImages(Dataset):
    """A user's `Dataset` of `(image, label)` (or, unlabelled, of images alone or `(image,)`: label -1): PIL images get
    `to_rgb` and `transform`, float tensors pass as they are; `relabel[y]` is the ID class index of its label `y`
    (its `classes` in the ID train split's order)."""

    def __init__(self, dataset: Dataset, name: str, transform: Callable[[Image.Image], Any], label: int | None = None,
                 relabel: Sequence[int] | None = None) -> None:
        self.dataset = dataset
        self.name = name
        self.transform = transform
        self.label = label
        self.relabel = relabel

    @cached_property
    def targets(self) -> list[int]:
        if self.label is not None:  # an OOD set: its own labels are not read (that would decode every item)
            return [self.label] * len(self)
        own = getattr(self.dataset, "targets", None)
        return [self._class(int(y)) for y in own] if own is not None else [self._parts(i)[1] for i in range(len(self))]

    def _class(self, y: int) -> int:
        return y if self.relabel is None or y < 0 else self.relabel[y]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _parts(self, i: int) -> tuple[Any, int]:
        """(image, label) of item `i`; -1 for an item without a label, and for every item of an OOD set (its own
        labels, a file name or a string, are not read: they stopped the pass with int()'s ValueError)."""
        item = self.dataset[i]
        if isinstance(item, tuple | list) and 1 <= len(item) <= 2:
            return item[0], self._class(int(item[1])) if len(item) == 2 and self.label is None else -1
        return item, -1

    def _image(self, i: int) -> Any:
        x = self._parts(i)[0]
        return to_rgb(x) if isinstance(x, Image.Image) else x

    def __getitem__(self, i: int) -> tuple[Any, int]:
        x, y = self._parts(i)
        x = self.transform(to_rgb(x)) if isinstance(x, Image.Image) else x
        return x, y if self.label is None else self.label

    def describe(self, i: int) -> str:
        return f"{self.name}[{i}]"

    def digest(self, i: int, known: Mapping[Path, str | None]) -> str | None:
        return pixel_digest(self._image(i))


def is_class_index(y: Any) -> bool:
    """Whether a label reads as a class index: an integer, or a number or one-element tensor equal to one."""
    try:
        return not isinstance(y, str | bytes) and float(y) == int(y)
    except (TypeError, ValueError, RuntimeError):
        return False


def check_source(name: str, dataset: Dataset, labelled: bool) -> bool:
    """One line for a Dataset whose first item `SourceImages` cannot serve: not `(image, label)` where labels are
    needed (an ID split), or an image that is neither a PIL image nor a float tensor (a numpy array, a uint8 tensor
    from `torchvision.io` would reach the model as it is). Returns whether its images are float tensors."""
    if len(dataset) == 0:  # type: ignore[arg-type]
        return False  # the empty-set check names it
    item = dataset[0]
    kind = f"Dataset {type(dataset).__name__}"
    if isinstance(item, Mapping):
        raise ConfigError(f"{name}: {kind} items are dicts (keys {sorted(map(str, item))}); it must return (image, "
                          "label) tuples: wrap it, e.g. __getitem__ returning (d['image'], d['label'])")
    pair = isinstance(item, tuple | list) and len(item) == 2
    if labelled and not pair:
        got = f"a {len(item)}-tuple" if isinstance(item, tuple | list) else f"a {type(item).__name__}"
        raise ConfigError(f"{name}: {kind} items must be (image, label) tuples (an ID split needs labels); item 0 is {got}")
    if labelled and not is_class_index(item[1]):  # class names, one-hot vectors: int()'s error deep in the pass
        y = item[1]
        got = f"a {type(y).__name__}" + (f" of shape {tuple(y.shape)}" if hasattr(y, "shape") else f" {y!r:.40}")
        raise ConfigError(f"{name}: {kind} labels must be class indices (integers, label i the network's output i); "
                          f"item 0's is {got}: map them to indices in __getitem__")
    if isinstance(item, tuple | list) and not 1 <= len(item) <= 2:
        raise ConfigError(f"{name}: {kind} items must be (image, label) or images alone; item 0 is a {len(item)}-tuple")
    x = item[0] if isinstance(item, tuple | list) else item
    if isinstance(x, Image.Image) or (isinstance(x, torch.Tensor) and x.is_floating_point()):
        return isinstance(x, torch.Tensor)
    what = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else f"a {type(x).__module__}.{type(x).__name__}"
    what += f" of shape {tuple(x.shape)}" if hasattr(x, "shape") else ""
    raise ConfigError(f"{name}: {kind} item 0 holds {what}; images must be PIL images (preprocessed as files are) or "
                      "float tensors [C, H, W] (used as they are: pass their mean= / std=)")


def _item(dataset: Dataset, i: int) -> tuple[FileImages | SourceImages, int]:
    """The underlying `FileImages` / `SourceImages` and index of item `i` of `dataset` (through `Subset`s)."""
    while isinstance(dataset, Subset):
        dataset, i = dataset.dataset, int(dataset.indices[i])
    assert isinstance(dataset, FileImages | SourceImages)
    return dataset, i


@dataclass(frozen=True)
class ImageSet:
    """One named set: file entries `(path, label)` (labels -1 when unknown) or a user's Dataset."""

    name: str
    where: str
    entries: list[tuple[Path, int]] | None = None
    dataset: Dataset | None = None
    relabel: list[int] | None = None


class FolderBenchmark(Benchmark):
    """ID splits and OOD sets from folders, image lists or Datasets (see the module docstring).

    Args:
        root: ImageFolder-style ID root (`train/`, `test/`, optional `val/`); relative paths are relative to the
            working directory.
        ood: OOD sets: `{near: {name: source}, far: {name: source}, val: source, csid: {name: source}}`,
            `{name: source}` or a list; `csid` are the covariate-shifted ID sets (class folders or labelled lists).
        train, test, val: ID split sources replacing `root/<split>`.
        outliers: an outlier-exposure source for methods that train on outliers.
        name: the ID dataset name in results (default: the root folder's name).
        classes: the class names in label order, label i being the network's output i (a model trained elsewhere,
            with another class order); None: the train split's class folders sorted (torchvision `ImageFolder`'s
            order), or its Dataset's `classes`. Train class folders follow it by name, a train Dataset with
            `classes` of the same names is relabelled to it, and an image list or a Dataset without names gets
            them (so class folders of other splits can follow them).
        image_size, resize, mean, std, interpolation: evaluation preprocessing (None: from `data_config`, else
            ImageNet defaults).
        data_config: a timm data config (`input_size`, `interpolation`, `mean`, `std`, `crop_pct`).
        model: `{library, name}` of the configured backbone; `library=timm` takes timm's data config for `name`.
        transform: a transform object (Python), used for every split instead of the above.
        augment: random resized crop + flip for training.
        augment_outliers: the outliers get the training transform; false: the evaluation transform (OpenOOD's
            `oe` split).
        val_fraction, split_seed: the held-out ID validation split when there is no `val`.
        bad_images: `error` (stop naming the file) or `skip` (decode all up front, leave out unreadable files).
        overlap_threshold: cosine of penultimate features above which an OOD image is a near duplicate of an ID one
            (None: exact duplicates only).
        drop_overlap: remove duplicates from the OOD sets before the metrics.
        exact_duplicates: find same-pixel duplicates by decoding every ID and OOD file once more on rank 0 (False:
            near duplicates only, from the cached features).
        report_dir: where `preprocessing.json`, `bad_images.json` and `overlap.json` go (the run folder).
        scan_workers: threads decoding files for `bad_images=skip` and the exact-duplicate check.
        evaluate: the run evaluates (`ood-train`'s `evaluate`): OOD test sets are needed; False (train now,
            `ood-eval ckpt_path=<run>` with OOD sets later) takes none.
        python_api: the options are keywords of `ood.evaluate`: messages name them so (`bad_images='skip'`, not
            `data.bad_images=skip`).
    """

    in_channels = 3

    def __init__(
        self,
        root: str | Path | None = None,
        ood: Mapping[str, Any] | Sequence[Source] | None = None,
        train: Source | None = None,
        test: Source | None = None,
        val: Source | None = None,
        outliers: Source | None = None,
        name: str | None = None,
        classes: Sequence[str] | None = None,
        image_size: int | None = None,
        resize: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        data_config: Mapping[str, Any] | None = None,
        model: Mapping[str, Any] | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        augment: bool = True,
        augment_outliers: bool = True,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        bad_images: Literal["error", "skip"] = "error",
        overlap_threshold: float | None = 0.99,
        drop_overlap: bool = False,
        exact_duplicates: bool = True,
        report_dir: str | Path | None = None,
        scan_workers: int = 8,
        evaluate: bool = True,
        python_api: bool = False,
    ) -> None:
        self.python_api = python_api
        #: the preprocessing line was printed: Lightning prepares the data at fit and again at test (`prepare`)
        self._told = False
        #: who reads the options, as messages name it
        self.caller = "ood.evaluate" if python_api else "data=folder"
        if bad_images not in BAD_IMAGES:
            raise ConfigError(f"{self._option('bad_images')}={bad_images!r} is unknown; choices: {list(BAD_IMAGES)}")
        self._check_options(val_fraction, split_seed, overlap_threshold, scan_workers,
                            {"augment": augment, "augment_outliers": augment_outliers, "drop_overlap": drop_overlap,
                             "exact_duplicates": exact_duplicates, "evaluate": evaluate})
        if root is None and (train is None or test is None):
            raise ConfigError(
                "ood.evaluate needs id_data=<folder with train/ and test/> (or id_data={'train': ..., 'test': ...}: "
                "folders, {'imglist': <file>} lists or Datasets)" if python_api else
                "data=folder needs data.root=<folder with train/ and test/> (or both data.train= and data.test=: "
                "folders or {imglist: <file>} lists)")
        self.root = Path(root).expanduser().resolve() if root is not None else Path.cwd()
        if root is not None and not self.root.is_dir():
            raise no_folder(self._option("root"), self.root, "<root>/train/<class>/<image> and <root>/test/<class>/<image>")
        self.name = name or (self.root.name if root is not None else "folder")
        self.bad_images = bad_images
        #: the option that skips unreadable files, as the caller gives it (a config key, a keyword of `ood.evaluate`)
        self.skip_option = self._option("bad_images", "skip")
        self.overlap_threshold = overlap_threshold
        self.drop_overlap = drop_overlap
        self.exact_duplicates = exact_duplicates
        self.report_dir = Path(report_dir) if report_dir else None
        self.scan_workers = scan_workers
        self.augment = augment
        self.augment_outliers = augment_outliers
        self.val_fraction, self.split_seed = val_fraction, int(split_seed)  # NumPy's ints: torch's seed refused them
        self.preprocessing = resolve_preprocessing(image_size, resize, mean, std, interpolation, data_config, model,
                                                   transform, python_api)
        self.transform = transform
        self.skipped: list[str] = []
        self._tensor_sources = {}

        sources = {"train": train, "test": test, "val": val}
        for split in ("train", "test", "val"):
            if sources[split] is None and root is not None and (self.root / split).is_dir():
                sources[split] = self.root / split
        if sources["train"] is None:
            held = sorted(p for p in self.root.iterdir() if p.is_dir())
            # a split's folder (`my_id/train`) or a set never split: its class folders hold the images
            classes = any(f.suffix.lower() in IMAGE_EXTENSIONS for d in held for f in d.iterdir())
            splits = "id_data={'train': <this folder>, 'test': <a folder of the same classes>}" if python_api else \
                "data.train=<this folder> data.test=<a folder of the same classes>"
            raise DataNotFoundError(
                f"{self.root}: no train/ folder (it holds {[p.name + '/' for p in held]}); " +
                (f"these look like class folders of one split: give the splits, {splits}" if classes else
                 f"{self.caller} needs <root>/train/<class>/<image> and <root>/test/<class>/<image>")
            )
        if sources["test"] is None:
            raise DataNotFoundError(f"{self.root}: no test/ folder; {self.caller} needs <root>/test/<class>/<image>")
        given = self._given_classes(classes, sources["train"])
        if given is not None:
            self._classes, self.num_classes = given, len(given)  # the image-list check of `_set` reads num_classes
        listed = isinstance(sources["train"], Mapping) and "imglist" in sources["train"]  # its labels: checked below
        train_set = self._id_set("train", sources["train"], None if listed else given)
        if given is not None:
            self._check_labels_named(train_set)
        elif isinstance(sources["train"], Dataset):  # its labels are its own: class folders elsewhere follow its names
            named = getattr(sources["train"], "classes", None)  # torchvision's ImageFolder has them
            self._classes = None if named is None else [str(c) for c in named]
            self._unnamed_train = f"Dataset {type(sources['train']).__name__}"
        elif self._classes is None:  # an image list: class indices without names
            self._unnamed_train = f"image list {train_set.where}"
        self.classes = self._classes
        self.num_classes = len(self.classes) if self.classes else self._class_count(train_set)
        self.id_sets = {"train": train_set}
        for split in ("test", "val"):
            if sources[split] is not None:
                self.id_sets[split] = self._id_set(split, sources[split], self.classes)
        groups = ood_mapping(ood, python_api, required=evaluate)
        self.ood_sets, self.val_ood_set = self._ood_sets(groups, required=evaluate)
        self.csid_sets = {n: self._set(n, src, None, self.classes) for n, src in groups["csid"].items()}
        self.outlier_set_ = None if outliers is None else self._set("outliers", outliers, label=-1)
        self._check_outliers_apart()
        self.outlier_set = "none" if outliers is None else "configured"
        self.outlier_choices = ("none", "<a folder of outlier images (of none of the ID classes), an image list or a Dataset>")
        if transform is None and (mean is None or std is None):
            self._tensor_normalization(mean, std)
        if bad_images == "skip":
            self._skip_unreadable()
            train_set = self.id_sets["train"]  # without them: the checks below read the labels of the skipped files
        for image_set in self._all_sets():
            if self._size(image_set) == 0:
                raise DataNotFoundError(f"{image_set.name}: no images in {image_set.where}{self._skipped_note} "
                                        f"(extensions {list(IMAGE_EXTENSIONS)})")
        if "val" not in self.id_sets and len(self._labels(train_set)) < 2:
            raise DataNotFoundError(f"{train_set.where}: {len(self._labels(train_set))} image(s); need 2 or more to hold out a validation split")
        # a Dataset's labels may take a pass to read: checked when it holds them (`targets`) or the split is held out
        at_hand = train_set.entries is not None or getattr(train_set.dataset, "targets", None) is not None
        if at_hand or "val" not in self.id_sets:
            self._check_train_classes(train_set)
        self._warn_partial_splits()
        if image_size is None and resize is None:
            self._warn_small_images()

    # ----- sources ----------------------------------------------------------------------------------------------
    _classes: list[str] | None = None
    #: Datasets whose images are float tensors, by set name (used as given: `_tensor_normalization`)
    _tensor_sources: dict[str, Dataset]
    outliers_key = "data.outliers"
    csid_how = ("give them as '+data.ood.csid={name: folder}' (class folders or a labelled image list; Python: "
                "ood_data={..., 'csid': {name: folder}})")
    #: the train split when its labels are class indices without names (a Dataset without `classes`, an image list):
    #: class folders of other splits cannot be matched to them
    _unnamed_train: str | None = None

    def _set(self, name: str, source: Source, label: int | None, classes: list[str] | None = None) -> ImageSet:
        """Files (or a Dataset) of `source`; ID folders are labelled by class folder name."""
        if isinstance(source, Dataset):
            if check_source(name, source, labelled=label is None):
                self._tensor_sources[name] = source
            where = f"Dataset {type(source).__name__}"
            own = getattr(source, "classes", None)  # named classes (ImageFolder's) follow the train split's, by name
            names = None if own is None else [str(c) for c in own]
            keys = None if names is None else [class_key(c) for c in names]
            index = None if classes is None else {class_key(c): i for i, c in enumerate(classes)}
            # names of another vocabulary (torchvision ImageNet's tuples beside wnid folders) keep their indices
            if label is not None or index is None or keys is None or keys == list(index) or not set(keys) & set(index):
                return ImageSet(name, where, dataset=source)
            unknown = sorted(c for c, k in zip(names, keys) if k not in index)  # type: ignore[arg-type]
            if unknown:
                raise DataNotFoundError(absent_classes(f"{where} ({name})", unknown, len(index)))
            return ImageSet(name, where, dataset=source, relabel=[index[k] for k in keys])
        if isinstance(source, Mapping) and "imglist" in source:
            spec = SetSpec.parse(name, source)
            listed = resolve(Path.cwd(), spec.imglist)
            images = resolve(Path.cwd(), spec.images) if "images" in source else listed.parent
            lines = read_imglist(listed)
            entries = [(images / p, y) for p, y in lines]
            if label is not None:
                return ImageSet(name, str(listed), entries)
            unlabelled = [p for p, y in lines if y < 0]
            if unlabelled:
                raise DataNotFoundError(f"{listed}: {len(unlabelled)} line(s) without a class index (no label or a "
                                        f"negative one; first: {unlabelled[0]}); an ID image list needs "
                                        "'<path> <class index>' lines")
            if classes is not None or self._unnamed_train is not None:  # not the train split: its labels are known
                unknown = sorted({y for _, y in entries} - set(range(self.num_classes)))
                if unknown:
                    noun = "label" if len(unknown) == 1 else "labels"
                    raise DataNotFoundError(f"{listed} has {len(unknown)} {noun} absent from the ID train split "
                                            f"(classes 0..{self.num_classes - 1}): {first_few(unknown)}")
            return ImageSet(name, str(listed), entries)
        if not isinstance(source, str | os.PathLike | Mapping):
            raise not_a_source(name, source)
        spec = SetSpec.parse(name, source if isinstance(source, Mapping) else {"folder": str(source)})
        if spec.folder is None:
            raise ConfigError(f"set {name!r}: {self.caller} reads folders, image lists and Datasets; got {dict(source)}")  # type: ignore[arg-type]
        folder = resolve(Path.cwd(), spec.folder)
        if not folder.is_dir():
            raise no_folder(name, folder, "a folder of images; ID splits: <folder>/<class>/<image>")
        left_out: list[Path] = []
        if label is not None:
            entries = [(f, label) for f in image_files(folder, left_out)]
            warn_left_out(name, left_out)
            return ImageSet(name, str(folder), entries)
        found = class_folders(folder)
        if not found:
            raise DataNotFoundError(f"{name}: {folder} has no class folders (ID images go in {folder}/<class>/<image>)")
        twice = same_name_twice(found)
        if twice:
            raise ConfigError(f"{folder}: class folders {twice} are one name in two Unicode forms (NFC and NFD, e.g. "
                              "one copied from macOS): merge them into one folder")
        if classes is None:
            if self._unnamed_train is not None:
                raise ConfigError(
                    f"{folder}: class folders cannot be matched to the labels of the train {self._unnamed_train}, "
                    "which names no classes: give this split as labels too (an image list or a Dataset), or give the "
                    "train split as class folders or as a Dataset with a `classes` attribute (class names in label "
                    "order, as torchvision's ImageFolder has)"
                )
            self._classes = classes = found
            warn_numbered(folder, found)
        index = {class_key(c): i for i, c in enumerate(classes)}  # by NFC form: `café` from macOS is NFD
        unknown = sorted(c for c in found if class_key(c) not in index)
        if unknown:
            raise DataNotFoundError(absent_classes(str(folder), unknown, len(classes)))
        entries = [(f, index[class_key(c)]) for c in found for f in image_files(folder / c, left_out)]
        warn_left_out(name, left_out)
        return ImageSet(name, str(folder), entries)

    def check_model_input(self, model: torch.nn.Module) -> None:
        """Refuse a model built for one input size (a timm ViT or Swin, torchvision's ViT) beside another
        `image_size`: it failed at the first batch with an AssertionError traceback."""
        side = self.preprocessing.get("image_size")  # absent with a transform object: its size is its own
        fixed = fixed_input_size(model)
        if side is None or fixed is None or fixed == (side, side):
            return
        height, width = fixed
        build = ("a model built for it (timm.create_model(..., img_size=N), torchvision's ViT: image_size=N)"
                 if self.python_api else f"+backbone.img_size={side} (timm) or +backbone.image_size={side} "
                 "(torchvision ViT), which build the model for it")
        raise ConfigError(f"the model takes {height}x{width} images only, but {self._option('image_size', side)}: "
                          f"set {self._option('image_size', height)}{'' if height == width else ' (square crops)'}, "
                          f"or give {build}")

    def _check_outliers_apart(self) -> None:
        """Refuse an outlier folder that is, holds or lies inside an ID split's folder: outlier exposure would train
        those ID images as OOD (a pool pointed at the ID root, or at one of its class folders)."""
        pool = self.outlier_set_
        if pool is None or not Path(pool.where).is_dir():  # a Dataset or an image list: its files are not compared
            return
        outside = Path(pool.where).resolve()
        for split, image_set in [*self.id_sets.items(), *self.csid_sets.items()]:
            folder = Path(image_set.where)
            if not folder.is_dir():
                continue
            inside = folder.resolve()
            if outside == inside or outside.is_relative_to(inside) or inside.is_relative_to(outside):
                relation = "is" if outside == inside else "is inside" if outside.is_relative_to(inside) else "holds"
                raise ConfigError(
                    f"{self._option('outliers')}={outside} {relation} the ID {split} folder {inside}: outlier exposure "
                    "would train ID images as OOD; give a folder of images of none of the ID classes, outside the ID "
                    "splits"
                )

    def _option(self, key: str, value: Any = _NAME_ONLY) -> str:
        """`option(key, ...)` as this benchmark's caller gives it."""
        return option(key, self.python_api, value)

    def _check_options(self, val_fraction: Any, split_seed: Any, overlap_threshold: Any, scan_workers: Any,
                       flags: Mapping[str, Any]) -> None:
        """Refuse a split or screening option of the wrong type or range, naming it as the caller gives it, before any
        file is read: they were taken as given (`exact_duplicates='no'` is true and ran the check; `val_fraction=0`
        still held out an image per class; `overlap_threshold=1.0` let rounding decide, as identical features reach a
        cosine of 1 only up to it; a word as the threshold failed in a comparison after the evaluation pass)."""
        none = "None" if self.python_api else "null"
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise ConfigError(f"{self._option(key, value)}: must be {'True or False' if self.python_api else 'true or false'}")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, Real) or not 0 < val_fraction < 1:
            raise ConfigError(f"{self._option('val_fraction', val_fraction)}: must be in (0, 1), the share of the train "
                              "images held out as the ID validation split where there is no val/ split")
        for key, value, low in (("split_seed", split_seed, 0), ("scan_workers", scan_workers, 1)):
            if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
                raise ConfigError(f"{self._option(key, value)}: must be a whole number >= {low}")
        if overlap_threshold is not None and (isinstance(overlap_threshold, bool) or not isinstance(overlap_threshold, Real)
                                              or not -1 < overlap_threshold < 1):
            raise ConfigError(
                f"{self._option('overlap_threshold', overlap_threshold)}: must be a cosine in (-1, 1), above which an "
                f"OOD image is a near duplicate of an ID one, or {none} for none (identical features reach 1 only up "
                f"to rounding; same-pixel copies are what {self._option('exact_duplicates')} finds)")

    def _given_classes(self, classes: Sequence[str] | None, train: Source) -> list[str] | None:
        """`classes` checked: unique names, and, for train class folders, one name per folder."""
        if classes is None:
            return None
        key = self._option("classes")
        if isinstance(classes, str) or not classes:
            raise ConfigError(f"{key} must be a non-empty list of class names in label order; got {classes!r}")
        given = [str(c) for c in classes]
        twice = sorted(set(same_name_twice(given)))
        if twice:
            raise ConfigError(f"{key} names {first_few(twice)} more than once")
        keys = {class_key(c) for c in given}
        if isinstance(train, str | os.PathLike) or (isinstance(train, Mapping) and "folder" in train):
            folder = resolve(Path.cwd(), train if isinstance(train, str | os.PathLike) else train["folder"])
            found = class_folders(folder) if folder.is_dir() else []
            if found:
                found_keys = {class_key(c) for c in found}
                unlisted = sorted(c for c in found if class_key(c) not in keys)
                absent = sorted(c for c in given if class_key(c) not in found_keys)
                if unlisted or absent:
                    raise ConfigError(
                        f"{key} must name each class folder of {folder} once: "
                        + "; ".join(f"{what} {first_few(names)}" for what, names in
                                    (("not listed:", unlisted), ("no such folder:", absent)) if names)
                    )
        own = getattr(train, "classes", None) if isinstance(train, Dataset) else None
        own_keys = {class_key(str(c)) for c in own or ()}
        if own is not None and own_keys & keys and own_keys != keys:
            raise ConfigError(f"{key} and the train Dataset's `classes` name different classes: "
                              f"{first_few(sorted(own_keys ^ keys))} in one only")
        return given

    def _check_labels_named(self, train: ImageSet) -> None:
        """With `classes` given, every train label is one of its indices."""
        unknown = sorted(set(self._labels(train)) - set(range(self.num_classes)))
        if unknown:
            raise DataNotFoundError(f"{train.where}: labels {first_few(unknown)} have no name in {self._option('classes')} "
                                    f"({self.num_classes} names: labels 0..{self.num_classes - 1})")

    def _id_set(self, split: str, source: Source, classes: list[str] | None) -> ImageSet:
        return self._set(f"{self.name}:{split}", source, None, classes)

    @property
    def _skipped_note(self) -> str:
        """` after skipping N unreadable (first: <file>)` for a message on images that are not there, when
        data.bad_images=skip left some out (a class of broken files was said to have no images)."""
        return f" after skipping {len(self.skipped)} unreadable (first: {self.skipped[0]})" if self.skipped else ""

    def _check_train_classes(self, train: ImageSet) -> None:
        """Every ID class keeps training images once the validation split is held out (at least one image of each
        class goes to it): the detectors fitted on train would otherwise score against a class they never saw (its
        mean the zero vector), silently."""
        labels = self._labels(train)

        def named(ks: list[int]) -> str:
            return first_few([self.classes[k] for k in ks] if self.classes else ks)

        empty = [k for k in range(self.num_classes) if k not in set(labels)]
        if empty:
            raise DataNotFoundError(f"{train.where}: class(es) {named(empty)} have no images{self._skipped_note} "
                                    "(every ID class needs training images)")
        kept = set(labels) if self._held_out is None else {labels[i] for i in self._held_out[1]}
        missing = [k for k in range(self.num_classes) if k not in kept]
        if missing:
            raise DataNotFoundError(f"{train.where}: holding out the ID validation split ("
                                    f"{self._option('val_fraction', self.val_fraction)}, at least one image per class) leaves class(es) "
                                    f"{named(missing)} no training image; give them more images or a val/ split")

    def _warn_partial_splits(self) -> None:
        """One warning per ID test / val / csid set (listed files) without any image of some ID classes: allowed, but
        its accuracy and its rows are over the other classes, which a missing or misnamed class folder makes without
        a word."""
        sets = [*(self.id_sets[s] for s in ("test", "val") if s in self.id_sets), *self.csid_sets.values()]
        for image_set in (s for s in sets if s.entries is not None):
            missing = sorted(set(range(self.num_classes)) - {y for _, y in image_set.entries})
            if missing:
                log.warning("%s (%s) has no image of %d of the %d ID classes: %s; its accuracy and scores are over the "
                            "others", image_set.name, image_set.where, len(missing), self.num_classes,
                            first_few([self.classes[k] for k in missing] if self.classes else missing))

    def _class_count(self, train: ImageSet) -> int:
        """The number of classes of a train split labelled by index (an image list, a Dataset): 1 + the largest
        label; a list's labels must be 0..K-1, each with images."""
        labels = set(self._labels(train))
        count = 1 + max(labels, default=-1)
        missing = sorted(set(range(count)) - labels)
        if train.entries is not None and missing:
            raise DataNotFoundError(f"{train.where}: the ID train labels must be the class indices 0..{count - 1}, "
                                    f"each with images; no image has {first_few(missing)}")
        return count

    def _ood_sets(self, groups: Mapping[str, Any], required: bool = True) -> tuple[list[tuple[str, str, ImageSet]], ImageSet | None]:
        """(name, group, set) of every test OOD set and the validation-OOD set, from `ood_mapping`'s groups;
        `required`: refuse groups without a test set (a run that evaluates)."""
        names = [n for g in ("near", "far", "csid") for n in groups[g]]
        taken = sorted(RESERVED_NAMES & set(names)) or sorted({n for n in names if names.count(n) > 1})
        if taken:
            raise ConfigError(
                f"OOD and csid set names must be unique and not one of {sorted(RESERVED_NAMES)} (split and group "
                f"names); got {taken}: name the sets in a mapping, e.g. {{far: {{my_name: <folder>}}}}"
            )
        slashed = [n for n in names if "/" in str(n)]
        if slashed:  # `<detector>/<set>` keys of scores.npz and the logged `test/<detector>/<set>/auroc` split at it
            raise ConfigError(f"OOD and csid set names cannot hold '/' (the results key scores and metrics by "
                              f"<detector>/<set>); got {slashed}")
        names = [n for g in ("near", "far") for n in groups[g]]
        if required and not names:
            given = " and ".join(repr(g) for g in ("val", "csid") if groups.get(g)) or "no set"
            raise ConfigError(f"data=folder needs at least one OOD test set (near or far); the OOD sets given hold only "
                              f"{given} ('val': validation OOD, for tuning; 'csid': covariate-shifted ID): "
                              "'+data.ood.far={name: folder}' (Python: ood_data={'far': ..., 'val': ...})")
        sets = [(n, g, self._set(n, src, label=-1)) for g in ("near", "far") for n, src in groups[g].items()]
        val = None if groups.get("val") is None else self._set("val_ood", groups["val"], label=-1)
        same = [n for n, _, s in sets if val is not None and (s.dataset is val.dataset if s.dataset is not None else s.where == val.where)]
        if same:
            log.warning("the validation-OOD set (%s, %s) is also the test OOD set %s: the detectors are tuned "
                        "on test images, so their rows for it are optimistic; give a validation-OOD set apart from the "
                        "test sets", self._option("ood.val"), val.where, same[0])  # type: ignore[union-attr]
        return sets, val

    def _screened_sets(self) -> list[ImageSet]:
        """The ID splits and OOD sets: what `screen` compares."""
        val_ood = [] if self.val_ood_set is None else [self.val_ood_set]
        return [*self.id_sets.values(), *(s for _, _, s in self.ood_sets), *val_ood]

    def _unscreened_sets(self) -> list[ImageSet]:
        """The csid sets (ID) and the outliers (training only)."""
        return [*self.csid_sets.values(), *([] if self.outlier_set_ is None else [self.outlier_set_])]

    def _all_sets(self) -> list[ImageSet]:
        return [*self._screened_sets(), *self._unscreened_sets()]

    @staticmethod
    def _size(image_set: ImageSet) -> int:
        return len(image_set.entries) if image_set.entries is not None else len(image_set.dataset)  # type: ignore[arg-type]

    def _labels(self, image_set: ImageSet) -> list[int]:
        if image_set.entries is not None:
            return [y for _, y in image_set.entries]
        return SourceImages(image_set.dataset, image_set.name, self.eval_transform(), relabel=image_set.relabel).targets  # type: ignore[arg-type]

    @cached_property
    def digests(self) -> dict[Path, str | None]:
        """Pixel digest of every file of the ID splits and OOD sets (None: unreadable), decoded once."""
        screened = [s for s in self._screened_sets() if s.entries is not None]
        return scan_files([p for s in screened for p, _ in s.entries], self.scan_workers)  # type: ignore[union-attr]

    def _skip_unreadable(self) -> None:
        others = [p for s in self._unscreened_sets() for p, _ in s.entries or []]
        scanned = {**self.digests, **scan_files(others, self.scan_workers)}
        bad = {p for p, d in scanned.items() if d is None}
        self.skipped = sorted(str(p) for p in bad)
        if not bad:
            return
        log.warning("skipped %d unreadable image(s) (%s), listed in bad_images.json", len(bad), self.skip_option)
        replace = lambda s: ImageSet(s.name, s.where, [e for e in s.entries if e[0] not in bad]) if s.entries is not None else s  # noqa: E731
        self.id_sets = {k: replace(s) for k, s in self.id_sets.items()}
        self.ood_sets = [(n, g, replace(s)) for n, g, s in self.ood_sets]
        self.val_ood_set = None if self.val_ood_set is None else replace(self.val_ood_set)
        self.csid_sets = {n: replace(s) for n, s in self.csid_sets.items()}
        self.outlier_set_ = None if self.outlier_set_ is None else replace(self.outlier_set_)

    # ----- preprocessing -----------------------------------------------------------------------------------------
    def _tensor_normalization(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        """Datasets of float tensors were normalised by their own transform, by which ODIN and the other
        input-perturbing detectors must scale their step: the `Normalize` of their `transform` (torchvision datasets
        keep it there) gives the mean / std not given; without one, a warning names the values assumed (they were
        the model's defaults, taken silently and recorded in `preprocessing.json` as used)."""
        if not self._tensor_sources:
            return
        found = {}
        for name, dataset in self._tensor_sources.items():
            while isinstance(dataset, Subset):
                dataset = dataset.dataset
            found[name] = normalization(getattr(dataset, "transform", None))
        p, names = self.preprocessing, ", ".join(found)
        norms = {json.dumps(n) for n in found.values()}
        if len(norms) == 1 and None not in found.values():
            own = json.loads(norms.pop())
            p["mean"], p["std"] = list(mean) if mean is not None else own[0], list(std) if std is not None else own[1]
            p["source"] += f"; mean / std of {names}: their transform's Normalize (float tensors, used as given)"
            return
        log.warning("%s: Datasets of float tensors are used as given; odin and the other input-perturbing detectors "
                    "scale their step by std=%s (%s): pass mean= / std= of their normalisation", names, p["std"], p["source"])

    def _warn_small_images(self) -> None:
        """One warning when ImageNet's default size (no size given, none from the network) reads train images of
        under half of it (the shorter side of the first `SIZE_PROBE`): `data=folder` with ood's own small_cnn read 32
        px images at 224 px, 49 times the pixels, without a word."""
        p = self.preprocessing
        if not p["source"].startswith(DEFAULT_SOURCE):
            return
        sides = first_sides(self.id_sets["train"], SIZE_PROBE)
        if not sides or 2 * max(sides) >= p["image_size"]:
            return
        side, size = max(sides), p["image_size"]
        seen = f"{side} px" if min(sides) == side else f"{min(sides)} to {side} px"
        log.warning("%s: train images of %s (the first %d's shorter side) are read at %d px, ImageNet's default for a "
                    "network without its own preprocessing (%dx the pixels); for a network of %d px inputs give %s",
                    self.name, seen, len(sides), size, round((size / side) ** 2), side,
                    (", " if self.python_api else " ").join(self._option(k, side) for k in ("image_size", "resize")))

    @property
    def input_mean(self) -> tuple[float, ...]:
        return tuple(self.preprocessing.get("mean", (0.0,) * 3))

    @property
    def input_std(self) -> tuple[float, ...]:
        return tuple(self.preprocessing.get("std", (1.0,) * 3))

    def eval_transform(self) -> Callable[[Image.Image], Any]:
        return self.transform if self.transform is not None else preprocessing_transform(self.preprocessing)

    def train_transform(self) -> Callable[[Image.Image], Any]:
        if self.transform is not None or not self.augment:
            return self.eval_transform()
        p = self.preprocessing
        return T.Compose([
            T.RandomResizedCrop(p["image_size"], interpolation=INTERPOLATIONS[p["interpolation"]]),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(p["mean"], p["std"]),
        ])

    def prepare(self, download: bool = False, evaluate: bool = True) -> None:
        """Print the preprocessing once (`ood-train` prepares at fit and at test); record it (and skipped files) in the
        run folder."""
        # ood's own logger: the entry points keep Lightning's INFO lines (`rank_zero_info`) off their console
        if not self._told:
            log.info("%s: preprocessing %s", self.name, json.dumps(self.preprocessing))
            self._told = True
        if self.report_dir is None:
            return
        self.report_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.report_dir / "preprocessing.json", json.dumps(self.preprocessing, indent=2))
        if self.bad_images == "skip":
            atomic_write_text(
                self.report_dir / "bad_images.json", json.dumps({"count": len(self.skipped), "files": self.skipped}, indent=2)
            )
        else:  # an earlier run's list in this folder would name files this run read
            (self.report_dir / "bad_images.json").unlink(missing_ok=True)

    # ----- datasets ----------------------------------------------------------------------------------------------
    def _dataset(self, image_set: ImageSet, transform: Callable[[Image.Image], Any], label: int | None = None) -> Dataset:
        if image_set.dataset is not None:
            return SourceImages(image_set.dataset, image_set.name, transform, label, image_set.relabel)
        return FileImages(image_set.entries or [], transform, label, f" ({self.skip_option} skips such files)")

    @cached_property
    def _held_out(self) -> tuple[list[int], list[int]] | None:
        if "val" in self.id_sets:
            return None
        targets = self._labels(self.id_sets["train"])
        size = max(self.num_classes, round(self.val_fraction * len(targets)))
        return stratified_split(targets, min(size, len(targets) - 1), self.split_seed)

    def train(self, augment: bool = True) -> Dataset:
        dataset = self._dataset(self.id_sets["train"], self.train_transform() if augment else self.eval_transform())
        return dataset if self._held_out is None else Subset(dataset, self._held_out[1])

    def val(self) -> Dataset:
        if self._held_out is None:
            return self._dataset(self.id_sets["val"], self.eval_transform())
        return Subset(self._dataset(self.id_sets["train"], self.eval_transform()), self._held_out[0])

    def test(self) -> Dataset:
        return self._dataset(self.id_sets["test"], self.eval_transform())

    def ood_test(self) -> list[OODSet]:
        return [OODSet(n, g, self._dataset(s, self.eval_transform(), -1)) for n, g, s in self.ood_sets]  # type: ignore[arg-type]

    def ood_val(self) -> Dataset | None:
        return None if self.val_ood_set is None else self._dataset(self.val_ood_set, self.eval_transform(), -1)

    @property
    def csid_names(self) -> tuple[str, ...]:
        return tuple(self.csid_sets)

    def csid_test(self) -> list[CSIDSet]:
        return [CSIDSet(n, self._dataset(s, self.eval_transform())) for n, s in self.csid_sets.items()]

    def outliers(self) -> Dataset | None:
        self.outliers_read = self.outliers_read or self.outlier_set_ is not None
        if self.outlier_set_ is None:
            return None
        return self._dataset(self.outlier_set_, self.train_transform() if self.augment_outliers else self.eval_transform(), -1)

    #: whether the outlier set was built (the outlier stream, or a fit-time pass such as heatmap's outlier pool)
    outliers_read = False
    #: whether `outliers_unused` has warned (once a run: loaders rebuilt every epoch ask again)
    unused_said = False

    def outliers_unused(self, method: str) -> None:
        """A given outlier folder that `method` trains without was dropped without a word: the user believed the
        run had outlier exposure."""
        if self.outlier_set_ is not None and not self.outliers_read and not self.unused_said:
            self.unused_said = True
            log.warning("%s=%s is not used: method %s does not train on outliers (leave it out, or choose a method "
                        "that does, e.g. method=oe)", self._option("outliers"), self.outlier_set_.where, method)

    # ----- ID/OOD overlap ----------------------------------------------------------------------------------------
    def screen(
        self, banks: Mapping[str, FeatureBank], splits: Sequence[EvalSplit], datasets: Mapping[str, Dataset]
    ) -> tuple[dict[str, FeatureBank], dict[str, dict[str, Any]]]:
        """List exact and near duplicates between the ID splits (csid sets included) and every OOD set (`overlap.json`,
        one warning per set); with `drop_overlap` remove them from the OOD banks. Returns the banks and per-set row fields.

        Near duplicates compare the features of the pass, which holds only the fit split's train images: with
        `data.fit_fraction` < 1 the other train images are not compared by features (that needs a pass over the
        images `fit_fraction` is there to leave out), and `overlap.json` records how many were (`near_train`); exact
        duplicates compare every train image of a folder or list (decoded anyway), of a Dataset the fit rows."""
        # the covariate-shifted ID sets too (full-spectrum runs): an OOD image that copies one is an ID-class image
        id_names = [s.name for s in splits if s.role in ("fit", "id_val", "id_test", "csid") and s.name in banks]
        ood_names = [s.name for s in splits if s.role in ("ood", "ood_val") and s.name in banks]

        def rows_of(name: str) -> list[tuple[Any, int]]:
            index = banks[name].index
            rows = range(len(banks[name])) if index is None else index.tolist()
            return [_item(datasets[name], int(i)) for i in rows]

        items = {name: rows_of(name) for name in id_names + ood_names}
        digest = {
            name: [ds.digest(i, self.digests) if self.exact_duplicates else None for ds, i in items[name]]
            for name in items
        }
        # digest -> (ID split, dataset, item) of the first ID image with these pixels
        id_by_digest: dict[str | None, tuple[str, FileImages | SourceImages, int]] = {}
        for name in id_names:
            for (ds, i), d in zip(items[name], digest[name]):
                id_by_digest.setdefault(d, (name, ds, i))
        train = self.id_sets["train"].entries
        if self.exact_duplicates and "train" in id_names and train is not None:
            # the train images that data.fit_fraction leaves out of the fit split: decoded anyway (`digests`),
            # they were not compared (fit_fraction=0.1 listed a tenth of the copies of train images)
            every = FileImages(train, self.eval_transform())
            for i, (path, _) in enumerate(train):
                id_by_digest.setdefault(self.digests.get(path), ("train", every, i))
        id_by_digest.pop(None, None)
        # the train images whose features the near-duplicate cosine compares: the fit split's, of all of them
        near_train = {"compared": len(banks["train"]) if "train" in id_names else 0,
                      "of": len(self._held_out[1]) if self._held_out is not None else self._size(self.id_sets["train"])}
        if self.overlap_threshold is not None and near_train["compared"] < near_train["of"]:
            log.info("near duplicates (feature cosine) are looked for among the %d train images of the fit split "
                     "(%s), not the other %d", near_train["compared"], self._option("fit_fraction"),
                     near_train["of"] - near_train["compared"])
        found: dict[str, list[dict[str, Any]]] = {}
        notes: dict[str, dict[str, Any]] = {}
        out = dict(banks)
        for name in ood_names:
            feats = banks[name].features
            best = torch.full((len(feats),), -2.0)
            where: list[tuple[str, int]] = [("", 0)] * len(feats)
            if self.overlap_threshold is not None:
                for id_name in id_names:
                    sims, idx = overlapping_rows(feats, banks[id_name].features)
                    better = sims > best
                    best = torch.where(better, sims, best)
                    where = [(id_name, int(j)) if b else w for b, j, w in zip(better.tolist(), idx.tolist(), where)]
            listed = []
            for row in range(len(feats)):
                exact = id_by_digest.get(digest[name][row])
                near = self.overlap_threshold is not None and float(best[row]) > self.overlap_threshold
                if exact is None and not near:
                    continue
                if exact is not None:
                    id_name, ds, i = exact
                else:
                    id_name, id_row = where[row]
                    ds, i = items[id_name][id_row]
                listed.append({
                    "ood": items[name][row][0].describe(items[name][row][1]),
                    "id": ds.describe(i),
                    "id_split": id_name,
                    "kind": "exact" if exact is not None else "near",
                    "similarity": 1.0 if exact is not None else round(float(best[row]), 6),
                    "row": row,
                })
            found[name] = listed
            dropped = len(listed) if self.drop_overlap else 0
            if listed:
                n_exact = sum(e["kind"] == "exact" for e in listed)
                log.warning(
                    "%s: %d image(s) overlap the ID data (%d exact, %d near: cosine > %s), listed in overlap.json%s",
                    name, len(listed), n_exact, len(listed) - n_exact, self.overlap_threshold,
                    f"; dropped ({self._option('drop_overlap', True)})" if dropped else "",
                )
            if dropped:
                keep = torch.ones(len(feats), dtype=torch.bool)
                keep[[e["row"] for e in listed]] = False
                out[name] = banks[name].subset(keep)
            notes[name] = {"overlap": len(listed), "overlap_dropped": dropped}
        if self.report_dir is not None:
            self.report_dir.mkdir(parents=True, exist_ok=True)
            record = {"threshold": self.overlap_threshold, "exact": self.exact_duplicates,
                      "drop_overlap": self.drop_overlap, "near_train": near_train,
                      "sets": {n: [{k: v for k, v in e.items() if k != "row"} for e in es] for n, es in found.items()}}
            atomic_write_text(self.report_dir / "overlap.json", json.dumps(record, indent=2))
        emptied = [name for name in ood_names if notes[name]["overlap_dropped"] and len(out[name]) == 0]
        if emptied:
            raise DataNotFoundError(f"{self._option('drop_overlap', True)} leaves no image of OOD set(s) {emptied}: "
                                    "each of their images duplicates ID data (listed in overlap.json); score them "
                                    f"without drop_overlap, or with another {self._option('overlap_threshold')}")
        return out, notes


def first_sides(image_set: ImageSet, count: int) -> list[int]:
    """The shorter sides of the first `count` images of `image_set`: files (their header only), a Dataset's PIL
    images (its float tensors are used as they are, unresized: none)."""
    if image_set.entries is None:
        dataset = image_set.dataset
        items = (dataset[i] for i in range(min(count, len(dataset))))  # type: ignore[arg-type,index]
        images = (x[0] if isinstance(x, tuple | list) else x for x in items)
        return [min(x.size) for x in images if isinstance(x, Image.Image)]
    sides = []
    for path, _ in image_set.entries[:count]:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except OSError:  # unreadable: its own error comes when the image is read
            continue
    return sides


def first_few(items: Sequence[Any], first: int = 8) -> str:
    """`items` for a one-line message: all of them, or the first `first` and how many there are (a 1000-class
    folder gave a 13 kB line)."""
    return str(list(items)) if len(items) <= first else f"{list(items[:first])} ... ({len(items)} in all)"


def absent_classes(where: str, unknown: Sequence[str], known: int) -> str:
    """The one-line error for a split whose classes the ID train split lacks, with the two ways out."""
    noun = "class" if len(unknown) == 1 else "classes"
    return (f"{where} has {len(unknown)} {noun} absent from the ID train split ({known} classes): {first_few(unknown)}; "
            "if the model knows them, give its class names in label order (data.classes=[...], Python: classes=[...]), "
            "else move those images out of this split")


def warn_numbered(folder: Path, classes: Sequence[str]) -> None:
    """One warning when class folders named by numbers sort as text otherwise than as numbers (0, 1, 10, 2, ...):
    label i is the i-th folder in text order (ImageFolder's), not folder 'i', which a model trained on the folder
    numbers (ImageNet-V2's layout) has as its output i."""
    if all(c.isdigit() for c in classes) and list(classes) != sorted(classes, key=int):
        numbered = sorted(classes, key=int)
        log.warning("%s: class folders named by numbers are in text order (ImageFolder's: label i is the i-th of %s); "
                    "for a model whose output i is folder 'i' give them in number order: data.classes=%s (Python: "
                    "classes=sorted(names, key=int))", folder, first_few(list(classes)),
                    f"[{','.join(numbered)}]" if len(numbered) <= 12 else "<the folder names in number order>")


def warn_left_out(name: str, left_out: Sequence[Path]) -> None:
    """One warning for the image files of set `name` that are not read for their kind (`.gif`, `.jfif`, ...): they
    left the set silently."""
    if left_out:
        kinds = Counter(p.suffix.lower() for p in left_out)
        log.warning("%s: %d image file(s) of kinds not read left out (%s; first: %s); convert them to one of %s",
                    name, len(left_out), ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items())), left_out[0],
                    list(IMAGE_EXTENSIONS))


def no_folder(name: str, path: Path, layout: str) -> DataNotFoundError:
    """The one line for a folder source that is not a folder: absent, or a file (an image list or an `.npy` given
    where a folder is read: 'folder not found' named a file that was there)."""
    if not path.is_file():
        return DataNotFoundError(f"{name}: folder not found: {path} (expected {layout})")
    if path.suffix.lower() in IMAGE_EXTENSIONS:  # one image of the set: an image list of it was no way out
        return DataNotFoundError(f"{name}: {path} is one image, not a folder (expected {layout}): give the folder "
                                 "that holds the set's images")
    return DataNotFoundError(f"{name}: {path} is a file, not a folder (expected {layout}); an image list is given "
                             f"as {{imglist: {path}}} (Python: {{'imglist': ...}}), other files (an .npy array) as a "
                             "torch Dataset")


def not_a_source(name: str, source: Any) -> ConfigError:
    """The one line for a source that is no folder, image list or torch Dataset (a Hugging Face `datasets.Dataset`,
    a Python list of samples): it was read as a folder named by its repr."""
    return ConfigError(f"{name}: a set is a folder, an image list {{'imglist': <file>}} or a torch Dataset; got a "
                       f"{type(source).__module__}.{type(source).__qualname__}: wrap it in a torch.utils.data.Dataset "
                       "whose items are (image, label)")


def folder_name(folder: str | os.PathLike) -> str:
    """The name a folder gives its set: its last part once `.` and `..` are resolved (`.` named a set '', `../x/..`
    one '..'), without following links (a linked folder keeps its own name)."""
    return Path(os.path.abspath(Path(folder).expanduser())).name


def ood_mapping(ood: Any, python_api: bool = False, required: bool = True) -> dict[str, Any]:
    """`{near: {name: source}, far: {name: source}, val: source | None, csid: {name: source}}` from any accepted form
    of the OOD sets: that mapping (each group a source, a list or a mapping), a `{name: source}` mapping (all far), a
    list of sources (all far, named by folder) or one source. `python_api`: messages name `ood_data`; `required`:
    none is refused (a run that evaluates; `ood-train evaluate=false` trains without them)."""
    if ood is None or (isinstance(ood, Mapping) and not ood):
        if not required:
            return {"near": {}, "far": {}, "val": None, "csid": {}}
        if python_api:  # an evaluation: the sets are needed, the command line's options are not its
            raise ConfigError("ood.evaluate needs OOD sets: ood_data={name: folder} (or a folder, a list of them, "
                              "{near: ..., far: ...})")
        raise ConfigError("data=folder needs OOD sets: '+data.ood.far={name: folder}' (Python: ood_data=...), or "
                          "ood-train evaluate=false to train without them")

    def single(source: Any) -> bool:
        return isinstance(source, str | Path | Dataset) or (isinstance(source, Mapping) and "imglist" in source)

    def name_of(i: int, source: Any) -> str:
        if isinstance(source, Dataset):
            return f"ood{i}"
        if isinstance(source, Mapping) and "folder" in source:  # a folder spec (it raised KeyError 'imglist')
            return folder_name(source["folder"])
        if isinstance(source, Mapping):
            return Path(str(source["imglist"])).stem
        if isinstance(source, str | os.PathLike):
            return folder_name(source)
        raise not_a_source(f"OOD set {i}", source)

    def named(members: Any) -> dict[str, Any]:
        """A group's sets by name from one source, a list of them or a `{name: source}` mapping."""
        if single(members):
            members = [members]
        if isinstance(members, Mapping):
            return dict(members)
        if members is not None and not isinstance(members, Sequence):
            raise not_a_source("an OOD group", members)
        out: dict[str, Any] = {}
        for i, source in enumerate(members or []):
            name = name_of(i, source)
            if name in out:
                raise ConfigError(f"OOD sets {out[name]} and {source} would both be named {name!r}: name them, "
                                  f"e.g. {{'{name}_a': ..., '{name}_b': ...}} (CLI: '+data.ood.far={{a: ..., b: ...}}')")
            out[name] = source
        return out

    if single(ood):
        ood = [ood]

    if not isinstance(ood, Mapping):
        return {"near": {}, "far": named(ood), "val": None, "csid": {}}
    spec_keys = {f.name for f in fields(SetSpec)}
    # a `{name: source}` mapping (all far), unless a value is a group of sets itself: a misspelt group key
    groups = [k for k, v in ood.items() if isinstance(v, Mapping) and not set(v) & spec_keys]
    unknown = sorted(set(ood) - set(OOD_KEYS)) if set(ood) & set(OOD_KEYS) else groups
    if unknown:
        close = {k: difflib.get_close_matches(str(k), OOD_KEYS, n=1) for k in unknown}
        hint = "".join(f" ({k!r}: did you mean {c[0]!r}?)" for k, c in close.items() if c)
        raise ConfigError(f"{option('ood', python_api)} has unknown keys {unknown}{hint}; valid keys: {', '.join(OOD_KEYS)}, or "
                          "{name: source} for far sets alone")
    if not set(ood) & set(OOD_KEYS):
        return {"near": {}, "far": dict(ood), "val": None, "csid": {}}
    val = ood.get("val")
    if val is not None and not (single(val) or isinstance(val, Mapping) and set(val) <= spec_keys):
        what = f"a mapping of sets {sorted(val)}" if isinstance(val, Mapping) else f"{val!r}"
        raise ConfigError(f"{option('ood.val', python_api)} is one set, the validation OOD the detectors are tuned on (a folder, an image "
                          f"list or a Dataset); got {what}: give one source (pool several sets into one folder)")
    return {"near": named(ood.get("near")), "far": named(ood.get("far")), "val": val, "csid": named(ood.get("csid"))}


def resolve_preprocessing(
    image_size: int | None = None,
    resize: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    data_config: Mapping[str, Any] | None = None,
    model: Mapping[str, Any] | None = None,
    transform: Any = None,
    python_api: bool = False,
) -> dict[str, Any]:
    """The preprocessing used and where it came from (module docstring; recorded in `preprocessing.json`). With a
    `transform` object: its input normalisation, `mean` / `std` as given, else those of its `Normalize` (the
    input-perturbing detectors scale their step by `std`), else none (0 and 1). `python_api`: messages name the
    keywords of `ood.evaluate` / `ood.extract` (`mean=`), not the config keys (`data.mean=`)."""
    for key, values in (("mean", mean), ("std", std)):
        if values is not None and (isinstance(values, str) or not all(isinstance(v, Real) for v in values)
                                   or len(values) not in (1, 3) or (key == "std" and min(values) <= 0)):
            raise ConfigError(f"{option(key, python_api)}={values!r}: must be 1 or 3 numbers{' > 0' if key == 'std' else ''} (one per channel)")
    # mmcv / detectron2's 0-255 values (mean=[123.675, 116.28, 103.53]) on [0, 1] pixels made every input about
    # -2.1, black and white 0.02 apart
    scaled = [(k, v) for k, v in (("mean", mean), ("std", std)) if v is not None and max(map(abs, v)) > 1]
    if scaled:
        given = ", ".join(f"{option(k, python_api)}={list(v)}" for k, v in scaled)
        divided = ", ".join(f"{k}={[round(x / 255, 4) for x in v]}" for k, v in scaled)
        raise ConfigError(f"{given}: pixels are normalised on the 0-1 scale (ToTensor), these are 0-255 values; "
                          f"give them divided by 255: {divided}")
    if transform is not None:
        ignored = [k for k, v in (("image_size", image_size), ("resize", resize), ("interpolation", interpolation)) if v is not None]
        if ignored:
            raise ConfigError(f"{', '.join(ignored)} given with a transform object, which does all the preprocessing: "
                              "leave them out (or the transform)")
        found = normalization(transform) or (None, None)
        mean, std = mean or found[0], std or found[1]
        return {"source": "transform object", "transform": repr(transform)} | (
            {} if mean is None else {"mean": list(mean)}) | ({} if std is None else {"std": list(std)})
    for key, value in (("image_size", image_size), ("resize", resize)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, Integral) or value < 1):
            raise ConfigError(f"{option(key, python_api)}={value!r}: must be a whole number of pixels >= 1 (or "
                              f"{'None' if python_api else 'null'} for the default)")
    model = dict(model or {})
    source = DEFAULT_SOURCE
    pretrained = None
    if data_config is None and model.get("library") == "timm" and model.get("name"):
        import timm.data

        # None for a name timm does not register: a timm class built directly (ood.evaluate names it by its class)
        pretrained = timm.get_pretrained_cfg(model["name"])
    if pretrained is not None:
        data_config = timm.data.resolve_data_config(pretrained_cfg=pretrained.to_dict())
        source = f"timm data config of {model['name']}"
    elif data_config is not None:
        source = "timm data config of the model"
    cfg = dict(data_config or {})
    size = image_size or (cfg["input_size"][-1] if "input_size" in cfg else 224)
    given = any(v is not None for v in (image_size, resize, mean, std, interpolation))
    out = {
        "source": f"{source}, given values" if given else source,
        "image_size": size,
        "resize": resize or math.floor(size / cfg.get("crop_pct", 0.875)),
        "interpolation": interpolation or cfg.get("interpolation", "bilinear"),
        "mean": list(mean or cfg.get("mean", IMAGENET_MEAN)),
        "std": list(std or cfg.get("std", IMAGENET_STD)),
        # timm's `squash` (84 of its configs: ConvNeXt 384, EVA, ...) resizes both sides, not the shorter one
        "crop_mode": cfg.get("crop_mode") or "center",
    }
    if out["crop_mode"] not in CROP_MODES:
        raise ConfigError(f"the model's timm data config has crop_mode={out['crop_mode']!r}, which data=folder does not "
                          f"do (choices: {list(CROP_MODES)}): pass transform=timm.data.create_transform(...)")
    if out["interpolation"] not in INTERPOLATIONS:
        raise ConfigError(f"{option('interpolation', python_api)}={out['interpolation']!r} is unknown; choices: "
                          f"{list(INTERPOLATIONS)}")
    check_crop(out["resize"], size, "" if python_api else "data.", "" if image_size else source)
    return out


def fixed_input_size(model: torch.nn.Module) -> tuple[int, int] | None:
    """The (height, width) the model accepts only, or None when it takes any: timm's strict patch embedding (ViT,
    Swin, ... unless built with `dynamic_img_size`) and torchvision's VisionTransformer assert their size."""
    for module in model.modules():
        if getattr(module, "strict_img_size", False) and getattr(module, "img_size", None) is not None:
            return tuple(module.img_size)  # type: ignore[return-value]
        if type(module).__module__.startswith("torchvision.") and isinstance(getattr(module, "image_size", None), int):
            return module.image_size, module.image_size
    return None


def normalization(transform: Any) -> tuple[list[float], list[float]] | None:
    """(mean, std) of the last torchvision `Normalize` (v1 or v2) in `transform`, through nested `Compose`s; None
    without one."""
    from torchvision.transforms import v2

    if isinstance(transform, T.Normalize | v2.Normalize):
        return tuple(torch.as_tensor(v, dtype=torch.float64).reshape(-1).tolist() for v in (transform.mean, transform.std))  # type: ignore[return-value]
    found = [n for step in getattr(transform, "transforms", ()) if (n := normalization(step)) is not None]
    return found[-1] if found else None


def preprocessing_transform(p: Mapping[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the shorter side (both sides for `crop_mode` squash, timm's), centre crop, tensor, normalise
    (`resolve_preprocessing`'s values)."""
    side = p["resize"] if p.get("crop_mode", "center") == "center" else (p["resize"], p["resize"])
    return T.Compose([
        T.Resize(side, interpolation=INTERPOLATIONS[p["interpolation"]]),
        T.CenterCrop(p["image_size"]),
        T.ToTensor(),
        T.Normalize(p["mean"], p["std"]),
    ])


def folder_dataset(data: str | Path | Dataset, transform: Callable[[Image.Image], Any]) -> Dataset:
    """Every image under a folder, labelled by its first-level class folder (-1 without one), or a user's Dataset."""
    if isinstance(data, Dataset):
        check_source(type(data).__name__, data, labelled=False)
        return SourceImages(data, type(data).__name__, transform)
    if not isinstance(data, str | os.PathLike):  # Python's TypeError from Path() named neither the keyword nor a choice
        raise ConfigError(f"data={data!r}: give a folder of images (str or os.PathLike) or a torch Dataset")
    root = Path(data)
    if not root.is_dir():
        raise no_folder("data", root, "a folder of images")
    splits = class_folders(root)
    if "train" in splits and set(splits) <= {"train", "val", "test"}:  # the ID root: its images were labelled by split
        raise ConfigError(f"{root} holds the ID splits {[f'{s}/' for s in splits]}, which would be the class labels: "
                          f"pass one split, e.g. {root / 'test'} (its class folders label the images)")
    entries = [(root / p, y) for p, y in folder_entries(root)]
    if not entries:
        raise DataNotFoundError(f"{root}: no images (extensions {list(IMAGE_EXTENSIONS)})")
    return FileImages(entries, transform, hint=EXTRACT_HINT)


def folder_datamodule(
    root: str | None = None,
    ood: Any = None,
    batch_size: int = 64,
    eval_batch_size: int = 256,
    outlier_batch_size: int | None = None,
    num_workers: int | None = 0,
    pin_memory: bool = False,
    seed: int = 0,
    fit_fraction: float = 1.0,
    fit_seed: int = 0,
    csid: bool = False,
    drop_last: bool = True,
    **benchmark: Any,
) -> OODDataModule:
    """`conf/data/folder.yaml`: a `FolderBenchmark(root, ood, **benchmark)` in the benchmark DataModule; `csid`
    serves its covariate-shifted ID sets in the evaluation pass (set from `evaluation.fsood`)."""
    folders = FolderBenchmark(root, ood, **benchmark)
    if folders.csid_names and not csid:
        log.warning("%s lists %s, which are not scored: full-spectrum evaluation is off (%s)",
                    option("ood.csid", folders.python_api), list(folders.csid_names),
                    "fsood=False" if folders.python_api else "evaluation.fsood=false")
    return OODDataModule(
        folders,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        outlier_batch_size=outlier_batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        seed=seed,
        fit_fraction=fit_fraction,
        fit_seed=fit_seed,
        csid=csid,
        drop_last=drop_last,
        evaluate=benchmark.get("evaluate", True),
    )
