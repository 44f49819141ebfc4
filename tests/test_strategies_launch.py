"""`ood.strategies._SpawnLauncher` as it starts the ranks (`trainer=ddp_cpu`: the fork server): a SIGINT to the main
process while they start stops every rank already started, as one while they run does."""

from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.multiprocessing
from helpers import StandInRank, capture_warnings_of
from lightning.pytorch.plugins.environments import LightningEnvironment

from ood import strategies
from ood.strategies import DDPStrategy, _SpawnLauncher


def _two_cpu_ranks(start_method: str) -> DDPStrategy:
    return DDPStrategy(accelerator="cpu", parallel_devices=[torch.device("cpu")] * 2,
                       cluster_environment=LightningEnvironment(), start_method=start_method)


def test_sigint_while_the_ranks_start_stops_those_started(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """SIGINT to the main process alone after rank 0 started and before rank 1 did (torch's `start_processes`
    replaced): the KeyboardInterrupt came out of `start_processes` before Lightning's launcher had the rank list, so
    rank 0 was never passed the SIGINT and ran its whole stage. The SIGINT is now held until both ranks are started,
    then passed on to both, and the KeyboardInterrupt raised; SIGINT's handler is Python's again."""
    ranks: list[StandInRank] = []

    class Started:
        processes = ranks

        def join(self) -> bool:
            raise AssertionError("the launcher waited for ranks it should have interrupted")

    def start_processes(*args: object, nprocs: int, **kwargs: object) -> Started:
        for _ in range(nprocs):
            ranks.append(StandInRank())
            if len(ranks) == 1:
                os.kill(os.getpid(), signal.SIGINT)  # handled here, at the next bytecode
        return Started()

    monkeypatch.setattr(torch.multiprocessing, "start_processes", start_processes)
    monkeypatch.setenv("MASTER_PORT", "29500")  # the launch sets it
    monkeypatch.setattr(strategies, "RANK_STOP_TIMEOUT", 5.0)
    capture_warnings_of("ood.strategies", monkeypatch, caplog)
    strategy = _two_cpu_ranks("forkserver")
    # Python's own handler: a process started in the background (`make test &`) has SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            _SpawnLauncher(strategy, start_method="forkserver").launch(print)
        assert [rank.poll() for rank in ranks] == [-signal.SIGINT, -signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert [r.getMessage() for r in caplog.records if r.name == "ood.strategies"] == [
            "interrupted: SIGINT passed on to the 2 DDP ranks, waiting for them to stop"]
    finally:
        signal.signal(signal.SIGINT, previous)
        for rank in ranks:
            rank.kill()
            rank.wait()


def test_a_failed_start_gives_sigint_back_to_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """The handler that holds SIGINT while the ranks start goes when their start fails too: Ctrl-C works after."""
    def start_processes(*args: object, **kwargs: object) -> None:
        raise OSError("no fork server")

    monkeypatch.setattr(torch.multiprocessing, "start_processes", start_processes)
    monkeypatch.setenv("MASTER_PORT", "29500")
    strategy = _two_cpu_ranks("forkserver")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(OSError, match="^no fork server$"):
            _SpawnLauncher(strategy, start_method="forkserver").launch(print)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_rank_forked_from_the_main_process_is_interrupted_by_sigint(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank forked from the main process (`start_method=fork`) inherits the handler that holds SIGINT while the
    ranks start (`_HeldInterrupt`): the rank takes its SIGINT as `KeyboardInterrupt` all the same (here one rank in
    this process; Lightning's part of it replaced)."""
    monkeypatch.setattr(strategies, "_log_to", lambda *args: None)
    monkeypatch.setattr(strategies, "_end_process_group", lambda strategy: None)

    def stage(self: object, *args: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("SIGINT held in the rank")

    monkeypatch.setattr(strategies._MultiProcessingLauncher, "_wrapping_function", stage)
    strategy = _two_cpu_ranks("fork")
    previous = signal.signal(signal.SIGINT, strategies._HeldInterrupt())
    try:
        with pytest.raises(KeyboardInterrupt):
            _SpawnLauncher(strategy, start_method="fork")._wrapping_function(0)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_torchs_terminating_line_is_left_out_of_a_sigterm_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped by SIGTERM printed, besides its one line, torch's "Terminating process N via signal SIGTERM":
    the first rank to exit 143 makes torch's `ProcessContext.join` terminate the other, which had the SIGTERM too.
    Left out while a SIGTERM stops the run; kept when a rank failed otherwise (torch then stops the others itself)."""
    import logging

    records = []
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    monkeypatch.setattr(spawn_log, "callHandlers", records.append)  # what passes the logger's filters

    def join_after(stopped: bool) -> None:
        monkeypatch.setattr(strategies, "sigterm_received", lambda: stopped)
        with strategies._quiet_torch_terminations():
            spawn_log.warning("Terminating process %s via signal SIGTERM", 12345)

    join_after(True)
    assert records == []
    join_after(False)
    assert [r.getMessage() for r in records] == ["Terminating process 12345 via signal SIGTERM"]
    assert spawn_log.filters == []
