"""Image sets and benchmark protocols as data: a protocol is a YAML mapping of named sets, not Python code.

A *set spec* (one YAML mapping) says where one dataset lives, relative to `data_dir` unless absolute:

- `{imglist: <list.txt>, images: <root>}`: an OpenOOD image list (`<path> <label>` lines) over an image root
  (default `images_classic`);
- `{folder: <dir>}`: every image under a folder, recursively, in sorted path order: torchvision `ImageFolder` trees
  (ODIN's `LSUN_resize/LSUN_resize/*.jpg`, DTD's `dtd/images/<class>/*.jpg`) and flat folders alike. As an ID set,
  labels come from the first-level sub-folder, sorted (ImageFolder's rule);
- `{annotations: <file>, images: <dir>, classes: <dir>}`: Tiny ImageNet's `val/val_annotations.txt` (tab-separated
  `<file> <wnid> ...`) over `val/images/`, class indices from the sorted sub-folders of `classes` (its `train/`);
- `{torchvision: <key>, root: <dir>}`: one of the benchmark's torchvision constructors (CIFAR's `svhn`, `cifar100`,
  ...) reading torchvision's own files under `root` (default `torchvision/<key>`);
- `{synthetic: hendrycks, source: <spec>, per_set: 2000, seed: 0}`: Outlier Exposure's and the energy paper's
  validation sets (uniform noise, means of image pairs, jigsaw, speckle, pixelate, RGB shift, inversion;
  `ood.data.synthetic`), `per_set` images each, made with `seed` from the images of the `source` spec (for CIFAR ID:
  the other CIFAR's test set), one set: their union.

A spec may give both `imglist` and `torchvision` (OpenOOD v1.5's sets: OpenOOD's lists when present, torchvision
otherwise); `how` says how to get the data (printed when it is missing); `optional: true` skips a missing set with a
warning instead of failing; `keep_classes: <file>` (one class index per line) keeps only the items whose label is
listed, relabelled by their line number (a class subset of a larger labelled set, e.g. ImageNet-X's halves of
ImageNet-1K). A *protocol* is `{near: {name: spec}, far: {name: spec}, val_ood: spec | null, csid: {name: spec}, id:
{...} | null}`: `csid` lists covariate-shifted ID sets (labelled with the ID classes: CIFAR-10-C, ImageNet-V2/-C/-R),
read only for full-spectrum evaluation; `id` (optional) replaces the benchmark's ID task (`num_classes`, `train`,
`val`, `test` specs) for protocols defined on a class subset. A user adds a set by naming its folder or list, e.g.
`+data.benchmark.protocols.classic.far.mine={folder: my_ood}`.
"""

from __future__ import annotations

import functools
import os
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from torch.utils.data import Dataset

from ood.data.imglist import ImageFiles, ImageList, read_imglist, read_text, subset_entries
from ood.data.synthetic import RECIPES, decoding, synthetic_set
from ood.errors import ConfigError, DataNotFoundError, OODError
from ood.utils import get_logger

log = get_logger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: image files that `IMAGE_EXTENSIONS` (torchvision `ImageFolder`'s) leaves out: named when a set holds them
OTHER_IMAGE_EXTENSIONS = (".gif", ".jfif", ".jpe", ".heic", ".heif", ".avif", ".jp2", ".jxl", ".tga", ".ico", ".pnm")
KINDS = ("imglist", "folder", "annotations", "torchvision", "synthetic")
#: `(root, download) -> dataset of (PIL image, label)`
TorchvisionBuilder = Callable[[Path, bool], Dataset]
Kind = Literal["imglist", "folder", "annotations", "torchvision", "synthetic"]


def _hidden(name: str) -> bool:
    """Names starting with a dot (Jupyter's `.ipynb_checkpoints/`, macOS' `._<image>` resource forks, `.git/`) and
    the `__MACOSX/` folder a macOS zip unpacks into (its `._<image>` copies made it a class without images)."""
    return name.startswith(".") or name == "__MACOSX"


def class_folders(root: Path) -> list[str]:
    """Sorted names of the sub-folders of `root` (torchvision `ImageFolder`'s class order), hidden ones left out
    (ImageFolder counts a `.ipynb_checkpoints/` as a class, then fails on it for having no images)."""
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not _hidden(entry.name))


def class_key(name: str) -> str:
    """The form class names are matched by across splits and sources: Unicode NFC. Folders copied from macOS name
    `café` in NFD (`e` + combining accent), the same name as another split's NFC `café` to a reader, and read as an
    absent / extra class."""
    return unicodedata.normalize("NFC", name)


def same_name_twice(names: list[str]) -> list[str]:
    """The names of `names` that another one equals in NFC form (`class_key`): one class to a reader, two folders."""
    keys = [class_key(n) for n in names]
    return [n for n, k in zip(names, keys) if keys.count(k) > 1]


def image_files(root: Path, left_out: list[Path] | None = None) -> list[Path]:
    """Every image file under `root`, recursively, in sorted path order; hidden files and folders left out. Symlinked
    folders are followed, as torchvision's `ImageFolder` does (a set assembled from links lost their images
    silently), each real folder once (a link to an ancestor is no endless loop). Images of the kinds `ImageFolder`
    does not read (`OTHER_IMAGE_EXTENSIONS`) are appended to `left_out` when given."""
    files = []
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        names = [f for f in sorted(filenames) if not _hidden(f)]
        files += [Path(dirpath) / f for f in names if f.lower().endswith(IMAGE_EXTENSIONS)]
        if left_out is not None:
            left_out += [Path(dirpath) / f for f in names if f.lower().endswith(OTHER_IMAGE_EXTENSIONS)]
    return files


def folder_entries(root: Path) -> list[tuple[str, int]]:
    """Every image under `root` (sorted relative paths, `image_files`), labelled by the index of its first-level
    folder (-1 for images directly in `root`)."""
    index = {name: i for i, name in enumerate(class_folders(root))}
    entries = []
    for path in image_files(root):
        rel = path.relative_to(root)
        entries.append((str(rel), index[rel.parts[0]] if len(rel.parts) > 1 else -1))
    return entries


def annotation_entries(annotations: Path, classes: Path) -> list[tuple[str, int]]:
    """Tiny ImageNet's `val_annotations.txt`: `(file, class index)` per line, classes = sorted folders of `classes`."""
    index = {class_key(name): i for i, name in enumerate(class_folders(classes))}
    entries = []
    for number, line in enumerate(read_text(annotations, "the annotation file").splitlines(), start=1):
        if line.strip():
            if "\t" not in line:
                raise OODError(f"{annotations}:{number}: expected tab-separated '<file>\\t<wnid>\\t...' (Tiny ImageNet's "
                               f"val_annotations.txt), got {line!r}")
            name, wnid = line.split("\t")[:2]
            if class_key(wnid) not in index:
                raise DataNotFoundError(f"{annotations}:{number}: class {wnid!r} has no folder in {classes}")
            entries.append((name, index[class_key(wnid)]))
    return entries


@dataclass(frozen=True)
class SetSpec:
    """Where one image set lives (see the module docstring); paths relative to `data_dir` unless absolute."""

    imglist: str | None = None
    images: str = "images_classic"
    folder: str | None = None
    annotations: str | None = None
    classes: str | None = None
    torchvision: str | None = None
    root: str | None = None
    optional: bool = False
    how: str = ""
    keep_classes: str | None = None
    #: `eval` (the benchmark's evaluation transform) or `tensor` (to tensor and normalise only: images stored at the
    #: input size, OpenOOD's `ImageNetCPreProcessor` for ImageNet-C); file benchmarks only
    preprocess: Literal["eval", "tensor"] = "eval"
    #: a recipe of `ood.data.synthetic.RECIPES`, made from the images of `source` (a spec), `per_set` per set, `seed`
    synthetic: str | None = None
    source: SetSpec | None = None
    per_set: int = 2000
    seed: int = 0

    @classmethod
    def parse(cls, name: str, raw: SetSpec | Mapping[str, Any] | str) -> SetSpec:
        """A spec from its YAML mapping (a bare string is a folder); unknown keys name the valid ones."""
        if isinstance(raw, SetSpec):
            return raw
        if isinstance(raw, str):
            raw = {"folder": raw}
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"set {name!r}: unknown keys {sorted(unknown)}; valid keys: {sorted(known)}")
        raw = dict(raw)
        if raw.get("source") is not None:
            raw["source"] = cls.parse(f"{name}:source", raw["source"])
        spec = cls(**raw)
        if (spec.synthetic is None) != (spec.source is None):
            raise ConfigError(f"set {name!r}: `synthetic` and `source` go together (a recipe and the set it is made from)")
        if spec.synthetic is None and {"per_set", "seed"} & set(raw):  # else silently ignored
            raise ConfigError(f"set {name!r}: `per_set` and `seed` belong to a synthetic set ({{synthetic: ..., source: ...}})")
        if spec.synthetic is not None and spec.synthetic not in RECIPES:
            raise ConfigError(f"set {name!r}: unknown synthetic recipe {spec.synthetic!r}; choices: {sorted(RECIPES)}")
        if spec.synthetic is not None and len(spec.kinds) > 1:  # e.g. `++` merged into an imglist spec
            raise ConfigError(f"set {name!r}: a synthetic set is made from its `source` alone; it also gives "
                              f"{[k for k in spec.kinds if k != 'synthetic']} (replace the spec: '~<key>' '+<key>={{...}}')")
        if spec.source is not None and spec.source.synthetic is not None:
            raise ConfigError(f"set {name!r}: the source of synthetic sets cannot be synthetic itself")
        if spec.source is not None:  # the source's own `how` and `optional`, else the set's
            source = replace(spec.source, how=spec.source.how or spec.how, optional=spec.source.optional or spec.optional)
            spec = replace(spec, source=source)
        if spec.preprocess not in ("eval", "tensor"):
            raise ConfigError(f"set {name!r}: preprocess={spec.preprocess!r}; choices: ['eval', 'tensor']")
        if not spec.kinds:
            raise ConfigError(f"set {name!r} names no data; give one of {list(KINDS)}")
        return spec

    @property
    def kinds(self) -> list[Kind]:
        return [kind for kind in KINDS if getattr(self, kind) is not None]  # type: ignore[misc]

    def kind(self, prefer: Kind) -> Kind:
        """The kind read: `prefer` when the spec has it, else its first one."""
        return prefer if prefer in self.kinds else self.kinds[0]

    def torchvision_root(self, data_dir: Path) -> Path:
        assert self.torchvision is not None
        return resolve(data_dir, self.root or f"torchvision/{self.torchvision}")

    def missing(self, data_dir: Path, kind: Kind, images: bool = False) -> list[str]:
        """The files or folders this spec (read as `kind`) needs that are absent (torchvision checks its own); with
        `images`, of an image list that is there, also the images it lists that are not (`missing_images`)."""
        files, folders = {
            "imglist": ([self.imglist], [self.images]),
            "folder": ([], [self.folder]),
            "annotations": ([self.annotations], [self.images, self.classes]),
            "torchvision": ([], []),
            "synthetic": ([], []),
        }[kind]
        files = [*files, *([self.keep_classes] if self.keep_classes else [])]
        needed = [(resolve(data_dir, f), False) for f in files] + [(resolve(data_dir, f), True) for f in folders]
        absent = [f"{p}/" if is_dir else str(p) for p, is_dir in needed if not (p.is_dir() if is_dir else p.is_file())]
        if kind == "synthetic":
            assert self.source is not None
            absent += self.source.missing(data_dir, self.source.kinds[0], images)
        if images and kind == "imglist" and not absent:
            absent += self.missing_images(data_dir)
        return absent

    def missing_images(self, data_dir: Path) -> list[str]:
        """How many of the images this image list names are not on disk, and the first: asked before a run for the
        sets read after training (a missing OOD image stopped the evaluation after the whole train pass), a stat each."""
        root, listed = resolve(data_dir, self.images), resolve(data_dir, self.imglist)
        key = (str(listed), listed.stat().st_mtime_ns, str(root), self.keep_classes)
        if key in _COMPLETE_LISTS:  # `ood-train` prepares its data for training and again for the evaluation
            return []
        entries = subset_entries(read_imglist(listed), resolve(data_dir, self.keep_classes) if self.keep_classes else None)
        gone = [name for name, _ in entries if not (root / name).is_file()]
        if not gone:
            _COMPLETE_LISTS.add(key)
        return [f"{len(gone)} of the {len(entries)} images {listed} lists under {root}/ (the first: {gone[0]})"] if gone else []

    def open(
        self,
        data_dir: Path,
        kind: Kind,
        transform: Callable[[Image.Image], Any],
        label: int | None = None,
        torchvision: Mapping[str, TorchvisionBuilder] | None = None,
        wrap: Callable[[Dataset], Dataset] | None = None,
        num_classes: int | None = None,
    ) -> Dataset:
        """The dataset, read as `kind`; `label` overrides every label (-1 for OOD sets). A torchvision dataset is
        built from `torchvision[key]` and passed through `wrap` (which applies `transform`). A labelled folder
        (`label` None) must hold `num_classes` class folders, when given (csid sets), in an order that is theirs
        (`labelled_folder`). A synthetic set reads its source (as its first kind, not torchvision: a benchmark builds
        those) through the head of `transform`."""
        if kind == "synthetic":
            assert self.source is not None and self.synthetic is not None
            source = self.source.open(data_dir, self.source.kinds[0], decoding(transform))
            return synthetic_set(self.synthetic, source, transform, self.per_set, self.seed, -1 if label is None else label)
        keep = resolve(data_dir, self.keep_classes) if self.keep_classes else None
        if kind == "imglist":
            return ImageList(resolve(data_dir, self.imglist), resolve(data_dir, self.images), transform, label, keep)
        if kind == "folder":
            root = resolve(data_dir, self.folder)
            if label is None and keep is None and num_classes is not None:
                labelled_folder(root, num_classes)
            return ImageFiles(subset_entries(folder_entries(root), keep), root, transform, label=label)
        if kind == "annotations":
            entries = annotation_entries(resolve(data_dir, self.annotations), resolve(data_dir, self.classes))
            return ImageFiles(subset_entries(entries, keep), resolve(data_dir, self.images), transform, label=label)
        if keep is not None:
            raise ConfigError(f"keep_classes applies to image lists, folders and annotation files, not torchvision sets ({self.torchvision!r})")
        if torchvision is None or self.torchvision not in torchvision:
            raise ConfigError(f"unknown torchvision set {self.torchvision!r}; choices: {sorted(torchvision or {})}")
        assert wrap is not None
        return wrap(torchvision[self.torchvision](self.torchvision_root(data_dir), False))


def labelled_folder(root: Path, num_classes: int) -> None:
    """A folder labelled by its sorted class folders is labelled with the ID classes only when it holds one folder
    per class and their text order is their order: ImageNet-R's 200 of the 1000 classes, or ImageNet-V2's folders
    0..999 (text order 0, 1, 10, 100, ...), gave csid accuracies against the wrong classes, silently."""
    found = class_folders(root)
    numbered = all(c.isdigit() for c in found) and found != sorted(found, key=int)
    if len(found) != num_classes or numbered:
        why = (f"{len(found)} class folders for {num_classes} ID classes" if len(found) != num_classes else
               "class folders named by numbers, whose text order (0, 1, 10, ...) is not theirs")
        raise ConfigError(f"{root}: {why}: its labels (the index of each sorted class folder) would not be the ID "
                          "classes; give it as an image list {imglist: <file>} of '<path> <ID class index>' lines")


#: image lists found complete in this process (list file, its mtime, images root, class subset): not stat'ed again
_COMPLETE_LISTS: set[tuple[str, int, str, str | None]] = set()


def resolve(data_dir: Path, path: str | None) -> Path:
    """`path` under `data_dir` unless absolute."""
    assert path is not None
    p = Path(path).expanduser()
    return p if p.is_absolute() else data_dir / p


PROTOCOL_KEYS = ("near", "far", "val_ood", "csid", "id")
ID_KEYS = ("num_classes", "train", "val", "test")


@dataclass(frozen=True)
class Protocol:
    """One benchmark protocol: named near- and far-OOD test sets, an optional validation-OOD set, covariate-shifted
    ID sets (`csid`, labelled with the ID classes) and, optionally, its own ID task (`id`: `num_classes` and the
    `train` / `val` / `test` specs that replace the benchmark's)."""

    name: str
    near: dict[str, SetSpec]
    far: dict[str, SetSpec]
    val_ood: SetSpec | None = None
    csid: dict[str, SetSpec] = field(default_factory=dict)
    id: dict[str, Any] | None = None

    @classmethod
    def select(cls, protocols: Mapping[str, Any], name: str) -> Protocol:
        """Protocol `name` out of the benchmark's `protocols` mapping (its YAML), naming the choices if unknown."""
        if name not in protocols:
            raise ConfigError(f"unknown protocol {name!r}; choices: {sorted(protocols)}")
        raw = dict(protocols[name] or {})
        unknown = set(raw) - set(PROTOCOL_KEYS)
        if unknown:
            raise ConfigError(f"protocol {name!r}: unknown keys {sorted(unknown)}; valid keys: {', '.join(PROTOCOL_KEYS)}")
        groups = {g: {n: SetSpec.parse(n, s) for n, s in (raw.get(g) or {}).items()} for g in ("near", "far", "csid")}
        names = [n for g in groups.values() for n in g]
        clashes = sorted({n for n in names if names.count(n) > 1} | set(names) & {"train", "val", "test", "val_ood"})
        if clashes:
            raise ConfigError(f"protocol {name!r}: set names must be unique and not train/val/test/val_ood; got {clashes}")
        val_ood = raw.get("val_ood")
        ident = dict(raw["id"]) if raw.get("id") else None
        if ident is not None and set(ident) - set(ID_KEYS):
            raise ConfigError(f"protocol {name!r}: unknown id keys {sorted(set(ident) - set(ID_KEYS))}; valid: {list(ID_KEYS)}")
        return cls(name, groups["near"], groups["far"], SetSpec.parse("val_ood", val_ood) if val_ood else None,
                   groups["csid"], ident)

    @property
    def sets(self) -> list[tuple[str, Literal["near", "far"], SetSpec]]:
        """(name, group, spec) of every test OOD set, near first, in YAML order."""
        return [(n, "near", s) for n, s in self.near.items()] + [(n, "far", s) for n, s in self.far.items()]

    def all_specs(self) -> list[tuple[str, SetSpec]]:
        """Every (name, spec) the protocol reads, validation OOD included."""
        return [(n, s) for n, _, s in self.sets] + ([("val_ood", self.val_ood)] if self.val_ood else [])


def check_csid_labels(benchmark: str, name: str, dataset: Dataset, num_classes: int) -> None:
    """Refuse a covariate-shifted ID set with a label outside the `num_classes` ID classes (an OOD list's -1, a list of
    the 1000 ImageNet classes for a 200-class subset), naming it: its accuracy counted those images as wrong, silently.
    Sets without `targets` (torchvision's) are their classes' own."""
    targets = getattr(dataset, "targets", None)
    labels = {int(y) for y in targets} if targets is not None else set()  # a list, or a tensor (`or ()` raised)
    if outside := sorted(y for y in labels if not 0 <= y < num_classes):
        where = f" (listed in {dataset.list_file})" if isinstance(dataset, ImageList) else ""
        raise DataNotFoundError(f"{benchmark}: covariate-shifted ID set {name!r}{where}: label(s) {outside[:8]} are no "
                                f"ID class (the {num_classes} classes are 0..{num_classes - 1}); give it the ID class "
                                "index of each image")


def missing_csid_error(benchmark: str, protocol: str, data_dir: Path, missing: list[str]) -> DataNotFoundError:
    """The error for covariate-shifted ID sets that full-spectrum evaluation needs and that are not on disk."""
    return DataNotFoundError(
        f"{benchmark} ({protocol} protocol): full-spectrum evaluation (evaluation.fsood=true) needs its covariate-shifted "
        f"ID sets; missing under {data_dir}: {', '.join(missing)}"
    )


@functools.cache  # once per process: `csid_test` runs at prepare_data and again at setup
def warn_skipped_csid(benchmark: str, protocol: str, skipped: tuple[str, ...]) -> None:
    """Warn that `optional` covariate-shifted ID sets (`describe_missing` texts) are not on disk and are skipped: the
    full-spectrum rows then pool the ID test with the other csid sets only (OpenOOD's ImageNet-1K rows include
    ImageNet-ES). They were skipped silently, unlike a missing optional OOD set."""
    log.warning("%s (%s protocol): optional covariate-shifted ID set(s) %s not found: skipped; the full-spectrum rows "
                "pool the ID test with the other csid sets only, so they are not comparable with the protocol's "
                "published full-spectrum numbers", benchmark, protocol, ", ".join(skipped))


def describe_missing(name: str, spec: SetSpec, missing: list[str]) -> str:
    """`'<name>' (looked for a, b; <how>)` for a missing-data message."""
    return f"{name!r} (looked for {', '.join(missing)}" + (f"; {spec.how}" if spec.how else "") + ")"
