"""Evaluation: feature cache, metrics, the evaluation callback and the results writer."""

from ood.evaluation.bank import FeatureBank
from ood.evaluation.metrics import ood_metrics

__all__ = ["FeatureBank", "ood_metrics"]
