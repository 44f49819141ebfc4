"""CIFAR-10/100 under the OpenOOD v1.5 protocol, on fabricated data in OpenOOD's exact on-disk layout.

No network: OpenOOD's tree is fabricated (`make_openood_tree`: `images_classic/<set>/<i>.png` plus
`benchmark_imglist/<cifar10|cifar100>/<list>.txt` with lines `<path relative to images_classic> <label>`, -1 for
OOD, as OpenOOD's download script leaves them; MNIST is grey, Textures and Places365 are larger than 32x32), and
torchvision's dataset classes are replaced by in-memory fakes with the same constructor signatures.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from fabricate import E2E, N_VAL, SETS, make_openood_tree
from helpers import compose_config, run_config
from PIL import Image

from ood.data import CIFAR10Benchmark, CIFAR100Benchmark, NpyImages, OODDataModule
from ood.data.batch import Batch
from ood.data.cifar import stratified_split
from ood.errors import ConfigError, DataNotFoundError, OODError

NEAR_FAR = {
    "cifar10": {"cifar100": "near", "tin": "near", "mnist": "far", "svhn": "far", "texture": "far", "places365": "far"},
    "cifar100": {"cifar10": "near", "tin": "near", "mnist": "far", "svhn": "far", "texture": "far", "places365": "far"},
}
MEAN10 = torch.tensor(CIFAR10Benchmark.mean)[:, None, None]
STD10 = torch.tensor(CIFAR10Benchmark.std)[:, None, None]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_openood_tree(tmp_path_factory.mktemp("openood"))


def normalised(image: Image.Image) -> torch.Tensor:
    """Reference preprocessing for an image that is already 32x32: RGB, [0, 1], CIFAR-10 normalisation."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - MEAN10) / STD10


# ----- OpenOOD layout ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [CIFAR10Benchmark, CIFAR100Benchmark])
def test_openood_lists_are_read_as_is(tree: Path, cls: type) -> None:
    bench = cls(tree)
    bench.prepare()
    assert bench.resolved_source == "openood"
    n_test = SETS[f"{bench.name}_test"][0]
    assert (len(bench.train()), len(bench.val()), len(bench.test())) == (SETS[f"{bench.name}_train"][0], N_VAL, n_test - N_VAL)
    assert {s.name: s.group for s in bench.ood_test()} == NEAR_FAR[bench.name]
    sizes = {s.name: len(s.dataset) for s in bench.ood_test()}
    assert sizes == {n: SETS["tin_test" if n == "tin" else (f"{n}_test" if n.startswith("cifar") else n)][0] for n in sizes}
    assert len(bench.ood_val()) == SETS["tin_val"][0]
    assert [bench.train(augment=False)[i][1] for i in range(12)] == [i % bench.num_classes for i in range(12)]
    assert all(bench.ood_test()[k].dataset[0][1] == -1 for k in range(6)) and bench.ood_val()[0][1] == -1


def test_test_preprocessing_matches_openood(tree: Path) -> None:
    """RGB, resize 32 + centre crop 32, CIFAR-10 normalisation; grey becomes 3 equal channels; big images shrink."""
    bench = CIFAR10Benchmark(tree)
    sets = {s.name: s.dataset for s in bench.ood_test()}
    x, _ = bench.test()[0]
    assert torch.allclose(x, normalised(Image.open(tree / "images_classic/cifar10_test" / f"{N_VAL}.png")), atol=1e-6)
    grey, _ = sets["mnist"][0]
    raw = grey * STD10 + MEAN10
    assert grey.shape == (3, 32, 32) and torch.allclose(raw[0], raw[1], atol=1e-6) and torch.allclose(raw[1], raw[2], atol=1e-6)
    texture = Image.open(tree / "images_classic/texture/0.png").convert("RGB").resize((32, 32), Image.BILINEAR)
    assert torch.allclose(sets["texture"][0][0], normalised(texture), atol=1e-6)
    assert sets["places365"][0][0].shape == (3, 32, 32)


def flips_and_crops(x: torch.Tensor) -> list[torch.Tensor]:
    """Every 32-pixel crop of normalised `x` padded by 4 black pixels, unflipped then flipped: what the training
    flip + padded crop can give (index 40: `x` itself)."""
    padded = torch.nn.functional.pad(x * STD10 + MEAN10, (4, 4, 4, 4))
    return [(v[:, i : i + 32, j : j + 32] - MEAN10) / STD10 for v in (padded, padded.flip(-1)) for i in range(9) for j in range(9)]


def test_train_augmentation_is_a_flip_and_padded_crop(tree: Path) -> None:
    bench = CIFAR10Benchmark(tree)
    image = Image.open(tree / "images_classic/cifar10_train/3.png")
    candidates = flips_and_crops(normalised(image))
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        x, _ = bench.train(augment=True)[3]
        matches = [k for k, c in enumerate(candidates) if torch.allclose(x, c, atol=1e-5)]
        assert matches, "augmented image is not a flipped/shifted crop of the original"
        seen.add(matches[0])
    assert len(seen) > 1
    assert torch.equal(bench.train(augment=False)[3][0], bench.eval_transform()(image))
    still = CIFAR10Benchmark(tree, crop_padding=0, hflip=False)
    assert torch.equal(still.train(augment=True)[3][0], bench.train(augment=False)[3][0])


def test_outliers_tin597_and_300k_npy(tree: Path, tmp_path: Path) -> None:
    tin597 = CIFAR10Benchmark(tree, augment=False).outliers()
    assert len(tin597) == SETS["tin597"][0] and tin597[0][1] == -1
    rgb = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "300K_random_images.npy", rgb)
    outliers = CIFAR10Benchmark(tmp_path, augment=False, outliers="random300k").outliers()
    assert isinstance(outliers, NpyImages) and len(outliers) == 7
    x, label = outliers[5]
    assert label == -1 and torch.allclose(x, normalised(Image.fromarray(rgb[5])), atol=1e-6)
    grey = rgb[..., 0]
    np.save(tmp_path / "grey.npy", grey)
    x, _ = NpyImages(tmp_path / "grey.npy", CIFAR10Benchmark(tmp_path).eval_transform())[2]
    assert torch.allclose(x, normalised(Image.fromarray(grey[2]).convert("RGB")), atol=1e-6)
    assert CIFAR10Benchmark(tree, outliers="none").outliers() is None
    np.save(tmp_path / "nchw.npy", rgb.transpose(0, 3, 1, 2).astype(np.float32) / 255)  # PyTorch's layout, in [0, 1]
    with pytest.raises(OODError, match=r"nchw.npy: expected uint8 images \[N, H, W\] or \[N, H, W, 1\|3\], got float32 "
                                       r"\(7, 3, 32, 32\); convert it \(channels first: np.ascontiguousarray\(a.transpose"
                                       r"\(0, 2, 3, 1\)\); floats: \(a \* 255\).round\(\).astype\(np.uint8\) for values in"):
        NpyImages(tmp_path / "nchw.npy", CIFAR10Benchmark(tmp_path).eval_transform())
    with pytest.raises(DataNotFoundError, match="300K_random_images.npy"):
        CIFAR10Benchmark(tree, outliers="random300k").outliers()


def tin597_images(tree: Path) -> list[Image.Image]:
    """The TIN-597 outlier images (64 px) in the order of OpenOOD's `train_tin597` list."""
    lines = (tree / "benchmark_imglist/cifar10/train_tin597.txt").read_text().splitlines()
    return [Image.open(tree / "images_classic" / line.split()[0]) for line in lines]


def first_outlier_batch(bench: CIFAR10Benchmark) -> tuple[OODDataModule, Batch]:
    """An `oe` DataModule on `bench` (ID batch 4, outlier batch 6) and the first batch of its outlier loader."""
    datamodule = OODDataModule(bench, batch_size=4, outlier_batch_size=6)
    datamodule.use_streams(("id", "outliers"), "oe")
    return datamodule, next(iter(datamodule.train_dataloader().iterables["outliers"]))


def test_outliers_get_the_test_transform_with_augment_outliers_off(tree: Path) -> None:
    """OpenOOD's `oe` split gets its test preprocessor (resize 32 + centre crop + normalise, no flip or crop):
    `augment_outliers=False` serves the outlier batches so (file-backed path here; in memory: test_memory.py),
    the default keeps the training flip + padded crop (Hendrycks' OE, energy_ood)."""
    images = tin597_images(tree)
    off = CIFAR10Benchmark(tree, in_memory=False, augment_outliers=False)
    _, batch = first_outlier_batch(off)
    rows = batch.index.tolist()
    assert len(rows) == 6 and torch.equal(batch.x, torch.stack([off.eval_transform()(images[i]) for i in rows]))
    resized = [images[i].convert("RGB").resize((32, 32), Image.BILINEAR) for i in rows]
    assert torch.allclose(batch.x, torch.stack([normalised(image) for image in resized]), atol=1e-6)
    torch.manual_seed(0)
    _, batch = first_outlier_batch(CIFAR10Benchmark(tree, in_memory=False))
    crops = []
    for x, i in zip(batch.x, batch.index.tolist()):
        crops += [k for k, c in enumerate(flips_and_crops(normalised(resized[rows.index(i)]))) if torch.allclose(x, c, atol=1e-5)][:1]
    assert len(crops) == 6 and crops != [40] * 6, "default outliers are not flipped / padded crops of their images"


# ----- missing data -----------------------------------------------------------------------------------------------
def test_missing_data_says_where_and_how(tmp_path: Path) -> None:
    bench = CIFAR10Benchmark(tmp_path / "empty")
    with pytest.raises(DataNotFoundError) as err:
        bench.prepare()
    message = str(err.value)
    assert str(tmp_path / "empty" / "benchmark_imglist" / "cifar10") in message
    assert str(tmp_path / "empty" / "torchvision" / "cifar10") in message
    assert "scripts/download/download.py" in message and "data.download=true" in message


def test_incomplete_openood_tree_names_the_missing_lists(tree: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(tree / "benchmark_imglist", partial / "benchmark_imglist")
    (partial / "benchmark_imglist/cifar100/test_svhn.txt").unlink()
    (partial / "benchmark_imglist/cifar100/test_tin.txt").unlink()  # optional only without OpenOOD's tree
    with pytest.raises(DataNotFoundError) as err:
        CIFAR100Benchmark(partial).prepare()
    assert str(partial / "benchmark_imglist/cifar100/test_svhn.txt") in str(err.value)
    assert str(partial / "benchmark_imglist/cifar100/test_tin.txt") in str(err.value)
    assert str(partial / "images_classic") in str(err.value)


def test_a_run_that_does_not_evaluate_trains_before_the_ood_sets_are_there(tree: Path, tmp_path: Path) -> None:
    """`ood-train evaluate=false` (train now, `ood-eval` later) stopped on the protocol's missing OOD sets on CIFAR
    and on a data config of one's own (`FileBenchmark`): only the ID splits are asked for then; an evaluating run
    still names every missing set."""
    from ood.data import FileBenchmark

    partial = tmp_path / "partial"
    shutil.copytree(tree / "benchmark_imglist", partial / "benchmark_imglist")
    shutil.copytree(tree / "images_classic", partial / "images_classic")
    (partial / "benchmark_imglist/cifar10/test_svhn.txt").unlink()
    files = FileBenchmark(partial, "mine", 10, {"imglist": "benchmark_imglist/cifar10/train_cifar10.txt"},
                          {"imglist": "benchmark_imglist/cifar10/test_cifar10.txt"},
                          {"main": {"far": {"svhn": {"imglist": "benchmark_imglist/cifar10/test_svhn.txt"}}}}, "main",
                          val_size=2)
    for bench in (CIFAR10Benchmark(partial), files):
        OODDataModule(bench, evaluate=False).prepare_data()
        with pytest.raises(DataNotFoundError, match="test_svhn.txt"):
            OODDataModule(bench).prepare_data()


def test_missing_data_stops_the_run_before_training(tmp_path: Path) -> None:
    """One line naming both places looked in, OpenOOD's download command for that folder and `data.download=true`."""
    root = re.escape(str(tmp_path / "nothing"))
    with pytest.raises(DataNotFoundError, match=(
            rf"^cifar10: no data found: looked for OpenOOD's lists in {root}/benchmark_imglist/cifar10 and for "
            rf"torchvision's CIFAR10 in {root}/torchvision/cifar10\. Get OpenOOD's benchmark with its download script "
            rf"\(.* --save_dir {root}\), or set data\.download=true .* into {root}/torchvision \(.*\)$")):
        run_config(tmp_path / "run", ["data=cifar10", f"paths.data_dir={tmp_path / 'nothing'}", "backbone=resnet18_32x32",
                                      "trainer.enable_progress_bar=false"])
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(("data", "protocol", "fetched", "by_file"), [
    ("cifar10", "openood_v1.5", "CIFAR-10 (and the openood_v1.5 protocol's CIFAR-100, DTD, MNIST, Places365, SVHN)", "tin, validation OOD, TIN-597 outliers"),
    ("cifar100", "classic", "CIFAR-100 (and the classic protocol's SVHN)", "isun, lsun_crop, lsun_resize, places365, texture, validation OOD, TIN-597 outliers"),
])
def test_missing_data_says_which_of_the_protocols_sets_torchvision_fetches(
        data: str, protocol: str, fetched: str, by_file: str, tmp_path: Path) -> None:
    """The hint named OpenOOD v1.5's MNIST, SVHN, DTD, Places365 whatever the protocol (the classic one's texture and
    Places365 are OpenOOD's files, not torchvision's)."""
    from ood.utils import instantiate

    cfg = compose_config(tmp_path, [f"data={data}", f"data.benchmark.protocol={protocol}", f"paths.data_dir={tmp_path / 'none'}"])
    with pytest.raises(DataNotFoundError) as err:
        instantiate(cfg.data.benchmark).prepare()
    assert f"or set data.download=true to fetch {fetched} with torchvision into {tmp_path / 'none' / 'torchvision'} " \
           f"({by_file} only from their own files)" in str(err.value)


# ----- torchvision source (fakes, no network) ---------------------------------------------------------------------
class FakeVision:
    """Stands in for a torchvision dataset class: records the constructor call, serves random PIL images."""

    calls: list[tuple[str, str, dict[str, Any]]] = []
    n = 30
    missing: set[str] = set()

    def __init__(self, root: str, **kwargs: Any) -> None:
        name = type(self).__name__
        FakeVision.calls.append((name, root, kwargs))
        if name in FakeVision.missing and not kwargs.get("download"):
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        rng = np.random.default_rng(len(FakeVision.calls))
        grey = name == "MNIST"
        self.images = rng.integers(0, 256, (self.n, 28, 28) if grey else (self.n, 40, 40, 3), dtype=np.uint8)
        self.targets = [i % 10 for i in range(self.n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i]), self.targets[i]


@pytest.fixture
def fake_torchvision(monkeypatch: pytest.MonkeyPatch) -> type[FakeVision]:
    FakeVision.calls = []
    FakeVision.missing = set()
    for name in ("CIFAR10", "CIFAR100", "MNIST", "SVHN", "DTD", "Places365"):
        monkeypatch.setattr(torchvision.datasets, name, type(name, (FakeVision,), {}))
    return FakeVision


def test_torchvision_source_downloads_and_builds_the_protocol(
    tmp_path: Path, fake_torchvision: type[FakeVision], caplog: pytest.LogCaptureFixture
) -> None:
    bench = CIFAR10Benchmark(tmp_path, val_size=10)
    assert bench.resolved_source == "torchvision"
    with caplog.at_level(logging.WARNING):
        OODDataModule(bench, download=True).prepare_data()
    downloads = {(name, Path(root).name, kw.get("split", kw.get("train"))) for name, root, kw in fake_torchvision.calls}
    assert all(kw["download"] for _, _, kw in fake_torchvision.calls)
    assert downloads == {
        ("CIFAR10", "cifar10", True), ("CIFAR10", "cifar10", False), ("CIFAR100", "cifar100", False),
        ("MNIST", "mnist", False), ("SVHN", "svhn", "test"), ("DTD", "texture", "train"), ("DTD", "texture", "val"),
        ("DTD", "texture", "test"), ("Places365", "places365", "val"),
    }
    assert all(Path(root).parent == tmp_path / "torchvision" for _, root, _ in fake_torchvision.calls)
    assert "set 'tin' not found" in caplog.text and "set 'val_ood' not found" in caplog.text
    fake_torchvision.calls = []
    ood = bench.ood_test()
    assert not any(kw["download"] for _, _, kw in fake_torchvision.calls)
    assert {s.name: s.group for s in ood} == {k: v for k, v in NEAR_FAR["cifar10"].items() if k != "tin"}
    assert len(next(s for s in ood if s.name == "texture").dataset) == 3 * FakeVision.n
    assert bench.ood_val() is None
    mnist = next(s for s in ood if s.name == "mnist").dataset
    x, label = mnist[0]
    raw = x * STD10 + MEAN10
    assert label == -1 and x.shape == (3, 32, 32) and torch.allclose(raw[0], raw[2], atol=1e-6)
    val, test = bench.val(), bench.test()
    assert (len(val), len(test)) == (10, FakeVision.n - 10)
    assert sorted(val.indices + test.indices) == list(range(FakeVision.n))
    assert sorted(val[i][1] for i in range(10)) == list(range(10))


def test_torchvision_source_takes_tin_from_openood_files(tree: Path, tmp_path: Path, fake_torchvision: type[FakeVision]) -> None:
    data = tmp_path / "mixed"
    shutil.copytree(tree, data)
    (data / "benchmark_imglist/cifar100/train_cifar100.txt").unlink()
    bench = CIFAR100Benchmark(data)
    assert bench.resolved_source == "torchvision"
    bench.prepare(download=True)
    assert {s.name: s.group for s in bench.ood_test()} == NEAR_FAR["cifar100"]
    assert len(bench.ood_val()) == SETS["tin_val"][0]


def test_torchvision_missing_without_download_names_the_dataset(tmp_path: Path, fake_torchvision: type[FakeVision]) -> None:
    fake_torchvision.missing = {"SVHN"}
    with pytest.raises(DataNotFoundError) as err:
        CIFAR10Benchmark(tmp_path, source="torchvision").prepare()
    assert "'svhn'" in str(err.value) and str(tmp_path / "torchvision" / "svhn") in str(err.value)
    assert "data.download=true" in str(err.value)


def test_a_missing_cifar_batch_file_is_named(tmp_path: Path) -> None:
    """torchvision's CIFAR-10 tree without one batch: torchvision's 'Dataset not found or corrupted' named no file."""
    batches = tmp_path / "torchvision" / "cifar10" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "data_batch_4", "data_batch_5", "test_batch", "batches.meta"):
        (batches / name).write_bytes(b"")
    with pytest.raises(DataNotFoundError, match=rf"'cifar10' not found in .*\(missing \['data_batch_3'\] in {batches}\)"):
        CIFAR10Benchmark(tmp_path, source="torchvision").prepare()
    (batches / "data_batch_3").write_bytes(b"")
    with pytest.raises(DataNotFoundError, match=r"its files are there but fail torchvision's checksum"):
        CIFAR10Benchmark(tmp_path, source="torchvision").prepare()


def test_stratified_split_is_seeded_and_balanced() -> None:
    targets = [i % 4 for i in range(40)]
    val, test = stratified_split(targets, 8, seed=0)
    assert stratified_split(targets, 8, seed=0) == (val, test) and stratified_split(targets, 8, seed=1) != (val, test)
    assert sorted(targets[i] for i in val) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert sorted(val + test) == list(range(40))


def test_stratified_split_keeps_the_class_proportions() -> None:
    """An unbalanced ID train folder (data=folder's val_fraction) loses the same fraction of every class: the even
    split held out 5 of a 10-image class beside 5 of 90, and all 5 images of a small class (a smaller split than
    asked, then an error that the class had no training image left)."""
    targets = [0] * 90 + [1] * 10
    val, _ = stratified_split(targets, 10, seed=0)
    assert sorted(targets[i] for i in val) == [0] * 9 + [1]
    targets = [1] * 1000 + [0] * 5
    val, _ = stratified_split(targets, 101, seed=0)
    assert sorted(targets[i] for i in val) == [0] + [1] * 100
    targets = [0] * 99 + [1] * 2 + [2] * 2
    val, _ = stratified_split(targets, 5, seed=0)  # at least one of each class, beyond `size` if need be
    assert sorted(targets[i] for i in val) == [0, 0, 0, 0, 1, 2]


# ----- configs and end to end -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_experiment_is_the_openood_recipe(tmp_path: Path, name: str) -> None:
    cfg = compose_config(tmp_path, [f"experiment={name}_ce"])
    assert cfg.data.benchmark._target_ == f"ood.data.CIFAR{name[5:]}Benchmark"
    assert cfg.backbone._target_ == "ood.models.ResNet18_32x32" and cfg.trainer.accelerator == "gpu"
    opt = cfg.method.optimizer
    assert (opt.lr, opt.momentum, opt.weight_decay, opt.nesterov) == (0.1, 0.9, 5e-4, True)
    assert (cfg.trainer.max_epochs, cfg.data.batch_size) == (100, 128)
    sched = cfg.method.scheduler
    assert (sched._target_, sched.eta_min, sched.interval, sched.offset) == ("ood.methods.schedules.OpenOODCosine", 1e-6,
                                                                             "step", 0)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_oe_presets_give_the_outliers_the_test_transform(tree: Path, tmp_path: Path, name: str) -> None:
    """`experiment=cifar*_oe` sets data.benchmark.augment_outliers=false (OpenOOD's `oe` split), which a command
    line can set back; the CE presets keep the data config's default, true (the training transform)."""
    from hydra.utils import instantiate

    cfg = compose_config(tmp_path, [f"experiment={name}_oe", f"paths.data_dir={tree}"])
    bench = instantiate(cfg.data.benchmark)
    assert bench.augment_outliers is False and torch.equal(bench.outliers()[2][0], bench.eval_transform()(tin597_images(tree)[2]))
    again = compose_config(tmp_path, [f"experiment={name}_oe", "data.benchmark.augment_outliers=true"])
    assert again.data.benchmark.augment_outliers is True
    assert compose_config(tmp_path, [f"experiment={name}_ce"]).data.benchmark.augment_outliers is True


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_one_epoch_reports_exactly_the_openood_sets(tree: Path, tmp_path: Path, name: str) -> None:
    rows = run_config(tmp_path, [f"data={name}", f"paths.data_dir={tree}", *E2E])
    assert {r["detector"] for r in rows} == {"msp", "knn"}
    for detector in ("msp", "knn"):
        assert {r["ood_dataset"]: r["ood_group"] for r in rows if r["detector"] == detector} == NEAR_FAR[name]
    assert {(r["id_dataset"], r["backbone"], r["n_id"]) for r in rows} == {(name, "resnet18_32x32", SETS[f"{name}_test"][0] - N_VAL)}
    assert {r["ood_dataset"]: r["n_ood"] for r in rows}["mnist"] == SETS["mnist"][0]
    assert (tmp_path / "results.jsonl").is_file()


def test_a_model_of_one_input_size_beside_another_image_size_is_one_line(tmp_path: Path) -> None:
    """A ViT built for 224 px on data=imagenet200 with data.benchmark.image_size=64 (a data config's FileBenchmark)
    failed at the first batch with timm's AssertionError traceback; data=folder already refused it in one line."""
    from torch import nn

    from ood.data import FileBenchmark

    class PatchEmbed(nn.Module):  # what `fixed_input_size` reads of timm's strict patch embedding
        strict_img_size, img_size = True, (224, 224)

    bench = FileBenchmark(tmp_path, "mine", 10, {"folder": "train"}, {"folder": "test"}, {"main": {}}, "main",
                          image_size=64, resize=72)
    model = nn.Sequential(PatchEmbed())
    with pytest.raises(ConfigError, match=r"^the model takes 224x224 images only, but data.benchmark.image_size=64: set "
                                          r"data.benchmark.image_size=224 .*\+backbone.img_size=64 for timm\)$"):
        bench.check_model_input(model)
    FileBenchmark(tmp_path, "mine", 10, {"folder": "train"}, {"folder": "test"}, {"main": {}}, "main",
                  image_size=224).check_model_input(model)
    bench.check_model_input(nn.Sequential(nn.Conv2d(3, 4, 3)))  # any size


def test_images_missing_from_the_sets_read_after_training_are_named_before_it(tree: Path, tmp_path: Path) -> None:
    """An image an OOD (or the ID test) list names but the disk lacks stopped the run when the evaluation reached it,
    after the whole training and train pass: named before training now, with how many of its list are missing."""
    from ood.data import FileBenchmark
    from ood.data.imglist import read_imglist

    partial = tmp_path / "partial"
    shutil.copytree(tree, partial)
    lists = partial / "benchmark_imglist" / "cifar10"
    svhn, test = read_imglist(lists / "test_svhn.txt"), read_imglist(lists / "test_cifar10.txt")
    for name, _ in (svhn[1], test[0]):
        (partial / "images_classic" / name).unlink()
    with pytest.raises(DataNotFoundError) as err:
        CIFAR10Benchmark(partial).prepare()
    for listed, first in ((svhn, svhn[1][0]), (test, test[0][0])):
        which = lists / ("test_svhn.txt" if listed is svhn else "test_cifar10.txt")
        assert (f"1 of the {len(listed)} images {which} lists under {partial / 'images_classic'}/ (the first: {first})"
                in str(err.value))
    CIFAR10Benchmark(partial).prepare(evaluate=False)  # training reads neither set
    files = FileBenchmark(partial, "mine", 10, {"imglist": "benchmark_imglist/cifar10/train_cifar10.txt"},
                          {"imglist": "benchmark_imglist/cifar10/test_cifar10.txt"},
                          {"main": {"far": {"svhn": {"imglist": "benchmark_imglist/cifar10/test_svhn.txt"}}}}, "main")
    with pytest.raises(DataNotFoundError, match=r"'svhn' \(looked for 1 of the \d+ images .*test_svhn.txt lists under"):
        files.prepare()


def test_a_complete_list_is_stat_ed_once_a_process(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ood-train` prepares its data for training and again for the evaluation: the listed images of a complete list
    are checked the first time only (about 150 k stats on CIFAR's OpenOOD lists)."""
    import ood.data.sets as sets_module

    read, original = [], sets_module.read_imglist
    monkeypatch.setattr(sets_module, "_COMPLETE_LISTS", set())
    monkeypatch.setattr(sets_module, "read_imglist", lambda path: read.append(path) or original(path))
    spec = sets_module.SetSpec(imglist="benchmark_imglist/cifar10/test_svhn.txt")
    assert spec.missing_images(tree) == [] and spec.missing_images(tree) == [] and len(read) == 1


def test_a_data_dir_under_home_is_expanded(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`paths.data_dir=~/data` (unexpanded by the shell after `paths.data_dir=`) or `ood.evaluate(data_dir="~/data")`
    looked for a folder named ~ in the working directory."""
    from ood.data import FileBenchmark

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tree, tmp_path / "data", symlinks=True)
    bench = CIFAR10Benchmark("~/data")
    bench.prepare()
    assert bench.data_dir == tmp_path / "data"
    files = FileBenchmark("~/data", "mine", 10, {"imglist": "benchmark_imglist/cifar10/train_cifar10.txt"},
                          {"imglist": "benchmark_imglist/cifar10/test_cifar10.txt"}, {"main": {}}, "main")
    assert files.data_dir == tmp_path / "data"


@pytest.mark.parametrize("optional", [False, True])
def test_a_csid_lists_missing_images_are_named_before_training(tree: Path, tmp_path: Path, optional: bool) -> None:
    """The covariate-shifted ID lists (ImageNet-V2 / -R / -C under evaluation.fsood=true) are read after training too:
    an image one names but the disk lacks is named when the sets are asked for (as the datamodule prepares), and an
    optional set missing any is left out with the skip warning instead of failing mid-evaluation."""
    from ood.data import FileBenchmark
    from ood.data.imglist import read_imglist

    partial = tmp_path / "partial"
    shutil.copytree(tree, partial)
    listed = "benchmark_imglist/cifar10/test_cifar10.txt"
    gone = read_imglist(partial / listed)[2][0]
    (partial / "images_classic" / gone).unlink()
    csid = {"shifted": {"imglist": "benchmark_imglist/cifar10/val_cifar10.txt"},
            "broken": {"imglist": listed, "optional": optional}}
    bench = FileBenchmark(partial, "mine", 10, {"imglist": "benchmark_imglist/cifar10/train_cifar10.txt"},
                          {"imglist": "benchmark_imglist/cifar10/val_cifar10.txt"}, {"main": {"csid": csid}}, "main")
    if optional:
        assert [s.name for s in bench.csid_test()] == ["shifted"]
    else:
        with pytest.raises(DataNotFoundError, match=rf"'broken' \(looked for 1 of the \d+ images .*test_cifar10.txt lists "
                                                    rf"under .*images_classic/ \(the first: {re.escape(gone)}\)"):
            bench.csid_test()


@pytest.mark.parametrize(("data", "override", "message"), [
    ("cifar10", "data.benchmark.image_size=0", r"data.benchmark.image_size=0 is outside its range whole numbers in \[1, inf\]"),
    ("cifar10", "data.benchmark.crop_padding=-1",
     r"data.benchmark.crop_padding=-1 is outside its range whole numbers in \[0, inf\]"),
    ("cifar100", "data.benchmark.split_seed=0.5",
     r"data.benchmark.split_seed=0.5 is outside its range whole numbers in \[0, inf\]"),
    ("tinyimagenet", "data.benchmark.val_size=0", r"data.benchmark.val_size=0 is outside its range whole numbers in \[1, inf\]"),
    ("imagenet200", "data.benchmark.image_size=0",
     r"data.benchmark.image_size=0 is outside its range whole numbers in \[1, inf\]"),
    # was refused advising data.benchmark.image_size=0
    ("imagenet200", "data.benchmark.resize=0", r"data.benchmark.resize=0 is outside its range whole numbers in \[1, inf\]"),
])
def test_a_fractional_or_nonpositive_benchmark_size_or_seed_is_refused_as_built(
    tmp_path: Path, data: str, override: str, message: str
) -> None:
    """A size or seed of the file benchmarks (CIFAR's, and the `FileBenchmark` of ImageNet-200 and the other folder
    benchmarks) failed in torchvision's transforms at the first batch (image_size=0, crop_padding=-1, resize=0) or in
    torch.manual_seed as the validation split was drawn (split_seed=0.5): one line as the benchmark is built, before
    any file is read."""
    from hydra.errors import InstantiationException

    from ood.utils import instantiate

    cfg = compose_config(tmp_path, [f"data={data}", f"paths.data_dir={tmp_path}", override])
    with pytest.raises((ConfigError, InstantiationException)) as err:
        instantiate(cfg.data.benchmark)
    refusal = err.value if isinstance(err.value, ConfigError) else err.value.__cause__
    assert isinstance(refusal, ConfigError) and re.fullmatch(message, str(refusal))


def test_an_id_list_with_a_label_outside_the_classes_is_named_before_training(tree: Path, tmp_path: Path) -> None:
    """A train / val / test list with a label outside 0..9 (an OOD line's -1, CIFAR-100's list) was read as-is:
    training failed with an IndexError (a device assert on a GPU), a test list scored against absent classes."""
    copy = tmp_path / "copy"
    shutil.copytree(tree / "benchmark_imglist", copy / "benchmark_imglist")
    (copy / "images_classic").symlink_to(tree / "images_classic")
    for split, label in (("train", 10), ("val", -1), ("test", -3)):
        listed = copy / f"benchmark_imglist/cifar10/{split}_cifar10.txt"
        good = listed.read_text()
        first, rest = good.split("\n", 1)
        listed.write_text(f"{first.split()[0]} {label}\n{rest}")
        with pytest.raises(DataNotFoundError, match=rf"{split}_cifar10.txt: 1 of its \d+ lines have a label outside the "
                           rf"10 ID classes 0..9 \(the first: '{first.split()[0]}' {label}\); is it the ID list"):
            OODDataModule(CIFAR10Benchmark(copy)).prepare_data()
        listed.write_text(good)
    OODDataModule(CIFAR10Benchmark(copy)).prepare_data()


def test_an_outlier_array_that_is_no_npy_array_is_one_line(tmp_path: Path) -> None:
    """A text file, an array cut short, an object array or an `.npz` in the place of the 300K `.npy`: one line
    naming the file (NumPy's ValueError advised unpickling a text file; an `.npz` was an AttributeError)."""
    transform = CIFAR10Benchmark(tmp_path).eval_transform()
    np.save(tmp_path / "good.npy", np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "text.npy").write_text("not an array")
    (tmp_path / "short.npy").write_bytes((tmp_path / "good.npy").read_bytes()[:200])
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    np.savez(tmp_path / "many.npz", images=np.zeros(3))
    np.save(tmp_path / "none.npy", np.zeros((0, 8, 8, 3), np.uint8))
    for name, message in (("text.npy", r"is not a .npy file \(no NumPy header: b'not an'...\); write it with np.save$"),
                          ("short.npy", r"is not a readable .npy array \(cut short, or not numbers\?\)"),
                          ("objects.npy", r"is not a readable .npy array \(cut short, or not numbers\?\)"),
                          ("many.npz", r"is an .npz archive of \['images'\]; give one array saved with np.save$")):
        with pytest.raises(OODError, match=rf"^image array: {re.escape(str(tmp_path / name))} {message}"):
            NpyImages(tmp_path / name, transform)
    with pytest.raises(OODError, match=r"none.npy: the image array holds no image \(shape \(0, 8, 8, 3\)\)$"):
        NpyImages(tmp_path / "none.npy", transform)
    assert len(NpyImages(tmp_path / "good.npy", transform)) == 4


def test_an_svhn_mat_file_that_is_there_but_wrong_is_named(tmp_path: Path) -> None:
    """torchvision's SVHN with a `test_32x32.mat` of the wrong kind (cut short, another file): torchvision said 'not
    found or corrupted', naming no file; absent, the file to fetch is named."""
    root = tmp_path / "svhn"
    root.mkdir()
    bench = CIFAR10Benchmark(tmp_path, source="torchvision")
    with pytest.raises(DataNotFoundError, match=rf"'svhn' not found in {root} \(missing \['test_32x32.mat'\] in {root}\)"):
        bench._tv_build("svhn", root, name="svhn")
    (root / "test_32x32.mat").write_bytes(b"MATLAB 5.0 cut short")
    with pytest.raises(DataNotFoundError, match=r"its files are there but fail torchvision's checksum \(cut short, or not "
                       rf"the official download\): re-download \['test_32x32.mat'\] into {root}\)"):
        bench._tv_build("svhn", root, name="svhn")


def test_a_covariate_shifted_id_set_with_a_label_outside_the_classes_is_named(tree: Path, tmp_path: Path) -> None:
    """A csid list (full-spectrum evaluation) with a label no ID class has: its accuracy counted those images as
    wrong, silently; now one line naming the set and its list, when the sets are opened before training."""
    from ood.data import FileBenchmark

    lists = tree / "benchmark_imglist/cifar10"
    lines = (lists / "test_cifar10.txt").read_text().splitlines()
    (tmp_path / "csid.txt").write_text("".join(f"{line.split()[0]} {15 if i == 1 else line.split()[1]}\n"
                                               for i, line in enumerate(lines)))
    protocol = {"main": {"far": {"svhn": {"imglist": str(lists / "test_svhn.txt")}},
                         "csid": {"shifted": {"imglist": str(tmp_path / "csid.txt")}}}}
    files = FileBenchmark(tree, "mine", 10, {"imglist": str(lists / "train_cifar10.txt")},
                          {"imglist": str(lists / "test_cifar10.txt")}, protocol, "main", val_size=2)
    with pytest.raises(DataNotFoundError, match=rf"^mine: covariate-shifted ID set 'shifted' \(listed in "
                       rf"{tmp_path / 'csid.txt'}\): label\(s\) \[15\] are no ID class \(the 10 classes are 0..9\)"):
        files.csid_test()
    (tmp_path / "csid.txt").write_text("\n".join(lines))
    assert files.csid_test()[0].dataset.targets == [int(line.split()[1]) for line in lines]
    # a set whose targets are a tensor (a Dataset of the caller's): `targets or ()` raised torch's ambiguity error
    from ood.data.sets import check_csid_labels

    tensors = torch.utils.data.TensorDataset(torch.zeros(2))
    tensors.targets = torch.tensor([3, 10])
    with pytest.raises(DataNotFoundError, match=r"^mine: covariate-shifted ID set 'own': label\(s\) \[10\] are no ID"):
        check_csid_labels("mine", "own", tensors, 10)
