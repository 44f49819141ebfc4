"""OAL's frozen teacher: where it comes from (a given weights file, or trained here on ID train and cached) and its
features of the ID training set (cached by the teacher file's content).

Used by `ood.methods.oal.OAL.prepare`; nothing here reads a trainer. Teacher training (when `method.teacher.ckpt`
is null): plain cross-entropy, SGD Nesterov (momentum 0.9, weight decay 5e-4), cosine over `epochs`, shuffled
batches of `batch_size` from a generator seeded by (seed, epoch), built and trained under the global seed `seed`
inside `torch.random.fork_rng` (its initial weights are the seed's; the run's own random stream is the same whether
the teacher was cached or not). The
released code trains its ViT teacher separately; a teacher that must be trained elsewhere (the ViT) comes from
`ckpt`. Files: `<cache_dir>/oal/teacher-<benchmark>-<hash of the teacher settings>.pt` (rank 0 trains and writes;
the other ranks wait for the file, not in a collective, whose timeout a long teacher training would exceed) and `<cache_dir>/oal/features-<benchmark>-<SHA-256 of the teacher file>.pt`, both
written with the project's one atomic writer (`ood.files.atomic_torch_save`). Teacher features come from the shared
pass (`ood.features.passes.forward_dataset`: eval mode, no gradients, the run's device and dtype).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ood.data.fit import FitData
from ood.errors import ConfigError
from ood.files import atomic_torch_save, atomic_write_text
from ood.models.base import Backbone
from ood.utils import get_logger

log = get_logger(__name__)

#: the keys of `method.teacher` (the `method/teacher=` config group)
TEACHER_KEYS = {"backbone", "ckpt", "source", "epochs", "lr", "batch_size", "seed"}


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (the key of the teacher-feature cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def train_teacher(teacher: Backbone, dataset: Dataset, epochs: int, lr: float, batch_size: int, seed: int) -> None:
    """Plain CE training of the teacher (module doc); leaves it in eval mode."""
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(teacher.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    device = next(teacher.parameters()).device
    teacher.train()
    for epoch in range(epochs):
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen, drop_last=True):
            loss = F.cross_entropy(teacher(x.to(device)), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    teacher.eval()


def wait_for_file(path: Path, failed: Path, what: str, poll: float = 2.0) -> None:
    """Return once `path` exists; raise with its text once `failed` exists. A wait on the file system, so that a
    rank waiting longer than the process group's timeout (30 minutes by default) is not killed by it."""
    start = time.monotonic()
    said = 0
    while not path.is_file():
        if failed.is_file():
            raise RuntimeError(f"stopped waiting for {what}: it failed ({failed.read_text()})")
        minutes = int((time.monotonic() - start) // 60)
        if minutes > said:
            log.info("waiting for %s: %d min", what, minutes)
            said = minutes
        time.sleep(poll)


def teacher_file(cfg: Mapping[str, Any], data: FitData, cache_dir: Path) -> tuple[Path, float | None]:
    """The teacher checkpoint: `cfg["ckpt"]`, or a teacher trained here on ID train (rank 0) and cached by its
    settings; with the training time in seconds when it was trained now (else None)."""
    if cfg.get("ckpt"):
        return Path(cfg["ckpt"]), None
    if not cfg.get("epochs"):
        raise ConfigError("oal: this teacher is not trained here: set method.teacher.ckpt=<weights file>")
    train = data.datasets["train_augmented"]
    settings = {k: str(cfg.get(k)) for k in sorted(TEACHER_KEYS - {"ckpt"})}
    # `init`: the starting weights are drawn from `seed` (before, from the run's stream: older files differ)
    settings.update(data=data.benchmark, n=len(train), classes=data.num_classes, init="seed")  # type: ignore[arg-type]
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / "oal" / f"teacher-{data.benchmark}-{key}.pt"
    failed = path.with_suffix(".failed")
    seconds = None
    if data.is_global_zero:
        failed.unlink(missing_ok=True)
    data.barrier()  # no rank reads a failure left by an earlier run
    if data.is_global_zero and not path.is_file():
        log.info("oal: no method.teacher.ckpt; training the teacher on %s for %s epochs", data.benchmark, cfg["epochs"])
        start = time.perf_counter()
        try:
            # built inside too: its initial weights are drawn from the teacher's seed, not from the run's stream,
            # which then is the same whether the teacher was trained here or read from the cache
            with torch.random.fork_rng(devices=[data.device] if data.device.type == "cuda" else []):
                torch.manual_seed(int(cfg.get("seed") or 0))
                teacher = cfg["backbone"](num_classes=data.num_classes).to(data.device)
                train_teacher(teacher, train, int(cfg["epochs"]), float(cfg["lr"]), int(cfg["batch_size"]),
                              int(cfg.get("seed") or 0))
            atomic_torch_save(teacher.state_dict(), path)
        except BaseException as err:
            atomic_write_text(failed, f"{type(err).__name__}: {err}")  # a waiting rank never reads it half-written
            raise
        seconds = time.perf_counter() - start
    elif not data.is_global_zero:
        wait_for_file(path, failed, "rank 0 to train the oal teacher")
    data.barrier()
    log.info("oal: teacher %s (evaluate it alone: ood-eval ckpt_path=%s backbone=<its architecture>)", path, path)
    return path, seconds


def features_cache(path: Path, data: FitData, cache_dir: Path) -> Path:
    """The cache file of the teacher's ID-train features: keyed by the teacher file's SHA-256 and by what the pass
    reads (the train set's length and normalisation, its first and last images as preprocessed: their size and
    pixels; not the other images), so that another `data.benchmark.image_size` or `mean` / `std` does not read
    features of other inputs."""
    train = data.datasets["train"]
    # the normalisation too: an in-memory benchmark's items are its stored pixels, normalised on the device
    digest = hashlib.sha256(f"{file_sha256(path)} {len(train)} {data.input_mean} {data.input_std}".encode())
    for i in {0, len(train) - 1}:
        image = torch.as_tensor(train[i][0]).contiguous()
        digest.update(f"{tuple(image.shape)} {image.dtype}".encode() + image.numpy().tobytes())
    return cache_dir / "oal" / f"features-{data.benchmark}-{digest.hexdigest()[:16]}.pt"


def teacher_features(teacher: Backbone, path: Path, data: FitData, cache_dir: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """`{"features", "labels"}` of the teacher over ID train (no augmentation, CPU), cached (`features_cache`); and
    whether they came from the cache."""
    cache = features_cache(path, data, cache_dir)
    if cache.is_file():
        return torch.load(cache, map_location="cpu"), True
    out = data.forward(lambda x: teacher.run(x).features.float().cpu(), data.datasets["train"], teacher,
                       "oal: teacher features")
    features = {"features": out["outputs"], "labels": out["labels"].cpu()}
    if data.is_global_zero:
        atomic_torch_save(features, cache)
    return features, False
