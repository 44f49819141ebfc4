"""Test-wide settings: no network, no wandb account, few threads (CI has 2 cores), checkpoints shared by session,
each config file's YAML parsed once.

`make test` runs the suite on 2 pytest-xdist workers: each worker then uses one thread (two workers with two
threads each on two cores slow everything down), and a trained checkpoint is made once for the whole session,
under a file lock in the directory both workers share, instead of once per worker.

Hydra parses every config file again at each compose, and the tests compose hundreds of times (`compose_config`,
entry points run in-process): `OmegaConf.load` here parses each text of ood's and Hydra's config files once per
process and hands out deep copies, so no caller can alter what a later one gets. It is keyed by the text itself, not
the path (an edited file is parsed afresh, whatever its mtime); other files (a test's own config dir, a run's
written config.yaml) are parsed as before, every time, and kept nowhere.
"""

from __future__ import annotations

import copy
import io
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import hydra
import pytest
import torch
from filelock import FileLock
from omegaconf import DictConfig, ListConfig, OmegaConf
from threadpoolctl import threadpool_limits

from ood import CONFIG_DIR

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
THREADS = 1 if WORKER else 2
os.environ["OMP_NUM_THREADS"] = str(THREADS)  # subprocesses (entry points, spawned DDP ranks) inherit it
torch.set_num_threads(THREADS)
# NumPy's and SciPy's BLAS read OMP_NUM_THREADS when they load, before this file runs: without this, scikit-learn's
# small matrix products (the gmm detector's EM: 50 products of 650 x 50 by 50 x 50 a step) ran on two BLAS threads
# beside the other worker's process, each product waiting for a descheduled thread: 4 s a digits gmm fit, not 0.2 s
threadpool_limits(THREADS)

#: the read-only config trees whose files are parsed once (ood's and Hydra's own), not the runs' written YAML
CONFIG_TREES = tuple(os.path.join(os.path.realpath(p), "") for p in (CONFIG_DIR, Path(hydra.__file__).parent))
PARSED: dict[str | bytes, DictConfig | ListConfig] = {}  # a YAML text -> its config, as OmegaConf.load made it
PARSE = OmegaConf.load


def load_parsed_once(file_: str | Path | IO[Any]) -> DictConfig | ListConfig:
    """`OmegaConf.load(file_)`: the same config and errors; a `CONFIG_TREES` file's text is parsed the first time."""
    if isinstance(file_, (str, Path)):
        with open(os.path.abspath(file_), encoding="utf-8") as f:  # as OmegaConf.load opens it
            return load_parsed_once(f)
    name = getattr(file_, "name", None)
    if not isinstance(name, str) or not os.path.realpath(name).startswith(CONFIG_TREES):
        return PARSE(file_)
    text = file_.read()
    if text not in PARSED:
        stream = io.BytesIO(text) if isinstance(text, bytes) else io.StringIO(text)
        stream.name = name  # a YAML error names the file, as it does uncached
        PARSED[text] = PARSE(stream)
    return copy.deepcopy(PARSED[text])


OmegaConf.load = staticmethod(load_parsed_once)  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _no_wandb_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "disabled"))


@pytest.fixture(autouse=True)
def _sigint_handler_kept() -> Iterator[None]:
    """SIGINT's handler put back after each test: a trainer that catches a KeyboardInterrupt outside ood's
    `ctrl_c_raised` (a test driving Lightning directly) leaves SIGINT ignored, and a later test's Ctrl-C of the
    same worker then did nothing."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


@pytest.fixture
def no_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ROC / histogram run figures (matplotlib, seconds a run) in this process, for test files whose in-process
    runs read none (`pytestmark = pytest.mark.usefixtures("no_figures")`); a DDP rank or subprocess needs
    `helpers.NO_FIGURES` instead."""
    monkeypatch.setattr("ood.evaluation.sinks.save_run_figures", lambda *args, **kwargs: None)


def shared_once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], Path]) -> Path:
    """`make(folder)` run once per test session, however many xdist workers ask: the first one makes it under a
    file lock in the temp directory the workers share, the others wait and reuse the path it returned."""
    root = tmp_path_factory.getbasetemp()
    if WORKER:
        root = root.parent
    done = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if done.is_file():
            return Path(json.loads(done.read_text()))
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        path = make(folder)
        done.write_text(json.dumps(str(path)))
        return path


@pytest.fixture(scope="session")
def ce_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CE small-CNN digits run (seed 0, 8 epochs, no evaluation) shared by every test that starts a method from
    a trained classifier (`method.init.ckpt=`): trained once per session."""
    from helpers import run_config

    def train(out: Path) -> Path:
        run_config(out, ["trainer.max_epochs=8", "trainer.enable_progress_bar=false", "evaluate=false", "logger=none"])
        return out / "checkpoints" / "last.ckpt"

    return shared_once(tmp_path_factory, "ce_init", train)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with the most `slow` tests first (stable otherwise): `make test`'s xdist workers take whole files in this
    order (`--no-loadscope-reorder`: xdist otherwise reorders files by their number of tests, which put the 25 s of
    test_train_digits.py's two tests among the last files), so the long end-to-end files start early instead of
    leaving one worker alone at the end."""
    slow: dict[str, int] = {}
    for item in items:
        slow[item.nodeid.split("::")[0]] = slow.get(item.nodeid.split("::")[0], 0) + bool(item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.nodeid.split("::")[0]])
