"""The embedded digits benchmark: fixed seeded splits, disjoint, the OOD sets and groups of the README (digits section)."""

from __future__ import annotations

import pytest
import torch

from ood.data import DigitsBenchmark, OODDataModule
from ood.data.benchmark import EpochShuffle
from ood.errors import ConfigError


def test_splits_are_seeded_stratified_and_disjoint() -> None:
    a, b = DigitsBenchmark(seed=0), DigitsBenchmark(seed=0)
    assert torch.equal(a.train(augment=False).images, b.train(augment=False).images)
    splits = a._id_splits
    sizes = {k: len(v[1]) for k, v in splits.items()}
    assert sizes == {"train": 650, "val": 162, "test": 271}
    rows = {k: {tuple(x.flatten().tolist()) for x in v[0]} for k, v in splits.items()}
    assert not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    assert set(splits["train"][1].tolist()) == set(range(6))
    assert not torch.equal(DigitsBenchmark(seed=1)._id_splits["test"][0], splits["test"][0])


def test_ood_sets_and_groups() -> None:
    bench = DigitsBenchmark()
    sets = {s.name: (s.group, len(s.dataset)) for s in bench.ood_test()}
    assert sets == {
        "digits_6_9": ("near", 714),
        "flower_patches": ("far", 500),
        "gaussian_noise": ("far", 500),
        "uniform_noise": ("far", 500),
    }
    assert all(y == -1 for s in bench.ood_test() for y in s.dataset.labels.tolist())


def test_normalised_with_train_statistics_and_resized() -> None:
    bench = DigitsBenchmark(image_size=20)
    train = bench.train(augment=False).images
    assert train.shape[1:] == (1, 20, 20)
    assert abs(float(train.mean())) < 1e-5 and abs(float(train.std()) - 1) < 1e-3


def test_validation_ood_and_outliers_come_from_another_photo() -> None:
    bench = DigitsBenchmark(n_val_ood=50, n_outliers=60)
    flower = next(s for s in bench.ood_test() if s.name == "flower_patches").dataset.images
    val_ood, outliers = bench.ood_val().images, bench.outliers().images
    assert len(val_ood) == 50 and len(outliers) == 60
    test_rows = {tuple(x.flatten().tolist()) for x in flower}
    assert not any(tuple(x.flatten().tolist()) in test_rows for x in torch.cat([val_ood, outliers]))


def test_eval_loaders_carry_indices_in_split_order() -> None:
    dm = OODDataModule(DigitsBenchmark(), eval_batch_size=1000)
    names = [s.name for s in dm.eval_splits]
    assert names == ["train", "val", "test", "val_ood", "digits_6_9", "flower_patches", "gaussian_noise", "uniform_noise"]
    loaders = dm.test_dataloader()
    assert next(iter(loaders[2])).index.tolist() == list(range(271))
    x2 = next(iter(loaders[0])).x
    assert torch.equal(x2, next(iter(dm.test_dataloader()[0])).x), "the fit split must not be augmented"


def test_augmentation_pads_with_the_normalised_background() -> None:
    bench = DigitsBenchmark()
    mean, std = bench._stats
    background = -mean / std
    plain, augmented = bench.train(augment=False), bench.train(augment=True)
    torch.manual_seed(0)
    shifted = 0
    for i in range(30):
        x, original = augmented[i][0], plain[i][0]
        shifted += int(not torch.equal(x, original))
        # every pixel is either a pixel of the image or the black background (zero padding would add grey)
        assert bool((torch.isclose(x, torch.tensor(background)) | torch.isin(x, original)).all())
    assert shifted > 10


def test_batches_are_pinned_by_the_loader(monkeypatch) -> None:
    """`pin_memory=True` pins every tensor of a `Batch` (torch's loader leaves objects without `pin_memory()` as
    they are). Pinning needs a GPU, so a stand-in marks the tensors it was called on."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from ood.data.batch import Batch

    pinned: list[torch.Tensor] = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(self.clone()) or pinned[-1])
    batch = Batch(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([5, 6]), torch.randn(4, 3))
    out = pin_memory(batch)
    assert isinstance(out, Batch) and [id(t) for t in (out.x, out.y, out.index, out.x_out)] == [id(t) for t in pinned]
    assert torch.equal(out.x, batch.x) and torch.equal(out.x_out, batch.x_out)
    assert pin_memory(Batch(batch.x, batch.y, batch.index)).x_out is None


@pytest.mark.parametrize(("option", "message"), [
    ({"batch_size": 32.5}, r"data.batch_size=32.5 is outside its range whole numbers in \[1, inf\]"),
    ({"eval_batch_size": 0}, r"data.eval_batch_size=0 is outside its range whole numbers in \[1, inf\]"),
    ({"outlier_batch_size": 64.0}, r"data.outlier_batch_size=64.0 is a count: write 64"),
    ({"num_workers": -1}, r"data.num_workers=-1 is outside its range whole numbers in \[0, inf\]"),
    ({"fit_seed": 0.5}, r"data.fit_seed=0.5 is outside its range whole numbers in \[0, inf\]"),
    ({"fit_fraction": True}, r"data.fit_fraction must be in \(0, 1\], got True"),  # was taken as 1
])
def test_a_fractional_or_negative_loader_count_is_refused_by_name(option: dict, message: str) -> None:
    """`data.batch_size=32.5` and `data.num_workers=-1` ended in the DataLoader's traceback (`batch_size should be a
    positive integer value`) once the run folder was made; `data.fit_seed=0.5` in torch.manual_seed's, after the
    training, as the fit split was drawn."""
    with pytest.raises(ConfigError, match=rf"^{message}"):
        OODDataModule(DigitsBenchmark(), **option)


@pytest.mark.parametrize(("option", "message"), [
    ({"image_size": 0}, r"data.benchmark.image_size=0 is outside its range whole numbers in \[1, inf\]"),
    ({"image_size": 3.5}, r"data.benchmark.image_size=3.5 is outside its range whole numbers in \[1, inf\]"),
    ({"seed": 0.5}, r"data.benchmark.seed=0.5 is outside its range whole numbers in \[0, inf\]"),
])
def test_a_fractional_or_nonpositive_digits_size_or_seed_is_refused_by_name(option: dict, message: str) -> None:
    """`data.benchmark.image_size=0` (or 3.5) and `seed=0.5` failed in torch's resize or manual_seed, a traceback as
    the sets were built."""
    with pytest.raises(ConfigError, match=rf"^{message}$"):
        DigitsBenchmark(**option)


def _indices(loader: torch.utils.data.DataLoader) -> list[list[int]]:
    return [batch.index.tolist() for batch in loader]


def test_drop_last_false_keeps_the_last_partial_batch_of_the_same_permutation() -> None:
    """`data.drop_last=false` (OpenOOD's and energy_ood's loaders): 650 training images at batch 64 give
    ceil(650 / 64) = 11 steps, the last holding the 650 mod 64 = 10 images the default (10 steps) leaves out, in the
    order of the same (seed, epoch) permutation; the default keeps its 10 full batches."""
    dropped = _indices(OODDataModule(DigitsBenchmark(), batch_size=64, seed=3).train_dataloader())
    kept_loader = OODDataModule(DigitsBenchmark(), batch_size=64, seed=3, drop_last=False).train_dataloader()
    kept = _indices(kept_loader)
    assert len(kept_loader) == len(kept) == 11 and len(dropped) == 10
    assert [len(b) for b in kept] == [64] * 10 + [10] and kept[:10] == dropped
    permutation = list(EpochShuffle(range(650), seed=3))
    assert sum(kept, []) == permutation and sorted(permutation) == list(range(650))


def test_a_resumed_epoch_has_the_kept_partial_batch_of_an_uninterrupted_run() -> None:
    """The batches of epoch 2, the partial last one included, depend on (seed, epoch) only: a run resumed there
    (Lightning calls `set_epoch(2)` on a fresh loader) draws those of the run that went through epochs 0 and 1."""
    run = OODDataModule(DigitsBenchmark(), batch_size=64, seed=1, drop_last=False).train_dataloader()
    for epoch in range(3):
        run.sampler.set_epoch(epoch)
        uninterrupted = _indices(run)
    resumed = OODDataModule(DigitsBenchmark(), batch_size=64, seed=1, drop_last=False).train_dataloader()
    resumed.sampler.set_epoch(2)
    assert _indices(resumed) == uninterrupted and len(uninterrupted[-1]) == 10
    run.sampler.set_epoch(0)
    assert _indices(run) != uninterrupted, "epochs 0 and 2 drew the same order: nothing was compared"


def test_the_outlier_stream_pairs_the_kept_partial_batch_with_a_full_outlier_batch() -> None:
    """OE with the last ID batch kept: 11 ID batches an epoch, each with an outlier batch of 128 (OpenOOD's OETrainer
    and energy_ood's zip pair the partial ID batch with a full one); the outlier stream holds 11 + 1 batches (it had
    10 + 1, so the 11th ID batch ended the epoch without outliers)."""
    dm = OODDataModule(DigitsBenchmark(), batch_size=64, seed=0, drop_last=False)
    dm.use_streams(("id", "outliers"), "oe")
    combined = dm.train_dataloader()
    ident, out = combined.iterables["id"], combined.iterables["outliers"]
    assert len(out.sampler) == 12 * 128 and len(out) == 12 and len(ident) == 11
    sizes = [(len(batch["id"].index), len(batch["outliers"].index)) for batch, _, _ in combined]
    assert sizes == [(64, 128)] * 10 + [(10, 128)]


def test_drop_last_false_under_two_ranks_counts_the_padded_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    """World 2, global batch 64: each rank's shard is padded to ceil(650 / 2) = 325 images (Lightning's
    `DistributedSampler`), 32 a batch: ceil(325 / 32) = 11 batches, the last of 325 mod 32 = 5, on both ranks; the
    outlier stream has (11 + 1) x 64 indices a rank. With the default: 10 batches and (10 + 1) x 64."""
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler

    from ood.data import benchmark as bm

    monkeypatch.setattr(bm.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(bm.dist, "get_world_size", lambda *a, **k: 2)
    for drop_last, batches, last in ((False, 11, 5), (True, 10, 32)):
        for rank in (0, 1):
            monkeypatch.setattr(bm.dist, "get_rank", lambda *a, r=rank, **k: r)
            dm = OODDataModule(DigitsBenchmark(), batch_size=64, seed=0, drop_last=drop_last)
            dm.use_streams(("id", "outliers"), "oe")
            loaders = dm.train_dataloader().iterables
            sharded = _update_dataloader(loaders["id"], DistributedSampler(loaders["id"].dataset, 2, rank, seed=0))
            sizes = [len(b) for b in _indices(sharded)]
            assert (len(sharded), len(sizes), sizes[-1], sum(sizes)) == (batches, batches, last, 325 - 5 * drop_last)
            assert len(loaders["outliers"].sampler) == (batches + 1) * 64


def test_a_kept_last_batch_of_one_image_is_refused_and_a_batch_above_the_set_trains() -> None:
    """650 = 11 x 59 + 1: the kept last batch of one image would stop training in BatchNorm's "Expected more than 1
    value per channel when training" at the end of the first epoch; now one line before training. With the default
    it is dropped (11 steps). A batch larger than the set is one partial batch of 650 with drop_last=false (the
    default refuses it: no step would run)."""
    with pytest.raises(ConfigError, match=r"^data.drop_last=false keeps a last training batch of 1 image \(650 ID "
                                          r"training images, 1 rank\(s\), data.batch_size=59\), on which BatchNorm "
                                          r"cannot train: change data.batch_size or set data.drop_last=true$"):
        OODDataModule(DigitsBenchmark(), batch_size=59, drop_last=False).train_dataloader()
    assert len(OODDataModule(DigitsBenchmark(), batch_size=59).train_dataloader()) == 11
    whole = OODDataModule(DigitsBenchmark(), batch_size=1000, drop_last=False).train_dataloader()
    assert [len(b) for b in _indices(whole)] == [650]
    with pytest.raises(ConfigError, match=r"^data.batch_size=1000 is larger than the 650 ID training images"):
        OODDataModule(DigitsBenchmark(), batch_size=1000).train_dataloader()
    with pytest.raises(ConfigError, match=r"^data.drop_last='no'; choices: \[true, false\]$"):
        OODDataModule(DigitsBenchmark(), drop_last="no")


def test_batches_are_pinned_only_where_a_gpu_takes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CIFAR / ImageNet configs set `pin_memory: true` (for the GPU); on a CPU-only machine torch warned "no
    accelerator is found" at every loader. Pinned only where CUDA is there."""
    import warnings

    from ood.data import DigitsBenchmark, OODDataModule

    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert OODDataModule(DigitsBenchmark(), pin_memory=True).pin_memory is cuda
    monkeypatch.undo()
    if not torch.cuda.is_available():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            next(iter(OODDataModule(DigitsBenchmark(), pin_memory=True, batch_size=8).test_dataloader()[0]))


def test_the_fit_count_is_said(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows record `data.fit_fraction`, not how many images the detectors fit on (0.1 of 32 images: 3): the
    evaluation says it once."""
    import logging

    from helpers import capture_warnings_of

    from ood.data import DigitsBenchmark, OODDataModule

    capture_warnings_of("ood.data.benchmark", monkeypatch, caplog)
    dm = OODDataModule(DigitsBenchmark(), fit_fraction=0.1, fit_seed=3)
    with caplog.at_level(logging.INFO, logger="ood.data.benchmark"):
        fit = dm._eval_sets()[0][1]
    n = len(DigitsBenchmark().train(augment=False))
    assert [r.getMessage() for r in caplog.records] == [
        f"detectors fit on {len(fit)} of the {n} ID train images (data.fit_fraction=0.1, data.fit_seed=3)"]
    assert len(fit) == round(0.1 * n)
