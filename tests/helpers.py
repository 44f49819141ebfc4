"""Compose-API helpers shared by the tests (no subprocess): build a config as `ood-train` would and run it; a
stand-in for a DDP rank process."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from ood import CONFIG_DIR

# A quick digits run: few epochs, no checkpoint/progress clutter, CSV logger into the run folder.
FAST = ["trainer.max_epochs=4", "trainer.enable_progress_bar=false"]
# No ROC / histogram figures (1-3 s of each CPU evaluation) in a run whose test reads no figure; an override, not a
# monkeypatch, so that it reaches DDP ranks and entry-point subprocesses
NO_FIGURES = "evaluation.sinks.results.figures=false"


def compose_config(output_dir: Path, overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose `conf/<config_name>.yaml` with `overrides`, Hydra runtime set, outputs under `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


def run_config(output_dir: Path, overrides: Sequence[str] = (), config_name: str = "train") -> list[dict[str, Any]]:
    """Compose and run (`ood.train.run`); returns the result rows."""
    from ood.train import run

    return run(compose_config(output_dir, overrides, config_name))


def fit_detector(name: Any, params: Any, banks: Any, tune: bool, model_scores: Any = None) -> tuple[Any, bool]:
    """`ood.evaluation.scoring.tune_detector` without the validation scores: the fitted detector and whether a
    search happened."""
    from ood.evaluation.scoring import tune_detector

    return tune_detector(name, params, banks, tune, model_scores)[:2]


def rows_by(rows: Sequence[dict[str, Any]], detector: str) -> dict[str, dict[str, Any]]:
    """Rows of one detector keyed by OOD set name."""
    return {r["ood_dataset"]: r for r in rows if r["detector"] == detector}


def histogram_bars(ax: Any) -> dict[str, Any]:
    """The histograms drawn on a matplotlib axes (`histtype="stepfilled"`: one polygon each) as {label: (bin
    edges, heights)}: the polygon's top runs (e_0, h_0), (e_1, h_0), (e_1, h_1), ... (e_n, h_{n-1})."""
    from matplotlib.patches import Polygon

    out = {}
    for patch in (p for p in ax.patches if isinstance(p, Polygon)):  # not a bar chart's rectangles
        xy = patch.get_xy()
        n = (len(xy) - 1) // 4  # up the left side, along the top (2 points a bin), back along the bottom
        out[patch.get_label()] = (xy[0 : 2 * n + 1 : 2, 0], xy[1 : 2 * n : 2, 1])
    return out


def make_image_folders(
    root: Path, classes: int = 3, train: int = 8, test: int = 4, ood: int = 6, size: int = 32, seed: int = 0
) -> dict[str, Path]:
    """Fabricated PNG folders: `root/id/{train,test}/c<k>/*.png` (class k: a bright colour channel k % 3 with
    noise), `root/noise/*.png` (mid-grey noise, returned as `near`) and `root/checkers/*.png` (checkerboards,
    returned as `far`). Returns the paths."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)

    def save(path: Path, pixels: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)

    for split, n in (("train", train), ("test", test)):
        for k in range(classes):
            for i in range(n):
                img = rng.normal(60, 30, (size, size, 3))
                img[..., k % 3] += 150 + 20 * (k // 3)
                save(root / "id" / split / f"c{k}" / f"{i}.png", img)
    for i in range(ood):
        save(root / "noise" / f"{i}.png", rng.normal(128, 40, (size, size, 3)))
        tiles = (np.indices((size, size)).sum(0) // (2 + i % 4)) % 2
        save(root / "checkers" / f"{i}.png", np.repeat(tiles[..., None] * 255.0, 3, axis=2))
    return {"id": root / "id", "near": root / "noise", "far": root / "checkers"}


def folder_overrides(root: Path) -> list[str]:
    """`data=folder` overrides for fabricated folders under `root` (`make_image_folders`), 32 px."""
    paths = make_image_folders(root / "folders", train=4, test=2, ood=2)
    return [f"data.root={paths['id']}", f"+data.ood.near={{noise: {paths['near']}}}",
            f"+data.ood.far={{checkers: {paths['far']}}}", "data.image_size=32", "data.resize=32", "data.num_workers=0"]


@contextmanager
def root_logger_kept() -> Iterator[None]:
    """The root logger's handlers and level put back after the block: an entry point run in this process (a
    multirun's jobs: Hydra's job_logging) replaces them."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def multirun_here(folder: Path, monkeypatch: pytest.MonkeyPatch, argv: Sequence[str]) -> None:
    """`ood-train -m <argv>` as `ood.train.main()` in this process, from `folder`: for a sweep whose jobs run in the
    sweep's own process (Hydra's basic launcher, Optuna's sweeper), where a subprocess only imported torch again; a
    failed job ends in SystemExit(1)."""
    from ood.train import main

    monkeypatch.chdir(folder)
    monkeypatch.setattr("sys.argv", ["ood-train", "-m", *argv])
    with root_logger_kept():
        main()


def start_ranks(fn: Callable[..., None], args: tuple = (), nprocs: int = 2) -> None:
    """`fn(rank, *args)` in `nprocs` processes started as `trainer=ddp_cpu` starts its ranks: forked by a fork server
    that imported torch, Lightning and ood once (`ood.strategies.FORKSERVER_PRELOAD`), not spawned (each spawned
    process imports them again: 5 s)."""
    import torch.multiprocessing as mp

    from ood.strategies import FORKSERVER_PRELOAD

    mp.set_forkserver_preload(FORKSERVER_PRELOAD)
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")


class StandInRank(subprocess.Popen):
    """A `sleep` process standing for a DDP rank, SIGINT's action as given: what the launcher uses of one (`pid`,
    `is_alive`, `join`)."""

    def __init__(self, on_sigint: signal.Handlers = signal.SIG_DFL) -> None:
        super().__init__(["sleep", "30"], preexec_fn=lambda: signal.signal(signal.SIGINT, on_sigint))

    def is_alive(self) -> bool:
        return self.poll() is None

    def join(self, timeout: float | None = None) -> None:
        with suppress(subprocess.TimeoutExpired):
            self.wait(timeout)


def capture_warnings_of(logger: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Make `caplog` see `logger`'s warnings whatever earlier tests in this worker left behind: its level (or an
    ancestor's) raised, the logger or an ancestor disabled (a logging config applied in-process), or Lightning's
    rank-zero gate pointed at another rank (ood's loggers emit on global rank 0 only)."""
    import logging

    from lightning.pytorch.utilities import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 0)
    for name in (logger, *[logger.rsplit(".", i)[0] for i in range(1, logger.count(".") + 1)]):
        monkeypatch.setattr(logging.getLogger(name), "disabled", False)
    caplog.set_level(logging.WARNING, logger=logger)


def doc_blocks(page: Path, language: str) -> list[str]:
    """The fenced ```<language> blocks of a docs page, in order: the tests that run a page's example take its code
    from the page itself, so the page cannot rot."""
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.S)
