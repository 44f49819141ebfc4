"""Evaluation: feature cache, metrics, the evaluation callback and the results writer."""

from ood.evaluation.metrics import ood_metrics
from ood.features.bank import FeatureBank

__all__ = ["FeatureBank", "ood_metrics"]
