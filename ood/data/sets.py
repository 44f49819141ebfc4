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
  ...) reading torchvision's own files under `root` (default `torchvision/<key>`).

A spec may give both `imglist` and `torchvision` (OpenOOD v1.5's sets: OpenOOD's lists when present, torchvision
otherwise); `how` says how to get the data (printed when it is missing); `optional: true` skips a missing set with a
warning instead of failing. A *protocol* is `{near: {name: spec}, far: {name: spec}, val_ood: spec | null}`; a
user adds a set by naming its folder or list, e.g. `+data.benchmark.protocols.classic.far.mine={folder: my_ood}`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from torch.utils.data import Dataset

from ood.data.imglist import ImageFiles, ImageList
from ood.errors import ConfigError, DataNotFoundError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
KINDS = ("imglist", "folder", "annotations", "torchvision")
#: `(root, download) -> dataset of (PIL image, label)`
TorchvisionBuilder = Callable[[Path, bool], Dataset]
Kind = Literal["imglist", "folder", "annotations", "torchvision"]


def class_folders(root: Path) -> list[str]:
    """Sorted names of the sub-folders of `root` (torchvision `ImageFolder`'s class order)."""
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


def folder_entries(root: Path) -> list[tuple[str, int]]:
    """Every image under `root` (sorted relative paths), labelled by the index of its first-level folder
    (-1 for images directly in `root`)."""
    index = {name: i for i, name in enumerate(class_folders(root))}
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        label = index[rel.parts[0]] if rel.parts else -1
        entries += [(str(rel / f), label) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return entries


def annotation_entries(annotations: Path, classes: Path) -> list[tuple[str, int]]:
    """Tiny ImageNet's `val_annotations.txt`: `(file, class index)` per line, classes = sorted folders of `classes`."""
    index = {name: i for i, name in enumerate(class_folders(classes))}
    entries = []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if line.strip():
            name, wnid = line.split("\t")[:2]
            if wnid not in index:
                raise DataNotFoundError(f"{annotations}:{number}: class {wnid!r} has no folder in {classes}")
            entries.append((name, index[wnid]))
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
        spec = cls(**dict(raw))
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

    def missing(self, data_dir: Path, kind: Kind) -> list[str]:
        """The files or folders this spec (read as `kind`) needs that are absent (torchvision checks its own)."""
        files, folders = {
            "imglist": ([self.imglist], [self.images]),
            "folder": ([], [self.folder]),
            "annotations": ([self.annotations], [self.images, self.classes]),
            "torchvision": ([], []),
        }[kind]
        needed = [(resolve(data_dir, f), False) for f in files] + [(resolve(data_dir, f), True) for f in folders]
        return [f"{p}/" if is_dir else str(p) for p, is_dir in needed if not (p.is_dir() if is_dir else p.is_file())]

    def open(
        self,
        data_dir: Path,
        kind: Kind,
        transform: Callable[[Image.Image], Any],
        label: int | None = None,
        torchvision: Mapping[str, TorchvisionBuilder] | None = None,
        wrap: Callable[[Dataset], Dataset] | None = None,
    ) -> Dataset:
        """The dataset, read as `kind`; `label` overrides every label (-1 for OOD sets). A torchvision dataset is
        built from `torchvision[key]` and passed through `wrap` (which applies `transform`)."""
        if kind == "imglist":
            return ImageList(resolve(data_dir, self.imglist), resolve(data_dir, self.images), transform, label=label)
        if kind == "folder":
            root = resolve(data_dir, self.folder)
            return ImageFiles(folder_entries(root), root, transform, label=label)
        if kind == "annotations":
            entries = annotation_entries(resolve(data_dir, self.annotations), resolve(data_dir, self.classes))
            return ImageFiles(entries, resolve(data_dir, self.images), transform, label=label)
        if torchvision is None or self.torchvision not in torchvision:
            raise ConfigError(f"unknown torchvision set {self.torchvision!r}; choices: {sorted(torchvision or {})}")
        assert wrap is not None
        return wrap(torchvision[self.torchvision](self.torchvision_root(data_dir), False))


def resolve(data_dir: Path, path: str | None) -> Path:
    """`path` under `data_dir` unless absolute."""
    assert path is not None
    p = Path(path).expanduser()
    return p if p.is_absolute() else data_dir / p


@dataclass(frozen=True)
class Protocol:
    """One benchmark protocol: named near- and far-OOD test sets and an optional validation-OOD set."""

    name: str
    near: dict[str, SetSpec]
    far: dict[str, SetSpec]
    val_ood: SetSpec | None = None

    @classmethod
    def select(cls, protocols: Mapping[str, Any], name: str) -> Protocol:
        """Protocol `name` out of the benchmark's `protocols` mapping (its YAML), naming the choices if unknown."""
        if name not in protocols:
            raise ConfigError(f"unknown protocol {name!r}; choices: {sorted(protocols)}")
        raw = dict(protocols[name] or {})
        unknown = set(raw) - {"near", "far", "val_ood"}
        if unknown:
            raise ConfigError(f"protocol {name!r}: unknown keys {sorted(unknown)}; valid keys: near, far, val_ood")
        groups = {g: {n: SetSpec.parse(n, s) for n, s in (raw.get(g) or {}).items()} for g in ("near", "far")}
        val_ood = raw.get("val_ood")
        return cls(name, groups["near"], groups["far"], SetSpec.parse("val_ood", val_ood) if val_ood else None)

    @property
    def sets(self) -> list[tuple[str, Literal["near", "far"], SetSpec]]:
        """(name, group, spec) of every test OOD set, near first, in YAML order."""
        return [(n, "near", s) for n, s in self.near.items()] + [(n, "far", s) for n, s in self.far.items()]

    def all_specs(self) -> list[tuple[str, SetSpec]]:
        """Every (name, spec) the protocol reads, validation OOD included."""
        return [(n, s) for n, _, s in self.sets] + ([("val_ood", self.val_ood)] if self.val_ood else [])


def describe_missing(name: str, spec: SetSpec, missing: list[str]) -> str:
    """`'<name>' (looked for a, b; <how>)` for a missing-data message."""
    return f"{name!r} (looked for {', '.join(missing)}" + (f"; {spec.how}" if spec.how else "") + ")"
