"""OOD metrics from ID scores (higher = more in-distribution), exactly as DESIGN §3.2.

All curves are built from one descending sort of the pooled scores in float64, keeping every ROC vertex
(no curve thinning), with ties forming a single vertex (so AUROC counts ties half). No Python loop over
samples. Do not use torchmetrics' AUROC/ROC on raw scores: they squash values outside [0, 1] through a sigmoid.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ood.utils import check_finite

TPR_LEVEL = 0.95


class RocCurve(NamedTuple):
    """ROC vertices with ID as the positive class, starting at (0, 0); cumulative counts per vertex."""

    fpr: torch.Tensor
    tpr: torch.Tensor
    tp: torch.Tensor
    fp: torch.Tensor
    thresholds: torch.Tensor


def _as_float64(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x).detach().to("cpu", torch.float64).reshape(-1)


def roc_curve(id_scores: torch.Tensor | np.ndarray, ood_scores: torch.Tensor | np.ndarray) -> RocCurve:
    """All ROC vertices, ID positive: vertex j accepts every sample scoring >= thresholds[j]."""
    id_s, ood_s = _as_float64(id_scores), _as_float64(ood_scores)
    if id_s.numel() == 0 or ood_s.numel() == 0:
        raise ValueError(f"need ID and OOD scores, got {id_s.numel()} ID and {ood_s.numel()} OOD")
    scores = torch.cat([id_s, ood_s])
    is_id = torch.cat([torch.ones_like(id_s), torch.zeros_like(ood_s)])
    scores, order = torch.sort(scores, descending=True, stable=True)
    is_id = is_id[order]
    # the last position of every run of equal scores is a vertex
    last = torch.ones_like(scores, dtype=torch.bool)
    last[:-1] = scores[1:] != scores[:-1]
    tp = torch.cumsum(is_id, 0)[last]
    fp = torch.cumsum(1.0 - is_id, 0)[last]
    zero = torch.zeros(1, dtype=torch.float64)
    tp, fp = torch.cat([zero, tp]), torch.cat([zero, fp])
    thresholds = torch.cat([torch.tensor([float("inf")], dtype=torch.float64), scores[last]])
    return RocCurve(fp / ood_s.numel(), tp / id_s.numel(), tp, fp, thresholds)


def _trapezoid(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.trapezoid(y, x))


def _aupr(tp: torch.Tensor, fp: torch.Tensor) -> float:
    """Trapezoidal area under precision-recall, as scikit-learn's `auc(recall, precision)` (OpenOOD).

    `tp`, `fp` are cumulative counts at vertices of increasing acceptance, without the (0, 0) origin;
    the curve starts at (recall 0, precision 1) like scikit-learn's `precision_recall_curve`.
    """
    n_pos = tp[-1]
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1.0), torch.zeros_like(tp))
    recall = tp / n_pos
    recall = torch.cat([torch.zeros(1, dtype=torch.float64), recall])
    precision = torch.cat([torch.ones(1, dtype=torch.float64), precision])
    return _trapezoid(recall, precision)


def _fpr_at_tpr(fpr: torch.Tensor, tpr: torch.Tensor, level: float = TPR_LEVEL) -> float:
    """FPR at the first vertex whose TPR reaches `level` (OpenOOD's `argmax(tpr >= 0.95)`)."""
    return float(fpr[int(torch.nonzero(tpr >= level)[0])])


def ood_metrics(
    id_scores: torch.Tensor | np.ndarray, ood_scores: torch.Tensor | np.ndarray, name: str = "scores"
) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out and both FPR95 conventions (DESIGN §3.2); values in [0, 1].

    - ``auroc``: area under ROC, ties count half.
    - ``aupr_in``: ID positive, score as is; ``aupr_out``: OOD positive, score negated.
    - ``fpr95``: classic (ODIN/Energy): fraction of OOD accepted as ID at 95% ID recall.
    - ``fpr95_oodpos``: OpenOOD v1.5 / pytorch-ood: fraction of ID rejected at 95% OOD recall.

    `name` is used in the error raised for NaN or infinite scores.
    """
    check_finite(_as_float64(id_scores), f"{name} (ID)")
    check_finite(_as_float64(ood_scores), f"{name} (OOD)")
    roc = roc_curve(id_scores, ood_scores)
    n_id, n_ood = roc.tp[-1], roc.fp[-1]
    # OOD positive: a vertex accepts everything scoring <= t; its counts are the complement of the previous
    # ID-positive vertex, read in reverse order (including the all-accepting end).
    ood_tp = (n_ood - roc.fp).flip(0)[1:]
    ood_fp = (n_id - roc.tp).flip(0)[1:]
    return {
        "auroc": _trapezoid(roc.fpr, roc.tpr),
        "aupr_in": _aupr(roc.tp[1:], roc.fp[1:]),
        "aupr_out": _aupr(ood_tp, ood_fp),
        "fpr95": _fpr_at_tpr(roc.fpr, roc.tpr),
        "fpr95_oodpos": _fpr_at_tpr(
            torch.cat([torch.zeros(1, dtype=torch.float64), ood_fp / n_id]),
            torch.cat([torch.zeros(1, dtype=torch.float64), ood_tp / n_ood]),
        ),
    }
