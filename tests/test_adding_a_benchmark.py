"""docs/adding_a_benchmark.md: its data config, copied out of the page into a folder outside ood's (`hydra.searchpath`),
trains, evaluates (standard and full-spectrum rows) and reports on tiny images fabricated in the layout its set specs
name; and the pitfalls the page lists are one-line errors naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import compose_config, doc_blocks
from omegaconf import OmegaConf
from PIL import Image
from sklearn.metrics import roc_auc_score

from ood import PROJECT_ROOT
from ood.errors import ConfigError
from ood.utils import instantiate

DOC = PROJECT_ROOT / "docs" / "adding_a_benchmark.md"
CLASSES = ["benign", "malignant", "nevus"]
#: images per class of each ID split, and per OOD set
PER_CLASS = {"train": 4, "val": 2, "test": 3}
OOD_SIZES = {"other_lesions": 4, "noise": 5, "val_ood": 3}
CSID_PER_CLASS = 2
RNG = np.random.default_rng(0)


def page_yaml() -> str:
    """The page's one yaml block: the data config."""
    (block,) = doc_blocks(DOC, "yaml")
    return block


def _image(path: Path, tint: int | None, light: int = 180) -> None:
    """A 20 px PNG: colour channel `tint` lit by `light` over noise (an ID class: learnable in one epoch), or noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = RNG.integers(0, 60, (20, 20, 3), dtype=np.uint8)
    if tint is not None:
        pixels[..., tint] += light
    Image.fromarray(pixels).save(path)


def fabricate(data: Path, benchmark: dict) -> None:
    """The files the config's set specs name, under `data` (its `data_dir`)."""
    for split, n in PER_CLASS.items():
        for c, name in enumerate(CLASSES):
            for i in range(n):
                _image(data / benchmark[split]["folder"] / name / f"{i}.png", c)
    protocol = benchmark["protocols"][benchmark["protocol"]]
    sets = {**protocol["near"], **protocol["far"], "val_ood": protocol["val_ood"]}
    for set_name, spec in sets.items():  # near-OOD: the ID colours, dimmer (not all ranked apart); far: noise
        for i in range(OOD_SIZES[set_name]):
            _image(data / spec["folder"] / f"{i}.png", *((i % 3, 90) if set_name == "other_lesions" else (None,)))
    for spec in protocol["csid"].values():
        lines = []
        for c, name in enumerate(CLASSES):
            for i in range(CSID_PER_CLASS):
                _image(data / spec["images"] / "bright" / f"{name}_{i}.png", c)
                lines.append(f"bright/{name}_{i}.png {c}")
        (data / spec["imglist"]).write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding `my_conf/data/skin.yaml` (the page's block, verbatim) and `data/` fabricated for it."""
    root = tmp_path_factory.mktemp("own_benchmark")
    (root / "my_conf" / "data").mkdir(parents=True)
    (root / "my_conf" / "data" / "skin.yaml").write_text(page_yaml())
    fabricate(root / "data", OmegaConf.to_container(OmegaConf.create(page_yaml()))["benchmark"])
    return root


def _overrides(page: Path, *extra: str) -> list[str]:
    return [f"hydra.searchpath=[file://{page}/my_conf]", "data=skin", f"paths.data_dir={page}/data", *extra]


def test_the_page_config_trains_evaluates_and_reports(page: Path, tmp_path: Path) -> None:
    from ood.report import main as report
    from ood.train import run

    out = tmp_path / "run"
    cfg = compose_config(out, _overrides(page, "data.batch_size=6", "data.num_workers=0", "trainer.max_epochs=1",
                                         "detectors.names=[msp,energy]", "evaluation.fsood=true", "logger=none",
                                         "callbacks=none", "trainer.enable_progress_bar=false",
                                         "evaluation.sinks.results.figures=false"))
    rows = run(cfg)
    found = {(r["mode"], r["detector"], r["ood_dataset"]): r for r in rows}
    assert sorted(found) == sorted((m, d, s) for m in ("standard", "fsood") for d in ("msp", "energy")
                                   for s in ("other_lesions", "noise"))
    assert {r["ood_dataset"]: r["ood_group"] for r in rows} == {"other_lesions": "near", "noise": "far"}
    assert {r["id_dataset"] for r in rows} == {"skin"}
    test, csid = 3 * PER_CLASS["test"], 3 * CSID_PER_CLASS
    assert {(r["mode"], r["ood_dataset"]): (r["n_id"], r["n_ood"]) for r in rows} == {
        ("standard", "other_lesions"): (test, 4), ("standard", "noise"): (test, 5),
        ("fsood", "other_lesions"): (test + csid, 4), ("fsood", "noise"): (test + csid, 5)}
    # the AUROC is the ranking of the scores the run wrote: ID test (+ the csid set) positive, the OOD set negative
    scores = np.load(out / "scores.npz")
    for (mode, detector, name), row in found.items():
        ident = [scores[f"{detector}/test"]] + ([scores[f"{detector}/bright"]] if mode == "fsood" else [])
        ident, ood = np.concatenate(ident), scores[f"{detector}/{name}"]
        labels = np.r_[np.ones(len(ident)), np.zeros(len(ood))]
        assert row["auroc"] == pytest.approx(roc_auc_score(labels, np.r_[ident, ood]), abs=1e-12)
    assert 0.05 < found["standard", "msp", "other_lesions"]["auroc"] < 0.95  # a ranking, not a clean split
    # the preprocessing is the config's (resize defaults to image_size) and names the configuration, the data
    # folder does not
    written = OmegaConf.load(out / "config.yaml").data.benchmark
    assert (written.image_size, written.resize, list(written.mean), list(written.std)) == (32, 32, [0.5] * 3, [0.5] * 3)
    identity = json.loads((out / "identity.json").read_text())
    assert identity["config"]["data.benchmark.resize"] == "32"
    assert identity["config"]["data.benchmark.protocols.main.far.noise.folder"] == "skin/ood/noise"
    assert not any("data_dir" in key for key in identity["config"])
    assert identity["group"] == f"ce-skin-small_cnn-{identity['hash']}"
    # ood-report: one row per mode and detector; near / far = the group's one set each here
    report([str(out), "--no-figures", "--no-reference"])
    table = (out / "report.csv").read_text().splitlines()
    entries = [dict(zip(table[0].split(","), line.split(","))) for line in table[1:]]
    assert sorted((e["mode"], e["detector"], e["id_dataset"]) for e in entries) == sorted(
        (m, d, "skin") for m in ("standard", "fsood") for d in ("msp", "energy"))
    for e in entries:
        for group, name in (("near", "other_lesions"), ("far", "noise")):
            assert float(e[f"{group}/auroc_mean"]) == pytest.approx(found[e["mode"], e["detector"], name]["auroc"])


def test_val_size_above_the_train_split_names_the_key(page: Path, tmp_path: Path) -> None:
    """Without a `val` spec, `val_size` (1000) train images are held out: on a small train split that was
    "val_size must be between 1 and 11 (the ID test set size)", naming neither the key nor the split."""
    cfg = compose_config(tmp_path, _overrides(page, "~data.benchmark.val"))
    bench = instantiate(cfg.data, seed=0).benchmark
    with pytest.raises(ConfigError) as error:
        bench.train()
    assert str(error.value) == (
        "skin: data.benchmark.val_size=1000: the train images held out as the ID validation split (there is no "
        "data.benchmark.val spec) must be 1 to 11 of its 12; give a val spec, or a val_size in that range")
    cfg = compose_config(tmp_path, _overrides(page, "~data.benchmark.val", "data.benchmark.val_size=3"))
    bench = instantiate(cfg.data, seed=0).benchmark
    assert (len(bench.train()), len(bench.val())) == (9, 3)


def test_the_preprocessing_is_printed(page: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file benchmark names its preprocessing as it starts, as `data=folder` does: it said only where it read
    from, and the ImageNet defaults of a config without `image_size` (224 px, resize 256) went unsaid."""
    cfg = compose_config(tmp_path, _overrides(page, "data.benchmark.augment=false"))
    with caplog.at_level("INFO", logger="ood.data.files"):
        instantiate(cfg.data, seed=0).benchmark.prepare()
    assert f"skin: reading files from {page}/data (main protocol); preprocessing: resize 32 (bilinear), centre crop " \
           "32, mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]; training: the same (augment=false)" in caplog.messages


@pytest.mark.parametrize(("pool", "message"), [
    ("skin/ood", "holds the test OOD set 'other_lesions' ({data}/skin/ood/other_lesions): outlier exposure would "
                 "train on images it is then scored on as test OOD"),
    ("skin/train/nevus", "is inside the ID split 'skin:train' ({data}/skin/train): outlier exposure would train ID "
                         "images as OOD"),
])
def test_outliers_apart_from_the_id_and_test_sets(page: Path, tmp_path: Path, pool: str, message: str) -> None:
    """An outlier pool that is, holds or lies inside an ID split, a csid set or a test OOD set is refused before
    training (`data=folder` refuses one among the ID splits); a file benchmark trained on it without a word."""
    cfg = compose_config(tmp_path, _overrides(page, f"data.benchmark.outliers={{folder: {pool}}}"))
    with pytest.raises(ConfigError) as error:
        instantiate(cfg.data, seed=0).benchmark.prepare()
    data = page / "data"
    assert str(error.value) == f"skin: data.benchmark.outliers {data}/{pool} " + message.format(data=data) + \
        "; give a pool of images of none of them"
    cfg = compose_config(tmp_path, _overrides(page, "data.benchmark.outliers={folder: skin/ood/val}"))
    instantiate(cfg.data, seed=0).benchmark.prepare()  # the validation OOD set may be the pool: tuning only
