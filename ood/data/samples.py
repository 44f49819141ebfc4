"""What each evaluated item is: its image file, so per-image scores can be traced back to the images.

`item_name(dataset, i)` names item `i` of an evaluation dataset: the image file of folder sets, image lists and
torchvision `ImageFolder`-style datasets (`samples` / `imgs`), `<array.npy>[row]` for an image array, what a dataset's
own `describe(i)` says (a user's Dataset: `<set>[i]`), through `Subset`, `ConcatDataset` and wrappers that describe
their items by their source's (`Transformed`); None for items held only in memory (the embedded digits tensors, the
CIFAR binary batches), which are known by their row alone.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from torch.utils.data import ConcatDataset, Dataset, Subset


def item_name(dataset: Dataset, i: int) -> str | None:
    """The image file (or array row) of item `i` of `dataset`; None when it has neither."""
    while True:
        if isinstance(dataset, Subset):
            dataset, i = dataset.dataset, int(dataset.indices[i])
        elif isinstance(dataset, ConcatDataset):
            part = bisect.bisect_right(dataset.cumulative_sizes, i)
            i -= dataset.cumulative_sizes[part - 1] if part else 0
            dataset = dataset.datasets[part]
        else:
            break
    describe = getattr(dataset, "describe", None)
    if callable(describe):
        return describe(i)
    files = getattr(dataset, "samples", None) or getattr(dataset, "imgs", None)
    if isinstance(files, Sequence) and len(files) == len(dataset) and isinstance(files[i], tuple):  # type: ignore[arg-type]
        return str(files[i][0])
    return None


def item_names(dataset: Dataset, rows: Sequence[int], set_name: str) -> list[str]:
    """`item_name` of each of `rows`; an item without a file is `<set_name>[row]`."""
    return [item_name(dataset, int(r)) or f"{set_name}[{int(r)}]" for r in rows]
