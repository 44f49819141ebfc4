"""Any timm model as a `Backbone` (`ood.models.TimmBackbone`): OAL's ViT-B/16 teacher on CIFAR, built with timm.

timm (huggingface/pytorch-image-models) builds the network with `pretrained=False` (nothing is downloaded); weights
come from a local file. The whole network up to the pre-logits feature (`forward_features` then
`forward_head(pre_logits=True)`: the CLS token after the final norm for a ViT, 768-d for ViT-B/16) is one stage,
`body`; `fc` is timm's classifier head. `convert_state_dict` maps a timm state dict (`patch_embed.*`, `blocks.*`,
`head.*`, e.g. OAL's fine-tuned `pytorch_model.bin`) onto these names, and so does a Hugging Face ViT's
(transformers' `ViTForImageClassification` state dict: `vit.embeddings.*`, `vit.encoder.layer.N.*`, `vit.layernorm.*`,
`classifier.*`, e.g. the `pytorch_model_cifar100.bin` of OAL's `configs/networks/vit_cifar100.yml`; `from_hf_vit`),
for a timm ViT of the same sizes. Its LayerNorms then take HF's eps (`adopt_state_dict`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ood.errors import CheckpointError, ConfigError
from ood.models.base import Backbone

#: transformers' `ViTConfig().layer_norm_eps` (timm's ViT LayerNorms: 1e-6)
HF_VIT_LAYER_NORM_EPS = 1e-12
_HF_VIT_LAYER = (
    ("layernorm_before.", "norm1."),
    ("attention.output.dense.", "attn.proj."),
    ("layernorm_after.", "norm2."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)
_HF_VIT_TOP = {
    "vit.embeddings.cls_token": "cls_token",
    "vit.embeddings.position_embeddings": "pos_embed",
    "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "vit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "vit.layernorm.weight": "norm.weight",
    "vit.layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}


def is_hf_vit(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether `state` is a Hugging Face `ViTForImageClassification` state dict (its patch embedding's name)."""
    return "vit.embeddings.patch_embeddings.projection.weight" in state


def from_hf_vit(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face `ViTForImageClassification` state dict under timm's `VisionTransformer` names, any sizes.

    Per layer N, `vit.encoder.layer.N.attention.attention.{query,key,value}` are stacked (in that order, along the
    output dim) into `blocks.N.attn.qkv`, as timm splits its qkv output into q, k, v and then heads, as HF splits
    each of its projections; the other layer parts are renamed (`_HF_VIT_LAYER`). The classifier reads the CLS token
    after `vit.layernorm`, as timm's head does (`global_pool="token"`). `vit.pooler.*` (a `ViTModel` saved with its
    pooler) is dropped: the classification model has none (`add_pooling_layer=False`). An unknown name raises.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in _HF_VIT_TOP:
            out[_HF_VIT_TOP[key]] = value
            continue
        if key.startswith("vit.pooler."):
            continue
        match = re.fullmatch(r"vit\.encoder\.layer\.(\d+)\.(.+)", key)
        rest = match.group(2) if match else ""
        if match and rest.startswith("attention.attention."):
            part, kind = rest.removeprefix("attention.attention.").split(".")
            qkv.setdefault(f"blocks.{match.group(1)}.attn.qkv.{kind}", {})[part] = value
            continue
        new = next((timm + rest[len(hf):] for hf, timm in _HF_VIT_LAYER if rest.startswith(hf)), None)
        if new is None:
            raise CheckpointError(f"not a Hugging Face ViT parameter: {key!r}")
        out[f"blocks.{match.group(1)}.{new}"] = value  # type: ignore[union-attr]
    for key, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointError(f"Hugging Face ViT file: {key} needs query, key and value; it has {sorted(parts)}")
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


class _PreLogits(nn.Module):
    """A timm model without its head: image -> pre-logits feature."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)


class TimmBackbone(Backbone):
    """`timm.create_model(model_name, pretrained=False, num_classes, in_chans, **kwargs)` split into body and head.

    Layer names: `body`. Requires the optional extra `timm` (`pip install -e '.[timm]'`).
    """

    def __init__(self, model_name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> None:
        super().__init__()
        import timm

        net = timm.create_model(
            model_name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs
        )
        head = net.get_classifier()
        if not isinstance(head, nn.Linear):  # else a contract error about a Backbone subclass the user never wrote
            raise ConfigError(f"timm model {model_name!r} classifies with a {type(head).__name__}, not one linear layer: "
                              "ood's evaluation and detectors read the head as W h + b; choose a timm model with a linear "
                              "head (resnet*, convnext*, vit_*, efficientnet*, ...)")
        net.reset_classifier(0)
        self.stages = nn.ModuleDict({"body": _PreLogits(net)})
        self.pool = nn.Identity()
        self.fc = head

    @staticmethod
    def convert_state_dict(
        state: Mapping[str, torch.Tensor], prefix: str = "backbone."
    ) -> dict[str, torch.Tensor]:
        """timm parameter names (`head.*` = the classifier), or a Hugging Face ViT's (`from_hf_vit`), -> ours, under
        `prefix`; other files pass unchanged."""
        if is_hf_vit(state):
            state = from_hf_vit(state)
        if not any(k.startswith("head.") for k in state) or any(k.startswith(prefix) for k in state):
            return dict(state)
        return {
            (f"{prefix}fc.{k[5:]}" if k.startswith("head.") else f"{prefix}stages.body.net.{k}"): v
            for k, v in state.items()
        }

    def adopt_state_dict(self, state: Mapping[str, torch.Tensor], prefix: str = "backbone.") -> dict[str, torch.Tensor]:
        """`convert_state_dict(state, prefix)`; for a Hugging Face ViT file this network's LayerNorms also take HF's
        eps (`HF_VIT_LAYER_NORM_EPS`; timm's ViT: 1e-6), which the file does not hold, so its outputs are the HF
        model's."""
        if is_hf_vit(state):
            for module in self.modules():
                if isinstance(module, nn.LayerNorm):
                    module.eps = HF_VIT_LAYER_NORM_EPS
        return self.convert_state_dict(state, prefix)
