"""From cached banks to result rows: fit and tune detectors, score every split, compute metrics.

Pure functions of the banks (no Lightning), so they are tested directly and shared by `ood-train`, `ood-eval`
and the benchmarks. Hyper-parameters are chosen by AUROC on ID-val vs validation OOD only, never on test OOD.

Two evaluation modes come from the same scores (`MODES`): `standard` (ID = the ID test set) and `fsood`, OpenOOD
v1.5's full-spectrum OOD detection (`Evaluator.eval_ood(fsood=True)` in `openood/evaluation_api/evaluator.py`): ID =
the ID test set followed by every covariate-shifted ID (`csid`) set, concatenated in order, against each OOD set;
its accuracy is OpenOOD's `csid_acc`, the correct predictions over the ID test and all csid sets together.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch

from ood.data.benchmark import EvalSplit
from ood.detectors.base import (
    Detector,
    DetectorNotApplicable,
    DetectorRef,
    SharedPasses,
    build_detector,
    check_hparams,
    detector_class,
    hparam_names,
    split_hparams,
)
from ood.detectors.network import FitInputs, Fold, FoldInputs, ModelFitted, StreamFitted
from ood.errors import ConfigError, NonFiniteError
from ood.features.bank import FeatureBank
from ood.metrics import auroc_pairs, ood_metrics
from ood.utils import check_finite, get_logger, progress

log = get_logger(__name__)

METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_oodpos")
#: evaluation modes: `standard` (ID test vs each OOD set) and `fsood` (ID test + every csid set vs each OOD set)
MODES = ("standard", "fsood")
#: score function of one scorer: split name -> [N] ID scores
ScoreFn = Callable[[str], torch.Tensor]


@dataclass
class Scorer:
    """One named score over the evaluation splits, with the hyper-parameters it used, those of them chosen by
    tuning on validation OOD (`tuned`) and, of those, the ones searched over the user's list (`grid`)."""

    name: str
    score: ScoreFn
    hparams: dict[str, Any] = field(default_factory=dict)
    tuned: list[str] = field(default_factory=list)
    #: every grid point of its search scored on the test splits too (`Sweep`; empty unless asked for)
    sweep: list[SweptPoint] = field(default_factory=list)
    #: tuned key -> the user's list its search went over (`detectors.params.knn.k=[1,5,10]`); a key tuned over the
    #: detector's own grid is not in it: a run over another list is another configuration (the rows' `tuned_grid`)
    grid: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class SweptPoint:
    """One grid point of a detector's search (`params`), its ID-val vs validation-OOD AUROC (what tuning compared),
    whether tuning chose it, and its scores per test split: one point of a sensitivity curve."""

    params: dict[str, Any]
    val_auroc: float
    chosen: bool
    scores: dict[str, torch.Tensor]


@dataclass
class Sweep:
    """A sensitivity sweep of one detector's search (`detectors.sensitivity`): `tune_detector` scores every grid
    point it scores on val / val_ood on the test `splits` too, from the same fits, and fills in `points`. Test scores
    never reach the choice."""

    splits: Sequence[str]
    points: list[SweptPoint] = field(default_factory=list)


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of a detector's grid, in declaration order."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def sweep_order(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The grid's points in OpenOOD v1.5's search order, the first parameter varying fastest
    (`Evaluator.recursive_generator` in `openood/evaluation_api/evaluator.py`): its `hyperparam_search` keeps the
    first of equal validation AUROCs in this order (`auroc > max_auroc`), and so does tuning here."""
    keys = list(grid)
    return [dict(zip(keys, values[::-1])) for values in itertools.product(*(grid[k] for k in reversed(keys)))]


def search_grid(cls: type[Detector], params: Mapping[str, Any]) -> dict[str, Sequence[Any]]:
    """The grid tuning searches for detector `cls` given the user's `params`: its own `grid` less the keys given one
    value, with a key's list of values to tune (`split_hparams`: `detectors.params.knn.k=[10,50,100]`) in place of
    its own values for that key, or after its keys for a key it has no grid for."""
    fixed, grids = split_hparams(cls, params)
    return {**{k: v for k, v in cls.grid.items() if k not in fixed}, **grids}


def check_search(cls: type[Detector], params: Mapping[str, Any], tune: bool) -> None:
    """Refuse in one line, before the network pass, the user's `params` for `cls` that would fail after it: a name or
    value `check_hparams` refuses, or a point of the grid tuning searches that the constructor refuses (vra's
    `percentile_low=[10,90]` against its `percentile_high` grid of 85..99), which stopped the search."""
    check_hparams(cls, params, tune)
    fixed = split_hparams(cls, params)[0]
    for point in grid_points(search_grid(cls, params)) if tune else [{}]:
        try:
            build_detector(cls, **fixed, **point)
        except ConfigError as err:
            raise ConfigError(f"{err}, at the point {point} of its tuning grid" if point else str(err)) from None


class ModelScoreFn(Protocol):
    """Scores of a `needs_model` detector on one split, computed from the network and that split's inputs: every row
    of the split's bank, or with `rows` only those bank rows, in that order (a `StreamFitted` detector's fit passes
    over part of its fit split load only that part)."""

    def __call__(self, det: Detector, split: str, rows: torch.Tensor | None = None) -> torch.Tensor: ...


class GridInputs(Detector):
    """`detector` at every setting of its `score_params` in one call: `score_inputs(model, x)` returns [B, points]
    (its `score_inputs_grid` stacked), so a `ModelScoreFn` runs the loader once for the whole grid."""

    needs_model = True

    def __init__(self, detector: Detector, points: Sequence[dict[str, Any]]) -> None:
        self.detector = detector
        self.points = list(points)

    def score_inputs(self, model: torch.nn.Module, x: torch.Tensor, shared: SharedPasses | None = None) -> torch.Tensor:
        return torch.stack(self.detector.score_inputs_grid(model, x, self.points, shared), dim=1)


class JointInputs(Detector):
    """Fitted network-pass detectors scoring the same batches: `score_inputs(model, x)` returns [B, detectors] in
    float64, so a `ModelScoreFn` runs a split's loader once for all of them, and the network work the members of a
    `pass_group` have in common runs once per batch (ODIN's and i-ODIN's forward pass and gradients; the clean staged
    pass of AdaSCALE, mds_ensemble and mahalanobis_odin): one `SharedPasses` per group and batch, dropped once the group is scored, so at most one
    group's kept graph is alive. A detector that turns out not to apply (rankfeat on a backbone without stages)
    gets NaN and its error in `failed` (by position), and is not run again."""

    needs_model = True

    def __init__(self, detectors: Sequence[Detector]) -> None:
        self.detectors = list(detectors)
        self.failed: dict[int, DetectorNotApplicable] = {}
        groups: dict[object, list[int]] = {}
        for i, det in enumerate(self.detectors):
            groups.setdefault(det.pass_group or object(), []).append(i)  # object(): a group of its own
        self._groups = list(groups.values())

    def score_inputs(self, model: torch.nn.Module, x: torch.Tensor, shared: SharedPasses | None = None) -> torch.Tensor:
        nan = torch.full((len(x),), torch.nan, dtype=torch.float64, device=x.device)
        columns = [nan] * len(self.detectors)
        for members in self._groups:
            shared = SharedPasses()
            for i in members:
                if i not in self.failed:
                    try:
                        columns[i] = self.detectors[i].score_inputs(model, x, shared).double()
                    except DetectorNotApplicable as err:
                        self.failed[i] = err
        return torch.stack(columns, 1)


def network_scores(
    dets: Sequence[Detector],
    known: Sequence[Mapping[str, torch.Tensor]],
    splits: Sequence[str],
    model_scores: ModelScoreFn,
) -> tuple[list[dict[str, torch.Tensor]], dict[int, DetectorNotApplicable]]:
    """Scores of the network-pass detectors `dets` on each of `splits` from one joint run per split (`JointInputs`);
    a detector's splits in `known[i]` (its val / val_ood scores from tuning) are not scored again. Returns the scores
    per detector and the detectors, by position, that turned out not to apply."""
    scores = [dict(k) for k in known]
    failed: dict[int, DetectorNotApplicable] = {}
    for split in progress(splits, desc="network-pass detectors"):
        members = [i for i in range(len(dets)) if split not in scores[i] and i not in failed]
        if not members:
            continue
        joint = JointInputs([dets[i] for i in members])
        columns = model_scores(joint, split)
        failed |= {members[j]: err for j, err in joint.failed.items()}
        for j, i in enumerate(members):
            if i not in failed:
                scores[i][split] = columns[:, j]
    return scores, failed


def _val_scores(
    det: Detector,
    points: Sequence[dict[str, Any]],
    banks: Mapping[str, FeatureBank],
    model_scores: ModelScoreFn | None,
) -> list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]:
    """(point, val scores, val_ood scores) for grid points that share the fit of `det` (differ in `score_params`).

    Cached detectors score all points at once (`score_grid`, e.g. one kNN search at the largest k); points
    that are not applicable (ViM's dim >= D) are dropped. Model-scored detectors score the whole grid in one run
    over each split's loader (`GridInputs`), sharing passes across the points (`score_inputs_grid`).
    """
    settings = [{k: v for k, v in point.items() if k in det.score_params} for point in points]
    if det.needs_model:
        assert model_scores is not None
        grid = GridInputs(det, settings)
        val, ood = (model_scores(grid, split).unbind(1) for split in ("val", "val_ood"))
        return list(zip(points, val, ood))
    try:
        val, ood = det.score_grid(banks["val"], settings), det.score_grid(banks["val_ood"], settings)
        return [(p, v, o) for p, v, o in zip(points, val, ood) if v is not None and o is not None]
    except DetectorNotApplicable:
        pass  # score the points one by one below, dropping the inapplicable ones
    out = []
    for point, setting in zip(points, settings):
        try:
            det.set_params(**setting)
            out.append((point, det.score(banks["val"]), det.score(banks["val_ood"])))
        except DetectorNotApplicable as err:
            log.debug("%s: grid point %s not applicable: %s", det.name, point, err)
    return out


def _split_scores(
    det: Detector, points: Sequence[dict[str, Any]], banks: Mapping[str, FeatureBank], splits: Sequence[str]
) -> list[dict[str, torch.Tensor]]:
    """The scores of fitted cached detector `det` on each of `splits` at each of `points` (which share its fit and
    applied on val, so apply here), shared across the points as tuning shares them (`score_grid`), on the CPU: they
    are kept to the run's end (every point of every swept detector, ~1 MB a point at ImageNet-1K's 130k test rows),
    which on the banks' GPU took memory the later detectors' passes need."""
    settings = [{k: v for k, v in point.items() if k in det.score_params} for point in points]
    per_split = {split: [s if s is None else s.cpu() for s in det.score_grid(banks[split], settings)] for split in splits}
    return [{split: scores[i] for split, scores in per_split.items()} for i in range(len(points))]  # type: ignore[misc]


def _fit(det: Detector, split: str, banks: Mapping[str, FeatureBank], model_scores: ModelScoreFn | None) -> Detector:
    """Fit `det` on the bank of `split`; detectors fitted from network passes also get, through `model_scores`, their
    per-sample statistics over that split (`ModelFitted`) or the passes over chosen rows of it they fold
    (`StreamFitted`)."""
    if not isinstance(det, (ModelFitted, StreamFitted)):
        return det.fit(banks[split])
    if model_scores is None:
        raise DetectorNotApplicable("it fits from network passes, and no model was given")
    if isinstance(det, ModelFitted):
        return det.fit_inputs(banks[split], model_scores(FitInputs(det), split))
    try:
        inspect.signature(model_scores).bind(det, split, None)
    except TypeError:
        raise DetectorNotApplicable("it fits from passes over chosen rows, and the model-score function given takes "
                                    "no rows (det, split, rows)") from None

    def run(fold: Fold, rows: torch.Tensor) -> None:
        inputs = FoldInputs(fold, rows)
        model_scores(inputs, split, rows)
        inputs.check()

    return det.fit_stream(banks[split], run)


def tune_detector(
    name: DetectorRef,
    params: Mapping[str, Any],
    banks: Mapping[str, FeatureBank],
    tune: bool,
    model_scores: ModelScoreFn | None = None,
    sweep: Sweep | None = None,
) -> tuple[Detector, bool, dict[str, torch.Tensor]]:
    """Build detector `name` (a name or an already resolved class), choose its grid point on val vs val_ood (when `tune`), fit it on its split.

    The chosen point has the highest val AUROC, the first in OpenOOD's order (`sweep_order`) among exact ties, as
    OpenOOD's search chooses. Fixed `params` are never tuned; a list given for a one-value key is its grid
    (`search_grid`), refused without `tune`. Grid points that differ only in `score_params` share
    one fit. Detectors that need the model are tuned through `model_scores(detector, split)` on `val` and `val_ood`
    (the extra passes ODIN needs). Returns the fitted detector (set to the chosen point), whether a search happened
    (one that scored a single applicable point, as knn's grid beyond every fit row does, chose nothing: it is
    recorded as a one-point grid is, untuned, the point's values among the detector's parameters), and the chosen
    point's scores on `val` and `val_ood` from the search (empty without one). With a `sweep` (a cached detector's),
    each fit also scores its grid points on the sweep's test splits, as it scores val (`score_grid`: knn's one search
    at the largest k), and the sweep gets every point scored (none without a search). Raises `DetectorNotApplicable`
    when no configuration applies (or the model is needed but not given).
    """
    cls = detector_class(name)
    name = cls.name
    if cls.needs_model and model_scores is None:
        raise DetectorNotApplicable("it needs the model and the inputs, and none were given")
    check_hparams(cls, params, tune)  # a list of values to tune, with tuning off: refused in one line
    free = search_grid(cls, params)
    params = split_hparams(cls, params)[0]  # the fixed values; a user's grids are in `free`
    points = grid_points(free)
    can_tune = tune and len(points) > 1 and "val" in banks and "val_ood" in banks
    if not can_tune:
        return _fit(build_detector(cls, **params), cls.fit_split, banks, model_scores), False, {}
    groups: dict[tuple[tuple[str, Any], ...], list[dict[str, Any]]] = {}
    for point in points:
        groups.setdefault(tuple((k, v) for k, v in point.items() if k not in cls.score_params), []).append(point)
    order = sweep_order(free)
    best: tuple[tuple[int, int], float, dict[str, Any], Detector, dict[str, torch.Tensor]] | None = None
    reason: DetectorNotApplicable | None = None
    scored = 0
    swept: list[tuple[dict[str, Any], float, dict[str, torch.Tensor]]] = []
    for group in groups.values():
        det = None
        while group and det is None:
            try:
                det = _fit(build_detector(cls, **params, **group[0]), cls.fit_split, banks, model_scores)
            except DetectorNotApplicable as err:
                reason, group = err, group[1:]
        if det is None:
            continue
        aurocs = []
        for point, val, val_ood in _val_scores(det, group, banks, model_scores):
            scored += 1
            auroc = ood_metrics(val, val_ood, name=f"{name}{point} on val")["auroc"]
            aurocs.append((point, auroc))
            # equal AUROCs (exact counts: `auroc_pairs`): the first in OpenOOD's order, whatever fits came first
            key = (auroc_pairs(val, val_ood), -order.index(point))
            if best is None or key > best[0]:
                best = (key, auroc, point, det, {"val": val, "val_ood": val_ood})
        if sweep is not None and aurocs:
            tests = _split_scores(det, [p for p, _ in aurocs], banks, sweep.splits)
            swept += [(p, a, t) for (p, a), t in zip(aurocs, tests)]
    if best is None:
        raise DetectorNotApplicable(f"none of its {len(points)} grid points ({', '.join(free)}) applies: {reason}")
    _, auroc, point, det, val_scores = best
    if sweep is not None and scored > 1:
        swept.sort(key=lambda s: points.index(s[0]))  # the grid's order (`grid_points`), whatever fits came first
        sweep.points += [SweptPoint(p, a, p == point, scores) for p, a, scores in swept]
    det.set_params(**{k: v for k, v in point.items() if k in cls.score_params})
    log.debug("%s: chose %s (val AUROC %.4f over %d of %d grid points)", name, point, auroc, scored, len(points))
    return det, scored > 1, val_scores


def with_data_facts(
    names: Sequence[DetectorRef], params: Mapping[str, Mapping[str, Any]], facts: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Fixed hyper-parameters per detector name, plus the `facts` about the data (e.g. `input_std`, the normalisation
    std ODIN's input step is divided by) for every detector that accepts them, unless the user set them."""
    out = {}
    for cls in map(detector_class, names):
        out[cls.name] = dict(params.get(cls.name, {}))
        for key, value in facts.items():
            if key in hparam_names(cls):
                out[cls.name].setdefault(key, value)
    return out


def detector_scorers(
    names: Sequence[DetectorRef],
    params: Mapping[str, Mapping[str, Any]],
    banks: Mapping[str, FeatureBank],
    tune: bool,
    model_scores: ModelScoreFn | None = None,
    sweep_splits: Sequence[str] = (),
) -> list[Scorer]:
    """Fit every named detector; detectors that need the model score (and tune) through `model_scores`.

    Cache-scored detectors score a split when asked. The network-pass ones score every split but the train split
    right after fitting, all of them together in one run per split (`network_scores`); the val / val_ood scores at
    the chosen point come from their search, so their validation AUROC costs no second pass over those splits.
    Structurally inapplicable detectors are skipped with a warning that says why (in fitting, or in their first
    network pass). With `sweep_splits` (the test splits: `detectors.sensitivity`), every cached detector with a grid
    to search also scores each grid point on them (`Sweep`, the scorer's `sweep`); one line names the detectors left
    out and why.
    """
    if tune and not {"val", "val_ood"} <= set(banks):
        untuned = [c.name for c in map(detector_class, names) if len(grid_points(search_grid(c, params.get(c.name, {})))) > 1]
        listed = [f"{c.name}.{key}" for c in map(detector_class, names) for key in split_hparams(c, params.get(c.name, {}))[1]]
        if untuned:
            log.warning("no validation-OOD set to tune on, so these detectors keep their default hyper-parameters: %s "
                        "(give one: data=folder's '+data.ood.val=<folder>', ood.evaluate's ood_data={'val': ...})%s",
                        ", ".join(untuned), f"; the lists given for {', '.join(listed)} are not searched" if listed else "")
    sweeps = _sweeps(list(map(detector_class, names)), params, banks, tune, sweep_splits) if sweep_splits else {}
    fitted: list[tuple[Detector, list[str], dict[str, torch.Tensor]]] = []
    grids: dict[str, dict[str, list[Any]]] = {}  # detector name -> the user's lists its search went over
    for cls in progress(list(map(detector_class, names)), desc="fitting detectors"):
        try:
            det, tuned, val_scores = tune_detector(cls, params.get(cls.name, {}), banks, tune, model_scores,
                                                   sweeps.get(cls.name))
        except DetectorNotApplicable as err:
            log.warning("skipping detector %s: %s", cls.name, err)
            continue
        fitted.append((det, sorted(search_grid(cls, params.get(cls.name, {}))) if tuned else [], val_scores))
        grids[cls.name] = split_hparams(cls, params.get(cls.name, {}))[1] if tuned else {}
    network = [det for det, _, _ in fitted if det.needs_model]
    known: dict[int, dict[str, torch.Tensor]] = {}
    if network:
        assert model_scores is not None  # tune_detector refuses network-pass detectors without it
        validation = ["val", "val_ood"] if {"val", "val_ood"} <= set(banks) else []
        splits = [s for s in banks if s not in ("train", "val", "val_ood")] + validation
        scores, failed = network_scores(network, [v for det, _, v in fitted if det.needs_model], splits, model_scores)
        for n, det in enumerate(network):
            if n in failed:
                log.warning("skipping detector %s: %s", det.name, failed[n])
            else:
                known[id(det)] = scores[n]
    scorers = []
    for det, chosen, _ in fitted:
        if not det.needs_model:
            sweep = sweeps[det.name].points if det.name in sweeps else []
            scorers.append(Scorer(det.name, lambda split, det=det: det.score(banks[split]), det.hparams, chosen, sweep,
                                  grids[det.name]))
        elif id(det) in known:
            score = partial(_known_or_run, known[id(det)], det, model_scores)
            scorers.append(Scorer(det.name, score, det.hparams, chosen, grid=grids[det.name]))
    return scorers


def _sweeps(
    classes: Sequence[type[Detector]],
    params: Mapping[str, Mapping[str, Any]],
    banks: Mapping[str, FeatureBank],
    tune: bool,
    splits: Sequence[str],
) -> dict[str, Sweep]:
    """A `Sweep` over `splits` per detector of `classes` whose grid tuning searches in this run: cached ones only (a
    network-pass detector would pay a pass over every test set per grid point); one line names those left out."""
    if not (tune and {"val", "val_ood"} <= set(banks)):
        log.warning("detectors.sensitivity: no grid is searched (tuning is off, or no validation-OOD set), so no "
                    "detector is swept")
        return {}
    grids = {cls.name: len(grid_points(search_grid(cls, params.get(cls.name, {})))) > 1 for cls in classes}
    network = [cls.name for cls in classes if cls.needs_model and grids[cls.name]]
    flat = [cls.name for cls in classes if not grids[cls.name]]
    why = [f"{', '.join(network)} (network-pass detectors: each grid point would take passes over every test set)"
           if network else "", f"{', '.join(flat)} (no grid to search in this run)" if flat else ""]
    if network or flat:
        log.info("detectors.sensitivity leaves out %s", "; ".join(w for w in why if w))
    return {cls.name: Sweep(splits) for cls in classes if grids[cls.name] and not cls.needs_model}


def _known_or_run(known: Mapping[str, torch.Tensor], det: Detector, model_scores: ModelScoreFn, split: str) -> torch.Tensor:
    """A network-pass detector's scores on `split`: computed already, or by a run of its own."""
    return known[split] if split in known else model_scores(det, split)


def evaluate(
    scorers: Sequence[Scorer],
    splits: Sequence[EvalSplit],
    id_acc: float,
    info: Mapping[str, Any],
    modes: Sequence[str] = ("standard",),
    csid_acc: Mapping[str, float] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, torch.Tensor]]]:
    """Score ID test, every test OOD split and every csid split with each scorer; one result row per (mode, scorer,
    OOD set), each row naming its `mode`, the scorer's hyper-parameters (`detector_params`), whether any was tuned
    and which (`tuned`, `tuned_params`) and, only where a tuned key's grid was the user's list, those lists
    (`tuned_grid`: rows of runs without such lists are as before it).

    `fsood` rows measure the ID test scores followed by every csid split's (in split order) against each OOD set;
    they carry `csid_acc` (OpenOOD's: correct predictions over ID test + all csid sets, from `id_acc` and the
    per-set accuracies `csid_acc`) and `csid_set_acc` (per csid set). Returns the rows and the
    per-split scores of every scorer.
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ConfigError(f"evaluation modes {list(modes)}: choose one or more of {list(MODES)}")
    id_split = next(s for s in splits if s.role == "id_test")
    ood_splits = [s for s in splits if s.role == "ood"]
    csid_splits = [s for s in splits if s.role == "csid"]
    if "fsood" in modes and not csid_splits:
        raise ConfigError("full-spectrum evaluation (evaluation.fsood=true) found no covariate-shifted ID set to score")
    rows: list[dict[str, Any]] = []
    all_scores: dict[str, dict[str, torch.Tensor]] = {}
    for scorer in progress(scorers, desc="scoring"):
        scores = {}
        for split in (id_split, *ood_splits, *csid_splits):
            s = scorer.score(split.name).detach().double().cpu()
            check_finite(s, f"detector {scorer.name} on {split.name}")
            scores[split.name] = s
        all_scores[scorer.name] = scores
        # the scores each mode's rows rank: fsood rows rank the csid sets too
        ranked = {m: torch.cat([scores[s.name] for s in (id_split, *(csid_splits if m == "fsood" else ()), *ood_splits)])
                  for m in modes}
        flat = [m for m in modes if _all_equal(ranked[m])]
        if flat:  # + 0.0: a score of -0.0 is said as 0, not -0
            log.warning("detector %s gives every %s image the same score (%.6g): its AUROC 50 and FPR95 100%s say "
                        "nothing about the data", scorer.name,
                        "ID test, csid and OOD" if "fsood" in flat else "ID test and OOD", float(ranked[flat[0]][0]) + 0.0,
                        "" if len(flat) == len(modes) else f" in the {flat[0]} rows")
        common = {"detector_params": scorer.hparams, "tuned": bool(scorer.tuned), "tuned_params": scorer.tuned,
                  **({"tuned_grid": scorer.grid} if scorer.grid else {})}
        extra = {mode: {"id_acc": id_acc} if mode == "standard" else fsood_accuracy(
            id_acc, len(scores[id_split.name]), csid_acc or {}, {s.name: len(scores[s.name]) for s in csid_splits})
            for mode in modes}
        for mode, split, m, n_id in mode_metrics(scorer.name, scores, splits, modes):
            rows.append(
                {
                    **info,
                    "detector": scorer.name,
                    "ood_dataset": split.name,
                    "ood_group": split.group,
                    "mode": mode,
                    **m,
                    **extra[mode],
                    "n_id": n_id,
                    "n_ood": len(scores[split.name]),
                    **common,
                }
            )
    return rows, all_scores


def mode_metrics(
    name: str, scores: Mapping[str, torch.Tensor], splits: Sequence[EvalSplit], modes: Sequence[str]
) -> Iterator[tuple[str, EvalSplit, dict[str, float], int]]:
    """(mode, OOD split, metrics, ID count) of one scorer `name`'s `scores` per split, for each evaluation mode and OOD
    set: ID = the ID test set (`standard`), or it followed by every csid set in split order (`fsood`)."""
    id_split = next(s for s in splits if s.role == "id_test")
    csid_splits = [s for s in splits if s.role == "csid"]
    for mode in modes:
        id_scores = scores[id_split.name] if mode == "standard" else torch.cat([scores[s.name] for s in (id_split, *csid_splits)])
        for split in (s for s in splits if s.role == "ood"):
            label = f"{name} on {split.name}" + (" (full-spectrum)" if mode == "fsood" else "")
            yield mode, split, ood_metrics(id_scores, scores[split.name], name=label), len(id_scores)


#: the keys of a result row that say whose run, which detector and which mode and OOD set it is (a sensitivity row's)
IDENTITY = ("method", "detector", "backbone", "id_dataset", "seed", "mode", "ood_dataset", "ood_group")


def sensitivity_rows(
    scorers: Sequence[Scorer], splits: Sequence[EvalSplit], info: Mapping[str, Any], modes: Sequence[str] = ("standard",)
) -> list[dict[str, Any]]:
    """One row per swept scorer x grid point x (mode, OOD set) (`Scorer.sweep`): the result rows' `IDENTITY` keys of
    `info` and the scorer, the point (`params`), whether tuning chose it (`chosen`), its validation AUROC (`val_auroc`)
    and its test metrics, measured as `evaluate` measures the result rows. A point with NaN or infinite test scores
    (an unchosen point that overflows on an OOD set) is left out, with a warning: the chosen point's would have
    stopped `evaluate` already, and an option that only watches must not lose the run's results."""
    rows = []
    for scorer in scorers:
        for point in scorer.sweep:
            scores = {split: s.detach().double().cpu() for split, s in point.scores.items()}
            try:
                measured = list(mode_metrics(f"{scorer.name}{point.params}", scores, splits, modes))
            except NonFiniteError as err:
                log.warning("detectors.sensitivity: %s at %s left out of sensitivity.jsonl: %s", scorer.name,
                            point.params, err)
                continue
            for mode, split, m, _ in measured:
                row = {**info, "detector": scorer.name, "mode": mode, "ood_dataset": split.name, "ood_group": split.group}
                rows.append({**{k: row[k] for k in IDENTITY if k in row}, "params": point.params,
                             "chosen": point.chosen, "val_auroc": point.val_auroc, **m})
    return rows


def _all_equal(scores: torch.Tensor) -> bool:
    """Whether every score is the same (and there is one): the rows ranking them measure nothing."""
    return len(scores) > 0 and bool((scores == scores[0]).all())


def fsood_accuracy(id_acc: float, n_test: int, csid_acc: Mapping[str, float], csid_n: Mapping[str, int]) -> dict[str, Any]:
    """The accuracy fields of a full-spectrum row: `id_acc` (ID test), `csid_acc` (OpenOOD's: ID test and every csid
    set pooled) and `csid_set_acc` (per csid set)."""
    missing = sorted(set(csid_n) - set(csid_acc))
    if missing:
        raise ConfigError(f"no accuracy for the csid sets {missing} (their labels were not collected)")
    # accuracies are correct / n in float64, so rounding acc * n recovers each count exactly
    correct = round(id_acc * n_test) + sum(round(csid_acc[name] * n) for name, n in csid_n.items())
    return {
        "id_acc": id_acc,
        "csid_acc": correct / (n_test + sum(csid_n.values())),
        "csid_set_acc": {name: csid_acc[name] for name in csid_n},
    }


def rows_by_mode(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Rows split by their `mode` (rows written before modes existed are `standard`), in `MODES` order."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        out.setdefault(str(row.get("mode", "standard")), []).append(row)
    return {mode: out[mode] for mode in sorted(out, key=lambda m: MODES.index(m) if m in MODES else len(MODES))}


def group_means(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """(detector, group) -> unweighted mean of each metric over the group's OOD sets (OpenOOD's aggregation); pass
    the rows of one mode (`rows_by_mode`)."""
    buckets: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        buckets.setdefault((row["detector"], row["ood_group"]), []).append(row)
    return {key: {m: sum(r[m] for r in rs) / len(rs) for m in METRICS} for key, rs in buckets.items()}
