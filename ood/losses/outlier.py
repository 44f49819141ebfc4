"""Outlier exposure: cross-entropy from the outlier logits to the uniform distribution.

Hendrycks, Mazeika, Dietterich, "Deep Anomaly Detection with Outlier Exposure", ICLR 2019 (arXiv 1812.04606);
released code hendrycks/outlier-exposure (`CIFAR/oe_tune.py:174`, `CIFAR/oe_scratch.py:175`: `loss += 0.5 *
-(x[len(in_set[0]):].mean(1) - torch.logsumexp(x[len(in_set[0]):], dim=1)).mean()`, lambda 0.5 applied by the
method), also OpenOOD's `OETrainer`.
"""

from __future__ import annotations

import torch


def outlier_exposure(logits_out: torch.Tensor) -> torch.Tensor:
    """Mean over outliers of LSE(f) - mean_c f_c, i.e. CE(softmax(f), uniform) = -1/C sum_c log softmax(f)_c.

    Its minimum, log C, is reached at constant logits (a uniform softmax); Hendrycks' code keeps the constant, and
    so does this function. `logits_out` [N, C].
    """
    return (torch.logsumexp(logits_out, dim=1) - logits_out.mean(dim=1)).mean()
