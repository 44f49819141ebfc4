"""MC-Dropout, Gal & Ghahramani, "Dropout as a Bayesian Approximation", ICML 2016 (arXiv 1506.02142), as OpenOOD's
`dropout` postprocessor (`openood/postprocessors/dropout_postprocessor.py`, `configs/postprocessors/dropout.yml`).

score(x) = max_c softmax(mean_t f_t(x))_c, t = 1..`samples` forward passes with dropout active (`dropout_times`: 5).
The dropout rate is the network's own: dropout.yml's `dropout_p: 0.5` is read by no postprocessor code, OpenOOD's
rate being its `DropoutNet`'s (configs/networks/dropout_net.yml, p = 0.5 on the penultimate features of a network
trained with it).
Only the dropout of the network is switched on (batch-norm stays in eval mode). Each image's dropout masks are a
function of that image alone (`ImageDropout`): a counter-based hash of the image's bits, the pass t and the dropout
call, so an image scores the same whatever batch it is in, at any `data.eval_batch_size`, on one rank or several,
with or without other detectors drawing random numbers before it, and the global RNG is left untouched. Dropout is
found as `nn.Dropout*` modules with p > 0 and as modules with a positive `dropout`, `p` or `drop_rate` attribute
that apply `F.dropout` while training (our WRN and DenseNet blocks; timm's ResNet, EfficientNet and MobileNetV3
heads built with `drop_rate=`; torchvision's DenseNet layers; attention dropout, timm's fused or not and
`nn.MultiheadAttention`'s, masked per image as well); stochastic depth (drop path) stays off, as it is not dropout; a
network without either raises `DetectorNotApplicable` ("no dropout") at fit time: its "fit" is that check on the
first batch of the ID val loader (no forward pass), so the run skips it with the reason.
Reference difference: pytorch-ood's `MCD` averages the softmax of the passes instead of the logits; we follow
OpenOOD. Deviations: max log-softmax in float64 instead of max softmax (monotone); the masks keep each element with
probability 1 - p and scale it by 1 / (1 - p) as `F.dropout` does, but are drawn per image from the hash instead of
from torch's global RNG stream (OpenOOD's, whose masks for an image depend on the images scored before it and on
the batch size: the same image scored at eval_batch_size 512 and 7 got different scores).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from ood.detectors.base import COUNT, DetectorNotApplicable, SharedPasses
from ood.detectors.logits import max_log_softmax
from ood.detectors.network import ModelFitted, network_name
from ood.features.bank import FeatureBank

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c modulo 2^32 for int64 x in [0, 2^32) and c < 2^32, without int64 overflow (16-bit halves)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of int64 values taken modulo 2^32, elementwise: exact integer
    arithmetic, the same on every device."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def image_keys(x: torch.Tensor) -> torch.Tensor:
    """[B] int64 keys in [0, 2^32), each a function of one image's values only (their float32 bits and positions),
    summed as integers: exact whatever the batch, its size or the device."""
    flat = x.detach().float().flatten(1).contiguous()
    bits = flat.view(torch.int32).long() & _MASK32
    position = torch.arange(flat.shape[1], device=x.device, dtype=torch.long) * 0x9E3779B9
    return mix32(mix32(bits + position).sum(1))


class ImageDropout:
    """`F.dropout` in training mode replaced, inside `active(keys, draw)`, by masks that are a function of each
    image's key, the draw `draw` (MC-Dropout's pass t) and the dropout call's rank in the forward pass, never of the
    other images of the batch or of the global RNG. A tensor whose first dimension is a multiple k of the batch
    ([B * k, ...], e.g. attention's heads) takes image i's masks on its rows i * k .. i * k + k - 1; any other
    shape, or a call outside `active`, goes to the original `F.dropout`. `F.scaled_dot_product_attention` with a
    `dropout_p` (timm's fused attention, `nn.MultiheadAttention` returning no weights: torchvision's ViT) is computed
    as its documented reference (softmax(q k^T * scale + mask) v) with the attention weights dropped through the
    same masks. Dropout outside both (`F.dropout2d`, `F.alpha_dropout`) still draws from the global RNG."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.draw = 0
        self.calls = 0

    @contextmanager
    def active(self, keys: torch.Tensor, draw: int) -> Iterator[None]:
        original = F.dropout
        self.keys, self.draw, self.calls = keys, draw, 0

        def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
            keys = self.keys
            if not training or p == 0 or keys is None or input.dim() == 0 or len(input) % len(keys) != 0:
                return original(input, p, training, inplace)
            if p == 1:
                return input.mul_(0) if inplace else input * 0
            self.calls += 1
            per_image = len(input) // len(keys)
            rows = input.reshape(len(keys), per_image, -1)
            # the row's stream: image key, draw, call rank, row within the image
            stream = mix32(keys[:, None] ^ mix32(torch.tensor(self.draw * 0x85EBCA6B + self.calls * 0xC2B2AE35, device=keys.device)))
            stream = mix32(stream + torch.arange(per_image, device=keys.device) * 0x27D4EB2F)
            u = mix32(stream[:, :, None] + torch.arange(rows.shape[2], device=keys.device) * 0x9E3779B9)
            keep = (u >= int(p * 2**32)).to(input.dtype).view_as(input)
            out = input * keep / (1 - p)
            return input.copy_(out) if inplace else out

        def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                      dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                      enable_gqa: bool = False) -> torch.Tensor:
            keys = self.keys
            if dropout_p == 0 or keys is None or len(query) % len(keys) != 0:
                return original_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
            if enable_gqa:  # key / value heads shared by groups of query heads
                key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
                value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
            logits = query @ key.transpose(-2, -1) * (1 / math.sqrt(query.size(-1)) if scale is None else scale)
            if is_causal:
                causal = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
                logits = logits.masked_fill(~causal, float("-inf"))
            if attn_mask is not None:
                logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
            return dropout(torch.softmax(logits, -1), dropout_p) @ value

        original_attention = F.scaled_dot_product_attention
        F.dropout, F.scaled_dot_product_attention = dropout, attention
        try:
            yield
        finally:
            F.dropout, F.scaled_dot_product_attention = original, original_attention
            self.keys = None


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    """Modules of `model` that drop activations while training: `nn.Dropout*` with p > 0, or a positive `dropout`, `p`
    or `drop_rate` (timm's models and torchvision's DenseNet name their functional dropout's rate so), and timm's
    attention modules with attention dropout (their fused path passes it to `F.scaled_dot_product_attention` only
    while the module itself trains). Stochastic depth (torchvision's `StochasticDepth`, whose rate is also `p`) is
    not dropout: it stays off."""
    found = []
    for module in model.modules():
        if isinstance(module, StochasticDepth):
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd):
            rate = module.p
        elif hasattr(module, "fused_attn") and isinstance(getattr(module, "attn_drop", None), nn.modules.dropout._DropoutNd):
            rate = module.attn_drop.p
        else:
            rate = next((getattr(module, a) for a in ("dropout", "p", "drop_rate") if hasattr(module, a)), 0)
        if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0:
            found.append(module)
    return found


def check_dropout(model: nn.Module) -> list[nn.Module]:
    """The dropout modules of `model`; `DetectorNotApplicable` when there are none."""
    modules = dropout_modules(model)
    if not modules:
        raise DetectorNotApplicable(f"no dropout in the network ({network_name(model)}): MC-Dropout needs dropout layers")
    return modules


class MCDropout(ModelFitted):
    """Max softmax of the mean logits over forward passes with dropout on."""

    name = "mcdropout"
    min_classes = 2
    ranges = {"samples": COUNT}
    fit_split = "val"

    def __init__(self, samples: int = 5) -> None:
        self.samples = samples

    def score(self, bank: FeatureBank) -> torch.Tensor:
        raise NotImplementedError("mcdropout samples the network: score it with score_inputs(model, x)")

    def fit_statistics(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        check_dropout(model)
        return x.new_zeros(len(x), 0)

    def fit_inputs(self, bank: FeatureBank, statistics: torch.Tensor) -> MCDropout:
        return self

    def score_inputs(self, model: nn.Module, x: torch.Tensor, shared: SharedPasses | None = None) -> torch.Tensor:
        modules = check_dropout(model)
        modes = [m.training for m in modules]
        try:
            for m in modules:
                m.training = True  # this module only: its batch-norm children keep their own mode
            masks, keys = ImageDropout(), image_keys(x)
            passes: list[Any] = []
            with torch.no_grad():
                for t in range(self.samples):
                    with masks.active(keys, t):
                        passes.append(model(x).double())
            logits = torch.stack(passes).mean(0)
        finally:
            for m, mode in zip(modules, modes):
                m.training = mode
        return max_log_softmax(logits)
