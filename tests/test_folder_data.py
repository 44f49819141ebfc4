"""`data=folder` and its hygiene: image modes, unreadable files, folder mistakes, ID/OOD duplicates, DDP."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from helpers import NO_FIGURES, compose_config, make_image_folders, run_config
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn

import ood
from ood.data.folder import (
    FolderBenchmark,
    folder_dataset,
    ood_mapping,
    preprocessing_transform,
    resolve_preprocessing,
)
from ood.data.hygiene import BadImageError, load_image, to_rgb
from ood.data.sets import folder_entries
from ood.errors import ConfigError, DataNotFoundError

#: the run figures (matplotlib) cost seconds and are not what these tests check
pytestmark = pytest.mark.usefixtures("no_figures")


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    return make_image_folders(tmp_path / "data", train=4, test=3, ood=4)


def _pixels(model_input: int = 3 * 32 * 32) -> nn.Module:
    """A linear classifier on raw pixels: its penultimate feature is the normalised image itself."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(model_input, 3))


def test_image_modes_are_converted_alike(tmp_path: Path) -> None:
    grey = np.full((4, 4), 128, np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")  # 16-bit: 32896
    Image.fromarray(np.dstack([grey] * 3 + [np.zeros_like(grey)])).save(tmp_path / "rgba.png")
    Image.fromarray(grey).convert("P").save(tmp_path / "palette.png")
    with Image.open(tmp_path / "grey16.png") as saved:
        assert saved.mode.startswith("I")
    for name in ("grey", "grey16", "rgba", "palette"):
        image = load_image(tmp_path / f"{name}.png")
        assert image.mode == "RGB" and np.asarray(image).tolist() == [[[128] * 3] * 4] * 4, name
    white16 = Image.fromarray(np.full((2, 2), 65535, np.uint16))
    assert np.asarray(to_rgb(white16)).max() == 255 and np.asarray(white16.convert("RGB")).min() == 255
    dark16 = Image.fromarray(np.full((2, 2), 1000, np.uint16))
    assert np.asarray(to_rgb(dark16)).max() == 4  # round(1000 / 257); PIL's own convert clips it to 255
    assert np.asarray(dark16.convert("RGB")).max() == 255
    ramp = np.array([[0.0, 0.25], [0.5, 1.0]], np.float32)  # a float TIFF in [0, 1]: PIL's convert makes it black
    Image.fromarray(ramp, mode="F").save(tmp_path / "float.tif")
    assert np.asarray(load_image(tmp_path / "float.tif"))[..., 0].tolist() == [[0, 64], [128, 255]]
    assert np.asarray(Image.fromarray(ramp, mode="F").convert("RGB")).max() <= 1
    wide = Image.fromarray(np.array([[-3.0, 17.4], [200.0, 900.0]], np.float32), mode="F")  # other ranges: clipped
    assert np.asarray(to_rgb(wide))[..., 0].tolist() == [[0, 17], [200, 255]]


def test_a_listed_image_decodes_as_the_folder_sets(tmp_path: Path) -> None:
    """OpenOOD image lists (`ImageFiles`) decode with the folders' converter: 16-bit greyscale is not white, and a
    corrupt file is one line naming it, without the folder-only `bad_images` hint."""
    from ood.data.imglist import ImageFiles

    Image.fromarray(np.full((2, 2), 1000, np.uint16)).save(tmp_path / "dark16.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    files = ImageFiles([("dark16.png", 0), ("broken.jpg", 1)], tmp_path, transform=np.asarray)
    assert files[0][0].max() == 4 and files[0][1] == 0
    with pytest.raises(BadImageError, match=r"unreadable image .*broken\.jpg: UnidentifiedImageError: .*'$"):
        files[1]


def test_an_image_list_saved_on_windows_with_spaces_in_its_paths(tmp_path: Path) -> None:
    """A list saved by Windows Notepad (UTF-8 byte-order mark, CRLF, backslashes) whose paths hold spaces: the mark
    was read into the first path ('image not found' naming a file that is there, the mark invisible), a path with a
    space was refused as a line without an integer label, and `My Photos\\cat 1.png` was one file name."""
    from ood.data.imglist import ImageList, read_imglist

    Image.fromarray(np.full((2, 2, 3), 7, np.uint8)).save((tmp_path / "My Photos").mkdir() or tmp_path / "My Photos" / "cat 1.png")
    Image.fromarray(np.full((2, 2, 3), 9, np.uint8)).save(tmp_path / "dog.png")
    (tmp_path / "list.txt").write_bytes("\ufeffdog.png 1\r\nMy Photos\\cat 1.png\t0\r\n  \r\n".encode())
    assert read_imglist(tmp_path / "list.txt") == [("dog.png", 1), ("My Photos/cat 1.png", 0)]
    images = ImageList(tmp_path / "list.txt", tmp_path, transform=np.asarray)
    assert [(int(x[0, 0, 0]), y) for x, y in images] == [(9, 1), (7, 0)]
    (tmp_path / "bad.txt").write_text("dog.png 1.0\n")
    with pytest.raises(ood.errors.OODError, match=r"bad.txt:1: expected '<path> <integer label>', got 'dog.png 1.0'"):
        read_imglist(tmp_path / "bad.txt")


def test_an_unlabelled_listed_path_may_hold_spaces(tmp_path: Path) -> None:
    """An OOD list's path-only line (unlabelled, -1) whose path holds a space was refused as a line without an
    integer label; a last word that is no file name is still refused."""
    from ood.data.imglist import read_imglist

    (tmp_path / "ood.txt").write_text("My Photos/cat 1.png\nplain.jpg\nMy Photos/dog 2.JPEG 3\n")
    assert read_imglist(tmp_path / "ood.txt") == [("My Photos/cat 1.png", -1), ("plain.jpg", -1), ("My Photos/dog 2.JPEG", 3)]
    (tmp_path / "bad.txt").write_text("My Photos/cat 1.png dog\n")
    with pytest.raises(ood.errors.OODError, match=r"bad.txt:1: expected '<path> <integer label>', got 'My Photos/cat 1.png dog'"):
        read_imglist(tmp_path / "bad.txt")


def test_hidden_files_and_folders_are_neither_classes_nor_images(folders: dict[str, Path], tmp_path: Path) -> None:
    root = shutil.copytree(folders["id"], tmp_path / "id")
    before = FolderBenchmark(root, ood=[folders["far"]])
    shutil.copytree(root / "train" / "c0", root / "train" / ".ipynb_checkpoints")  # Jupyter's, with images in it
    (root / "train" / "c1" / "._0.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (root / "train" / "__MACOSX" / "c1").mkdir(parents=True)  # a macOS zip unpacked: it was a class without images
    (root / "train" / "__MACOSX" / "c1" / "._0.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    after = FolderBenchmark(root, ood=[folders["far"]])
    assert after.classes == before.classes == ["c0", "c1", "c2"]
    assert [(p.name, y) for p, y in after.id_sets["train"].entries] == [(p.name, y) for p, y in before.id_sets["train"].entries]
    assert folder_entries(root / "train") == folder_entries(folders["id"] / "train")


def test_the_preprocessing_line_shows_on_the_entry_points_console(folders: dict[str, Path], tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The entry points keep Lightning's INFO chatter off the console (`quiet_lightning`), and the preprocessing line
    went out through Lightning's `rank_zero_info`: `ood-eval` never printed it (the README: "printed once"). It is
    ood's own log line now, shown by the entry points' logging and recorded in the run's log file."""
    from ood.runs.console import LIGHTNING_LOGGERS, quiet_lightning

    bench = FolderBenchmark(folders["id"], ood=[folders["far"]], image_size=32, resize=32, report_dir=tmp_path)
    levels = {name: logging.getLogger(name).level for name in LIGHTNING_LOGGERS}
    quiet_lightning()  # as ood-eval does
    try:
        with caplog.at_level(logging.INFO, logger="ood.data.folder"):
            bench.prepare()
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    assert [r.getMessage() for r in caplog.records if "preprocessing" in r.getMessage()] == [
        f"id: preprocessing {json.dumps(bench.preprocessing)}"]
    assert json.loads((tmp_path / "preprocessing.json").read_text()) == bench.preprocessing


def test_the_preprocessing_line_is_printed_once_though_fit_and_test_prepare(folders: dict[str, Path], tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Lightning prepares the data at every `trainer.fit` / `trainer.test`, and `ood-train` calls both: once the line
    went through ood's logger, a training run printed (and logged) the preprocessing twice. It is printed once;
    each call still records it in the run folder."""
    bench = FolderBenchmark(folders["id"], ood=[folders["far"]], image_size=32, resize=32, report_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="ood.data.folder"):
        bench.prepare()
        (tmp_path / "preprocessing.json").unlink()
        bench.prepare()
    assert [r.getMessage() for r in caplog.records if "preprocessing" in r.getMessage()] == [
        f"id: preprocessing {json.dumps(bench.preprocessing)}"]
    assert json.loads((tmp_path / "preprocessing.json").read_text()) == bench.preprocessing


def test_small_images_read_at_imagenets_default_size_are_warned_of(folders: dict[str, Path], tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """`ood-train data=folder` with ood's own small_cnn (no preprocessing of its own) read 32 px images at ImageNet's
    224 px, 49 times the pixels (a CE run took 44 s instead of 8 s), without a word. One warning names the size seen
    and the overrides, as the caller gives them (a train Dataset's PIL images too); a size given, the network's own
    (a timm data config), a transform object, or images of half of 224 px or more say nothing."""
    from torchvision.datasets import ImageFolder

    def root(name: str, sizes: list[tuple[int, int]]) -> Path:
        for split in ("train", "test"):
            (tmp_path / name / split / "c0").mkdir(parents=True)
            for i, size in enumerate(sizes):
                Image.new("RGB", size).save(tmp_path / name / split / "c0" / f"{i}.png")
        return tmp_path / name

    far = [folders["far"]]
    with caplog.at_level(logging.WARNING, logger="ood.data.folder"):
        FolderBenchmark(folders["id"], ood=far)
        FolderBenchmark(train=ImageFolder(str(folders["id"] / "train")), test=folders["id"] / "test", ood=far,
                        mean=[0.5], std=[0.5], python_api=True)
        FolderBenchmark(root("mixed", [(40, 24), (32, 32), (32, 48), (32, 32), (8, 8)]), ood=far)
    assert [r.getMessage() for r in caplog.records] == [
        "id: train images of 32 px (the first 4's shorter side) are read at 224 px, ImageNet's default for a network "
        "without its own preprocessing (49x the pixels); for a network of 32 px inputs give data.image_size=32 "
        "data.resize=32",
        "folder: train images of 32 px (the first 4's shorter side) are read at 224 px, ImageNet's default for a "
        "network without its own preprocessing (49x the pixels); for a network of 32 px inputs give image_size=32, "
        "resize=32",
        "mixed: train images of 24 to 32 px (the first 4's shorter side) are read at 224 px, ImageNet's default for a "
        "network without its own preprocessing (49x the pixels); for a network of 32 px inputs give "
        "data.image_size=32 data.resize=32"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ood.data.folder"):
        FolderBenchmark(folders["id"], ood=far, image_size=32, resize=32)
        FolderBenchmark(folders["id"], ood=far, model={"library": "timm", "name": "resnet18"})
        FolderBenchmark(folders["id"], ood=far, transform=preprocessing_transform(resolve_preprocessing()))
        FolderBenchmark(root("large", [(112, 150), (300, 112)]), ood=far)
    assert caplog.records == []


def test_image_files_of_kinds_not_read_are_named(folders: dict[str, Path], tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A web-scraped OOD set's `.jfif` / `.gif` files (ImageFolder does not read them) left the set silently."""
    far = shutil.copytree(folders["far"], tmp_path / "far")
    for name in ("a.jfif", "b.JFIF", "sub/c.gif"):
        (far / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(far / name, format="GIF" if name.endswith("gif") else "JPEG")
    (far / "labels.txt").write_text("not an image: not named\n")
    with caplog.at_level(logging.WARNING, logger="ood.data.folder"):
        bench = FolderBenchmark(folders["id"], ood={"far": {"web": far}}, image_size=32, resize=32)
    assert [p.name for p, _ in bench.ood_sets[0][2].entries] == ["0.png", "1.png", "2.png", "3.png"]
    assert [r.getMessage() for r in caplog.records] == [
        f"web: 3 image file(s) of kinds not read left out (.gif: 1, .jfif: 2; first: {far / 'a.jfif'}); convert them "
        "to one of ['.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp']"]


def test_an_id_test_split_without_some_classes_is_warned_of(folders: dict[str, Path], tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A test/ folder lacking a train class (a class folder missing or misnamed there) was taken in silence, its
    accuracy and rows over the other classes; one warning per such split names the classes. A full split says
    nothing."""
    root = shutil.copytree(folders["id"], tmp_path / "id")
    with caplog.at_level(logging.WARNING, logger="ood.data.folder"):
        FolderBenchmark(root, ood=[folders["far"]], image_size=32, resize=32)
    assert not caplog.records
    missing = sorted(p.name for p in (root / "test").iterdir())[-1]
    shutil.rmtree(root / "test" / missing)
    with caplog.at_level(logging.WARNING, logger="ood.data.folder"):
        FolderBenchmark(root, ood=[folders["far"]], image_size=32, resize=32)
    assert [r.getMessage() for r in caplog.records] == [
        f"id:test ({root / 'test'}) has no image of 1 of the 3 ID classes: ['{missing}']; its accuracy and scores are "
        "over the others"]


def test_class_folders_named_by_numbers_in_text_order_are_warned_of(folders: dict[str, Path], tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Folders 0, 1, 2, 10 are labelled in text order (10 is label 2), as ImageFolder does: a model whose output i is
    folder 'i' (ImageNet-V2's layout) was scored against the wrong classes, silently."""
    for split, n in (("train", 2), ("test", 1)):
        for name in ("0", "1", "2", "10"):
            (tmp_path / "id" / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (int(name), i, 0)).save(tmp_path / "id" / split / name / f"{i}.png")
    with caplog.at_level(logging.WARNING, logger="ood.data.folder"):
        bench = FolderBenchmark(tmp_path / "id", ood=[folders["far"]], image_size=8, resize=8)
        numbered = FolderBenchmark(tmp_path / "id", ood=[folders["far"]], classes=["0", "1", "2", "10"], image_size=8,
                                   resize=8)
    assert bench.classes == ["0", "1", "10", "2"] and numbered.classes == ["0", "1", "2", "10"]
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'id' / 'train'}: class folders named by numbers are in text order (ImageFolder's: label i is the "
        "i-th of ['0', '1', '10', '2']); for a model whose output i is folder 'i' give them in number order: "
        "data.classes=[0,1,2,10] (Python: classes=sorted(names, key=int))"]


def test_symlinked_folders_are_followed_once(folders: dict[str, Path], tmp_path: Path) -> None:
    """An OOD folder linking parts kept elsewhere keeps their images, as torchvision's `ImageFolder` does (they were
    skipped silently); a link back to an ancestor is walked once."""
    ood = tmp_path / "ood"
    ood.mkdir()
    shutil.copy(folders["far"] / "0.png", ood / "own.png")
    (ood / "part").symlink_to(folders["near"], target_is_directory=True)
    (ood / "loop").symlink_to(ood, target_is_directory=True)
    bench = FolderBenchmark(folders["id"], ood={"far": {"linked": ood}}, image_size=32, resize=32)
    assert [str(p.relative_to(ood)) for p, _ in bench.ood_sets[0][2].entries] == ["own.png", "part/0.png", "part/1.png",
                                                                                    "part/2.png", "part/3.png"]


def test_preprocessing_values_are_checked() -> None:
    """A size or normalisation the transform cannot use is one line (image_size=abc failed in torchvision's Resize
    after the model was built; 0 silently became 224)."""
    for key, value, rule in [("image_size", "abc", "a whole number of pixels >= 1"), ("image_size", 0, ">= 1"),
                             ("resize", 2.5, ">= 1"), ("std", [0.2, 0.0, 0.2], "1 or 3 numbers > 0"),
                             ("mean", [0.5, 0.5], "1 or 3 numbers")]:
        with pytest.raises(ConfigError, match=rf"^data.{key}={re.escape(repr(value))}: must be .*{re.escape(rule)}"):
            resolve_preprocessing(**{key: value})
    # resize below the crop: CenterCrop padded 97 % of a 224-pixel input with black (data.resize=32 alone)
    with pytest.raises(ConfigError, match=r"^data.resize=32 is below the centre crop data.image_size=224 \(defaults "
                                          r"\(ImageNet\)\), .*pad every image with black: set data.image_size=32 too"):
        resolve_preprocessing(resize=32)
    assert resolve_preprocessing(resize=32, image_size=32)["resize"] == 32
    # mmcv's 0-255 normalisation on [0, 1] pixels: every input about -2.1, black and white 0.02 apart
    with pytest.raises(ConfigError, match=re.escape("data.mean=[123.675, 116.28, 103.53], data.std=[58.395, 57.12, "
                                                    "57.375]: pixels are normalised on the 0-1 scale (ToTensor), these "
                                                    "are 0-255 values; give them divided by 255: mean=[0.485, 0.456, "
                                                    "0.406], std=[0.229, 0.224, 0.225]")):
        resolve_preprocessing(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375])
    assert resolve_preprocessing(image_size=np.int64(32), mean=[0.5], std=(np.float32(0.25),) * 3)["resize"] == 36
    # a timm class built directly has no registered name (ood.evaluate names it `ResNet`): ImageNet's defaults, not
    # an AttributeError on the missing pretrained config
    assert resolve_preprocessing(model={"library": "timm", "name": "ResNet"}) == resolve_preprocessing()
    assert resolve_preprocessing(model={"library": "timm", "name": "convnext_atto"})["interpolation"] == "bicubic"
    # timm's squash configs resize both sides (aspect not kept): the shorter side was resized and the rest cropped
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    for name in ("convnext_atto", "convnext_base.fb_in22k_ft_in1k_384"):
        ours = resolve_preprocessing(model={"library": "timm", "name": name})
        theirs = timm.data.resolve_data_config(pretrained_cfg=timm.get_pretrained_cfg(name).to_dict())
        assert ours["crop_mode"] == theirs["crop_mode"] == ("center" if name == "convnext_atto" else "squash")
        assert torch.equal(preprocessing_transform(ours)(image), timm.data.create_transform(**theirs)(image)), name


def test_folder_mistakes_are_one_line(folders: dict[str, Path], tmp_path: Path) -> None:
    root = folders["id"]
    with pytest.raises(DataNotFoundError, match=r"/bare: no train/ folder \(it holds \['test/'\]\)"):
        (tmp_path / "bare" / "test").mkdir(parents=True)
        FolderBenchmark(tmp_path / "bare", ood=[folders["far"]])
    (tmp_path / "ood.txt").write_text("0.png\n")  # a list given where a folder is read: 'folder not found' named it
    with pytest.raises(DataNotFoundError, match=r"^mine: .*/ood.txt is a file, not a folder \(expected a folder of "
                                                r"images; .*\); an image list is given as \{imglist: .*/ood.txt\}"):
        FolderBenchmark(root, ood={"far": {"mine": tmp_path / "ood.txt"}})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match=r"empty: no images in .*/empty \(extensions"):
        FolderBenchmark(root, ood={"far": {"empty": tmp_path / "empty"}})
    shutil.copytree(root / "test" / "c0", root / "test" / "zebra")
    with pytest.raises(DataNotFoundError, match=r"test has 1 class absent from the ID train split \(3 classes\): \['zebra'\]; if the model knows "
                                                r"them, give its class names in label order \(data\.classes=\[\.\.\.\], Python: "
                                                r"classes=\[\.\.\.\]\), else move those images out of this split$"):
        FolderBenchmark(root, ood=[folders["far"]])
    shutil.rmtree(root / "test" / "zebra")
    bench = FolderBenchmark(root, ood={"near": {"n": folders["near"]}, "far": [folders["far"]], "val": folders["near"]},
                            image_size=32, resize=32)
    assert bench.num_classes == 3 and bench.classes == ["c0", "c1", "c2"]
    assert [(s.name, s.group) for s in bench.ood_test()] == [("n", "near"), ("checkers", "far")]
    with pytest.raises(ConfigError, match=r"OOD and csid set names must be unique and not one of \['far', 'fit'"):
        FolderBenchmark(root, ood={"near": {"test": folders["near"]}})
    assert len(bench.train()) + len(bench.val()) == 12 and len(bench.test()) == 9 and len(bench.ood_val()) == 4
    assert sorted(bench.val().dataset.targets[i] for i in bench.val().indices) == [0, 1, 2]  # stratified hold-out


def test_a_root_of_class_folders_is_named_as_one_split(folders: dict[str, Path]) -> None:
    """A first try passes the folder of class folders (one split, `my_id/train`, or a set never split): "no train/
    folder (it holds ['c0/', ...])" left the user to work out that these are classes; the line says how to give them
    as a split, as the caller gives it."""
    train = folders["id"] / "train"
    with pytest.raises(DataNotFoundError, match=r"train: no train/ folder \(it holds \['c0/', 'c1/', 'c2/'\]\); these "
                                                r"look like class folders of one split: give the splits, "
                                                r"id_data=\{'train': <this folder>, 'test': <a folder of the same "
                                                r"classes>\}$"):
        FolderBenchmark(train, ood=[folders["far"]], python_api=True)
    with pytest.raises(DataNotFoundError, match=r"these look like class folders of one split: give the splits, "
                                                r"data.train=<this folder> data.test=<a folder of the same classes>$"):
        FolderBenchmark(train, ood=[folders["far"]])


def test_every_class_keeps_training_images(folders: dict[str, Path], tmp_path: Path) -> None:
    """A class folder without images, or one whose only image the held-out validation split takes, would leave the
    train-fitted detectors a class they never saw (Mahalanobis' mean of it: the zero vector): one line each."""
    root = folders["id"]
    (root / "train" / "zebra").mkdir()
    (root / "train" / "yak").mkdir()  # one image, which the validation split takes: the empty class is named alone
    shutil.copy(root / "train" / "c0" / "0.png", root / "train" / "yak" / "0.png")
    with pytest.raises(DataNotFoundError, match=r"/train: class\(es\) \['zebra'\] have no images \(every ID class needs"):
        FolderBenchmark(root, ood=[folders["far"]])
    for k in range(10):  # many classes: the first 8 and the count, not a line of every name
        (root / "train" / f"z{k}").mkdir()
    with pytest.raises(DataNotFoundError, match=r"/train: class\(es\) \['z0', 'z1', 'z2', 'z3', 'z4', 'z5', 'z6', 'z7'\] "
                                                r"\.\.\. \(11 in all\) have no images"):
        FolderBenchmark(root, ood=[folders["far"]])
    for k in range(10):
        (root / "train" / f"z{k}").rmdir()
    shutil.rmtree(root / "train" / "yak")
    shutil.copy(root / "train" / "c0" / "0.png", root / "train" / "zebra" / "0.png")
    shutil.copytree(root / "test" / "c0", root / "test" / "zebra")
    with pytest.raises(DataNotFoundError, match=r"/train: holding out the ID validation split \(data.val_fraction=0.1, at "
                                                r"least one image per class\) leaves class\(es\) \['zebra'\] no training "
                                                r"image; give them"):
        FolderBenchmark(root, ood=[folders["far"]])
    shutil.copytree(root / "test", root / "val")  # a val/ split of its own: the one image stays in train
    bench = FolderBenchmark(root, ood=[folders["far"]])
    assert sorted({y for _, y in bench.id_sets["train"].entries}) == [0, 1, 2, 3]


def test_a_train_dataset_lacking_a_named_class_is_refused_beside_a_val_split(folders: dict[str, Path]) -> None:
    """A train Dataset naming 3 classes (`classes`) whose images cover 2 passed silently when a val split was given
    (its labels were not read, for a Dataset may take a pass to read them): the head's output 2 never trained, the
    class-conditional detectors without statistics of it. A Dataset holding its labels (`targets`) is checked as
    folders are."""
    from torchvision.datasets import ImageFolder

    train = ImageFolder(str(folders["id"] / "train"))
    train.samples = [s for s in train.samples if s[1] != 2]
    train.targets = [y for _, y in train.samples]
    with pytest.raises(DataNotFoundError, match=r"^Dataset ImageFolder: class\(es\) \['c2'\] have no images \(every "
                                                r"ID class needs training images\)$"):
        FolderBenchmark(train=train, test=folders["id"] / "test", val=folders["id"] / "test", ood=[folders["far"]])


def test_a_model_of_one_input_size_beside_another_image_size_is_one_line(tmp_path: Path) -> None:
    """A timm ViT built for 224 px trained on data.image_size=32 died at the first batch with timm's AssertionError
    traceback; it is refused as the run is built, naming both fixes, and a ViT built for 32 px is taken."""
    from helpers import folder_overrides
    from torchvision.models import VisionTransformer

    from ood.train import build

    overrides = ["data=folder", *folder_overrides(tmp_path), "backbone=timm", "backbone.name=vit_tiny_patch16_224",
                 "+backbone.depth=1", "logger=none"]
    with pytest.raises(ConfigError, match=r"^the model takes 224x224 images only, but data.image_size=32: set "
                                          r"data.image_size=224, or give \+backbone.img_size=32 \(timm\) or "
                                          r"\+backbone.image_size=32 \(torchvision ViT\)"):
        build(compose_config(tmp_path / "a", overrides))
    _, datamodule, _, _ = build(compose_config(tmp_path / "b", [*overrides, "+backbone.img_size=32"]))
    assert datamodule.benchmark.preprocessing["image_size"] == 32
    bench = FolderBenchmark(tmp_path / "folders" / "id", ood=[tmp_path / "folders" / "checkers"], image_size=32,
                            resize=32, python_api=True)
    vit = VisionTransformer(image_size=64, patch_size=16, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8)
    with pytest.raises(ConfigError, match=r"^the model takes 64x64 images only, but image_size=32: set "
                                          r"image_size=64, or give a model built for it"):
        bench.check_model_input(vit)
    bench.check_model_input(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3)))  # any size: nothing to refuse


def test_a_batch_larger_than_the_training_set_is_refused(folders: dict[str, Path]) -> None:
    """12 training images and the default batch of 64: the training loader drops its partial last batch, so the run
    trained no step, evaluated the untrained network as if trained and saved no checkpoint."""
    from ood.data.benchmark import OODDataModule

    bench = FolderBenchmark(folders["id"], ood=[folders["far"]], image_size=32, resize=32)
    with pytest.raises(ConfigError, match=r"^data.batch_size=64 is larger than the 9 ID training images \(1 rank\(s\)\): "
                                          r"the partial last batch is dropped, so no training step would run; lower "
                                          r"data.batch_size$"):
        OODDataModule(bench, batch_size=64).train_dataloader()
    assert len(OODDataModule(bench, batch_size=9).train_dataloader()) == 1


def test_truncated_jpeg_stops_naming_it_or_is_skipped_and_counted(folders: dict[str, Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folders["far"] / "broken.jpg", quality=95)
    data = (folders["far"] / "broken.jpg").read_bytes()
    (folders["far"] / "broken.jpg").write_bytes(data[: len(data) // 2])
    bench = FolderBenchmark(folders["id"], ood=[folders["far"]], image_size=32, resize=32)
    far = bench.ood_test()[0].dataset
    broken = next(i for i in range(len(far)) if far.describe(i).endswith("broken.jpg"))
    with pytest.raises(BadImageError, match=r"unreadable image .*/checkers/broken.jpg: OSError: image file is truncated"):
        far[broken]
    (folders["far"] / "0.png").unlink()  # gone since it was listed (or named by an image list): skip says it too
    with pytest.raises(BadImageError, match=r"^image not found: .*/checkers/0.png \(data.bad_images=skip skips such files\)$"):
        far[0]
    results = ood.evaluate(_pixels(), folders["id"], [folders["far"]], detectors=["msp"], image_size=32, resize=32,
                           bad_images="skip", device="cpu", output_dir=tmp_path / "run")
    skipped = json.loads((tmp_path / "run" / "bad_images.json").read_text())
    assert skipped["count"] == 1 and skipped["files"][0].endswith("checkers/broken.jpg")
    assert results.rows[0]["n_ood"] == 3
    table = results.per_image()
    assert table[table.split == "checkers"].file.map(lambda f: Path(f).name).tolist() == ["1.png", "2.png", "3.png"]
    assert json.loads((tmp_path / "run" / "preprocessing.json").read_text())["image_size"] == 32


def test_the_train_class_checks_read_the_files_left_after_skipping(folders: dict[str, Path]) -> None:
    """bad_images=skip: the train-class checks read the labels of the split before skipping, with the held-out
    indices of the split after it, so 3 broken images of a 4-image class passed (its last image then held out: a
    class without training images, silently) and a class of broken files was reported as another class."""
    common = dict(ood=[folders["far"]], bad_images="skip", image_size=32, resize=32)
    for i in range(3):
        (folders["id"] / "train" / "c0" / f"{i}.png").write_bytes(b"not an image")
    with pytest.raises(DataNotFoundError, match=r"train: holding out the ID validation split .* leaves class\(es\) "
                                                r"\['c0'\] no training image"):
        FolderBenchmark(folders["id"], **common)
    for path in (folders["id"] / "train" / "c1").iterdir():
        path.write_bytes(b"not an image")
    with pytest.raises(DataNotFoundError, match=r"train: class\(es\) \['c1'\] have no images after skipping 7 "
                                                r"unreadable \(first: .*/train/c0/0.png\) \(every ID class"):
        FolderBenchmark(folders["id"], **common)


def test_planted_duplicates_are_listed_and_dropped(folders: dict[str, Path], tmp_path: Path) -> None:
    planted = folders["far"]
    shutil.copy(folders["id"] / "test" / "c0" / "0.png", planted / "copy.png")
    Image.open(folders["id"] / "test" / "c2" / "1.png").save(planted / "recoded.png", compress_level=0)  # same pixels
    near = np.asarray(Image.open(folders["id"] / "test" / "c1" / "2.png")).astype(int)
    near[:4, :4] = np.clip(near[:4, :4] + 3, 0, 255)
    Image.fromarray(near.astype(np.uint8)).save(planted / "near.png")
    common = dict(detectors=["msp", "odin"], image_size=32, resize=32, device="cpu")
    kept = ood.evaluate(_pixels(), folders["id"], {"far": {"planted": planted}}, output_dir=tmp_path / "kept", **common)
    listed = {Path(e["ood"]).name: e for e in kept.overlap["sets"]["planted"]}
    assert set(listed) == {"copy.png", "recoded.png", "near.png"}
    assert [listed["copy.png"]["kind"], listed["recoded.png"]["kind"], listed["near.png"]["kind"]] == ["exact", "exact", "near"]
    assert listed["copy.png"]["id"].endswith("test/c0/0.png") and listed["copy.png"]["similarity"] == 1.0
    assert listed["near.png"]["id"].endswith("test/c1/2.png") and 0.99 < listed["near.png"]["similarity"] < 1.0
    assert [(r["overlap"], r["overlap_dropped"], r["n_ood"]) for r in kept.rows] == [(3, 0, 7)] * 2
    features_only = ood.evaluate(_pixels(), folders["id"], {"far": {"planted": planted}}, output_dir=tmp_path / "cos",
                                 exact_duplicates=False, **common)  # no second decode: the copies are cosine 1.0
    # the copies' features come from other batches than the ID images': equal up to float32 rounding of the cosine
    # (1.0 or 0.999999 by the CPU's kernels)
    assert {Path(e["ood"]).name: (e["kind"], e["similarity"]) for e in features_only.overlap["sets"]["planted"]} == {
        "copy.png": ("near", pytest.approx(1.0, abs=2e-6)), "recoded.png": ("near", pytest.approx(1.0, abs=2e-6)),
        "near.png": ("near", listed["near.png"]["similarity"])}

    dropped = ood.evaluate(_pixels(), folders["id"], {"far": {"planted": planted}}, output_dir=tmp_path / "dropped",
                           drop_overlap=True, **common)
    row, odin = dropped.rows
    assert row["overlap"] == row["overlap_dropped"] == 3 and row["n_ood"] == 4
    assert odin["detector"] == "odin" and odin["n_ood"] == 4  # input-perturbing scores drop the same rows
    files = sorted(p.name for p in planted.iterdir())
    clean = np.array([name not in listed for name in files])
    id_scores, ood_scores = kept.scores["msp"]["test"], kept.scores["msp"]["planted"]
    by_hand = roc_auc_score(np.r_[np.ones(len(id_scores)), np.zeros(clean.sum())], np.r_[id_scores, ood_scores[clean]])
    assert row["auroc"] == pytest.approx(by_hand, abs=1e-12)
    assert row["auroc"] != pytest.approx(kept.rows[0]["auroc"], abs=1e-3)
    # each kept score's image (samples.csv): the dropped copies are absent, the others keep their item of the set
    table = dropped.per_image()
    planted_rows = table[table.split == "planted"]
    assert [Path(f).name for f in planted_rows.file] == [name for name, keep in zip(files, clean) if keep]
    assert planted_rows.dataset_index.tolist() == np.flatnonzero(clean).tolist()
    np.testing.assert_array_equal(planted_rows.msp, ood_scores[clean])
    copies = shutil.copytree(folders["id"] / "test" / "c0", tmp_path / "copies")  # an OOD set of ID images only
    # named as ood.evaluate's keyword (the CLI's message names data.drop_overlap=true)
    with pytest.raises(DataNotFoundError, match=r"^drop_overlap=True leaves no image of OOD set\(s\) \['copies'\]: "
                                                r"each of their images duplicates ID data \(listed in overlap.json\); "
                                                r"score them without drop_overlap, or with another overlap_threshold$"):
        ood.evaluate(_pixels(), folders["id"], {"far": {"planted": planted, "copies": copies}},
                     output_dir=tmp_path / "emptied", drop_overlap=True, **common)
    assert len(json.loads((tmp_path / "emptied" / "overlap.json").read_text())["sets"]["copies"]) == 3


def test_copies_of_train_images_left_out_of_the_fit_split_are_found(folders: dict[str, Path], tmp_path: Path) -> None:
    """With data.fit_fraction, every train image is still compared with the OOD sets by its pixels: only the fit
    split's rows were (5 of 12 copies listed here, the others scored as OOD)."""
    planted = shutil.copytree(folders["far"], tmp_path / "planted")  # 4 checkerboards (0..3.png)
    train = sorted((folders["id"] / "train").rglob("*.png"))
    for i, path in enumerate(train):
        shutil.copy(path, planted / f"copy{i}.png")
    results = ood.evaluate(_pixels(), folders["id"], {"far": {"planted": planted}}, detectors=["msp"], image_size=32,
                           resize=32, device="cpu", output_dir=tmp_path / "run", fit_fraction=0.25,
                           overlap_threshold=None, drop_overlap=True)
    listed = {Path(e["ood"]).name: (e["kind"], Path(e["id"])) for e in results.overlap["sets"]["planted"]}
    assert listed == {f"copy{i}.png": ("exact", path) for i, path in enumerate(train)}
    assert (results.rows[0]["overlap_dropped"], results.rows[0]["n_ood"]) == (12, 4)


def test_extract_refuses_the_id_root_whose_splits_would_be_the_labels(folders: dict[str, Path]) -> None:
    """`ood.extract(model, <the root given to evaluate>)` labelled every test image 0 and every train image 1 (the
    split folders taken for classes), silently."""
    with pytest.raises(ConfigError, match=r"^.*/id holds the ID splits \['test/', 'train/'\], which would be the class "
                                          r"labels: pass one split, e.g. .*/id/test"):
        folder_dataset(folders["id"], np.asarray)
    assert folder_dataset(folders["id"] / "test", np.asarray).targets == [0] * 3 + [1] * 3 + [2] * 3


def test_ddp_cpu_timm_on_folders_equals_single_process(tmp_path: Path) -> None:
    paths = make_image_folders(tmp_path / "data", train=4, test=3, ood=4)
    torch.manual_seed(0)
    net = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32)
    torch.save(net.state_dict(), tmp_path / "vit.pth")
    common = [
        "backbone=timm", "backbone.name=test_vit", "+backbone.img_size=32", f"backbone.weights={tmp_path / 'vit.pth'}",
        "data=folder", f"data.root={paths['id']}", f"+data.ood.near={{noise: {paths['near']}}}",
        f"+data.ood.far={{checkers: {paths['far']}}}", "data.image_size=32", "data.resize=32", "data.num_workers=0",
        "data.eval_batch_size=5", "detectors.names=[msp,knn,mahalanobis]", "logger=none", "callbacks=none",
        "trainer.enable_progress_bar=false", NO_FIGURES,  # the DDP ranks: `no_figures` patches this process only
    ]
    single = run_config(tmp_path / "single", common, config_name="eval")
    ddp = run_config(tmp_path / "ddp", [*common, "trainer=ddp_cpu"], config_name="eval")
    assert len(single) == 6 and single == ddp
    preprocessing = json.loads((tmp_path / "ddp" / "preprocessing.json").read_text())
    assert preprocessing["source"] == "timm data config of test_vit, given values"


def test_torch_datasets_as_sources(folders: dict[str, Path]) -> None:
    from torchvision.datasets import FakeData

    train, test = FakeData(12, (3, 16, 16), 3, random_offset=0), FakeData(6, (3, 16, 16), 3, random_offset=100)
    bench = FolderBenchmark(train=train, test=test, ood={"near": {"fake": FakeData(4, (3, 16, 16), 3, random_offset=200)},
                                                         "far": [folders["far"]]}, image_size=16, resize=16)
    labels = [int(train[i][1]) for i in range(12)]
    assert bench.name == "folder" and bench.num_classes == max(labels) + 1
    x, y = bench.test()[0]
    assert x.shape == (3, 16, 16) and y == int(test[0][1])
    assert [(s.name, s.group, len(s.dataset)) for s in bench.ood_test()] == [("fake", "near", 4), ("checkers", "far", 4)]
    assert bench.ood_test()[0].dataset[0][1] == -1


def test_datasets_of_tensors_give_their_normalisation(folders: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """ImageFolders normalised by their own transform (mean 0.5, std 0.25) are used as given: ODIN's step must be
    scaled by their std, which the run took from the model's defaults (ImageNet's 0.229.., also recorded in
    preprocessing.json as used). Now their Normalize gives it; a tensor Dataset without one is warned about."""
    from torch.utils.data import Subset, TensorDataset
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    tf = T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))])
    train, test = ImageFolder(str(folders["id"] / "train"), tf), ImageFolder(str(folders["id"] / "test"), tf)
    bench = FolderBenchmark(train=train, test=test, ood={"near": {"part": Subset(test, [0, 1])}}, std=(0.3, 0.3, 0.3))
    assert (bench.input_mean, bench.input_std) == ((0.5, 0.5, 0.5), (0.3, 0.3, 0.3))  # a given value wins
    assert bench.preprocessing["source"] == ("defaults (ImageNet), given values; mean / std of folder:train, "
                                             "folder:test, part: their transform's Normalize (float tensors, used as given)")
    with caplog.at_level("WARNING"):
        bench = FolderBenchmark(train=train, test=test, ood=[TensorDataset(torch.zeros(2, 3, 32, 32))])
    assert bench.input_std == (0.229, 0.224, 0.225)
    assert ("folder:train, folder:test, ood0: Datasets of float tensors are used as given; odin and the other "
            "input-perturbing detectors scale their step by std=[0.229, 0.224, 0.225] (defaults (ImageNet)): pass mean= "
            "/ std= of their normalisation") in caplog.text


def test_dataset_items_are_checked_and_ood_sets_may_be_images_alone(folders: dict[str, Path]) -> None:
    """An OOD Dataset of images alone (`TensorDataset(x)`, bare tensors) is served with label -1 and its labels are
    never read; items the pass cannot use (dicts, numpy arrays, uint8 tensors, ID items without labels) are one line
    naming the set, not a traceback from a loader or from the first convolution."""
    from torch.utils.data import Dataset, TensorDataset

    class Counted(Dataset):
        def __init__(self, x: torch.Tensor) -> None:
            self.x, self.reads = x, 0

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> torch.Tensor:
            self.reads += 1
            return self.x[i]

    x = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).view(4, 3, 2, 2)
    bare = Counted(x)
    bench = FolderBenchmark(folders["id"], ood={"near": {"bare": bare}, "far": {"one": TensorDataset(x + 1)}},
                            image_size=32, resize=32)
    reads = bare.reads  # item 0, checked once
    near, far = (s.dataset for s in bench.ood_test())
    assert near.targets == [-1] * 4 and bare.reads == reads
    assert [(float(v.sum()), y) for v, y in (near[3], far[0])] == [(float(x[3].sum()), -1), (float(x[0].sum() + 12), -1)]
    ood = [folders["far"]]
    with pytest.raises(ConfigError, match=r"^folder:train: Dataset TensorDataset items must be \(image, label\) tuples "
                                          r"\(an ID split needs labels\); item 0 is a 1-tuple$"):
        FolderBenchmark(train=TensorDataset(x), test=folders["id"] / "test", ood=ood)

    class Items(Dataset):
        def __init__(self, item: object) -> None:
            self.item = item

        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> object:
            return self.item

    # no torch Dataset at all (a list of samples, a Hugging Face dataset): it was read as a folder named by its repr
    with pytest.raises(ConfigError, match=r"^folder:test: a set is a folder, an image list \{'imglist': <file>\} or a "
                                          r"torch Dataset; got a builtins.list: wrap it in a torch.utils.data.Dataset"):
        FolderBenchmark(train=folders["id"] / "train", test=[(x[0], 0)], ood=ood)
    with pytest.raises(ConfigError, match=r"^OOD set 0: a set is a folder, .*; got a builtins.object: wrap it"):
        FolderBenchmark(folders["id"], ood={"far": [object()]})

    pixels = np.zeros((2, 2, 3), np.uint8)
    for item, said in [({"image": x[0], "label": 0}, r"items are dicts \(keys \['image', 'label'\]\)"),
                       ((pixels, 0), r"item 0 holds a numpy.ndarray of shape \(2, 2, 3\); images must be PIL images"),
                       ((torch.zeros(3, 2, 2, dtype=torch.uint8), 0), r"item 0 holds a torch.uint8 tensor of shape")]:
        with pytest.raises(ConfigError, match=rf"^folder:test: Dataset Items {said}"):
            FolderBenchmark(train=folders["id"] / "train", test=Items(item), ood=ood)
    # labels that are no class index: int()'s ValueError deep in the pass (Hydra's InstantiationException around it)
    for label, said in [("cat", "a str 'cat'"), (torch.tensor([0.0, 1.0]), r"a Tensor of shape \(2,\)")]:
        with pytest.raises(ConfigError, match=rf"^folder:test: Dataset Items labels must be class indices \(integers, "
                                              rf"label i the network's output i\); item 0's is {said}: map them"):
            FolderBenchmark(train=folders["id"] / "train", test=Items((x[0], label)), ood=ood)
    # an OOD set's own labels (a file name here) are not read: they stopped the pass
    named = FolderBenchmark(folders["id"], ood={"far": {"named": Items((x[1], "img_001.png"))}}).ood_test()[0].dataset
    assert [(float(v.sum()), y) for v, y in (named[0], named[1])] == [(float(x[1].sum()), -1)] * 2


def test_ood_sets_in_every_accepted_form() -> None:
    """One source per group, a list, a `{name: source}` mapping or an imglist spec: each set gets its folder's or
    list's name."""
    spec = {"imglist": "lists/test_svhn.txt", "images": "images"}
    assert ood_mapping({"near": Path("/d/noise"), "far": ["/d/checkers", spec]}) == {
        "near": {"noise": Path("/d/noise")}, "far": {"checkers": "/d/checkers", "test_svhn": spec}, "val": None,
        "csid": {}}
    assert ood_mapping("/d/noise") == {"near": {}, "far": {"noise": "/d/noise"}, "val": None, "csid": {}}
    assert ood_mapping({"textures": "/d/t"}) == {"near": {}, "far": {"textures": "/d/t"}, "val": None, "csid": {}}
    assert ood_mapping({"far": "/d/t", "csid": ["/d/blur", spec]})["csid"] == {"blur": "/d/blur", "test_svhn": spec}
    assert ood_mapping(["/d/places.v2"])["far"] == {"places.v2": "/d/places.v2"}
    assert list(ood_mapping([".", "/d/x/..", "/d/y/"])["far"]) == [Path.cwd().name, "d", "y"]  # '.' was named ''
    assert ood_mapping(spec)["far"] == {"test_svhn": spec}
    with pytest.raises(ConfigError, match=r"OOD sets /d/a/images and /d/b/images would both be named 'images': name them"):
        ood_mapping({"far": ["/d/a/images", "/d/b/images"]})
    for val, got in [(["/d/a", "/d/b"], r"\['/d/a', '/d/b'\]"), ({"a": "/d/a"}, r"a mapping of sets \['a'\]")]:
        with pytest.raises(ConfigError, match=rf"^data.ood.val is one set, .*; got {got}: give one source"):
            ood_mapping({"far": "/d/t", "val": val})  # it was read as a folder named "['/d/a', '/d/b']"
    assert ood_mapping({"far": "/d/t", "val": {"folder": "/d/v"}})["val"] == {"folder": "/d/v"}
    assert ood_mapping({"far": [{"folder": "/d/dtd"}]})["far"] == {"dtd": {"folder": "/d/dtd"}}  # was KeyError 'imglist'
    # a misspelt group is named as such (it was read as a far set named 'fra' with a set-spec key 'dtd')
    for given, key, close in [({"fra": {"dtd": "/d/t"}}, "fra", "far"), ({"far": "/d/t", "cisd": {}}, "cisd", "csid")]:
        with pytest.raises(ConfigError, match=rf"^data.ood has unknown keys \['{key}'\] \('{key}': did you mean '{close}'\?\); "
                                              r"valid keys: near, far, val, csid, or \{name: source\} for far sets alone$"):
            ood_mapping(given)


def test_validation_ood_alone_is_refused(folders: dict[str, Path]) -> None:
    """OOD sets with only `val` would run and report nothing: refused, saying what is missing; a set name with a
    '/' (Results read `msp/ssb/hard` in scores.npz as detector `msp/ssb`, split `hard`) is refused too."""
    with pytest.raises(ConfigError, match=r"needs at least one OOD test set \(near or far\)"):
        FolderBenchmark(folders["id"], ood={"val": folders["far"]}, image_size=32, resize=32)
    with pytest.raises(ConfigError, match=r"^OOD and csid set names cannot hold '/' .*; got \['ssb/hard'\]$"):
        FolderBenchmark(folders["id"], ood={"near": {"ssb/hard": folders["near"]}, "far": [folders["far"]]})


def test_training_without_ood_sets_with_evaluate_false_then_evaluating_with_them(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ood-train data=folder ... evaluate=false` refused to start without OOD sets ("needs OOD sets"): a network could
    not be trained now and evaluated later. It builds without them; `ood-eval ckpt_path=<run>
    '+data.ood.far={x: <folder>}'` (the run's data overrides taken, as ood-eval takes them) is not refused as other
    data than the training's (`data.evaluate` names no configuration) and scores the added set. As `evaluate` itself,
    `data.evaluate` is no setting: a rerun that differs in it alone keeps the results of the run folder."""
    from ood.runs.checks import check_evaluated
    from ood.runs.identity import RunIdentity, flat_config, identity, write_identity
    from ood.runs.trained import ADOPTED_ENV
    from ood.utils import instantiate

    trained = ["data=folder", f"data.root={folders['id']}", "data.image_size=32", "data.resize=32"]
    training = compose_config(tmp_path / "run", [*trained, "evaluate=false"])
    bench = instantiate(training.data, seed=0).benchmark
    assert (bench.ood_sets, bench.val_ood_set, len(bench.train(augment=False))) == ([], None, 9)
    with pytest.raises(ConfigError, match=r"^data=folder needs OOD sets: .*, or ood-train evaluate=false to train "
                                          r"without them$"):  # a run that evaluates
        instantiate(compose_config(tmp_path / "run", trained).data, seed=0)
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    given = [*trained, f"+data.ood.far={{x: {folders['far']}}}", f"ckpt_path={ckpt}"]
    monkeypatch.setenv(ADOPTED_ENV, json.dumps(trained))  # ood-eval's: the run's own overrides ask for no difference
    evaluation = compose_config(tmp_path / "eval", given, "eval")
    check_evaluated(evaluation, flat_config(training), ckpt, given)
    bench = instantiate(evaluation.data, seed=0).benchmark
    assert [(n, g, len(s.entries)) for n, g, s in bench.ood_sets] == [("x", "far", 4)]
    evaluating = compose_config(tmp_path / "run", [*trained, f"+data.ood.far={{x: {folders['far']}}}"])
    assert (training.data.evaluate, evaluating.data.evaluate) == (False, True)
    same = [{k: v for k, v in identity(flat_config(c)).items() if not k.startswith("data.ood")} for c in (training, evaluating)]
    assert same[0] == same[1] and same[0]["data.image_size"] == "32"
    run, ident = tmp_path / "rerun", RunIdentity({}, "last.ckpt")
    write_identity(run.mkdir() or run, ident, "data:\n  evaluate: true\n")
    (run / "results.jsonl").write_text("row\n")
    write_identity(run, ident, "data:\n  evaluate: false\n")  # a sweep resumed to finish training: it writes none
    assert (run / "results.jsonl").read_text() == "row\n"


def test_no_ood_sets_in_python_names_ood_data_alone() -> None:
    """`ood.evaluate(model, id_data, {})` was told of the command line ('+data.ood.far=...', 'or ood-train
    evaluate=false to train without them'): an evaluation needs the sets, named by its keyword."""
    with pytest.raises(ConfigError, match=r"^ood.evaluate needs OOD sets: ood_data=\{name: folder\} \(or a folder, a "
                                          r"list of them, \{near: \.\.\., far: \.\.\.\}\)$"):
        ood_mapping({}, python_api=True)


def test_data_evaluate_false_in_a_run_that_evaluates_is_refused_naming_evaluate(folders: dict[str, Path],
                                                                                 tmp_path: Path) -> None:
    """`data.evaluate=false` (the data config's copy of `evaluate`, set in its place) trained, then evaluated without
    OOD sets: an empty results.jsonl and 'no detector is configured'. Refused before the run, naming `evaluate=false`."""
    given = ["data=folder", f"data.root={folders['id']}", "data.image_size=32", "data.resize=32", "data.evaluate=false",
             "data.batch_size=4", "trainer.max_epochs=1"]
    with pytest.raises(ConfigError, match=r"^data.evaluate=false is the data config's copy of evaluate, which is "
                                          r"true: this run would evaluate without OOD sets; give evaluate=false "
                                          r"\(data.evaluate follows it\), or data.evaluate=true$"):
        run_config(tmp_path / "run", given)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_network_detector_that_cannot_read_the_model_is_skipped(folders: dict[str, Path], tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """rankfeat needs a staged backbone; on a plain `nn.Sequential` it is skipped and the run finishes (it used to
    stop the whole evaluation after the feature pass), with a warning naming the network (not the method)."""
    with caplog.at_level("WARNING"):
        results = ood.evaluate(_pixels(), folders["id"], {"near": folders["near"], "far": folders["far"]},
                               detectors=["msp", "rankfeat"], image_size=32, resize=32, device="cpu", output_dir=tmp_path)
    assert [(r["detector"], r["ood_dataset"]) for r in results.rows] == [("msp", "noise"), ("msp", "checkers")]
    assert ("skipping detector rankfeat: it needs the intermediate maps of a staged backbone; Sequential is wrapped as "
            "a whole") in caplog.text


def test_test_folder_labels_follow_a_train_dataset(folders: dict[str, Path], tmp_path: Path) -> None:
    """With train given as a Dataset, a test folder's classes take the Dataset's label order (its `classes`, as
    ImageFolder has), also when the test folder lacks a class; without `classes` the mismatch risk is refused."""
    from torchvision.datasets import FakeData, ImageFolder

    test = tmp_path / "test"
    shutil.copytree(folders["id"] / "test", test)
    shutil.rmtree(test / "c1")
    bench = FolderBenchmark(train=ImageFolder(str(folders["id"] / "train")), test=test, ood=[folders["far"]],
                            image_size=32, resize=32)
    assert bench.classes == ["c0", "c1", "c2"] and bench.num_classes == 3
    assert sorted({y for _, y in bench.id_sets["test"].entries}) == [0, 2]
    # the other way round: a test ImageFolder without c1 labels c2 as 1; its labels follow the train classes by name
    # (they were served as its own indices, c2's images as class c1, silently)
    by_name = FolderBenchmark(folders["id"], test=ImageFolder(str(test)), ood={"far": [folders["far"]],
                              "csid": {"shifted": ImageFolder(str(test))}}, image_size=32, resize=32)
    assert [y for _, y in by_name.test()] == [y for _, y in bench.id_sets["test"].entries] == [0] * 3 + [2] * 3
    assert [y for _, y in by_name.csid_test()[0].dataset] == [0] * 3 + [2] * 3
    shutil.copytree(test / "c0", test / "zebra")
    with pytest.raises(DataNotFoundError, match=r"^Dataset ImageFolder \(id:test\) has 1 class absent from the ID train "
                                                r"split \(3 classes\): \['zebra'\]; if the model knows them"):
        FolderBenchmark(folders["id"], test=ImageFolder(str(test)), ood=[folders["far"]])
    other = ImageFolder(str(test))
    other.classes = ["tench", "goldfish", "shark"]  # names of another vocabulary: its own indices, as before
    assert [y for _, y in FolderBenchmark(folders["id"], test=other, ood=[folders["far"]]).test()] == other.targets
    with pytest.raises(ConfigError, match=r"class folders cannot be matched to the labels of the train Dataset FakeData"):
        FolderBenchmark(train=FakeData(6, (3, 16, 16), 3), test=test, ood=[folders["far"]], image_size=16, resize=16)


def test_the_command_line_takes_id_splits_without_a_root(folders: dict[str, Path], tmp_path: Path) -> None:
    """`data.train=` / `data.test=` image lists from the command line need no data.root (it was a mandatory value:
    'Missing mandatory value: data.root'); without either, FolderBenchmark's own line says what to give."""
    from hydra.utils import instantiate

    root = folders["id"]
    for split, n in (("train", 4), ("test", 3)):
        (root / f"{split}.txt").write_text("".join(f"{split}/c{k}/{i}.png {k}\n" for k in range(3) for i in range(n)))
    lists = [f"data.{split}={{imglist: {root / f'{split}.txt'}}}" for split in ("train", "test")]
    cfg = compose_config(tmp_path, ["data=folder", *lists, f"+data.ood.far=[{folders['far']}]"], config_name="eval")
    bench = instantiate(cfg.data).benchmark
    assert bench.num_classes == 3 and [y for _, y in bench.id_sets["test"].entries] == [0] * 3 + [1] * 3 + [2] * 3
    cfg = compose_config(tmp_path, ["data=folder", f"+data.ood.far=[{folders['far']}]"], config_name="eval")
    with pytest.raises(ConfigError, match=r"^data=folder needs data.root=<folder with train/ and test/> \(or both"):
        FolderBenchmark(cfg.data.root, ood=[folders["far"]], train=cfg.data.train, test=cfg.data.test)


def test_outlier_methods_name_the_folder_key(folders: dict[str, Path]) -> None:
    """method=oe without outliers names the key data=folder reads (`data.outliers`), not another benchmark's."""
    from ood.data import OODDataModule

    module = OODDataModule(FolderBenchmark(folders["id"], ood=[folders["far"]], image_size=32, resize=32))
    with pytest.raises(ConfigError, match=r"method oe trains on outliers, but benchmark id has none "
                                          r"\(data.outliers=none\); set data.outliers=<a folder of outlier images "
                                          r"\(of none of the ID classes\), an image list or a Dataset>$"):
        module.use_streams(["id", "outliers"], "oe")


def test_an_outlier_folder_that_shares_images_with_an_id_split_is_refused(folders: dict[str, Path]) -> None:
    """data.outliers pointed at the ID root, a split or one of its class folders trained ID images as OOD without a
    word (outliers are not part of the ID/OOD overlap check); a separate pool is taken."""
    root = folders["id"].resolve()
    for pool, relation in ((root, "holds"), (root / "train", "is"), (root / "test" / "c1", "is inside")):
        with pytest.raises(ConfigError, match=rf"^data.outliers={re.escape(str(pool))} {relation} the ID "
                                              rf"(train|test) folder .*: outlier exposure would train ID images as OOD"):
            FolderBenchmark(root, ood=[folders["far"]], outliers=pool, image_size=32, resize=32)
    bench = FolderBenchmark(root, ood=[folders["far"]], outliers=folders["near"], image_size=32, resize=32)
    assert len(bench.outliers()) == 4


def test_an_outlier_folder_a_method_trains_without_is_warned_of(folders: dict[str, Path],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """`method=ce data.outliers=<pool>` trained without the pool and said nothing: the user believed the run had
    outlier exposure. It is one warning when training starts (not one an epoch); a method that reads the pool, as a stream (oe) or in a
    fit-time pass before training (heatmap's outlier pool), is not warned of."""
    from ood.data import OODDataModule

    for method, streams in (("ce", ["id"]), ("oe", ["id", "outliers"]), ("heatmap", ["id"])):
        caplog.clear()
        module = OODDataModule(FolderBenchmark(folders["id"], ood=[folders["far"]], outliers=folders["near"],
                                               image_size=32, resize=32), batch_size=2)
        module.use_streams(streams, method)
        if method == "heatmap":
            module.benchmark.outliers()
        with caplog.at_level(logging.WARNING, logger="ood"):
            module.train_dataloader()
            module.train_dataloader()  # loaders rebuilt each epoch (reload_dataloaders_every_n_epochs): said once
        unused = [r.getMessage() for r in caplog.records if "is not used" in r.getMessage()]
        assert unused == ([f"data.outliers={folders['near']} is not used: method ce does not train on outliers "
                           "(leave it out, or choose a method that does, e.g. method=oe)"] if method == "ce" else [])


def test_outliers_take_the_evaluation_transform_with_augment_outliers_off(folders: dict[str, Path]) -> None:
    """`data.augment_outliers=false` (OpenOOD's `oe` split): the outlier batch is the evaluation transform of its
    files (32 px: resize and crop change nothing, so the normalised pixels); by default the random resized crop and
    flip of training."""
    from ood.data import OODDataModule

    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    batches = {}
    for augment in (False, True):
        bench = FolderBenchmark(folders["id"], ood=[folders["far"]], outliers=folders["near"], image_size=32, resize=32,
                                augment_outliers=augment)
        module = OODDataModule(bench, batch_size=2, outlier_batch_size=4)
        module.use_streams(["id", "outliers"], "oe")
        torch.manual_seed(0)
        batches[augment] = next(iter(module.train_dataloader().iterables["outliers"]))
    files = [bench.outlier_set_.entries[i][0] for i in batches[False].index.tolist()]
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                          for f in files])
    assert len(files) == 4 and torch.allclose(batches[False].x, (pixels - mean) / std, atol=1e-6)
    assert torch.equal(batches[False].x, torch.stack([bench.eval_transform()(load_image(f)) for f in files]))
    assert torch.equal(batches[True].index, batches[False].index) and not torch.allclose(batches[True].x, batches[False].x, atol=1e-3)


def test_evaluating_an_outlier_method_needs_no_outlier_set(tmp_path: Path) -> None:
    """ood-eval of an oe checkpoint on data=folder without data.outliers builds (the outliers only feed training);
    training still asks for them."""
    from helpers import compose_config, folder_overrides

    from ood.train import build

    overrides = ["data=folder", *folder_overrides(tmp_path), "method=oe", "logger=none"]
    _, datamodule, _, _ = build(compose_config(tmp_path / "eval", overrides, "eval"))
    assert datamodule.streams == ("id",)
    with pytest.raises(ConfigError, match=r"method oe trains on outliers, but benchmark id has none"):
        build(compose_config(tmp_path / "train", overrides))

def test_id_image_lists_get_the_class_checks_of_folders(folders: dict[str, Path], tmp_path: Path) -> None:
    """An ID image list's labels are class indices: the train list's must be 0..K-1 each with images, the other
    splits' among them, every line labelled; its paths are relative to the list's folder unless `images` is given."""
    root = folders["id"]

    def write(path: Path, lines: list[str]) -> dict[str, str]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{line}\n" for line in lines))
        return {"imglist": str(path)}

    train = [f"train/c{k}/{i}.png {k}" for k in range(3) for i in range(4)]
    test = [f"test/c{k}/{i}.png {k}" for k in range(3) for i in range(3)]
    listed = FolderBenchmark(train=write(root / "train.txt", train), test=write(root / "test.txt", test),
                             ood=[folders["far"]])
    by_folder = FolderBenchmark(root, ood=[folders["far"]])
    assert listed.num_classes == 3 and listed.classes is None
    for split in ("train", "test"):
        assert listed.id_sets[split].entries == by_folder.id_sets[split].entries
    elsewhere = FolderBenchmark(train={**write(tmp_path / "lists" / "train.txt", train), "images": str(root)},
                                test=write(root / "test.txt", test), ood=[folders["far"]])
    assert elsewhere.id_sets["train"].entries == by_folder.id_sets["train"].entries
    tabbed = FolderBenchmark(train=write(root / "tabs.txt", [line.replace(" ", "\t") for line in train]),
                             test=write(root / "test.txt", test), ood=[folders["far"]])  # pandas' to_csv(sep="\t")
    assert tabbed.id_sets["train"].entries == by_folder.id_sets["train"].entries

    with pytest.raises(DataNotFoundError, match=r"bad_test.txt has 1 label absent from the ID train split "
                                                r"\(classes 0..2\): \[3\]$"):
        FolderBenchmark(train=write(root / "train.txt", train), test=write(root / "bad_test.txt", [*test, "x.png 3"]),
                        ood=[folders["far"]])
    with pytest.raises(DataNotFoundError, match=r"paths.txt: 12 line\(s\) without a class index \(no label or a "
                                                r"negative one; first: train/c0/0.png\); an ID image list needs"):
        FolderBenchmark(train=write(root / "paths.txt", [line.split()[0] for line in train]),
                        test=write(root / "test.txt", test), ood=[folders["far"]])
    with pytest.raises(DataNotFoundError, match=r"shifted.txt: the ID train labels must be the class indices 0..2, "
                                                r"each with images; no image has \[0\]$"):
        FolderBenchmark(train=write(root / "shifted.txt", [line for line in train if not line.endswith(" 0")]),
                        test=write(root / "test.txt", test), ood=[folders["far"]])
    with pytest.raises(ConfigError, match=r"class folders cannot be matched to the labels of the train image list "
                                          r".*/train.txt, which names no classes"):
        FolderBenchmark(train=write(root / "train.txt", train), test=root / "test", ood=[folders["far"]])
    with_folders = FolderBenchmark(root, test=write(root / "test.txt", test), ood=[folders["far"]])  # train's names
    assert with_folders.id_sets["test"].entries == by_folder.id_sets["test"].entries


def test_a_class_order_other_than_the_sorted_folders(folders: dict[str, Path], tmp_path: Path) -> None:
    """`data.classes` / `classes=`: the labels of a model trained with another class order. A network whose output i
    is the mean of colour channel `order[i]` (class c<k> is bright in channel k) is right on every ID test image with
    `classes=order` and wrong on every one with the sorted folders; the same order names an image list's indices
    (so a test folder can follow them) and relabels a train ImageFolder. Mistakes are one line."""
    from torchvision.datasets import ImageFolder

    order = ["c2", "c0", "c1"]

    class ChannelMeans(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3, bias=False)
            with torch.no_grad():
                self.fc.weight.copy_(torch.eye(3)[[int(c[1]) for c in order]])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.mean((2, 3)))

    common = dict(detectors=["msp"], image_size=32, resize=32, bad_images="error")
    ordered = ood.evaluate(ChannelMeans(), folders["id"], [folders["far"]], classes=order, **common)
    sorted_folders = ood.evaluate(ChannelMeans(), folders["id"], [folders["far"]], **common)
    assert ordered.rows[0]["id_acc"] == 1.0 and sorted_folders.rows[0]["id_acc"] == 0.0
    cfg = compose_config(tmp_path / "cli", ["data=folder", f"data.root={folders['id']}", "data.classes=[c2,c0,c1]",
                                            f"+data.ood.far={{checkers: {folders['far']}}}"])
    bench = FolderBenchmark(**{k: v for k, v in cfg.data.items() if k in ("root", "ood", "classes")})
    assert bench.classes == order and {y for p, y in bench.id_sets["test"].entries if p.parent.name == "c2"} == {0}

    lines = [f"train/c{k}/{i}.png {order.index(f'c{k}')}" for k in range(3) for i in range(4)]
    (folders["id"] / "train.txt").write_text("\n".join(lines) + "\n")
    listed = FolderBenchmark(train={"imglist": str(folders["id"] / "train.txt")}, test=folders["id"] / "test",
                             ood=[folders["far"]], classes=order)
    assert listed.id_sets["test"].entries == bench.id_sets["test"].entries  # by name, through the list's indices
    relabelled = FolderBenchmark(train=ImageFolder(str(folders["id"] / "train")), test=folders["id"] / "test",
                                 ood=[folders["far"]], classes=order, image_size=32, resize=32)
    # 3 of each class's 4 served (one held out for val), ImageFolder's c0, c1, c2 relabelled to their places in `order`
    assert [y for _, y in relabelled.train(augment=False)] == [order.index(f"c{k}") for k in range(3) for _ in range(3)]

    for classes, error in (
        (["c2", "c0"], r"^data.classes must name each class folder of .*/train once: not listed: \['c1'\]$"),
        (["c2", "c0", "c1", "c3"], r"^data.classes must name each class folder of .*/train once: no such folder: \['c3'\]$"),
        (["c2", "c0", "c0"], r"^data.classes names \['c0'\] more than once$"),
        ("c2,c0,c1", r"^data.classes must be a non-empty list of class names in label order; got 'c2,c0,c1'$"),
    ):
        with pytest.raises(ConfigError, match=error):
            FolderBenchmark(folders["id"], ood=[folders["far"]], classes=classes)
    with pytest.raises(ConfigError, match=r"^data.classes and the train Dataset's `classes` name different classes: "
                                          r"\['c1', 'c3'\] in one only$"):
        FolderBenchmark(train=ImageFolder(str(folders["id"] / "train")), test=folders["id"] / "test",
                        ood=[folders["far"]], classes=["c2", "c0", "c3"])
    with pytest.raises(DataNotFoundError, match=r"train.txt: labels \[2\] have no name in data.classes \(2 names: "
                                                r"labels 0..1\)$"):
        FolderBenchmark(train={"imglist": str(folders["id"] / "train.txt")}, test=folders["id"] / "test",
                        ood=[folders["far"]], classes=["c2", "c0"])


def test_a_validation_ood_set_that_is_a_test_set_is_warned_of(folders: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """Tuning on a test OOD set makes its rows optimistic: a warning names it (folder or the same Dataset object); a
    set apart passes quietly. OOD sets holding only csid (or val) sets name what they hold."""
    from torchvision.datasets import FakeData

    with caplog.at_level(logging.WARNING, logger="ood"):
        FolderBenchmark(folders["id"], ood={"far": {"checkers": folders["far"]}, "val": folders["far"]})
        fake = FakeData(4, (3, 16, 16), 3)
        FolderBenchmark(folders["id"], ood={"far": {"checkers": folders["far"], "fake": fake}, "val": fake})
        FolderBenchmark(folders["id"], ood={"far": {"checkers": folders["far"]}, "val": folders["near"]})
    warned = [r.getMessage() for r in caplog.records if "validation-OOD set" in r.getMessage()]
    assert len(warned) == 2 and warned[0].startswith(f"the validation-OOD set (data.ood.val, {folders['far']}) is also "
                                                     "the test OOD set checkers: the detectors are tuned on test images")
    assert "is also the test OOD set fake:" in warned[1]
    with pytest.raises(ConfigError, match=r"^data=folder needs at least one OOD test set \(near or far\); the OOD sets "
                                          r"given hold only 'csid' \('val': validation OOD"):
        FolderBenchmark(folders["id"], ood={"csid": {"shifted": folders["id"] / "test"}})


@pytest.mark.parametrize(("cpus", "workers"), [(2, 2), (8, 4)])
def test_the_default_loader_workers_fit_the_machine(folders: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, cpus: int, workers: int) -> None:
    """data=folder's default of 4 loader workers made torch warn at every loader of a 2-CPU machine ('This
    DataLoader will create 4 worker processes in total. Our suggested max number of worker in current system is 2'):
    the default is 4, or the CPUs the process may use when fewer."""
    import warnings

    from ood.utils import instantiate

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    cfg = compose_config(tmp_path, ["data=folder", f"data.root={folders['id']}", f"+data.ood.far={{c: {folders['far']}}}",
                                    "data.image_size=32", "data.resize=32"])
    datamodule = instantiate(cfg.data, seed=0)
    assert datamodule.num_workers == workers
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        datamodule.val_dataloader().check_worker_number_rationality()  # torch's check when a loader starts workers


def test_class_names_in_another_unicode_form_are_the_same_class(folders: dict[str, Path]) -> None:
    """A split copied from macOS names its class folders in NFD ('cafe' + a combining accent), the train split in NFC:
    one name to a reader, but by their bytes an absent class of the test split, an unlisted folder of data.classes,
    a class of a Dataset absent from train. Class names are matched by their NFC form; one folder in both forms is
    one line."""
    import unicodedata

    from torchvision.datasets import ImageFolder

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    root = folders["id"]
    (root / "train" / "c1").rename(root / "train" / nfc)
    (root / "test" / "c1").rename(root / "test" / nfd)
    bench = FolderBenchmark(root, ood=[folders["far"]])
    assert bench.classes == ["c0", "c2", nfc]
    assert {p.parent.name: y for p, y in bench.id_sets["test"].entries} == {"c0": 0, "c2": 1, nfd: 2}
    given = FolderBenchmark(root, ood=[folders["far"]], classes=[nfd, "c0", "c2"])  # typed in the other form
    assert {p.parent.name: y for p, y in given.id_sets["train"].entries} == {nfc: 0, "c0": 1, "c2": 2}
    shown = FolderBenchmark(train=root / "train", test=ImageFolder(str(root / "test")), ood=[folders["far"]])
    assert shown.id_sets["test"].relabel is None and shown.classes == ["c0", "c2", nfc]
    shutil.copytree(root / "train" / nfc, root / "train" / nfd)
    with pytest.raises(ConfigError, match=re.escape(f"/train: class folders {sorted([nfc, nfd])} are one name in two Unicode "
                                                    "forms (NFC and NFD, e.g. one copied from macOS): merge them")):
        FolderBenchmark(root, ood=[folders["far"]])


def test_the_unreadable_image_hint_names_the_option_as_the_caller_gives_it(folders: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    """The hint at an unreadable image named the config key `data.bad_images=skip` to Python callers too: those of
    ood.evaluate give the keyword `bad_images='skip'`, and ood.extract has no such option."""
    (folders["far"] / "broken.png").write_bytes(b"not an image")
    common = dict(image_size=32, resize=32, device="cpu")
    with pytest.raises(BadImageError, match=r"^unreadable image .*/checkers/broken.png: .* \(bad_images='skip' skips "
                                            r"such files\)$"):
        ood.evaluate(_pixels(), folders["id"], [folders["far"]], detectors=["msp"], output_dir=tmp_path / "run", **common)
    with pytest.raises(ConfigError, match=r"^bad_images='maybe' is unknown; choices: \['error', 'skip'\]$"):
        ood.evaluate(_pixels(), folders["id"], [folders["far"]], bad_images="maybe", output_dir=tmp_path / "bad", **common)
    with pytest.raises(BadImageError, match=r"^unreadable image .*/checkers/broken.png: .* \(ood.extract reads every "
                                            r"file: remove it, or pass a Dataset that leaves it out\)$"):
        ood.extract(_pixels(), folders["far"], **common)
    far = FolderBenchmark(folders["id"], ood=[folders["far"]], image_size=32, resize=32).ood_test()[0].dataset
    with pytest.raises(BadImageError, match=r"broken.png: .* \(data.bad_images=skip skips such files\)$"):  # the CLI's
        far[next(i for i in range(len(far)) if far.describe(i).endswith("broken.png"))]


def test_messages_name_the_options_as_the_caller_gives_them(folders: dict[str, Path], tmp_path: Path) -> None:
    """The folder data's messages named config overrides (`data.root=`, `data.classes`, `data.interpolation=`,
    `data.ood`) to callers of ood.evaluate / ood.extract too, whose keywords are `id_data`, `classes`,
    `interpolation`, `ood_data`: each message names the option as its caller gives it (the CLI's are unchanged)."""
    root, far = folders["id"], folders["far"]
    with pytest.raises(ConfigError, match=r"^ood.evaluate needs id_data=<folder with train/ and test/> \(or "
                                          r"id_data=\{'train': \.\.\., 'test': \.\.\.\}: folders"):
        ood.evaluate(_pixels(), {"train": root / "train"}, [far], detectors=["msp"], device="cpu",
                     output_dir=tmp_path / "run", image_size=32, resize=32)
    with pytest.raises(ConfigError, match=r"^interpolation='cubic' is unknown; choices: \['bilinear'"):
        ood.extract(_pixels(), far, interpolation="cubic")
    with pytest.raises(ConfigError, match=r"^resize=16 is below the centre crop image_size=32, .* set image_size=16 too"):
        ood.extract(_pixels(), far, image_size=32, resize=16)
    with pytest.raises(ConfigError, match=r"^ood_data has unknown keys \['nera'\] \('nera': did you mean 'near'\?\)"):
        ood_mapping({"nera": {"a": far}}, python_api=True)
    with pytest.raises(DataNotFoundError, match=r"^id_data: folder not found: .*/nowhere \(expected"):
        FolderBenchmark(tmp_path / "nowhere", ood=[far], python_api=True)
    with pytest.raises(ConfigError, match=r"^classes must name each class folder of .*/train once: not listed: \['c2'\]$"):
        FolderBenchmark(root, ood=[far], classes=["c0", "c1"], python_api=True)
    with pytest.raises(ConfigError, match=r"^data.classes must name each class folder"):  # the CLI's
        FolderBenchmark(root, ood=[far], classes=["c0", "c1"])
    (root / "train" / "zebra").mkdir()  # one image, which the held-out validation split takes
    shutil.copy(root / "train" / "c0" / "0.png", root / "train" / "zebra" / "0.png")
    shutil.copytree(root / "test" / "c0", root / "test" / "zebra")
    with pytest.raises(DataNotFoundError, match=r"holding out the ID validation split \(val_fraction=0.1, at least"):
        FolderBenchmark(root, ood=[far], python_api=True)


@pytest.mark.parametrize("python_api", [False, True])
def test_split_and_screening_options_of_the_wrong_type_or_range_are_one_line(folders: dict[str, Path],
                                                                            python_api: bool) -> None:
    """Each was taken as given: `exact_duplicates='no'` is a true string and ran the exact check, `val_fraction=0`
    still held out one image per class, `overlap_threshold=1.0` let rounding decide which identical images count
    (their cosine reaches 1 only up to it), a word as the threshold failed in a comparison after the evaluation
    pass. Now one line before any file is read, the option named as the caller gives it."""
    root, far = folders["id"], folders["far"]
    name = (lambda key: key) if python_api else (lambda key: f"data.{key}")
    flag = "True or False" if python_api else "true or false"
    cases = [
        ("exact_duplicates", "no", rf"{name('exact_duplicates')}=(no|'no'): must be {flag}$"),
        ("drop_overlap", 1, rf"{name('drop_overlap')}=1: must be {flag}$"),
        ("augment", None, rf"{name('augment')}=(null|None): must be {flag}$"),
        ("val_fraction", 0, rf"{name('val_fraction')}=0: must be in \(0, 1\), the share of the train images held out"),
        ("val_fraction", -0.1, rf"{name('val_fraction')}=-0.1: must be in \(0, 1\)"),
        ("val_fraction", 1.5, rf"{name('val_fraction')}=1.5: must be in \(0, 1\)"),
        ("val_fraction", True, rf"{name('val_fraction')}=(true|True): must be in \(0, 1\)"),
        ("split_seed", 1.5, rf"{name('split_seed')}=1.5: must be a whole number >= 0$"),
        ("split_seed", -1, rf"{name('split_seed')}=-1: must be a whole number >= 0$"),
        ("scan_workers", 0, rf"{name('scan_workers')}=0: must be a whole number >= 1$"),
        ("overlap_threshold", 1.0, rf"{name('overlap_threshold')}=1.0: must be a cosine in \(-1, 1\), above which "
                                   rf"an OOD image is a near duplicate of an ID one, or {'None' if python_api else 'null'} "
                                   rf"for none \(identical features reach 1 only up to rounding; same-pixel copies "
                                   rf"are what {name('exact_duplicates')} finds\)$"),
        ("overlap_threshold", -1, rf"{name('overlap_threshold')}=-1: must be a cosine in \(-1, 1\)"),
        ("overlap_threshold", "x", rf"{name('overlap_threshold')}=(x|'x'): must be a cosine in \(-1, 1\)"),
    ]
    for key, value, message in cases:
        with pytest.raises(ConfigError, match=rf"^{message}") as err:
            FolderBenchmark(root, ood=[far], python_api=python_api, **{key: value})
        assert "\n" not in str(err.value), key
    # the edges inside the ranges, and numpy's scalars, are taken
    bench = FolderBenchmark(root, ood=[far], python_api=python_api, val_fraction=np.float64(0.5), split_seed=np.int64(3),
                            overlap_threshold=-0.999, scan_workers=1, exact_duplicates=False)
    assert (bench.overlap_threshold, bench.split_seed, bench.exact_duplicates) == (-0.999, 3, False)
    assert FolderBenchmark(root, ood=[far], python_api=python_api, overlap_threshold=None).overlap_threshold is None


def test_near_duplicates_are_sought_among_the_fit_split_and_overlap_json_says_so(folders: dict[str, Path],
                                                                                tmp_path: Path) -> None:
    """With data.fit_fraction < 1 the pass has features of the fit split's train images alone: a near copy of another
    train image is not found by the cosine (finding it takes the pass fit_fraction leaves out), and overlap.json did
    not say which train images were compared. It records them (`near_train`); copies of the held-out validation
    images are found through the val split."""
    planted = shutil.copytree(folders["far"], tmp_path / "planted")
    train = sorted((folders["id"] / "train").rglob("*.png"))
    for i, path in enumerate(train):  # a near copy of each of the 12 train-folder images
        near = np.asarray(Image.open(path)).astype(int)
        near[:2, :2] = np.clip(near[:2, :2] + 3, 0, 255)
        Image.fromarray(near.astype(np.uint8)).save(planted / f"near{i}.png")
    results = ood.evaluate(_pixels(), folders["id"], {"far": {"planted": planted}}, detectors=["msp"], image_size=32,
                           resize=32, device="cpu", output_dir=tmp_path / "run", fit_fraction=0.25)
    assert results.overlap["near_train"] == {"compared": 2, "of": 9}  # 3 of the 12 held out for val, a quarter of 9
    listed = results.overlap["sets"]["planted"]
    assert sorted(e["id_split"] for e in listed) == ["train", "train", "val", "val", "val"]
    assert {e["kind"] for e in listed} == {"near"}
