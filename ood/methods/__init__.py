"""Methods: one LightningModule each, all extending `OODMethod`."""

from ood.methods.base import OODMethod
from ood.methods.ce import CrossEntropy

__all__ = ["CrossEntropy", "OODMethod"]
