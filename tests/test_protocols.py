"""Paper protocols as data (`data.benchmark.protocol=classic|oodformer`, `data=tinyimagenet|imagenet1k|imagenet200`),
each run end to end on fabricated trees in its real on-disk layout, and `backbone.weights` for post-hoc ImageNet runs.

Layouts fabricated (tiny random images): energy_ood's `dtd/images/<class>/`, `svhn/test_32x32.mat`, `places365/<class>/`,
ODIN's `LSUN_C/test/`, `LSUN_resize/LSUN_resize/`, `iSUN/iSUN_patches/`; OODformer's `cifar100-data/cifar-100-python/`
(pickles), `Imagenet_resize/Imagenet_resize/`, `svhn-data/`; the official `tiny-imagenet-200/` zip; OpenOOD's ImageNet
`benchmark_imglist/` over `images_largescale/` + `images_classic/`. torchvision's readers run on the fabricated files;
only their md5 checks are switched off (the files are not the real downloads).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import scipy.io
import torch
import torchvision
from fabricate import (
    CLASSIC,
    IMAGENET_OOD,
    OODFORMER,
    image_folder,
    make_openood_imagenet_tree,
    make_paper_tree,
    save_image,
)
from helpers import NO_FIGURES, compose_config, run_config
from PIL import Image

from ood.data import CIFAR10Benchmark, CIFAR100Benchmark
from ood.errors import CheckpointError, ConfigError, DataNotFoundError
from ood.utils import instantiate


@pytest.fixture(scope="module")
def paper_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_paper_tree(tmp_path_factory.mktemp("papers"))


@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's CIFAR and SVHN readers on fabricated files: skip only their md5 checks."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", lambda *args, **kwargs: True)


def _sets(bench: object) -> dict[str, tuple[str, int]]:
    return {s.name: (s.group, len(s.dataset)) for s in bench.ood_test()}  # type: ignore[attr-defined]


def test_classic_protocol_reads_the_energy_layout(paper_tree: Path, no_md5: None) -> None:
    bench = CIFAR10Benchmark(paper_tree, protocol="classic")
    bench.prepare()
    assert _sets(bench) == {name: ("far", n) for name, n in CLASSIC.items()}
    svhn = next(s.dataset for s in bench.ood_test() if s.name == "svhn")
    mat = scipy.io.loadmat(paper_tree / "svhn/test_32x32.mat")["X"]
    x, label = svhn[2]
    expected = bench.eval_transform()(Image.fromarray(mat[..., 2]))
    assert label == -1 and torch.equal(x, expected)
    # ImageFolder order (sorted class folders, then files); a 48 px texture is resized + centre-cropped to 32
    texture = next(s.dataset for s in bench.ood_test() if s.name == "texture")
    image = Image.open(paper_tree / "dtd/images/braided/001.jpg")
    assert torch.equal(texture[4][0], bench.eval_transform()(image)) and texture[4][0].shape == (3, 32, 32)
    assert len(bench.ood_val()) == 8  # OpenOOD's val_tin list, present in this tree


def test_oodformer_protocol_both_cifars(paper_tree: Path, no_md5: None) -> None:
    c10 = CIFAR10Benchmark(paper_tree, protocol="oodformer")
    c10.prepare()
    assert _sets(c10) == {name: ("far", n) for name, n in OODFORMER.items()}
    c100 = CIFAR100Benchmark(paper_tree, protocol="oodformer")
    c100.prepare()
    assert _sets(c100) == {"cifar10": ("far", 7), **{n: ("far", k) for n, k in OODFORMER.items() if n != "cifar100"}}


def test_missing_set_names_the_folder_and_how_to_get_it(paper_tree: Path, tmp_path: Path, no_md5: None) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(paper_tree, partial, ignore=shutil.ignore_patterns("LSUN_C", "iSUN"))
    with pytest.raises(DataNotFoundError) as err:
        CIFAR10Benchmark(partial, protocol="classic").prepare()
    message = str(err.value)
    assert f"{partial / 'LSUN_C'}/" in message and "LSUN.tar.gz" in message
    assert f"{partial / 'iSUN'}/" in message and "iSUN.tar.gz" in message and "'lsun_resize'" not in message


def test_missing_torchvision_set_of_a_protocol_gives_its_own_hint(paper_tree: Path, tmp_path: Path) -> None:
    """The classic protocol's SVHN (data_dir/svhn/test_32x32.mat) missing: the set's `how` (where to put the .mat),
    not OpenOOD's download, which never writes data_dir/svhn."""
    partial = tmp_path / "partial"
    shutil.copytree(paper_tree, partial, ignore=shutil.ignore_patterns("svhn"))
    with pytest.raises(DataNotFoundError) as err:
        CIFAR10Benchmark(partial, protocol="classic").prepare()
    message = str(err.value)
    assert f"torchvision dataset 'svhn' not found in {partial / 'svhn'}" in message
    assert message.endswith("SVHN test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ into data_dir/svhn "
                            "(data.download=true fetches it)")


def test_user_adds_a_set_by_naming_its_folder(paper_tree: Path, tmp_path: Path, no_md5: None) -> None:
    cfg = compose_config(tmp_path, [
        "data=cifar10", f"paths.data_dir={paper_tree}", "data.benchmark.protocol=classic",
        "+data.benchmark.protocols.classic.near.mine={folder: Imagenet_resize}",
    ])
    bench = instantiate(cfg.data).benchmark
    assert _sets(bench)["mine"] == ("near", OODFORMER["imagenet_resize"]) and len(_sets(bench)) == 7
    with pytest.raises(ConfigError, match="unknown protocol 'odin'; choices"):
        CIFAR10Benchmark(paper_tree, protocol="odin")
    with pytest.raises(ConfigError, match="unknown keys \\['fodler'\\]"):
        CIFAR10Benchmark(paper_tree, protocol="x", protocols={"x": {"far": {"a": {"fodler": "dtd"}}}})


E2E = [
    "backbone=small_cnn", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "data.num_workers=0",
    "data.pin_memory=false", "data.batch_size=8", "data.eval_batch_size=64", "detectors.names=[msp,knn]",
    "detectors.tune=false", "+trainer.num_sanity_val_steps=0", "+trainer.limit_val_batches=0", NO_FIGURES,
]


def _reported(rows: list[dict]) -> dict[str, tuple[str, int]]:
    assert {r["detector"] for r in rows} >= {"msp", "knn"}
    return {r["ood_dataset"]: (r["ood_group"], r["n_ood"]) for r in rows if r["detector"] == "msp"}


@pytest.mark.slow
@pytest.mark.parametrize("protocol, expected", [("classic", CLASSIC), ("oodformer", OODFORMER)])
def test_cifar_protocol_end_to_end(paper_tree: Path, tmp_path: Path, no_md5: None, protocol: str, expected: dict) -> None:
    rows = run_config(tmp_path, ["data=cifar10", f"paths.data_dir={paper_tree}", f"data.benchmark.protocol={protocol}", *E2E])
    assert _reported(rows) == {name: ("far", n) for name, n in expected.items()}


# ----- Tiny ImageNet ----------------------------------------------------------------------------------------------
WNIDS = ["n01443537", "n01629819", "n01641577"]
TIN_OOD = {"textures": 4, "inaturalist": 3, "sun": 5}


def make_tin_tree(root: Path) -> Path:
    """The official tiny-imagenet-200 zip layout plus the MOS OOD folders."""
    base = root / "tiny-imagenet-200"
    for wnid in WNIDS:
        for i in range(4):
            save_image(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", 64)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for i in range(6):
        save_image(base / "val/images" / f"val_{i}.JPEG", 64)
        lines.append(f"val_{i}.JPEG\t{WNIDS[(i * 2) % 3]}\t0\t0\t63\t63")
    (base / "val/val_annotations.txt").write_text("\n".join(lines) + "\n")
    (base / "wnids.txt").write_text("\n".join(reversed(WNIDS)) + "\n")
    image_folder(root / "dtd/images", "banded", TIN_OOD["textures"], side=80)
    image_folder(root / "iNaturalist", "images", TIN_OOD["inaturalist"], side=90)
    image_folder(root / "SUN", "images", TIN_OOD["sun"], side=70)
    return root


def test_tinyimagenet_reads_the_official_layout(tmp_path: Path) -> None:
    root = make_tin_tree(tmp_path)
    cfg = compose_config(tmp_path, ["data=tinyimagenet", f"paths.data_dir={root}", "data.benchmark.val_size=3"])
    bench = instantiate(cfg.data).benchmark
    bench.prepare()
    assert (bench.num_classes, len(bench.train()), len(bench.val()), len(bench.test())) == (200, 9, 3, 6)
    assert sorted(bench.val()[i][1] for i in range(3)) == [0, 1, 2]
    # labels: sorted wnid folders (ImageFolder's rule), whatever wnids.txt's order
    assert [bench.test()[i][1] for i in range(6)] == [(2 * i) % 3 for i in range(6)]
    assert _sets(bench) == {name: ("far", n) for name, n in TIN_OOD.items()}
    x, _ = next(s.dataset for s in bench.ood_test() if s.name == "sun")[0]
    assert x.shape == (3, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert bench.train(augment=True)[0][0].shape == (3, 64, 64)
    shutil.rmtree(root / "SUN")
    with pytest.raises(DataNotFoundError, match="SUN/; MOS SUN subset .*SUN.tar.gz"):
        instantiate(cfg.data).benchmark.prepare()
    # a resize below the crop: CenterCrop padded the 32-pixel image to 64 with black, silently
    small = compose_config(tmp_path, ["data=tinyimagenet", f"paths.data_dir={root}", "data.benchmark.resize=32"])
    with pytest.raises(ConfigError, match=r"data.benchmark.resize=32 is below the centre crop data.benchmark.image_size"
                                          r"=64, which would pad every image with black: set data.benchmark.image_size=32"):
        instantiate(small.data)


def test_annotated_classes_match_their_folders_in_either_unicode_form(tmp_path: Path) -> None:
    """An annotation file naming a class in NFC over class folders copied from macOS (NFD) read 'has no folder'."""
    import unicodedata

    from ood.data.sets import annotation_entries

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    for name in (nfd, "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
    (tmp_path / "annotations.txt").write_text(f"0.jpg\t{nfc}\t0\n1.jpg\tb\t0\n")
    assert annotation_entries(tmp_path / "annotations.txt", tmp_path / "train") == [("0.jpg", 1), ("1.jpg", 0)]


def test_id_splits_whose_classes_disagree_are_one_line_each(tmp_path: Path) -> None:
    """A file benchmark's ID splits were not checked against each other: a train folder lacking a class folder of
    val labelled val's later classes one higher than train's, silently (and a val folder lacking one, one lower); a
    class of a val list without training images, a label past num_classes, went on too. `prepare` (before any
    training) names the class and the split."""
    from ood.data.files import FileBenchmark

    for split, classes in (("train", "ac"), ("val", "abc"), ("val_short", "ab"), ("ood", "")):
        for c in classes:
            image_folder(tmp_path / split, c, 2, side=8)
    image_folder(tmp_path, "ood", 2, side=8)
    lines = {"train.txt": [0, 1, 2], "val.txt": [0, 1, 3], "test.txt": [0, 7]}
    for name, labels in lines.items():
        (tmp_path / name).write_text("".join(f"ood/{i % 2:03d}.jpg {y}\n" for i, y in enumerate(labels)))

    def bench(train: str, val: str, test: str = "val") -> FileBenchmark:
        spec = {"imglist": train, "images": "."} if train.endswith(".txt") else {"folder": train}
        return FileBenchmark(tmp_path, "mine", 4, spec, {"folder": test} if test == "val" else {"imglist": test, "images": "."},
                             {"p": {"far": {"o": {"folder": "ood"}}}}, "p",
                             val={"imglist": val, "images": "."} if val.endswith(".txt") else {"folder": val})

    with pytest.raises(DataNotFoundError, match=r"^mine:train has no class folder \['b'\], which mine:val has: the "
                                                r"labels are the index of each sorted class folder of a split"):
        bench("train", "val").prepare()
    with pytest.raises(DataNotFoundError, match=r"^mine:val has no class folder \['c'\], which mine:train has"):
        bench("val", "val_short").prepare()
    with pytest.raises(DataNotFoundError, match=r"^mine:train has no image of class\(es\) \[3\], which mine:val has "
                                                r"\(every ID class needs training images\)$"):
        bench("train.txt", "val.txt").prepare()
    with pytest.raises(DataNotFoundError, match=r"^mine:test: label\(s\) \[7\] are no ID class \(the 4 classes are "
                                                r"0..3\)$"):
        bench("train.txt", "train.txt", "test.txt").prepare()
    agreed = bench("val", "val")
    agreed.prepare()
    assert sorted({y for _, y in agreed.val()}) == [0, 1, 2]


def test_id_classes_no_split_has_are_warned_of(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """num_classes above the classes of the data (10 with 9 class folders, or a class absent from every list) passed
    silently: the head got outputs never trained and class-conditional detectors no statistics of those classes. One
    warning names them and the fix (a subset of a benchmark's classes, e.g. a smoke run on part of ImageNet's lists,
    is legitimate: not an error)."""
    from ood.data.files import FileBenchmark

    for c in "abc":
        image_folder(tmp_path / "train", c, 2, side=8)
    image_folder(tmp_path, "ood", 2, side=8)
    (tmp_path / "train.txt").write_text("".join(f"ood/{i % 2:03d}.jpg {y}\n" for i, y in enumerate([0, 1, 3])))

    def warned(num_classes: int, train: dict) -> list[str]:
        caplog.clear()
        FileBenchmark(tmp_path, "mine", num_classes, train, train, {"p": {"far": {"o": {"folder": "ood"}}}}, "p",
                      val=train).prepare()
        return [r.getMessage() for r in caplog.records if "have no image in any ID split" in r.getMessage()]

    with caplog.at_level(logging.WARNING):
        assert warned(5, {"folder": "train"}) == [
            "mine: 2 of the 5 ID classes (data.benchmark.num_classes=5) have no image in any ID split: [3, 4]; the "
            "network's outputs for them are never trained and class-conditional detectors have no statistics of them; "
            "if the data has 3 classes, set data.benchmark.num_classes=3"]
        assert warned(4, {"imglist": "train.txt", "images": "."})[0].endswith(
            "(data.benchmark.num_classes=4) have no image in any ID split: [2]; the network's outputs for them are never "
            "trained and class-conditional detectors have no statistics of them; give them training images if they are "
            "ID classes")
        assert warned(3, {"folder": "train"}) == []


@pytest.mark.slow
def test_tinyimagenet_end_to_end(tmp_path: Path) -> None:
    root = make_tin_tree(tmp_path / "data")
    rows = run_config(tmp_path / "run", ["data=tinyimagenet", f"paths.data_dir={root}", "data.benchmark.val_size=3",
                                         "data.benchmark.image_size=32", "data.benchmark.resize=32", *E2E])
    assert _reported(rows) == {name: ("far", n) for name, n in TIN_OOD.items()}
    assert {r["n_id"] for r in rows} == {6}


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_openood_imagenet_tree(tmp_path_factory.mktemp("imagenet"))


@pytest.mark.parametrize("name, classes", [("imagenet1k", 1000), ("imagenet200", 200)])
def test_imagenet_reads_openood_lists(imagenet_tree: Path, tmp_path: Path, name: str, classes: int) -> None:
    cfg = compose_config(tmp_path, [f"data={name}", f"paths.data_dir={imagenet_tree}"])
    bench = instantiate(cfg.data).benchmark
    bench.prepare()
    assert (bench.num_classes, len(bench.train()), len(bench.val()), len(bench.test()), len(bench.ood_val())) == (classes, 8, 4, 6, 3)
    assert _sets(bench) == IMAGENET_OOD
    x, y = bench.test()[4]
    assert x.shape == (3, 224, 224) and y == 4
    # each reads its OOD lists where OpenOOD v1.5's evaluation API does: ImageNet-200 its own under imagenet200/
    ninco = imagenet_tree / f"benchmark_imglist/{'imagenet' if name == 'imagenet1k' else name}/test_ninco.txt"
    ninco.rename(imagenet_tree / "ninco.bak")
    try:
        with pytest.raises(DataNotFoundError, match=f"{ninco.relative_to(imagenet_tree)}.*download.py --contents datasets --datasets imagenet"):
            bench.prepare()
    finally:
        (imagenet_tree / "ninco.bak").rename(ninco)


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision ResNet-50 state dict file (random weights, IMAGENET1K_V1's keys and shapes)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet50-0676ba61.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    return path


def test_resnet50_weights_load_and_say_where_to_get_them(resnet50_file: Path, tmp_path: Path) -> None:
    from ood.models import ResNet50

    reference = torchvision.models.resnet50()
    reference.load_state_dict(torch.load(resnet50_file))
    net = ResNet50(weights=str(resnet50_file)).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(net(x), reference.eval()(x), atol=1e-5)
    with pytest.raises(CheckpointError, match="torch/hub/checkpoints/resnet50-0676ba61.pth.*weights='IMAGENET1K_V1'"):
        ResNet50(weights=str(tmp_path / "nope.pth"))
    with pytest.raises(CheckpointError, match="with 200 classes\\): fc.bias has shape \\(1000,\\) in the file and \\(200,\\) in the model"):
        ResNet50(num_classes=200, weights=str(resnet50_file))


@pytest.mark.slow
def test_imagenet200_end_to_end(imagenet_tree: Path, tmp_path: Path) -> None:
    rows = run_config(tmp_path, ["data=imagenet200", f"paths.data_dir={imagenet_tree}", "data.benchmark.image_size=16",
                                 "data.benchmark.resize=16", "data.fit_fraction=0.5", "data.fit_seed=1", *E2E])
    assert _reported(rows) == IMAGENET_OOD and {r["id_dataset"] for r in rows} == {"imagenet200"}
    assert {(r["fit_fraction"], r["fit_seed"]) for r in rows} == {(0.5, 1)}


def test_fit_fraction_subsamples_the_fit_split_with_a_fixed_seed(imagenet_tree: Path, tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, ["data=imagenet1k", f"paths.data_dir={imagenet_tree}", "data.fit_fraction=0.5"])
    datamodule = instantiate(cfg.data)
    fit = dict((s.name, d) for s, d in datamodule._eval_sets())["train"]
    again = dict((s.name, d) for s, d in instantiate(cfg.data)._eval_sets())["train"]
    assert len(fit) == 4 and fit.indices == again.indices == sorted(fit.indices)
    other = compose_config(tmp_path, ["data=imagenet1k", f"paths.data_dir={imagenet_tree}", "data.fit_fraction=0.5", "data.fit_seed=3"])
    assert dict((s.name, d) for s, d in instantiate(other.data)._eval_sets())["train"].indices != fit.indices
    with pytest.raises(ConfigError, match="fit_fraction must be in \\(0, 1\\]"):
        instantiate(compose_config(tmp_path, ["data=imagenet1k", "data.fit_fraction=0"]).data)


# OpenOOD v1.5, transcribed: configs/pipelines/train/baseline.yml (sgd, 100 epochs, lr 0.1, momentum 0.9, wd 5e-4) +
# BaseTrainer (nesterov, cosine per iteration to 1e-6, stepped after the update), configs/datasets/<id>/<id>.yml (batch 128) and <id>_oe.yml (train_tin597,
# batch 256), train_oe.yml (lambda_oe 0.5), train_logitnorm.yml (tau 0.04), BasePreprocessor (flip, crop 32 pad 4),
# preprocessors/transform.py normalization_dict
OPENOOD_NORMALISATION = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                         "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))}
OPENOOD_METHOD = {"ce": {}, "oe": {"lam": 0.5}, "logitnorm": {"tau": 0.04}}


@pytest.mark.parametrize("method", ["ce", "oe", "logitnorm"])
@pytest.mark.parametrize("data", ["cifar10", "cifar100"])
def test_openood_presets_are_openoods_training_recipe(tmp_path: Path, data: str, method: str) -> None:
    cfg = compose_config(tmp_path, [f"experiment={data}_{method}"])
    opt, sched, bench = cfg.method.optimizer, cfg.method.scheduler, cfg.data.benchmark
    assert (opt._target_, opt.lr, opt.momentum, opt.weight_decay, opt.nesterov) == ("torch.optim.SGD", 0.1, 0.9, 5e-4, True)
    assert (sched._target_, sched.eta_min, sched.interval, sched.offset) == ("ood.methods.schedules.OpenOODCosine", 1e-6,
                                                                             "step", 0)
    assert (cfg.trainer.max_epochs, cfg.data.batch_size, cfg.backbone._target_) == (100, 128, "ood.models.ResNet18_32x32")
    assert (bench.augment, bench.crop_padding, bench.hflip, bench.image_size) == (True, 4, True, 32)
    mean, std = OPENOOD_NORMALISATION[data]
    assert bench.mean is None and bench.std is None  # the benchmark's own statistics:
    assert (instantiate(bench).mean, instantiate(bench).std) == (mean, std)
    assert {k: cfg.method[k] for k in OPENOOD_METHOD[method]} == OPENOOD_METHOD[method] and not cfg.method.init.ckpt
    if method == "oe":
        assert (cfg.data.outlier_batch_size, bench.outliers) == (256, "tin597")


#: the presets of recipes whose training loader keeps the last partial batch (OpenOOD v1.5's `get_dataloader`, which
#: OAL's oal_pipeline.py trains on too; energy_ood's CIFAR/train.py and outlier-exposure's CIFAR/baseline.py: no
#: drop_last), inherited ones included
KEEP_LAST_BATCH = {"cifar10_ce", "cifar100_ce", "cifar10_oe", "cifar100_oe", "cifar10_logitnorm", "cifar100_logitnorm",
                   "openood_ce", "grood_openood", "energy_ce", "energy_ft", "cifar10_energy_oe", "cifar100_energy_oe",
                   "cifar10_energy_cfl", "cifar10_oal", "cifar100_oal", "oal_openood"}


def test_openood_and_energy_ood_presets_keep_the_last_partial_batch(tmp_path: Path) -> None:
    """Those presets set `data.drop_last: false` (an epoch of 50000 CIFAR images at 128 is 391 steps, as released,
    not 390); the presets of other recipes and every data config keep the default, true; a command line sets it
    back; the composed DataModule takes it."""
    from omegaconf import OmegaConf

    from ood import CONFIG_DIR

    assert {p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")} > KEEP_LAST_BATCH
    others = ["cifar10_heatmap", "heatmap", "digits_energy"]
    drop = {name: compose_config(tmp_path, [f"experiment={name}"]).data.drop_last for name in [*KEEP_LAST_BATCH, *others]}
    assert drop == {**dict.fromkeys(KEEP_LAST_BATCH, False), **dict.fromkeys(others, True)}
    assert {p.stem: OmegaConf.load(p).drop_last for p in (CONFIG_DIR / "data").glob("*.yaml")} == dict.fromkeys(
        ["cifar10", "cifar100", "digits", "folder", "imagenet1k", "imagenet200", "tinyimagenet"], True)
    assert compose_config(tmp_path, ["experiment=cifar10_energy_cfl", "data.drop_last=true"]).data.drop_last is True
    datamodule = instantiate(compose_config(tmp_path, ["experiment=openood_ce", "data=digits", "data.batch_size=64"]).data)
    assert datamodule.drop_last is False and len(datamodule.train_dataloader()) == 11  # ceil(650 / 64)


def test_a_listed_image_that_is_missing_says_how_many_of_its_list_are(tmp_path: Path) -> None:
    """A file an OpenOOD list names but the download lacks stops the pass naming it, its list and how many of the
    list's files are missing (one: a file to fetch again; all: the images root is wrong). It said `image not found:
    <path>` alone, after the passes before it (hours at ImageNet size), with no word of the list or of the others."""
    from ood.data.imglist import ImageList

    save_image(tmp_path / "images" / "a.jpg")
    save_image(tmp_path / "images" / "b.jpg")
    listed = tmp_path / "test_set.txt"
    listed.write_text("a.jpg -1\nb.jpg -1\nc.jpg -1\nd.jpg -1\n")
    images = ImageList(listed, tmp_path / "images", torchvision.transforms.ToTensor())
    stats: list[Path] = []
    is_file = Path.is_file
    with pytest.MonkeyPatch.context() as patch:  # one stat a read (1.28 M an ImageNet epoch), as before the message
        patch.setattr(Path, "is_file", lambda self: stats.append(self) or is_file(self))
        assert images[1][0].shape == (3, 32, 32)
    assert stats == [tmp_path / "images" / "b.jpg"]
    with pytest.raises(DataNotFoundError, match=f"image not found: {tmp_path}/images/c.jpg \\(missing: 2 of the 4 "
                                                f"images listed in {listed}\\)$"):
        images[2]


def test_a_list_or_annotation_file_that_is_not_utf8_empty_or_malformed_is_one_line(tmp_path: Path) -> None:
    """An image list, class list or annotation file in Latin-1, a binary file in its place, an empty one, a class
    list of words, annotations split by spaces: one line naming the file (was Python's UnicodeDecodeError or
    ValueError naming none; an empty list or class list was an empty set, silently)."""
    from ood.data.imglist import read_imglist, subset_entries
    from ood.data.sets import annotation_entries
    from ood.errors import OODError

    (tmp_path / "latin1.txt").write_bytes("caf\xe9/1.png 0\n".encode("latin-1"))
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "words.txt").write_text("3\ncat\n")
    (tmp_path / "spaces.txt").write_text("0.jpg n01 0 0 8 8\n")
    (tmp_path / "train" / "n01").mkdir(parents=True)
    cases = [
        (lambda: read_imglist(tmp_path / "latin1.txt"), r"latin1.txt: the image list is not UTF-8 text \(byte 3 is b'\\xe9'\)"),
        (lambda: read_imglist(tmp_path / "binary.txt"), r"binary.txt: the image list is not UTF-8 text \(byte 0 is b'\\x89'\)"),
        (lambda: read_imglist(tmp_path / "empty.txt"), r"empty.txt: the image list is empty"),
        (lambda: read_imglist(tmp_path), r"image list not found: .* \(it is a folder\)$"),
        (lambda: subset_entries([("a.png", 3)], tmp_path / "words.txt"),
         r"words.txt: expected one class index \(an integer\) a line, got 'cat'$"),
        (lambda: subset_entries([("a.png", 3)], tmp_path / "empty.txt"), r"empty.txt: the class list is empty"),
        (lambda: annotation_entries(tmp_path / "spaces.txt", tmp_path / "train"),
         r"spaces.txt:1: expected tab-separated .* got '0.jpg n01 0 0 8 8'$"),
        (lambda: annotation_entries(tmp_path / "latin1.txt", tmp_path / "train"),
         r"latin1.txt: the annotation file is not UTF-8 text"),
    ]
    for read, message in cases:
        with pytest.raises(OODError, match=message):
            read()
