"""DDP-exact evaluation: 2 CPU processes (gloo, spawn) give exactly the single-process results (rank 0 gathers and
evaluates; `tests/test_rank_zero.py` checks that the other rank never holds the bank)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FAST, NO_FIGURES, run_config

from ood.features.collector import SplitCollector


def test_collector_dedupes_padding_and_sorts() -> None:
    """Simulates a padded, rank-major gather: duplicates removed, rows sorted by dataset index."""
    c = SplitCollector(["score"])
    c.update(index=torch.tensor([0, 2, 4]), score=torch.tensor([0.0, 2.0, 4.0]))
    c.update(index=torch.tensor([1, 3, 0]), score=torch.tensor([1.0, 3.0, 0.0]))  # 0 repeated (sampler padding)
    out = c.compute()
    assert out["index"].tolist() == [0, 1, 2, 3, 4]
    assert out["score"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_collector_requires_declared_fields() -> None:
    c = SplitCollector(["logits"])
    with pytest.raises(KeyError, match=r"^\"evaluation batch lacks fields \['logits'\]\"$"):
        c.update(index=torch.tensor([0]), features=torch.zeros(1, 2))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    """One FAST digits run, evaluated at its end with msp, energy, mahalanobis and knn: its rows and its checkpoint,
    shared by this file's DDP tests (trained once, not once per test)."""
    out = tmp_path_factory.mktemp("train")
    rows = run_config(out, [*FAST, NO_FIGURES, "detectors.names=[msp,energy,mahalanobis,knn]"])
    return rows, out / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_ddp_cpu_evaluation_equals_single_process(tmp_path: Path, trained: tuple[list[dict[str, Any]], Path]) -> None:
    # odd-sized splits (650/162/271/300/714/500...) with eval batch 64 force uneven shards and sampler padding
    train_rows, ckpt = trained
    # with the network-pass detectors (rank 0 re-runs the network over whole splits, or gram_stream's fit over parts of
    # the train split) and the layer taps they read
    network = "odin,rankfeat,nac,gram,gram_stream"
    common = [f"ckpt_path={ckpt}", f"detectors.names=[msp,energy,mahalanobis,knn,{network}]", "data.eval_batch_size=64",
              "trainer.enable_progress_bar=false", NO_FIGURES]
    single = run_config(tmp_path / "single", common, config_name="eval")
    # rank 0 alone gathers and evaluates, here on memory-mapped banks (deleted afterwards)
    ddp = run_config(tmp_path / "ddp", [*common, "trainer=ddp_cpu", f"evaluation.bank_dir={tmp_path / 'banks'}"],
                     config_name="eval")
    assert (tmp_path / "banks").is_dir() and not list((tmp_path / "banks").iterdir())
    key = lambda r: (r["detector"], r["ood_dataset"])  # noqa: E731
    assert len(ddp) == len(single) == 36
    assert sorted(single, key=key) == sorted(ddp, key=key)
    # each score's image: the padded, sharded rows deduplicated and sorted back into the single process's order
    assert (tmp_path / "ddp" / "samples.csv").read_text() == (tmp_path / "single" / "samples.csv").read_text()
    # gram_stream, from its own passes, gives the cached gram's numbers (to the 4 decimals tables print: its train rows
    # are batched apart from the cached pass's, so float32 rounding may differ; module docstring of ood.detectors.gram)
    gram = {r["ood_dataset"]: r for r in single if r["detector"] == "gram"}
    for row in (r for r in single if r["detector"] == "gram_stream"):
        for metric in ("auroc", "aupr_in", "fpr95"):
            assert row[metric] == pytest.approx(gram[row["ood_dataset"]][metric], abs=1e-4), (row["ood_dataset"], metric)
    # re-evaluating the checkpoint reproduces the numbers from the end of training
    assert sorted((key(r), r["auroc"], r["fpr95"]) for r in train_rows) == sorted(
        (key(r), r["auroc"], r["fpr95"]) for r in single if r["detector"] in ("msp", "energy", "mahalanobis", "knn")
    )


@pytest.mark.slow
def test_ddp_cpu_grood_equals_single_process(tmp_path: Path, trained: tuple[list[dict[str, Any]], Path]) -> None:
    """GROOD's prototypes are sums synced across ranks (padding duplicates held back): same numbers under DDP,
    up to float summation order."""
    common = [f"ckpt_path={trained[1]}", "method=grood", "detectors=none",
              "data.eval_batch_size=64", "trainer.enable_progress_bar=false", NO_FIGURES]  # no figure is read
    single = {r["ood_dataset"]: r for r in run_config(tmp_path / "single", common, config_name="eval")}
    ddp = {r["ood_dataset"]: r for r in run_config(tmp_path / "ddp", [*common, "trainer=ddp_cpu"], config_name="eval")}
    assert set(single) == set(ddp) == {"digits_6_9", "flower_patches", "gaussian_noise", "uniform_noise"}
    for name, row in single.items():
        assert row["detector"] == "grood" and row["id_acc"] == ddp[name]["id_acc"]
        for metric in ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_oodpos"):
            assert ddp[name][metric] == pytest.approx(row[metric], abs=1e-6), (name, metric)
