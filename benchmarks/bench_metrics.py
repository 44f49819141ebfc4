"""(a) `ood_metrics` vs scikit-learn computing AUROC, FPR95 and both AUPRs the way OpenOOD does
(`openood/evaluators/metrics.py`: `roc_curve` + `auc`, `precision_recall_curve` twice, FPR at the first TPR >= 0.95).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn import metrics as skm

from benchmarks.common import Timing, time_alternating
from ood.metrics import ood_metrics


def openood_sklearn(id_s: np.ndarray, ood_s: np.ndarray) -> dict[str, float]:
    """OpenOOD v1.5's metric computation (ID positive; OOD positive on the negated score for AUPR-Out)."""
    conf = np.concatenate([id_s, ood_s])
    label = np.concatenate([np.ones(len(id_s)), np.zeros(len(ood_s))])
    fpr, tpr, _ = skm.roc_curve(label, conf)
    p_in, r_in, _ = skm.precision_recall_curve(label, conf)
    p_out, r_out, _ = skm.precision_recall_curve(1 - label, -conf)
    return {
        "auroc": skm.auc(fpr, tpr),
        "aupr_in": skm.auc(r_in, p_in),
        "aupr_out": skm.auc(r_out, p_out),
        "fpr95": float(fpr[np.argmax(tpr >= 0.95)]),
    }


def run(n: int, repeats: int, seed: int = 0) -> list[Timing]:
    rng = np.random.default_rng(seed)
    id_s, ood_s = rng.normal(1.0, 1.0, n), rng.normal(0.0, 1.5, n)
    id_t, ood_t = torch.from_numpy(id_s), torch.from_numpy(ood_s)
    ours, ref = ood_metrics(id_t, ood_t), openood_sklearn(id_s, ood_s)
    for key in ref:
        assert abs(ours[key] - ref[key]) < 1e-6, f"{key}: ours {ours[key]} vs scikit-learn {ref[key]}"
    t_ours, t_ref = time_alternating([lambda: ood_metrics(id_t, ood_t), lambda: openood_sklearn(id_s, ood_s)], repeats)
    return [Timing(f"(a) ood_metrics, {n:,} ID + {n:,} OOD", t_ours, t_ref, 0.25, "scikit-learn (OpenOOD)")]
