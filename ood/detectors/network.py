"""What the detectors that need the network share: access to its stages, per-sample maps cached in the single
evaluation pass (layer taps), and a fit that runs the network over the fit split.

- `backbone_of(model)`: the staged backbone behind a method (`model.backbone`) or a backbone itself (ood's own, or
  a torchvision / timm model adapted stage by stage); detectors that need intermediate maps raise
  `DetectorNotApplicable` on anything else (a bare linear head, a network wrapped as a whole). They score with
  the backbone's own head (`fc`), not a method's separate probe.
- Layer taps: a detector class declares `taps(backbone) -> {extras key: (module, reduce)}`; during the evaluation
  pass `LayerTaps` hooks those modules and stores `reduce(output)` per sample under the key in the split's
  `FeatureBank.extras`, so multi-layer detectors (gram, mds_ensemble) read their maps from the one cached pass,
  never a second pass over the data. `reduce` keeps only what the detector scores from (Gram row sums, channel
  means), not the maps. A module that runs several times per forward pass (a shared ReLU) stores one entry per run,
  stacked on dim 1, or under `<key>#<run>` each when the runs differ in shape (torchvision's Bottleneck ReLU runs on
  width, width and 4 x width channels). A tap given as `InputTap(module, reduce)` reduces the module's *input*
  instead (a forward pre-hook, so an in-place module has not yet overwritten it): CombOOD's pre-activation extremes;
  `InputTap(module, reduce, after_call=True)` reads the input as the call left it (a forward hook: an in-place module
  has overwritten it with its output), as the CombOOD authors' hook did.
  Taps are declared on the staged backbone; a detector whose taps name any module, not stages
  (`taps_need_stages = False`: CombOOD's activation modules), also taps a network wrapped as a whole.
- `first_map(backbone)`: where OpenOOD's first feature map (`FEATURE1`, its networks' `return_feature_list[0]`) is
  on a staged backbone: the first stage's output, after the max-pool the next stage starts with (torchvision's
  ResNets: OpenOOD's 224 px ResNets take it after the max-pool, which ood regroups into `layer1`); its tap and its
  forward from an input, so that gram_v15 caches and mds_ensemble caches and perturbs the same map.
- `ModelFitted`: a `needs_model` detector whose statistics need network passes with gradients over its fit split
  (AdaSCALE's perturbed-feature shifts, NAC's gradient histograms): `fit_statistics(model, x) -> [B, ...]` per
  batch, concatenated over the split by the evaluation's model-score function through `FitInputs`, then
  `fit_inputs(bank, statistics)`.
- `StreamFitted`: a `needs_model` detector whose fit folds network passes over chosen rows of its fit split into
  running statistics, one batch at a time, so its memory does not grow with the split (the streaming Gram bounds:
  per-class min/max, then a held-out normaliser). Its `fit_stream(bank, run)` gets `run(fold, rows)`, which passes
  exactly the bank rows `rows` of the fit split, in that order, through the network and calls
  `fold(model, x, rows_of_batch)` per batch (through `FoldInputs` and the evaluation's model-score function, asked
  for those rows only); it may call `run` several times, e.g. a second pass over a held-out tenth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from ood.detectors.base import Detector, DetectorNotApplicable, DetectorRef, SharedPasses, detector_class
from ood.features.bank import FeatureBank

#: a tapped module and the per-sample reduction of its output that is cached
Tap = tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]


class InputTap(NamedTuple):
    """A tap that reduces the module's input (its first positional argument) rather than its output: before the call,
    or with `after_call` as the call left it (an in-place module has overwritten it)."""

    module: nn.Module
    reduce: Callable[[torch.Tensor], torch.Tensor]
    after_call: bool = False


#: the layer name of OpenOOD's first feature map (`return_feature_list[0]` of its networks), for detectors that read it
FEATURE1 = "feature1"


class FirstMap(NamedTuple):
    """OpenOOD's feature1 on a staged backbone: the output of the first stage `stem`, then `pool`, the max-pool the next
    stage starts with (a torchvision ResNet's, which ood regroups into `layer1`: OpenOOD's 224 px ResNets take feature1
    after it), where there is one; cached by hooking `module` (its output with a pool, else its input: the first module
    call of the next stage)."""

    stem: str
    pool: nn.Module | None
    module: nn.Module

    def tap(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> Tap | InputTap:
        """The layer tap caching `reduce(feature1)`."""
        return (self.module, reduce) if self.pool is not None else InputTap(self.module, reduce)

    def of(self, stem_output: torch.Tensor) -> torch.Tensor:
        """feature1 from the stem's output (differentiable: the clean staged pass keeps the stage outputs)."""
        return stem_output if self.pool is None else self.pool(stem_output)

    def forward_to(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """feature1 of input `x`: the stem, then the pool; no later stage runs."""
        return self.of(backbone.forward_to(self.stem, x))


def first_map(backbone: nn.Module) -> FirstMap | None:
    """OpenOOD's feature1 on a staged backbone (`FirstMap`); None with a single stage, or where the second stage starts
    with a step that is not a module call (nothing to hook)."""
    names = backbone.layer_names
    if len(names) < 2:
        return None
    steps = getattr(backbone, "stage_steps", None)  # an adapted library model: stages are step lists of its modules
    if steps is not None:
        first = steps[names[1]][0]
        entry = None if first.startswith("@") else backbone.net.get_submodule(first)
    else:
        entry = backbone.stage_module(names[1])
        if isinstance(entry, nn.Sequential) and len(entry):
            entry = entry[0]
    if entry is None:
        return None
    pool = entry if isinstance(entry, nn.MaxPool2d) else None
    return FirstMap(names[0], pool, entry)


def backbone_of(model: nn.Module) -> nn.Module:
    """The staged backbone (`Backbone.staged`: `layer_names`, `run`, `fc`, `forward_from`, `forward_to`,
    `stage_module`) of a method, or the backbone itself: ood's own backbones and the library models adapted stage
    by stage (torchvision / timm), not a network wrapped as a whole."""
    for candidate in (model, getattr(model, "backbone", None)):
        if candidate is not None and getattr(candidate, "staged", False):
            return candidate
    raise DetectorNotApplicable(f"it needs the intermediate maps of a staged backbone; {network_name(model)} is wrapped "
                                "as a whole")


def network_name(model: nn.Module) -> str:
    """The class name of the user's network inside a method (`ResNet`), for warnings that would name the method."""
    backbone = getattr(model, "backbone", model)
    return type(getattr(backbone, "net", backbone)).__name__


def tapped_keys(bank: FeatureBank, prefix: str, name: str, missing: str | None = None) -> list[str]:
    """Extras keys starting with `prefix`, in tap order; `DetectorNotApplicable` when there are none (`missing`: its
    message, by default that of maps tapped from a staged backbone's stages)."""
    keys = [k for k in bank.extras if k.startswith(prefix)]
    if not keys:
        raise DetectorNotApplicable(missing or (
            f"{name} reads {prefix}* maps from the evaluation cache, which holds none: they are tapped from the stage "
            f"modules of a staged backbone (a network wrapped as a whole has none), in an evaluation's pass or by "
            f"ood.extract(..., taps=['{name}'])"))
    return keys


class LayerTaps:
    """Forward hooks that cache, per sample, the reductions the named detectors declare (`taps`).

    Attach before the evaluation pass, `pop()` after each batch (the batch's tensors by extras key), `remove()`
    after the pass. Detectors without `taps` add nothing; those whose taps need stages add nothing on a network
    wrapped as a whole (`taps_need_stages`, True unless a detector says otherwise).
    """

    def __init__(self, model: nn.Module, detectors: Iterable[DetectorRef]) -> None:
        self._runs: dict[str, list[torch.Tensor]] = {}
        self._handles: list[Any] = []
        declared: dict[str, Tap | InputTap] = {}
        try:
            backbone = backbone_of(model)
        except DetectorNotApplicable:
            backbone = None
        for name in detectors:
            cls = detector_class(name)
            taps = getattr(cls, "taps", None)
            network = backbone if getattr(cls, "taps_need_stages", True) else getattr(model, "backbone", model)
            if network is not None and taps is not None:
                declared.update(taps(network))
        for key, tap in declared.items():
            module, reduce = tap[:2]
            on_input = isinstance(tap, InputTap)
            before = on_input and not tap.after_call
            register = module.register_forward_pre_hook if before else module.register_forward_hook
            self._handles.append(register(self._hook(key, reduce, on_input)))

    def _hook(self, key: str, reduce: Callable[[torch.Tensor], torch.Tensor], on_input: bool) -> Callable[..., None]:
        """A forward hook storing `reduce(output)`, or with `on_input` `reduce(input)` (from a forward pre-hook, or a
        forward hook for an `after_call` tap)."""

        def hook(_module: nn.Module, inputs: tuple[Any, ...], output: Any = None) -> None:
            value = inputs[0] if on_input else output
            # outside autocast: under bf16 autocast (trainer=gpu_fast) the reductions' products would be bf16
            with torch.no_grad(), torch.autocast(value.device.type, enabled=False):
                self._runs.setdefault(key, []).append(reduce(value.detach()).float())

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        """The tapped tensors of the last batch ([B, runs, ...] for modules run more than once, or `<key>#<run>` per
        run when the runs differ in shape), then forget them."""
        out: dict[str, torch.Tensor] = {}
        for key, runs in self._runs.items():
            if len(runs) == 1:
                out[key] = runs[0]
            elif len({run.shape for run in runs}) == 1:
                out[key] = torch.stack(runs, 1)
            else:
                out.update({f"{key}#{i}": run for i, run in enumerate(runs)})
        self._runs = {}
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._runs = [], {}


class StagedForward:
    """One pass of a batch through a staged backbone with autograd on, every stage output kept: the clean pass that
    AdaSCALE, mds_ensemble and mahalanobis_odin start from, run once when they score a batch together (their
    `pass_group`, "staged"). The graph is kept until the object is dropped."""

    def __init__(self, backbone: nn.Module, x: torch.Tensor) -> None:
        self.x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            self.out = backbone.run(self.x, backbone.layer_names)

    def input_grad(self, loss: torch.Tensor) -> torch.Tensor:
        """grad_x of a scalar computed from this pass; the graph stays for the next detector."""
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss, self.x, retain_graph=True)
        return grad


def staged_forward(model: nn.Module, x: torch.Tensor, shared: SharedPasses | None) -> tuple[nn.Module, StagedForward]:
    """The staged backbone of `model` and its clean pass over `x`: from `shared` when a detector of the same batch
    ran it already."""
    backbone = backbone_of(model)
    return backbone, (shared or SharedPasses()).get("network.staged_forward", lambda: StagedForward(backbone, x))


class PassFitted(Detector):
    """A detector whose fit needs network passes over its fit split: `fit(bank)` alone does not apply."""

    needs_model: ClassVar[bool] = True

    def fit(self, bank: FeatureBank) -> PassFitted:
        raise DetectorNotApplicable(f"{self.name} fits from network passes over its fit split; none were given")


class ModelFitted(PassFitted):
    """A detector fitted from per-sample statistics of network passes over its fit split (see the module docstring)."""

    def fit_statistics(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Per-sample statistics [B, ...] of one batch of the fit split."""
        raise NotImplementedError

    def fit_inputs(self, bank: FeatureBank, statistics: torch.Tensor) -> ModelFitted:
        """Fit from the cached bank of the fit split and its `fit_statistics` over the whole split."""
        raise NotImplementedError


class FitInputs(Detector):
    """`detector.fit_statistics` as a `score_inputs`, so the evaluation's model-score function runs the fit pass."""

    needs_model = True

    def __init__(self, detector: ModelFitted) -> None:
        self.detector = detector

    def score_inputs(self, model: nn.Module, x: torch.Tensor, shared: SharedPasses | None = None) -> torch.Tensor:
        return self.detector.fit_statistics(model, x)


#: what a `StreamFitted` detector does with one batch of a pass: (model, inputs x [B, ...], their bank rows [B])
Fold = Callable[[nn.Module, torch.Tensor, torch.Tensor], None]
#: one network pass over the given bank rows of the fit split, in that order, calling the fold per batch
PassFn = Callable[[Fold, torch.Tensor], None]


class StreamFitted(PassFitted):
    """A detector fitted by folding network passes over rows of its fit split (see the module docstring)."""

    def fit_stream(self, bank: FeatureBank, run: PassFn) -> StreamFitted:
        """Fit from the cached bank of the fit split and the passes `run(fold, rows)` over chosen rows of it."""
        raise NotImplementedError


class FoldInputs(Detector):
    """`fold` as a `score_inputs` over the bank rows `rows`, so the evaluation's model-score function, asked for
    exactly those rows in that order, runs a `StreamFitted` pass; each batch's rows are the next ones of `rows`. It
    scores nothing ([B, 0]); `check()` after the pass says whether every row was visited."""

    needs_model = True

    def __init__(self, fold: Fold, rows: torch.Tensor) -> None:
        self.fold, self.rows, self.seen = fold, rows, 0

    def score_inputs(self, model: nn.Module, x: torch.Tensor, shared: SharedPasses | None = None) -> torch.Tensor:
        rows = self.rows[self.seen : self.seen + len(x)]
        if len(rows) != len(x):
            raise RuntimeError(f"a fit pass over {len(self.rows)} rows was given more inputs")
        self.seen += len(x)
        self.fold(model, x, rows)
        return x.new_zeros(len(x), 0)

    def check(self) -> None:
        """Raise when the pass did not visit every row of `rows`."""
        if self.seen != len(self.rows):
            raise RuntimeError(f"a fit pass over {len(self.rows)} rows visited {self.seen}")


def channels_first(backbone: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Stage output `z` of `backbone` as [B, C, ...]: a transformer's tokens [B, T, D] become [B, D, T], NHWC maps
    [B, C, H, W] (`Backbone.channel_dim`); CNN maps and [B, C] vectors pass through."""
    return z.movedim(backbone.channel_dim(z), 1) if z.dim() > 2 else z


def channel_mean(backbone: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Stage output `z` of `backbone` -> [B, C], the mean of each channel over the positions (pixels or tokens)."""
    z = channels_first(backbone, z)
    return z.flatten(2).mean(2) if z.dim() > 2 else z

