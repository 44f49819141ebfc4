"""(d) training time per epoch of every method (`conf/method/*.yaml`: new methods enrol themselves) vs CE on digits.

Each method is fitted for `epochs` epochs from the same CE checkpoint (`method.init.ckpt`), with no evaluation; a
callback times every training epoch and the median over epochs after the first (warm-up, one-time setup such as
prototype searches or teacher caches excluded) is the method's per-epoch time. Methods run alternately
`repeats` times; the table gives the median and the ratio to CE. The target column is informational (2x).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from lightning import Callback

from benchmarks.bench_digits import QUIET, compose_run
from benchmarks.common import Timing, scratch_dir
from ood import CONFIG_DIR
from ood.train import build


class EpochTimer(Callback):
    """Wall time of every training epoch."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: object, pl_module: object) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: object, pl_module: object) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def _epoch_seconds(name: str, init: Path, workdir: Path, epochs: int) -> float:
    cfg = compose_run(workdir / name, [*QUIET, f"method={name}", f"method.init.ckpt={init}", f"trainer.max_epochs={epochs}",
                                       "detectors=none", "evaluate=false"])
    method, datamodule, trainer, _ = build(cfg)
    method.apply_init()
    timer = EpochTimer()
    trainer.callbacks.append(timer)
    trainer.fit(method, datamodule=datamodule)
    return statistics.median(timer.seconds[1:] or timer.seconds)


def run(epochs: int, repeats: int) -> list[Timing]:
    """Per-epoch training time of each method relative to `ce`."""
    workdir = scratch_dir("ood-bench-train-")
    method, datamodule, trainer, _ = build(compose_run(workdir / "init", [*QUIET, "trainer.max_epochs=2", "detectors=none"]))
    trainer.fit(method, datamodule=datamodule)
    init = workdir / "init.ckpt"
    trainer.save_checkpoint(init)
    names = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))
    per_epoch: dict[str, list[float]] = {n: [] for n in names}
    for r in range(max(repeats, 1)):  # 0 (a smoke run): once
        for name in names if r % 2 == 0 else reversed(names):
            per_epoch[name].append(_epoch_seconds(name, init, workdir / f"r{r}", epochs))
    ce = statistics.median(per_epoch["ce"])
    return [
        Timing(f"(d) digits training, one epoch of method={n}", statistics.median(s), ce, 2.0, "method=ce")
        for n, s in per_epoch.items() if n != "ce"
    ]
