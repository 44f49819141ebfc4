"""Rank-0 gathering of evaluation banks (`ood.features.collector.gather_to_rank_zero`) and memory-mapped banks.

Under 2-process gloo DDP with Lightning's padded sampler, rank 0 receives the deduplicated, index-sorted rows (the
single-process result exactly) and rank 1 gets nothing back, holding only its own shard; memory-mapped banks give
the in-RAM detector scores exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import start_ranks
from torch.utils.data import DistributedSampler

import ood.features.collector as collector_module
from ood.detectors import build_detector
from ood.features.bank import FeatureBank
from ood.features.collector import SplitCollector, gather_to_rank_zero, rank_zero_group, release_group

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


def _collect(indices: list[int]) -> SplitCollector:
    data, c = _data(), SplitCollector(["features", "logits", "labels"])
    for chunk in torch.tensor(indices).split(4):
        c.update(index=chunk, **{k: v[chunk] for k, v in data.items()})
    return c


def _rank(rank: int, world: int, init: str, out: str) -> None:
    collector_module.SEND_BYTES = 3 * D * 2  # 3-row messages (a spawned child does not inherit a monkeypatch)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    collector = _collect(list(DistributedSampler(range(N), num_replicas=world, rank=rank, shuffle=False)))
    own = len(collector.local()["index"])
    group = rank_zero_group()
    in_ram = gather_to_rank_zero(collector.local(), group=group)
    mapped = gather_to_rank_zero(collector.local(), Path(out) / "banks", group=group)
    all_gathered = len(collector.compute()["index"])  # the torchmetrics sync: every rank receives every row
    release_group(group)
    report = {"own": own, "received": None if in_ram is None else len(in_ram["index"]), "all_gathered": all_gathered}
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


def test_single_process_gather_equals_the_collector_sync(tmp_path: Path) -> None:
    order = [5, 3, 0, 1, 2, 4, *range(6, N), 0, 7]  # any order, with duplicates
    c = _collect(order)
    expected = c.compute()
    for out_dir in (None, tmp_path):
        got = gather_to_rank_zero(c.local(), out_dir)
        assert got is not None and got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)


@pytest.mark.parametrize("name, kwargs", [("mahalanobis", {}), ("rmds", {}), ("vim", {"dim": 3}), ("knn", {"k": 4})])
def test_memory_mapped_banks_score_exactly_as_in_ram(name: str, kwargs: dict, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(C, D, generator=gen), torch.randn(C, generator=gen)

    def bank(n: int, out_dir: Path | None) -> FeatureBank:
        h = torch.randn(n, D, generator=torch.Generator().manual_seed(n)) + torch.arange(n)[:, None] % C
        rows = {"index": torch.arange(n), "features": h, "logits": h @ w.T + b, "labels": torch.arange(n) % C}
        data = gather_to_rank_zero(rows, out_dir)
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
