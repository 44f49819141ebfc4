"""The one backbone interface every method and detector relies on.

A backbone is an ordered chain of named stages, a pooling step to the penultimate feature `h` (D dims) and a
final linear layer `fc` (W: [C, D], b: [C]). From that structure it offers, for every architecture alike:
logits, penultimate features, the output of any named stage, and "run the network from stage `l` onward"
(`forward_from`), which GROOD's mix-up and similar layer-level methods need.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from ood.errors import ConfigError


class BackboneOutput(NamedTuple):
    """Logits [N, C], penultimate features [N, D], and requested stage outputs by name."""

    logits: torch.Tensor
    features: torch.Tensor
    layers: dict[str, torch.Tensor]


class ContractError(ConfigError, AttributeError):
    """A `Backbone` subclass lacks `stages`, `pool` or `fc`, or has one of another type (an `AttributeError` too, so
    `hasattr` and `getattr(..., default)` answer as before)."""


class Backbone(nn.Module):
    """Base class: subclasses fill `stages` (ordered, named), `pool` and `fc`.

    Stage names are the public layer names (`layer_names`); the stem, including its activation, is one stage,
    so `forward_from(name, stage_output)` reproduces the network exactly.
    """

    stages: nn.ModuleDict
    pool: nn.Module
    fc: nn.Linear
    #: its layers are consecutive stages (`forward_from`, `forward_to` and `stage_module` work): what the detectors
    #: that read or re-run stages need; a whole network wrapped by hooks is not
    staged: ClassVar[bool] = True
    #: its 4-d stage outputs are [B, H, W, C] (timm models with `output_fmt="NHWC"`, e.g. Swin), not [B, C, H, W]
    nhwc_stages: bool = False
    #: it wraps a whole network (the adapters): `forward` is the network's own pass, whose logits and features `run`
    #: gives, and it has no `stages` / `pool` of its own; any other subclass that defines `forward` is warned of as it
    #: is defined, and one that lacks a part is told so
    wraps_network: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Warn of a subclass with a `forward` of its own: training calls `forward`, the evaluation and every detector
        `run` / `features`, so a `forward` that computes anything but `fc(pool(stages(x)))` trains one function and
        is scored as another, silently."""
        super().__init_subclass__(**kwargs)
        if "forward" in vars(cls) and not cls.wraps_network:
            warnings.warn(f"{cls.__name__} overrides forward: training calls forward, but the evaluation and the detectors "
                          "read run() / features() (stages, pool, fc); put the computation into `stages` and drop forward "
                          "(docs/adding_a_backbone.md)", stacklevel=2)

    def __getattr__(self, name: str) -> Any:
        """`nn.Module`'s look-up; where a subclass broke the contract (no `stages` / `pool` / `fc`, or one of another
        type), reading them or a property built on them (`layer_names`, `num_classes`, `feature_dim`) is one line
        naming the part, not "object has no attribute 'layer_names'"."""
        try:
            return super().__getattr__(name)
        except AttributeError as err:
            if not self.wraps_network and (name in CONTRACT or isinstance(getattr(type(self), name, None), property)):
                self.check_contract(err)
            raise

    def check_contract(self, err: AttributeError) -> None:
        """Raise `ContractError` naming what breaks the contract, from `err` (the AttributeError it caused); nothing
        where the contract holds."""
        problem = self.contract_problem()
        if problem is not None:
            raise ContractError(f"{problem}: a Backbone subclass sets `stages` (an nn.ModuleDict of named stages, run "
                                "in order), `pool` (last stage output -> [N, D] features) and `fc` (nn.Linear(D, "
                                "classes)) in __init__ (docs/adding_a_backbone.md)") from err

    def contract_problem(self) -> str | None:
        """What breaks the `Backbone` contract (a missing part, or one of another type), None where nothing does."""
        name = type(self).__name__
        for part, kind in CONTRACT.items():
            value = self._modules.get(part, self.__dict__.get(part))
            if value is None and not isinstance(getattr(type(self), part, None), property):
                return f"{name} sets no `{part}` in __init__"
            if value is not None and kind is not None and not isinstance(value, kind):
                return f"{name}'s `{part}` is a {type(value).__name__}, not an nn.{kind.__name__}"
        return None

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(self.stages.keys())

    def stage_module(self, name: str) -> nn.Module | None:
        """The sub-module whose output is stage `name`'s output (hooked for per-sample caches of stage outputs), None
        where the stage ends in a computation that is not a module call."""
        self.check_layer(name)
        return self.stages[name]

    def channel_dim(self, z: torch.Tensor) -> int:
        """The dim of stage output `z` that holds its channels: 1 for [B, C, H, W] maps, -1 for a transformer's
        tokens [B, T, D] and for NHWC maps, so detectors that reduce over positions (channel means, Gram rows,
        rank-1 removal) read every architecture alike."""
        return -1 if z.dim() == 3 or (z.dim() == 4 and self.nhwc_stages) else 1

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    @property
    def feature_dim(self) -> int:
        return self.fc.in_features

    def check_layer(self, name: str) -> None:
        """Refuses a layer name this backbone does not have (a `ConfigError` listing its layers), so that a method
        given a layer by config fails when it is built, not after training."""
        if name not in self.stages:
            raise ConfigError(f"unknown layer {name!r} for {type(self).__name__}; choices: {list(self.layer_names)}")

    def features(self, x: torch.Tensor, layers: Sequence[str] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Penultimate features of `x` and the outputs of the requested stages."""
        for name in layers:
            self.check_layer(name)
        wanted = set(layers)
        kept: dict[str, torch.Tensor] = {}
        try:
            for name, stage in self.stages.items():
                x = stage(x)
                if name in wanted:
                    kept[name] = x
            h, width = self.pool(x), self.fc.in_features
        except AttributeError as err:  # a part of another type: "'Sequential' object has no attribute 'items'"
            self.check_contract(err)
            raise
        if h.dim() != 2 or h.shape[1] != width:  # else "mat1 and mat2 shapes cannot be multiplied"
            raise ConfigError(f"{type(self).__name__}'s pool gives features of shape {tuple(h.shape)}, not [N, {width}] "
                              "as its fc reads: end `pool` with a flatten (GlobalPool) and give fc the last stage's "
                              "channels")
        return h, kept

    def forward_from(self, layer: str, z: torch.Tensor) -> torch.Tensor:
        """Penultimate features computed from `z`, the output of stage `layer` (the stages after it run)."""
        self.check_layer(layer)
        names = self.layer_names
        for name in names[names.index(layer) + 1 :]:
            z = self.stages[name](z)
        return self.pool(z)

    def forward_to(self, layer: str, x: torch.Tensor) -> torch.Tensor:
        """The output of stage `layer` for input `x`; the stages after it do not run."""
        self.check_layer(layer)
        for name, stage in self.stages.items():
            x = stage(x)
            if name == layer:
                break
        return x

    def run(self, x: torch.Tensor, layers: Sequence[str] = ()) -> BackboneOutput:
        """Logits, features and requested stage outputs from one pass."""
        h, kept = self.features(x, layers)
        return BackboneOutput(self.fc(h), h, kept)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.fc(self.features(x)[0])


def input_channels(module: nn.Module, channels: int | None = None, image_size: int = 224) -> int | None:
    """The image channels a network reads: those of its first registered convolution (a CNN's stem, a ViT's patch
    embedding); None without one, or for a lazy one not yet run without `channels`.

    Given the data's `channels`, a first registered convolution that reads others is checked by running the network
    once, as registration order need not be run order (an auxiliary head defined before the stem, a 1->3 convolution
    or `x.expand(-1, 3, -1, -1)` turning grey input into RGB): the forward of one `channels`-channel `image_size`
    image (no_grad, eval mode, each module's mode restored, none of the caller's forward hooks run) gives `channels` when it runs, else the channels of the
    convolution handed other channels than it reads (the one that refused the image), else `channels` when some
    convolution ran (the forward failed for another reason: a 224-pixel probe of a net sized for 16-pixel images, which
    its own run reports), else those of the first registered one (it stopped before any)."""
    first = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    if isinstance(first, nn.modules.lazy.LazyModuleMixin) and first.has_uninitialized_params():
        return channels  # a `LazyConv2d` (in_channels 0 until its first forward) reads what it is given
    if first is None or channels is None or first.in_channels == channels:
        return None if first is None else first.in_channels
    given: list[tuple[int, int]] = []  # (channels read, channels given) of each convolution run, in run order

    def record(conv: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        given.append((conv.in_channels, x.shape[-3] if isinstance(x, torch.Tensor) and x.dim() >= 3 else conv.in_channels))

    with probing(module):  # the probe's own hooks go with the stand-in hook tables
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                m.register_forward_pre_hook(record)
        try:
            module(first.weight.new_zeros(1, channels, image_size, image_size))
            return channels
        except Exception:  # any failure: the convolutions that ran tell whether the channels were the cause
            refused = next((reads for reads, got in given if reads != got), None)
            return refused if refused is not None else channels if given else first.in_channels


@contextmanager
def probing(module: nn.Module) -> Iterator[None]:
    """Run `module` for a probe that is no pass of the caller's: no_grad, eval mode with each module's own mode put
    back afterwards (a frozen part may stay in eval mode), and none of the caller's forward hooks run (a feature log
    would have seen the probe's image); hooks registered inside go with the stand-in hook tables."""
    modes = [(m, m.training) for m in module.modules()]
    with _without_forward_hooks(module), torch.no_grad():
        module.eval()
        try:
            yield
        finally:
            for part, training in modes:
                part.training = training


#: torch's tables of the forward hooks of every module (`register_module_forward_hook` and its pre-hook)
_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_forward_hooks_with_kwargs",
                 "_global_forward_hooks_always_called")
#: those of each module (`register_forward_hook`, `register_forward_pre_hook`)
_MODULE_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
                 "_forward_hooks_always_called")


@contextmanager
def _without_forward_hooks(module: nn.Module) -> Iterator[None]:
    """Empty forward hook tables on `module`'s submodules and torch's global ones, the caller's put back afterwards
    (also on an exception): a probe's forward (`probing`) is no pass of the caller's, whose hooks (a
    feature log) would have seen it."""
    import torch.nn.modules.module as torch_module

    saved = [(m, name, getattr(m, name)) for m in module.modules() for name in _MODULE_HOOKS if hasattr(m, name)]
    saved += [(torch_module, name, getattr(torch_module, name)) for name in _GLOBAL_HOOKS if hasattr(torch_module, name)]
    try:
        for owner, name, table in saved:
            setattr(owner, name, type(table)())
        yield
    finally:
        for owner, name, table in saved:
            setattr(owner, name, table)


#: the parts every `Backbone` sets, and the module type each must be (None: any module)
CONTRACT: dict[str, type[nn.Module] | None] = {"stages": nn.ModuleDict, "pool": None, "fc": nn.Linear}


class GlobalPool(nn.Sequential):
    """Global average pooling followed by flattening: [N, D, H, W] -> [N, D]."""

    def __init__(self) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
