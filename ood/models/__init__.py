"""Backbones: one interface (logits, penultimate features, named stages, `forward_from`, `fc`)."""

from ood.models.base import Backbone, BackboneOutput, GlobalPool
from ood.models.densenet import DenseNet
from ood.models.resnet import ResNet18, ResNet18_32x32, ResNet50
from ood.models.small_cnn import SmallCNN
from ood.models.timm_backbone import TimmBackbone
from ood.models.wrn import WideResNet

__all__ = [
    "Backbone", "BackboneOutput", "DenseNet", "GlobalPool", "ResNet18", "ResNet18_32x32", "ResNet50", "SmallCNN",
    "TimmBackbone", "WideResNet",
]
