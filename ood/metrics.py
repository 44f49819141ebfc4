"""OOD metrics from ID scores (higher = more in-distribution).

All curves keep every ROC vertex (no curve thinning), in float64, with ties forming a single vertex (so AUROC
counts ties half). No Python loop over samples. The two classes are sorted separately, then merged by a stable
argsort of the two sorted runs (one linear merge); this avoids a full argsort of the pooled scores, which is what
makes OpenOOD's scikit-learn path slow. The arithmetic is vectorised NumPy float64 (on CPU it is several times
faster than `torch.sort`, which always builds a permutation; the rest of the project computes in torch: this module
is the deliberate exception, and takes torch tensors or arrays alike).
Do not use torchmetrics' AUROC/ROC on raw scores: they squash values outside [0, 1] through a sigmoid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from ood.errors import NonFiniteError

TPR_LEVEL = 0.95


class RocCurve(NamedTuple):
    """ROC vertices with ID as the positive class, starting at (0, 0); cumulative counts per vertex."""

    fpr: np.ndarray
    tpr: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    thresholds: np.ndarray


def _as_float64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def roc_curve(id_scores: torch.Tensor | np.ndarray, ood_scores: torch.Tensor | np.ndarray) -> RocCurve:
    """All ROC vertices, ID positive: vertex j accepts every sample scoring >= thresholds[j]."""
    id_s, ood_s = np.sort(_as_float64(id_scores)), np.sort(_as_float64(ood_scores))
    n_id, n_ood = len(id_s), len(ood_s)
    if n_id == 0 or n_ood == 0:
        raise ValueError(f"need ID and OOD scores, got {n_id} ID and {n_ood} OOD")
    pooled = np.concatenate([id_s, ood_s])
    order = np.argsort(pooled, kind="stable")[::-1]  # a merge of two sorted runs; descending
    scores, is_id = pooled[order], order < n_id
    # the last position of every run of equal scores is a vertex
    last = np.ones(len(scores), dtype=bool)
    last[:-1] = scores[1:] != scores[:-1]
    position = np.flatnonzero(last)
    tp = np.concatenate([[0], np.cumsum(is_id)[position]]).astype(np.float64)
    fp = np.concatenate([[0], position + 1]) - tp
    thresholds = np.concatenate([[np.inf], scores[position]])
    return RocCurve(fp / n_ood, tp / n_id, tp, fp, thresholds)


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return 0.5 * float(np.dot(np.diff(x), y[1:] + y[:-1]))


def auroc_pairs(id_scores: torch.Tensor | np.ndarray, ood_scores: torch.Tensor | np.ndarray) -> int:
    """AUROC x 2 n_id n_ood as an exact integer: twice the (ID, OOD) pairs the scores order right, a tie counting once.
    Model selection compares this, not the AUROC: the trapezoid's float sum rounds with the vertex sequence, so two
    rankings with the same AUROC can differ by an ulp (25/42 as 0.5952380952380952 or ...53), and "the first of equal
    validation AUROCs" would then go to the ulp instead."""
    roc = roc_curve(id_scores, ood_scores)
    tp, fp = roc.tp.astype(np.int64), roc.fp.astype(np.int64)
    return int(np.dot(np.diff(fp), tp[1:] + tp[:-1]))


def _aupr(tp: np.ndarray, fp: np.ndarray) -> float:
    """Trapezoidal area under precision-recall, as scikit-learn's `auc(recall, precision)` (OpenOOD).

    `tp`, `fp` are cumulative counts at vertices of increasing acceptance, without the (0, 0) origin;
    the curve starts at (recall 0, precision 1) like scikit-learn's `precision_recall_curve`.
    """
    precision = np.concatenate([[1.0], tp / (tp + fp)])
    recall = np.concatenate([[0.0], tp / tp[-1]])
    return _trapezoid(recall, precision)


def _fpr_at_tpr(fpr: np.ndarray, tpr: np.ndarray, level: float = TPR_LEVEL) -> float:
    """FPR at the first vertex whose TPR reaches `level` (OpenOOD's `argmax(tpr >= 0.95)`)."""
    return float(fpr[np.searchsorted(tpr, level, side="left")])


def ood_metrics(
    id_scores: torch.Tensor | np.ndarray, ood_scores: torch.Tensor | np.ndarray, name: str = "scores"
) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out and both FPR95 conventions ; values in [0, 1].

    - ``auroc``: area under ROC, ties count half.
    - ``aupr_in``: ID positive, score as is; ``aupr_out``: OOD positive, score negated.
    - ``fpr95``: classic (ODIN/Energy): fraction of OOD accepted as ID at 95% ID recall.
    - ``fpr95_oodpos``: OpenOOD v1.5 / pytorch-ood: fraction of ID rejected at 95% OOD recall.

    `name` is used in the error raised for NaN or infinite scores.
    """
    id_s, ood_s = _as_float64(id_scores), _as_float64(ood_scores)
    for values in (id_s, ood_s):
        bad = ~np.isfinite(values)
        if bad.any():
            raise NonFiniteError(f"{name}: {int(bad.sum())} of {values.size} values are NaN or infinite")
    roc = roc_curve(id_s, ood_s)
    n_id, n_ood = roc.tp[-1], roc.fp[-1]
    # OOD positive: a vertex accepts everything scoring <= t; its counts are the complement of the previous
    # ID-positive vertex, read in reverse order (including the all-accepting end).
    ood_tp = (n_ood - roc.fp)[::-1][1:]
    ood_fp = (n_id - roc.tp)[::-1][1:]
    return {
        "auroc": _trapezoid(roc.fpr, roc.tpr),
        "aupr_in": _aupr(roc.tp[1:], roc.fp[1:]),
        "aupr_out": _aupr(ood_tp, ood_fp),
        "fpr95": _fpr_at_tpr(roc.fpr, roc.tpr),
        "fpr95_oodpos": _fpr_at_tpr(np.concatenate([[0.0], ood_fp / n_id]), np.concatenate([[0.0], ood_tp / n_ood])),
    }


def validation_aurocs(scorers: Sequence[Any], split_names: Sequence[str]) -> dict[str, float]:
    """AUROC of ID val vs validation OOD for each scorer (`.name`, `.score(split)`): the number a sweeper maximises.
    Never touches a test split; empty when the benchmark has no validation OOD set."""
    if not {"val", "val_ood"} <= set(split_names):
        return {}
    return {s.name: ood_metrics(s.score("val"), s.score("val_ood"), name=f"{s.name} on val_ood")["auroc"] for s in scorers}
