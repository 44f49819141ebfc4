"""The in-memory uint8 pipeline (`ood.data.memory`): equal tensors to the PIL path, per-sample augmentation with
the per-item transforms' distribution, a cache next to the data, and identical runs with `in_memory` on and off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from fabricate import E2E, make_openood_tree
from helpers import run_config
from PIL import Image
from scipy.stats import chisquare
from torch.utils.data import DataLoader

from ood.data import CIFAR10Benchmark, OODDataModule
from ood.data import memory as mem
from ood.data.memory import MemoryImages, PadCropFlip, split_transform, to_memory
from ood.errors import ConfigError


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_openood_tree(tmp_path_factory.mktemp("openood"))


def _all(dataset: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return next(iter(DataLoader(dataset, batch_size=len(dataset))))


def test_every_split_equals_the_pil_path_exactly(tree: Path) -> None:
    """Grey MNIST, 40-64 px sets (resize + centre crop), val/test lists, train without augmentation: equal bits;
    the decoded arrays are cached under data_dir/ood_cache, named after the list file, and reused."""
    streaming = OODDataModule(CIFAR10Benchmark(tree, in_memory=False, augment=False), batch_size=8)
    memory = OODDataModule(CIFAR10Benchmark(tree, augment=False), batch_size=8)
    for (split, pil), (_, ours) in zip(streaming._eval_sets(), memory._eval_sets(), strict=True):
        assert isinstance(ours, MemoryImages), split.name
        for a, b in zip(_all(pil), _all(ours)):
            assert torch.equal(a, b), split.name
    cached = sorted(p.name.rsplit("-", 1)[0] for p in (tree / "ood_cache").glob("*.npy") if not p.name.endswith(".labels.npy"))
    assert cached == sorted(["train_cifar10", "val_cifar10", "test_cifar10", "val_tin", "test_cifar100", "test_tin",
                             "test_mnist", "test_svhn", "test_texture", "test_places365"])
    # each item is known by its listed file, decoded into memory or not (`samples.csv` of a run)
    lists = {"train": "train_cifar10", "val": "val_cifar10", "test": "test_cifar10", "val_ood": "val_tin"}
    for split, dataset in streaming._eval_sets():
        lines = (tree / "benchmark_imglist" / "cifar10" / f"{lists.get(split.name, 'test_' + split.name)}.txt").read_text()
        listed = [str(tree / "images_classic" / line.split()[0]) for line in lines.splitlines()]
        for datamodule in (streaming, memory):
            assert datamodule.sample_names(split.name, range(len(dataset))) == listed, split.name
    streamed_train = _all(streaming.train_dataloader().dataset)
    assert all(torch.equal(a, b) for a, b in zip(streamed_train, _all(memory.train_dataloader().dataset)))
    assert memory._augment == {"id": None}


def test_cache_is_memory_mapped_and_reused(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = CIFAR10Benchmark(tree)
    first = to_memory(bench.test(), bench.cache_dir)
    monkeypatch.setattr(mem, "decode_all", lambda *a: pytest.fail("decoded again instead of reading the cache"))
    again = to_memory(bench.test(), bench.cache_dir)
    assert isinstance(again.images, np.memmap) and np.array_equal(first.images, again.images)
    # another list (other content) is another cache file
    (tree / "other.txt").write_text("cifar10_test/0.png 3\n")
    from ood.data.imglist import ImageList

    monkeypatch.undo()
    other = to_memory(ImageList(tree / "other.txt", bench.images_dir, bench.eval_transform()), bench.cache_dir)
    assert len(other) == 1 and int(other.labels[0]) == 3


def test_batched_crop_and_flip_equal_the_per_item_transforms() -> None:
    """For every offset and flip, the batched gather equals torchvision's hflip -> pad(4, black) -> crop on PIL."""
    bench = CIFAR10Benchmark("unused")
    parts = split_transform(bench.train_transform())
    assert parts.augment == PadCropFlip(4, 0.5, parts.augment.fill)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    x = mem.normalise(np.asarray(image)[None].repeat(162, 0), parts.mean, parts.std)
    dy, dx, f = (t.flatten() for t in torch.meshgrid(torch.arange(9), torch.arange(9), torch.arange(2), indexing="ij"))
    flip = f.bool()
    ours = parts.augment.apply(x, dy, dx, flip)
    post = bench.eval_transform().transforms[-2:]  # ToTensor, Normalize
    for k in range(162):
        pil = TF.hflip(image) if flip[k] else image
        want = post[1](post[0](TF.crop(TF.pad(pil, 4, fill=0), int(dy[k]), int(dx[k]), 32, 32)))
        assert torch.equal(ours[k], want), (int(dy[k]), int(dx[k]), bool(flip[k]))


def test_offsets_and_flips_are_uniform_and_independent_per_sample() -> None:
    """dy, dx uniform on 0..8 and flip fair, jointly uniform on the 162 cells and independent between neighbours in
    a batch (chi-square, seeded); `__call__` applies exactly the draws."""
    aug = PadCropFlip(4, 0.5, (0.0, 0.0, 0.0))
    torch.manual_seed(0)
    dy, dx, flip = aug.draw(32_400)
    cell = dy * 18 + dx * 2 + flip.long()
    for counts in (dy.bincount(minlength=9), dx.bincount(minlength=9), flip.long().bincount(minlength=2), cell.bincount(minlength=162)):
        assert chisquare(counts.numpy()).pvalue > 1e-3
    pairs = (dy[0::2] * 9 + dy[1::2]).bincount(minlength=81)
    assert chisquare(pairs.numpy()).pvalue > 1e-3
    x = torch.randn(64, 3, 32, 32)
    torch.manual_seed(1)
    out = aug(x)
    torch.manual_seed(1)
    assert torch.equal(out, aug.apply(x, *aug.draw(64)))


def test_unbatchable_transforms_are_refused() -> None:
    from torchvision import transforms as T

    with pytest.raises(ConfigError, match="in_memory=false"):
        split_transform(T.Compose([T.RandomRotation(10), T.ToTensor()]))
    with pytest.raises(ConfigError, match="in_memory=false"):
        split_transform(T.Compose([T.RandomCrop(32, padding=4, padding_mode="reflect"), T.ToTensor()]))


@pytest.mark.slow
def test_one_epoch_in_memory_equals_streaming(tree: Path, tmp_path: Path) -> None:
    """Seeded, augmentation off: the same training batches and evaluation, so the same result rows."""
    common = [f"paths.data_dir={tree}", *E2E, "data.benchmark.augment=false", "backbone=small_cnn", "detectors.names=[msp,knn,odin]"]
    rows = {flag: run_config(tmp_path / flag, ["data=cifar10", f"data.benchmark.in_memory={flag}", *common]) for flag in ("true", "false")}
    strip = lambda rs: [{k: v for k, v in r.items() if k != "method_params"} for r in rs]  # noqa: E731
    assert strip(rows["true"]) == strip(rows["false"]) and len(rows["true"]) == 3 * 6


def test_training_batches_are_augmented_on_the_device_only_while_training(tree: Path) -> None:
    from types import SimpleNamespace

    datamodule = OODDataModule(CIFAR10Benchmark(tree), batch_size=8)
    batch = next(iter(datamodule.train_dataloader()))
    augment = datamodule._augment["id"]
    assert augment == PadCropFlip(4, 0.5, augment.fill)
    x = batch.x
    datamodule.trainer = SimpleNamespace(training=False)
    assert datamodule.on_after_batch_transfer(batch, 0).x is x
    datamodule.trainer = SimpleNamespace(training=True)
    torch.manual_seed(3)
    out = datamodule.on_after_batch_transfer(batch, 0)
    torch.manual_seed(3)
    assert torch.equal(out.x, augment.apply(x, *augment.draw(8))) and not torch.equal(out.x, x)


def test_outlier_batches_get_their_own_augmentation(tree: Path) -> None:
    """With an outlier stream (TIN-597 in memory), the combined batch's `x_out` is flipped/cropped per sample too."""
    from types import SimpleNamespace

    datamodule = OODDataModule(CIFAR10Benchmark(tree), batch_size=4, outlier_batch_size=6)
    datamodule.use_streams(("id", "outliers"), "oe")
    loaders = datamodule.train_dataloader().iterables
    raw = {name: next(iter(loader)) for name, loader in loaders.items()}
    augment = datamodule._augment["outliers"]
    assert augment == datamodule._augment["id"] == PadCropFlip(4, 0.5, augment.fill)
    datamodule.trainer = SimpleNamespace(training=True)
    torch.manual_seed(5)
    batch = datamodule.on_after_batch_transfer(dict(raw), 0)
    torch.manual_seed(5)
    want_x = augment.apply(raw["id"].x, *augment.draw(4))
    assert torch.equal(batch.x, want_x) and torch.equal(batch.x_out, augment.apply(raw["outliers"].x, *augment.draw(6)))


def test_unaugmented_outliers_are_the_test_transform_and_skip_the_device_step(tree: Path) -> None:
    """`augment_outliers=False` (OpenOOD's `oe` split): the in-memory outlier batch equals the evaluation transform
    of its TIN-597 images bit for bit, and the on-device step crops and flips the ID images alone."""
    from types import SimpleNamespace

    bench = CIFAR10Benchmark(tree, augment_outliers=False)
    datamodule = OODDataModule(bench, batch_size=4, outlier_batch_size=6)
    datamodule.use_streams(("id", "outliers"), "oe")
    loaders = datamodule.train_dataloader().iterables
    raw = {name: next(iter(loader)) for name, loader in loaders.items()}
    assert isinstance(loaders["outliers"].dataset.dataset, MemoryImages)
    lines = (tree / "benchmark_imglist/cifar10/train_tin597.txt").read_text().splitlines()
    images = [Image.open(tree / "images_classic" / lines[i].split()[0]) for i in raw["outliers"].index.tolist()]
    want = torch.stack([bench.eval_transform()(image) for image in images])
    assert len(images) == 6 and torch.equal(raw["outliers"].x, want)
    augment = datamodule._augment["id"]
    assert datamodule._augment["outliers"] is None and augment == PadCropFlip(4, 0.5, augment.fill)
    datamodule.trainer = SimpleNamespace(training=True)
    torch.manual_seed(5)
    batch = datamodule.on_after_batch_transfer(dict(raw), 0)
    torch.manual_seed(5)
    assert torch.equal(batch.x, augment.apply(raw["id"].x, *augment.draw(4))) and torch.equal(batch.x_out, want)


def test_cache_names_are_stable_for_datasets_without_a_repr() -> None:
    """A torchvision-style source (e.g. DTD's three splits in a ConcatDataset) gets the same key in every process."""
    from torch.utils.data import ConcatDataset, TensorDataset

    from ood.data.cifar import Transformed

    def source() -> Transformed:
        parts = [TensorDataset(torch.zeros(3)), TensorDataset(torch.zeros(2))]
        return Transformed(ConcatDataset(parts), CIFAR10Benchmark("unused").eval_transform(), label=-1)

    head = split_transform(source().transform).head
    name = mem.cache_name(source(), head)
    assert name == mem.cache_name(source(), head) and name.startswith("concatdataset-")


def test_decoding_the_in_memory_cache_draws_nothing_from_the_global_generator() -> None:
    """The run that decodes the images into the cache (`decode_all`, in the datamodule's setup, after the run's seed)
    augmented from another point of torch's global generator than every later run reading the cache: its loader drew
    its workers' base seed from it. Found by a faked-GPU run (test_fake_cuda) whose CPU half built the cache."""
    from ood.data.memory import decode_all

    items = [(np.full((2, 2, 3), i, dtype=np.uint8), i) for i in range(3)]
    torch.manual_seed(0)
    images, labels = decode_all(items, "three")  # type: ignore[arg-type]
    after = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(4))
    assert images[:, 0, 0, 0].tolist() == labels.tolist() == [0, 1, 2]


def test_the_kept_partial_batch_is_the_same_in_memory_and_streaming(tree: Path) -> None:
    """`drop_last=False` on the in-memory pipeline: 20 training images at batch 8 give 3 batches, the last of 4, the
    same images (bit for bit, augmentation off) and order as the per-item PIL path; the outlier stream (6 TIN-597
    images, batch 6) has 3 + 1 full batches."""
    batches = {}
    for in_memory in (True, False):
        datamodule = OODDataModule(CIFAR10Benchmark(tree, augment=False, in_memory=in_memory), batch_size=8,
                                   outlier_batch_size=6, drop_last=False)
        datamodule.use_streams(("id", "outliers"), "oe")
        loaders = datamodule.train_dataloader().iterables
        assert isinstance(loaders["id"].dataset.dataset, MemoryImages) is in_memory
        assert len(loaders["outliers"]) == 4 and len(loaders["outliers"].sampler) == 24
        batches[in_memory] = list(loaders["id"])
    assert [len(b.index) for b in batches[True]] == [8, 8, 4]
    for memory, streamed in zip(batches[True], batches[False]):
        assert torch.equal(memory.index, streamed.index) and torch.equal(memory.x, streamed.x)
