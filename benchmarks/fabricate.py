"""Fabricated OpenOOD v1.5 benchmark trees (no downloads): the exact on-disk layout of OpenOOD's download script,
filled with small synthetic images, for the GPU check, the end-to-end benchmark and the parity test.

`cifar_tree(root, ...)` writes `images_classic/<set>/<i>.png` and `benchmark_imglist/<cifar10|cifar100>/<list>.txt`
(lines `<path relative to images_classic> <label>`, -1 for OOD): ID train / val / test, near (cifar100|cifar10,
tin), far (mnist grey 28 px, svhn, texture 48 px, places365 40 px), `val_tin` (validation OOD) and `train_tin597`
(outliers). `imagenet_tree(root, ...)` writes the ImageNet-200 / ImageNet-1K lists over `images_largescale/` and
`images_classic/` (textures). ID images are learnable: class c is a fixed random colour pattern plus noise, each
OOD set has patterns of its own, so a short training separates them a little (scores are not constant).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: OOD image sets of OpenOOD's CIFAR benchmark: name -> (PIL mode, side)
CIFAR_OOD = {"tin_val": ("RGB", 64), "tin_test": ("RGB", 64), "tin597": ("RGB", 64), "mnist": ("L", 28),
             "svhn": ("RGB", 32), "texture": ("RGB", 48), "places365": ("RGB", 40)}
IMAGENET_OOD = {"ssb_hard": "images_largescale", "ninco": "images_largescale", "inaturalist": "images_largescale",
                "textures": "images_classic", "openimage_o": "images_largescale"}


def _patterns(rng: np.random.Generator, n: int, side: int, channels: int) -> np.ndarray:
    """`n` smooth random patterns [n, side, side, channels] in 0..255 (4x4 blocks upsampled)."""
    coarse = rng.uniform(0, 255, (n, 4, 4, channels))
    return np.kron(coarse, np.ones((1, -(-side // 4), -(-side // 4), 1)))[:, :side, :side]


def _save_set(root: Path, folder: str, name: str, labels: list[int], side: int, mode: str, seed: int,
              ext: str = "png", patterns_of: int | None = None) -> list[str]:
    """Images of `labels` (class c: pattern c + noise) under `root/folder/name/`; paths relative to `root/folder`.
    `patterns_of`: the seed of another set whose class patterns these images share (an ID test set those of its
    train set), else the patterns are this set's own."""
    rng = np.random.default_rng(seed)
    channels = 1 if mode == "L" else 3
    centres = _patterns(rng if patterns_of is None else np.random.default_rng(patterns_of), max(labels) + 1, side, channels)
    out = root / folder / name
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, c in enumerate(labels):
        image = np.clip(centres[c] + rng.normal(0, 40, centres[c].shape), 0, 255).astype(np.uint8)
        Image.fromarray(image[..., 0] if mode == "L" else image, mode).save(out / f"{i}.{ext}")
        paths.append(f"{name}/{i}.{ext}")
    return paths


def _write(path: Path, paths: list[str], labels: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{p} {y}\n" for p, y in zip(paths, labels)))


def cifar_tree(root: Path, n_train: int = 64, n_val: int = 16, n_test: int = 32, n_ood: int = 16,
               classes: dict[str, int] | None = None) -> Path:
    """OpenOOD's CIFAR-10 and CIFAR-100 trees under `root` (the `paths.data_dir`); returns `root`.

    `classes` limits the labels used (default 10 for both, so that tiny trees cover every class of CIFAR-10; the
    CIFAR-100 model still has 100 outputs)."""
    classes = classes or {"cifar10": 10, "cifar100": 10}
    ids = {}
    for seed, (name, c) in enumerate(classes.items()):
        train = [i % c for i in range(n_train)]
        test = [i % c for i in range(n_val + n_test)]
        ids[name] = (train, _save_set(root, "images_classic", f"{name}_train", train, 32, "RGB", seed),
                     test, _save_set(root, "images_classic", f"{name}_test", test, 32, "RGB", 100 + seed,
                                     patterns_of=seed))
    ood = {name: _save_set(root, "images_classic", name, [i % 5 for i in range(n_ood)], side, mode, 200 + s)
           for s, (name, (mode, side)) in enumerate(CIFAR_OOD.items())}
    for id_name, near in (("cifar10", "cifar100"), ("cifar100", "cifar10")):
        lists = root / "benchmark_imglist" / id_name
        train_y, train_p, test_y, test_p = ids[id_name]
        _write(lists / f"train_{id_name}.txt", train_p, train_y)
        _write(lists / f"val_{id_name}.txt", test_p[:n_val], test_y[:n_val])
        _write(lists / f"test_{id_name}.txt", test_p[n_val:], test_y[n_val:])
        near_p = ids[near][3][:n_ood]
        _write(lists / f"test_{near}.txt", near_p, [-1] * len(near_p))
        for list_name, set_name in (("val_tin", "tin_val"), ("test_tin", "tin_test"), ("train_tin597", "tin597"),
                                    ("test_mnist", "mnist"), ("test_svhn", "svhn"), ("test_texture", "texture"),
                                    ("test_places365", "places365")):
            _write(lists / f"{list_name}.txt", ood[set_name], [-1] * n_ood)
    return root


def imagenet_tree(root: Path, n_train: int = 32, n_val: int = 8, n_test: int = 16, n_ood: int = 8, side: int = 64,
                  classes: int = 8) -> Path:
    """OpenOOD's ImageNet-200 and ImageNet-1K lists (`benchmark_imglist/imagenet200/`, `.../imagenet/`) over
    fabricated JPEGs of `side` pixels (resized to 256 and centre-cropped to 224 by the benchmark); returns `root`."""
    train_y = [i % classes for i in range(n_train)]
    test_y = [i % classes for i in range(n_val + n_test)]
    train = _save_set(root, "images_largescale", "imagenet_1k/train", train_y, side, "RGB", 0, "jpg")
    test = _save_set(root, "images_largescale", "imagenet_1k/val", test_y, side, "RGB", 1, "jpg", patterns_of=0)
    ood = {name: _save_set(root, folder, name, [i % 3 for i in range(n_ood)], side, "RGB", 10 + s, "jpg")
           for s, (name, folder) in enumerate(IMAGENET_OOD.items())}
    for lists, suffix in ((root / "benchmark_imglist" / "imagenet200", "imagenet200"),
                          (root / "benchmark_imglist" / "imagenet", "imagenet")):
        _write(lists / f"train_{suffix}.txt", train, train_y)
        _write(lists / f"val_{suffix}.txt", test[:n_val], test_y[:n_val])
        _write(lists / f"test_{suffix}.txt", test[n_val:], test_y[n_val:])
        _write(lists / "val_openimage_o.txt", ood["openimage_o"], [-1] * n_ood)
        for name in IMAGENET_OOD:
            _write(lists / f"test_{name}.txt", ood[name], [-1] * n_ood)
    return root
