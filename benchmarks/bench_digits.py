"""(c) evaluating every detector on a digits checkpoint vs evaluating only `msp`, and the network passes each needs.

Trains one small CE model (compose API, `ood.train.build`), then times `trainer.test` (the full evaluation: one
cached pass per split, detector fitting, tuning on val vs val_ood, metrics) with `detectors.names=[msp]`, with
`detectors=fast` (every cache-only detector) and with `detectors=all` (adds ODIN's input-gradient passes).
Images through the network are counted with a forward hook on the final layer. Also ODIN's tuning on val and
val_ood over its 8 grid points: the whole grid per batch (`score_inputs_grid`) vs one loader run per point, with
every score checked equal (max |diff| = 0) before timing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from benchmarks.common import Timing, scratch_dir, time_alternating
from ood import CONFIG_DIR
from ood.data.benchmark import OODDataModule
from ood.detectors import build_detector, detector_class
from ood.evaluation.callback import OODEvaluation
from ood.evaluation.scoring import GridInputs, grid_points
from ood.train import build

QUIET = ["trainer.enable_progress_bar=false", "logger=none", "callbacks=none"]
GROUPS = {"msp only": ["detectors.names=[msp]"], "fast": ["detectors=fast"], "all": ["detectors=all"]}
# ViM's OpenOOD grid does not fit the 64-d digits features; give it the paper's D/2 so that every detector runs
VIM = "+detectors.params.vim.dim=32"


def compose_run(output_dir: Path, overrides: Sequence[str]) -> DictConfig:
    """`conf/train.yaml` with `overrides`, Hydra's runtime set as in a real run (outputs under `output_dir`)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


def run(epochs: int, repeats: int) -> tuple[list[Timing], str]:
    """Timings of the `fast` and `all` evaluations relative to msp-only, and a table of network passes."""
    workdir = scratch_dir("ood-bench-")
    method, datamodule, trainer, _ = build(compose_run(workdir / "train", [*QUIET, f"trainer.max_epochs={epochs}", "detectors=none"]))
    trainer.fit(method, datamodule=datamodule)
    state = method.state_dict()
    images: dict[str, int] = {}

    # the smoke run (`repeats=0`, the tests) counts passes only: no histogram / ROC figures nor ~1000 metrics through
    # Lightning's `self.log` (~5 s per evaluation of every detector, no network pass)
    smoke = [] if repeats else ["evaluation.sinks.results.figures=false", "~evaluation.sinks.metrics"]

    def evaluation(group: str) -> callable:
        def go() -> None:
            cfg = compose_run(workdir / group, [*QUIET, *GROUPS[group], VIM, "evaluation.sinks.results.save_scores=false",
                                                *smoke])
            m, dm, tr, _ = build(cfg)
            m.load_state_dict(state)
            count = [0]
            hook = m.backbone.fc.register_forward_hook(lambda _m, inp, _o: count.__setitem__(0, count[0] + inp[0].shape[0]))
            tr.test(m, datamodule=dm, verbose=False)
            hook.remove()
            images[group] = count[0]

        return go

    timings = [odin_tuning(method, datamodule, repeats)]
    groups = list(GROUPS)
    seconds = dict(zip(groups, time_alternating([evaluation(g) for g in groups], repeats)))
    one_pass = images["msp only"]
    timings += [
        Timing(f"(c) digits evaluation, detectors={g} ({_count(g)})", seconds[g], seconds["msp only"], 1.5, "msp only")
        for g in ("fast", "all")
    ]
    lines = ["| detectors | images through the network | passes over the eval splits | seconds |", "|---|---:|---:|---:|"]
    for g in groups:
        lines.append(f"| {g} | {images[g]:,} | {images[g] / one_pass:.2f} | {seconds[g]:.2f} |")
    torch.set_grad_enabled(True)
    return timings, "\n".join(lines)


def odin_tuning(method: torch.nn.Module, datamodule: OODDataModule, repeats: int) -> Timing:
    """ODIN's val + val_ood scores at its 8 grid points: shared passes vs point by point (today's `score_inputs`)."""
    method.eval()
    loaders = dict(zip([s.name for s in datamodule.eval_splits], datamodule.test_dataloader()))
    det = build_detector("odin", input_std=datamodule.benchmark.input_std)
    points = grid_points(detector_class("odin").grid)

    def shared() -> list[torch.Tensor]:
        return [OODEvaluation._model_scores(GridInputs(det, points), method, loaders[s]).T for s in ("val", "val_ood")]

    def per_point() -> list[torch.Tensor]:
        return [
            torch.stack([OODEvaluation._model_scores(det.set_params(**p), method, loaders[s]) for p in points])
            for s in ("val", "val_ood")
        ]

    for got, want in zip(shared(), per_point()):
        assert float((got - want).abs().max()) == 0.0, "ODIN: shared-grid scores differ from point-by-point ones"
    t_shared, t_point = time_alternating([shared, per_point], repeats)
    return Timing(f"(c) ODIN tuning on digits, {len(points)} grid points on val + val_ood", t_shared, t_point, 1 / 1.8, "one pass per point")


def _count(group: str) -> str:
    from ood.detectors import available_detectors

    if group == "fast":
        return f"{sum(not detector_class(n).needs_model for n in available_detectors())} detectors"
    return f"{len(available_detectors())} detectors"
