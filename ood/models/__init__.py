"""Backbones: one interface (logits, penultimate features, named stages, `forward_from`, `fc`)."""

from ood.models.base import Backbone, BackboneOutput, GlobalPool
from ood.models.small_cnn import SmallCNN

__all__ = ["Backbone", "BackboneOutput", "GlobalPool", "SmallCNN"]
