"""The public home of the metrics named in the contract (`ood.evaluation.metrics.ood_metrics`); the code lives in
`ood.metrics`, below every layer that uses it."""

from ood.metrics import ood_metrics

__all__ = ["ood_metrics"]
