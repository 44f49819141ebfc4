"""`make reproduce-<paper>`: the dry run prints every stage, and a tiny version of each target runs on fabricated data.

The tiny version is the target itself: `make -n` with small sweep variables (one dataset, one seed) and tiny
`ARGS` (2 epochs, CPU, few images), whose printed commands are then executed one by one in this process
(`ood-train` / `ood-eval` through their Hydra entry points, `ood-report` through its `main`), so the exact command
lines a GPU user runs are exercised, without a subprocess per command. Targets whose methods do not exist yet skip,
naming the missing `conf/method/<name>.yaml`; they enrol themselves when those files land.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from fabricate import IMAGENET_OOD, make_openood_imagenet_tree, make_paper_tree
from helpers import compose_config

from ood import CONFIG_DIR, PROJECT_ROOT

#: target -> (methods it needs, stage commands in order (program, first arguments))
TARGETS = {
    "heatmap": (["heatmap"], [("ood-train", "experiment=heatmap_ce"), ("ood-train", "experiment=heatmap"), ("ood-report", "")]),
    "energy": (["energy_oe", "energy_cfl", "oe"], [("ood-train", "experiment=energy_ce"), ("ood-train", "experiment=energy_ft"),
                                                   ("ood-report", "")]),
    "cluster": ([], [("ood-train", "experiment=cluster_oodformer"), ("ood-train", "experiment=cluster_oodformer"),
                     ("ood-eval", "experiment=cluster_oodformer"), ("ood-report", "")]),
    "grood": ([], [("ood-train", "experiment=grood_openood"), ("ood-eval", "experiment=grood_openood"),
                   ("ood-eval", "experiment=grood_imagenet1k"), ("ood-report", "")]),
    "oal": (["oal"], [("ood-train", "experiment=openood_ce"), ("ood-train", "experiment=oal_openood"), ("ood-report", "")]),
    "cifar10": ([], [("ood-train", "experiment=cifar10_ce"), ("ood-report", "")]),
    "cifar100": ([], [("ood-train", "experiment=cifar100_ce"), ("ood-report", "")]),
}
TINY = [
    "backbone=small_cnn", "trainer=cpu", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "data.num_workers=0", "data.pin_memory=false",
    "data.batch_size=8", "data.eval_batch_size=64", "detectors.names=[msp]", "detectors.tune=false",
    "+trainer.num_sanity_val_steps=0", "+trainer.limit_val_batches=1",  # one: the OpenOOD presets keep best.ckpt
    "evaluation.sinks.results.figures=false",  # each run's ROC / histogram PNGs: half of these runs' time, not checked here
]
#: per target: small sweep variables and extra tiny overrides
SMALL = {
    "heatmap": ({"DATA": "cifar10", "BACKBONES": "small_cnn"}, []),
    # the fine-tunes' 256 outliers a step (the preset's, test_energy_methods' to check) are 16 passes over the 16
    # fabricated ones, most of this target's time: 32 still pairs each ID batch with more than one outlier permutation
    "energy": ({"DATA": "cifar10"}, ["data.outlier_batch_size=32"]),
    # 2 images per class: a singular per-class covariance, which the preset's pseudo-inverse takes
    "cluster": ({"DATA": "cifar10", "CONTRASTIVE": "supcon", "DISTANCES": "mahalanobis", "THRESHOLDS": "global"},
                ["method.probe_epochs=1"]),
    "grood": ({"DATA": "cifar10", "IMAGENET_SOURCES": "val_ood"}, []),
    "oal": ({"DATA": "cifar10"}, []),
    "cifar10": ({}, []),
    "cifar100": ({}, []),
}


def make_dry(target: str, variables: dict[str, str], labels: bool = False) -> list[str]:
    """The command lines `make -n reproduce-<target>` prints (no install step: `-o install`); with `labels`, also the
    `# <stage>/<stages> ...` line it prints before each."""
    # under `make test` the parent make's variables would turn this into a sub-make with directory banners
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    venv = variables.get("VENV", ".venv")
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", "-o", "install", "-o", f"{venv}/.installed", f"reproduce-{target}",
         *(f"{k}={v}" for k, v in variables.items())],
        cwd=PROJECT_ROOT, capture_output=True, text=True, check=True, env=env,
    ).stdout
    return [line for line in out.splitlines() if line.strip() and (labels or not line.startswith("#"))]


@pytest.mark.parametrize("target", list(TARGETS))
def test_dry_run_prints_every_stage(target: str) -> None:
    lines = make_dry(target, {"VENV": ".venv", "ARGS": "paths.data_dir=/data"})
    stages = TARGETS[target][1]
    assert len(lines) == len(stages)
    for line, (program, first) in zip(lines, stages):
        words = shlex.split(line)
        assert words[0] == f".venv/bin/{program}" and (not first or words[1:3] == ["-m", first])
        if program != "ood-report":
            assert "seed=0,1,2" in words or "experiment=grood_imagenet1k" in words
            assert words[-1] == "paths.data_dir=/data" or "experiment=grood_imagenet1k" in words
    assert shlex.split(lines[-1])[1].startswith("logs/reproduce/")
    if target not in ("cifar10", "cifar100"):
        assert f"conf/reference/{target}" in lines[-1]


@pytest.mark.parametrize("target", list(TARGETS))
def test_dry_run_says_what_each_stage_is_and_where_it_writes(target: str) -> None:
    """`make -n reproduce-<paper>` printed bare command lines: which is training, which evaluation only, which the
    report, and where each writes, was for the reader to work out from Hydra overrides. A `# i/N` line before each
    says so, naming the folder its command writes (`hydra.sweep.dir=` or the report's run folder)."""
    lines = make_dry(target, {"VENV": ".venv", "R": "out"}, labels=True)
    labels, commands = lines[0::2], [shlex.split(line) for line in lines[1::2]]
    assert len(labels) == len(commands) == len(TARGETS[target][1])
    for i, (label, words) in enumerate(zip(labels, commands), 1):
        assert label.startswith(f"# {i}/{len(commands)} ")
        program = words[0].rsplit("/", 1)[1]
        kind = {"ood-train": "train", "ood-eval": "evaluate only: ", "ood-report": "report "}[program]
        assert label.split(" ", 2)[2].startswith(kind), label
        folder = words[1] if program == "ood-report" else next(w.split("=", 1)[1] for w in words if w.startswith("hydra.sweep.dir="))
        assert f"-> {folder}/" in label, (label, folder)


@pytest.mark.parametrize("target", list(TARGETS))
def test_resume_continues_every_training_job_and_leaves_the_evaluations_alone(target: str) -> None:
    """A target re-run into the same R= trained every job anew, silently over the old ones; `ARGS=ckpt_path=last`
    would also replace the `ckpt_path=` of reproduce-cluster's and reproduce-grood's ood-eval stages. RESUME=1 adds
    `ckpt_path=last` to the ood-train commands alone (each job resumes its own last.ckpt, a finished one is only
    evaluated again). RESUME=0 (or no, false) does not resume (any other value did)."""
    for resume in ("", "0", "False", "1"):
        for words in map(shlex.split, make_dry(target, {"VENV": ".venv", "RESUME": resume, "ARGS": "x=1"})):
            train = words[0].endswith("/ood-train")
            assert ("ckpt_path=last" in words) == (train and resume == "1"), (resume, words[:3])
            assert not train or words[-1] == "x=1"  # before ARGS: a ckpt_path= of the user's still wins


def _run(words: list[str]) -> None:
    """One printed command, in this process."""
    program = Path(words[0]).name
    if program == "ood-report":
        from ood.report import main

        main(words[1:])
        return
    from hydra.core.global_hydra import GlobalHydra

    import ood.eval
    import ood.train

    GlobalHydra.instance().clear()
    entry = {"ood-train": ood.train.main, "ood-eval": ood.eval.main}[program]
    old = sys.argv
    sys.argv = [program, *words[1:]]
    try:
        entry()
    except SystemExit as exit_:
        assert exit_.code in (None, 0), f"{' '.join(words)} exited with {exit_.code}"
    finally:
        sys.argv = old


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CIFAR paper tree and OpenOOD's ImageNet lists in one data_dir, plus a tiny 300K-random-images array."""
    root = make_paper_tree(tmp_path_factory.mktemp("reproduce"))
    make_openood_imagenet_tree(root, every_class=True)
    np.save(root / "300K_random_images.npy", np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), root / "resnet50-0676ba61.pth")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
def test_tiny_version_runs(target: str, tiny_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = [m for m in TARGETS[target][0] if not (CONFIG_DIR / "method" / f"{m}.yaml").is_file()]
    if missing:
        pytest.skip(f"reproduce-{target} needs {', '.join(f'conf/method/{m}.yaml' for m in missing)} (not written yet)")
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.chdir(PROJECT_ROOT)
    monkeypatch.setenv("OOD_ROOT", str(tmp_path))
    variables, extra = SMALL[target]
    reports = tmp_path / "reproduce"
    args = " ".join([f"paths.data_dir={tiny_tree}", *TINY, *extra])
    imagenet = " ".join([f"paths.data_dir={tiny_tree}", "trainer=cpu", "data.benchmark.image_size=16", "data.benchmark.resize=16",
                         "data.num_workers=0", "data.pin_memory=false", "detectors.names=[msp]", "detectors.tune=false",
                         "trainer.enable_progress_bar=false", "evaluation.sinks.results.figures=false"])
    lines = make_dry(target, {"VENV": str(Path(sys.executable).parent.parent), "SEEDS": "0", "R": str(reports), "ARGS": args,
                              "IMAGENET_ARGS": imagenet, "WEIGHTS": str(tiny_tree / "resnet50-0676ba61.pth"),
                              "REPORT_ARGS": "--no-figures", **variables})  # the report's figures: test_report's
    for line in lines:
        _run(shlex.split(line))
    report = (Path(shlex.split(lines[-1])[1]) / "report.md").read_text()
    assert "| msp |" in report
    if target == "grood":  # GROOD's ImageNet-1K rows (torchvision ResNet-50) beside OpenOOD's README number
        assert "ref:near/auroc" in report and "78.90" in report and "| grood | grood | resnet50 | imagenet1k" in report
        rows = [json.loads(line) for f in (reports / "grood/imagenet1k").rglob("results.jsonl") for line in f.read_text().splitlines()]
        assert {r["ood_dataset"]: (r["ood_group"], r["n_ood"]) for r in rows if r["detector"] == "grood"} == IMAGENET_OOD
    if target == "cluster":
        assert "| cluster |" in report and "imagenet_resize" in report


def test_heatmap_target_sweeps_the_papers_networks_and_each_has_its_references(tmp_path: Path) -> None:
    """`make reproduce-heatmap` trains the heatmap paper's own classifiers (jhornauer/heatmap_ood `Networks/`): the
    ResNet-18 (kuangliu's = OpenOOD's) and meliketoy's WRN-40-2 (`wrn40_2_heatmap`), not the OE / OpenOOD WRN
    (`wrn40_2`, another network); and every (ID dataset, backbone) it runs has a reference file under that backbone
    name, the name its rows report (`ood-report` matches a reference on it)."""
    from ood.report.references import REFERENCE_DIR, load_reference, reference_files

    first = shlex.split(make_dry("heatmap", {"VENV": ".venv"})[0])
    sweep = dict(w.split("=", 1) for w in first if w.startswith(("data=", "backbone=")))
    backbones = sweep["backbone"].split(",")
    targets = {b: compose_config(tmp_path, ["experiment=heatmap_ce", f"backbone={b}"]).backbone._target_ for b in backbones}
    assert targets == {"resnet18_32x32": "ood.models.ResNet18_32x32", "wrn40_2_heatmap": "ood.models.wrn.MeliketoyWideResNet"}
    refs = {(r["id_dataset"], r["backbone"]) for r in map(load_reference, reference_files([REFERENCE_DIR / "heatmap"]))}
    assert refs == {(d, b) for d in sweep["data"].split(",") for b in backbones}


@pytest.mark.parametrize("paper", ["heatmap", "energy", "cluster", "grood", "oal"])
def test_paper_references_load_with_source_and_convention(paper: str) -> None:
    from ood.report.references import REFERENCE_DIR, load_reference, reference_files

    refs = [load_reference(f) for f in reference_files([REFERENCE_DIR / paper])]
    assert refs and all(r["source"] for r in refs)
    assert all(r["fpr95_convention"] == "id_positive" for r in refs if "fpr95" in r)
    # every published group mean names the OOD sets it is over (a row over other sets gets no ref: column)
    assert all(g in r["ood_sets"] for r in refs for m in ("auroc", "fpr95") for d in (r.get(m) or {}).values()
               for groups in d.values() for g in groups)


def test_fpr95_reference_columns_follow_the_convention() -> None:
    from ood.report.aggregation import aggregate
    from ood.report.references import REFERENCE_DIR, add_reference, load_reference, reference_files

    refs = [load_reference(f) for f in reference_files([REFERENCE_DIR / "energy"])]
    base = {"backbone": "wrn40_2", "id_dataset": "cifar10", "seed": 0, "_run": "r", "ood_group": "far", "auroc": 0.9,
            "fpr95": 0.1, "fpr95_oodpos": 0.2}
    rows = [{**base, "method": method, "detector": detector, "ood_dataset": s} for method, detector in
            (("energy_oe", "energy_oe"), ("ce", "msp")) for s in refs[0]["ood_sets"]["far"]]  # the six classic sets
    _, metric_cols, table = aggregate(rows)
    cols = add_reference(metric_cols, table, refs)
    assert cols == [*metric_cols, "ref:far/fpr95"]
    by = {e["method"]: e for e in table}
    assert by["energy_oe"]["ref:far/fpr95"] == pytest.approx((0.0332, 0.0, 1)) and by["ce"]["ref:far/fpr95"][0] == pytest.approx(0.5104)
    ood_pos = {**load_reference(REFERENCE_DIR / "energy/cifar10_wrn40_2.yaml"), "fpr95_convention": "ood_positive"}
    assert add_reference(metric_cols, table, [ood_pos])[-1] == "ref:far/fpr95_oodpos"


@pytest.mark.parametrize(("id_dataset", "published"), [("cifar10", (51.04, 35.71, 37.08, 33.01)), ("cifar100", (80.41, 74.64, 54.64, 73.6))])
def test_energy_ce_detector_rows_get_the_papers_post_hoc_fpr95(tmp_path: Path, id_dataset: str, published: tuple[float, ...]) -> None:
    """The rows experiment=energy_ce writes (its detectors.names) stand beside energy_ood's MSP, ODIN, Mahalanobis and
    energy rows: odin_energy_ood by the `odin` it reproduces, mahalanobis_odin (energy_ood's `--score M`, input
    pre-processing) under its own name; the plain `mahalanobis` (no pre-processing) gets none."""
    from ood.report.aggregation import aggregate
    from ood.report.references import REFERENCE_DIR, add_reference, load_reference

    ref = load_reference(REFERENCE_DIR / f"energy/{id_dataset}_wrn40_2.yaml")
    detectors = [*compose_config(tmp_path, ["experiment=energy_ce"])["detectors"]["names"], "mahalanobis"]
    rows = [{"method": "ce", "detector": d, "backbone": "wrn40_2", "id_dataset": id_dataset, "seed": 0, "_run": "r",
             "ood_dataset": s, "ood_group": "far", "auroc": 0.9, "fpr95": 0.3} for d in detectors for s in ref["ood_sets"]["far"]]
    _, metric_cols, table = aggregate(rows)
    assert add_reference(metric_cols, table, [ref]) == [*metric_cols, "ref:far/fpr95"]
    got = {e["detector"]: e.get("ref:far/fpr95", (None,))[0] for e in table}
    assert got == {**dict(zip(detectors, [pytest.approx(v / 100) for v in published])), "mahalanobis": None}


#: hendrycks/outlier-exposure e6ede98 CIFAR/snapshots/<id>_wrn_<run>_test.txt, per-set means of 10 OOD draws
#: (Texture, SVHN, Places365: lines 38/45/52 AUROC, 37/44/51 FPR95), transcribed apart from conf/reference/oe
OE_RELEASED = {
    ("cifar10", "baseline"): {"auroc": (88.37, 91.83, 87.80), "fpr95": (42.82, 28.82, 47.54)},
    ("cifar10", "oe_tune"): {"auroc": (97.72, 98.43, 96.23), "fpr95": (12.16, 4.76, 17.28)},
    ("cifar100", "baseline"): {"auroc": (73.81, 71.40, 74.23), "fpr95": (71.46, 69.28, 70.39)},
    ("cifar100", "oe_tune"): {"auroc": (84.79, 86.86, 86.50), "fpr95": (54.39, 42.90, 49.76)},
}


def test_oe_reference_is_the_mean_of_the_released_per_set_numbers() -> None:
    """conf/reference/oe: the released baseline (our ce) and oe_tune (our oe, scored as oe and msp) numbers, each the
    mean over the three OOD sets that are ours, with their OOD-positive FPR95."""
    from ood.report.references import REFERENCE_DIR, load_reference, reference_files

    refs = {r["id_dataset"]: r for r in (load_reference(f) for f in reference_files([REFERENCE_DIR / "oe"]))}
    assert sorted(refs) == ["cifar10", "cifar100"]
    rows = {"baseline": [("ce", "msp")], "oe_tune": [("oe", "oe"), ("oe", "msp")]}
    for ref in refs.values():
        assert (ref["backbone"], ref["fpr95_convention"]) == ("wrn40_2", "ood_positive")
        assert ref["ood_sets"] == {"far": ["texture", "svhn", "places365"]}
        assert all({m: set(d) for m, d in ref[metric].items()} == {"ce": {"msp"}, "oe": {"oe", "msp"}} for metric in ("auroc", "fpr95"))
    for (id_dataset, run), metrics in OE_RELEASED.items():
        for metric, per_set in metrics.items():
            for method, detector in rows[run]:
                assert refs[id_dataset][metric][method][detector] == {"far": [pytest.approx(sum(per_set) / 3, abs=0.005)]}


def test_energy_report_has_the_oe_reference_beside_the_energy_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """reproduce-energy's report line names both references. Over OE's three shared sets, ce / oe rows get its AUROC
    and OOD-positive FPR95 (beside our fpr95_oodpos). Over the six classic sets (what reproduce-energy runs) the energy
    FPR95 stands beside our far mean, and the OE numbers beside our mean over their three sets alone
    (`far[places365,svhn,texture]`, per run, then over seeds): they were left out, the sets differing."""
    from ood.report import main

    report = shlex.split(make_dry("energy", {"VENV": ".venv", "R": str(tmp_path)})[-1])
    assert report[2:] == ["--reference", "conf/reference/energy", "--reference", "conf/reference/oe"]
    classic = ["texture", "svhn", "places365", "lsun_crop", "lsun_resize", "isun"]
    for name, sets in (("three", classic[:3]), ("six", classic)):
        for seed in (0, 1):  # the shared sets at AUROC 90 / 91 %, FPR95 (OOD positive) 30 %; the others 60 / 61 %, 50 %
            rows = [{"method": m, "detector": d, "backbone": "wrn40_2", "id_dataset": "cifar10", "seed": seed,
                     "ood_dataset": s, "ood_group": "far", "auroc": (0.9 if s in classic[:3] else 0.6) + seed / 100,
                     "fpr95": 0.2, "fpr95_oodpos": 0.3 if s in classic[:3] else 0.5}
                    for m, d in (("ce", "msp"), ("oe", "oe")) for s in sets]
            (tmp_path / name / f"run{seed}").mkdir(parents=True)
            (tmp_path / name / f"run{seed}" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        main([str(tmp_path / name), *report[2:], "--no-figures"])
    three, six = (tmp_path / "three" / "report.md").read_text(), (tmp_path / "six" / "report.md").read_text()

    def tails(report: str, after: str) -> dict[str, str]:  # method -> the row's cells after the column `after`
        header = next(line for line in report.splitlines() if line.startswith("| method |")).split(" | ")
        at = header.index(after) + 1
        return {line.split(" | ")[0][2:]: " | ".join(line.split(" | ")[at:]) for line in report.splitlines()
                if "| wrn40_2 |" in line}

    assert "| far/auroc | far/fpr95 | far/fpr95_oodpos | ref:far/auroc | ref:far/fpr95_oodpos |" in three
    assert tails(three, "far/auroc") == {"ce": "20.00 ± 0.00 | 30.00 ± 0.00 | 89.33 | 39.73 |",
                                         "oe": "20.00 ± 0.00 | 30.00 ± 0.00 | 97.46 | 11.40 |"}
    subset = "far[places365,svhn,texture]"
    assert (f"| far/auroc | far/fpr95 | {subset}/auroc | {subset}/fpr95_oodpos | ref:far/fpr95 | ref:{subset}/auroc | "
            f"ref:{subset}/fpr95_oodpos |") in six
    # our far mean over six sets is 75.5; over the reference's three 90.5 (seeds 90, 91), FPR95 30 (not 40)
    assert tails(six, "far/auroc") == {"ce": "20.00 ± 0.00 | 90.50 ± 0.71 | 30.00 ± 0.00 | 51.04 | 89.33 | 39.73 |",
                                       "oe": "20.00 ± 0.00 | 90.50 ± 0.71 | 30.00 ± 0.00 | 8.53 | 97.46 | 11.40 |"}
    assert "| 75.50 ± 0.71 | 20.00 ± 0.00 | 90.50 ± 0.71 |" in six
    assert "are not the reference's" not in six and "Reference numbers left out" not in six
    assert "far[<sets>]: the mean over those OOD sets alone per run, then over seeds" in six
    assert "far[<sets>]" not in three
    assert "hendrycks/outlier-exposure at e6ede98a5474a0620d9befa50b38eaf584df4401" in capsys.readouterr().err


def test_a_reference_over_some_sets_of_rows_without_its_metric_says_why_it_is_left_out() -> None:
    """Rows over OE's three sets and more, but without `fpr95_oodpos` (results written before it was a metric): the
    AUROC subset column stands, the FPR95 one is left out saying no run scored it there (it said the sets differed).
    A hand-built entry without `_per_run` is left out the same way, not a KeyError."""
    from ood.report.aggregation import aggregate
    from ood.report.references import REFERENCE_DIR, add_reference, load_reference

    refs = [load_reference(REFERENCE_DIR / "oe" / "cifar10_wrn40_2.yaml")]
    rows = [{"method": "ce", "detector": "msp", "backbone": "wrn40_2", "id_dataset": "cifar10", "seed": 0, "_run": "r",
             "ood_dataset": s, "ood_group": "far", "auroc": 0.9, "fpr95": 0.2}
            for s in ("texture", "svhn", "places365", "isun")]
    _, metric_cols, table = aggregate(rows)
    left_out: list[str] = []
    cols = add_reference(metric_cols, table, refs, left_out)
    subset = "far[places365,svhn,texture]"
    assert [c for c in cols if "[" in c] == [f"{subset}/auroc", f"ref:{subset}/auroc"]
    assert left_out == ["no ref:far columns for the cifar10 wrn40_2 rows: no run scored fpr95_oodpos on every one of "
                        f"them ({refs[0]['source'].strip()})"]
    hand = [{"method": "ce", "detector": "msp", "backbone": "wrn40_2", "id_dataset": "cifar10",
             "_sets": {"far": ["isun", "places365", "svhn", "texture"]}}]
    left_out = []
    assert add_reference(["far/auroc"], hand, refs, left_out) == ["far/auroc"]
    assert [line.split(": ")[1].split(" (")[0] for line in left_out] == [
        "no run scored auroc on every one of them", "no run scored fpr95_oodpos on every one of them"]


def test_oal_reference_says_its_numbers_are_of_224_pixel_students(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """reproduce-oal trains at 32 px, the leaderboard's OAL row at 224 px: the report printed the numbers as if of the
    same runs; the reference line under it says the input sizes now."""
    from ood.report import main
    from ood.report.references import REFERENCE_DIR, load_reference

    sets = load_reference(REFERENCE_DIR / "oal" / "cifar10_resnet18_32x32.yaml")["ood_sets"]
    rows = [{"method": "oal", "detector": "oal", "backbone": "resnet18_32x32", "id_dataset": "cifar10", "seed": 0,
             "ood_dataset": s, "ood_group": g, "auroc": 0.9, "fpr95": 0.2} for g, names in sets.items() for s in names]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main([str(tmp_path), "--reference", "conf/reference/oal", "--no-figures"])
    out = capsys.readouterr()
    assert "| 92.99 ± 0.15 | 96.28 ± 0.07 |" in out.out
    assert "reference numbers (cifar10, resnet18_32x32, protocol: openood_v1.5, OAL student trained at 224 px (the " \
           "leaderboard row); these runs: 32 px)" in out.err


def test_grood_runs_cifar_detectors_read_the_leaderboards_ce_numbers() -> None:
    """reproduce-grood passes the leaderboard files for "the CE detectors" (README), but GROOD's runs (a CE network,
    trained exactly as method=ce) have method grood: none of their detector rows got a ref: column. They read the CE
    numbers now (`same_network`); GROOD's own score keeps its own reference (OpenOOD's README number)."""
    from ood.report.aggregation import aggregate
    from ood.report.references import REFERENCE_DIR, add_reference, load_reference, reference_files

    refs = [load_reference(f) for f in reference_files([REFERENCE_DIR / "grood", REFERENCE_DIR / "cifar10.yaml"])]
    base = {"method": "grood", "backbone": "resnet18_32x32", "id_dataset": "cifar10", "seed": 0, "_run": "r", "auroc": 0.9,
            "fpr95": 0.1}
    rows = [{**base, "detector": d, "ood_dataset": s, "ood_group": g} for d in ("grood", "msp", "gram")
            for g, sets in refs[-1]["ood_sets"].items() for s in sets]
    _, metric_cols, table = aggregate(rows)
    add_reference(metric_cols, table, refs)
    ref = {e["detector"]: {c: e[c][0] for c in e if c.startswith("ref:")} for e in table}
    assert ref == {"grood": {"ref:near/auroc": pytest.approx(0.9116)},
                   "msp": {"ref:near/auroc": pytest.approx(0.8803), "ref:far/auroc": pytest.approx(0.9073)},
                   "gram": {}}  # cifar10.yaml has no gram row


@pytest.mark.parametrize("objective", ["supcon", "simclr"])
def test_cluster_contrastive_stage_has_the_recipe_epochs(tmp_path: Path, objective: str) -> None:
    """`make reproduce-cluster`'s contrastive jobs: 700 contrastive epochs (OODformer / SupContrast `main_supcon`)
    before the `probe_epochs` linear probe, with the cosine schedule spanning exactly the contrastive stage."""
    from helpers import compose_config

    line = make_dry("cluster", {"VENV": ".venv", "SEEDS": "0", "DATA": "cifar10", "CONTRASTIVE": objective})[1]
    overrides = [w for w in shlex.split(line)[2:] if not w.startswith("hydra.")]
    cfg = compose_config(tmp_path, overrides)
    assert cfg.method.objective == objective
    contrastive = cfg.trainer.max_epochs - cfg.method.probe_epochs
    assert contrastive == 700
    assert cfg.method.scheduler.T_max == contrastive


#: zjysteven/OpenOOD leaderboard 28d3a40 results/cifar10.csv, cifar100.csv, row "OAL,EBO,...,ResNet18,100 epochs; 224x224":
#: its ID_Accuracy (the 224 px student the OAL numbers are of), transcribed apart from conf/reference
OAL_ID_ACC = {"cifar10": [94.71, 0.18], "cifar100": [76.89, 0.20]}


@pytest.mark.parametrize("file", ["oal/{}_resnet18_32x32.yaml", "{}_resnet18.yaml"])
@pytest.mark.parametrize("id_dataset", list(OAL_ID_ACC))
def test_oal_references_give_the_leaderboard_students_id_accuracy(file: str, id_dataset: str) -> None:
    """reproduce-oal's report had no `ref:id_acc` beside the oal rows (the oal files gave none) and the 224 px files
    gave the mean without the leaderboard's ± : the 32 px student's accuracy gap is the first thing to read."""
    from ood.report.references import REFERENCE_DIR, load_reference

    assert load_reference(REFERENCE_DIR / file.format(id_dataset))["id_acc"] == OAL_ID_ACC[id_dataset]


@pytest.mark.parametrize("target", list(TARGETS))
def test_data_dir_reaches_every_training_and_evaluation(target: str) -> None:
    """`DATA_DIR=` (as parity-openood takes it) was ignored by the reproduce targets: a user's data folder was looked
    for in ./data. Given, every ood-train / ood-eval gets `paths.data_dir=` before ARGS (ARGS still wins); not given,
    none does (ood's own default: $OOD_DATA_DIR, else ./data)."""
    for data_dir in ("", "/data/ood"):
        variables = {"VENV": ".venv", "ARGS": "x=1", **({"DATA_DIR": data_dir} if data_dir else {})}
        for words in map(shlex.split, make_dry(target, variables)):
            if Path(words[0]).name == "ood-report":
                continue
            given = [w for w in words if w.startswith("paths.data_dir=")]
            assert given == ([f"paths.data_dir={data_dir}"] if data_dir else []), words[:3]
            assert not given or "x=1" not in words or words.index(given[0]) < words.index("x=1")  # ImageNet-1K: no ARGS
