"""The newer benchmarks as data, each on a fabricated tree in its real on-disk layout (tiny random images):

- `data=cifar10`: OpenOOD's CIFAR-10-C list as the covariate-shifted ID (csid) set;
- `data=imagenet1k` `openood_v1.5`: ImageNet-V2/-C/-R/-ES lists as csid (ImageNet-C fed as stored, ImageNet-ES
  optional); `imagenet_ood` (ImageNet-OOD's path-only list over ImageNet-21K folders); `ninco` (NINCO's 64 class
  folders and 17 unit-test folders); `imagenet_x` / `imagenet_fs_x` (OOD-X's class files splitting OpenOOD's
  ImageNet lists into an ID half, relabelled, and an OOD half).

Every listed set is read (names, sizes, labels), a missing one is named with where to get it, and each protocol runs
end to end: the evaluation pass of a random (untrained) small CNN, with full-spectrum rows where the protocol has
csid sets.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_config
from omegaconf import OmegaConf
from PIL import Image

from ood import CONFIG_DIR
from ood.errors import ConfigError, DataNotFoundError
from ood.utils import instantiate

RNG = np.random.default_rng(0)
SIDE = 16  # evaluation image size in these tests (resize = crop = 16)
#: the ID half and the OOD half of OOD-X's class split, on the fabricated labels 0..5
FIRST, SECOND = [4, 0, 2], [1, 3, 5]
NINCO = OmegaConf.load(CONFIG_DIR / "data" / "imagenet1k.yaml").benchmark.protocols.ninco


def _image(path: Path, side: int = 20) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    return path.name


def _list(root: Path, name: str, base: str, folder: str, labels: list[int] | None, side: int = 20) -> None:
    """`benchmark_imglist/imagenet/<name>.txt` over `<base>/<folder>/`, one image per label (None: path-only lines)."""
    n = len(labels) if labels is not None else 3
    lines = []
    for i in range(n):
        _image(root / base / folder / f"{i:03d}.jpg", side)
        lines.append(f"{folder}/{i:03d}.jpg" + ("" if labels is None else f" {labels[i]}"))
    target = root / "benchmark_imglist" / "imagenet" / f"{name}.txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines) + "\n")


#: list name -> labels (ID and csid lists; six classes, so both OOD-X halves are present) or OOD size
ID_LISTS = {"train_imagenet": [0, 1, 2, 3, 4, 5, 0, 2], "val_imagenet": [5, 4, 3, 2, 1, 0],
            "test_imagenet": [0, 1, 2, 3, 4, 5, 4], "test_imagenet_v2": [2, 3, 4], "test_imagenet_c": [0, 1, 0, 5],
            "test_imagenet_r": [1, 2, 4, 5, 4], "test_imagenet_es": [3, 4]}
OOD_LISTS = {"test_ssb_hard": 2, "test_ninco": 2, "test_inaturalist": 3, "test_textures": 2, "test_openimage_o": 2,
             "val_openimage_o": 2}


def make_imagenet_tree(root: Path) -> Path:
    """OpenOOD's ImageNet-1K lists (with the v1.5 csid lists), ImageNet-OOD over ImageNet-21K, NINCO, OOD-X class files."""
    for name, labels in ID_LISTS.items():
        # ImageNet-C's images are stored at the network's input size (no resize / crop)
        _list(root, name, "images_largescale", name, labels, side=SIDE if name.endswith("_c") else 20)
    for name, n in OOD_LISTS.items():
        _list(root, name, "images_classic" if name == "test_textures" else "images_largescale", name, [-1] * n)
    for i, wnid in enumerate(["n02925009", "n07843636", "n12805146"]):
        _image(root / "imagenet21k" / wnid / f"{wnid}_{i}.JPEG")
    (root / "imagenetood").mkdir()
    (root / "imagenetood" / "imagenetood.txt").write_text(
        "n02925009/n02925009_0.JPEG\nn07843636/n07843636_1.JPEG\nn12805146/n12805146_2.JPEG\n")
    for group in ("near", "far"):
        for spec in NINCO[group].values():
            _image(root / spec.folder / "000.png")
    (root / "ood_x").mkdir()
    (root / "ood_x" / "first_datasets.txt").write_text("\n".join(map(str, FIRST)))
    (root / "ood_x" / "second_datasets.txt").write_text("\n".join(map(str, SECOND)))
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagenet_tree(tmp_path_factory.mktemp("imagenet_new"))


def _bench(tree: Path, tmp_path: Path, protocol: str, *extra: str):  # noqa: ANN202 - a FileBenchmark
    cfg = compose_config(tmp_path, ["data=imagenet1k", f"paths.data_dir={tree}", f"data.benchmark.protocol={protocol}",
                                    f"data.benchmark.image_size={SIDE}", f"data.benchmark.resize={SIDE}", *extra])
    return instantiate(cfg.data).benchmark


def _sets(bench: object) -> dict[str, tuple[str, int]]:
    return {s.name: (s.group, len(s.dataset)) for s in bench.ood_test()}  # type: ignore[attr-defined]


def _csid(bench: object) -> dict[str, list[int]]:
    return {s.name: [s.dataset[i][1] for i in range(len(s.dataset))] for s in bench.csid_test()}  # type: ignore[attr-defined]


def _half(labels: list[int], half: list[int]) -> list[int]:
    return [half.index(y) for y in labels if y in half]


def _ninco_key(folder: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", folder.lower()).strip("_")


# ----- reading ---------------------------------------------------------------------------------------------------
def test_openood_csid_lists(tree: Path, tmp_path: Path) -> None:
    bench = _bench(tree, tmp_path, "openood_v1.5")
    assert bench.csid_names == ("imagenet_v2", "imagenet_c", "imagenet_r", "imagenet_es")
    assert _csid(bench) == {k: ID_LISTS[f"test_{k}"] for k in bench.csid_names}
    x_c, x_v2 = bench.csid_test()[1].dataset[0][0], bench.csid_test()[0].dataset[0][0]
    assert x_c.shape == x_v2.shape == (3, SIDE, SIDE)
    # ImageNet-C: only to tensor + normalise (a resize of the 16-px image would change it at 16 px too, bilinear)
    raw = torch.from_numpy(np.array(Image.open(tree / "images_largescale/test_imagenet_c/000.jpg").convert("RGB")))
    mean, std = torch.tensor(bench.mean)[:, None, None], torch.tensor(bench.std)[:, None, None]
    assert torch.allclose(x_c, (raw.permute(2, 0, 1) / 255 - mean) / std, atol=1e-6)


def test_missing_csid_sets_are_named_optional_skipped(tree: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(tree, partial)
    (partial / "benchmark_imglist/imagenet/test_imagenet_es.txt").unlink()
    assert list(_csid(_bench(partial, tmp_path, "openood_v1.5"))) == ["imagenet_v2", "imagenet_c", "imagenet_r"]
    (partial / "benchmark_imglist/imagenet/test_imagenet_r.txt").unlink()
    with pytest.raises(DataNotFoundError, match="full-spectrum evaluation .* needs its covariate-shifted ID sets; missing"
                       ".*'imagenet_r' \\(looked for .*test_imagenet_r.txt; OpenOOD's benchmark: .*--datasets imagenet-1k"):
        _bench(partial, tmp_path, "openood_v1.5").csid_test()


def test_cifar10c_is_cifar10s_csid_set(tmp_path: Path) -> None:
    from ood.data import CIFAR10Benchmark

    lists = tmp_path / "benchmark_imglist" / "cifar10"
    lists.mkdir(parents=True)
    (lists / "train_cifar10.txt").write_text("")  # OpenOOD's tree: lists are read as they are
    names = [_image(tmp_path / "images_classic/cifar10c" / f"{i}.png", 32) for i in range(4)]
    (lists / "test_cifar10c.txt").write_text("".join(f"cifar10c/{n} {i + 3}\n" for i, n in enumerate(names)))
    bench = CIFAR10Benchmark(tmp_path, in_memory=False)
    assert bench.csid_names == ("cifar10c",) and _csid(bench) == {"cifar10c": [3, 4, 5, 6]}
    (lists / "test_cifar10c.txt").unlink()
    with pytest.raises(DataNotFoundError, match="'cifar10c' \\(looked for .*test_cifar10c.txt; OpenOOD's CIFAR-10-C: "
                       ".*--datasets cifar10c --dataset_mode dataset"):
        bench.csid_test()


def test_a_csid_folder_must_hold_the_id_classes_in_their_order(tmp_path: Path) -> None:
    """A csid folder is labelled by its sorted class folders: one of 3 of CIFAR-10's classes (as ImageNet-R holds 200
    of ImageNet's 1000) or numbered folders in text order (ImageNet-V2's 0..999) gave csid accuracies against the
    wrong classes, silently."""
    from ood.data import CIFAR10Benchmark
    from ood.data.sets import labelled_folder

    for k in ("airplane", "bird", "cat"):
        (tmp_path / "c10c" / k).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "c10c" / k / "0.png")
    bench = CIFAR10Benchmark(tmp_path, in_memory=False, protocols={"mine": {"csid": {"c10c": {"folder": "c10c"}}}},
                             protocol="mine")
    with pytest.raises(ConfigError, match=r"c10c: 3 class folders for 10 ID classes: its labels \(the index of each "
                                          r"sorted class folder\) would not be the ID classes; give it as an image list"):
        bench.csid_test()
    for k in range(11):
        (tmp_path / "v2" / str(k)).mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"v2: class folders named by numbers, whose text order \(0, 1, 10, ...\)"):
        labelled_folder(tmp_path / "v2", 11)
    labelled_folder(tmp_path / "c10c", 3)


def test_imagenet_ood_reads_the_path_only_list(tree: Path, tmp_path: Path) -> None:
    bench = _bench(tree, tmp_path, "imagenet_ood")
    bench.prepare()
    assert _sets(bench) == {"imagenet_ood": ("near", 3)}
    assert [bench.ood_test()[0].dataset[i][1] for i in range(3)] == [-1, -1, -1]
    assert list(_csid(bench)) == ["imagenet_v2", "imagenet_c", "imagenet_r", "imagenet_es"]
    partial = tmp_path / "partial"
    shutil.copytree(tree, partial, ignore=shutil.ignore_patterns("imagenetood"))
    with pytest.raises(DataNotFoundError, match="imagenetood.txt; the list imagenetood.txt from github.com/princetonvisualai"):
        _bench(partial, tmp_path, "imagenet_ood").prepare()


def test_ninco_classes_and_unit_tests(tree: Path, tmp_path: Path) -> None:
    bench = _bench(tree, tmp_path, "ninco")
    bench.prepare()
    sets = _sets(bench)
    assert len(sets) == 64 + 17
    assert {n for n, (g, _) in sets.items() if g == "near"} == {f"ninco_{_ninco_key(Path(s.folder).name)}" for s in NINCO.near.values()}
    assert sets["unit_gaussian"] == ("far", 1) and sets["ninco_caracal_caracal_caracal"] == ("near", 1)
    partial = tmp_path / "partial"
    shutil.copytree(tree, partial, ignore=shutil.ignore_patterns("high heels"))
    with pytest.raises(DataNotFoundError, match="'ninco_high_heels' \\(looked for .*NINCO_OOD_classes/high heels/; "
                       "NINCO_all.tar.gz from https://zenodo.org/record/8013288"):
        _bench(partial, tmp_path, "ninco").prepare()


@pytest.mark.parametrize("protocol", ["imagenet_x", "imagenet_fs_x"])
def test_imagenet_x_splits_the_classes(tree: Path, tmp_path: Path, protocol: str) -> None:
    bench = _bench(tree, tmp_path, protocol)
    bench.prepare()
    assert bench.num_classes == 500
    for split, name in (("train", "train_imagenet"), ("val", "val_imagenet"), ("test", "test_imagenet")):
        dataset = getattr(bench, split)() if split != "train" else bench.train(augment=False)
        assert [dataset[i][1] for i in range(len(dataset))] == _half(ID_LISTS[name], FIRST)
    ood = {"imagenet_x_ood": ("near", len(_half(ID_LISTS["test_imagenet"], SECOND)))}
    if protocol == "imagenet_fs_x":
        ood |= {f"imagenet_{v}_x_ood": ("near", len(_half(ID_LISTS[f"test_imagenet_{v}"], SECOND))) for v in ("v2", "r", "c")}
        assert _csid(bench) == {f"imagenet_{v}_x_id": _half(ID_LISTS[f"test_imagenet_{v}"], FIRST) for v in ("v2", "r", "c")}
    assert _sets(bench) == ood
    assert len(bench.ood_val()) == len(_half(ID_LISTS["val_imagenet"], SECOND))
    partial = tmp_path / "partial"
    shutil.copytree(tree, partial)
    (partial / "ood_x/second_datasets.txt").unlink()
    with pytest.raises(DataNotFoundError, match="second_datasets.txt; the class files .*github.com/hoshi23/OOD-X-Banchmarks"):
        _bench(partial, tmp_path, protocol).prepare()


# ----- end to end: the evaluation pass of an untrained model -------------------------------------------------------
EVAL = [f"data.benchmark.image_size={SIDE}", f"data.benchmark.resize={SIDE}", "backbone=small_cnn", "logger=none",
        "trainer.enable_progress_bar=false", "data.num_workers=0", "data.pin_memory=false", "data.eval_batch_size=64",
        "detectors.names=[msp]", "detectors.tune=false",
        # rows straight from the callback: no files, figures or console table (NINCO has 81 sets)
        "~evaluation.sinks.results", "~evaluation.sinks.table"]
#: protocol -> (OOD sets and sizes, csid sets or None for a protocol without them)
E2E = {
    "imagenet_ood": ({"imagenet_ood": 3}, ["imagenet_v2", "imagenet_c", "imagenet_r", "imagenet_es"]),
    "ninco": (None, None),
    "imagenet_x": ({"imagenet_x_ood": 3}, None),
    "imagenet_fs_x": ({"imagenet_x_ood": 3, "imagenet_v2_x_ood": 1, "imagenet_r_x_ood": 2, "imagenet_c_x_ood": 2},
                      ["imagenet_v2_x_id", "imagenet_r_x_id", "imagenet_c_x_id"]),
}


@pytest.mark.parametrize("protocol", [pytest.param(p, marks=pytest.mark.slow) if p == "ninco" else p for p in E2E])
def test_protocol_end_to_end(tree: Path, tmp_path: Path, protocol: str) -> None:
    from ood.train import build

    expected, csid = E2E[protocol]
    fsood = [f"evaluation.fsood={csid is not None}"]
    cfg = compose_config(tmp_path, ["data=imagenet1k", f"paths.data_dir={tree}", f"data.benchmark.protocol={protocol}",
                                    *EVAL, *fsood])
    method, datamodule, trainer, evaluation = build(cfg)
    trainer.test(method, datamodule=datamodule, verbose=False)
    rows = evaluation.rows
    standard = {r["ood_dataset"]: r["n_ood"] for r in rows if r["mode"] == "standard" and r["detector"] == "msp"}
    if expected is None:  # ninco: every class and unit test, one image each
        expected = {n: 1 for n in _sets(datamodule.benchmark)}
        assert len(expected) == 81
    assert standard == expected
    if csid is not None:
        full = [r for r in rows if r["mode"] == "fsood" and r["detector"] == "msp"]
        assert {r["ood_dataset"] for r in full} == set(expected) and list(full[0]["csid_set_acc"]) == csid
        n_csid = sum(len(s.dataset) for s in datamodule.benchmark.csid_test())
        assert {r["n_id"] for r in full} == {len(datamodule.benchmark.test()) + n_csid}
