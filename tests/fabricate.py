"""Fabricated data trees and run presets shared by several test files (tests import them from here, never from
another test module): OpenOOD's CIFAR and ImageNet image-list layouts, the classic paper-protocol folders, and the
cluster method's seeded digits cases."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import scipy.io
import torch
from PIL import Image

from ood.features.bank import FeatureBank

# ----- OpenOOD v1.5 CIFAR layout ------------------------------------------------------------
# image set (a folder of images_classic/) -> (number of images, PIL mode, side)
SETS = {
    "cifar10_train": (20, "RGB", 32),
    "cifar10_test": (20, "RGB", 32),
    "cifar100_train": (20, "RGB", 32),
    "cifar100_test": (20, "RGB", 32),
    "tin_val": (8, "RGB", 64),
    "tin_test": (8, "RGB", 64),
    "tin597": (6, "RGB", 64),
    "mnist": (8, "L", 28),
    "svhn": (8, "RGB", 32),
    "texture": (8, "RGB", 48),
    "places365": (8, "RGB", 40),
}


NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


#: ID test images that OpenOOD's val_<id> list takes (the rest are test_<id>)
N_VAL = 10


def _images(root: Path, name: str, seed: int) -> list[str]:
    n, mode, side = SETS[name]
    rng = np.random.default_rng(seed)
    folder = root / "images_classic" / name
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        shape = (side, side) if mode == "L" else (side, side, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")
        paths.append(f"{name}/{i}.png")
    return paths


def _write(path: Path, entries: list[tuple[str, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{p} {label}\n" for p, label in entries))


def make_openood_tree(root: Path) -> Path:
    """Write the tree under `root` and return it (the `paths.data_dir` to use)."""
    images = {name: _images(root, name, seed) for seed, name in enumerate(SETS)}
    for id_name, near in (("cifar10", "cifar100"), ("cifar100", "cifar10")):
        c = NUM_CLASSES[id_name]
        lists = root / "benchmark_imglist" / id_name
        test = images[f"{id_name}_test"]
        _write(lists / f"train_{id_name}.txt", [(p, i % c) for i, p in enumerate(images[f"{id_name}_train"])])
        _write(lists / f"val_{id_name}.txt", [(p, i % c) for i, p in enumerate(test[:N_VAL])])
        _write(lists / f"test_{id_name}.txt", [(p, i % c) for i, p in enumerate(test[N_VAL:])])
        _write(lists / f"test_{near}.txt", [(p, -1) for p in images[f"{near}_test"]])
        _write(lists / "val_tin.txt", [(p, -1) for p in images["tin_val"]])
        _write(lists / "test_tin.txt", [(p, -1) for p in images["tin_test"]])
        _write(lists / "train_tin597.txt", [(p, -1) for p in images["tin597"]])
        for far in ("mnist", "svhn", "texture", "places365"):
            _write(lists / f"test_{far}.txt", [(p, -1) for p in images[far]])
    return root


E2E = [
    "backbone=resnet18_32x32", "data.download=false", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "data.num_workers=0",
    "data.pin_memory=false", "data.batch_size=16", "data.eval_batch_size=64", "detectors.names=[msp,knn]",
    "+trainer.num_sanity_val_steps=0", "+trainer.limit_val_batches=0",
]


# ----- paper protocols and OpenOOD ImageNet layout ------------------------------------------------------------
RNG = np.random.default_rng(0)


def save_image(path: Path, side: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)


def image_folder(root: Path, sub: str, n: int, side: int = 32, ext: str = "jpg") -> None:
    for i in range(n):
        save_image(root / sub / f"{i:03d}.{ext}", side)


def _svhn(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    x = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    scipy.io.savemat(folder / "test_32x32.mat", {"X": x, "y": (np.arange(n) % 10 + 1)[:, None]})


def _cifar_pickles(folder: Path, test_name: str, meta_name: str, label_key: str, meta_key: str, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: [i % 10 for i in range(n)]}
    (folder / test_name).write_bytes(pickle.dumps(data))
    (folder / meta_name).write_bytes(pickle.dumps({meta_key: [f"c{i}" for i in range(100)]}))


#: set -> number of fabricated images (distinct, so every row's n_ood is checked)
CLASSIC = {"texture": 5, "svhn": 6, "places365": 7, "lsun_crop": 4, "lsun_resize": 3, "isun": 5}


OODFORMER = {"cifar100": 9, "imagenet_resize": 4, "lsun_resize": 3, "svhn": 8}


def make_paper_tree(root: Path) -> Path:
    """OpenOOD's CIFAR tree (the ID sets) plus the classic and OODformer OOD folders, in their papers' layouts."""
    make_openood_tree(root)
    for cls in ("banded", "braided"):
        image_folder(root / "dtd/images", cls, [3, 2][cls == "braided"], side=48)
    _svhn(root / "svhn", CLASSIC["svhn"])
    image_folder(root / "places365", "abbey", 4, side=40)
    image_folder(root / "places365", "airfield", 3, side=40)
    image_folder(root / "LSUN_C", "test", CLASSIC["lsun_crop"], side=36)
    image_folder(root / "LSUN_resize", "LSUN_resize", CLASSIC["lsun_resize"])
    image_folder(root / "iSUN", "iSUN_patches", CLASSIC["isun"], ext="jpeg")
    _cifar_pickles(root / "cifar100-data/cifar-100-python", "test", "meta", "fine_labels", "fine_label_names", OODFORMER["cifar100"])
    _cifar_pickles(root / "cifar10-data/cifar-10-batches-py", "test_batch", "batches.meta", "labels", "label_names", 7)
    image_folder(root / "Imagenet_resize", "Imagenet_resize", OODFORMER["imagenet_resize"])
    _svhn(root / "svhn-data", OODFORMER["svhn"])
    return root


# ----- ImageNet-1K / ImageNet-200 (OpenOOD v1.5 files) -------------------------------------------------------------
# `ood-eval data=imagenet1k backbone=resnet50 backbone.weights=... method=grood` end to end: tests/test_reproduce.py
IMAGENET_OOD = {"ssb_hard": ("near", 3), "ninco": ("near", 2), "inaturalist": ("far", 4), "textures": ("far", 3),
                "openimage_o": ("far", 2)}


def make_openood_imagenet_tree(root: Path, every_class: bool = False) -> Path:
    """OpenOOD's ImageNet-1K and ImageNet-200 lists over images_largescale/ and images_classic/ (textures); with
    `every_class` the train lists name all 1000 / 200 classes (GROOD's class prototypes need each), repeating files."""
    def images(base: str, sub: str, n: int) -> list[str]:
        image_folder(root / base, sub, n, side=40)
        return [f"{sub}/{i:03d}.jpg" for i in range(n)]

    def write(path: Path, paths: list[str], labels: list[int]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{p} {y}\n" for p, y in zip(paths, labels)))

    lists = root / "benchmark_imglist"
    for split, n in (("train", 8), ("val", 4), ("test", 6)):
        paths = images("images_largescale", f"imagenet_1k/{split}", n)
        for folder, classes in (("imagenet", 1000), ("imagenet200", 200)):
            count = classes if split == "train" and every_class else n
            write(lists / f"{folder}/{split}_{folder}.txt", [paths[i % n] for i in range(count)], list(range(count)))
    for name, (_, n) in IMAGENET_OOD.items():
        base = "images_classic" if name == "textures" else "images_largescale"
        paths = images(base, "texture" if name == "textures" else name, n)
        for folder in ("imagenet", "imagenet200"):
            write(lists / f"{folder}/test_{name}.txt", paths, [-1] * n)
    val_ood = images("images_largescale", "openimage_o_val", 3)
    for folder in ("imagenet", "imagenet200"):
        write(lists / f"{folder}/val_openimage_o.txt", val_ood, [-1] * 3)
    return root


# ----- seeded cluster runs on digits ------------------------------------------------------------
# ----- end to end on digits -------------------------------------------------------------------------------------
SHORT = ["trainer.max_epochs=5", "method.probe_epochs=2"]  # 3 contrastive epochs, then 2 probe epochs
DIGITS = ["trainer.enable_progress_bar=false", "detectors=none", "method=cluster", "seed=0", "backbone.width=16"]


CASES = {  # objective: (overrides, near AUROC floor, far mean AUROC floor); measured 0.90/0.97, 0.94/1.0, 0.85/1.0
    "ce": (["method.objective=ce", "trainer.max_epochs=4", "method.distance=cosine"], 0.85, 0.9),
    "supcon": (["method.objective=supcon", *SHORT, "method.distance=euclidean", "method.threshold=per_cluster"], 0.85, 0.95),
    "simclr": (["method.objective=simclr", *SHORT, "method.clusters=kmeans", "method.k=12", "method.distance=mahalanobis"], 0.8, 0.95),
}


# ----- synthetic feature banks (detector contract tests) ---------------------------------------------------------
SYNTHETIC_CLASSES, SYNTHETIC_DIM = 4, 16
C, D = SYNTHETIC_CLASSES, SYNTHETIC_DIM


def feature_bank(features: torch.Tensor, labels: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor) -> FeatureBank:
    return FeatureBank(logits=features @ weight.T + bias, features=features, labels=labels, weight=weight, bias=bias)


def synthetic_banks() -> dict[str, FeatureBank]:
    """ReLU-like features: ID rows are one strong class block plus noise, OOD rows weak and unstructured."""
    gen = torch.Generator().manual_seed(0)
    block = torch.zeros(C, D)
    for c in range(C):
        block[c, c * (D // C) : (c + 1) * (D // C)] = 3.0
    weight, bias = block / 3.0, torch.zeros(C)

    def id_split(n: int) -> FeatureBank:
        y = torch.arange(n) % C
        h = (block[y] + 0.5 * torch.randn(n, D, generator=gen)).clamp_min(0)
        return feature_bank(h, y, weight, bias)

    def ood_split(n: int) -> FeatureBank:
        h = (0.3 + 0.6 * torch.randn(n, D, generator=gen)).clamp_min(0)
        return feature_bank(h, None, weight, bias)

    return {"train": id_split(400), "val": id_split(120), "val_ood": ood_split(120), "test": id_split(200), "ood": ood_split(200)}


#: classes and feature dimension of the reference-comparison banks (`centred_banks`)
REF_CLASSES, REF_DIM = 6, 32


def centred_banks(seed: int, sizes: dict[str, int], ood_labelled: bool) -> dict[str, FeatureBank]:
    """ReLU features around a class centre each (ID splits) or around the mean centre (the split named `ood`); a head
    roughly aligned with the centres (most, not all, samples classified correctly); `sizes`: split -> rows; the OOD
    split keeps its cycling labels when `ood_labelled`, else none."""
    gen = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(REF_CLASSES, REF_DIM, generator=gen).relu()
    w = (centres + torch.randn(REF_CLASSES, REF_DIM, generator=gen)) / REF_DIM**0.5
    b = 0.1 * torch.randn(REF_CLASSES, generator=gen)

    def split(n: int, ood: bool) -> FeatureBank:
        y = torch.arange(n) % REF_CLASSES
        mean = centres.mean(0) if ood else centres[y]
        h = (mean + (1.5 if ood else 1.0) * torch.randn(n, REF_DIM, generator=gen)).relu()
        return FeatureBank(logits=h @ w.T + b, features=h, labels=y if ood_labelled or not ood else None, weight=w, bias=b)

    return {name: split(n, name == "ood") for name, n in sizes.items()}
