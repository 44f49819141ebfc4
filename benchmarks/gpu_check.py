"""`make gpu-check` (`python -m benchmarks.gpu_check [--out gpu_check.json] [--dry-run]`): does every CUDA path of ood
run, and run right, on this machine's GPU? No downloads: synthetic data at CIFAR (32 px) and ImageNet (224 px) shapes
in OpenOOD's on-disk layout (`benchmarks.fabricate`), sized to finish within 8 minutes on one current GPU (an
estimate, not yet timed on one; inductor's first builds for the fp16 + compile check are the least certain part).
Exits 1 when any check fails, after writing every figure to the JSON file and printing the tables. The JSON file is
written after every section (`complete` false until the last): a run stopped at a time limit keeps what it finished.

Run it on any CUDA machine:

    git clone <this repository> && cd ood && make install          # torch with CUDA, as pyproject pins it
    .venv/bin/pip uninstall -y faiss-cpu                            # optional: both wheels write the same `faiss`
    .venv/bin/pip install faiss-gpu-cu12                            # package; faiss' GPU wheels (CUDA 12;
                                                                    # faiss-gpu-cu11 for CUDA 11): without them
                                                                    # the faiss GPU index row is skipped (ood's
                                                                    # exact searches run in torch on the GPU)
    make gpu-check                                                  # = .venv/bin/python -m benchmarks.gpu_check

A later `make install` after a change to pyproject.toml puts faiss-cpu back: repeat the two pip lines then.
On a CUDA machine without internet whose image has PyTorch, Lightning, torchmetrics, scikit-learn, pandas and
matplotlib: `make gpu-wheels` on a machine with internet (wheels of hydra-core, omegaconf, antlr4 and faiss-cpu into
`.whl/`), then there `python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and
`PYTHONPATH=/tmp/site:. python3 -m benchmarks.gpu_check` (faiss-cpu: the faiss GPU index row is skipped).

Checks (each a row of the JSON's `checks`, `ok` true/false):
1. methods: every `conf/method/*.yaml` (new methods enrol themselves) trains one short epoch and evaluates with
   `trainer=gpu` (fp32) and with `trainer=gpu_fast` (bf16 autocast, channels_last): every training loss finite,
   and the fp32-trained model's scores evaluated in bf16 agree with its fp32 scores: Spearman rank correlation
   per detector over the test splits (ID test + every OOD set) >= `RHO_MIN` (0.99; bf16 keeps 8 mantissa bits,
   so near-ties may swap but the order stays), except for a detector whose fp32 scores span less than one bf16 step
   of their magnitude (`BF16_STEP`; its spread reported in `narrower_than_bf16`: bf16 cannot order them, whatever
   the code does). The bf16 evaluation uses the hyper-parameters the fp32 one tuned. Both run every detector but
   gmm, whose fit is scikit-learn's EM on the CPU (no CUDA path), run for the first method only; the model trained with
   `gpu_fast` is evaluated with `detectors=fast` (its finite losses are its check).
   fp16 + compile: CE and supervised-contrastive cluster (manual optimisation) train and evaluate with `gpu_fast` in
   fp16 (Lightning's GradScaler, as GPUs without bf16 need) and `torch.compile` (inductor): finite losses, optimiser
   steps taken through the scaler, the sub-modules compiled, finite scores of every detector (`detectors.names=[all,
   gram_stream]`: the network passes and layer hooks run the compiled modules eagerly).
2. faiss: the kNN detector (k = 50, 50 000 train x 10 000 test rows of 512-d features) and GROOD's gradient bank (1-NN
   of `ncp_gradient`s) searched on the GPU, by faiss' GPU index (where faiss-gpu is installed, else a row marked
   skipped, `ok` null, which does not fail the run) and by the torch search (`ood.neighbors`: what ood runs on CUDA
   without faiss-gpu), return the same neighbours as faiss' exact CPU index (the same neighbour
   sets for >= 99.9 % of queries, a row only one side lists counting as a tie when its distance is within 1e-4
   relative of the other side's k-th; distances equal to 1e-4 relative: GPU and CPU sum in other orders).
3. augment: the in-memory pipeline's crop + flip (`PadCropFlip`) on the GPU equals torchvision's pad / crop /
   hflip on the CPU for the same seeded draws, bit for bit.
4. ddp: a one-GPU DDP evaluation (NCCL) gives exactly the rows of the plain one (both deterministic, cuDNN benchmark off).
5. api: `ood.evaluate` on the caller's own CUDA model (a torchvision ResNet-18 in training mode, Datasets of tensors)
   gives finite rows and hands the model back on its device and in its modes (Lightning's teardown moves the
   module it tested to the CPU); so does `ood.extract` with `device="cpu"`.
6. throughput (a table, no pass/fail): training images/s of ResNet-18 at 32 px (batch 128) and ResNet-50 at 224 px
   (batch 256), fp32 and bf16, through ood (`ood.train.build`: Lightning, our loader, our callbacks) vs a plain
   PyTorch loop over the same loader, model, optimiser and precision; the fraction of ood's step time spent
   waiting for data; evaluation images/s with the cache (one pass over every split, every cached detector).

`--dry-run` runs the same code on the CPU with tiny shapes (small CNN, a few images, `trainer=cpu` for `gpu`,
CPU bf16 / fp16 autocast for `gpu_fast`, `torch.compile`'s `aot_eager` backend for inductor, gloo for NCCL, faiss'
CPU index for the GPU one, the torch search on the CPU): the test suite runs it so that
this script cannot rot. Its numbers say nothing about a GPU, and its rank-correlation threshold is 0.95 (64 images
scored by a tiny model after one epoch; the lowest compared rho measured on the build hosts' CPU bf16 kernels: 0.994,
and 0.988 on an Intel Xeon).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import Callback
from scipy.stats import spearmanr

from benchmarks.bench_digits import compose_run
from benchmarks.fabricate import cifar_tree, imagenet_tree
from ood import CONFIG_DIR
from ood.detectors import available_detectors
from ood.files import atomic_write_text
from ood.train import build

#: Spearman rank correlation fp32 vs bf16 scores must reach, per detector
RHO_MIN = 0.99
#: bf16's step (8 mantissa bits) relative to a value's magnitude: a detector whose fp32 scores span less than one step
#: (1st to 99th percentile) cannot keep its order in bf16, and is reported, not compared (one short epoch of the
#: heatmap decoder leaves scores 8e-4 of their magnitude apart in the dry run: rho 0.86, with 2e-5 largest difference)
BF16_STEP = 2.0**-8
#: share of queries whose neighbour set must be the same on the GPU and the CPU index, up to ties at the k-th distance
SAME_NEIGHBOURS_MIN = 0.999
#: relative tolerance of the faiss check's distances, and of a tie: GPU and CPU sum in other orders in float32, which
#: swaps near-tied neighbours (at the GPU sizes 7 of the 10 000 k = 50 neighbour sets of faiss' float32 CPU search
#: already differ from those of exact float64 distances)
DIST_RTOL = 1e-4
METHODS = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))
#: sinks that write files / print tables: the check keeps the evaluator's result in memory only
NO_SINKS = ["~evaluation.sinks.results", "~evaluation.sinks.table", "~evaluation.sinks.wandb"]
QUIET = ["trainer.enable_progress_bar=false", "logger=none", "callbacks=none", "+trainer.enable_checkpointing=false",
         "+trainer.num_sanity_val_steps=0", "+trainer.limit_val_batches=0", *NO_SINKS]


@dataclass
class Sizes:
    """What the GPU run uses, and what the CPU dry-run shrinks it to."""

    device: str
    cifar: dict[str, int]
    imagenet: dict[str, int]
    backbone32: str
    backbone224: str
    batch32: int
    batch224: int
    detectors: str
    rho_min: float
    knn_bank: tuple[int, int, int]  # train rows, test rows, dim
    eval_batch: int
    workers: int
    throughput_epochs: int
    #: overrides added to a data config's throughput runs, or to a method's runs in the methods section (by name)
    extra: dict[str, list[str]] = field(default_factory=dict)
    #: the fp16 + compile section's: `all` (odin, rankfeat, nac, mcdropout: network passes, run eagerly) and the
    #: layer hooks of gram_stream; `full`'s input-perturbing extras add time, not another path
    fast_detectors: str = "detectors.names=[all,gram_stream]"
    #: the evaluations whose scores are compared with nothing: the throughput section's (its images/s with the
    #: cache) and the methods section's model trained with `gpu_fast` (its finite losses are the check; its
    #: `gpu_fast` evaluation with every detector is the bf16 one of the fp32 model)
    light_detectors: str = "detectors=fast"
    #: added to the methods section's runs after the first method's: gmm's fit is scikit-learn's EM on the CPU (no
    #: CUDA path; 54 s a fit at the GPU sizes on a 2-core CPU), checked once
    repeat_exclude: list[str] = field(default_factory=list)
    #: added to every run of the methods section: the dry run's log no metrics through Lightning (~7000 `self.log`
    #: calls, 12 s of a CPU; its checks read the evaluation's rows and scores, and the DDP section still logs them)
    methods_quiet: list[str] = field(default_factory=list)


GPU = Sizes("cuda", dict(n_train=2560, n_val=256, n_test=512, n_ood=256), dict(n_train=2560, n_val=256, n_test=256, n_ood=128, side=64),
            "resnet18_32x32", "resnet50", 128, 256, "detectors=all", RHO_MIN, (50_000, 10_000, 512), 512, 8, 4,
            repeat_exclude=["detectors.exclude=[gmm]"])
DRY = Sizes("cpu", dict(n_train=32, n_val=16, n_test=16, n_ood=8), dict(n_train=16, n_val=8, n_test=8, n_ood=4, side=40),
            "small_cnn", "small_cnn", 8, 8, "detectors.names=[msp,energy,knn,mahalanobis,combood]", 0.95, (2_000, 500, 64), 64, 0, 1,
            {"imagenet": ["data.benchmark.image_size=32", "data.benchmark.resize=36"],
             # its diagnostics grids: 1 row each, not 8 (drawing them took 10 s); a decoder 32 channels wide, not 256
             # (the same blocks: bf16 transposed convolutions on a CPU ran 50x slower than fp32, 20 s of the dry run)
             "heatmap": ["method.n_images=1", "method.width=32"]},
            "detectors.names=[msp,energy,odin,gram_stream]", "detectors.names=[msp,knn]",
            methods_quiet=["~evaluation.sinks.metrics"])
#: the fp16 + compile section's methods: CE, and supervised-contrastive cluster (manual optimisation: each step's
#: `manual_backward` scaled, its optimiser stepped through the scaler), two epochs: contrastive, then the probe
FAST_PATHS = {"ce": ["method=ce"],
              "cluster supcon": ["method=cluster", "method.objective=supcon", "method.probe_epochs=1", "method.n_init=2",
                                 "trainer.max_epochs=2"]}


def trainer_overrides(kind: str, sizes: Sizes) -> list[str]:
    """`trainer=gpu|gpu_fast` on CUDA, `fp16_compile`: `gpu_fast` in fp16 (Lightning's GradScaler) with `torch.compile`;
    on the CPU dry-run `trainer=cpu`, with the plugin's autocast on the CPU, compiling through the `aot_eager` backend
    (AOTAutograd as inductor's, no kernels to build)."""
    fp16_compile = ["trainer.plugins.0.precision=16-mixed", "trainer.plugins.0.compile=true"]
    if sizes.device == "cuda":
        return ["trainer=gpu_fast", *fp16_compile] if kind == "fp16_compile" else [f"trainer={kind}"]
    if kind == "gpu":
        return ["trainer=cpu", "trainer.deterministic=false"]
    options = "precision:16-mixed,compile:true,compile_backend:aot_eager" if kind == "fp16_compile" else "precision:bf16-mixed"
    plugin = f"{{_target_:ood.precision.FastMixedPrecision,device:cpu,channels_last:true,{options}}}"
    return ["trainer=cpu", "trainer.deterministic=false", f"+trainer.plugins=[{plugin}]"]


def method_overrides(name: str, init: Path, work: Path) -> list[str]:
    """Start every method from the CE weights (frozen-backbone methods need them); OAL trains its small teacher for
    one epoch on the 3-channel images."""
    extra = [f"method.init.ckpt={init}"]
    if name == "oal":
        extra += ["method.teacher.epochs=1", f"method.cache_dir={work / 'oal'}"]
    if name == "cluster":
        extra += ["method.probe_epochs=1", "method.n_init=2"]
    return extra


class StepLog(Callback):
    """Training losses, and per step the wall time waiting for the next batch (end of a step to the start of the
    next: loading, collation, transfer) vs the whole step; synchronises the device at step ends. The wait before
    an epoch's first batch counts too (the loader's restart, Lightning's epoch hooks): `plain_loop`'s clock runs
    through its epochs' restarts, so leaving them out made ood's images/s look faster than the plain loop's."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.wait: list[float] = []
        self.step: list[float] = []
        self._end: float | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()
        self._waited = 0.0 if self._end is None else self._start - self._end

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))  # a host read: synchronises the device
        self._end = time.perf_counter()
        self.wait.append(self._waited)
        self.step.append(self._end - self._start + self._waited)


def _cfg(work: Path, overrides: Sequence[str]) -> Any:
    return compose_run(work, list(overrides))


def detector_params(evaluation: Any) -> dict[str, dict[str, Any]]:
    """Each detector's hyper-parameters in this evaluation (its rows'), JSON-ready."""
    return {row["detector"]: json.loads(json.dumps(row["detector_params"])) for row in evaluation.result.rows}


def test_scores(evaluation: Any) -> dict[str, np.ndarray]:
    """Per detector, the scores of the test splits (ID test then every OOD set) concatenated."""
    result = evaluation.result
    splits = [s for s in next(iter(result.scores.values())) if s not in ("train", "val", "val_ood")]
    return {d: np.concatenate([per[s].float().numpy() for s in splits if s in per]) for d, per in result.scores.items()}


def chosen_params(evaluation: Any) -> list[str]:
    """Overrides that fix every detector's tuned hyper-parameters at the values this evaluation chose, so that a
    second evaluation compares the same detectors (bf16 rounding could otherwise tip a grid search elsewhere)."""
    out = {}
    registered = set(available_detectors())  # a method's own scores (energy_cfl's beta) are not detectors.params
    for row in evaluation.result.rows:
        for key in row.get("tuned_params", []) if row["detector"] in registered else []:
            value = json.dumps(row["detector_params"][key], separators=(",", ":"))
            out[f"{row['detector']}.{key}"] = f"++detectors.params.{row['detector']}.{key}={value}"
    return list(out.values())


def bf16_agreement(
    fp32: Mapping[str, np.ndarray], bf16: Mapping[str, np.ndarray], rho_min: float
) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """Per detector, fp32 vs bf16 scores of the same images: Spearman's rho; the relative spread of the detectors whose
    fp32 scores are too close for bf16 to order (`relative_spread` < `BF16_STEP`: reported, not compared); and why
    each compared detector with rho below `rho_min` fails."""
    rho = {d: spearman(fp32[d], bf16[d]) for d in fp32}
    narrow = {d: w for d in fp32 if (w := relative_spread(fp32[d])) < BF16_STEP}
    low = {d: f"rho {r:.4f}, distinct values fp32 {len(np.unique(fp32[d]))} bf16 {len(np.unique(bf16[d]))}, "
              f"max |diff| {np.abs(fp32[d] - bf16[d]).max():.3g}, relative spread {relative_spread(fp32[d]):.3g}"
           for d, r in rho.items() if not r >= rho_min and d not in narrow}
    return rho, narrow, low


def relative_spread(scores: np.ndarray) -> float:
    """The 1st to 99th percentile range of `scores` over the larger magnitude of the two: how many bf16 steps (2^-8
    relative) apart the scores are at most, outliers aside."""
    low, high = np.percentile(scores, [1, 99])
    return float((high - low) / max(abs(low), abs(high), np.finfo(np.float64).tiny))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation; 1 for identical inputs (also constant ones, where the correlation is undefined)."""
    return 1.0 if np.array_equal(a, b) else float(spearmanr(a, b).statistic)


def check_methods(sizes: Sizes, tree: Path, work: Path, names: Sequence[str]) -> list[dict[str, Any]]:
    """Section 1: every method, one epoch in fp32 and in bf16; fp32 model scored in both precisions."""
    base = ["data=cifar10", f"paths.data_dir={tree}", f"backbone={sizes.backbone32}", "trainer.max_epochs=1",
            f"data.batch_size={sizes.batch32}", f"data.eval_batch_size={sizes.eval_batch}", f"data.num_workers={sizes.workers}",
            "+detectors.params.vim.dim=32", *QUIET, *sizes.methods_quiet]
    init = work / "ce_init.pt"
    method, datamodule, trainer, _ = build(_cfg(work / "init", [*base, *trainer_overrides("gpu", sizes), "evaluate=false"]))
    trainer.fit(method, datamodule=datamodule)
    torch.save(method.state_dict(), init)
    rows = []
    for name in names:
        row: dict[str, Any] = {"check": f"method {name}", "ok": False}
        try:
            common = [*base, f"method={name}", *method_overrides(name, init, work), *sizes.extra.get(name, [])]
            compared = [sizes.detectors, *(sizes.repeat_exclude if name != names[0] else [])]
            fp32 = {}
            for kind in ("gpu", "gpu_fast"):
                detectors = compared if kind == "gpu" else [sizes.light_detectors]
                method, datamodule, trainer, evaluation = build(_cfg(work / f"{name}-{kind}",
                                                                     [*common, *detectors, *trainer_overrides(kind, sizes)]))
                log = StepLog()
                trainer.callbacks.append(log)
                method.apply_init()
                trainer.fit(method, datamodule=datamodule)
                trainer.test(method, datamodule=datamodule, verbose=False)
                row[f"losses_{kind}"] = [round(v, 4) for v in log.losses]
                if not log.losses or not all(math.isfinite(v) for v in log.losses):
                    raise AssertionError(f"{kind}: non-finite or no training loss {log.losses}")
                if kind == "gpu":
                    fp32, trained, fixed = test_scores(evaluation), method, chosen_params(evaluation)
                    row["detector_params_fp32"] = detector_params(evaluation)
            # the fp32 model evaluated under bf16 autocast (a fresh trainer of the gpu_fast preset), every detector at
            # the hyper-parameters the fp32 evaluation chose: the same detectors in both precisions
            _, datamodule, trainer, evaluation = build(_cfg(work / f"{name}-bf16eval",
                                                            [*common, *compared, *trainer_overrides("gpu_fast", sizes), *fixed]))
            trainer.test(trained, datamodule=datamodule, verbose=False)
            bf16 = test_scores(evaluation)
            row["detector_params_bf16"] = detector_params(evaluation)
            rho, narrow, low = bf16_agreement(fp32, bf16, sizes.rho_min)
            row["spearman_fp32_bf16"] = {d: round(r, 5) for d, r in rho.items()}
            row["narrower_than_bf16"] = {d: float(f"{w:.3g}") for d, w in narrow.items()}
            row["ok"] = not low
            if low:
                row["error"] = f"Spearman fp32 vs bf16 below {sizes.rho_min}: {low}"
        except Exception as err:  # noqa: BLE001 - a failing method is a row of the report, not the end of the check
            row["error"] = f"{type(err).__name__}: {err}"
        rows.append(row)
        print(f"  {row['check']}: {_outcome(row)}", flush=True)
    return rows


class StepCount(Callback):
    """Training batches whose step changed the weights (GradScaler skips the step of a batch with inf gradients)."""

    def __init__(self) -> None:
        self.stepped = self.batches = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._before = torch.cat([p.detach().flatten() for p in pl_module.parameters() if p.requires_grad]).clone()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        after = torch.cat([p.detach().flatten() for p in pl_module.parameters() if p.requires_grad])
        self.batches += 1
        self.stepped += int(not torch.equal(after, self._before))


def check_fast_paths(sizes: Sizes, tree: Path, work: Path) -> list[dict[str, Any]]:
    """Section 1b: `FAST_PATHS` trained and evaluated with `gpu_fast` in fp16 with `torch.compile`: finite losses,
    optimiser steps taken through the GradScaler (it skips a step whose gradients overflowed and halves its scale),
    every compiled sub-module run, finite scores of every detector (the network passes run the compiled modules
    eagerly)."""
    base = ["data=cifar10", f"paths.data_dir={tree}", f"backbone={sizes.backbone32}", "trainer.max_epochs=1",
            f"data.batch_size={sizes.batch32}", f"data.eval_batch_size={sizes.eval_batch}", f"data.num_workers={sizes.workers}",
            sizes.fast_detectors, "+detectors.params.vim.dim=32", *QUIET, f"method.init.ckpt={work / 'ce_init.pt'}"]
    rows = []
    for name, extra in FAST_PATHS.items():
        row: dict[str, Any] = {"check": f"fp16 + compile {name}", "ok": False}
        try:
            method, datamodule, trainer, evaluation = build(_cfg(work / f"fast-{name.replace(' ', '-')}",
                                                                 [*base, *extra, *trainer_overrides("fp16_compile", sizes)]))
            log, steps = StepLog(), StepCount()
            trainer.callbacks += [log, steps]
            method.apply_init()
            trainer.fit(method, datamodule=datamodule)
            trainer.test(method, datamodule=datamodule, verbose=False)
            compiled = [n for n, m in method.named_children() if getattr(m, "_compiled_call_impl", None) is not None]
            scores = test_scores(evaluation)
            aurocs: dict[str, list[float]] = {}
            for r in evaluation.result.rows:
                aurocs.setdefault(r["detector"], []).append(r["auroc"])
            row |= {"losses": [round(v, 4) for v in log.losses], "steps_taken": f"{steps.stepped}/{steps.batches}",
                    "grad_scale": trainer.precision_plugin.scaler.get_scale(), "compiled": compiled,
                    "mean_auroc": {d: round(float(np.mean(v)), 4) for d, v in aurocs.items()}}
            problems = [*(["a non-finite loss"] if not all(math.isfinite(v) for v in log.losses) else []),
                        *(["no result rows"] if not aurocs else []),
                        *(["no optimiser step taken"] if not steps.stepped else []),
                        *(["nothing compiled"] if not compiled else []),
                        *[f"{d}: non-finite scores" for d, v in scores.items() if not np.isfinite(v).all()]]
            row["ok"] = not problems
            if problems:
                row["error"] = "; ".join(problems)
        except Exception as err:  # noqa: BLE001 - a failing path is a row of the report
            row["error"] = f"{type(err).__name__}: {err}"
        rows.append(row)
        print(f"  {row['check']}: {_outcome(row)}", flush=True)
    return rows


def _same_neighbours(idx_a: torch.Tensor, idx_b: torch.Tensor, dist_a: torch.Tensor, dist_b: torch.Tensor) -> float:
    """Share of queries whose neighbour sets agree up to ties at the k-th distance: a row that only one side lists
    lies within `DIST_RTOL` of the other side's k-th distance (float32 rounding decided which of the tied rows made
    the k nearest); rows [M, k] nearest first."""
    idx_a, idx_b, dist_a, dist_b = (t.cpu() for t in (idx_a, idx_b, dist_a, dist_b))
    only_a = ~(idx_a[:, :, None] == idx_b[:, None, :]).any(2)
    only_b = ~(idx_b[:, :, None] == idx_a[:, None, :]).any(2)
    tie_a = (dist_a - dist_b[:, -1:]).abs() <= DIST_RTOL * dist_b[:, -1:].abs()
    tie_b = (dist_b - dist_a[:, -1:]).abs() <= DIST_RTOL * dist_a[:, -1:].abs()
    return float(((~only_a | tie_a).all(1) & (~only_b | tie_b).all(1)).float().mean())


def check_faiss(sizes: Sizes) -> list[dict[str, Any]]:
    """Section 2: the kNN detector and GROOD's bank searched on the device, by faiss' GPU index (where faiss has GPU
    support; else a skipped row) and by the torch search (what ood runs on CUDA without faiss-gpu), vs faiss' exact
    CPU index. The detector's scores are compared for the search it picks by itself."""
    import faiss

    from ood.detectors import build_detector
    from ood.features.bank import FeatureBank
    from ood.methods.grood import ncp_gradient
    from ood.neighbors import KNNIndex, gpu_available

    rows: list[dict[str, Any]] = []
    on_cuda = sizes.device == "cuda"
    backends = ["faiss", "torch"] if not on_cuda or gpu_available() else ["torch"]
    if "faiss" not in backends:
        rows.append({"check": "faiss GPU index", "ok": None,
                     "skipped": f"faiss {faiss.__version__} has no GPU support (the faiss-cpu wheel): ood searches exact "
                                "indexes in torch on the GPU, checked below; pip install faiss-gpu-cu12 to check "
                                "faiss' GPU index too"})
    n, m, d = sizes.knn_bank
    gen = torch.Generator().manual_seed(0)
    classes = 10
    centres = torch.rand(classes, d, generator=gen) * 2
    y = torch.arange(n) % classes
    train = (centres[y] + torch.randn(n, d, generator=gen)).clamp_min(0)
    test = (centres[torch.arange(m) % classes] + torch.randn(m, d, generator=gen)).clamp_min(0)
    w, b = torch.randn(classes, d, generator=gen) / d**0.5, torch.randn(classes, generator=gen)
    dev = torch.device(sizes.device)
    # kNN detector: its index follows the bank's device, searched as KNNIndex picks
    scores = {}
    for where in (dev, torch.device("cpu")):
        bank = lambda h, lab, at=where: FeatureBank((h @ w.T + b).to(at), h.to(at), lab, w.to(at), b.to(at))  # noqa: E731
        det = build_detector("knn", k=50).fit(bank(train, y.to(where)))
        scores[where.type] = det.score(bank(test, None)).cpu()
    picked = "faiss" if not on_cuda or gpu_available() else "torch"
    unit = torch.nn.functional.normalize
    protos = torch.cat([centres, centres.mean(0, keepdim=True)])
    g_train, g_test = ncp_gradient(train, protos), ncp_gradient(test, protos)
    dist_cpu, idx_cpu = KNNIndex("l2", device="cpu").add(train, unit).search(unit(test), 50)
    g_dist_cpu, g_idx_cpu = KNNIndex("l2", "exact", device="cpu").add(g_train).search(g_test, 1)
    for backend in backends:
        label = {"faiss": "faiss GPU index" if on_cuda else "faiss index", "torch": "torch search"}[backend]
        dist_dev, idx_dev = KNNIndex("l2", device=dev, backend=backend).add(train.to(dev), unit).search(
            unit(test.to(dev)), 50)
        score_diff = float((scores[dev.type] - scores["cpu"]).abs().max()) if backend == picked else None
        rows.append(_neighbour_row(f"{label}: knn (k=50)", idx_dev, idx_cpu, dist_dev, dist_cpu, score_diff))
        # GROOD's gradient bank: exact 1-NN of ncp gradients
        dist_dev, idx_dev = KNNIndex("l2", "exact", device=dev, backend=backend).add(g_train.to(dev)).search(
            g_test.to(dev), 1)
        rows.append(_neighbour_row(f"{label}: GROOD bank (1-NN)", idx_dev, g_idx_cpu, dist_dev, g_dist_cpu, None))
    return rows


def _neighbour_row(name: str, idx_a: torch.Tensor, idx_b: torch.Tensor, dist_a: torch.Tensor, dist_b: torch.Tensor,
                   score_diff: float | None) -> dict[str, Any]:
    same = _same_neighbours(idx_a, idx_b, dist_a, dist_b)
    rel = float(((dist_a.cpu() - dist_b.cpu()).abs() / dist_b.cpu().abs().clamp_min(1e-6)).max())
    row = {"check": name, "same_neighbours": same, "max_rel_distance_diff": rel,
           "ok": same >= SAME_NEIGHBOURS_MIN and rel <= DIST_RTOL}
    if score_diff is not None:
        row["max_score_diff"] = score_diff
    if not row["ok"]:
        row["error"] = (f"same neighbours {same:.4f} (need {SAME_NEIGHBOURS_MIN}), distance diff {rel:.2e} "
                        f"(need {DIST_RTOL})")
    return row


def check_augment(sizes: Sizes) -> dict[str, Any]:
    """Section 3: `PadCropFlip` on the device vs torchvision's pad + crop + flip per image on the CPU, same draws."""
    from torchvision.transforms import functional as TF

    from ood.data.cifar import CIFAR10Benchmark
    from ood.data.memory import PadCropFlip

    mean, std = torch.tensor(CIFAR10Benchmark.mean), torch.tensor(CIFAR10Benchmark.std)
    fill = tuple(((0 - mean) / std).tolist())
    aug = PadCropFlip(4, 0.5, fill)
    gen = torch.Generator().manual_seed(0)
    x = ((torch.randint(0, 256, (256, 3, 32, 32), generator=gen).float() / 255) - mean[:, None, None]) / std[:, None, None]
    dy, dx = torch.randint(0, 9, (256,), generator=gen), torch.randint(0, 9, (256,), generator=gen)
    flip = torch.rand(256, generator=gen) < 0.5
    dev = torch.device(sizes.device)
    got = aug.apply(x.to(dev), dy.to(dev), dx.to(dev), flip.to(dev)).cpu()
    want = []
    for i in range(len(x)):
        img = TF.hflip(x[i]) if flip[i] else x[i]
        padded = torch.stack([TF.pad(img[c : c + 1], [4], fill=fill[c])[0] for c in range(3)])
        want.append(TF.crop(padded, int(dy[i]), int(dx[i]), 32, 32))
    equal = torch.equal(got, torch.stack(want))
    return {"check": "in-memory crop + flip on the device == torchvision on the CPU", "ok": equal,
            **({} if equal else {"error": f"max |diff| {float((got - torch.stack(want)).abs().max())}"})}


@contextlib.contextmanager
def _process_settings_kept() -> Iterator[None]:
    """`os.environ` and torch's intra-op thread count put back afterwards: a DDP run sets `MASTER_ADDR`,
    `MASTER_PORT`, `NODE_RANK`, `LOCAL_RANK` and, where unset, `OMP_NUM_THREADS` (with `torch.set_num_threads`) in
    this process, which the later sections, and a program calling the check, would otherwise run with."""
    env, threads = dict(os.environ), torch.get_num_threads()
    try:
        yield
    finally:
        for key in set(os.environ) - set(env):
            del os.environ[key]
        os.environ.update(env)
        torch.set_num_threads(threads)


@_process_settings_kept()
def check_ddp(sizes: Sizes, tree: Path, work: Path) -> dict[str, Any]:
    """Section 4: one-device DDP evaluation == plain evaluation (every row equal). Both with deterministic kernels
    and without cuDNN's benchmark mode (`trainer=gpu` has it on), which times candidate convolution algorithms in
    each run and may pick others in the second: rounding differences that are not the DDP path's (`warn`, not
    `true`: an op of a user's network without a deterministic CUDA kernel warns instead of stopping the check).
    The process's environment and thread count come back as they were."""
    common = ["data=cifar10", f"paths.data_dir={tree}", f"backbone={sizes.backbone32}", "train=false",
              f"data.eval_batch_size={sizes.eval_batch}", f"data.num_workers={sizes.workers}", sizes.detectors,
              "+detectors.params.vim.dim=32", "++trainer.benchmark=false", "trainer.deterministic=warn", *QUIET]
    state = torch.load(work / "ce_init.pt", map_location="cpu")
    rows = {}
    ddp = (["trainer=ddp", "trainer.devices=1"] if sizes.device == "cuda" else
           ["trainer=cpu", "+trainer.strategy={_target_:lightning.pytorch.strategies.DDPStrategy,process_group_backend:gloo}"])
    for name, extra in (("plain", trainer_overrides("gpu", sizes)), ("ddp", ddp)):
        method, datamodule, trainer, evaluation = build(_cfg(work / f"ddp-{name}", [*common, *extra]))
        method.load_state_dict(state)
        trainer.test(method, datamodule=datamodule, verbose=False)
        rows[name] = sorted((r["detector"], r["ood_dataset"], r["auroc"], r["fpr95"]) for r in evaluation.rows)
    with contextlib.suppress(Exception):
        torch.distributed.destroy_process_group()
    equal = rows["plain"] == rows["ddp"] and bool(rows["plain"])
    return {"check": "1-device DDP evaluation == plain evaluation", "ok": equal, "rows": len(rows["plain"]),
            **({} if equal else {"error": "rows differ"})}


def check_api(sizes: Sizes, work: Path) -> dict[str, Any]:
    """Section 5: `ood.evaluate` on a model of the caller's, on the device, then `ood.extract` on the CPU: finite rows
    and logits, the model handed back on its device and in training mode."""
    import torchvision

    import ood

    gen = torch.Generator().manual_seed(0)

    def images(n: int, shift: float = 0.0) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(torch.rand(n, 3, 32, 32, generator=gen) + shift, torch.arange(n) % 4)

    net = torchvision.models.resnet18(num_classes=4).to(sizes.device).train()
    result = ood.evaluate(net, {"train": images(8 * sizes.batch32), "test": images(4 * sizes.batch32)},
                          {"shifted": images(4 * sizes.batch32, 0.5)}, detectors=["msp", "energy", "knn"],
                          batch_size=sizes.eval_batch, device=sizes.device, output_dir=work / "api",
                          overrides=["detectors.tune=false"])
    bank = ood.extract(net, images(16), batch_size=16, device="cpu")  # a pass elsewhere hands the model back too
    devices = sorted({str(t.device.type) for t in net.parameters()})
    finite = (bool(result.rows) and all(math.isfinite(r["auroc"]) for r in result.rows)
              and bool(torch.isfinite(bank.logits).all()))
    kept = devices == [torch.device(sizes.device).type] and all(m.training for m in net.modules())
    return {"check": "ood.evaluate / ood.extract on the caller's model: finite rows, the model back on its device and "
                     "in its modes",
            "ok": finite and kept, "rows": len(result.rows),
            **({} if kept else {"error": f"model on {devices}, training={net.training} after ood.evaluate"}),
            **({} if finite else {"error": "no rows or a non-finite AUROC"})}


@contextlib.contextmanager
def _autocast(device: str, bf16: bool) -> Iterator[None]:
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        yield


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_loop(method: Any, datamodule: Any, device: str, bf16: bool, steps: int) -> float:
    """Images/s of a plain PyTorch loop: the same loader (with its on-device crop/flip), model, optimiser and
    precision as ood's run, no Lightning; `steps` timed after up to 3 warm-up steps. The loader is made once, before
    the clock starts, and the loss is read on the host every step, as ood's run reads it (`StepLog`), so both wait
    for the device alike."""
    model = method.backbone.to(device).train()
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    augment = datamodule._augment.get("id")  # noqa: SLF001 - the loader's own per-batch augmentation
    warm = min(3, steps)
    images, start, done = 0, time.perf_counter(), 0
    loader = datamodule.train_dataloader()
    while done < warm + steps:  # as many epochs of the loader as the steps need
        for batch in loader:
            if done == warm:
                _sync(device)
                start, images = time.perf_counter(), 0
            x, y = batch.x.to(device, non_blocking=True), batch.y.to(device, non_blocking=True)
            if augment is not None:
                x = augment(x)
            if bf16:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, bf16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            float(loss)  # a host read per step, as StepLog's
            images += len(x)
            done += 1
            if done >= warm + steps:
                break
    _sync(device)
    return images / (time.perf_counter() - start)


def throughput(sizes: Sizes, trees: dict[str, Path], work: Path, table: list[dict[str, Any]],
               saved: Callable[[], Any]) -> None:
    """Section 6: training images/s through ood vs a plain loop, data-wait share, evaluation images/s; each row
    appended to `table`, then `saved()` (a run stopped at a time limit keeps the rows it measured)."""
    setups = [("cifar10", sizes.backbone32, sizes.batch32, "32 px", []),
              ("imagenet200", sizes.backbone224, sizes.batch224, "224 px", sizes.extra.get("imagenet", []))]
    for data, backbone, batch, px, extra in setups:
        for kind in ("gpu", "gpu_fast"):
            overrides = [f"data={data}", f"paths.data_dir={trees[data]}", f"backbone={backbone}", "method=ce",
                         f"trainer.max_epochs={sizes.throughput_epochs}", f"data.batch_size={batch}", f"data.eval_batch_size={sizes.eval_batch}",
                         f"data.num_workers={sizes.workers}", sizes.light_detectors, "+detectors.params.vim.dim=32",
                         *QUIET, *extra, *trainer_overrides(kind, sizes)]
            method, datamodule, trainer, evaluation = build(_cfg(work / f"tp-{data}-{kind}", overrides))
            log = StepLog()
            trainer.callbacks.append(log)
            trainer.fit(method, datamodule=datamodule)
            timed = list(zip(log.step, log.wait))[min(3, len(log.step) // 2):]
            step_s = sum(s for s, _ in timed)
            ours = len(timed) * batch / step_s
            wait = sum(w for _, w in timed) / step_s
            _sync(sizes.device)
            start = time.perf_counter()
            trainer.test(method, datamodule=datamodule, verbose=False)
            eval_s = time.perf_counter() - start
            n_eval = sum(len(ds) for _, ds in datamodule._eval_sets())  # noqa: SLF001 - images through the network
            plain = plain_loop(method, datamodule, sizes.device, kind == "gpu_fast", max(1, len(timed)))
            table.append({"model": f"{backbone} {px} batch {batch}", "precision": "bf16" if kind == "gpu_fast" else "fp32",
                          "ood_train_img_s": round(ours, 1), "plain_train_img_s": round(plain, 1),
                          "ood_vs_plain": round(ours / plain, 3), "data_wait_share": round(wait, 3),
                          "eval_img_s": round(n_eval / eval_s, 1), "eval_images": n_eval})
            saved()


def _outcome(row: dict[str, Any]) -> str:
    """A check's row in one word and its reason: ok, skipped (a path this machine lacks, `ok` None) or FAILED."""
    return "skipped: " + row["skipped"] if row["ok"] is None else "ok" if row["ok"] else "FAILED " + row["error"]


def markdown(report: dict[str, Any]) -> str:
    lines = ["| check | ok | details |", "|---|:-:|---|"]
    for c in report["checks"]:
        details = {k: v for k, v in c.items() if k not in ("check", "ok") and not k.startswith("losses")}
        if "spearman_fp32_bf16" in c:
            narrow = details.pop("narrower_than_bf16", {})
            compared = [r for d, r in details.pop("spearman_fp32_bf16").items() if d not in narrow]
            details["min_spearman"] = min(compared, default=None)
            if narrow:
                details["narrower_than_bf16"] = narrow
        lines.append(f"| {c['check']} | {'skipped' if c['ok'] is None else 'yes' if c['ok'] else 'NO'} | {json.dumps(details)} |")
    lines += ["", "| model | precision | ood train img/s | plain loop img/s | ood / plain | data wait | eval img/s (cache) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for t in report["throughput"]:
        lines.append(f"| {t['model']} | {t['precision']} | {t['ood_train_img_s']} | {t['plain_train_img_s']} | "
                     f"{t['ood_vs_plain']} | {t['data_wait_share']:.1%} | {t['eval_img_s']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="where the figures go (JSON)")
    parser.add_argument("--dry-run", action="store_true", help="the same checks on the CPU with tiny shapes")
    parser.add_argument("--methods", default="", help="comma-separated methods (default: every conf/method/*.yaml)")
    parser.add_argument("--workdir", type=Path, default=None, help="fabricated data and runs (default: a temp dir)")
    args = parser.parse_args(argv)
    sizes = DRY if args.dry_run else GPU
    if sizes.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device visible to torch; run `python -m benchmarks.gpu_check --dry-run` for the CPU "
              "smoke test", file=sys.stderr)
        return 1
    with quiet():
        return run_checks(args, sizes)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Warnings and Lightning's and ood's log lines below ERROR off for the checks' own output; the levels and the
    warning filters put back after (`main` in a test's process left ood's warnings off for every later test)."""
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "ood")
    levels = {name: logging.getLogger(name).level for name in names}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        for name in names:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def run_checks(args: argparse.Namespace, sizes: Sizes) -> int:
    """Every section of the check at `sizes` (`DRY` or `GPU`), its report written to `args.out` after each; 0 when
    every check passed."""
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    checks: list[dict[str, Any]] = []
    table: list[dict[str, Any]] = []
    device = torch.cuda.get_device_name() if sizes.device == "cuda" else "cpu (dry run)"

    def save(complete: bool) -> dict[str, Any]:
        """The report as it stands, written to `--out`: after every section, so that a run stopped at a time limit
        keeps the checks it finished (`complete` false, `ok` false until every section ran)."""
        report = {"device": device, "torch": torch.__version__, "dry_run": args.dry_run, "rho_min": sizes.rho_min,
                  "bf16_step": BF16_STEP,
                  "same_neighbours_min": SAME_NEIGHBOURS_MIN, "seconds": round(time.perf_counter() - started, 1),
                  "section_seconds": {k: round(v, 1) for k, v in seconds.items()}, "complete": complete,
                  "checks": checks, "throughput": table, "ok": complete and all(c["ok"] is not False for c in checks)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(report, indent=1))  # a kill mid-write keeps the last report
        return report

    with tempfile.TemporaryDirectory(prefix="ood-gpu-check-") as tmp:
        work = args.workdir or Path(tmp)
        trees = {"cifar10": cifar_tree(work / "cifar", **sizes.cifar),
                 "imagenet200": imagenet_tree(work / "imagenet", **sizes.imagenet)}
        print(f"ood gpu-check on {device}, torch {torch.__version__}", flush=True)
        sections = {"methods": lambda: check_methods(sizes, trees["cifar10"], work,
                                                     args.methods.split(",") if args.methods else METHODS),
                    "fp16_compile": lambda: check_fast_paths(sizes, trees["cifar10"], work),
                    "faiss": lambda: check_faiss(sizes), "augment": lambda: [check_augment(sizes)],
                    "ddp": lambda: [check_ddp(sizes, trees["cifar10"], work)], "api": lambda: [check_api(sizes, work)]}
        for name, section in sections.items():
            t = time.perf_counter()
            try:
                rows = section()
            except Exception as err:  # noqa: BLE001 - reported as a failed check
                rows = [{"check": name, "ok": False, "error": f"{type(err).__name__}: {err}"}]
            checks += rows
            seconds[name] = time.perf_counter() - t
            if name not in ("methods", "fp16_compile"):  # those two print their rows as they come
                for row in rows:
                    print(f"  {row['check']}: {_outcome(row)}", flush=True)
            save(complete=False)
        t = time.perf_counter()
        try:
            throughput(sizes, trees, work, table, lambda: save(complete=False))
        except Exception as err:  # noqa: BLE001 - the checks above stay reported
            checks.append({"check": "throughput", "ok": False, "error": f"{type(err).__name__}: {err}"})
        seconds["throughput"] = time.perf_counter() - t
    report = save(complete=True)
    print(markdown(report))
    print(f"{'all checks passed' if report['ok'] else 'FAILED'} in {report['seconds']} s; figures in {args.out}")
    return 0 if report["ok"] else 1

if __name__ == "__main__":
    sys.exit(main())
