"""Any timm model as a `Backbone` (`ood.models.TimmBackbone`): OAL's ViT-B/16 teacher on CIFAR, built with timm.

timm (huggingface/pytorch-image-models) builds the network with `pretrained=False` (nothing is downloaded); weights
come from a local file. The whole network up to the pre-logits feature (`forward_features` then
`forward_head(pre_logits=True)`: the CLS token after the final norm for a ViT, 768-d for ViT-B/16) is one stage,
`body`; `fc` is timm's classifier head. `convert_state_dict` maps a timm state dict (`patch_embed.*`, `blocks.*`,
`head.*`, e.g. OAL's fine-tuned `pytorch_model.bin`) onto these names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ood.models.base import Backbone


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
        net.reset_classifier(0)
        self.stages = nn.ModuleDict({"body": _PreLogits(net)})
        self.pool = nn.Identity()
        self.fc = head

    @staticmethod
    def convert_state_dict(
        state: Mapping[str, torch.Tensor], prefix: str = "backbone."
    ) -> dict[str, torch.Tensor]:
        """timm parameter names (`head.*` = the classifier) -> ours, under `prefix`; other files pass unchanged."""
        if not any(k.startswith("head.") for k in state) or any(k.startswith(prefix) for k in state):
            return dict(state)
        return {
            (f"{prefix}fc.{k[5:]}" if k.startswith("head.") else f"{prefix}stages.body.net.{k}"): v
            for k, v in state.items()
        }
