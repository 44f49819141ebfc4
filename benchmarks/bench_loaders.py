"""(e) CIFAR-style input pipelines on the same fabricated 32 px PNGs (an OpenOOD image list), CPU, one process:
the in-memory uint8 path (`ood.data.memory`: batched gather + normalisation, per-sample crop and flip applied per
batch as the DataModule does on the device) vs the per-item PIL path (decode + torchvision transforms per image,
OpenOOD's pipeline), for the training loader (shuffled, augmented, batch 128) and an evaluation loader (batch 512).
The cache is built once before timing (as after a first run); both loaders yield the same `Batch`es.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import Timing, scratch_dir, time_alternating
from ood.data.batch import collate_batch
from ood.data.benchmark import Indexed
from ood.data.cifar import CIFAR10Benchmark
from ood.data.imglist import ImageList
from ood.data.memory import batch_augmentation, to_memory


def fabricate(root: Path, n: int, seed: int = 0) -> Path:
    """`n` random 32x32 RGB PNGs under `root/images/` and their list file; returns the list."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        lines.append(f"{i}.png {i % 10}\n")
    (root / "train.txt").write_text("".join(lines))
    return root / "train.txt"


def epoch(dataset: Dataset, batch_size: int, shuffle: bool) -> Callable[[], int]:
    """One pass over a loader built as `OODDataModule` builds them, applying the in-memory augmentation per batch."""
    loader = DataLoader(Indexed(dataset), batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, collate_fn=collate_batch)
    augment = batch_augmentation(dataset)

    def go() -> int:
        seen = 0
        for batch in loader:
            x = augment(batch.x) if augment is not None else batch.x
            seen += x.shape[0]
        return seen

    return go


def run(n: int, repeats: int) -> list[Timing]:
    root = scratch_dir("ood-bench-loaders-")
    list_file = fabricate(root, n)
    bench = CIFAR10Benchmark(root)
    timings = []
    for task, transform, batch_size, shuffle, target in (
        ("training loader (flip + padded crop, batch 128)", bench.train_transform(), 128, True, 0.1),
        ("evaluation loader (batch 512)", bench.eval_transform(), 512, False, 1 / 3),
    ):
        per_item = ImageList(list_file, root / "images", transform)
        memory = to_memory(per_item, root / "ood_cache")
        t_mem, t_pil = time_alternating([epoch(memory, batch_size, shuffle), epoch(per_item, batch_size, shuffle)], repeats)
        name = f"(e) {task}, {n:,} 32 px PNGs: in-memory {n / t_mem:,.0f} img/s vs PIL {n / t_pil:,.0f} img/s"
        timings.append(Timing(name, t_mem, t_pil, target, "per-item PIL"))
    return timings
