"""The shared DDP-exact reducers (`ood.features.reduce`): sums and first-n samples equal the single-process ones
when Lightning's distributed sampler pads ranks with duplicates."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler

from ood.features.reduce import ClassSums, FirstN

C = 3


def test_class_sums_and_first_n_with_ddp_padding_equal_single_process() -> None:
    n, world = 21, 4  # 21 samples on 4 ranks: 3 padded duplicates (indices 0, 1, 2), each a rank's last sample
    gen = torch.Generator().manual_seed(3)
    maps, feats = torch.randn(n, 2, 3, 3, generator=gen), torch.randn(n, 5, generator=gen)
    logits, labels = torch.randn(n, C, generator=gen), torch.arange(n) % C

    def run(indices: list[int], batch: int) -> tuple[ClassSums, FirstN]:
        sums, first = ClassSums(C, dtypes={"features": torch.float64}), FirstN(6, ["maps", "logits"])
        for chunk in torch.tensor(indices).split(batch):
            sums.update(chunk, labels[chunk], maps=maps[chunk], features=feats[chunk])
            first.update(index=chunk, maps=maps[chunk], logits=logits[chunk])
        return sums, first

    single_sums, single_counts = run(list(range(n)), 2)[0].compute()
    ranks = [run(list(DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False)), 2) for r in range(world)]
    assert sum(len(list(DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False))) for r in range(world)) == 24
    merged, first = ranks[0]
    for sums, other_first in ranks[1:]:
        merged.merge(sums)
        first.merge_state(other_first)
    ddp_sums, ddp_counts = merged.compute()
    assert torch.equal(ddp_counts, single_counts) and ddp_counts.tolist() == [7, 7, 7]
    assert ddp_sums["features"].dtype == torch.float64 and ddp_sums["maps"].dtype == torch.float32
    torch.testing.assert_close(ddp_sums["maps"], single_sums["maps"])
    torch.testing.assert_close(ddp_sums["features"], torch.zeros(C, 5, dtype=torch.float64).index_add(0, labels, feats.double()))
    kept = first.compute()
    assert torch.equal(kept["index"], torch.arange(6))
    assert torch.equal(kept["maps"], maps[:6]) and torch.equal(kept["logits"], logits[:6])


def test_class_sums_of_an_evaluation_alone_exchange_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ood.evaluate` in one rank of a caller's DDP training runs inside `collector.alone()`; GROOD's prototype sums
    (`ClassSums`) still synced over the caller's process group, so a call on rank 0 alone waited for the other
    ranks. Inside `alone()` they are this process's own."""
    import torch.distributed as dist

    from ood.features.collector import alone

    def exchange(*args: object, **kwargs: object) -> None:
        raise AssertionError("exchanged with the caller's ranks")

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *args, **kwargs: 2)
    for name in ("all_gather", "all_gather_object", "all_reduce", "broadcast", "barrier"):
        monkeypatch.setattr(dist, name, exchange)
    sums = ClassSums(2, dtypes={"features": torch.float64})
    sums.update(torch.arange(4), torch.tensor([0, 1, 1, 0]), features=torch.arange(8.0).reshape(4, 2))
    with alone():
        got, counts = sums.compute()
    torch.testing.assert_close(got["features"], torch.tensor([[6.0, 8.0], [6.0, 8.0]], dtype=torch.float64))
    assert counts.tolist() == [2, 2]
