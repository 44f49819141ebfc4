"""The OE / energy papers' validation OOD sets (`{synthetic: hendrycks}`, ood/data/synthetic.py) against a
transcription of the lambdas of wetliu/energy_ood CIFAR/test.py:297-424 (= hendrycks/outlier-exposure CIFAR/test.py:
294-424), on the same fabricated images; the union's size, content and seeding; the in-memory and PIL paths; the
missing-source errors; `experiment=energy_ce`'s validation OOD."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from helpers import compose_config
from PIL import Image
from PIL import Image as PILImage
from torch.utils.data import Dataset
from torchvision import transforms as trn

from ood.data import CIFAR10Benchmark
from ood.data.memory import to_memory
from ood.data.sets import SetSpec
from ood.data.synthetic import (
    HENDRYCKS_SETS,
    arithmetic_mean,
    geometric_mean,
    invert,
    jigsaw,
    pixelate,
    rgb_shift,
    speckle,
    synthetic_set,
    uniform_noise,
)
from ood.errors import ConfigError, DataNotFoundError

# ----- energy_ood CIFAR/test.py, as released (52-56, 380-420) ------------------------------------------------------
mean = [x / 255 for x in [125.3, 123.0, 113.9]]
std = [x / 255 for x in [63.0, 62.1, 66.7]]
ref_test_transform = trn.Compose([trn.ToTensor(), trn.Normalize(mean, std)])
jigsaw_ref = lambda x: torch.cat((  # noqa: E731
    torch.cat((torch.cat((x[:, 8:16, :16], x[:, :8, :16]), 1),
               x[:, 16:, :16]), 2),
    torch.cat((x[:, 16:, 16:],
               torch.cat((x[:, :16, 24:], x[:, :16, 16:24]), 2)), 2),
), 1)
pixelate_ref = lambda x: x.resize((int(32 * 0.2), int(32 * 0.2)), PILImage.BOX).resize((32, 32), PILImage.BOX)  # noqa: E731
rgb_shift_ref = lambda x: torch.cat((x[1:2].index_select(2, torch.LongTensor([i for i in range(32 - 1, -1, -1)])),  # noqa: E731
                                     x[2:, :, :], x[0:1, :, :]), 0)
invert_ref = lambda x: torch.cat((x[0:1, :, :], 1 - x[1:2, :, ], 1 - x[2:, :, :],), 0)  # noqa: E731
# ---------------------------------------------------------------------------------------------------------------------

SOURCE = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
#: half a grey level in the normalised input (the sets are stored as the nearest uint8 pixels), plus float rounding
HALF_LEVEL = torch.tensor([0.5 / 255 / s for s in std]).view(3, 1, 1) + 1e-6


def pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image)


def tensor(image: np.ndarray) -> torch.Tensor:
    return trn.ToTensor()(pil(image))


def test_the_permutations_and_pixelate_equal_the_released_lambdas_exactly() -> None:
    for ours, image in zip(jigsaw(SOURCE), SOURCE):
        assert torch.equal(tensor(ours), jigsaw_ref(tensor(image)))
    for ours, image in zip(rgb_shift(SOURCE), SOURCE):
        assert torch.equal(tensor(ours), rgb_shift_ref(tensor(image)))
    for ours, image in zip(pixelate(SOURCE), SOURCE):
        assert torch.equal(tensor(ours), trn.ToTensor()(pixelate_ref(pil(image))))
    for ours, image in zip(invert(SOURCE), SOURCE):
        torch.testing.assert_close(tensor(ours), invert_ref(tensor(image)), rtol=0, atol=1e-6)


def test_the_means_and_speckle_are_the_released_values_to_the_nearest_grey_level() -> None:
    a, b = SOURCE[:6], SOURCE[6:]
    noise = np.random.default_rng(1).standard_normal(a.shape, dtype=np.float32)
    cases = [
        (arithmetic_mean(a, b), [ref_test_transform(pil(x)) / 2. + ref_test_transform(pil(y)) / 2. for x, y in zip(a, b)]),
        (geometric_mean(a, b), [trn.Normalize(mean, std)(torch.sqrt(tensor(x) * tensor(y))) for x, y in zip(a, b)]),
        # test.py:394's lambda, torch.randn_like(x) given as the same draws
        (speckle(a, noise), [trn.Normalize(mean, std)(torch.clamp(tensor(x) + tensor(x) * torch.from_numpy(n).permute(2, 0, 1), 0, 1))
                             for x, n in zip(a, noise)]),
    ]
    for ours, reference in cases:
        for image, ref in zip(ours, reference):
            assert ((ref_test_transform(pil(image)) - ref).abs() <= HALF_LEVEL).all()


def test_uniform_noise_is_uniform_minus_one_one_in_normalised_space() -> None:
    ours = uniform_noise(np.random.default_rng(3), 4, 32, mean, std)
    u = np.random.default_rng(3).uniform(size=(4, 3, 32, 32), low=-1.0, high=1.0).astype(np.float32)  # test.py:300-302
    for image, ref in zip(ours, torch.from_numpy(u)):
        assert ((ref_test_transform(pil(image)) - ref).abs() <= HALF_LEVEL).all()


class Source(Dataset):
    """Items (uint8 image, label), as a spec read through `decoding(eval transform)` gives them."""

    def __len__(self) -> int:
        return len(SOURCE)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return SOURCE[i], i % 10


def build(seed: int = 0, per_set: int = 4) -> Any:
    transform = trn.Compose([trn.Resize(32), trn.CenterCrop(32), trn.ToTensor(), trn.Normalize(mean, std)])
    return synthetic_set("hendrycks", Source(), transform, per_set=per_set, seed=seed)


def test_the_union_holds_each_set_in_equal_parts_made_from_distinct_source_images_seeded() -> None:
    ds = build()
    assert len(ds) == 8 * 4 and ds.parts == tuple((name, 4) for name in HENDRYCKS_SETS)
    assert [ds.describe(i) for i in (0, 4, 31)] == ["hendrycks:uniform[0]", "hendrycks:arithmetic_mean[0]", "hendrycks:invert[3]"]
    assert {ds[i][1] for i in range(len(ds))} == {-1}
    for part, transform in ((3, jigsaw), (6, rgb_shift), (7, invert)):  # each image one of the source's, none twice
        flat = transform(SOURCE).reshape(len(SOURCE), -1)
        found = [int(np.flatnonzero((flat == image.reshape(-1)).all(1))[0]) for image in ds.images[part * 4:(part + 1) * 4]]
        assert len(set(found)) == 4
    again, other = build(), build(seed=1)
    assert np.array_equal(again.images, ds.images) and repr(again) == repr(ds)
    assert not np.array_equal(other.images[:8], ds.images[:8]) and repr(other) != repr(ds)
    with pytest.raises(ConfigError, match="per_set=1 and the source's 12 images must be at least 2"):
        build(per_set=1)


def test_a_source_smaller_than_per_set_gives_all_its_images_to_each_set(caplog: pytest.LogCaptureFixture) -> None:
    """energy_ce's 2,000 a set from a fabricated (or cut) source of 12 images: each set takes the 12, warned of."""
    with caplog.at_level(logging.WARNING, logger="ood.data.synthetic"):
        ds = build(per_set=13)
    assert ds.parts == tuple((name, 12) for name in HENDRYCKS_SETS)
    assert "per_set=13 but the source holds 12 images: 12 per set" in caplog.text
    flat = jigsaw(SOURCE).reshape(len(SOURCE), -1)
    found = sorted(int(np.flatnonzero((flat == image.reshape(-1)).all(1))[0]) for image in ds.images[3 * 12:4 * 12])
    assert found == list(range(12))


def test_in_memory_and_pil_paths_give_the_same_images(tmp_path: Path) -> None:
    ds = build()
    memory = to_memory(ds, tmp_path)
    assert len(memory) == len(ds)
    for i in range(len(ds)):
        x, y = memory[i]
        assert torch.equal(x, ds[i][0]) and y == -1


def test_spec_parse_refusals() -> None:
    with pytest.raises(ConfigError, match=r"unknown synthetic recipe 'oe'; choices: \['hendrycks'\]"):
        SetSpec.parse("val_ood", {"synthetic": "oe", "source": {"torchvision": "cifar100"}})
    with pytest.raises(ConfigError, match="`synthetic` and `source` go together"):
        SetSpec.parse("val_ood", {"synthetic": "hendrycks"})
    with pytest.raises(ConfigError, match=r"`per_set` and `seed` belong to a synthetic set"):
        SetSpec.parse("val_ood", {"folder": "imgs", "seed": 3})
    with pytest.raises(ConfigError, match=r"made from its `source` alone; it also gives \['imglist'\] \(replace the spec"):
        SetSpec.parse("val_ood", {"imglist": "l.txt", "synthetic": "hendrycks", "source": {"torchvision": "cifar100"}})
    spec = SetSpec.parse("val_ood", {"synthetic": "hendrycks", "source": "imgs", "how": "get imgs", "optional": True})
    assert (spec.source.folder, spec.source.how, spec.source.optional) == ("imgs", "get imgs", True)


def test_a_file_benchmark_builds_it_from_a_folder_source(tmp_path: Path) -> None:
    """`SetSpec.open` (FileBenchmark's path): a folder source at the evaluation size (40-pixel files, resized)."""
    (tmp_path / "imgs").mkdir()
    for i in range(6):
        Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    spec = SetSpec.parse("val_ood", {"synthetic": "hendrycks", "source": {"folder": "imgs"}, "per_set": 2})
    transform = trn.Compose([trn.Resize(32), trn.CenterCrop(32), trn.ToTensor(), trn.Normalize(mean, std)])
    ds = spec.open(tmp_path, "synthetic", transform, label=-1)
    assert ds.images.shape == (16, 32, 32, 3)
    assert set(np.unique(ds.images[14:16, ..., 0])) <= {40 * i for i in range(6)}  # invert keeps red: the grey levels
    spec = SetSpec.parse("val_ood", {"synthetic": "hendrycks", "source": {"folder": "none"}, "how": "get them"})
    assert spec.missing(tmp_path, "synthetic") == [f"{tmp_path / 'none'}/"]


class FakeCIFAR:
    """torchvision's CIFAR10 / CIFAR100 standing in: 12 random 32-pixel images, or missing."""

    missing: set[str] = set()

    def __init__(self, root: str, train: bool = False, download: bool = False) -> None:
        if type(self).__name__ in FakeCIFAR.missing and not download:
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        self.data = np.random.default_rng(len(type(self).__name__) + train).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 10 for i in range(40)]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.data[i]), self.targets[i]


@pytest.fixture
def fake_cifar(monkeypatch: pytest.MonkeyPatch) -> type[FakeCIFAR]:
    FakeCIFAR.missing = set()
    for name in ("CIFAR10", "CIFAR100"):
        monkeypatch.setattr(torchvision.datasets, name, type(name, (FakeCIFAR,), {}))
    return FakeCIFAR


def benchmark(data_dir: Path, source: dict[str, Any]) -> CIFAR10Benchmark:
    val_ood = {"synthetic": "hendrycks", "source": source, "per_set": 3, "seed": 0}
    return CIFAR10Benchmark(data_dir, source="torchvision", val_size=10, protocol="p", protocols={"p": {"val_ood": val_ood}},
                            mean=mean, std=std)


def test_cifar_validation_ood_from_the_other_cifar_and_the_missing_source(tmp_path: Path, fake_cifar: type[FakeCIFAR]) -> None:
    bench = benchmark(tmp_path, {"torchvision": "cifar100"})
    bench.prepare()
    val_ood = bench.ood_val()
    cifar100 = np.stack([np.asarray(image) for image, _ in torchvision.datasets.CIFAR100(str(tmp_path))])
    assert len(val_ood) == 24 and val_ood[23][1] == -1
    flat = invert(cifar100).reshape(len(cifar100), -1)
    assert all((flat == image.reshape(-1)).all(1).any() for image in val_ood.images[21:])  # CIFAR-100's images
    assert torch.equal(to_memory(val_ood, None)[5][0], val_ood[5][0])
    fake_cifar.missing = {"CIFAR100"}
    with pytest.raises(DataNotFoundError, match=rf"'cifar100' not found in {tmp_path / 'torchvision' / 'cifar100'}.*data.download=true"):
        benchmark(tmp_path, {"torchvision": "cifar100"}).prepare()
    with pytest.raises(DataNotFoundError, match=r"'val_ood \(source of its synthetic sets\)' \(looked for .*/mine/; get mine\)"):
        benchmark(tmp_path, {"folder": "mine", "how": "get mine"}).prepare()
    with pytest.raises(DataNotFoundError, match=r"'val_ood \(source of its synthetic sets\)' \(looked for .*/mine/"):
        benchmark(tmp_path, {"folder": "mine"}).ood_val()



def test_a_missing_torchvision_source_names_the_set_it_is_read_for(tmp_path: Path, fake_cifar: type[FakeCIFAR]) -> None:
    """`experiment=energy_ce` on OpenOOD's tree (no torchvision files): the missing CIFAR-100 is named as the source
    of the validation OOD, at preparation and when the set is opened (it named the dataset alone)."""
    fake_cifar.missing = {"CIFAR100"}
    bench = benchmark(tmp_path, {"torchvision": "cifar100"})
    for call in (bench.prepare, bench.ood_val):
        with pytest.raises(DataNotFoundError, match=r"^cifar10: set 'val_ood \(source of its synthetic sets\)': "
                                                    r"torchvision dataset 'cifar100' not found in "):
            call()

@pytest.mark.parametrize(("data", "other"), [("cifar10", "cifar100"), ("cifar100", "cifar10")])
def test_energy_ce_tunes_on_the_synthetic_sets_of_the_other_cifar(tmp_path: Path, data: str, other: str) -> None:
    cfg = compose_config(tmp_path, ["experiment=energy_ce", f"data={data}"])
    spec = SetSpec.parse("val_ood", dict(cfg.data.benchmark.protocols.classic.val_ood))
    assert (spec.synthetic, spec.source.torchvision, spec.per_set, spec.seed) == ("hendrycks", other, 2000, 0)
    # OpenOOD's list of the other CIFAR's test images where its tree is (the CIFAR presets' source), else torchvision's
    assert spec.source.imglist == f"benchmark_imglist/{data}/test_{other}.txt"
    assert cfg.data.benchmark.protocol == "classic"


def test_pair_partners_are_uniform_over_the_other_images() -> None:
    """test.py:325-327 redraws `np.random.choice(len(dataset))` until it differs from the image's index."""
    from ood.data.synthetic import partners

    first = np.repeat(np.arange(4), 2000)
    other = partners(np.random.default_rng(0), first, 4)
    assert not (other == first).any()
    counts = np.bincount(first * 4 + other, minlength=16).reshape(4, 4)
    assert (counts[~np.eye(4, dtype=bool)] > 550).all()  # ~667 each
