"""Full-spectrum OOD (`evaluation.fsood=true`): ID = ID test + every covariate-shifted ID (csid) set, from one pass.

- the rows of both modes equal an independent transcription of OpenOOD v1.5's evaluator on the same scores
  (`Evaluator.eval_ood(fsood=True)` concatenates the ID test and csid scores, `compute_all_metrics` measures with
  OOD as the positive class, `eval_acc('csid')` pools the correct predictions of ID test and every csid set);
- on digits (a trained CE checkpoint, evaluation only) the full-spectrum AUROC equals scikit-learn's on the saved
  scores with ID = test + the three corrupted copies, and the csid accuracies equal the model's own predictions;
- on the user's own folders (`data=folder`, `data.ood.csid`): a csid set that is a copy of the ID test folder gives
  the standard AUROC and FPR95, ID accuracy and twice the ID count; full-spectrum evaluation without csid sets is
  refused before training, and training that does not evaluate (`evaluate=false`) asks for none; csid folders and
  lists get the ID test split's class checks;
- OpenOOD's ImageNet-1K csid lists: an optional one not on disk (ImageNet-ES) is skipped with one warning, and
  ImageNet-C, fed as stored, must be at the input size;
- the configuration mistakes say what to do.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_config, folder_overrides, histogram_bars, make_image_folders, run_config
from PIL import Image
from sklearn import metrics as skm

from ood import CONFIG_DIR
from ood.data import DigitsBenchmark, EvalSplit, OODDataModule
from ood.errors import ConfigError, DataNotFoundError
from ood.evaluation.scoring import Scorer, evaluate, group_means, rows_by_mode

RNG = np.random.default_rng(7)


# ----- an independent transcription of OpenOOD v1.5 (openood/evaluation_api/evaluator.py, evaluators/metrics.py) -------
def openood_metrics(conf: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """`compute_all_metrics`: OOD (label -1) positive, scores negated; FPR at the first ROC point with TPR >= 0.95."""
    ood = (label == -1).astype(int)
    fpr, tpr, _ = skm.roc_curve(ood, -conf)
    p_in, r_in, _ = skm.precision_recall_curve(1 - ood, conf)
    p_out, r_out, _ = skm.precision_recall_curve(ood, -conf)
    return {"fpr95_oodpos": fpr[np.argmax(tpr >= 0.95)], "auroc": skm.auc(fpr, tpr),
            "aupr_in": skm.auc(r_in, p_in), "aupr_out": skm.auc(r_out, p_out)}


def openood_eval_ood(id_test: tuple, csid: dict[str, tuple], ood: dict[str, dict[str, np.ndarray]], fsood: bool) -> dict:
    """`eval_ood(fsood)`: per OOD set and per near/far mean (over sets), plus the accuracy column (`id_acc` or
    `csid_acc`). `id_test` and each csid entry are (pred, conf, gt) arrays; `ood[group][name]` are confidences."""
    pred, conf, gt = id_test
    if fsood:
        pred = np.concatenate([pred, *(c[0] for c in csid.values())])
        conf = np.concatenate([conf, *(c[1] for c in csid.values())])
        gt = np.concatenate([gt, *(c[2] for c in csid.values())])
    table = {}
    for group, sets in ood.items():
        rows = []
        for name, ood_conf in sets.items():
            row = openood_metrics(np.concatenate([conf, ood_conf]), np.concatenate([gt, -np.ones(len(ood_conf), int)]))
            table[name] = row
            rows.append(row)
        table[f"{group}ood"] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    correct, total = (id_test[0] == id_test[2]).sum(), len(id_test[2])
    if fsood:  # eval_acc('csid'): every csid set's correct predictions, then the ID test's
        correct += sum((c[0] == c[2]).sum() for c in csid.values())
        total += sum(len(c[2]) for c in csid.values())
    return {"metrics": table, "acc": correct / total}


# ----- fabricated scores -------------------------------------------------------------------------------------------
SIZES = {"test": 60, "blur": 35, "noise": 25, "near_a": 40, "far_a": 30, "far_b": 20}
SPLITS = [EvalSplit("test", "id_test"), EvalSplit("near_a", "ood", "near"), EvalSplit("far_a", "ood", "far"),
          EvalSplit("far_b", "ood", "far"), EvalSplit("blur", "csid"), EvalSplit("noise", "csid")]
SHIFT = {"test": 2.0, "blur": 1.0, "noise": 0.5, "near_a": 0.3, "far_a": -1.0, "far_b": 0.0}


@pytest.fixture(scope="module")
def fabricated() -> dict:
    scores = {d: {s: torch.from_numpy(RNG.normal(SHIFT[s] * (k + 1) / 2, 1.0, n)) for s, n in SIZES.items()}
              for k, d in enumerate(("msp", "energy"))}
    labels = {s: RNG.integers(0, 4, SIZES[s]) for s in ("test", "blur", "noise")}
    preds = {s: np.where(RNG.random(len(y)) < {"test": 0.9, "blur": 0.7, "noise": 0.5}[s], y, (y + 1) % 4)
             for s, y in labels.items()}
    acc = {s: float((preds[s] == labels[s]).mean()) for s in labels}
    scorers = [Scorer(d, lambda split, d=d: scores[d][split]) for d in scores]
    rows, _ = evaluate(scorers, SPLITS, acc["test"], {"method": "ce"}, modes=("standard", "fsood"),
                       csid_acc={s: acc[s] for s in ("blur", "noise")})
    return {"scores": scores, "labels": labels, "preds": preds, "rows": rows}


@pytest.mark.parametrize("fsood", [False, True])
def test_both_modes_equal_openood_evaluator(fabricated: dict, fsood: bool) -> None:
    mode = "fsood" if fsood else "standard"
    rows = rows_by_mode(fabricated["rows"])[mode]
    means = group_means(rows)
    preds, labels = fabricated["preds"], fabricated["labels"]
    for detector, per_split in fabricated["scores"].items():
        conf = {s: v.numpy() for s, v in per_split.items()}
        reference = openood_eval_ood(
            (preds["test"], conf["test"], labels["test"]),
            {s: (preds[s], conf[s], labels[s]) for s in ("blur", "noise")},
            {"near": {"near_a": conf["near_a"]}, "far": {"far_a": conf["far_a"], "far_b": conf["far_b"]}},
            fsood,
        )
        ours = {r["ood_dataset"]: r for r in rows if r["detector"] == detector}
        assert set(ours) == {"near_a", "far_a", "far_b"}
        for name, row in ours.items():
            for metric, value in reference["metrics"][name].items():
                assert row[metric] == pytest.approx(value, abs=1e-12), (detector, name, metric)
            assert row["n_id"] == SIZES["test"] + fsood * (SIZES["blur"] + SIZES["noise"])
            assert row["mode"] == mode
            assert (row["csid_acc"] if fsood else row["id_acc"]) == pytest.approx(reference["acc"], abs=1e-15)
        for group in ("near", "far"):
            for metric, value in reference["metrics"][f"{group}ood"].items():
                assert means[detector, group][metric] == pytest.approx(value, abs=1e-12)
    if fsood:
        row = rows[0]
        assert row["id_acc"] == pytest.approx(float((preds["test"] == labels["test"]).mean()))
        assert row["csid_set_acc"] == {s: pytest.approx(float((preds[s] == labels[s]).mean())) for s in ("blur", "noise")}


def test_full_spectrum_is_harder_when_csid_looks_ood(fabricated: dict) -> None:
    """The csid sets score lower than ID test here, so counting them as ID lowers every AUROC (sanity of the data)."""
    modes = rows_by_mode(fabricated["rows"])
    standard = {(r["detector"], r["ood_dataset"]): r["auroc"] for r in modes["standard"]}
    fsood = {(r["detector"], r["ood_dataset"]): r["auroc"] for r in modes["fsood"]}
    assert fsood.keys() == standard.keys() == {(d, s) for d in ("msp", "energy") for s in ("near_a", "far_a", "far_b")}
    assert all(fsood[key] < standard[key] for key in fsood)


def test_fsood_only_and_mistakes(fabricated: dict) -> None:
    scorer = [Scorer("msp", lambda split: fabricated["scores"]["msp"][split])]
    acc = {"blur": 14 / 35, "noise": 5 / 25}
    rows, scores = evaluate(scorer, SPLITS, 1.0, {}, modes=("fsood",), csid_acc=acc)
    assert {r["mode"] for r in rows} == {"fsood"} and set(scores["msp"]) == set(SIZES)
    assert rows[0]["csid_acc"] == (60 + 14 + 5) / 120
    with pytest.raises(ConfigError, match="choose one or more of \\['standard', 'fsood'\\]"):
        evaluate(scorer, SPLITS, 1.0, {}, modes=("full",))
    with pytest.raises(ConfigError, match="found no covariate-shifted ID set"):
        evaluate(scorer, [s for s in SPLITS if s.role != "csid"], 1.0, {}, modes=("fsood",))
    from ood.evaluation.callback import OODEvaluation
    from ood.evaluation.evaluator import Evaluator

    with pytest.raises(ConfigError, match="leave nothing to evaluate"):
        OODEvaluation(Evaluator(detectors=["msp"]), standard=False, fsood=False)


def test_datamodule_serves_csid_only_when_asked() -> None:
    names = lambda dm: [(s.name, s.role) for s in dm.eval_splits]  # noqa: E731
    plain = OODDataModule(DigitsBenchmark(), eval_batch_size=1000)
    assert all(role != "csid" for _, role in names(plain))
    full = OODDataModule(DigitsBenchmark(csid={"blur": 1.0, "shift": 1}), eval_batch_size=1000, csid=True)
    assert names(full)[-2:] == [("digits_blur", "csid"), ("digits_shift", "csid")]
    assert names(full)[:-2] == names(plain)
    with pytest.raises(ConfigError, match=r"benchmark digits lists none: set data.benchmark.csid=\{corruption: severity\} with "
                                          r"corruptions among \['noise', 'blur', 'shift'\]$"):
        OODDataModule(DigitsBenchmark(csid={}), csid=True)
    with pytest.raises(ConfigError, match="unknown digits csid corruptions \\['fog'\\]; choices"):
        DigitsBenchmark(csid={"fog": 1.0})
    # a severity the corruption cannot use is one line, not torch's error deep in the data build
    for corruption, severity, rule in [("shift", 0, "a whole number >= 1"), ("shift", 0.5, "a whole number >= 1"),
                                       ("blur", 0, "a number > 0"), ("noise", -1, "a number >= 0"), ("noise", "x", "a number >= 0")]:
        with pytest.raises(ConfigError, match=f"^data.benchmark.csid.{corruption}={severity!r}: must be {rule}"):
            DigitsBenchmark(csid={corruption: severity})
    assert DigitsBenchmark(csid={"noise": 0, "shift": 2.0, "blur": 0.5}).csid_names == ("digits_noise", "digits_shift", "digits_blur")


def test_digits_csid_sets_are_the_test_digits_corrupted() -> None:
    bench = DigitsBenchmark()
    test = bench.test()
    mean, std = bench.input_mean[0], bench.input_std[0]
    clean = test.images * std + mean  # back to [0, 1] pixels
    for s in bench.csid_test():
        assert torch.equal(s.dataset.labels, test.labels)  # labelled with the ID classes, image for image
        pixels = s.dataset.images * std + mean
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
        if s.name == "digits_shift":  # every image is its clean digit moved by 2 pixels in one of 8 directions
            moved = torch.stack([torch.roll(clean, (dy, dx), (2, 3)) for dy in (-2, 0, 2) for dx in (-2, 0, 2)])
            inner = (slice(None), slice(None), slice(None), slice(2, -2), slice(2, -2))  # away from the black fill
            hits = (moved[inner] - pixels[None][inner]).abs().amax((2, 3, 4)) < 1e-5  # [9 moves, N]
            assert hits.any(0).all() and not hits[4].any()  # index 4: no move
        else:
            assert (pixels - clean).abs().mean() > 0.02


# ----- digits end to end ------------------------------------------------------------------------------------------
EVAL = ["train=false", "trainer.enable_progress_bar=false", "detectors.names=[msp,energy,knn]", "detectors.tune=false",
        "logger=none"]


@pytest.fixture(scope="module")
def digits_fsood(ce_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("fsood_digits")
    return out, run_config(out, [*EVAL, f"ckpt_path={ce_checkpoint}", "evaluation.fsood=true"])


def test_digits_both_modes_auroc_by_hand(digits_fsood: tuple[Path, list[dict]]) -> None:
    out, rows = digits_fsood
    csid = ["digits_noise", "digits_blur", "digits_shift"]
    modes = rows_by_mode(rows)
    assert set(modes) == {"standard", "fsood"} and len(modes["standard"]) == len(modes["fsood"]) == 3 * 4
    scores = np.load(out / "scores.npz")
    for row in rows:
        per = lambda split, d=row["detector"]: scores[f"{d}/{split}"]  # noqa: E731
        id_scores = np.concatenate([per("test"), *(per(c) for c in csid)]) if row["mode"] == "fsood" else per("test")
        ood = per(row["ood_dataset"])
        truth = np.r_[np.ones(len(id_scores)), np.zeros(len(ood))]
        assert row["auroc"] == pytest.approx(skm.roc_auc_score(truth, np.r_[id_scores, ood]), abs=1e-12)
        assert row["n_id"] == len(id_scores)
    assert list(modes["fsood"][0]["csid_set_acc"]) == csid
    # full-spectrum lowers the near AUROC of every detector here (the shifted digits look less ID)
    standard = {(r["detector"], r["ood_dataset"]): r["auroc"] for r in modes["standard"]}
    assert all(r["auroc"] < standard[r["detector"], r["ood_dataset"]] for r in modes["fsood"] if r["ood_group"] == "near")
    assert (out / "figures" / "hist_msp.png").is_file()
    written = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in written] == [r["mode"] for r in rows]


def test_digits_csid_accuracy_is_the_models(digits_fsood: tuple[Path, list[dict]], ce_checkpoint: Path) -> None:
    from omegaconf import OmegaConf

    from ood.utils import instantiate

    out, rows = digits_fsood
    cfg = OmegaConf.load(out / "config.yaml")
    bench = instantiate(cfg.data).benchmark
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone, num_classes=6, in_channels=1))
    method.load_state_dict(torch.load(ce_checkpoint, map_location="cpu", weights_only=False)["state_dict"])
    method.eval()
    correct, total = 0, 0
    row = next(r for r in rows if r["mode"] == "fsood")
    with torch.no_grad():
        for name, dataset in [("test", bench.test()), *((s.name, s.dataset) for s in bench.csid_test())]:
            hits = int((method(dataset.images).argmax(1) == dataset.labels).sum())
            correct, total = correct + hits, total + len(dataset)
            if name != "test":
                assert row["csid_set_acc"][name] == pytest.approx(hits / len(dataset), abs=1e-12)
    assert row["csid_acc"] == pytest.approx(correct / total, abs=1e-12)
    assert row["id_acc"] == pytest.approx(next(r for r in rows if r["mode"] == "standard")["id_acc"])
    assert row["csid_acc"] < row["id_acc"]  # the corrupted digits are harder


@pytest.mark.slow
@pytest.mark.usefixtures("no_figures")  # reads no figure (matplotlib: seconds a run)
def test_digits_fsood_only_table(ce_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = run_config(tmp_path, [*EVAL[:-1], "detectors.names=[msp]", f"ckpt_path={ce_checkpoint}",
                                 "evaluation.fsood=true", "evaluation.standard=false"])
    assert {r["mode"] for r in rows} == {"fsood"} and len(rows) == 4
    printed = capsys.readouterr().out
    assert "full-spectrum: AUROC / FPR95" in printed and "digits_noise" in printed and " FS" not in printed


# ----- OpenOOD's csid lists ----------------------------------------------------------------------------------------
def openood_imagenet_csid(root: Path, side: int) -> Path:
    """OpenOOD's ImageNet-1K csid lists as its benchmark download brings them: V2, C, R (no ImageNet-ES), one image
    each."""
    for name in ("v2", "c", "r"):
        folder = root / "images_largescale" / f"imagenet_{name}"
        folder.mkdir(parents=True)
        Image.fromarray(RNG.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / "0.png")
        lists = root / "benchmark_imglist" / "imagenet"
        lists.mkdir(parents=True, exist_ok=True)
        (lists / f"test_imagenet_{name}.txt").write_text(f"imagenet_{name}/0.png 3\n")
    return root


def test_optional_csid_set_not_on_disk_is_skipped_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """ImageNet-ES (optional: not in OpenOOD's download bundle) was skipped silently, so full-spectrum rows whose ID
    lacked it read as OpenOOD's, which pools it; now one warning (prepare_data and setup both read the csid sets)."""
    from ood.utils import instantiate

    tree = openood_imagenet_csid(tmp_path / "data", 16)
    cfg = compose_config(tmp_path / "run", ["data=imagenet1k", f"paths.data_dir={tree}", "data.benchmark.image_size=16",
                                            "data.benchmark.resize=16"])
    bench = instantiate(cfg.data).benchmark
    with caplog.at_level(logging.WARNING):
        assert [(s.name, len(s.dataset)) for s in bench.csid_test()] == [("imagenet_v2", 1), ("imagenet_c", 1), ("imagenet_r", 1)]
        bench.csid_test()
    warned = [r.getMessage() for r in caplog.records if "covariate-shifted ID set" in r.getMessage()]
    assert len(warned) == 1
    assert warned[0].startswith("imagenet1k (openood_v1.5 protocol): optional covariate-shifted ID set(s) 'imagenet_es' "
                                f"(looked for {tree / 'benchmark_imglist/imagenet/test_imagenet_es.txt'}")
    assert warned[0].endswith("skipped; the full-spectrum rows pool the ID test with the other csid sets only, so they "
                              "are not comparable with the protocol's published full-spectrum numbers")


def test_imagenet_c_fed_as_stored_must_be_the_input_size(tmp_path: Path) -> None:
    """ImageNet-C goes to the network as stored (OpenOOD's ImageNetCPreProcessor: to tensor + normalise); at another
    data.benchmark.image_size it went through at its own resolution, silently, beside every other set resized."""
    from ood.utils import instantiate

    tree = openood_imagenet_csid(tmp_path / "data", 20)
    cfg = compose_config(tmp_path / "run", ["data=imagenet1k", f"paths.data_dir={tree}", "data.benchmark.image_size=16",
                                            "data.benchmark.resize=16"])
    bench = instantiate(cfg.data).benchmark
    with pytest.raises(ConfigError, match=r"^imagenet1k: set 'imagenet_c' is fed as stored \(preprocess: tensor, OpenOOD's "
                                          r"ImageNet-C preprocessing\) and its images are 20x20, not "
                                          r"data.benchmark.image_size=16 like every other set: evaluate at "
                                          r"data.benchmark.image_size=20, or give the set preprocess: eval"):
        bench.csid_test()
    # a non-square stored image has no image_size to evaluate at: only the other fix is named
    Image.fromarray(RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tree / "images_largescale/imagenet_c/0.png")
    with pytest.raises(ConfigError, match=r"its images are 24x20, not data.benchmark.image_size=16 like every other set: "
                                          r"give the set preprocess: eval \(resized"):
        instantiate(cfg.data).benchmark.csid_test()
    cfg.data.benchmark.protocols["openood_v1.5"].csid.imagenet_c.preprocess = "eval"
    resized = instantiate(cfg.data).benchmark.csid_test()
    assert [tuple(s.dataset[0][0].shape) for s in resized] == [(3, 16, 16)] * 3


# ----- data=folder ------------------------------------------------------------------------------------------------
def test_folder_fsood_without_csid_sets_is_refused_before_training(tmp_path: Path) -> None:
    overrides = ["data=folder", *folder_overrides(tmp_path), "evaluation.fsood=true", "logger=none", "trainer.max_epochs=1"]
    with pytest.raises(ConfigError, match=r"needs covariate-shifted ID sets, and benchmark id lists none: give them "
                                          r"as '\+data.ood.csid=\{name: folder\}'"):
        run_config(tmp_path / "run", overrides)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "results.jsonl").exists()
    from ood.utils import instantiate

    shifted = shutil.copytree(tmp_path / "folders" / "id" / "test", tmp_path / "shifted")
    cfg = compose_config(tmp_path / "run", [*overrides, f"+data.ood.csid={{blurred: {shifted}}}"])
    datamodule = instantiate(cfg.data, seed=0)
    assert datamodule.csid and [(s.name, s.role) for s in datamodule.eval_splits][-1] == ("blurred", "csid")


def test_training_without_evaluation_needs_no_csid_sets(tmp_path: Path) -> None:
    """`ood-train evaluate=false evaluation.fsood=true` (a sweep's shared flags) trains: nothing is evaluated, so no
    csid set is asked for, listed or read."""
    from ood.utils import instantiate

    overrides = ["data=folder", *folder_overrides(tmp_path), "evaluation.fsood=true", "evaluate=false"]
    datamodule = instantiate(compose_config(tmp_path / "run", overrides).data, seed=0)
    datamodule.prepare_data()
    assert not datamodule.csid
    digits = OODDataModule(DigitsBenchmark(csid={}), csid=True, evaluate=False)
    assert not digits.csid and all(s.role != "csid" for s in digits.eval_splits)
    # every data config passes the switch (CIFAR-10-C was read by a CIFAR run that evaluates nothing)
    for data in sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml")):
        cfg = compose_config(tmp_path / data, [f"data={data}", "evaluation.fsood=true", "evaluate=false"])
        assert (cfg.data.csid, cfg.data.evaluate) == (True, False), data


@pytest.mark.usefixtures("no_figures")  # reads no figure (matplotlib: seconds a run)
def test_folder_csid_copy_of_id_test_gives_the_standard_numbers(tmp_path: Path) -> None:
    import ood

    paths = make_image_folders(tmp_path / "data", train=4, test=3, ood=4)
    lookalike = make_image_folders(tmp_path / "other", train=0, test=3, seed=1)["id"] / "test"  # ID-like: no clean cut
    copy = shutil.copytree(paths["id"] / "test", tmp_path / "test_copy")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
    results = ood.evaluate(model, paths["id"], {"near": {"lookalike": lookalike}, "far": paths["far"], "csid": [copy]},
                           detectors=["msp", "knn"], image_size=32, resize=32, device="cpu", output_dir=tmp_path / "run")
    modes = rows_by_mode(results.rows)
    assert len(modes["standard"]) == len(modes["fsood"]) == 4
    standard = {(r["detector"], r["ood_dataset"]): r for r in modes["standard"]}
    for row in modes["fsood"]:
        twin = standard[row["detector"], row["ood_dataset"]]
        if row["ood_dataset"] == "lookalike":  # a ranking with ID and OOD interleaved, not a clean cut
            assert 0.4 < twin["auroc"] < 0.6 and twin["auroc"] != 0.5
        assert row["aupr_in"] > twin["aupr_in"]  # a full-spectrum row of its own: twice the ID images raise precision
        assert row["auroc"] == pytest.approx(twin["auroc"], abs=1e-12)
        assert row["fpr95"] == pytest.approx(twin["fpr95"], abs=1e-12)
        assert row["n_id"] == 2 * twin["n_id"] == 18
        assert row["csid_acc"] == row["id_acc"] == twin["id_acc"] and row["csid_set_acc"] == {"test_copy": twin["id_acc"]}
    assert np.array_equal(results.scores["msp"]["test_copy"], results.scores["msp"]["test"])
    table = results.table  # the modes apart, each with its own near/far means
    assert table.index.names == ["mode", "detector", "set"]
    assert [s for m, d, s in table.index if (m, d) == ("fsood", "msp")] == ["lookalike", "checkers", "near", "far"]
    for row in results.rows:
        group = "near" if row["ood_dataset"] == "lookalike" else "far"
        for name in (row["ood_dataset"], group):
            assert table.loc[(row["mode"], row["detector"], name), "aupr_in"] == pytest.approx(row["aupr_in"], abs=1e-12)
        assert table.loc[(row["mode"], row["detector"], group), "csid_acc"] == pytest.approx(row.get("csid_acc", np.nan),
                                                                                          nan_ok=True)
    off = ood.evaluate(model, paths["id"], {"far": paths["far"], "csid": [copy]}, detectors=["msp"], image_size=32,
                       resize=32, device="cpu", output_dir=tmp_path / "off", fsood=False)
    assert {r["mode"] for r in off.rows} == {"standard"} and "test_copy" not in off.scores["msp"]
    assert off.table.index.names == ["detector", "set"] and "csid_acc" not in off.table.columns  # as before modes
    assert list(off.table.index) == [("msp", "checkers"), ("msp", "far")]
    with pytest.raises(ConfigError, match=r"benchmark id lists none: give them as '\+data.ood.csid="):
        ood.evaluate(model, paths["id"], [paths["far"]], detectors=["msp"], fsood=True, device="cpu",
                     output_dir=tmp_path / "none")


def test_folder_csid_sets_get_the_test_split_checks(tmp_path: Path) -> None:
    from ood.data.folder import FolderBenchmark

    paths = make_image_folders(tmp_path / "data", train=2, test=2, ood=2)
    shifted = shutil.copytree(paths["id"] / "test", tmp_path / "shifted")
    (shifted / "shifted.txt").write_text("".join(f"c{k}/{i}.png {k}\n" for k in range(3) for i in range(2)))
    bench = FolderBenchmark(paths["id"], {"far": [paths["far"]], "csid": {"a": shifted, "b": {"imglist": str(shifted / "shifted.txt")}}})
    test = [(p.relative_to(paths["id"] / "test"), y) for p, y in bench.id_sets["test"].entries]
    assert bench.csid_names == ("a", "b")  # labelled as the ID test split: by class folder, or the list's indices
    assert [(p.relative_to(shifted), y) for p, y in bench.csid_sets["a"].entries] == test
    assert [(p.relative_to(shifted), y) for p, y in bench.csid_sets["b"].entries] == test  # under the list's folder
    assert [(s.name, len(s.dataset), s.dataset[0][1]) for s in bench.csid_test()] == [("a", 6, 0), ("b", 6, 0)]
    shutil.copytree(shifted / "c0", shifted / "zebra")
    with pytest.raises(DataNotFoundError, match=r"shifted has 1 class absent from the ID train split \(3 classes\): \['zebra'\]"):
        FolderBenchmark(paths["id"], {"far": [paths["far"]], "csid": [shifted]})
    (tmp_path / "bad.txt").write_text("c0/0.png 0\nc0/1.png 7\n")
    with pytest.raises(DataNotFoundError, match=r"bad.txt has 1 label absent from the ID train split \(classes 0..2\): \[7\]"):
        FolderBenchmark(paths["id"], {"far": [paths["far"]], "csid": {"bad": {"imglist": str(tmp_path / "bad.txt")}}})
    with pytest.raises(ConfigError, match=r"OOD and csid set names must be unique .* got \['checkers'\]"):
        FolderBenchmark(paths["id"], {"far": [paths["far"]], "csid": {"checkers": shifted}})
    with pytest.raises(ConfigError, match=r"data.ood has unknown keys \['cs_id'\] \('cs_id': did you mean 'csid'\?\); valid keys: near, far, val, csid"):
        FolderBenchmark(paths["id"], {"far": [paths["far"]], "cs_id": [shifted]})


# ----- figures ----------------------------------------------------------------------------------------------------
@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict]:
    """Every figure `ood.plots` saves: its ROC lines ({panel: {label: (x, y)}}) and histogram bars ({panel: {label:
    heights}}), by file name (the PNGs are written as well)."""
    from ood import plots

    out: dict[str, dict] = {}
    save = plots._save

    def record(fig, path):  # noqa: ANN001, ANN202 - wraps the private saver to inspect the figure
        panels = {}
        for ax in fig.axes:
            if ax.get_visible():
                lines = {ln.get_label(): (ln.get_xdata(), ln.get_ydata()) for ln in ax.lines}
                bars = {label: heights for label, (_, heights) in histogram_bars(ax).items()}
                panels[ax.get_title()] = {"lines": lines, "bars": bars}
        out[Path(path).name] = {"title": fig._suptitle.get_text() if fig._suptitle else "", "panels": panels}
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", record)
    return out


def test_run_figures_draw_each_mode_with_its_own_id(fabricated: dict, drawn: dict, tmp_path: Path) -> None:
    """roc.png: ID test vs each OOD set; roc_fsood.png: ID test followed by every csid set (what the fsood rows
    measure); a full-spectrum-only run draws no standard curves, and leaves none of an earlier run's."""
    from ood import plots

    scores = {d: {s: v.numpy() for s, v in per.items()} for d, per in fabricated["scores"].items()}
    rows = [{**r, "id_dataset": "toy", "seed": 0} for r in fabricated["rows"]]
    paths = plots.save_run_figures(tmp_path, scores, rows)
    assert [p.name for p in paths] == ["roc.png", "hist_msp.png", "hist_energy.png",
                                       "roc_fsood.png", "hist_fsood_msp.png", "hist_fsood_energy.png"]
    pooled = np.concatenate([scores["msp"][s] for s in ("test", "blur", "noise")])
    for name, ident in (("roc.png", scores["msp"]["test"]), ("roc_fsood.png", pooled)):
        fpr, tpr = drawn[name]["panels"]["near_a"]["lines"]["msp"]
        expected = plots.roc_points(ident, scores["msp"]["near_a"])
        assert np.array_equal(fpr, expected[0]) and np.array_equal(tpr, expected[1])
    assert drawn["roc_fsood.png"]["title"].startswith("full-spectrum (ID = test + csid sets) ROC")
    everything = np.concatenate([scores["msp"][s] for s in SIZES])
    edges = np.histogram_bin_edges(everything, bins=plots.BINS)
    density = lambda v: np.histogram(v, bins=edges, density=True)[0]  # noqa: E731
    fs_hist, hist = drawn["hist_fsood_msp.png"]["panels"], drawn["hist_msp.png"]["panels"]
    assert np.allclose(fs_hist["far_a"]["bars"]["ID: test + csid sets"], density(pooled))
    assert np.allclose(hist["far_a"]["bars"]["ID test"], density(scores["msp"]["test"]))
    assert np.allclose(fs_hist["blur (csid)"]["bars"]["ID test"], density(scores["msp"]["test"]))  # csid panels as before

    drawn.clear()
    paths = plots.save_run_figures(tmp_path, scores, [r for r in rows if r["mode"] == "fsood"])
    assert [p.name for p in paths] == ["roc_fsood.png", "hist_fsood_msp.png", "hist_fsood_energy.png"]
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(p.name for p in paths)


def test_wandb_roc_tables_per_mode(fabricated: dict) -> None:
    """wandb gets a ROC table per mode: `roc_table` with ID test, `roc_table_fsood` with ID test + csid sets."""
    from ood import plots

    payload = plots.wandb_roc(fabricated["scores"], fabricated["rows"])
    assert {k for k in payload if k.startswith("test/msp/")} == {
        "test/msp/roc_table", "test/msp/roc", "test/msp/roc_table_fsood", "test/msp/roc_fsood"}
    scores = {s: v.numpy() for s, v in fabricated["scores"]["msp"].items()}
    pooled = np.concatenate([scores[s] for s in ("test", "blur", "noise")])
    for key, ident in (("test/msp/roc_table", scores["test"]), ("test/msp/roc_table_fsood", pooled)):
        drawn = np.array([row[1:] for row in payload[key].data if row[0] == "far_a"])
        assert np.allclose(drawn, np.stack(plots.roc_points(ident, scores["far_a"], max_points=200), 1))
    standard_only = plots.wandb_roc(fabricated["scores"], [r for r in fabricated["rows"] if r["mode"] == "standard"])
    assert not any(k.endswith("_fsood") for k in standard_only)


def test_report_figures_draw_fsood_entries_with_their_own_id(fabricated: dict, drawn: dict, tmp_path: Path) -> None:
    from ood import plots
    from ood.report.aggregation import aggregate
    from ood.report.figures import write_figures
    from ood.report.reading import load_rows

    run = tmp_path / "run"
    run.mkdir()
    rows = [{**r, "id_dataset": "toy", "backbone": "small_cnn", "seed": 0} for r in fabricated["rows"]]
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = {d: {s: v.numpy() for s, v in per.items()} for d, per in fabricated["scores"].items()}
    np.savez(run / "scores.npz", **{f"{d}/{s}": v for d, per in scores.items() for s, v in per.items()})
    loaded = load_rows([run])
    config_cols, _, table = aggregate(loaded)
    write_figures(tmp_path, config_cols, table, loaded, ["msp"])
    lines = drawn["roc.png"]["panels"]["far_b"]["lines"]
    assert {k for k in lines if not k.startswith("_")} == {"msp mode=standard", "msp mode=fsood", "chance"}
    pooled = np.concatenate([scores["msp"][s] for s in ("test", "blur", "noise")])
    for label, ident in (("msp mode=standard", scores["msp"]["test"]), ("msp mode=fsood", pooled)):
        assert np.array_equal(np.stack(lines[label]), np.stack(plots.roc_points(ident, scores["msp"]["far_b"])))
    hists = {d["title"]: d["panels"]["far_b"]["bars"] for n, d in drawn.items() if n.startswith("hist_")}
    assert set(hists["msp mode=fsood full-spectrum scores (seed 0)"]) == {"ID: test + csid sets", "OOD set"}
    assert set(hists["msp mode=standard scores (seed 0)"]) == {"ID test", "OOD set"}
    assert sorted(n for n in drawn if n.startswith("hist_")) == ["hist_00_fsood_msp.png", "hist_01_msp.png"]


@pytest.mark.usefixtures("no_figures")  # reads no figure (matplotlib: seconds a run)
def test_an_ood_image_copying_a_csid_image_is_listed_as_a_duplicate(tmp_path: Path) -> None:
    """`data=folder` screened OOD sets against the ID splits only: an OOD image copied from a covariate-shifted ID set
    counted as ID and as OOD in the full-spectrum rows, unlisted. It is listed (and dropped with drop_overlap)."""
    import ood

    paths = make_image_folders(tmp_path / "data", train=4, test=3, ood=4)
    shifted = shutil.copytree(make_image_folders(tmp_path / "other", train=0, test=3, seed=1)["id"] / "test",
                              tmp_path / "shifted")
    shutil.copy(sorted(shifted.rglob("*.png"))[0], paths["far"] / "from_csid.png")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
    results = ood.evaluate(model, paths["id"], {"far": paths["far"], "csid": [shifted]}, detectors=["msp"],
                           image_size=32, resize=32, device="cpu", output_dir=tmp_path / "run", drop_overlap=True)
    listed = [e for entries in results.overlap["sets"].values() for e in entries]
    assert [(Path(e["ood"]).name, e["kind"]) for e in listed] == [("from_csid.png", "exact")]
    assert Path(listed[0]["id"]).parent.parent == shifted
    assert {r["overlap_dropped"] for r in results.rows} == {1}


def test_full_spectrum_without_the_datas_csid_switch_is_refused_before_training(tmp_path: Path) -> None:
    """A data config without `csid: ${oc.select:evaluation.fsood,false}` (one's own, written by hand) trained the whole
    run under evaluation.fsood=true, then stopped finding no csid set to score: refused at the start now."""
    from ood.runs.checks import check_run

    for csid, refused in ((None, False), ("false", True), ("true", False)):
        cfg = compose_config(tmp_path, ["evaluation.fsood=true", *([f"data.csid={csid}"] if csid else [])])
        if refused:
            with pytest.raises(ConfigError, match=r"evaluation.fsood=true but the data config loads no covariate-shifted"):
                check_run(cfg, None)
        else:
            check_run(cfg, None)
    check_run(compose_config(tmp_path, ["evaluation.fsood=true", "data.csid=false", "evaluate=false"]), None)


def test_digits_corrupts_its_test_images_once_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The datamodule asks for the csid sets as it prepares (naming missing ones) and as it evaluates: digits built
    its corrupted sets twice (0.4 s a run)."""
    import ood.data.digits as digits_module

    calls = []
    corrupt = digits_module.corrupt
    monkeypatch.setattr(digits_module, "corrupt", lambda *a, **k: calls.append(a[1]) or corrupt(*a, **k))
    dm = OODDataModule(DigitsBenchmark(csid={"blur": 1.0, "shift": 1}), eval_batch_size=1000, csid=True)
    dm.prepare_data()
    assert [s.name for s in dm.eval_splits][-2:] == ["digits_blur", "digits_shift"] and len(dm.test_dataloader()) > 2
    assert calls == ["blur", "shift"]


def test_folder_datamodule_says_its_csid_sets_are_not_scored_without_fsood(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A folder benchmark listing csid sets with full-spectrum evaluation off warns once, naming the option as its
    caller gives it: the config key, or the keyword of `ood.evaluate`."""
    from ood.data.folder import folder_datamodule

    paths = make_image_folders(tmp_path / "data", train=2, test=2, ood=2)
    shifted = shutil.copytree(paths["id"] / "test", tmp_path / "shifted")
    for python_api, expected in ((False, "data.ood.csid lists ['a'], which are not scored: full-spectrum evaluation is "
                                         "off (evaluation.fsood=false)"),
                                 (True, "ood_data['csid'] lists ['a'], which are not scored: full-spectrum evaluation is "
                                        "off (fsood=False)")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            folder_datamodule(paths["id"], {"far": [paths["far"]], "csid": {"a": shifted}}, python_api=python_api)
        assert [r.getMessage() for r in caplog.records if "not scored" in r.getMessage()] == [expected]
