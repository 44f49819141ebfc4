"""`data=tinyimagenet` against the heatmap paper's released Tiny ImageNet evaluation (jhornauer/heatmap_ood
`eval_ood.py`, `selection.py`): every evaluation image, ID and OOD, gives the tensor of the released
`select_ood_transform` (selection.py:166-171: `Resize((64, 64))`, `CenterCrop(64)`, `ToTensor`, `Normalize(0.5, 0.5)`)
read through the released `datasets.ImageFolder` (selection.py:124-146); `protocol=heatmap_released` reads the released
`Datasets/` layout under its names, in its order, and `data.ood_subset=first_fifth` keeps the images eval_ood.py keeps.

The tree is fabricated: 64-px ID images (one grayscale, as Tiny ImageNet has), non-square OOD images (a square resize
and a shorter-side resize + centre crop differ on them), both layouts under one root.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_config
from PIL import Image
from torchvision import datasets, transforms

from ood.data.files import FileBenchmark
from ood.errors import ConfigError
from ood.utils import instantiate

WNIDS = ["n01443537", "n01629819", "n01641577"]
N_VAL = 10  # ID test images: the first fifth of each OOD set is 2


def released_transform() -> transforms.Compose:
    """selection.py:166-171, `select_ood_transform(<any set>, 'tinyimagenet')`, as released."""
    return transforms.Compose([
        transforms.Resize((64, 64)),
        transforms.CenterCrop(64),
        transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


def _save(path: Path, width: int, height: int, seed: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The official zip (train/, val/ + annotations) and the released layout (test/<wnid>/: the val images by class;
    Textures/dtd/images) side by side, with MOS' iNaturalist/ and SUN/."""
    root = tmp_path_factory.mktemp("tin")
    base = root / "tiny-imagenet-200"
    for k, wnid in enumerate(WNIDS):
        for i in range(2):
            _save(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", 64, 64, 10 * k + i)
    lines = []
    for i in range(N_VAL):
        wnid = WNIDS[(i * 2) % 3]
        _save(base / "val/images" / f"val_{i}.JPEG", 64, 64, 100 + i, "L" if i == 3 else "RGB")
        (base / "test" / wnid / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(base / "val/images" / f"val_{i}.JPEG", base / "test" / wnid / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val/val_annotations.txt").write_text("\n".join(lines) + "\n")
    for c, texture in enumerate(["banded", "blotchy", "braided"]):
        for i in range(3):
            _save(root / "dtd/images" / texture / f"{texture}_{i:04d}.jpg", 90 + 7 * i, 60 + 5 * c, 200 + 3 * c + i)
    shutil.copytree(root / "dtd", root / "Textures/dtd")
    for i in range(4):
        _save(root / "iNaturalist/images" / f"{i:03d}.jpg", 75, 110, 300 + i)
        _save(root / "SUN/images" / f"sun_{i:03d}.jpg", 120, 80 + 9 * i, 400 + i)
    return root


def _bench(tmp_path: Path, tree: Path, *overrides: str) -> FileBenchmark:
    cfg = compose_config(tmp_path, ["data=tinyimagenet", f"paths.data_dir={tree}", "data.benchmark.val_size=3", *overrides])
    bench = instantiate(cfg.data).benchmark
    bench.prepare()
    return bench


@pytest.mark.parametrize("protocol, folders", [
    ("heatmap", {"textures": "dtd/images", "inaturalist": "iNaturalist", "sun": "SUN"}),
    ("heatmap_released", {"textures": "Textures/dtd/images", "inaturalist": "iNaturalist", "lsun": "SUN"}),
])
def test_every_evaluation_image_is_the_released_tensor(tree: Path, tmp_path: Path, protocol: str,
                                                       folders: dict[str, str]) -> None:
    """Each OOD set: the released ImageFolder's images, in its order, each the released tensor to 1e-6 (the shorter-side
    resize + centre crop cut the non-square OOD images instead of squashing them); the ID test: each file the released
    tensor (a grayscale one converted to RGB, as ImageFolder's loader does)."""
    bench = _bench(tmp_path, tree, f"data.benchmark.protocol={protocol}")
    sets = {s.name: s.dataset for s in bench.ood_test()}
    assert list(sets) == list(folders)
    for name, folder in folders.items():
        released = datasets.ImageFolder(str(tree / folder), transform=released_transform())
        ours = sets[name]
        assert [ours.describe(i) for i in range(len(ours))] == [path for path, _ in released.samples], name
        for i in range(len(released)):
            torch.testing.assert_close(ours[i][0], released[i][0], rtol=0, atol=1e-6, msg=f"{name}[{i}]")
    test = bench.test()
    assert len(test) == N_VAL
    for i in range(N_VAL):
        with Image.open(test.describe(i)) as image:
            expected = released_transform()(image.convert("RGB"))
        torch.testing.assert_close(test[i][0], expected, rtol=0, atol=1e-6)


def test_the_released_layout_is_read_in_its_order_and_cut_to_its_first_fifth(tree: Path, tmp_path: Path) -> None:
    """protocol=heatmap_released: the ID test is ImageFolder(tiny-imagenet-200/test/), its files and labels in that
    order (which rows of a 200-image batch feature_norm=as_released scales); with data.ood_subset=first_fifth every
    OOD set holds the first len(ID test) // 5 images of the released ImageFolder (eval_ood.py:55, 95)."""
    cfg = compose_config(tmp_path, ["data=tinyimagenet", f"paths.data_dir={tree}", "data.benchmark.val_size=3",
                                    "data.benchmark.protocol=heatmap_released", "data.ood_subset=first_fifth",
                                    "data.num_workers=0"])
    dm = instantiate(cfg.data)
    dm.prepare_data()
    released_id = datasets.ImageFolder(str(tree / "tiny-imagenet-200/test"))
    test = dm.benchmark.test()
    assert [(test.describe(i), test[i][1]) for i in range(len(test))] == released_id.samples
    limit = N_VAL // 5
    loaders = {split.name: loader for split, loader in zip(dm.eval_splits, dm.test_dataloader())}
    for name, folder in {"textures": "Textures/dtd/images", "inaturalist": "iNaturalist", "lsun": "SUN"}.items():
        released = datasets.ImageFolder(str(tree / folder))
        assert len(loaders[name].dataset) == limit
        assert dm.sample_names(name, range(limit)) == [path for path, _ in released.samples[:limit]]


def test_a_resize_pair_is_checked(tree: Path, tmp_path: Path) -> None:
    """`data.benchmark.resize` is one side or [height, width]; a pair below the crop is refused as one side is."""
    with pytest.raises(ConfigError, match=r"^data.benchmark.resize=\[64, 64, 64\]: give one side \(the shorter one\) "
                                          r"or \[height, width\]$"):
        _bench(tmp_path, tree, "data.benchmark.resize=[64,64,64]")
    with pytest.raises(ConfigError, match=r"^data.benchmark.resize=48 is below the centre crop"):
        _bench(tmp_path, tree, "data.benchmark.resize=[48,64]")
    bench = _bench(tmp_path, tree, "data.benchmark.resize=64")
    sun = next(s.dataset for s in bench.ood_test() if s.name == "sun")
    with Image.open(sun.describe(0)) as image:
        shorter = transforms.Compose([transforms.Resize(64), transforms.CenterCrop(64), transforms.ToTensor(),
                                      transforms.Normalize((0.5,) * 3, (0.5,) * 3)])(image.convert("RGB"))
    torch.testing.assert_close(sun[0][0], shorter, rtol=0, atol=1e-6)
