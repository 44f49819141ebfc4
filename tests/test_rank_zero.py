"""Evaluation banks assembled on global rank 0 (`ood.features.collector.RankZeroRows`) and memory-mapped banks.

Under 2-process gloo DDP with Lightning's padded sampler, rank 0 holds the deduplicated, index-sorted rows (the
single-process result exactly) and rank 1 gets nothing back, holding only its own shard; memory-mapped banks give
the in-RAM detector scores exactly; neither rank ever holds a split twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from helpers import start_ranks
from torch.utils.data import DistributedSampler

import ood.features.collector as collector_module
from ood.detectors import build_detector
from ood.features.bank import FeatureBank
from ood.features.collector import RankZeroRows, SplitCollector, rank_zero_group, release_group

N, D, C = 21, 6, 3


def mapped_from(tensor: torch.Tensor, path: Path) -> bool:
    """Whether `tensor`'s memory lies in a mapping of the file `path` (/proc/self/maps)."""
    ptr = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path.resolve()):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= ptr < end:
                return True
    return False


def _data() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"features": torch.randn(N, D, generator=gen).half(), "logits": torch.randn(N, C, generator=gen),
            "labels": torch.arange(N) % C}


def _collect(indices: list[int], collector: RankZeroRows | SplitCollector) -> RankZeroRows | SplitCollector:
    data = _data()
    for chunk in torch.tensor(indices).split(4):
        collector.update(index=chunk, **{k: v[chunk] for k, v in data.items()})
    return collector


def _status_mb(field: str) -> float:
    """`VmRSS` (now) or `VmHWM` (peak since the last reset) of this process, MB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _rank(rank: int, world: int, init: str, out: str) -> None:
    collector_module.SEND_BYTES = 3 * D * 2  # 3-row messages (a forked child does not inherit a monkeypatch)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    indices = list(DistributedSampler(range(N), num_replicas=world, rank=rank, shuffle=False))
    group = rank_zero_group()
    in_ram = _collect(indices, RankZeroRows(N)).gather(group)
    mapped = _collect(indices, RankZeroRows(N, out_dir=Path(out) / "banks")).gather(group)
    all_gathered = len(_collect(indices, SplitCollector(["features", "logits", "labels"])).compute()["index"])
    release_group(group)
    report = {"own": len(indices), "received": None if in_ram is None else len(in_ram["index"]),
              "all_gathered": all_gathered}
    if in_ram is not None:
        assert mapped is not None
        report["equal"] = all(torch.equal(in_ram[k], mapped[k]) for k in in_ram)
        report["mapped"] = mapped_from(mapped["features"], Path(out) / "banks" / "features.npy")
        torch.save(in_ram, Path(out) / "rank0.pt")
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_gather_to_rank_zero_only(tmp_path: Path) -> None:
    """21 rows on 2 ranks (11 + 11, index 0 repeated as padding), sent in 3-row messages."""
    start_ranks(_rank, (2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["own"] == r1["own"] == 11 and r0["all_gathered"] == r1["all_gathered"] == N
    assert r0["received"] == N and r1["received"] is None  # rank 1 never holds more than its own 11 rows
    assert r0["equal"] and r0["mapped"]  # memory-mapped gather == in-RAM gather
    got, data = torch.load(tmp_path / "rank0.pt"), _data()
    assert torch.equal(got["index"], torch.arange(N))
    for key, value in data.items():
        assert torch.equal(got[key], value), key


ROWS, WIDTH = 40_000, 1024  # a 160 MB split (float32) on 2 ranks: 80 MB each


def _memory_rank(rank: int, init: str, out: str) -> None:
    collector_module.SEND_BYTES = 4 * 2**20
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    group = rank_zero_group()
    shard = torch.tensor(list(DistributedSampler(range(ROWS), num_replicas=2, rank=rank, shuffle=False)))
    warm_up = RankZeroRows(4)  # the code paths' first use (gloo buffers, library pages) is not the bank's memory
    warm_up.update(index=torch.arange(rank, 4, 2), features=torch.zeros(2, WIDTH))
    warm_up.gather(group)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts afresh from the current resident size
    base = _status_mb("VmRSS")
    rows = RankZeroRows(ROWS)
    for index in shard.split(500):
        rows.update(index=index, features=torch.full((len(index), WIDTH), float(rank)))
    got = rows.gather(group)
    peak = _status_mb("VmHWM") - base
    if got is not None:  # every row from the rank that had it first: 0 then 1 (index 0 is rank 1's padding)
        assert torch.equal(got["features"][:, 0], (torch.arange(ROWS) % 2).float())
    release_group(group)
    Path(out, f"{rank}.json").write_text(json.dumps({"peak_mb": peak}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_no_rank_holds_a_split_twice(tmp_path: Path) -> None:
    """Peak resident memory from the first batch to the gathered bank: rank 0 about the bank (its rows are written in
    place, the other rank's one message at a time), rank 1 about its shard (sent one message at a time, each batch
    dropped once sent). Before, rank 0 held its concatenated shard beside the bank (1.62x the bank), rank 1 its shard
    twice while sending (2.0x)."""
    start_ranks(_memory_rank, (f"file://{tmp_path / 'rendezvous'}", str(tmp_path)))
    bank_mb = ROWS * WIDTH * 4 / 2**20
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text())["peak_mb"] for r in (0, 1))
    assert 0.9 * bank_mb < r0 < 1.25 * bank_mb, (r0, bank_mb)  # now 1.11x
    assert 0.45 * bank_mb < r1 < 0.625 * bank_mb, (r1, bank_mb)  # 1.25x its shard; now 1.16x


def test_single_process_gather_equals_the_collector_sync(tmp_path: Path) -> None:
    order = [5, 3, 0, 1, 2, 4, *range(6, N), 0, 7]  # any order, with duplicates
    expected = _collect(order, SplitCollector(["features", "logits", "labels"])).compute()
    for out_dir in (None, tmp_path):
        got = _collect(order, RankZeroRows(N, out_dir=out_dir)).gather()
        assert got is not None and got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)


def test_rows_no_batch_covered_are_left_out_in_ram_and_mapped(tmp_path: Path) -> None:
    """`trainer.limit_test_batches`: only some dataset rows come; the bank is those rows, sorted, and still mapped."""
    order = [9, 2, 14, 2, 5]
    data = _data()
    for out_dir in (None, tmp_path):
        got = _collect(order, RankZeroRows(N, out_dir=out_dir)).gather()
        assert got is not None and got["index"].tolist() == [2, 5, 9, 14]
        assert all(torch.equal(got[k], v[[2, 5, 9, 14]]) for k, v in data.items())
    assert mapped_from(got["logits"], tmp_path / "logits.kept.npy")


@pytest.mark.parametrize("name, kwargs", [("mahalanobis", {}), ("rmds", {}), ("vim", {"dim": 3}), ("knn", {"k": 4})])
def test_memory_mapped_banks_score_exactly_as_in_ram(name: str, kwargs: dict, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(C, D, generator=gen), torch.randn(C, generator=gen)

    def bank(n: int, out_dir: Path | None) -> FeatureBank:
        h = torch.randn(n, D, generator=torch.Generator().manual_seed(n)) + torch.arange(n)[:, None] % C
        rows = RankZeroRows(n, out_dir=out_dir)
        rows.update(index=torch.arange(n), features=h, logits=h @ w.T + b, labels=torch.arange(n) % C)
        data = rows.gather()
        assert data is not None
        return FeatureBank(data["logits"], data["features"], data["labels"], w, b, index=data["index"])

    ram_bank = bank(60, None)
    ram = build_detector(name, **kwargs).fit(ram_bank).score(bank(9, None))
    train, test = bank(60, tmp_path / "train"), bank(9, tmp_path / "test")
    assert mapped_from(train.features, tmp_path / "train" / "features.npy") and not mapped_from(ram_bank.features, tmp_path)
    assert torch.equal(build_detector(name, **kwargs).fit(train).score(test), ram)


def test_sync_reducers_computes_pending_reducers_once() -> None:
    """What the callback calls on every rank before evaluating on rank 0: each updated reducer is computed (its
    collective) in first-update order, then no longer pending; later `compute` calls return the same result."""
    from ood.features import reduce

    sums, first = reduce.ClassSums(2), reduce.FirstN(2, ["x"])
    index, labels, x = torch.arange(4), torch.tensor([0, 1, 0, 1]), torch.arange(4.0)[:, None].repeat(1, 2)
    sums.update(index, labels, x=x)
    first.update(index=index, x=x)
    pending = [v for _, v in sorted(reduce._PENDING.items()) if v is sums or v is first]
    assert len(pending) == 2 and pending[0] is sums and pending[1] is first
    reduce.sync_reducers()
    assert not any(v is sums or v is first for v in reduce._PENDING.values())
    totals, counts = sums.compute()
    assert counts.tolist() == [2, 2] and totals["x"].tolist() == [[2.0, 2.0], [4.0, 4.0]]
    assert first.compute()["x"].tolist() == [[0.0, 0.0], [1.0, 1.0]]


def test_a_pass_that_fails_leaves_no_layer_hooks_and_no_banks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception in the middle of the evaluation pass (the third batch): the memory-mapped banks' folder is gone
    and no layer tap is left hooked on the network. The taps stayed hooked: every later forward of the model (a
    second `trainer.test`, the user's own) kept appending Gram maps to a list nothing read any more."""
    from helpers import compose_config

    from ood.methods.base import OODMethod
    from ood.train import build

    overrides = ["detectors.names=[gram]", "trainer.enable_progress_bar=false", "logger=none", "callbacks=none",
                 f"evaluation.bank_dir={tmp_path / 'banks'}", "data.eval_batch_size=16"]
    model, datamodule, trainer, evaluation = build(compose_config(tmp_path / "run", overrides))
    step = OODMethod.test_step

    def failing(self: OODMethod, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        if batch_idx == 2:
            raise RuntimeError("a batch failed")
        return step(self, batch, batch_idx, dataloader_idx)

    monkeypatch.setattr(OODMethod, "test_step", failing)
    with pytest.raises(RuntimeError, match="a batch failed"):
        trainer.test(model, datamodule=datamodule, verbose=False)
    assert not list((tmp_path / "banks").iterdir())
    assert not [m for m in model.modules() if m._forward_hooks]


def test_limit_test_batches_allocates_only_the_rows_its_batches_can_hold(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`trainer.limit_test_batches=2` at 16 rows a batch: rank 0 allocates 32 rows of each split, not its dataset
    length (a GPU smoke test of ImageNet allocated the whole 15.6 GB fit bank on the device for 2 batches), and the
    banks are the same: the first 32 rows of every split. Under DDP the unshuffled sampler reads rows rank-major
    (bound 2 x 16 x world); a shuffled sampler may read any row (the dataset length)."""
    from helpers import compose_config
    from torch.utils.data import DataLoader, RandomSampler

    import ood.evaluation.callback as callback_module
    from ood.train import build

    sizes: list[int] = []

    class Spy(RankZeroRows):
        def __init__(self, size: int, *args: Any, **kwargs: Any) -> None:
            sizes.append(size)
            super().__init__(size, *args, **kwargs)

    monkeypatch.setattr(callback_module, "RankZeroRows", Spy)
    overrides = ["detectors.names=[msp]", "trainer.enable_progress_bar=false", "logger=none", "callbacks=none",
                 "data.eval_batch_size=16", "+trainer.limit_test_batches=2", "~evaluation.sinks.results",
                 "~evaluation.sinks.table", "~evaluation.sinks.wandb"]
    model, datamodule, trainer, evaluation = build(compose_config(tmp_path, overrides))
    trainer.test(model, datamodule=datamodule, verbose=False)
    assert sizes == [32] * len(datamodule.eval_splits)
    assert evaluation.result is not None and evaluation.result.samples
    assert all(s.index == list(range(32)) for s in evaluation.result.samples.values())
    from ood.evaluation.callback import split_rows

    data = range(100)
    assert split_rows(DataLoader(data, batch_size=16, sampler=DistributedSampler(data, 3, 2, shuffle=False)), 2) == 96
    assert split_rows(DataLoader(data, batch_size=16, sampler=DistributedSampler(data, 3, 0, shuffle=False)), 3) == 100
    assert split_rows(DataLoader(data, batch_size=16, sampler=DistributedSampler(data, 3, 0, shuffle=True)), 2) == 100
    assert split_rows(DataLoader(data, batch_size=16, sampler=RandomSampler(data)), 2) == 100
    assert split_rows(DataLoader(data, batch_size=16), float("inf")) == 100


#: (dataset rows, rows a batch, batches read: None all, bank_dir): uneven shards (7 on 3 ranks: 3 + 3 + 3, two
#: padding rows), a split smaller than the world (2 rows: rank 2 holds only padding), `limit_test_batches` (one batch)
THREE_RANKS = [(7, 2, None, False), (7, 2, None, True), (7, 2, 1, True), (2, 1, None, False), (13, 3, 1, False)]


def _three_ranks(rank: int, init: str, out: str) -> None:
    collector_module.SEND_BYTES = 2 * D * 2  # 2-row messages
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=3)
    group = rank_zero_group()
    got = []
    for case, (n, batch, limit, mapped) in enumerate(THREE_RANKS):
        data = _data()
        shard = torch.tensor(list(DistributedSampler(range(n), num_replicas=3, rank=rank, shuffle=False)))
        rows = RankZeroRows(n, out_dir=Path(out) / str(case) if mapped else None)
        for index in list(shard.split(batch))[:limit]:  # every rank's own value: which rank's row was kept
            rows.update(index=index, **{k: v[index] + rank if k != "labels" else v[index] for k, v in data.items()})
        result = rows.gather(group)
        if result is not None:
            got.append({k: v.tolist() for k, v in result.items()})
    release_group(group)
    if rank == 0:
        Path(out, "got.json").write_text(json.dumps(got))
    dist.destroy_process_group()


@pytest.mark.slow
def test_three_gloo_ranks_give_the_rows_the_first_rank_had(tmp_path: Path) -> None:
    """Rank 0 gets each dataset row once, sorted, from the first rank (in rank order) whose batches had it, the rows
    no batch read left out, in RAM and memory-mapped: as the deduplicated rank-major concatenation."""
    start_ranks(_three_ranks, (f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=3)
    got, data = json.loads((tmp_path / "got.json").read_text()), _data()
    for (n, batch, limit, _), result in zip(THREE_RANKS, got, strict=True):
        first: dict[int, int] = {}  # dataset row -> the first rank whose batches had it
        for r in range(3):
            shard = torch.tensor(list(DistributedSampler(range(n), num_replicas=3, rank=r, shuffle=False)))
            for index in list(shard.split(batch))[:limit]:
                for i in index.tolist():
                    first.setdefault(i, r)
        rows = sorted(first)
        assert result["index"] == rows
        for key, value in data.items():
            bump = torch.tensor([first[i] for i in rows]).to(value.dtype)[:, None] if key != "labels" else 0
            assert result[key] == (value[rows] + bump).tolist(), (n, key)


def test_bank_dir_expands_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`bank_dir="~/banks"` (Python, or a quoted override) is the home folder's `banks/`: it made a folder named `~`
    in the working directory and wrote the banks there."""
    from ood.evaluation.callback import OODEvaluation
    from ood.evaluation.evaluator import Evaluator

    monkeypatch.setenv("HOME", str(tmp_path))
    assert OODEvaluation(Evaluator(["msp"]), bank_dir="~/banks").bank_dir == tmp_path / "banks"
