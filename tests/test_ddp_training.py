"""Training under DDP equals single-device training: global batch split across ranks, the first steps of
every method equal under 2-process DDP and one process, contrastive losses over the global batch."""

from __future__ import annotations

import csv
import socket
from pathlib import Path

import pytest
import torch
from ddp_step import CASES, prepare, worker
from fabricate import CASES as CLUSTER_CASES
from fabricate import DIGITS as CLUSTER_DIGITS
from helpers import NO_FIGURES, rows_by, run_config, start_ranks
from omegaconf import OmegaConf
from torch.multiprocessing import ProcessRaisedException
from torch.utils.data import DistributedSampler

from ood.cli import friendly_errors, user_error
from ood.data import benchmark as bm
from ood.data.digits import DigitsBenchmark
from ood.errors import ConfigError
from ood.losses import supcon


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def step_results(ce_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case run once in this process and once in a single pair of gloo processes (as `trainer=ddp_cpu` starts
    its ranks)."""
    out = tmp_path_factory.mktemp("ddp_step")
    prepare(ce_checkpoint, out)
    start_ranks(worker, (2, _free_port(), ce_checkpoint, out))
    return out




def _abs_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| elementwise, 0 where both are NaN, inf where only one is."""
    both = torch.isnan(a) & torch.isnan(b)
    one = torch.isnan(a) ^ torch.isnan(b)
    return torch.where(both, 0.0, torch.where(one, torch.inf, (a - b).abs()))


@pytest.mark.slow
@pytest.mark.parametrize("case", [name for name, _ in CASES])
def test_ddp_steps_equal_single_device(case: str, step_results: Path) -> None:
    """Two optimisation steps with a per-rank batch of B/2 on 2 ranks leave the same weights as one process with
    batch B on the same samples (float64; contrastive cases: one contrastive and one probe step)."""
    ddp = torch.load(step_results / f"{case}.ddp.pt", weights_only=False)
    assert "error" not in ddp, ddp.get("error")
    single = torch.load(step_results / f"{case}.single.pt", weights_only=False)["state"]
    init = torch.load(step_results / f"{case}.init.pt", weights_only=False)["state"]
    assert single.keys() == ddp["state"].keys()
    floats = [k for k in single if single[k].is_floating_point()]
    # buffers fitted at fit start (e.g. energy statistics) start as NaN: not a sign of a step, but they must agree
    moved = max(float((single[k].double() - init[k].double()).abs().max()) for k in floats if init[k].isfinite().all())
    diff = max(float(_abs_diff(single[k], ddp["state"][k]).max()) for k in floats)
    assert moved > 1e-4, "the steps did not change the weights: nothing was compared"
    print(f"DIFF {case} moved={moved:.3g} diff={diff:.3g}")
    assert diff < 1e-6, f"{case}: max |single - ddp| = {diff:.3g}"


def test_supcon_anchor_slices_average_to_the_whole_batch() -> None:
    """Each rank's loss over its own anchors against all samples; the mean over ranks is the loss of the whole
    batch (what DDP's gradient averaging computes), for SupCon labels and SimCLR ids alike."""
    gen = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(12, 4, generator=gen, dtype=torch.float64), dim=1)
    for labels in (torch.tensor([0, 1, 2, 0, 1, 2]).repeat(2), torch.arange(6).repeat(2)):
        whole = supcon(z, labels, 0.1)
        parts = [supcon(z, labels, 0.1, anchors=slice(r * 4, (r + 1) * 4)) for r in range(3)]
        assert float(torch.stack(parts).mean()) == pytest.approx(float(whole), abs=1e-12)


def _fake_world(monkeypatch: pytest.MonkeyPatch, world: int, rank: int) -> None:
    monkeypatch.setattr(bm.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(bm.dist, "get_world_size", lambda *a, **k: world)
    monkeypatch.setattr(bm.dist, "get_rank", lambda *a, **k: rank)


@pytest.mark.parametrize("batch_size", [64, 65])
def test_global_batch_is_split_and_every_rank_has_the_same_batches(
    batch_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.batch_size is global: 2 ranks load half each (a warning when it does not divide); with Lightning's
    padded DistributedSampler on the ID stream both ranks have as many ID batches, and enough outlier batches."""
    dm = bm.OODDataModule(DigitsBenchmark(), batch_size=batch_size, seed=0)
    dm.use_streams(("id", "outliers"), "oe")
    counts = []
    for rank in (0, 1):
        _fake_world(monkeypatch, 2, rank)
        if batch_size % 2:
            with pytest.warns(UserWarning, match="does not divide across 2 DDP ranks"):
                loaders = dm.train_dataloader().iterables
        else:
            loaders = dm.train_dataloader().iterables
        ident, out = loaders["id"], loaders["outliers"]
        assert (ident.batch_size, out.batch_size) == (32, batch_size)  # outliers: 2 x batch_size, global
        id_sampler = DistributedSampler(ident.dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        id_batches = len(id_sampler) // ident.batch_size
        counts.append(id_batches)
        assert len(out.sampler) // out.batch_size > id_batches
    assert counts[0] == counts[1] == 325 // 32


@pytest.mark.slow
def test_ddp_supcon_cluster_run_meets_the_single_process_floor_and_reloads_on_one_device(tmp_path: Path) -> None:
    """A seeded 2-process SupCon run on digits reports `cluster` rows above the floors of the single-process test
    (tests/test_cluster.py); its checkpoint, evaluated on one device, gives the same rows."""
    overrides, near_floor, far_floor = CLUSTER_CASES["supcon"]
    # every cached detector and the CSV logger: a spawned fit then test with hundreds of logged metrics (the results
    # once hung in Lightning's spawn launcher, and the CSV logger lost the training columns)
    common = [*(o for o in CLUSTER_DIGITS if not o.startswith("detectors=")), "detectors=fast", *overrides, NO_FIGURES]
    rows = rows_by(run_config(tmp_path / "ddp", [*common, "trainer=ddp_cpu"]), "cluster")
    with open(next((tmp_path / "ddp" / "csv").glob("version_*/metrics.csv"))) as f:
        columns = next(csv.reader(f))
    assert {"train/loss", "train/contrastive_loss", "test/cluster/far/auroc", "test/msp/far/auroc"} <= set(columns)
    assert rows["digits_6_9"]["auroc"] >= near_floor
    far = [r["auroc"] for r in rows.values() if r["ood_group"] == "far"]
    assert sum(far) / len(far) >= far_floor
    ckpt = tmp_path / "ddp" / "checkpoints" / "last.ckpt"
    again = rows_by(run_config(tmp_path / "one", [*common, "train=false", f"ckpt_path={ckpt}", "logger=none"]), "cluster")
    assert again.keys() == rows.keys()
    for name, row in rows.items():
        assert again[name]["id_acc"] == row["id_acc"]
        for metric in ("auroc", "aupr_in", "aupr_out", "fpr95"):
            assert again[name][metric] == pytest.approx(row[metric], abs=1e-9), (name, metric)


def _raise_config_error(rank: int) -> None:
    raise ConfigError(f"rank {rank}: method.foo=1 is unknown; choices: [a, b]")


def test_a_user_error_inside_a_spawned_rank_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """`trainer=ddp_cpu` ranks are started by a fork server: their `OODError` reaches the parent as torch's `ProcessRaisedException`
    (traceback text only); the entry point prints the original one-line message and exits 1, no traceback."""
    with pytest.raises(ProcessRaisedException) as raised:
        start_ranks(_raise_config_error, nprocs=1)
    assert isinstance(user_error(raised.value), ConfigError)
    assert str(user_error(raised.value)) == "rank 0: method.foo=1 is unknown; choices: [a, b]"
    assert user_error(ProcessRaisedException("Traceback ...\nValueError: a bug", 0, 1)) is None

    def task(cfg: object) -> None:
        raise raised.value

    with pytest.raises(SystemExit) as exited:
        friendly_errors(task)(OmegaConf.create({}))
    assert exited.value.code == 1
    assert capsys.readouterr().err == "error: rank 0: method.foo=1 is unknown; choices: [a, b]\n"
