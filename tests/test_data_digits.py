"""The embedded digits benchmark: fixed seeded splits, disjoint, the OOD sets and groups of the README (digits section)."""

from __future__ import annotations

import pytest
import torch

from ood.data import DigitsBenchmark, OODDataModule
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
])
def test_a_fractional_or_negative_loader_count_is_refused_by_name(option: dict, message: str) -> None:
    """`data.batch_size=32.5` and `data.num_workers=-1` ended in the DataLoader's traceback (`batch_size should be a
    positive integer value`) once the run folder was made."""
    with pytest.raises(ConfigError, match=rf"^{message}"):
        OODDataModule(DigitsBenchmark(), **option)
