"""(f) End-to-end evaluation: ours (one cached pass per split, shared grids) vs OpenOOD's way (a full forward pass
per postprocessor and per tuning grid point), on the same trained model, data, detectors and grids.

Data: a fabricated CIFAR-10-shaped OpenOOD tree (`benchmarks.fabricate.cifar_tree`, 32 px): ID train / val / test,
validation OOD (`val_tin`), six test OOD sets (OpenOOD v1.5's near cifar100, tin; far mnist, svhn, texture,
places365). Model: the small CNN trained briefly with CE (CPU-sized). Detectors: every registered detector that
OpenOOD v1.5 also has (`OPENOOD`), hyper-parameters tuned on ID val vs validation OOD over each detector's grid
(OpenOOD's `postprocessor_sweep` grids, declared by the detectors).

- ours: `trainer.test` of the evaluation callback (`detectors.names=OPENOOD`, `tune=true`): one pass over every
  split into the feature cache; every detector fits, tunes and scores from it (ODIN and GradNorm alone re-run the
  network, ODIN's whole grid per batch).
- OpenOOD's way (read in Jingkang50/OpenOOD `openood/evaluation_api/evaluator.py`: `Evaluator.__init__` calls
  `postprocessor.setup` (one pass over ID train for the postprocessors that fit), `hyperparam_search` sets each
  grid point and runs `postprocessor.inference` on ID val and on validation OOD, `eval_ood` runs it on ID test and
  every OOD set; one `Evaluator` per postprocessor): transcribed in `openood_way` with our detectors doing the
  arithmetic, so that both sides compute the same numbers and differ only in how often the network runs. Each
  postprocessor's scores are checked equal to ours (AUROC per OOD set to 1e-6) before the times are compared.

Both sides keep their results in memory: no files, tables or metric logging (ood's sinks are switched off; logging
~600 metrics through Lightning's `self.log` alone costs seconds at this size).
Reported: wall time of each from one run (single thread recommended: `--threads 1`), their ratio (target >= 10x)
and the network passes each made (images through the network / images in one pass over every split).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_digits import compose_run
from benchmarks.common import Timing
from benchmarks.fabricate import cifar_tree
from ood.detectors import build_detector, detector_class
from ood.detectors.base import Detector, DetectorNotApplicable
from ood.evaluation.scoring import grid_points, with_data_facts
from ood.features.bank import FeatureBank
from ood.metrics import ood_metrics
from ood.train import build

#: ood's detectors that OpenOOD v1.5 also has (openood/postprocessors/<name>_postprocessor.py: base = msp, ebo =
#: energy, temp_scaling, kl_matching = klm, mds = mahalanobis, ...); entropy has no OpenOOD counterpart
OPENOOD = ["msp", "tempscale", "odin", "energy", "maxlogit", "gen", "klm", "mahalanobis", "rmds", "knn", "vim",
           "react", "dice", "ash", "scale", "she", "gradnorm", "fdbd", "nci", "nnguide"]
NO_ODIN = [n for n in OPENOOD if n != "odin"]
QUIET = ["trainer.enable_progress_bar=false", "logger=none", "callbacks=none", "+trainer.num_sanity_val_steps=0",
         "+trainer.limit_val_batches=0", "~evaluation.sinks.results", "~evaluation.sinks.table", "~evaluation.sinks.wandb",
         "~evaluation.sinks.metrics"]


class Counter:
    """Images through the network (a forward hook on the final linear layer) and full loader runs."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.images = 0
        self.loader_runs = 0
        self._hook = module.register_forward_hook(lambda _m, inp, _o: self._add(inp[0].shape[0]))

    def _add(self, n: int) -> None:
        self.images += n

    def remove(self) -> None:
        self._hook.remove()


def bank_pass(method: Any, loader: torch.utils.data.DataLoader, counter: Counter) -> FeatureBank:
    """One full forward pass over `loader` (OpenOOD's `postprocessor.inference` / `setup` loop)."""
    counter.loader_runs += 1
    parts: dict[str, list[torch.Tensor]] = {"logits": [], "features": [], "labels": []}
    extras: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for batch in loader:
            out = method.backbone.run(batch.x, method.cache_layers)
            parts["logits"].append(out.logits)
            parts["features"].append(out.features)
            parts["labels"].append(batch.y)
            for k, v in out.layers.items():
                extras.setdefault(k, []).append(v)
    weight, bias = method.linear_head()
    return FeatureBank(torch.cat(parts["logits"]), torch.cat(parts["features"]), torch.cat(parts["labels"]),
                       weight.detach(), bias.detach(), {k: torch.cat(v) for k, v in extras.items()})


def input_pass(det: Detector, method: Any, loader: torch.utils.data.DataLoader, counter: Counter) -> torch.Tensor:
    """One pass of an input-perturbing detector (ODIN, GradNorm) over `loader`, gradients on."""
    counter.loader_runs += 1
    with torch.enable_grad():
        return torch.cat([det.score_inputs(method, batch.x).detach() for batch in loader])


def openood_way(method: Any, loaders: Mapping[str, torch.utils.data.DataLoader], names: Sequence[str],
                params: Mapping[str, Mapping[str, Any]], tests: Sequence[str], counter: Counter,
                cost: dict[str, tuple[float, int]]) -> dict[str, dict[str, torch.Tensor]]:
    """Per postprocessor: setup (a pass over its fit split when it fits), then per grid point a pass over ID val
    and one over validation OOD, then a pass over ID test and every OOD set. Returns test scores per detector and
    fills `cost` with its (seconds, images through the network)."""
    out = {}
    for name in names:
        start, images = time.perf_counter(), counter.images
        cls = detector_class(name)
        fixed = dict(params.get(name, {}))
        fits = cls.fit is not Detector.fit
        fit_bank = bank_pass(method, loaders[cls.fit_split], counter) if fits else None

        def make(point: Mapping[str, Any], name: str = name, fixed: dict = fixed, fits: bool = fits,
                 fit_bank: FeatureBank | None = fit_bank) -> Detector:
            det = build_detector(name, **fixed, **point)
            return det.fit(fit_bank) if fits else det  # fitting reuses setup's features: no network pass

        def scores(det: Detector, split: str, cls: type = cls) -> torch.Tensor:
            if cls.needs_model:
                return input_pass(det, method, loaders[split], counter)
            return det.score(bank_pass(method, loaders[split], counter))

        points = grid_points({k: v for k, v in cls.grid.items() if k not in fixed})
        chosen: Mapping[str, Any] = points[0] if points else {}
        if len(points) > 1:  # APS mode: Evaluator.hyperparam_search
            best = None
            for point in points:
                try:
                    det = make(point)
                except DetectorNotApplicable:
                    continue
                auroc = ood_metrics(scores(det, "val"), scores(det, "val_ood"))["auroc"]
                if best is None or auroc > best:
                    best, chosen = auroc, point
        try:
            det = make(chosen)
        except DetectorNotApplicable:
            continue
        out[name] = {split: scores(det, split) for split in tests}
        cost[name] = (time.perf_counter() - start, counter.images - images)
    return out


def run(size: int = 256, epochs: int = 2) -> tuple[list[Timing], str]:
    """Train once; evaluate our way with every detector and with every detector but ODIN, and OpenOOD's way (timed
    per postprocessor); check equal AUROCs; the timing rows and a table of passes."""
    work = Path(tempfile.mkdtemp(prefix="ood-bench-e2e-"))
    tree = cifar_tree(work / "data", n_train=2 * size, n_val=size // 2, n_test=size, n_ood=size // 2)
    overrides = ["data=cifar10", f"paths.data_dir={tree}", "backbone=small_cnn", f"trainer.max_epochs={epochs}",
                 "data.num_workers=0", "data.pin_memory=false", "data.batch_size=64", "data.eval_batch_size=128",
                 "detectors.tune=true", *QUIET]
    method, datamodule, trainer, _ = build(compose_run(work / "run", [*overrides, "detectors=none", "evaluate=false"]))
    trainer.fit(method, datamodule=datamodule)
    method.eval()

    counter = Counter(method.backbone.fc)
    ours: dict[str, tuple[float, int, dict]] = {}
    for group, names in (("every detector", OPENOOD), ("every detector but odin", NO_ODIN)):
        _, _, trainer, evaluation = build(compose_run(work / group.replace(" ", "_"), [*overrides, f"detectors.names=[{','.join(names)}]"]))
        counter.images = 0
        start = time.perf_counter()
        trainer.test(method, datamodule=datamodule, verbose=False)
        ours[group] = (time.perf_counter() - start, counter.images,
                       {(r["detector"], r["ood_dataset"]): r["auroc"] for r in evaluation.rows})

    splits = datamodule.eval_splits
    loaders = dict(zip([s.name for s in splits], datamodule.test_dataloader()))
    one_pass = sum(len(loader.dataset) for loader in loaders.values())
    tests = [s.name for s in splits if s.role in ("id_test", "ood")]
    params = with_data_facts(OPENOOD, {}, {"input_std": datamodule.benchmark.input_std})
    method.eval()
    counter.images = 0
    cost: dict[str, tuple[float, int]] = {}
    theirs = openood_way(method, loaders, OPENOOD, params, tests, counter, cost)
    counter.remove()

    worst = 0.0
    rows = ours["every detector"][2]
    for name, per in theirs.items():
        for split in tests[1:]:
            auroc = ood_metrics(per[tests[0]].double(), per[split].double())["auroc"]
            worst = max(worst, abs(auroc - rows[(name, split)]))
    assert worst <= 1e-6, f"OpenOOD's way and ours disagree: max AUROC difference {worst}"
    assert set(theirs) == {d for d, _ in rows if d in OPENOOD}, "different detectors ran"
    timings, lines = [], [
        "| detectors | ours (s) | OpenOOD's way (s) | speed-up | ours: passes over every split | OpenOOD's way: passes |",
        "|---|---:|---:|---:|---:|---:|"]
    for group, names in (("every detector", OPENOOD), ("every detector but odin", NO_ODIN), ("odin alone", ["odin"])):
        if group == "odin alone":
            mine_s, mine_images = (ours["every detector"][0] - ours["every detector but odin"][0],
                                   ours["every detector"][1] - ours["every detector but odin"][1])
        else:
            mine_s, mine_images = ours[group][:2]
        their_s = sum(cost[n][0] for n in names if n in cost)
        their_images = sum(cost[n][1] for n in names if n in cost)
        if group != "odin alone":
            timings.append(Timing(f"(f) end-to-end evaluation, {group} ({sum(n in theirs for n in names)} tuned on val OOD, "
                                  f"{one_pass:,} images a pass)", mine_s, their_s, 0.1, "OpenOOD's way"))
        lines.append(f"| {group} | {mine_s:.1f} | {their_s:.1f} | {their_s / mine_s:.1f}x | {mine_images / one_pass:.2f} | "
                     f"{their_images / one_pass:.2f} |")
    lines.append(f"\nOpenOOD's way ran {counter.loader_runs} loader passes; AUROCs equal to ours (max difference "
                 f"{worst:.1e}) for {len(theirs)} detectors; odin alone = the difference of the two runs of ours")
    return timings, "\n".join(lines)
