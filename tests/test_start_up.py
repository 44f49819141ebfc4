"""Entry points that start fast: importing `ood.train`, `ood.eval` (what `ood-train` / `ood-eval` do before Hydra
starts: `--help`, a config error, a sweep's launcher) and `ood.report` (`ood-report`) imports neither torch nor
Lightning, which cost every such process 4-5 s of CPU; a job imports them as it starts. ood's rank-zero loggers
(`ood.utils.get_logger`) read Lightning's rank at each call, rank 0 before Lightning is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from lightning_utilities.core.rank_zero import rank_zero_only

from ood.utils import RANK_VARIABLES, get_logger

#: imports `sys.argv[1:]`, logs one warning through `get_logger`, prints the heavy packages then imported
PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
from ood.utils import get_logger
get_logger("probe").warning("logged on rank 0")
print(json.dumps(sorted({m.partition(".")[0] for m in sys.modules} & {"torch", "lightning", "torchvision"})))
"""


@pytest.mark.parametrize("modules", [["ood.train", "ood.eval"], ["ood.report"]])
def test_entry_point_modules_import_neither_torch_nor_lightning(modules: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    assert proc.stderr == "logged on rank 0\n"  # no launcher's rank in the environment: rank 0


@pytest.mark.parametrize(("variable", "logged"), [("SLURM_PROCID", ""), ("RANK", ""), (None, "logged on rank 0\n")])
def test_a_launchers_rank_is_known_before_lightning_is_imported(variable: str | None, logged: str) -> None:
    """When `ood.utils` imported Lightning, Lightning read the rank a launcher gives each task (SLURM's several tasks a
    node, torchrun) as ood started; without that import every task logged as rank 0 until its job began (e.g.
    `ood-eval`'s "evaluating <ckpt> with ..., as asked", once a task)."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES} | ({variable: "1"} if variable else {})
    proc = subprocess.run([sys.executable, "-c", PROBE, "ood.eval"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [] and proc.stderr == logged


def test_rank_zero_logger_reads_lightnings_rank_at_each_call(monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    log = get_logger("ood.test_start_up")
    caplog.set_level("INFO", logger="ood.test_start_up")
    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    log.warning("rank 1")
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    log.warning("rank 0")
    assert [r.getMessage() for r in caplog.records] == ["rank 0"]


def test_fork_server_preloads_what_a_run_imports() -> None:
    """`trainer=ddp_cpu`'s ranks fork from a server that imported what a run imports (`ood.train` alone no longer
    does): each rank would import torch, Lightning and ood again, seconds per rank and stage."""
    from ood.strategies import FORKSERVER_PRELOAD
    from ood.train import RUN_MODULES

    assert set(RUN_MODULES) <= set(FORKSERVER_PRELOAD)
