"""Any classifier as a `Backbone`: timm and torchvision models with exact stage splits, any other `nn.Module` by hooks.

The wrapped network stays whole and is registered as `net`, so its state dict keeps the library's own parameter
names under `net.`; nothing is copied or rebuilt.

- `StagedModel` (timm ResNet / ConvNeXt / VisionTransformer, torchvision ResNet and WideResNet / DenseNet /
  EfficientNet / ConvNeXt / VisionTransformer): the library's forward pass written as named stages of the network's
  own sub-modules, so `features`, stage outputs and `forward_from(stage, z)` reproduce `net(x)` exactly
  (tests compare them). timm's split follows `forward_features` then `forward_head(pre_logits=True)`; stage names
  follow timm's `feature_info` / torchvision's children (`stem`, `layer1`.., `stage1`.., `block0`..). Any other
  timm model has one stage, `features` (`forward_features`), before `forward_head(pre_logits=True)`. OpenOOD's own
  `ResNet18_32x32` / `ResNet18_64x64` (openood/networks, copied into a user's code) split as OpenOOD's
  `return_feature_list` does: `stem` (conv1, bn1, ReLU: its feature1), `layer1`..`layer4`, pooled `fc` input.
  Matched by their layout alone, that split is checked on one random image as it is built: a copy whose forward
  computes other logits (a functional max-pool added in the stem) is wrapped whole (`ModuleBackbone`), with a warning.
- `ModuleBackbone` (anything else): the penultimate feature is the input of the final linear layer, caught by a
  forward pre-hook on it: the layer named `feature_layer`, else the first of `fc`, `head`, `heads.head`,
  `classifier`, `last_linear` that is (or ends with) an `nn.Linear`, else the last `nn.Linear` registered. The logits
  are its output, or the output's `logits` (a dict, Hugging Face's `ImageClassifierOutput`). Intermediate outputs are
  named by module path (forward hooks). Such a model cannot be run from a layer onward: `forward_from` fails naming
  the models that can.

`timm_backbone` / `torchvision_backbone` / `module_backbone` build a network with random weights (`pretrained=False`,
`weights=None`: nothing is downloaded, ever), load `weights` from a local file through `ood.models.checkpoint`, and
wrap it (`conf/backbone/{timm,torchvision,module}.yaml`). `as_backbone(model)` wraps a model object (Python API).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ood.errors import CheckpointError, ConfigError, working_directory_hint
from ood.models.base import Backbone, BackboneOutput, input_channels, probing
from ood.models.checkpoint import read_weights_file
from ood.utils import exact_float32

#: module paths tried, in order, for the final linear layer of a model without a library split
HEAD_NAMES = ("fc", "head", "heads.head", "classifier", "last_linear")
#: one-line summary of the models with an exact stage split (error messages)
SPLIT_MODELS = (
    "timm ResNet / ConvNeXt / VisionTransformer (any other timm model: one stage, `features`), torchvision "
    "ResNet / WideResNet / DenseNet / EfficientNet / ConvNeXt / VisionTransformer, OpenOOD's ResNet18_32x32 / _64x64"
)
LIBRARIES = ("timm", "torchvision", "module")


def _linear_at(net: nn.Module, path: str) -> tuple[str, nn.Linear] | None:
    """(`path` of the linear layer, layer) for module `path`, or for the last `nn.Linear` inside it."""
    try:
        module = net.get_submodule(path)
    except AttributeError:
        return None
    if isinstance(module, nn.Linear):
        return path, module
    inner = [(f"{path}.{n}", m) for n, m in module.named_modules() if n and isinstance(m, nn.Linear)]
    return inner[-1] if inner else None


def find_head(net: nn.Module, feature_layer: str | None = None) -> str:
    """Module path of the final linear layer of `net` (see the module docstring)."""
    if feature_layer is not None:
        found = _linear_at(net, feature_layer)
        if found is None:
            linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
            raise ConfigError(
                f"feature_layer={feature_layer!r} is not a linear layer of {type(net).__name__} (the penultimate "
                f"feature is the input of the final linear layer); linear layers: {linears}"
            )
        return found[0]
    for name in HEAD_NAMES:
        found = _linear_at(net, name)
        if found is not None:
            return found[0]
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(
            f"{type(net).__name__} has no nn.Linear layer: ood reads the penultimate feature as the input of the "
            "final linear layer, whose weight and bias the detectors use (feature_layer= can only name such a layer); "
            "give a model that ends in an nn.Linear"
        )
    return linears[-1]


class AdaptedBackbone(Backbone):
    """A whole network `net` with its final linear layer at module path `head` (`fc`)."""

    wraps_network = True

    def __init__(self, net: nn.Module, head: str) -> None:
        super().__init__()
        self.net = net
        self.head = head

    @property
    def fc(self) -> nn.Linear:  # type: ignore[override]
        return self.net.get_submodule(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return network_logits(type(self.net).__name__, self.net(x))


def network_logits(name: str, output: Any) -> torch.Tensor:
    """The logits in a network's output: the tensor itself, or its `logits` entry or attribute (a dict, Hugging Face's
    `ImageClassifierOutput`); anything else (a tuple, which does not say which of its tensors are the logits) is
    refused in one line."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise ConfigError(f"{name} returns a {type(output).__name__}, not a logits tensor or an output with `logits`: wrap "
                      "it in a module whose forward returns the logits alone")


class ModuleBackbone(AdaptedBackbone):
    """Any classifier: features = input of its final linear layer (pre-hook), layers = outputs of modules by path.

    Args:
        net: the classifier (images -> logits).
        feature_layer: module path of the final linear layer; None: found automatically (module docstring).
    """

    staged = False

    def __init__(self, net: nn.Module, feature_layer: str | None = None) -> None:
        super().__init__(net, find_head(net, feature_layer))
        self._head_checked = False

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.net.named_modules() if n)

    def check_layer(self, name: str) -> None:
        if name not in dict(self.net.named_modules()) or not name:
            raise ConfigError(
                f"unknown layer {name!r} for {type(self.net).__name__}: layers are module paths; choices: "
                f"{list(self.layer_names)}"
            )

    def run(self, x: torch.Tensor, layers: Sequence[str] = ()) -> BackboneOutput:
        """Logits (the network's own output), features (input of the head) and named module outputs, one pass."""
        for name in layers:
            self.check_layer(name)
        caught: dict[str, torch.Tensor] = {}

        def keep_input(module: nn.Module, args: tuple[Any, ...]) -> None:
            caught["__features__"] = args[0]

        def keep_output(name: str) -> Any:
            return lambda module, args, output: caught.__setitem__(name, output)

        handles = [self.fc.register_forward_pre_hook(keep_input), self.fc.register_forward_hook(keep_output("__head__"))]
        handles += [self.net.get_submodule(name).register_forward_hook(keep_output(name)) for name in layers]
        try:
            logits = network_logits(type(self.net).__name__, self.net(x))
        finally:
            for handle in handles:
                handle.remove()
        check_not_probabilities(type(self.net).__name__, logits)
        if "__features__" not in caught:
            raise ConfigError(f"{type(self.net).__name__} never called its head {self.head!r}; set feature_layer")
        h = caught.pop("__features__")
        head_out = caught.pop("__head__")
        if not self._head_checked:  # once: the first batch tells
            self._head_checked = True
            check_head_output(type(self.net).__name__, self.head, head_out, logits)
        if h.dim() != 2:
            raise ConfigError(
                f"the input of {type(self.net).__name__}.{self.head} has shape {tuple(h.shape)}, not [N, D]: name the "
                "final linear layer that reads one feature vector per image with feature_layer=<module path>"
            )
        return BackboneOutput(logits, h, {name: caught[name] for name in layers})

    def features(self, x: torch.Tensor, layers: Sequence[str] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.run(x, layers)
        return out.features, out.layers

    def forward_from(self, layer: str, z: torch.Tensor) -> torch.Tensor:
        raise unsplit_error(self.net, layer)


def check_not_probabilities(name: str, logits: torch.Tensor) -> None:
    """One line for a model whose forward ends in a softmax or log-softmax: the detectors read logits and were
    silently given probabilities (energy, a log-sum-exp, is 0 for every image of a log-softmax: AUROC 0.5; ReAct,
    ViM and the others that recompute logits from the head's weights no longer match the output). Rows of 2+
    classes only; real logits do not sum to 1 in every row."""
    if logits.dim() != 2 or logits.shape[1] < 2 or not logits.is_floating_point():
        return
    rows = logits.detach().double()

    def sum_to_one(totals: torch.Tensor) -> bool:
        return torch.allclose(totals, torch.ones_like(totals), rtol=0, atol=1e-4)

    what = ("probabilities (softmax)" if bool((rows >= 0).all()) and sum_to_one(rows.sum(1))
            else "log-probabilities (log-softmax)" if sum_to_one(rows.logsumexp(1).exp()) else None)
    if what is not None:
        raise ConfigError(f"{name} returns {what}, not logits: the detectors read logits (energy, max-logit, the "
                          "head's weights); return the output before the softmax")


def check_head_output(name: str, head: str, head_out: torch.Tensor, logits: torch.Tensor) -> None:
    """Warn when the network's output is not its head's (a scale, a cosine normalisation or a layer after it): the
    logit scores read the output, while the detectors that recompute logits from the head's weights and input (react,
    ash, dice, scale, vra, vim, ...) read the head's, so the two families silently score different functions."""
    if head_out.shape != logits.shape:
        detail = f"shape {tuple(head_out.shape)} vs {tuple(logits.shape)}"
    elif not torch.allclose(head_out.detach().float(), logits.detach().float(), rtol=1e-3, atol=1e-3, equal_nan=True):
        detail = f"largest difference {(head_out.detach().float() - logits.detach().float()).abs().max().item():.3g}"
    else:
        return
    warnings.warn(f"{name}'s output is not the output of its head {head!r} ({detail}): msp, energy and the other logit "
                  "scores read its output, the detectors that recompute logits from the head's weights (react, ash, dice, "
                  "scale, vra, vim, ...) the head's; give feature_layer= the linear layer whose output is the logits, or "
                  "wrap the model so that its forward ends with it", stacklevel=2)


def unsplit_error(net: nn.Module, layer: str) -> ConfigError:
    """The one line for running `net`, wrapped as a whole, from `layer` onward (GROOD's mix-up prototype does)."""
    return ConfigError(
        f"{type(net).__name__} is wrapped as a whole (features by a hook), so it cannot be run from layer "
        f"{layer!r} onward; models with an exact stage split: {SPLIT_MODELS}. For grood pick "
        "method.ood_proto_source= one of [val_ood, uniform_noise, proto_mean], which need no split"
    )


#: a stage is a sequence of steps: a module path of `net`, or `@name` for the `_step_name` method
Steps = tuple[str, ...]


class StagedModel(AdaptedBackbone):
    """A library model split into named stages of its own sub-modules (`stages`: name -> steps), a pooling step list
    (`pool`) to the penultimate feature, and its final linear layer `head`; `forward_from` is exact."""

    def __init__(self, net: nn.Module, stages: Mapping[str, Steps], pool: Steps, head: str) -> None:
        super().__init__(net, head)
        self.stage_steps = {name: tuple(steps) for name, steps in stages.items()}
        self.pool_steps = tuple(pool)
        self.nhwc_stages = getattr(net, "output_fmt", "NCHW") == "NHWC"

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(self.stage_steps)

    def check_layer(self, name: str) -> None:
        if name not in self.stage_steps:
            raise ConfigError(f"unknown layer {name!r} for {type(self.net).__name__}; choices: {list(self.layer_names)}")

    def _steps(self, steps: Steps, x: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x = getattr(self, f"_step_{step[1:]}")(x) if step.startswith("@") else self.net.get_submodule(step)(x)
        return x

    def features(self, x: torch.Tensor, layers: Sequence[str] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        for name in layers:
            self.check_layer(name)
        kept = {}
        for name, steps in self.stage_steps.items():
            x = self._steps(steps, x)
            if name in layers:
                kept[name] = x
        return self._steps(self.pool_steps, x), kept

    def forward_from(self, layer: str, z: torch.Tensor) -> torch.Tensor:
        self.check_layer(layer)
        names = self.layer_names
        for name in names[names.index(layer) + 1 :]:
            z = self._steps(self.stage_steps[name], z)
        return self._steps(self.pool_steps, z)

    def stage_module(self, name: str) -> nn.Module | None:
        self.check_layer(name)
        last = self.stage_steps[name][-1]
        return None if last.startswith("@") else self.net.get_submodule(last)

    def forward_to(self, layer: str, x: torch.Tensor) -> torch.Tensor:
        self.check_layer(layer)
        for name, steps in self.stage_steps.items():
            x = self._steps(steps, x)
            if name == layer:
                break
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x)[0])

    # ----- steps that are not a sub-module call ---------------------------------------------------------------
    def _step_flatten(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1)

    def _step_relu(self, x: torch.Tensor) -> torch.Tensor:
        """OpenOOD's ResNet18_32x32 stem ends in a functional ReLU (`F.relu`), not a module."""
        return nn.functional.relu(x)

    def _step_relu_pool(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision DenseNet's tail: ReLU, global average pool, flatten."""
        return torch.flatten(nn.functional.adaptive_avg_pool2d(nn.functional.relu(x), 1), 1)

    def _step_pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """timm's `forward_head(pre_logits=True)`."""
        return self.net.forward_head(x, pre_logits=True)

    def _step_timm_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)

    def _step_timm_vit_stem(self, x: torch.Tensor) -> torch.Tensor:
        """timm ViT's `forward_features` up to the blocks: patch embedding, position embedding, norm_pre."""
        net = self.net
        return net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(x))))

    def _step_tv_vit_stem(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision ViT up to the encoder layers: patches, class token, position embedding, dropout."""
        net = self.net
        x = net._process_input(x)
        x = torch.cat([net.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return net.encoder.dropout(x + net.encoder.pos_embedding)

    def _step_class_token(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


def _numbered(prefix: str, paths: Sequence[str], first: int = 0) -> dict[str, Steps]:
    return {f"{prefix}{i}": (path,) for i, path in enumerate(paths, start=first)}


def staged_split(net: nn.Module) -> tuple[dict[str, Steps], Steps, str] | None:
    """(stages, pool steps, head path) of a library model with a known exact split; None for any other model."""
    from torchvision import models as tv

    if isinstance(net, tv.ResNet):  # ResNet and WideResNet
        stages = {"stem": ("conv1", "bn1", "relu"), "layer1": ("maxpool", "layer1")}
        return {**stages, **{f"layer{i}": (f"layer{i}",) for i in (2, 3, 4)}}, ("avgpool", "@flatten"), "fc"
    if isinstance(net, tv.DenseNet):
        f = "features."
        stages = {"stem": tuple(f + n for n in ("conv0", "norm0", "relu0", "pool0"))}
        stages |= {f"block{i}": (f"{f}denseblock{i}", f"{f}transition{i}") for i in (1, 2, 3)}
        stages["block4"] = (f"{f}denseblock4", f"{f}norm5")
        return stages, ("@relu_pool",), "classifier"
    if isinstance(net, tv.EfficientNet):
        n = len(net.features)
        stages = {"stem": ("features.0",), **_numbered("stage", [f"features.{i}" for i in range(1, n - 1)], 1)}
        stages["top"] = (f"features.{n - 1}",)
        return stages, ("avgpool", "@flatten", "classifier.0"), "classifier.1"
    if isinstance(net, tv.ConvNeXt):
        n = len(net.features)  # stem, stage, (downsample, stage) x 3
        stages = {"stem": ("features.0",), "stage1": ("features.1",)}
        stages |= {f"stage{k}": (f"features.{i}", f"features.{i + 1}") for k, i in enumerate(range(2, n, 2), start=2)}
        return stages, ("avgpool", "classifier.0", "classifier.1"), "classifier.2"
    if isinstance(net, tv.VisionTransformer):
        blocks = _numbered("block", [f"encoder.layers.{name}" for name, _ in net.encoder.layers.named_children()])
        pool = ("encoder.ln", "@class_token", *(("heads.pre_logits", "heads.act") if hasattr(net.heads, "pre_logits") else ()))
        return {"stem": ("@tv_vit_stem",), **blocks}, pool, "heads.head"
    if is_openood_resnet(net):
        return {"stem": ("conv1", "bn1", "@relu"), **{f"layer{i}": (f"layer{i}",) for i in (1, 2, 3, 4)}}, ("avgpool", "@flatten"), "fc"
    if not hasattr(net, "forward_head") or not hasattr(net, "get_classifier"):
        return None
    from timm.models import convnext, resnet, vision_transformer

    head = _module_path(net, net.get_classifier())
    if isinstance(net, resnet.ResNet):
        stages = {"stem": ("conv1", "bn1", "act1"), "layer1": ("maxpool", "layer1")}
        return {**stages, **{f"layer{i}": (f"layer{i}",) for i in (2, 3, 4)}}, ("@pre_logits",), head
    if isinstance(net, convnext.ConvNeXt):
        stages = {"stem": ("stem",), **_numbered("stage", [f"stages.{i}" for i in range(len(net.stages))], 1)}
        return stages, ("norm_pre", "@pre_logits"), head
    if isinstance(net, vision_transformer.VisionTransformer):
        blocks = _numbered("block", [f"blocks.{i}" for i in range(len(net.blocks))])
        return {"stem": ("@timm_vit_stem",), **blocks}, ("norm", "@pre_logits"), head
    return {"features": ("@timm_features",)}, ("@pre_logits",), head


def is_openood_resnet(net: nn.Module) -> bool:
    """OpenOOD's ResNet18_32x32 / ResNet18_64x64 (openood/networks): `forward(x, return_feature=False,
    return_feature_list=False)` over conv1, bn1, a functional ReLU, layer1..layer4, avgpool and fc, with no max-pool
    (its 224 px ResNets subclass torchvision's and split as those)."""
    parts = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
    return (all(isinstance(getattr(net, part, None), nn.Module) for part in parts) and not hasattr(net, "maxpool")
            and "return_feature_list" in inspect.signature(net.forward).parameters)


def _module_path(net: nn.Module, module: nn.Module) -> str:
    for name, candidate in net.named_modules():
        if candidate is module and name:
            return name
    raise ConfigError(f"{type(net).__name__}: its classifier is not one of its sub-modules")


def as_backbone(model: nn.Module, feature_layer: str | None = None) -> Backbone:
    """`model` as a `Backbone`: itself when it is one, an exact stage split for the library models that have one
    (unless `feature_layer` names another head than the split's), else `ModuleBackbone`."""
    return model if isinstance(model, Backbone) else _checked(_adapted(model, feature_layer), feature_layer)


def _adapted(model: nn.Module, feature_layer: str | None) -> Backbone:
    """`as_backbone` before `_checked`: a network with OpenOOD's ResNet layout is split unchecked."""
    if isinstance(model, Backbone):
        return model
    split = staged_split(model)
    if split is not None and feature_layer in (None, split[2]) and isinstance(model.get_submodule(split[2]), nn.Linear):
        return StagedModel(model, *split)
    return ModuleBackbone(model, feature_layer)


def _checked(backbone: Backbone, feature_layer: str | None) -> Backbone:
    """`backbone`, or its network wrapped whole (one warning) where it was split as OpenOOD's ResNet by its layout
    alone and the split computes other logits than its forward (`split_difference`): run on the weights it has, so
    `_wrap` checks after loading a weights file (a step that is a no-op at initialisation shows only then)."""
    if not isinstance(backbone, StagedModel) or not is_openood_resnet(backbone.net):
        return backbone
    differs = split_difference(backbone)
    if differs is None:
        return backbone
    warnings.warn(f"{type(backbone.net).__name__} has the layout of OpenOOD's ResNet18_32x32 / _64x64 but its forward "
                  f"computes other logits than that split ({differs}): wrapped as a whole, so the detectors that read or "
                  "re-run its stages (rankfeat, mds_ensemble, nac, the AdaSCALEs) are skipped on it", stacklevel=3)
    return ModuleBackbone(backbone.net, feature_layer)


def split_difference(staged: StagedModel, image_size: int = 32) -> str | None:
    """None when the split's logits of two seeded random images equal `net(x)`'s within float tolerance (the square
    root of the dtype's eps, relative and absolute), else what differs: a copy of OpenOOD's class whose forward adds
    a step its modules do not show (a functional max-pool). Run on the stem's device and dtype, as a `probing` pass
    (the caller's hooks and modes untouched), outside any autocast and in `exact_float32`, so that the two passes agree
    to float32 rounding on a GPU too (TF32 convolutions, cuDNN's default there, are ~1e-3 off float32, and a cuDNN
    benchmark may choose another algorithm for each pass)."""
    net, stem = staged.net, staged.net.get_submodule(staged.stage_steps["stem"][0])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, stem.in_channels, image_size, image_size, generator=generator).to(stem.weight.device, stem.weight.dtype)
    with probing(net), exact_float32(), torch.autocast(x.device.type, enabled=False):
        try:
            whole, split = net(x), staged(x)
        except Exception as err:  # a forward for other images than the probe's: its split cannot be checked
            return f"its forward of a random {image_size}-pixel image failed: {err}"
    if not isinstance(whole, torch.Tensor) or whole.shape != split.shape:
        return f"it returns {type(whole).__name__} {tuple(getattr(whole, 'shape', ()))}, the split {tuple(split.shape)}"
    tolerance = torch.finfo(whole.dtype).eps ** 0.5
    if torch.allclose(split, whole, rtol=tolerance, atol=tolerance):
        return None
    return f"largest difference {(split - whole).abs().max().item():.3g} on a random image"


def check_classes(backbone: Backbone, num_classes: int, where: str) -> None:
    """One line when the head's class count differs from the ID classes (`where`: the data they come from)."""
    if backbone.num_classes != num_classes:
        head = getattr(backbone, "head", "fc")
        raise ConfigError(
            f"the model's head, layer {head!r}, has {backbone.num_classes} outputs but {where} has {num_classes} classes; "
            "give a model trained on these classes (or data with the classes it was trained on)"
        )


def load_weights_into(backbone: Backbone, path: str | Path) -> None:
    """Load a local weights file into a wrapped network, strictly: the network's own state dict (timm, torchvision,
    HF `pytorch_model.bin` / `model.safetensors`, a bare `.pth`), or a checkpoint of this framework (Lightning or
    bare, keys `backbone.*`). A head of another size fails naming the file and both class counts."""
    state = read_weights_file(path)
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    adapted = isinstance(backbone, AdaptedBackbone)
    # a checkpoint of the wrapper (or of an ood Backbone), else of the wrapped network itself
    own_names = not adapted or any(k.startswith("net.") for k in state)
    target: nn.Module = backbone if own_names else backbone.net  # type: ignore[union-attr]
    own = target.state_dict()
    head = f"{backbone.head}.weight" if adapted else "fc.weight"  # type: ignore[union-attr]
    head = f"net.{head}" if adapted and own_names else head
    if head in state and head in own and state[head].shape[0] != own[head].shape[0]:
        raise ConfigError(
            f"weights {path} have a {state[head].shape[0]}-class head ({head} {tuple(state[head].shape)}) but the "
            f"ID data has {own[head].shape[0]} classes: evaluate weights trained on these classes (fine-tune a "
            "pretrained model on them first), or give data whose classes are the head's"
        )
    if head in state and head in own and state[head].shape != own[head].shape:
        raise ConfigError(
            f"weights {path} do not fit: their head {head} reads {state[head].shape[1]} features, the model's "
            f"{own[head].shape[1]} (same classes, another width: pass the settings the weights were trained with)"
        )
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        first = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise CheckpointError(
            f"weights {path} do not fit {type(target).__name__}: {first} ({len(missing)} missing, {len(unexpected)} "
            "unexpected keys); pass the backbone.name it was trained with"
        )
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise CheckpointError(
                f"weights {path} do not fit: {key} has shape {tuple(value.shape)} in the file and {tuple(own[key].shape)} in the model"
            )
    target.load_state_dict(state, strict=True)


def architecture_digest(net: nn.Module) -> str:
    """12 hex digits of the SHA-1 of `net`'s parameter and buffer names and shapes: what tells two widths of one class
    apart (`ood.evaluate` records it as `backbone.shapes` where the class or builder name alone does not)."""
    text = ";".join(f"{k}:{tuple(v.shape)}" for k, v in net.state_dict().items())
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _wrap(
    net: nn.Module, num_classes: int, weights: str | None, feature_layer: str | None, where: str, shapes: str | None = None
) -> Backbone:
    """`net` as a `Backbone` with its weights; `shapes`: the `architecture_digest` it must have (a recorded run's)."""
    if shapes is not None and architecture_digest(net) != shapes:
        raise ConfigError(f"backbone.shapes={shapes} is the digest of the network the run evaluated; this one has "
                          f"{architecture_digest(net)} (other layer widths or layers): drop backbone.shapes or build that network")
    backbone = _adapted(net, feature_layer)
    if weights is not None:
        load_weights_into(backbone, weights)
    backbone = _checked(backbone, feature_layer)  # on the weights the network will run with
    check_classes(backbone, num_classes, where)
    return backbone


def timm_backbone(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    weights: str | None = None,
    feature_layer: str | None = None,
    library: str = "timm",
    shapes: str | None = None,
    **kwargs: Any,
) -> Backbone:
    """`timm.create_model(name, pretrained=False, num_classes, in_chans, **kwargs)`, weights from `weights`."""
    import timm

    base, _, tag = name.partition(".")
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=5)
        some = f"closest: {close}" if close else f"e.g. {timm.list_models('resnet1*')}"
        raise ConfigError(f"unknown timm model {name!r}; {some} (all: timm.list_models())")
    if tag and name not in timm.list_pretrained(f"{base}.*"):  # timm: "Invalid pretrained tag (...)", no choices
        raise ConfigError(f"timm has no pretrained tag {tag!r} of {base}; its tags: "
                          f"{[t.partition('.')[2] for t in timm.list_pretrained(f'{base}.*')]} (or {base!r} alone)")
    net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    return _wrap(net, num_classes, weights, feature_layer, "the ID data", shapes)


def torchvision_backbone(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    weights: str | None = None,
    feature_layer: str | None = None,
    library: str = "torchvision",
    shapes: str | None = None,
    **kwargs: Any,
) -> Backbone:
    """`torchvision.models.get_model(name, weights=None, num_classes, **kwargs)`, weights from `weights`."""
    from torchvision import models

    choices = models.list_models(module=models)
    if name not in choices:
        raise ConfigError(f"unknown torchvision model {name!r}; closest: {difflib.get_close_matches(name, choices, n=5)}, "
                          f"choices: {choices}")
    if in_channels != 3:
        raise ConfigError(f"backbone=torchvision builds 3-channel models; the data has {in_channels} channels")
    net = models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    return _wrap(net, num_classes, weights, feature_layer, "the ID data", shapes)


def module_backbone(
    target: str,
    num_classes: int,
    in_channels: int = 3,
    weights: str | None = None,
    feature_layer: str | None = None,
    library: str = "module",
    shapes: str | None = None,
    **kwargs: Any,
) -> Backbone:
    """`<target>(**kwargs)` for any importable class or function `target` (`my_pkg.nets.MyNet`); `num_classes` is
    passed when its signature names it or takes `**kwargs`, `in_channels` when it names it."""
    module_name, _, attr = target.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        hint = working_directory_hint(module_name, err)
        raise ConfigError(f"backbone.target={target!r} cannot be imported: {err}{hint}") from None
    params = inspect.signature(factory).parameters
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = {"num_classes": num_classes} if "num_classes" in params or open_kwargs else {}
    given |= {"in_channels": in_channels} if "in_channels" in params else {}
    net = factory(**given, **kwargs)
    reads = input_channels(net, in_channels)
    if reads is not None and reads != in_channels:  # else a conv's "expected input ... to have 3 channels" mid-run
        raise ConfigError(f"{target} reads {reads}-channel images (its first convolution) but the data has {in_channels}: "
                          "give its constructor an `in_channels` argument (ood passes the data's), or set its own channel "
                          f"argument: +backbone.<its argument>={in_channels}")
    return _wrap(net, num_classes, weights, feature_layer, "the ID data", shapes)
