"""The one way weights get into a model: read any supported checkpoint file, then load chosen sub-modules strictly.

Supported files (detected from their keys, no flag needed):
- a Lightning checkpoint (`{"state_dict": {...}, ...}`, e.g. `<run>/checkpoints/last.ckpt`);
- a bare state dict of a method (`backbone.stages...`) or of a backbone alone (`stages...`, `fc...`);
- OpenOOD v1.5's released CIFAR `ResNet18_32x32` files (`conv1`, `bn1`, `layerN.i.shortcut`, optional
  DataParallel `module.` prefix; openood/networks/resnet18_32x32.py);
- the Wide ResNet files of hendrycks/outlier-exposure, wetliu/energy_ood and OpenOOD (one `WideResNet` in
  `CIFAR/models/wrn.py` / openood/networks/wrn.py: `conv1`, `blockN.layer.i` with `convShortcut`, the final `bn1`,
  `fc`; e.g. energy_ood's `cifar10_wrn_pretrained_epoch_99.pt`), mapped onto `backbone=wrn40_2` (the final BN closes
  our `block3`, after its blocks);
- jhornauer/heatmap_ood's released files (`from_heatmap_ood`): a classifier `Models/<data>_resnet18.pt`
  (`{"net_state_dict": ..., "cls_state_dict": {"linear.*"}}`, kuangliu's = OpenOOD's ResNet-18 names) or
  `Models/<data>_wideresnet_40_2.pt` (meliketoy's Wide_ResNet: `from_meliketoy_wrn`, onto `backbone=wrn40_2_heatmap`) and a heatmap
  decoder `checkpoints/<run>/model.pt` (`{"min", "max", 9: {"generator": ...}, ..., 149: ...}`, read by the
  `method.decoder_ckpt` of `method=heatmap`);
- torchvision's ResNet state dicts (`conv1`, `bn1`, `layerN.i.downsample`, `fc`; e.g. `IMAGENET1K_V1` from the torch
  hub cache), mapped onto our staged ResNet-50 (`layer1` opens with the max-pool, so it is `stages.layer1.1`);
- any of these saved from a `torch.compile`d or DataParallel / DDP-wrapped network (`_orig_mod.`, `module.` in the
  names are dropped: `plain_key`), or by a training script beside its own state (`{"model": state, "epoch": ...}`,
  `model_state_dict`, `net`, a `state_dict` without Lightning's version key, a pickled network under one of them,
  an optimizer's state or a tensor beside the weights: `unwrap`).

`read_weights_file(path)` returns a file's parameters under their own names (any network's bare state dict as
`.pth` / `.pt` / `.bin` / `.safetensors`, e.g. timm's or Hugging Face's `pytorch_model.bin` / `model.safetensors`,
or a Lightning checkpoint's `state_dict`), for wrappers of library models (`ood.models.adapters`).
`read_state_dict(path)` returns method-level keys (`backbone.*` for backbone-only formats); `load_modules` copies
the requested sub-modules and fails naming the file, the first mismatched key and both shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ood.errors import CheckpointError
from ood.files import read_torch_file

_OPENOOD_RESNET18 = (
    (re.compile(r"^conv1\."), "stages.stem.0."),
    (re.compile(r"^bn1\."), "stages.stem.1."),
    (re.compile(r"^(layer\d)\.(\d+)\.shortcut\."), r"stages.\1.\2.downsample."),
    (re.compile(r"^(layer\d)\."), r"stages.\1."),
)
_TORCHVISION_RESNET = (
    (re.compile(r"^conv1\."), "stages.stem.0."),
    (re.compile(r"^bn1\."), "stages.stem.1."),
    (re.compile(r"^layer1\."), "stages.layer1.1."),
    (re.compile(r"^(layer[234])\."), r"stages.\1."),
)

_WIDE_RESNET = (
    (re.compile(r"^conv1\."), "stages.stem."),
    (re.compile(r"^(block\d)\.layer\.(\d+)\.convShortcut\."), r"stages.\1.\2.shortcut."),
    (re.compile(r"^(block\d)\.layer\.(\d+)\."), r"stages.\1.\2."),
)


def plain_key(key: object) -> str:
    """A parameter name without its wrappers' parts: DataParallel's / DDP's leading `module.` and `torch.compile`'s
    `_orig_mod.` (anywhere: a compiled sub-module puts it mid-name, `backbone._orig_mod.stages...`)."""
    return ".".join(part for part in str(key).split(".") if part != "_orig_mod").removeprefix("module.")


def _rename(state: Mapping[str, torch.Tensor], table: tuple, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        key = plain_key(key)
        for pattern, replacement in table:
            key, n = pattern.subn(replacement, key)
            if n:
                break
        out[prefix + key] = value
    return out


#: keys under which training scripts save the network's state dict beside their own state, in the order taken:
#: torchvision's reference scripts and DeiT / ConvNeXt (`model`, `model_ema`), tutorials (`model_state_dict`),
#: kuangliu/pytorch-cifar (`net`, its first versions the pickled network itself), timm's train script and
#: pytorch-classification (`state_dict` without Lightning's version key; timm's `state_dict_ema` beside it)
WRAPPER_KEYS = ("model", "model_state_dict", "net", "state_dict", "state_dict_ema", "model_ema")

#: the key Lightning writes into every checkpoint it saves: a `state_dict` beside it is a LightningModule's
LIGHTNING_VERSION = "pytorch-lightning_version"


def _is_state(value: object) -> bool:
    """A state dict: tensors by name, and any object a module's `get_extra_state` saved (`<module>._extra_state`)."""
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(v, torch.Tensor) or str(k).endswith("_extra_state") for k, v in value.items())


def unwrap(checkpoint: object, path: Path) -> object:
    """The state dict inside a file: of a pickled module (`torch.save(model)`), of a training script's file
    (`{"model": state or module, "optimizer": ..., "best_acc": tensor(...)}`: `WRAPPER_KEYS`, looked at before the
    top level's tensors: a tensor of the script's bookkeeping read the file as a state dict of its keys), the tensors
    of a state dict saved beside bookkeeping (`{**state, "epoch": 3}`), or the file's object itself (a state dict, a
    Lightning checkpoint, heatmap_ood's files). A `state_dict` without Lightning's version key is a script's wrapper:
    read as Lightning's, an OpenOOD / torchvision state inside kept its own names and missed every key. A file of
    none of these is one line naming its keys."""
    if isinstance(checkpoint, nn.Module):  # `torch.save(model)`: the module itself was pickled
        return checkpoint.state_dict()
    if not isinstance(checkpoint, Mapping) or _is_state(checkpoint) or _heatmap_ood_format(checkpoint):
        return checkpoint
    if LIGHTNING_VERSION in checkpoint and isinstance(checkpoint.get("state_dict"), Mapping):
        return checkpoint
    for key in WRAPPER_KEYS:
        value = checkpoint.get(key)
        if _is_state(value) or isinstance(value, nn.Module) or isinstance(value, Mapping) and _heatmap_ood_format(value):
            return unwrap(value, path)
    if any(isinstance(v, torch.Tensor) for v in checkpoint.values()):  # parameters' names are dotted paths
        return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor) or "." in str(k)}
    raise CheckpointError(f"weights {path} hold no parameters at the top level (keys: {sorted(map(str, checkpoint))[:10]}) "
                          f"nor under {list(WRAPPER_KEYS)}: save model.state_dict() itself")


def checkpoint_format(checkpoint: object) -> str:
    """`lightning`, `heatmap_ood` / `heatmap_ood_decoder`, `wide_resnet`, `openood`, `torchvision`, `backbone` (a bare
    backbone state dict) or `method` (bare, prefixed)."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"expected a dict, got {type(checkpoint).__name__}")
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
        return "lightning"
    if released := _heatmap_ood_format(checkpoint):
        return released
    keys = {plain_key(k) for k in checkpoint}
    if "conv1.weight" in keys and any(k.startswith("block1.layer.") for k in keys):
        return "wide_resnet"
    if {"conv1.weight", "bn1.weight", "fc.weight"} <= keys:
        return "openood" if any(".shortcut." in k for k in keys) or not any(".downsample." in k for k in keys) else "torchvision"
    if any(k.startswith(("stages.", "fc.")) for k in keys):
        return "backbone"
    return "method"


def from_openood(state: Mapping[str, torch.Tensor], prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """OpenOOD ResNet18_32x32 parameter names -> ours (with `prefix`, the method's attribute for its backbone)."""
    return _rename(state, _OPENOOD_RESNET18, prefix)


def from_meliketoy_wrn(state: Mapping[str, torch.Tensor], prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """meliketoy/wide-resnet.pytorch's `Wide_ResNet` names (heatmap_ood's WRN: `conv1`, `layerN.i`, the final `bn1`)
    -> our `MeliketoyWideResNet` (with `prefix`): `stem`, `blockN.i`, the final BN after `block3`'s blocks."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"layer3\.(\d+)\.", plain_key(k)))}
    table = (
        (re.compile(r"^conv1\."), "stages.stem."),
        (re.compile(r"^layer(\d)\."), r"stages.block\1."),
        (re.compile(r"^bn1\."), f"stages.block3.{len(blocks)}."),
    )
    return _rename(state, table, prefix)


def from_wide_resnet(state: Mapping[str, torch.Tensor], prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """The OE / energy_ood / OpenOOD `WideResNet` parameter names -> our `WideResNet` (with `prefix`): their final
    `bn1` is our `block3`'s entry after its blocks."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"block3\.layer\.(\d+)\.", plain_key(k)))}
    return _rename(state, (*_WIDE_RESNET, (re.compile(r"^bn1\."), f"stages.block3.{len(blocks)}.")), prefix)


def _heatmap_ood_format(checkpoint: Mapping) -> str | None:
    """`heatmap_ood` for jhornauer/heatmap_ood's classifier file (`optimization.train_classifier`), `heatmap_ood_decoder`
    for its decoder file (`optimization.learn_prototype`: the range and every 10th epoch's generator), else None."""
    if {"net_state_dict", "cls_state_dict"} <= set(checkpoint):
        return "heatmap_ood"
    if {"min", "max"} <= set(checkpoint) and any(isinstance(k, int) for k in checkpoint):
        return "heatmap_ood_decoder"
    return None


def from_heatmap_ood(checkpoint: Mapping, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """jhornauer/heatmap_ood's classifier file -> ours: its ResNet-18 and 64-px ResNet-50 encoders have OpenOOD's names
    (`from_openood`: `backbone=resnet18_32x32` / `resnet50_64x64`, whose stem's max-pool holds no parameters), its
    Wide_ResNet (key `conv1.bias`: meliketoy's biased convs) `backbone=wrn40_2_heatmap`'s (`from_meliketoy_wrn`); the
    `ResNet_Linear` / `WideResNet_Linear` head `linear.*` is our `fc`."""
    net = {plain_key(k): v for k, v in checkpoint["net_state_dict"].items()}
    head = {"fc." + plain_key(k).removeprefix("linear."): v for k, v in checkpoint["cls_state_dict"].items()}
    rename = from_meliketoy_wrn if "conv1.bias" in net else from_openood
    return rename({**net, **head}, prefix)


def from_heatmap_ood_decoder(checkpoint: Mapping, prefix: str = "decoder.") -> dict[str, torch.Tensor]:
    """jhornauer/heatmap_ood's decoder file -> `ood.models.decoder.HeatmapDecoder` names (with `prefix`) and the
    method's `feature_range` [min, max]: the generator of the last epoch saved (149 of 150, the one `eval_ood.py`
    reads); `fc1` is our `fc`, `conv_block1..n-1` our `blocks`, the last (a 1x1 ConvT + tanh) our `out`."""
    generator = checkpoint[max(k for k in checkpoint if isinstance(k, int))]["generator"]
    last = max(int(m.group(1)) for k in generator if (m := re.match(r"conv_block(\d+)\.", plain_key(k))))
    table = (
        (re.compile(r"^fc1\."), "fc."),
        (re.compile(rf"^conv_block{last}\.0\."), "out."),
        (re.compile(r"^conv_block(\d+)\."), lambda m: f"blocks.{int(m.group(1)) - 1}."),
    )
    state = _rename(generator, table, prefix)
    state["feature_range"] = torch.tensor([float(checkpoint["min"]), float(checkpoint["max"])])
    return state


def from_torchvision(state: Mapping[str, torch.Tensor], prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """torchvision ResNet parameter names -> our staged ResNet (with `prefix`)."""
    return _rename(state, _TORCHVISION_RESNET, prefix)


def _load_file(path: Path, what: str = "checkpoint") -> object:
    """The object stored in a checkpoint file (`read_torch_file`: torch.save's formats, safetensors)."""
    if path.is_dir():  # a run folder, or a Hugging Face model folder
        inside = [path / name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()]
        # a run trained with evaluation.weights=best_val_acc evaluated its best.ckpt, the epoch of best ID-val accuracy
        best, last = path / "checkpoints" / "best.ckpt", path / "checkpoints" / "last.ckpt"
        hint = inside[0] if inside else f"{best} (the epoch its evaluation read) or {last}" if best.is_file() else last
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; did you mean {hint}?")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return read_torch_file(path, what)


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A file's parameters under their own names (`plain_key`: DataParallel's `module.` and `torch.compile`'s
    `_orig_mod.` dropped; a Lightning checkpoint's `state_dict`); errors name the file."""
    path = Path(path)
    try:
        checkpoint = unwrap(_load_file(path, "weights"), path)
        state = checkpoint["state_dict"] if checkpoint_format(checkpoint) == "lightning" else checkpoint  # type: ignore[index]
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CheckpointError(f"could not read weights {path}: {type(err).__name__}: {err}") from err
    return {plain_key(k): v for k, v in state.items()}


#: the formats of one network's own weights (another framework's file, or a bare backbone): no method's other parts
NETWORK_FORMATS = ("wide_resnet", "openood", "torchvision", "backbone", "heatmap_ood")


#: a mismatch's hint when nothing more is known of the file
TRAINED_WITH = "pass the data=/backbone= it was trained with"


def network_hint(kind: str, state: Mapping[str, torch.Tensor]) -> str:
    """What a mismatch of a network's own file (`NETWORK_FORMATS`, read as `kind`) tells the user to pass: the
    backbone its layout is, and the data it was trained with (a head of other classes is a mismatch under the right
    backbone); the generic data=/backbone= hint for a bare backbone state dict."""
    if kind == "heatmap_ood":
        backbone = ("wrn40_2_heatmap" if "backbone.stages.stem.bias" in state
                    else "resnet50_64x64" if "backbone.stages.layer1.0.conv3.weight" in state else "resnet18_32x32")
    else:
        backbone = {"wide_resnet": "wrn40_2 (with the file's depth / widen_factor)", "openood": "resnet18_32x32",
                    "torchvision": "resnet18 | resnet50, or backbone=torchvision backbone.name=<its model>,"}.get(kind)
    return f"pass backbone={backbone} and the data= it was trained with" if backbone else TRAINED_WITH


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Method-level state dict of any supported file (see the module docstring); errors name the file."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(method-level state dict, `checkpoint_format`) of any supported file; errors name the file."""
    path = Path(path)
    try:
        checkpoint = unwrap(_load_file(path), path)
        kind = checkpoint_format(checkpoint)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CheckpointError(f"could not read checkpoint {path}: {type(err).__name__}: {err}") from err
    if kind == "lightning":
        return {plain_key(k): v for k, v in checkpoint["state_dict"].items()}, kind
    if kind == "heatmap_ood":
        return from_heatmap_ood(checkpoint), kind
    if kind == "heatmap_ood_decoder":
        return from_heatmap_ood_decoder(checkpoint), kind
    if kind == "wide_resnet":
        return from_wide_resnet(checkpoint), kind
    if kind == "openood":
        return from_openood(checkpoint), kind
    if kind == "torchvision":
        return from_torchvision(checkpoint), kind
    if kind == "backbone":
        return {f"backbone.{plain_key(k)}": v for k, v in checkpoint.items()}, kind
    return {plain_key(k): v for k, v in checkpoint.items()}, kind


def load_modules(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    modules: Mapping[str, str] | None,
    path: str | Path,
    hint: str = TRAINED_WITH,
) -> list[str]:
    """Copy `state` into `model`, strictly, for the sub-modules `modules` (target name -> source prefix in `state`;
    None = the whole model). Returns the loaded target names. Every mismatch names `path` and the first bad key."""
    targets = {"": ""} if modules is None else dict(modules)
    own = model.state_dict()
    # parts the model does not store (`unstored_parts`: OAL's teacher, read from its own file): an older file's copy
    # of them is skipped where the model would receive it (a file's entries a mapping reads from are kept)
    skipped = tuple(f"{part}." for part in getattr(model, "unstored_parts", ()))
    # one still in the module tree is in every checkpoint the model saves, and skipping it failed its own file's load
    # with "missing 'teacher.bias' ... pass the method= it was trained with"
    registered = [part[:-1] for part in skipped if any(k.startswith(part) for k in own)]
    if registered:
        raise CheckpointError(
            f"{type(model).__name__} declares unstored_parts {registered}, but {registered[0]!r} is a registered "
            "sub-module, so its checkpoints store it: keep it out of the module tree (object.__setattr__, as OAL's "
            "teacher) or drop it from unstored_parts"
        )
    # a model with a backbone (a method): keys differing outside it name the method, not the backbone's architecture
    has_backbone = isinstance(getattr(model, "backbone", None), nn.Module)
    for target, source in targets.items():
        t_prefix, s_prefix = (f"{target}." if target else ""), (f"{source}." if source else "")
        wanted = {k for k in own if k.startswith(t_prefix)}
        if target and not wanted:
            names = sorted({k.split(".")[0] for k in own})
            raise CheckpointError(f"{path}: the model has no sub-module {target!r}; choices: {names}")
        given = {t_prefix + k[len(s_prefix):]: v for k, v in state.items() if k.startswith(s_prefix)}
        given = {k: v for k, v in given.items() if not (skipped and k.startswith(skipped))}
        if not given:
            prefixes = sorted({k.split(".")[0] for k in state})
            raise CheckpointError(f"checkpoint {path} has no weights under {source!r}; it holds {prefixes}")
        missing, unexpected = sorted(wanted - set(given)), sorted(set(given) - wanted)
        if missing or unexpected:
            first = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
            if has_backbone and any(not k.startswith("backbone.") for k in (*missing, *unexpected)):
                hint = "pass the method= it was trained with: the checkpoint's modules differ outside the backbone"
            elif any(k.startswith("backbone.net.") for k in wanted) and not any(k.startswith("backbone.net.") for k in given):
                # a wrapper's file keeps `net.`: this one is the wrapped network's own (read as a staged ResNet's, its
                # hint was backbone=torchvision, the backbone this model has)
                hint = (f"backbone=torchvision|timm|module wraps its network: give a file of that network as "
                        f"backbone.weights={path}")
            raise CheckpointError(
                f"checkpoint {path} does not fit the configured model ({hint}): {first} "
                f"({len(missing)} missing, {len(unexpected)} unexpected keys)"
            )
        for key in sorted(wanted):
            if given[key].shape != own[key].shape:
                raise CheckpointError(
                    f"checkpoint {path} does not fit the configured model ({hint}): {key} has shape "
                    f"{tuple(given[key].shape)} in the file and {tuple(own[key].shape)} in the model"
                )
        model.load_state_dict(given, strict=False)
    return list(targets)
