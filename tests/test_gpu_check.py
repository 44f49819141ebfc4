"""`make gpu-check`'s CPU dry run (tiny shapes, the same code as on a GPU) passes, so the script cannot rot: every
method config trains and evaluates in fp32 and under bf16 autocast, CE and cluster in fp16 compiled, the device-vs-CPU
checks hold, the throughput table is filled."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks import gpu_check
from benchmarks.fabricate import cifar_tree


@pytest.mark.slow
def test_gpu_check_dry_run_passes(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--workdir", str(tmp_path / "work")]) == 0
    report = json.loads(out.read_text())
    checks = {c["check"]: c for c in report["checks"]}
    assert report["ok"] and report["dry_run"] and all(c["ok"] for c in checks.values())
    for name in gpu_check.METHODS:  # a new method config enrols itself
        row = checks[f"method {name}"]
        assert row["losses_gpu"] and row["losses_gpu_fast"]
        narrow = row["narrower_than_bf16"]
        assert all(w < report["bf16_step"] for w in narrow.values()) and set(narrow) <= {"heatmap"}
        assert all(r >= report["rho_min"] for d, r in row["spearman_fp32_bf16"].items() if d not in narrow)
        assert row["detector_params_bf16"] == row["detector_params_fp32"]  # fp32's tuned values, kept for bf16
        assert "k" in row["detector_params_bf16"]["knn"]
        assert "combood" in row["spearman_fp32_bf16"]  # its activation taps (forward pre-hooks) under bf16 autocast
    for name, modules in (("ce", ["backbone"]), ("cluster supcon", ["backbone", "head"])):  # fp16 + compile
        row = checks[f"fp16 + compile {name}"]
        assert row["compiled"] == modules and int(row["steps_taken"].split("/")[0]) > 0
        assert set(row["mean_auroc"]) >= {"msp", "odin", "gram_stream"} and all(0 <= a <= 1 for a in row["mean_auroc"].values())
    for search in ("faiss index", "torch search"):  # on a GPU: faiss' GPU index (where installed) and torch's
        assert checks[f"{search}: knn (k=50)"]["same_neighbours"] == 1.0
        assert checks[f"{search}: GROOD bank (1-NN)"]["same_neighbours"] == 1.0
    assert checks["faiss index: knn (k=50)"]["max_score_diff"] == 0.0  # the detector picks faiss on the CPU
    assert "max_score_diff" not in checks["torch search: knn (k=50)"]
    assert checks["1-device DDP evaluation == plain evaluation"]["rows"] > 0
    assert checks["ood.evaluate / ood.extract on the caller's model: finite rows, the model back on its device and in its modes"]["rows"] == 3
    assert [(t["model"].split()[1], t["precision"]) for t in report["throughput"]] == [
        ("32", "fp32"), ("32", "bf16"), ("224", "fp32"), ("224", "bf16")]
    assert all(t["ood_train_img_s"] > 0 and t["plain_train_img_s"] > 0 and 0 <= t["data_wait_share"] < 1
               for t in report["throughput"])


def test_the_dry_run_logs_no_methods_metrics_and_excludes_no_detector() -> None:
    """The dry run's Lightning-logged scalars are left out of every methods-section run (`methods_quiet`), and it
    repeats every detector for each method (`repeat_exclude` is the GPU run's gmm only): the sink removal once sat in
    `repeat_exclude`'s place, so the first method's runs still logged every scalar."""
    assert gpu_check.DRY.methods_quiet == ["~evaluation.sinks.metrics"] and gpu_check.DRY.repeat_exclude == []
    assert gpu_check.GPU.methods_quiet == [] and gpu_check.GPU.repeat_exclude == ["detectors.exclude=[gmm]"]


def test_gpu_check_refuses_without_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "x.json")]) == 1
    assert "--dry-run" in capsys.readouterr().err


def test_bf16_agreement_skips_only_scores_closer_than_a_bf16_step() -> None:
    """Scores 1e-3 of their magnitude apart (one short epoch of the heatmap decoder) reordered by bf16 are reported,
    not failed: at the GPU threshold of 0.99 they would fail (rho 0.86 in the dry run; not run on a GPU); widely spread
    scores that bf16 reorders still fail; small bf16-sized differences of spread scores pass."""
    gen = np.random.default_rng(0)
    wide = gen.uniform(0, 10, 500)
    tight = 5 + 5e-3 * gen.uniform(size=500)  # spread 1e-3 of the magnitude: a quarter of a bf16 step
    fp32 = {"wide": wide, "tight": tight, "wide_shuffled": wide, "kept": wide}
    bf16 = {"wide": wide + gen.normal(0, 1e-3, 500), "tight": tight[gen.permutation(500)],
            "wide_shuffled": wide[gen.permutation(500)], "kept": wide * (1 + 2**-9)}
    rho, narrow, low = gpu_check.bf16_agreement(fp32, bf16, 0.99)
    assert rho["kept"] == 1.0 and rho["wide"] > 0.999 and abs(rho["tight"]) < 0.2
    assert list(narrow) == ["tight"] and narrow["tight"] == pytest.approx(1e-3, rel=0.05)
    assert list(low) == ["wide_shuffled"] and "relative spread 0.98" in low["wide_shuffled"]
    # percentiles 1 and 99 of [-101, -100]: -100.99 and -100.01, over the larger magnitude
    assert gpu_check.relative_spread(np.array([-101.0, -100.0])) == pytest.approx(0.98 / 100.99, rel=1e-12)


def test_faiss_check_counts_a_tie_at_the_kth_distance_as_the_same_neighbours() -> None:
    """float32 sums in another order (GPU vs CPU) swap neighbours tied at the k-th distance: at the GPU sizes 7 of
    10 000 k = 50 sets of faiss' float32 CPU search differ from exact float64 ones, near the 0.1 % allowed; such a
    swap counts as the same set, a neighbour farther than the tolerance does not."""
    idx = torch.tensor([[0, 1, 2], [0, 1, 2], [5, 6, 7]])
    dist = torch.tensor([[0.1, 0.2, 0.5], [0.1, 0.2, 0.5], [0.1, 0.2, 0.3]])
    swapped = torch.tensor([[0, 1, 3], [0, 4, 2], [5, 6, 7]])
    near = torch.tensor([[0.1, 0.2, 0.5 * (1 + 1e-6)], [0.1, 0.2, 0.5], [0.1, 0.2, 0.3]])
    assert gpu_check._same_neighbours(idx, swapped, dist, near) == pytest.approx(2 / 3)  # row 1 swapped a non-tie
    far = torch.tensor([[0.1, 0.2, 0.6], [0.1, 0.2, 0.5], [0.1, 0.2, 0.3]])
    assert gpu_check._same_neighbours(idx, swapped, dist, far) == pytest.approx(1 / 3)
    # 1-NN: another row at the same distance is a tie, one farther is not
    one, other = torch.tensor([[5], [5]]), torch.tensor([[7], [7]])
    assert gpu_check._same_neighbours(one, other, torch.tensor([[0.3], [0.3]]), torch.tensor([[0.3], [0.31]])) == 0.5
    row = gpu_check._neighbour_row("knn", idx, swapped, dist, near, None)
    assert not row["ok"] and row["same_neighbours"] == pytest.approx(2 / 3)
    row = gpu_check._neighbour_row("knn", idx[[0, 2]], swapped[[0, 2]], dist[[0, 2]], near[[0, 2]], None)
    assert row["ok"] and row["same_neighbours"] == 1.0


def _stub_sections(monkeypatch: pytest.MonkeyPatch, **sections: Callable[..., Any]) -> None:
    """Every section of the check replaced by one passing row (no data made, no run), but those given."""
    for name in ("cifar_tree", "imagenet_tree"):
        monkeypatch.setattr(gpu_check, name, lambda root, **sizes: root)
    stubs = {"check_methods": lambda *a: [{"check": "method ce", "ok": True}],
             "check_fast_paths": lambda *a: [{"check": "fp16 + compile ce", "ok": True}],
             "check_faiss": lambda sizes: [{"check": "faiss knn (k=50)", "ok": True}],
             "check_augment": lambda sizes: {"check": "augment", "ok": True},
             "check_ddp": lambda *a: {"check": "ddp", "ok": True}, "check_api": lambda *a: {"check": "api", "ok": True},
             "throughput": lambda *a: None}
    for name, stub in {**stubs, **sections}.items():
        monkeypatch.setattr(gpu_check, name, stub)


def test_a_skipped_check_is_reported_and_does_not_fail_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    """CUDA with the faiss-cpu wheel: faiss' GPU index cannot be checked, and ood does not need it there (its exact
    searches run in torch on the GPU, checked): the row says so as skipped (`ok` null) and the run passes."""
    skipped = {"check": "faiss GPU index", "ok": None, "skipped": "faiss 1.0 has no GPU support"}
    searched = {"check": "torch search: knn (k=50)", "ok": True, "same_neighbours": 1.0}
    _stub_sections(monkeypatch, check_faiss=lambda sizes: [skipped, searched])
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--workdir", str(tmp_path)]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] and report["checks"][2:4] == [skipped, searched]
    printed = capsys.readouterr().out
    assert "  faiss GPU index: skipped: faiss 1.0 has no GPU support\n" in printed
    assert '| faiss GPU index | skipped | {"skipped": "faiss 1.0 has no GPU support"} |' in printed
    assert '| torch search: knn (k=50) | yes | {"same_neighbours": 1.0} |' in printed
    _stub_sections(monkeypatch, check_faiss=lambda sizes: [skipped, {**searched, "ok": False, "error": "2 of 9"}])
    assert gpu_check.main(["--dry-run", "--out", str(out), "--workdir", str(tmp_path)]) == 1


def test_gpu_check_keeps_the_finished_checks_when_a_later_section_fails(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The report is written after every section and every throughput row: a run stopped later (the device's time
    limit, a crash) keeps what it finished; a crash in the throughput section is a failed row, not a lost report."""
    out = tmp_path / "gpu_check.json"
    seen: list[dict] = []
    row = {"model": "resnet18_32x32 32 px batch 128", "precision": "fp32", "ood_train_img_s": 1.0,
           "plain_train_img_s": 1.0, "ood_vs_plain": 1.0, "data_wait_share": 0.1, "eval_img_s": 1.0, "eval_images": 8}

    def api(sizes: gpu_check.Sizes, work: Path) -> dict:
        seen.append(json.loads(out.read_text()))
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def throughput(sizes: gpu_check.Sizes, trees: dict, work: Path, table: list, saved: Callable[[], None]) -> None:
        table.append(row)
        saved()
        seen.append(json.loads(out.read_text()))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    _stub_sections(monkeypatch, check_api=api, throughput=throughput)
    filters, level = list(warnings.filters), logging.getLogger("ood").level
    assert gpu_check.main(["--dry-run", "--out", str(out), "--workdir", str(tmp_path)]) == 1
    # the caller's warning filters and ood's log level as they were: it left ood's warnings off for every later test
    # in the process (a caplog test of an ood warning then failed by test order)
    assert (warnings.filters, logging.getLogger("ood").level) == (filters, level)
    before_api, before_crash = seen
    assert [c["check"] for c in before_api["checks"]] == ["method ce", "fp16 + compile ce", "faiss knn (k=50)", "augment", "ddp"]
    assert not before_api["complete"] and not before_api["ok"]
    assert before_crash["throughput"] == [row] and before_crash["checks"][-1] == {
        "check": "api", "ok": False, "error": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    report = json.loads(out.read_text())
    assert report["complete"] and not report["ok"] and report["throughput"] == [row]
    assert report["checks"][-1] == {"check": "throughput", "ok": False, "error": "OutOfMemoryError: CUDA out of memory"}


@pytest.mark.slow
def test_the_ddp_section_leaves_the_environment_and_thread_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its one-device DDP run set MASTER_ADDR, MASTER_PORT, NODE_RANK, LOCAL_RANK and OMP_NUM_THREADS (with
    torch.set_num_threads) in this process: the throughput section after it, and a program calling the check, ran
    with them. They come back as they were (a few seconds: one plain and one DDP evaluation of 4 + 4 images)."""
    for key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "OMP_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    threads = torch.get_num_threads()
    tree = cifar_tree(tmp_path / "cifar", n_train=8, n_val=4, n_test=4, n_ood=4)
    method, *_ = gpu_check.build(gpu_check._cfg(tmp_path / "init", [
        "data=cifar10", f"paths.data_dir={tree}", "backbone=small_cnn", "train=false", "evaluate=false", "trainer=cpu",
        *gpu_check.QUIET]))
    torch.save(method.state_dict(), tmp_path / "ce_init.pt")
    torch.set_num_threads(threads + 1)  # not the count Lightning sets (cores / ranks), so its change shows
    before = dict(os.environ)
    try:
        row = gpu_check.check_ddp(dataclasses.replace(gpu_check.DRY, detectors="detectors.names=[msp]"), tree, tmp_path)
        assert row["ok"] and row["rows"] > 0
        assert dict(os.environ) == before and torch.get_num_threads() == threads + 1
    finally:
        torch.set_num_threads(threads)
