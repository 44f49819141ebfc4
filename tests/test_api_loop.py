"""`ood.evaluate` called inside a researcher's own training: a rank of their DDP training (its process group)."""

from __future__ import annotations

import json
import multiprocessing
import socket
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import NO_FIGURES, make_image_folders
from torch import nn

import ood
from ood.errors import ConfigError
from ood.runs import failures


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _training_rank(rank: int, port: int, root: str, every_rank: bool = False) -> None:
    """A rank of the caller's DDP training: rank 0 evaluates alone (`if trainer.is_global_zero:`), or each rank into
    the same `output_dir` (`every_rank`: a `ModelCheckpoint` monitoring its numbers), rank 1 a little later (its run
    starts once rank 0's call returned, and goes on once rank 0 read its results back), then the ranks meet at the training's next collective."""
    torch.set_num_threads(1)  # a child forked after the parent's OpenMP pool ran waits for its threads forever
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=20))
    flags = Path(root)
    if every_rank and rank == 1:
        start = failures.clear_failure

        def later(folder: Path) -> failures.Started:  # rank 1's run starts (clears its folder) as rank 0 is done
            _wait_for(flags / "evaluated0")
            started = start(folder)
            (flags / "started1").touch()
            _wait_for(flags / "done0")
            return started

        failures.clear_failure = later
    try:
        if rank == 0 or every_rank:
            torch.manual_seed(0)
            net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
            folders = Path(root) / "data"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                results = ood.evaluate(net, folders / "id", [folders / "checkers"], detectors="msp", image_size=32,
                                       resize=32, device="cpu", output_dir=Path(root) / "run", overrides=[NO_FIGURES])
            if every_rank and rank == 0:
                (flags / "evaluated0").touch()
                _wait_for(flags / "started1")
            try:
                saved = str(results.save(flags / f"saved{rank}"))
                again = ood.Results.from_dir(results.run_dir).rows
            except ConfigError as err:
                saved, again = str(err), []
            (flags / f"done{rank}").touch()
            (flags / f"rank{rank}.json").write_text(json.dumps({
                "rows": results.rows, "again": again, "saved": saved, "run_dir": str(results.run_dir),
                "warnings": [str(w.message) for w in caught]}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _wait_for(flag: Path) -> None:
    """Until the other rank leaves `flag` (20 s at most: then the test's checks say what went wrong)."""
    for _ in range(400):
        if flag.exists():
            return
        time.sleep(0.05)


def _run_ranks(root: Path, every_rank: bool) -> list[int | None]:
    """Run the caller's two training ranks (forked: this process's imports, no start-up to pay); their exit codes."""
    make_image_folders(root / "data", train=2, test=1, ood=2)
    fork = multiprocessing.get_context("fork")
    port = _free_port()
    ranks = [fork.Process(target=_training_rank, args=(rank, port, str(root), every_rank)) for rank in range(2)]
    for process in ranks:
        process.start()
    try:
        for process in ranks:
            process.join(60)
    finally:
        for process in ranks:
            process.kill()  # a rank still waiting
    return [process.exitcode for process in ranks]


def test_evaluate_on_rank_zero_of_a_callers_ddp_training(tmp_path: Path) -> None:
    """The call's one-process evaluation took the caller's process group for its own: called on rank 0 alone
    (`if trainer.is_global_zero:`) it waited for the other rank in Lightning's `prepare_data` barrier and for its
    rows, while that rank sat in the training's next collective: a deadlock (here until the group's timeout). It now
    evaluates alone, every image, and the ranks meet again, without Lightning's advice to sync its logged metrics
    over the caller's ranks (a dozen lines)."""
    assert _run_ranks(tmp_path, every_rank=False) == [0, 0]
    got = json.loads((tmp_path / "rank0.json").read_text())
    assert [(r["detector"], r["n_id"], r["n_ood"]) for r in got["rows"]] == [("msp", 3, 2)]
    assert [w for w in got["warnings"] if "sync_dist" in w] == []


def test_evaluate_on_every_rank_into_one_output_dir(tmp_path: Path) -> None:
    """Every rank of the caller's training called with one `output_dir` (for a `ModelCheckpoint` monitoring its
    numbers on each rank): each cleared the folder as its run started, so rank 0, done first, found its results
    removed by rank 1's start ("holds no results.jsonl: the evaluation did not finish"). Global rank 0 alone writes the
    folder now, the other rank a temporary one; each rank gets the same rows."""
    assert _run_ranks(tmp_path, every_rank=True) == [0, 0]
    got = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [(r["detector"], r["n_id"], r["n_ood"]) for r in got[0]["rows"]] == [("msp", 3, 2)]
    assert got[0]["saved"] == str(tmp_path / "saved0") and got[1]["saved"] == str(tmp_path / "saved1")
    assert got[0]["again"] == got[0]["rows"] == got[1]["rows"] == got[1]["again"]
    assert got[0]["run_dir"] == str(tmp_path / "run") != got[1]["run_dir"]
    assert ood.Results.from_dir(tmp_path / "run").rows == got[0]["rows"]
