"""`ood.features.passes.forward_dataset`: dataset order and labels, eval mode restored, no gradients, device/dtype,
the global random state untouched, and the DDP-sharded pass equal to the one-process pass on every rank."""

from __future__ import annotations

import copy
import ctypes
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import start_ranks
from torch import nn
from torch.utils.data import TensorDataset

from ood.features.passes import forward_dataset


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    with torch.no_grad():
        net[1].running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        net[1].running_var.copy_(torch.tensor([1.5, 0.5, 2.0, 1.0]))
    return net


def _data(n: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=gen), torch.arange(n) % 3


def test_outputs_in_order_with_labels_eval_mode_restored_and_no_grad() -> None:
    net, (x, y) = _net(), _data()
    net.train()
    net[1].eval()  # a frozen part stays in eval mode after the pass, the rest back in train mode
    out = forward_dataset(lambda b: {"logits": net(b), "double": 2 * b}, TensorDataset(x, y), module=net, batch_size=4)
    expected = copy.deepcopy(net).eval()(x)  # eval mode: BatchNorm running statistics, no dropout
    assert sorted(out) == ["double", "labels", "logits"]
    torch.testing.assert_close(out["logits"], expected.detach(), rtol=0, atol=1e-6)
    assert torch.equal(out["double"], 2 * x) and torch.equal(out["labels"], y)
    assert not out["logits"].requires_grad
    assert net.training and net[0].training and not net[1].training and net[2].training


def test_index_items_bare_tensors_and_dtype() -> None:
    """`(x, y, index)` items keep labels; a bare tensor dataset and a one-tensor `fn` give `outputs`; inputs take
    the module's dtype."""
    x, y = _data(5)
    items = [(x[i], int(y[i]), i) for i in range(5)]
    out = forward_dataset(lambda b: b.sum(1), items, batch_size=2)
    assert torch.equal(out["outputs"], x.sum(1)) and out["labels"].tolist() == y.tolist()
    net = _net().double()
    bare = forward_dataset(lambda b: b * 1, x, module=net, batch_size=3)
    assert bare["outputs"].dtype == torch.float64 and "labels" not in bare
    assert torch.equal(bare["outputs"], x.double())


def test_global_random_state_untouched() -> None:
    """A pass (whose DataLoader draws a base seed, and whose `fn` draws numbers) leaves torch, NumPy and Python's
    global random streams where they were."""
    x, y = _data()

    def noisy(b: torch.Tensor) -> torch.Tensor:
        np.random.rand()
        random.random()
        return b + torch.rand_like(b)

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    forward_dataset(noisy, TensorDataset(x, y), batch_size=4)
    after = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(after[0], expected[0]) and np.array_equal(after[1], expected[1]) and after[2] == expected[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        net, (x, y) = _net(), _data()
        seen = []

        def fn(b: torch.Tensor) -> dict[str, torch.Tensor]:
            seen.append(len(b))
            return {"logits": net(b)}

        out = forward_dataset(fn, TensorDataset(x, y), module=net, batch_size=3, distributed=True)
        # a pass each rank runs in full, whatever the process group (methods' fit-time passes): no exchange
        alone = forward_dataset(lambda b: {"logits": net(b)}, TensorDataset(x, y), module=net, batch_size=3)
        torch.save({"out": out, "seen": sum(seen), "alone": alone}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_pass_equals_one_process_on_every_rank(tmp_path: Path) -> None:
    start_ranks(_rank, (_free_port(), str(tmp_path)))
    net, (x, y) = _net(), _data()
    single = forward_dataset(lambda b: {"logits": net(b)}, TensorDataset(x, y), module=net, batch_size=3)
    seen = []
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        seen.append(got["seen"])
        assert torch.equal(got["out"]["labels"], single["labels"])
        torch.testing.assert_close(got["out"]["logits"], single["logits"], rtol=0, atol=1e-6)
        assert torch.equal(got["alone"]["logits"], single["logits"]) and torch.equal(got["alone"]["labels"], y)
    assert seen == [6, 5]  # each rank ran its own shard only


ROWS, WIDTH = 40_000, 1024  # a 160 MB result (float32)


def _status_mb(field: str) -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _memory_rank(rank: int, port: int, out_dir: str) -> None:
    import ood.features.collector as collector_module

    collector_module.SEND_BYTES = 4 * 2**20
    # as in a process that has freed a large block before (glibc then raises its mmap threshold, up to 32 MB): the
    # batches live on the heap, and their pages stayed resident once sent (rank 1: 1.55x); set, not left to the
    # test order, which made it pass or fail by what the worker had run before
    ctypes.CDLL(None).mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rows = torch.arange(ROWS)
        wide = lambda b: {"outputs": b[:, None].float().expand(-1, WIDTH).clone()}  # noqa: E731
        forward_dataset(wide, rows[:8], batch_size=4, distributed=True)  # first use of the code paths: not the result's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) starts afresh from the current resident size
        base = _status_mb("VmRSS")
        out = forward_dataset(wide, rows, batch_size=500, distributed=True)["outputs"]
        peak = _status_mb("VmHWM") - base
        assert torch.equal(out[:, 0], rows.float())
        Path(out_dir, f"{rank}.json").write_text(str(peak))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_distributed_pass_is_never_held_twice(tmp_path: Path) -> None:
    """Peak memory of a 2-rank pass over 40 000 rows x 1024 floats, from its first batch to the result on both ranks:
    about the result (rank 0 writes its rows into place and the other rank's as they come, then sends them in
    messages; rank 1 sends its shard, then fills its result message by message). Before, every rank received every
    shard, concatenated them and copied the deduplicated rows (torchmetrics' sync): about 3x; and while each message
    came into a buffer of its own, rank 1 peaked at 1.12x-1.33x by the load on the machine (now 1.03x)."""
    start_ranks(_memory_rank, (_free_port(), str(tmp_path)))
    result_mb = ROWS * WIDTH * 4 / 2**20
    for rank in range(2):
        peak = float((tmp_path / f"{rank}.json").read_text())
        assert 0.9 * result_mb < peak < 1.15 * result_mb, (rank, peak, result_mb)


def test_a_rank_frees_its_sent_rows_where_the_process_cannot_be_opened_as_a_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """`return_freed_memory` opened the process with `ctypes.CDLL(None)`, which Windows' LoadLibrary refuses with a
    TypeError: a rank that sent its rows (gloo) failed there; it does nothing, as on a C library without
    `malloc_trim` (musl, macOS)."""
    import ood.features.collector as collector_module

    def windows_cdll(name: object) -> object:
        raise TypeError(f"LoadLibrary() argument 1 must be str, not {type(name).__name__}")

    monkeypatch.setattr(collector_module.ctypes, "CDLL", windows_cdll)
    assert collector_module.return_freed_memory() is None


def test_an_empty_dataset_is_one_line() -> None:
    """A pass over no items (an empty folder handed to `ood.extract`) stopped on an assertion about DDP ranks."""
    from ood.errors import DataNotFoundError

    with pytest.raises(DataNotFoundError, match=r"^extract: the dataset has no items$"):
        forward_dataset(lambda b: b, TensorDataset(torch.zeros(0, 2)), batch_size=2, desc="extract")


def test_a_cpu_receiver_takes_each_message_into_its_own_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """`broadcast_rows` on a rank other than 0, result on the CPU: every message goes straight into the result's rows
    (a view of them is what gloo fills), no buffer per message (those split the heap's free space: rank 1 peaked at
    up to 1.33x the result, `test_a_distributed_pass_is_never_held_twice`); the rows arrive in order, whole."""
    import ood.features.collector as collector_module

    rows = torch.arange(10 * 3, dtype=torch.float32).view(10, 3)
    monkeypatch.setattr(collector_module, "SEND_BYTES", 4 * 3 * 4)  # 4 rows a message: 3 messages
    monkeypatch.setattr(collector_module, "in_distributed_run", lambda: True)
    monkeypatch.setattr(collector_module, "broadcast_from_rank_zero", lambda obj, group=None: {"f": ((10, 3), torch.float32)})
    sent: list[torch.Tensor] = []

    def broadcast(message: torch.Tensor, src: int, group: object = None) -> None:
        start = sum(len(m) for m in sent)
        message.copy_(rows[start : start + len(message)])
        sent.append(message)

    monkeypatch.setattr(collector_module.dist, "broadcast", broadcast)
    out = collector_module.broadcast_rows(None, "cpu")["f"]
    assert torch.equal(out, rows) and [len(m) for m in sent] == [4, 4, 2]
    assert [m.data_ptr() for m in sent] == [out[i].data_ptr() for i in (0, 4, 8)]  # the result's own rows


class _BadAt2(torch.utils.data.Dataset):
    """Items `(x, y)`, the third one unreadable (as a corrupt image file)."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i == 2:
            raise ValueError("unreadable item 2")
        return torch.full((3,), float(i)), i % 2


def test_a_workers_error_ends_the_workers_before_it_reaches_the_caller() -> None:
    """An error raised in a DataLoader worker leaves the pass with the workers already ended. Left to the garbage
    collector (the error's traceback holds the loader's iterator in a reference cycle), torch's shutdown found the
    queue to the workers closed and waited 5 s for each before killing it: a pause wherever the collector next ran
    (after an `ood.extract` of a folder with a corrupt image)."""
    import multiprocessing

    with pytest.raises(ValueError, match="unreadable item 2"):
        forward_dataset(lambda x: x.sum(1), _BadAt2(), module=_net(), batch_size=1, num_workers=1)
    assert multiprocessing.active_children() == []


def test_a_persistent_loaders_workers_outlive_an_interrupted_pass() -> None:
    """`loader_batches` ends a loader's workers with the pass, except a persistent loader's (the evaluation's split
    loaders, which ODIN's extra passes read again): ended there, its next pass failed on a closed queue. They end
    with the loader."""
    import multiprocessing

    from torch.utils.data import DataLoader

    from ood.utils import loader_batches

    loader = DataLoader(TensorDataset(torch.arange(12.0)), batch_size=2, num_workers=1, persistent_workers=True)
    with pytest.raises(KeyError), loader_batches(loader) as batches:
        next(batches)
        raise KeyError("stopped in the pass")
    workers = multiprocessing.active_children()
    with loader_batches(loader) as batches:
        assert torch.cat([x for (x,) in batches]).tolist() == list(range(12))
    assert len(workers) == 1 and multiprocessing.active_children() == workers
    del loader, batches  # the loader's end ends them (no other test here sees them)
    assert multiprocessing.active_children() == []
