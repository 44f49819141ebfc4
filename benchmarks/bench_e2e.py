"""(f) End-to-end evaluation: ours (one cached pass per split, shared grids) vs OpenOOD's way (a full forward pass
per postprocessor and per tuning grid point), on the same trained model, data, detectors and grids.

Data: a fabricated CIFAR-10-shaped OpenOOD tree (`benchmarks.fabricate.cifar_tree`, 32 px): ID train / val / test,
validation OOD (`val_tin`), six test OOD sets (OpenOOD v1.5's near cifar100, tin; far mnist, svhn, texture,
places365). Model: the small CNN trained briefly with CE (CPU-sized). Detectors: every registered detector that
OpenOOD v1.5 also has (`OPENOOD`, the README's key mapping), hyper-parameters tuned on ID val vs validation OOD over
each detector's grid (OpenOOD's `postprocessor_sweep` grids, declared by the detectors).

- ours: `trainer.test` of the evaluation callback (`detectors.names=...`, `tune=true`): one pass over every split
  into the feature cache (with the layer taps gram and mds_ensemble read); every cache-scored detector fits, tunes
  and scores from it. The network-pass detectors (`needs_model`: odin, iodin, rankfeat, adascale_a/l,
  mds_ensemble, mcdropout) re-run the network, each scoring its whole grid from one run over ID val and validation
  OOD (`score_inputs_grid`), then all of them together in one run over every test split at their chosen points,
  where ODIN and i-ODIN share the forward pass and input gradient, AdaSCALE-A and -L their two passes, and
  mds_ensemble the AdaSCALEs' clean pass.
- OpenOOD's way (read in Jingkang50/OpenOOD `openood/evaluation_api/evaluator.py`: `Evaluator.__init__` calls
  `postprocessor.setup` (one pass over the fit split for the postprocessors that fit), `hyperparam_search` sets each
  grid point and runs `postprocessor.inference` on ID val and on validation OOD, `eval_ood` runs it on ID test and
  every OOD set; one `Evaluator` per postprocessor): transcribed in `openood_way` with our detectors doing the
  arithmetic, so that both sides compute the same numbers and differ only in how often the network runs. Input
  gradients cost what OpenOOD's `.backward()` costs (parameter gradients too: `parameter_gradients`); OpenOOD's
  ODIN also runs its perturbed forward with autograd on, which is not copied, so that time is a lower bound. Each
  postprocessor's scores are checked equal to ours (AUROC per OOD set to 1e-6) before the times are compared.

Ours runs three times: the cache-scored detectors alone, those plus ODIN, and every detector; the ODIN and
network-pass rows are differences of those runs. Both sides keep their results in memory: no files, tables or
metric logging (ood's sinks are switched off; logging ~1000 metrics through Lightning's `self.log` alone costs
seconds at this size). Reported: wall time of each (single thread recommended: `--threads 1`), their ratio
(target >= 10x) and the network passes each made (images through the network / images in one pass over every
split). Why the network-pass rows cannot reach 10x: every test image needs its own input gradient at the chosen
point (a forward, a backward and a perturbed forward that no cache can replace), so sharing only removes the
per-grid-point repeats on the validation splits.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import sklearn.mixture  # noqa: F401 - its one-time import (0.3-0.7 s, at gmm's first fit) outside both timed spans
import torch

from benchmarks.bench_digits import compose_run
from benchmarks.common import Timing, scratch_dir
from benchmarks.fabricate import cifar_tree
from ood.detectors import build_detector, detector_class
from ood.detectors.base import Detector, DetectorNotApplicable
from ood.detectors.network import FitInputs, LayerTaps, ModelFitted
from ood.evaluation.scoring import JointInputs, grid_points, with_data_facts
from ood.features.bank import FeatureBank
from ood.metrics import auroc_pairs, ood_metrics
from ood.train import build

#: ood's detectors that OpenOOD v1.5 also has (the README's mapping of `evaluation_api/postprocessor.py` keys: base =
#: msp, mls = maxlogit, ebo = energy, temp_scaling = tempscale, mds = mahalanobis, dropout = mcdropout, ...; grood
#: is a method here). mcdropout is skipped on both sides when the network has no dropout.
OPENOOD = ["msp", "maxlogit", "energy", "tempscale", "odin", "iodin", "gen", "klm", "openmax", "mahalanobis",
           "rmds", "mds_ensemble", "gmm", "vim", "residual", "knn", "nnguide", "she", "relation", "fdbd", "nci",
           "cfood", "gram", "react", "ash", "dice", "scale", "rankfeat", "vra", "adascale_a", "adascale_l",
           "gradnorm", "mcdropout"]
CACHED = [n for n in OPENOOD if not detector_class(n).needs_model]
NETWORK = [n for n in OPENOOD if detector_class(n).needs_model]
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


def bank_pass(method: Any, loader: torch.utils.data.DataLoader, counter: Counter, name: str) -> FeatureBank:
    """One full forward pass over `loader` (OpenOOD's `postprocessor.inference` / `setup` loop), with the layer maps
    detector `name` reads (its taps) hooked during the pass."""
    counter.loader_runs += 1
    parts: dict[str, list[torch.Tensor]] = {"logits": [], "features": [], "labels": []}
    extras: dict[str, list[torch.Tensor]] = {}
    taps = LayerTaps(method, [name])
    try:
        with torch.no_grad():
            for batch in loader:
                out = method.backbone.run(batch.x, method.cache_layers)
                parts["logits"].append(out.logits)
                parts["features"].append(out.features)
                parts["labels"].append(batch.y)
                for k, v in {**out.layers, **taps.pop()}.items():
                    extras.setdefault(k, []).append(v)
    finally:
        taps.remove()
    weight, bias = method.linear_head()
    return FeatureBank(torch.cat(parts["logits"]), torch.cat(parts["features"]), torch.cat(parts["labels"]),
                       weight.detach(), bias.detach(), {k: torch.cat(v) for k, v in extras.items()})


@contextmanager
def parameter_gradients(model: torch.nn.Module) -> Iterator[None]:
    """Input gradients at OpenOOD's cost. Its network-pass postprocessors (odin, adascale, mds_ensemble) call
    `.backward()`, which also computes (and accumulates) every parameter's gradient; our detectors call
    `torch.autograd.grad(loss, x)`, which skips those. Inside this context `torch.autograd.grad` also asks for the
    parameters' gradients (and drops them), so OpenOOD's way pays what OpenOOD pays; the input gradients, and so the
    scores, are unchanged."""
    params = [p for p in model.parameters() if p.requires_grad]
    original = torch.autograd.grad

    def grad(outputs: Any, inputs: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        kwargs["allow_unused"] = True
        return original(outputs, [*inputs, *params], *args, **kwargs)[: len(inputs)]

    torch.autograd.grad = grad
    try:
        yield
    finally:
        torch.autograd.grad = original


def input_pass(det: Detector, method: Any, loader: torch.utils.data.DataLoader, counter: Counter) -> torch.Tensor:
    """One pass of a network-pass detector over `loader`, gradients on, parameter gradients computed as OpenOOD's
    `.backward()` computes them."""
    counter.loader_runs += 1
    with torch.enable_grad(), parameter_gradients(method):
        return torch.cat([det.score_inputs(method, batch.x).detach() for batch in loader])


def dropped_points(make: Any, points: Sequence[Mapping[str, Any]], fit_bank: FeatureBank) -> set[int]:
    """The grid points ours' tuning drops (its detector's `score_grid` gives None: knn's k beyond the fit rows),
    probed on an empty bank. OpenOOD keeps them, but its faiss search pads such a k with distance 3.4e38, one score
    for every image (AUROC 0.5), which is chosen only where every point that applies does worse; ours never chooses
    them, and both sides must choose alike for their AUROCs to be compared."""
    probe = make(points[0])
    if type(probe).score_grid is Detector.score_grid:  # the base form scores every point
        return set()
    score_params = type(probe).score_params
    settings = [{k: v for k, v in p.items() if k in score_params} for p in points]
    empty = fit_bank.subset(torch.arange(0, device=fit_bank.logits.device))
    return {i for i, s in enumerate(probe.score_grid(empty, settings)) if s is None}


def openood_way(method: Any, loaders: Mapping[str, torch.utils.data.DataLoader], names: Sequence[str],
                params: Mapping[str, Mapping[str, Any]], tests: Sequence[str], counter: Counter,
                cost: dict[str, tuple[float, int]], chosen_detectors: dict[str, Detector]) -> dict[str, dict[str, torch.Tensor]]:
    """Per postprocessor: setup (a pass over its fit split when it fits: a feature pass, or a pass with gradients for
    the detectors fitted from network passes), then per grid point a pass over ID val and one over validation OOD,
    then a pass over ID test and every OOD set. Returns test scores per detector and fills `cost` with its
    (seconds, images through the network) and `chosen_detectors` with the fitted detector at its chosen point."""
    out = {}
    for name in names:
        start, images = time.perf_counter(), counter.images
        cls = detector_class(name)
        fixed = dict(params.get(name, {}))
        try:
            if issubclass(cls, ModelFitted):  # OpenOOD's setup: one loop with gradients over the fit split
                stats = input_pass(FitInputs(build_detector(name, **fixed)), method, loaders[cls.fit_split], counter)
                fit_bank = None
            elif cls.fit is not Detector.fit:
                stats, fit_bank = None, bank_pass(method, loaders[cls.fit_split], counter, name)
            else:
                stats = fit_bank = None
        except DetectorNotApplicable:
            continue

        def make(point: Mapping[str, Any], name: str = name, fixed: dict = fixed, cls: type = cls,
                 stats: torch.Tensor | None = stats, fit_bank: FeatureBank | None = fit_bank) -> Detector:
            det = build_detector(name, **fixed, **point)  # fitting reuses setup's pass: no network pass
            if stats is not None:
                return det.fit_inputs(fit_bank, stats)  # these detectors fit from the statistics alone
            return det.fit(fit_bank) if fit_bank is not None else det

        def scores(det: Detector, split: str, cls: type = cls, name: str = name) -> torch.Tensor:
            if cls.needs_model:
                return input_pass(det, method, loaders[split], counter)
            return det.score(bank_pass(method, loaders[split], counter, name))

        points = grid_points({k: v for k, v in cls.grid.items() if k not in fixed})
        chosen: Mapping[str, Any] = points[0] if points else {}
        if len(points) > 1:  # APS mode: Evaluator.hyperparam_search
            dropped = dropped_points(make, points, fit_bank) if fit_bank is not None else set()
            best = None
            for i, point in enumerate(points):
                try:
                    det = make(point)
                except DetectorNotApplicable:
                    continue
                val, val_ood = scores(det, "val"), scores(det, "val_ood")  # passes OpenOOD runs for every point
                if i in dropped:
                    continue
                auroc = auroc_pairs(val, val_ood)  # OpenOOD's `auroc > max_auroc`, equal AUROCs compared exactly as ours
                if best is None or auroc > best:
                    best, chosen = auroc, point
        try:
            det = make(chosen)
        except DetectorNotApplicable:
            continue
        out[name] = {split: scores(det, split) for split in tests}
        cost[name] = (time.perf_counter() - start, counter.images - images)
        chosen_detectors[name] = det
    return out


def per_image_cost(method: Any, x: torch.Tensor, dets: Mapping[str, Detector], repeats: int = 2) -> dict[str, float]:
    """Seconds of each network-pass detector's `score_inputs` on the batch `x`, alone and all of them together
    (`JointInputs`, key "together"), in no-gradient forward passes of the same batch (best of `repeats`)."""

    def best(fn: Any) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.no_grad():
        forward = best(lambda: method(x))
    with torch.enable_grad():
        cost = {name: best(lambda det=det: det.score_inputs(method, x)) / forward for name, det in dets.items()}
        cost["together"] = best(lambda: JointInputs(list(dets.values())).score_inputs(method, x)) / forward
    return cost


def run(size: int = 256, epochs: int = 2, backbone: str = "small_cnn") -> tuple[list[Timing], str]:
    """Train `backbone` once; evaluate our way with the cache-scored detectors, with those and ODIN, and with every
    detector, and OpenOOD's way (timed per postprocessor); check equal AUROCs; the timing rows and a table of
    passes."""
    work = scratch_dir("ood-bench-e2e-")
    tree = cifar_tree(work / "data", n_train=2 * size, n_val=size // 2, n_test=size, n_ood=size // 2)
    overrides = ["data=cifar10", f"paths.data_dir={tree}", f"backbone={backbone}", f"trainer.max_epochs={epochs}",
                 "data.num_workers=0", "data.pin_memory=false", "data.batch_size=64", "data.eval_batch_size=128",
                 "detectors.tune=true", *QUIET]
    method, datamodule, trainer, _ = build(compose_run(work / "run", [*overrides, "detectors=none", "evaluate=false"]))
    trainer.fit(method, datamodule=datamodule)
    method.eval()

    counter = Counter(method.backbone.fc)
    runs = {"cache-scored": CACHED, "cache-scored + odin": [*CACHED, "odin"], "every detector": OPENOOD}
    ours: dict[str, tuple[float, int, dict]] = {}
    for group, names in runs.items():
        _, _, trainer, evaluation = build(compose_run(work / group.replace(" ", "_").replace("+", "and"),
                                                      [*overrides, f"detectors.names=[{','.join(names)}]"]))
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
    chosen: dict[str, Detector] = {}
    theirs = openood_way(method, loaders, OPENOOD, params, tests, counter, cost, chosen)
    counter.remove()
    batch = next(iter(loaders[tests[0]])).x[:64]
    per_image = per_image_cost(method, batch, {n: chosen[n] for n in NETWORK if n in chosen})

    worst = 0.0
    rows = ours["every detector"][2]
    for name, per in theirs.items():
        for split in tests[1:]:
            auroc = ood_metrics(per[tests[0]].double(), per[split].double())["auroc"]
            worst = max(worst, abs(auroc - rows[(name, split)]))
    assert worst <= 1e-6, f"OpenOOD's way and ours disagree: max AUROC difference {worst}"
    assert set(theirs) == {d for d, _ in rows if d in OPENOOD}, "different detectors ran"

    def mine(group: str) -> tuple[float, int]:
        if group in ours:
            return ours[group][:2]
        plus = "cache-scored + odin" if group == "odin alone" else "every detector"
        return ours[plus][0] - ours["cache-scored"][0], ours[plus][1] - ours["cache-scored"][1]

    groups = {"cache-scored": CACHED, "odin alone": ["odin"], "network-pass": NETWORK, "every detector": OPENOOD}
    timings, lines = [], [
        f"{backbone}, {one_pass:,} images a pass:",
        "",
        "| detectors | ran | ours (s) | OpenOOD's way (s) | speed-up | ours: passes over every split | "
        "OpenOOD's way: passes |", "|---|---:|---:|---:|---:|---:|---:|"]
    for group, names in groups.items():
        mine_s, mine_images = mine(group)
        ran = [n for n in names if n in cost]
        their_s, their_images = sum(cost[n][0] for n in ran), sum(cost[n][1] for n in ran)
        if group in ("cache-scored", "every detector"):
            what = "every detector" if group == "every detector" else f"{group} detectors"
            task = f"(f) end-to-end evaluation, {backbone}, {what} ({len(ran)} tuned on val OOD, {one_pass:,} images a pass)"
            timings.append(Timing(task, mine_s, their_s, 0.1, "OpenOOD's way"))
        lines.append(f"| {group} | {len(ran)} | {mine_s:.1f} | {their_s:.1f} | {their_s / mine_s:.1f}x | "
                     f"{mine_images / one_pass:.2f} | {their_images / one_pass:.2f} |")
    lines += ["", "Per network-pass detector: OpenOOD's way (ours scores each grid from one run per split), and the cost of "
              f"scoring one test image at the chosen point (a batch of {len(batch)}, in forward passes without "
              "gradients), each detector alone and all together (one joint run: shared forward and gradients):", "",
              "| detector | grid points | OpenOOD's way (s) | passes | test image (forwards) |", "|---|---:|---:|---:|---:|"]
    for name in NETWORK:
        if name in cost:
            points = len(grid_points(detector_class(name).grid))
            lines.append(f"| {name} | {points} | {cost[name][0]:.1f} | {cost[name][1] / one_pass:.2f} | "
                         f"{per_image[name]:.1f} |")
    alone = sum(v for k, v in per_image.items() if k != "together")
    lines.append(f"| all, alone / together | | | | {alone:.1f} / {per_image['together']:.1f} |")
    skipped = sorted(set(OPENOOD) - set(theirs))
    not_applicable = f"; not applicable on this network: {skipped}" if skipped else ""
    lines.append(f"\nOpenOOD's way ran {counter.loader_runs} loader passes; AUROCs equal to ours (max difference "
                 f"{worst:.1e}) for {len(theirs)} detectors{not_applicable}; the odin and network-pass rows of ours "
                 "are differences of its runs")
    return timings, "\n".join(lines)
