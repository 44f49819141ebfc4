"""OpenOOD image lists, read as-is: `benchmark_imglist/<id>/<list>.txt` with lines `<path> <label>`.

Paths are relative to the image root (`images_classic/` for the CIFAR benchmarks); OOD lines carry label -1, and a
line with a path only (ImageNet-OOD's `imagenetood.txt`) is an unlabelled image (-1).
Using OpenOOD's exact lists is what makes numbers comparable with its leaderboard. Images are opened with PIL
and converted to RGB (grey MNIST becomes 3 identical channels), as OpenOOD's `ImglistDataset` does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from ood.data.hygiene import load_image
from ood.errors import DataNotFoundError, OODError

#: a class index in a list line
LABEL = re.compile(r"-?\d+")
#: the last word of a path-only line whose path holds spaces: a file name with an extension (`cat 1.png`)
FILE_NAME = re.compile(r"\S*\.[A-Za-z]\w*")


def read_text(path: Path, what: str) -> str:
    """The text of `path`, UTF-8 (a byte-order mark dropped); a file of another encoding, or no text at all (an image
    or archive named in its place), is one line naming it and the first bad byte, not Python's UnicodeDecodeError."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise OODError(f"{path}: {what} is not UTF-8 text (byte {err.start} is {err.object[err.start:err.start + 1]!r}); "
                       "save it as UTF-8, or check that it is the text file meant") from None


def read_imglist(path: str | Path) -> list[tuple[str, int]]:
    """`(relative path, label)` per non-empty line of an OpenOOD list file; path and label are split at the first
    run of spaces or tabs (the lines of a tab-separated list were read as paths without a label), or at the last one
    when the path holds spaces (`My Photos/cat 1.jpg 3`); a line whose last word is a file name is a path alone
    (`My Photos/cat 1.jpg`: unlabelled, -1). A UTF-8 byte-order mark (Windows Notepad's) is not part of
    the first path, and Windows' backslashes separate folders (`train\\cat\\1.jpg` was one file name)."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"image list not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    entries = []
    for number, line in enumerate(read_text(path, "the image list").splitlines(), start=1):
        if not line.strip():
            continue
        name, *label = line.split(maxsplit=1)
        if label and not LABEL.fullmatch(label[0].strip()):
            name, label = line.strip().rsplit(maxsplit=1)[0], line.split()[-1:]
            if FILE_NAME.fullmatch(label[0]):
                name, label = line.strip(), []
            elif not LABEL.fullmatch(label[0]):
                raise OODError(f"{path}:{number}: expected '<path> <integer label>', got {line!r}")
        entries.append((name.replace("\\", "/"), int(label[0]) if label else -1))
    if not entries:  # an empty set scored nothing, or failed later without naming the file
        raise OODError(f"{path}: the image list is empty; it needs one '<path> <label>' line per image")
    return entries


def check_id_labels(path: Path, num_classes: int) -> None:
    """Refuse an ID list with a label outside 0..num_classes-1 (an OOD line's -1, another dataset's list), naming the
    file and its first such line: read as-is it failed training with an IndexError (a device assert on a GPU), or
    scored the test accuracy against classes the model has not."""
    entries = read_imglist(path)
    if bad := [(name, label) for name, label in entries if not 0 <= label < num_classes]:
        raise DataNotFoundError(f"{path}: {len(bad)} of its {len(entries)} lines have a label outside the "
                                f"{num_classes} ID classes 0..{num_classes - 1} (the first: {bad[0][0]!r} {bad[0][1]}); "
                                "is it the ID list of this dataset?")


def subset_entries(entries: list[tuple[str, int]], classes_file: Path | None) -> list[tuple[str, int]]:
    """The entries whose label is listed in `classes_file` (one class index a line), relabelled by the line's
    position (a class subset, e.g. ImageNet-X's half of ImageNet-1K); all entries when `classes_file` is None."""
    if classes_file is None:
        return entries
    if not classes_file.is_file():
        raise DataNotFoundError(f"class list not found: {classes_file}")
    tokens = read_text(classes_file, "the class list").split()
    if bad := [t for t in tokens if not LABEL.fullmatch(t)]:
        raise OODError(f"{classes_file}: expected one class index (an integer) a line, got {bad[0]!r}")
    if not tokens:
        raise OODError(f"{classes_file}: the class list is empty; it needs one class index a line")
    listed = [int(token) for token in tokens]
    index = {c: i for i, c in enumerate(listed)}
    if len(index) != len(listed):
        raise OODError(f"{classes_file}: a class index is listed twice")
    return [(name, index[label]) for name, label in entries if label in index]


def load_rgb(path: Path) -> Image.Image:
    """Open an image file as RGB, decoded as the folder sets are (`hygiene.load_image`); a missing file is a
    `DataNotFoundError` naming it, an undecodable one a `BadImageError` naming it."""
    if not path.is_file():
        raise DataNotFoundError(f"image not found: {path}")
    return load_image(path, hint="")


class ImageFiles(Dataset):
    """`(transform(RGB image), label)` for `(relative path, label)` entries under `root`; `label` overrides all
    labels (-1 for OOD sets, whatever the source says)."""

    #: where the entries come from, for messages (`ImageList`: its list file)
    source = ""

    def __init__(
        self,
        entries: list[tuple[str, int]],
        root: str | Path,
        transform: Callable[[Image.Image], Any],
        label: int | None = None,
    ) -> None:
        self.entries = entries
        self.root = Path(root)
        self.transform = transform
        self.label = label

    @property
    def targets(self) -> list[int]:
        """Labels of every item, in order (without reading images)."""
        return [label if self.label is None else self.label for _, label in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        name, label = self.entries[i]
        try:  # load_rgb's stat alone: a second one per read was 1.28 M more an ImageNet epoch
            image = load_rgb(self.root / name)
        except DataNotFoundError as err:
            raise DataNotFoundError(f"{err} (missing: {self.missing()} of the {len(self)} images{self.source})") from None
        return self.transform(image), (label if self.label is None else self.label)

    def describe(self, i: int) -> str:
        return str(self.root / self.entries[i][0])

    def missing(self) -> int:
        """How many entries name no file (a stat each: asked only once one is missing, to tell a file to fetch again
        from a wrong images root, where all are)."""
        return sum(not (self.root / name).is_file() for name, _ in self.entries)


class ImageList(ImageFiles):
    """The images of one OpenOOD list under `root`, as `(transform(image), label)`.

    Args:
        list_file: the `.txt` list.
        root: the folder the listed paths are relative to (OpenOOD's `images_classic/`).
        transform: PIL image -> tensor.
        label: when given, every item gets this label (-1 for OOD sets, whatever the file says).
        keep_classes: a file of class indices (one a line): only the listed classes are kept, relabelled by their
            position in it (`subset_entries`).
    """

    def __init__(
        self,
        list_file: str | Path,
        root: str | Path,
        transform: Callable[[Image.Image], Any],
        label: int | None = None,
        keep_classes: str | Path | None = None,
    ) -> None:
        self.list_file = Path(list_file)
        self.source = f" listed in {self.list_file}"
        self.keep_classes = None if keep_classes is None else Path(keep_classes)
        super().__init__(subset_entries(read_imglist(self.list_file), self.keep_classes), root, transform, label)
