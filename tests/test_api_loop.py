"""`ood.evaluate` called inside a researcher's own training: a rank of their DDP training (its process group)."""

from __future__ import annotations

import json
import multiprocessing
import socket
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import NO_FIGURES, make_image_folders
from torch import nn

import ood


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _training_rank(rank: int, port: int, root: str) -> None:
    """A rank of the caller's DDP training: rank 0 evaluates alone (`if trainer.is_global_zero:`), then the ranks
    meet at the training's next collective."""
    torch.set_num_threads(1)  # a child forked after the parent's OpenMP pool ran waits for its threads forever
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=20))
    try:
        if rank == 0:
            torch.manual_seed(0)
            net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
            folders = Path(root) / "data"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                results = ood.evaluate(net, folders / "id", [folders / "checkers"], detectors="msp", image_size=32,
                                       resize=32, device="cpu", output_dir=Path(root) / "run", overrides=[NO_FIGURES])
            (Path(root) / "rank0.json").write_text(json.dumps({"rows": results.rows,
                                                               "warnings": [str(w.message) for w in caught]}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_evaluate_on_rank_zero_of_a_callers_ddp_training(tmp_path: Path) -> None:
    """The call's one-process evaluation took the caller's process group for its own: called on rank 0 alone
    (`if trainer.is_global_zero:`) it waited for the other rank in Lightning's `prepare_data` barrier and for its
    rows, while that rank sat in the training's next collective: a deadlock (here until the group's timeout). It now
    evaluates alone, every image, and the ranks meet again, without Lightning's advice to sync its logged metrics
    over the caller's ranks (a dozen lines)."""
    make_image_folders(tmp_path / "data", train=2, test=1, ood=2)
    fork = multiprocessing.get_context("fork")  # the ranks of this process's imports: no start-up to pay
    port = _free_port()
    ranks = [fork.Process(target=_training_rank, args=(rank, port, str(tmp_path))) for rank in range(2)]
    for process in ranks:
        process.start()
    try:
        for process in ranks:
            process.join(60)
    finally:
        for process in ranks:
            process.kill()  # a rank still waiting
    assert [process.exitcode for process in ranks] == [0, 0]
    got = json.loads((tmp_path / "rank0.json").read_text())
    assert [(r["detector"], r["n_id"], r["n_ood"]) for r in got["rows"]] == [("msp", 3, 2)]
    assert [w for w in got["warnings"] if "sync_dist" in w] == []
