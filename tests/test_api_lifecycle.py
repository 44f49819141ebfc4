"""`ood.evaluate` / `ood.extract` called again and again in one long process (a notebook, every few epochs of the
caller's training), with DataLoader workers, some calls failing in the pass: what each call leaves behind."""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import NO_FIGURES, make_image_folders
from hydra.core.global_hydra import GlobalHydra
from torch import nn

import ood
from ood.data.hygiene import BadImageError

pytestmark = pytest.mark.usefixtures("no_figures")

SIZE = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny folder tree for the module, and an OOD folder with an unreadable image beside it."""
    paths = make_image_folders(tmp_path_factory.mktemp("lifecycle"), classes=2, train=2, test=2, ood=4, size=SIZE)
    paths["corrupt"] = paths["far"].parent / "corrupt"
    shutil.copytree(paths["far"], paths["corrupt"])
    (paths["corrupt"] / "1.png").write_bytes(b"not a png")
    return paths


@pytest.fixture
def own_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The `ood-eval-*` temporary folders made in a folder of the test's (other processes make theirs in /tmp)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).train()


def _evaluate(net: nn.Module, ood_data: Any, **kwargs: Any) -> ood.Results:
    return ood.evaluate(net, ood_data=ood_data, detectors="msp", image_size=SIZE, resize=SIZE, device="cpu",
                        batch_size=2, num_workers=2, overrides=[NO_FIGURES], **kwargs)


def _process_state(net: nn.Module) -> dict[str, Any]:
    """What a call must put back: the environment, logging and warnings set-up, torch's threads, Hydra's global
    state, SIGINT's handler, the caller's model (hooks, modes, requires_grad)."""
    loggers = [logging.getLogger(name) for name in ("", "ood", "lightning", "lightning.pytorch")]
    return {
        "environ": dict(os.environ),
        "handlers": [list(logger.handlers) for logger in loggers],
        "levels": [logger.level for logger in loggers],
        "warnings": list(warnings.filters),
        "torch_threads": torch.get_num_threads(),
        "hydra": GlobalHydra.instance().is_initialized(),
        "sigint": signal.getsignal(signal.SIGINT),
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in net.modules()),
        "modes": [m.training for m in net.modules()],
        "requires_grad": [p.requires_grad for p in net.parameters()],
    }


def _resources() -> tuple[int, int]:
    """(open file descriptors, threads) once a closed DataLoader queue's feeder thread had 1 s to end."""
    gc.collect()
    deadline = time.monotonic() + 1.0
    while True:
        now = (len(os.listdir("/proc/self/fd")), threading.active_count())
        if time.monotonic() > deadline or not any(t.name == "QueueFeederThread" for t in threading.enumerate()):
            return now
        time.sleep(0.05)


def test_repeated_calls_with_workers_leave_the_process_as_it_was(folders: dict[str, Path], own_tempdir: Path) -> None:
    """Four `evaluate` calls and two `extract` calls with num_workers=2: no worker, file descriptor or thread left,
    and the process state as before the first call (Lightning's deterministic mode left `CUBLAS_WORKSPACE_CONFIG`
    set in the caller's environment). The first call may start tqdm's monitor thread, once a process."""
    net = _net()
    before = _process_state(net)
    rows = _evaluate(net, [folders["far"]], id_data=folders["id"]).rows
    resources = _resources()
    for _ in range(3):
        assert _evaluate(net, [folders["far"]], id_data=folders["id"]).rows == rows
    alone = ood.extract(net, folders["id"] / "test", image_size=SIZE, resize=SIZE, batch_size=2, num_workers=0)
    for _ in range(2):  # the workers' logits are the main process's, image by image
        bank = ood.extract(net, folders["id"] / "test", image_size=SIZE, resize=SIZE, batch_size=2, num_workers=2)
        assert torch.equal(bank.logits, alone.logits) and torch.equal(bank.labels, alone.labels)
    assert multiprocessing.active_children() == []
    assert _resources() == resources
    assert _process_state(net) == before


def _ctrl_c_at_second_batch(net: nn.Module) -> None:
    """A Ctrl-C reaching the caller's process in the pass, its DataLoader workers running: KeyboardInterrupt raised
    from the network's second forward call (a hook of the caller's, removed as it fires)."""
    calls = []

    def hook(module: nn.Module, args: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            handle.remove()
            raise KeyboardInterrupt

    handle = net.register_forward_pre_hook(hook)


@pytest.mark.parametrize("failure", ["corrupt image", "ctrl-c"])
def test_a_call_failing_in_the_pass_leaves_no_worker_and_no_temporary_folder(
    folders: dict[str, Path], own_tempdir: Path, failure: str
) -> None:
    """A call failing in the pass with num_workers=2 (an unreadable image; a Ctrl-C): once the exception is caught,
    before any garbage collection, no worker is alive and no `ood-eval-*` temporary folder is left (each failed call
    of a session left one, with its FAILED.txt, until the process ended); the next call works."""
    net = _net()
    ood_data, error = [folders["corrupt" if failure == "corrupt image" else "far"]], BadImageError
    if failure == "ctrl-c":
        _ctrl_c_at_second_batch(net)
        error = KeyboardInterrupt
    gc.disable()
    try:
        with pytest.raises(error):
            _evaluate(net, ood_data, id_data=folders["id"])
        assert multiprocessing.active_children() == []
    finally:
        gc.enable()
    assert list(own_tempdir.glob("ood-eval-*")) == []
    results = _evaluate(net, [folders["far"]], id_data=folders["id"])
    assert [r["ood_dataset"] for r in results.rows] == ["checkers"]
    assert [p.name for p in own_tempdir.glob("ood-eval-*")] == [results.run_dir.name]


def test_extract_failing_in_the_pass_leaves_no_worker(folders: dict[str, Path]) -> None:
    """`extract` over a folder with an unreadable image, num_workers=2: no worker alive once the error is caught
    (before any garbage collection), none of its hooks on the caller's network; the next call works."""
    net = _net()
    before = _process_state(net)
    gc.disable()
    try:
        with pytest.raises(BadImageError):
            ood.extract(net, folders["corrupt"], image_size=SIZE, resize=SIZE, batch_size=2, num_workers=2,
                        taps="combood")
        assert multiprocessing.active_children() == []
    finally:
        gc.enable()
    assert _process_state(net) == before
    bank = ood.extract(net, folders["far"], image_size=SIZE, resize=SIZE, batch_size=2, num_workers=2)
    alone = ood.extract(net, folders["far"], image_size=SIZE, resize=SIZE, batch_size=2, num_workers=0)
    assert len(bank.logits) == 4 and torch.equal(bank.logits, alone.logits)
