"""`make parity-openood` end to end on fabricated files: OpenOOD's CIFAR-10 and ImageNet-200 trees and random networks
saved in OpenOOD's checkpoint format (`<results>/<run>/s<seed>/best.ckpt`: `module.`-prefixed ResNet18_32x32 names;
torchvision's ResNet-18 names for ResNet18_224x224, with the preset's gram_v15 and mds_ensemble at feature1), through
`ood-eval -m` and `ood-report`, to the parity table beside the leaderboard; a missing checkpoint or weights file is
named with where it is published."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import NO_FIGURES, compose_config, root_logger_kept
from torchvision.models import resnet18

from benchmarks import parity_openood
from benchmarks.fabricate import cifar_tree, imagenet_tree
from ood.detectors import available_detectors
from ood.eval import main as eval_main
from ood.evaluation.evaluator import Evaluator
from ood.models import ResNet18_32x32
from ood.report.command import main as report_main
from ood.report.references import add_reference, load_reference


def openood_checkpoint(path: Path, seed: int) -> None:
    """A random ResNet18_32x32 state dict under OpenOOD's names (conv1, bn1, layerN.i.shortcut, DataParallel
    `module.` prefix), written without the project's loader."""
    torch.manual_seed(seed)
    state = {}
    for key, value in ResNet18_32x32(10).state_dict().items():
        key = key.replace("stages.stem.0.", "conv1.").replace("stages.stem.1.", "bn1.")
        key = re.sub(r"^stages\.(layer\d\.\d+)\.downsample\.", r"\1.shortcut.", key)
        state["module." + key.removeprefix("stages.")] = value
    path.parent.mkdir(parents=True)
    torch.save(state, path)


def test_reference_files_cover_every_benchmark() -> None:
    for benchmark in parity_openood.BENCHMARKS:
        ref = load_reference(parity_openood.REFERENCE_DIR / f"{benchmark}.yaml")  # as ood-report reads it
        assert ref["id_dataset"] == benchmark and "zjysteven/OpenOOD" in ref["source"]
        assert {"msp", "energy", "knn", "vim", "react", "ash"} <= set(ref["auroc"]["ce"])
    # spot checks against the leaderboard's CSVs (CIFAR-10 KNN; ImageNet-1K's single torchvision network)
    cifar10 = load_reference(parity_openood.REFERENCE_DIR / "cifar10.yaml")
    assert cifar10["auroc"]["ce"]["knn"] == {"near": [90.64, 0.20], "far": [92.96, 0.14]}
    assert cifar10["auroc"]["ce"]["nac"] == {"near": [90.93, 0.23], "far": [94.60, 0.49]}
    assert cifar10["not_in_ood"] == ["OpenGAN"] and cifar10["auroc"]["ce"]["combood"] == {"near": [91.13], "far": [94.65]}
    assert cifar10["auroc"]["ce"]["otod"] == {"near": [88.54], "far": [91.33]}
    imagenet = load_reference(parity_openood.REFERENCE_DIR / "imagenet1k.yaml")
    assert imagenet["backbone"] == "resnet50" and imagenet["auroc"]["ce"]["ash"] == {"near": [78.17], "far": [95.74]}
    assert imagenet["auroc"]["ce"]["rmds_pp"] == {"near": [78.54], "far": [90.82]} and imagenet["not_in_ood"] == []
    # every leaderboard row is one of ours: the registry's names, not a hand-kept list; its Gram row is gram_v15's
    # (OpenOOD's gram as released), none is gram's (OpenOOD's gram since commit bdf6a55, which it never ran)
    assert cifar10["auroc"]["ce"]["gram_v15"] == {"near": [58.66, 4.83], "far": [71.73, 3.20]}
    assert imagenet["auroc"]["ce"]["gram_v15"] == {"near": [61.70], "far": [79.71]}
    for benchmark in parity_openood.BENCHMARKS:
        ref = load_reference(parity_openood.REFERENCE_DIR / f"{benchmark}.yaml")
        assert set(ref["auroc"]["ce"]) <= set(available_detectors()), benchmark
        assert "gram_v15" in ref["auroc"]["ce"] and "gram" not in ref["auroc"]["ce"], benchmark


def torchvision_checkpoint(path: Path, num_classes: int) -> None:
    """A random ResNet18_224x224 as OpenOOD's recorder saves it (`best.ckpt`: torchvision's ResNet-18 names, bare:
    `net.module.state_dict()`), written without the project's loader."""
    torch.manual_seed(0)
    path.parent.mkdir(parents=True)
    torch.save(resnet18(num_classes=num_classes).state_dict(), path)


def fabricated_cifar10(tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    """CIFAR-10's tree and two released networks (s0, s1); CIFAR-100's checkpoints are missing. Returns the data
    folder, the script's benchmark / seed / detector arguments and parts of the line naming the missing file."""
    data = cifar_tree(tmp_path / "data", n_train=20, n_val=8, n_test=8, n_ood=4)
    for seed in (0, 1):
        openood_checkpoint(tmp_path / "results" / parity_openood.RUNS["cifar10"] / f"s{seed}" / "best.ckpt", seed)
    missing = tmp_path / "results" / parity_openood.RUNS["cifar100"] / "s0" / "best.ckpt"
    return data, ["--benchmarks", "cifar10,cifar100", "--seeds", "0,1", "detectors.names=[msp,energy,knn,mahalanobis]"], [
        f"cifar100: missing {missing}: ", "cifar100_res18_v1.5.zip"]


def fabricated_imagenet200(tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    """ImageNet-200's tree (4 classes: every class has train images, as the class-conditional detectors need) and one
    released network (s0) at 224 px; ImageNet-1K's ResNet-50 file is not given. The preset's gram_v15 and
    mds_ensemble (at OpenOOD's feature1, after the max-pool) run on it."""
    data = imagenet_tree(tmp_path / "data", n_train=8, n_val=4, n_test=4, n_ood=2, classes=4)
    torchvision_checkpoint(tmp_path / "results" / parity_openood.RUNS["imagenet200"] / "s0" / "best.ckpt", 4)
    return data, ["--benchmarks", "imagenet200,imagenet1k", "--seeds", "0", "data.benchmark.num_classes=4",
                  "detectors.names=[msp,energy,knn,gram_v15,mds_ensemble]"], [
        "imagenet1k: no ResNet-50 weights given (--weights / WEIGHTS=): ", "resnet50-0676ba61.pth"]


def in_process(cmd: list[str], check: bool = False, stdout: int | None = None) -> subprocess.CompletedProcess:
    """`subprocess.run` of the script's `python -m ood.eval ...` / `python -m ood.report ...` commands, run in this
    process (the same argv, the entry point's `main`): each subprocess started torch and Lightning again, seconds a
    command, and what is tested is the script's commands and what they write, not a process start. A non-zero exit
    is the `CalledProcessError` that `check=True` raises; `stdout=DEVNULL` is honoured; an exit's code is the status a
    process gets (`sys.exit()`: 0; a message: printed on stderr, 1)."""
    assert cmd[:2] == [sys.executable, "-m"], cmd
    main = {"ood.eval": eval_main, "ood.report": lambda: report_main(cmd[3:])}[cmd[2]]
    argv, code = sys.argv, 0
    sys.argv = [cmd[2], *cmd[3:]]  # ood-eval reads its command line from sys.argv
    try:
        with root_logger_kept(), \
                contextlib.redirect_stdout(io.StringIO()) if stdout == subprocess.DEVNULL else contextlib.nullcontext():
            main()
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:  # a message: printed, status 1
            print(stop.code, file=sys.stderr)
            code = 1
    finally:
        sys.argv = argv
    if check and code:
        raise subprocess.CalledProcessError(code, cmd)
    return subprocess.CompletedProcess(cmd, code)


@pytest.mark.slow
@pytest.mark.parametrize("benchmark, fabricate", [("cifar10", fabricated_cifar10), ("imagenet200", fabricated_imagenet200)])
def test_parity_runs_end_to_end_on_fabricated_files(benchmark: str, fabricate: Callable[[Path], tuple[Path, list[str], list[str]]],
                                                    tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parity_openood, "subprocess", SimpleNamespace(
        run=in_process, CalledProcessError=subprocess.CalledProcessError, DEVNULL=subprocess.DEVNULL))
    data, args, missing = fabricate(tmp_path)
    code = parity_openood.main([
        "--data-dir", str(data), "--ckpt-dir", str(tmp_path / "results"), *args, "--out", str(tmp_path / "parity"),
        "trainer=cpu", "data.num_workers=0", "data.pin_memory=false", "trainer.enable_progress_bar=false", "logger=none",
        NO_FIGURES])
    out, err = capsys.readouterr()
    assert code == 1  # the second benchmark's network is missing, named with where it is published
    assert all(part in err for part in missing) and f"{benchmark}: ood-eval" not in err
    seeds = sorted((tmp_path / "parity" / benchmark).glob("s*/results.jsonl"))
    table = (tmp_path / "parity" / "parity.md").read_text()
    assert f"### {benchmark} (seeds: {len(seeds)};" in table
    lines = {line.split(" | ")[0]: line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    ref = load_reference(parity_openood.REFERENCE_DIR / f"{benchmark}.yaml")
    # ours (a random network: about chance), the leaderboard's numbers, the difference, marked beyond 1 point
    (near, near_std), (far, far_std) = ref["auroc"]["ce"]["knn"]["near"], ref["auroc"]["ce"]["knn"]["far"]
    knn = lines["| knn"]
    assert knn[2] == f"{near:.2f} ± {near_std:.2f}" and knn[5] == f"{far:.2f} ± {far_std:.2f}"
    ours_near = float(knn[1].split(" ± ")[0])
    assert knn[3] == f"{ours_near - near:+.2f}" + (" !" if abs(ours_near - near) > parity_openood.MARK else "")
    # every detector asked for has a value of ours, under OpenOOD's key where it differs
    ran = {"msp", "energy (ebo)", "knn", "mahalanobis (mds)"} if benchmark == "cifar10" else {
        "msp", "energy (ebo)", "knn", "gram_v15 (gram, v1.5 release)", "mds_ensemble"}
    assert all(lines[f"| {name}"][1] != "-" and lines[f"| {name}"][4] != "-" for name in ran), table
    # the networks' ID accuracy (the runs' results, mean ± std over the seeds; one run: its value alone) beside the
    # leaderboard's
    accs = [100 * json.loads(path.read_text().splitlines()[0])["id_acc"] for path in seeds]
    ours = f"{statistics.fmean(accs):.2f}" + (f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else "")
    acc, acc_std = ref["id_acc"]
    diff = statistics.fmean(accs) - acc
    assert (f"\nID accuracy (%): ours {ours} | OpenOOD {acc:.2f} ± {acc_std:.2f} | diff {diff:+.2f}"
            f"{' !' if abs(diff) > parity_openood.MARK else ''}\n") in table
    params = {row["detector"]: row["detector_params"] for row in map(json.loads, seeds[0].read_text().splitlines())}
    if benchmark == "imagenet200":  # the preset's OpenOOD settings reach the detector
        assert params["mds_ensemble"] == {"noise": 0.0014, "input_std": 0.5, "stages": ["feature1"]}


@pytest.mark.parametrize(("exit_code", "status", "err"), [(None, 0, ""), (0, 0, ""), (3, 3, ""), ("error: x", 1, "error: x\n")])
def test_in_process_gives_an_exit_the_status_a_process_has(exit_code: int | str | None, status: int, err: str,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The end-to-end test's stand-in for the script's `subprocess.run` (`in_process`): `sys.exit()` is status 0, as
    in a process (it was 1: a command's success taken for its failure), a message is 1 and printed."""
    monkeypatch.setitem(globals(), "report_main", lambda argv: sys.exit(exit_code))
    assert in_process([sys.executable, "-m", "ood.report", "x"]).returncode == status
    assert capsys.readouterr().err == err


def test_a_missing_weights_file_is_named_and_none_given_said(tmp_path: Path) -> None:
    """ImageNet-1K's line when `--weights` is missing: the file's path, or that none was given (it read 'missing
    ResNet-50 weights None')."""
    def line(weights: Path | None) -> str:
        return parity_openood.missing_files("imagenet1k", tmp_path, tmp_path, weights, [0])[-1]

    assert line(None).startswith("no ResNet-50 weights given (--weights / WEIGHTS=): torchvision's ResNet-50 IMAGENET1K_V1")
    assert line(tmp_path / "r50.pth").startswith(f"missing ResNet-50 weights {tmp_path / 'r50.pth'} (--weights / WEIGHTS=): ")


def test_overrides_may_come_between_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make parity-openood ARGS="trainer=cpu --seeds 0 data.num_workers=0"` puts Hydra overrides before and after an
    option (the Makefile's ARGS come after --out): argparse refused the second group ('unrecognized arguments')."""
    seen = []
    monkeypatch.setattr(parity_openood, "missing_files", lambda *args: [])
    monkeypatch.setattr(parity_openood, "evaluate", lambda benchmark, args, seeds, out: seen.append((args.overrides, seeds)))
    code = parity_openood.main(["--data-dir", str(tmp_path), "--ckpt-dir", str(tmp_path), "--benchmarks", "cifar10",
                                "--out", str(tmp_path), "trainer=cpu", "--seeds", "0", "data.num_workers=0"])
    assert seen == [(["trainer=cpu", "data.num_workers=0"], [0])] and code == 1  # no results.jsonl written


def test_leaderboard_detector_that_did_not_run_keeps_its_row() -> None:
    """A detector excluded, skipped or failed has no rows: the table still lists the leaderboard's numbers for it,
    ours `-`, instead of dropping the row."""
    rows = [{"detector": "knn", "seeds": "3", "near/auroc_mean": "0.9", "near/auroc_std": "0.01", "far/auroc_mean": "0.93",
             "far/auroc_std": "0.0", "ref:near/auroc_mean": "0.9064", "ref:near/auroc_std": "0.002",
             "ref:far/auroc_mean": "0.9296", "ref:far/auroc_std": "0.0014"}]
    table, marked = parity_openood.parity_table("cifar10", rows)
    lines = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert lines["| knn"] == "| knn | 90.00 ± 1.00 | 90.64 ± 0.20 | -0.64 | 93.00 ± 0.00 | 92.96 ± 0.14 | +0.04 |"
    # the leaderboard's Gram row is gram_v15's, labelled with OpenOOD's key
    assert lines["| gram_v15 (gram, v1.5 release)"] == "| gram_v15 (gram, v1.5 release) | - | 58.66 ± 4.83 | - | - | 71.73 ± 3.20 | - |"
    assert "| gram" not in lines
    assert lines["| fdbd"] == "| fdbd | - | 90.42 | - | - | 93.16 | - |"  # one run: [mean] only, no ± 0.00
    # OpenOOD's key beside ours where they differ (a reader of OpenOOD's configs looks for ebo, mls, mds)
    assert lines["| energy (ebo)"] == "| energy (ebo) | - | 87.58 ± 0.46 | - | - | 91.21 ± 0.92 | - |"
    assert {"| maxlogit (mls)", "| mahalanobis (mds)", "| tempscale (temp_scaling)", "| knn"} <= set(lines)
    assert table.endswith(f"{parity_openood.STDS}\n\n{parity_openood.GRAM}")
    assert "\nID accuracy (%): ours - | OpenOOD 95.06 ± 0.30 | diff -\n" in table  # no row carries an accuracy
    ref = load_reference(parity_openood.REFERENCE_DIR / "cifar10.yaml")
    assert len(lines) == 1 + len(ref["auroc"]["ce"]) and marked == 0


def test_a_failing_evaluation_does_not_stop_the_other_benchmarks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    """An ood-eval that exits non-zero (e.g. an image missing under a present list) is named; the next benchmark
    still runs and the exit code is 1."""
    ran = []

    def evaluate(benchmark: str, *args: object) -> None:
        ran.append(benchmark)
        if benchmark == "cifar10":
            raise subprocess.CalledProcessError(1, ["ood-eval"])
        for seed in ("s0", "s1", "s2"):
            (tmp_path / "parity" / benchmark / seed).mkdir(parents=True)
            (tmp_path / "parity" / benchmark / seed / "results.jsonl").write_text("{}\n")

    monkeypatch.setattr(parity_openood, "missing_files", lambda *args: [])
    monkeypatch.setattr(parity_openood, "evaluate", evaluate)
    monkeypatch.setattr(parity_openood, "report", lambda benchmark, runs, out: [])
    code = parity_openood.main(["--data-dir", str(tmp_path), "--ckpt-dir", str(tmp_path), "--benchmarks",
                                "cifar10,cifar100", "--out", str(tmp_path / "parity")])
    err = capsys.readouterr().err
    assert code == 1 and ran == ["cifar10", "cifar100"]
    assert "cifar10: ood-eval exited with status 1 (its error is above); no table" in err
    assert "not run or failed (listed above): cifar10\n" in err
    assert "### cifar100 (seeds: 0;" in (tmp_path / "parity" / "parity.md").read_text()


def test_the_seeds_that_finished_still_make_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    """A sweep with one failed seed (s1 out of memory, say) used to lose the benchmark's whole table: the seeds that
    finished are reported, the failure named, the exit code 1. An earlier run's results in the same folder (s1 here,
    and s3, a seed not asked for now) are not taken for this run's."""
    out = tmp_path / "parity" / "cifar10"
    for seed in ("s1", "s3"):
        (out / seed).mkdir(parents=True)
        (out / seed / "results.jsonl").write_text("{}\n")
        os.utime(out / seed / "results.jsonl", (0, 0))
    reported: list[list[str]] = []

    def evaluate(benchmark: str, *args: object) -> None:
        for seed in ("s0", "s2"):
            (out / seed).mkdir(parents=True)
            (out / seed / "results.jsonl").write_text("{}\n")
        raise subprocess.CalledProcessError(1, ["ood-eval"])

    def report(benchmark: str, runs: list[Path], out: Path) -> list[dict[str, str]]:
        reported.append([r.name for r in runs])
        return [row]

    row = {"detector": "msp", "seeds": "2", "near/auroc_mean": "0.88", "near/auroc_std": "0.01",
           "far/auroc_mean": "0.91", "far/auroc_std": "0.02", "ref:near/auroc_mean": "0.8803", "ref:near/auroc_std": "0.0025"}
    monkeypatch.setattr(parity_openood, "missing_files", lambda *args: [])
    monkeypatch.setattr(parity_openood, "evaluate", evaluate)
    monkeypatch.setattr(parity_openood, "report", report)
    code = parity_openood.main(["--data-dir", str(tmp_path), "--ckpt-dir", str(tmp_path), "--benchmarks", "cifar10",
                                "--out", str(tmp_path / "parity")])
    err = capsys.readouterr().err
    assert code == 1
    assert "cifar10: ood-eval exited with status 1 (its error is above); the table has the seeds that finished: s0, s2" in err
    assert reported == [["s0", "s2"]]
    table = (tmp_path / "parity" / "parity.md").read_text()
    assert "### cifar10 (seeds: 2;" in table and "| msp | 88.00 ± 1.00 | 88.03 ± 0.25 | -0.03 |" in table


@pytest.mark.parametrize("benchmark", parity_openood.BENCHMARKS)
def test_gram_is_cached_on_cifar_and_streamed_on_imagenet(benchmark: str, tmp_path: Path) -> None:
    """The presets run one form of gram each: the cached one on CIFAR, gram_stream (bounds only) on ImageNet; and
    gram_v15 (the leaderboard's Gram row) everywhere."""
    cfg = compose_config(tmp_path, [f"experiment=parity_{benchmark}"], config_name="eval")
    names = [cls.name for cls in Evaluator(cfg.detectors.names, exclude=list(cfg.detectors.exclude)).detectors]
    streamed = benchmark.startswith("imagenet")
    assert ("gram_stream" in names, "gram" in names) == (streamed, not streamed)
    assert "knn" in names and "mds_ensemble" in names and "gram_v15" in names


def test_gram_v15_fills_the_leaderboard_gram_row() -> None:
    """ood-report gives gram_v15's rows the leaderboard's Gram numbers (OpenOOD's gram as released made them), gram's
    and gram_stream's none (OpenOOD's gram since its fix); the parity table prints them on gram_v15's row, labelled
    with OpenOOD's key, and says which is which under the table."""
    ref = load_reference(parity_openood.REFERENCE_DIR / "imagenet200.yaml")
    entries = [{"id_dataset": "imagenet200", "backbone": "resnet18", "method": "ce", "detector": name,
                "_sets": ref["ood_sets"]} for name in ("gram_v15", "gram_stream", "gram")]
    assert add_reference([], entries, [ref]) == ["ref:near/auroc", "ref:far/auroc"]
    assert entries[0]["ref:near/auroc"] == pytest.approx((0.6767, 0.0107, 3)) and entries[0]["ref:far/auroc"][0] == pytest.approx(0.7119)
    assert not any(key.startswith("ref:") for entry in entries[1:] for key in entry)
    ours = {"seeds": "3", "near/auroc_mean": "0.68", "near/auroc_std": "0.01", "far/auroc_mean": "0.7", "far/auroc_std": "0.02"}
    rows = [{"detector": "gram_v15", **ours, "ref:near/auroc_mean": "0.6767", "ref:near/auroc_std": "0.0107",
             "ref:far/auroc_mean": "0.7119", "ref:far/auroc_std": "0.0024"}, {"detector": "gram_stream", **ours}]
    table, marked = parity_openood.parity_table("imagenet200", rows)
    lines = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert lines["| gram_v15 (gram, v1.5 release)"] == ("| gram_v15 (gram, v1.5 release) | 68.00 ± 1.00 | 67.67 ± 1.07 | +0.33 | "
                                                         "70.00 ± 2.00 | 71.19 ± 0.24 | -1.19 ! |")
    assert lines["| gram_stream"] == "| gram_stream | 68.00 ± 1.00 | - | - | 70.00 ± 2.00 | - | - |"
    # the header, the leaderboard's rows (gram_v15 among them) and gram_stream's own
    assert "| gram" not in lines and len(lines) == 2 + len(ref["auroc"]["ce"]) and marked == 1
    assert "gram (gram_stream: its streamed form) is OpenOOD's gram since its fix (commit bdf6a55" in table


def test_one_seed_is_its_value_alone() -> None:
    """ImageNet-1K's one torchvision network: report.csv leaves its std empty, and the parity table printed
    `± 0.00` beside it, as if seeds agreed; it is the value alone now, as in report.md."""
    row = {"detector": "msp", "seeds": "1", "near/auroc_mean": "0.7602", "near/auroc_std": "", "far/auroc_mean": "0.85",
           "far/auroc_std": "", "ref:near/auroc_mean": "0.7602", "ref:far/auroc_mean": "0.8523"}
    table, _ = parity_openood.parity_table("imagenet1k", [row])
    assert "| msp | 76.02 | 76.02 | +0.00 | 85.00 | 85.23 | -0.23 |" in table.splitlines()
    row.update({"id_acc_mean": "0.7613", "id_acc_std": ""})  # torchvision's IMAGENET1K_V1: 76.13 %, one run
    table, _ = parity_openood.parity_table("imagenet1k", [row])
    assert "\nID accuracy (%): ours 76.13 | OpenOOD 76.18 | diff -0.05\n" in table
    # a reference may give it as a bare number, as load_reference reads it (it was a TypeError here)
    assert parity_openood.id_accuracy([row], {"id_acc": 76.18}) == "\nID accuracy (%): ours 76.13 | OpenOOD 76.18 | diff -0.05"
