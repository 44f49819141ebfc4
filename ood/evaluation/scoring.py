"""From cached banks to result rows: fit and tune detectors, score every split, compute metrics.

Pure functions of the banks (no Lightning), so they are tested directly and shared by `ood-train`, `ood-eval`
and the benchmarks. Hyper-parameters are chosen by AUROC on ID-val vs validation OOD only, never on test OOD.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ood.data.benchmark import EvalSplit
from ood.detectors.base import Detector, DetectorNotApplicable, build_detector, detector_class
from ood.evaluation.bank import FeatureBank
from ood.evaluation.metrics import ood_metrics
from ood.utils import check_finite, get_logger

log = get_logger(__name__)

METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_oodpos")
#: score function of one scorer: split name -> [N] ID scores
ScoreFn = Callable[[str], torch.Tensor]


@dataclass
class Scorer:
    """One named score over the evaluation splits, with the hyper-parameters it used."""

    name: str
    score: ScoreFn
    hparams: dict[str, Any] = field(default_factory=dict)
    tuned: bool = False


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of a detector's grid, in declaration order."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def fit_detector(
    name: str,
    params: Mapping[str, Any],
    banks: Mapping[str, FeatureBank],
    tune: bool,
) -> tuple[Detector, bool]:
    """Build detector `name`, choose its grid point on val vs val_ood (when `tune`), fit it on its split.

    Fixed `params` are never tuned; returns the fitted detector and whether a search happened.
    """
    cls = detector_class(name)
    free = {k: v for k, v in cls.grid.items() if k not in params}
    points = grid_points(free)
    can_tune = tune and len(points) > 1 and "val" in banks and "val_ood" in banks
    fit_bank = banks[cls.fit_split]
    if not can_tune:
        return build_detector(name, **params).fit(fit_bank), False
    best: tuple[float, dict[str, Any]] | None = None
    for point in points:
        det = build_detector(name, **params, **point).fit(fit_bank)
        auroc = ood_metrics(det.score(banks["val"]), det.score(banks["val_ood"]), name=f"{name}{point} on val")["auroc"]
        if best is None or auroc > best[0]:
            best = (auroc, point)
    assert best is not None
    log.info("%s: chose %s (val AUROC %.4f over %d grid points)", name, best[1], best[0], len(points))
    return build_detector(name, **params, **best[1]).fit(fit_bank), True


def detector_scorers(
    names: Sequence[str],
    params: Mapping[str, Mapping[str, Any]],
    banks: Mapping[str, FeatureBank],
    tune: bool,
    model_scores: Callable[[Detector, str], torch.Tensor] | None = None,
) -> list[Scorer]:
    """Fit every named detector; detectors that need the model score through `model_scores(detector, split)`."""
    scorers = []
    for name in tqdm(names, desc="fitting detectors", leave=False):
        try:
            det, tuned = fit_detector(name, params.get(name, {}), banks, tune)
        except DetectorNotApplicable as err:
            log.warning("skipping detector %s: %s", name, err)
            continue
        if det.needs_model:
            if model_scores is None:
                log.warning("skipping detector %s: it needs the model and inputs", name)
                continue
            fn: ScoreFn = lambda split, d=det: model_scores(d, split)  # noqa: E731
        else:
            fn = lambda split, d=det: d.score(banks[split])  # noqa: E731
        scorers.append(Scorer(name, fn, det.hparams, tuned))
    return scorers


def evaluate(
    scorers: Sequence[Scorer],
    splits: Sequence[EvalSplit],
    id_acc: float,
    info: Mapping[str, Any],
) -> tuple[list[dict[str, Any]], dict[str, dict[str, torch.Tensor]]]:
    """Score ID test and every test OOD split with each scorer; one result row per (scorer, OOD set).

    Returns the rows (DESIGN §3.4) and the per-split scores of every scorer.
    """
    id_split = next(s for s in splits if s.role == "id_test")
    ood_splits = [s for s in splits if s.role == "ood"]
    rows: list[dict[str, Any]] = []
    all_scores: dict[str, dict[str, torch.Tensor]] = {}
    for scorer in tqdm(scorers, desc="scoring", leave=False):
        scores = {}
        for split in (id_split, *ood_splits):
            s = scorer.score(split.name).detach().double().cpu()
            check_finite(s, f"detector {scorer.name} on {split.name}")
            scores[split.name] = s
        all_scores[scorer.name] = scores
        for split in ood_splits:
            m = ood_metrics(scores[id_split.name], scores[split.name], name=f"{scorer.name} on {split.name}")
            rows.append(
                {
                    **info,
                    "detector": scorer.name,
                    "ood_dataset": split.name,
                    "ood_group": split.group,
                    **m,
                    "id_acc": id_acc,
                    "n_id": len(scores[id_split.name]),
                    "n_ood": len(scores[split.name]),
                    "detector_params": scorer.hparams,
                    "tuned": scorer.tuned,
                }
            )
    return rows, all_scores


def group_means(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """(detector, group) -> unweighted mean of each metric over the group's OOD sets (OpenOOD's aggregation)."""
    buckets: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        buckets.setdefault((row["detector"], row["ood_group"]), []).append(row)
    return {key: {m: sum(r[m] for r in rs) / len(rs) for m in METRICS} for key, rs in buckets.items()}
