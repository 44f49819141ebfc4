"""Detector API: post-hoc ID scores computed from cached `FeatureBank`s.

A detector is a small class with a registered `name`, hyper-parameters as constructor keywords, an optional
tuning `grid`, the ID split it is fitted on (`fit_split`), `fit(bank)` and `score(bank) -> [N]`, higher = more ID.
Subclassing with a `name` registers it; `build_detector(name, **hparams)` is the only constructor callers use.
A run resolves each configured name to its class once (`resolve_detectors`); everything downstream takes the class.
Hyper-parameters that count feature dimensions (ViM's `dim`) accept a fraction of the feature dimension D
(`relative_count`), so one grid applies to every backbone. A detector declares the `ranges` of its numeric
hyper-parameters; a value outside them is refused in one line when the detector is built or `set_params` is called.
Every subclass's `fit` refuses a bank with NaN or infinite logits or features (`NonFiniteError`), and its `score` /
`score_grid` give such rows NaN and the others their scores without them: NaN in, NaN out, for a detector written
by a user too. A final-layer weight or bias with NaN or inf (a diverged model, which made every row NaN) is refused
by both, an empty fit bank by `fit`, and fit labels outside the network's classes by the detectors that read them.
A `fit` that ends without `return self` returns the detector all the same (`build_detector(...).fit(bank)
.score(bank)` and the evaluation's tuning take what `fit` returns). The same guards read a bank built by
hand as plain tensors (detached, int64 labels: `plain_bank`), refuse a network with fewer outputs than
`min_classes` and, once fitted, a bank of another network (`check_shape`); `score_inputs` / `fit_statistics` run
the model in eval mode whatever mode it was left in.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import math
import numbers
import re
import typing
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import nn

from ood.errors import ConfigError, NonFiniteError, OODError
from ood.features.bank import FeatureBank
from ood.features.passes import eval_mode

_REGISTRY: dict[str, type[Detector]] = {}
_T = TypeVar("_T")


class DetectorNotApplicable(OODError):
    """The detector cannot run on this model or benchmark (e.g. ViM with dim >= D); the run skips it and says why."""


class SharedPasses:
    """Network work on one batch that the detectors scoring it together reuse: `get(key, compute)` runs `compute()`
    for the first detector that asks for `key` and hands the same result to the others (ODIN's and i-ODIN's forward
    pass and input gradients; the clean staged pass of AdaSCALE, mds_ensemble and mahalanobis_odin, and AdaSCALE-A's
    and -L's perturbed pass). One object per batch and `Detector.pass_group`, made by
    the caller that runs the detectors over it; the key names the computation and every hyper-parameter it depends
    on."""

    def __init__(self) -> None:
        self._results: dict[Hashable, Any] = {}

    def get(self, key: Hashable, compute: Callable[[], _T]) -> _T:
        if key not in self._results:
            self._results[key] = compute()
        return self._results[key]


@dataclass(frozen=True)
class Range:
    """The values a numeric hyper-parameter admits: from `low` to `high`, an end excluded when `open_low` /
    `open_high`; `integer`: whole numbers only."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False
    integer: bool = False

    def admits(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            return False
        if self.integer and value != int(value):
            return False
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def __str__(self) -> str:
        interval = f"{'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"
        return f"{'whole numbers in ' if self.integer else ''}{interval}"


#: common ranges: a percentile, a positive number, a count, a non-negative number
PERCENTILE = Range(0, 100)
POSITIVE = Range(0, open_low=True)
COUNT = Range(1, integer=True)
NON_NEGATIVE = Range(0)
#: a detector's `seed` where it declares no range of its own (`torch.Generator.manual_seed` failed on 0.5, after the pass)
SEED = Range(0, integer=True)


class Detector:
    """Base class. Subclasses set `name` and implement `score` (and `fit` when they need ID statistics); a row's score
    depends on that row and the fitted statistics only, never on the other rows scored with it. The class attributes
    below declare what it reads (`per_class`, `reads_head`, `reads_features`, `min_classes`), so that the guards
    refuse a bank it cannot score in one line; `needs_model` detectors score through `score_inputs`, and a classmethod
    `taps(backbone)` caches layer reductions in `bank.extras` (`ood.detectors.network`; docs/adding_a_detector.md)."""

    name: ClassVar[str]
    fit_split: ClassVar[Literal["train", "val"]] = "train"
    #: hyper-parameter name -> values searched on ID-val vs val-OOD (OpenOOD's grid where one exists)
    grid: ClassVar[dict[str, Sequence[Any]]] = {}
    #: True for detectors that need the network and the inputs (input perturbation), not just the cache
    needs_model: ClassVar[bool] = False
    #: hyper-parameters that only change `score`, not `fit`: tuning fits once per setting of the others
    score_params: ClassVar[frozenset[str]] = frozenset()
    #: True where fit and score read float16 feature banks chunk by chunk (`evaluation.feature_dtype=float16`)
    float16_features: ClassVar[bool] = False
    #: True for detectors whose extra network passes would slow the default run: `full` selects them, `all` does not
    full_only: ClassVar[bool] = False
    #: network-pass detectors with the same group may share work through one `SharedPasses` per batch ("odin": ODIN
    #: and i-ODIN; "staged": AdaSCALE, mds_ensemble, mahalanobis_odin); a joint run scores a group's members one
    #: after the other and then drops what they shared
    pass_group: ClassVar[str | None] = None
    #: hyper-parameter name -> the values it admits (checked by `build_detector` and `set_params`; a sequence value,
    #: e.g. AdaSCALE's percentile pair, element by element)
    ranges: ClassVar[dict[str, Range]] = {}
    #: the detector whose scores this one reproduces, by its name in published reference tables (`gram_stream`:
    #: `gram`); None: its own name
    reproduces: ClassVar[str | None] = None
    #: True for detectors that fit statistics per ID class from the fit bank's labels (class means, per-class Gram
    #: bounds): a fit bank without rows of some class is refused (`DetectorNotApplicable`: the run skips it, saying
    #: so), since that class's statistics would be zeros and its scores silently wrong
    per_class: ClassVar[bool] = False
    #: 2 for detectors whose score compares the classes (a softmax over them, a decision boundary, the gradient of a
    #: cross-entropy over every class): on a network with one output (a sigmoid binary head) each of them would give
    #: every input the same score (AUROC 0.5, silently), so `fit` and `score` refuse it (`DetectorNotApplicable`)
    min_classes: ClassVar[int] = 1
    #: False for detectors that read only the bank's logits (and labels), never its penultimate features: they score
    #: a bank built without features (`FeatureBank(logits, features=None)`), which the others refuse in one line
    reads_features: ClassVar[bool] = True
    #: True for detectors that read the bank's final-layer weight and bias (`bank.head()`: activation shaping, ViM's
    #: origin, decision boundaries): a bank built without them is refused in one line naming the detector
    reads_head: ClassVar[bool] = False
    #: hyper-parameters that count feature dimensions and take a fraction of D in (0, 1) too (`relative_count`):
    #: ood-report labels a sensitivity axis of such fractions "(fraction of D)"
    relative_counts: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        guards = {"fit": _checked_fit, "fit_inputs": _checked_fit, "fit_stream": _checked_fit, "score": _nan_for_nonfinite,
                  "score_grid": _nan_for_nonfinite, "score_inputs": _in_eval_mode, "score_inputs_grid": _in_eval_mode,
                  "fit_statistics": _in_eval_mode}
        for method, guard in guards.items():
            if method in cls.__dict__:
                setattr(cls, method, guard(cls.__dict__[method]))
        check_declared(cls)
        name = cls.__dict__.get("name")
        if name is not None:
            if name in _REGISTRY:  # name both classes: a new detector's name taken by a registered one, or a module imported twice
                other = _REGISTRY[name]
                raise RuntimeError(f"detector name {name!r} registered twice: {other.__module__}.{other.__qualname__} and "
                                   f"{cls.__module__}.{cls.__qualname__}; give the new detector another name")
            _REGISTRY[name] = cls

    def __getattr__(self, name: str) -> Any:
        """Only reached for a missing attribute: a fitted one (`means_`, `index_`, ...) before `fit` says so."""
        if name.endswith("_") and not name.startswith("__"):
            raise AttributeError(f"{getattr(self, 'name', type(self).__name__)}: {name} is set by fit; call fit(bank) with the ID {self.fit_split} "
                                 f"bank before score")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def hparams(self) -> dict[str, Any]:
        """The constructor keywords with their current values."""
        return {k: getattr(self, k) for k in hparam_names(type(self))}

    def fit(self, bank: FeatureBank) -> Detector:
        """Collect ID statistics from `bank` (the split named by `fit_split`); default: nothing to fit (but the checks
        every `fit` makes: `min_classes`, `reads_features`)."""
        check_classes(self, bank)
        check_features(self, bank)
        check_head(self, bank, "fit")
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        """ID score per row of `bank`, higher = more in-distribution."""
        raise ConfigError(f"detector {self.name!r} ({type(self).__module__}.{type(self).__qualname__}) implements no "
                          "score(bank): return a float64 [N] ID score per row, higher = more in-distribution")

    def set_params(self, **params: Any) -> Detector:
        """Change score-only hyper-parameters (`score_params`) of a fitted detector in place."""
        refit = sorted(set(params) - self.score_params)
        if refit:
            raise ValueError(f"{self.name}: {refit} change the fit; build a new detector instead")
        if grids := split_hparams(type(self), params)[1]:
            raise ValueError(f"{self.name}: set_params takes one value per hyper-parameter, got the lists {grids}")
        check_ranges(type(self), params)
        for key, value in params.items():
            setattr(self, key, value)
        return self

    def score_grid(self, bank: FeatureBank, points: Sequence[dict[str, Any]]) -> list[torch.Tensor | None]:
        """Scores of `bank` at each setting of `score_params` in `points`; leaves the last one set.

        Detectors override this to share work across the points (kNN searches once at the largest k); an override
        may give None for a point that does not apply (kNN's k beyond the bank), which tuning drops.
        """
        return [self.set_params(**point).score(bank) for point in points]

    def score_inputs(self, model: nn.Module, x: torch.Tensor, shared: SharedPasses | None = None) -> torch.Tensor:
        """ID score from the model and a batch of inputs; only for `needs_model` detectors, whose `score` the
        evaluation never calls (their `fit`, if any, still runs first on the cached `fit_split` bank). `model`: the
        evaluated method, in eval mode (`model(x)` gives the logits; `ood.detectors.network.backbone_of(model)` the
        staged backbone); `x` on its device. `shared`: the batch's passes other detectors scoring the same batch may
        already have run (`SharedPasses`)."""
        raise NotImplementedError(f"{self.name} scores from cached features, not from inputs")

    def score_inputs_grid(
        self, model: nn.Module, x: torch.Tensor, points: Sequence[dict[str, Any]], shared: SharedPasses | None = None
    ) -> list[torch.Tensor]:
        """`score_inputs` of one batch at each setting of `score_params` in `points`; leaves the last one set.

        Detectors override this to share network passes across the points (ODIN: one forward per batch and one
        input gradient per temperature for every noise value).
        """
        return [self.set_params(**point).score_inputs(model, x, shared) for point in points]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{type(self).__name__}({args})"


def _checked_fit(fit: Callable[..., Any]) -> Callable[..., Any]:
    """`fit` refusing a bank with NaN or infinite logits or features in one line (fitted statistics would be NaN,
    a linear-algebra error, or silently finite and wrong: kNN's index, CF-OOD's and relation's references), and, for
    a `per_class` detector, a labelled bank without rows of some of the network's classes; returning the detector
    when `fit` returns None (a user's `fit` without `return self` hung tuning, which retried the same grid point)."""

    @functools.wraps(fit)
    def checked(self: Detector, *args: Any, **kwargs: Any) -> Any:
        # the bank: first argument, or by keyword; anything else (None: AdaSCALE fitted from its network-pass
        # statistics alone) is not checked
        args, kwargs = _with_plain_bank(self, args, kwargs)
        bank = args[0] if args else kwargs.get("bank")
        if isinstance(bank, FeatureBank):
            check_classes(self, bank)
            check_features(self, bank)
            check_head(self, bank, "fit")
            if len(bank) == 0:
                split = self.fit_split
                raise ConfigError(f"{self.name}: its fit bank has no rows, and its statistics are fitted to them; fit it on "
                                  f"the ID {split} bank, one row per ID {split} image (ood.extract(model, <the ID "
                                  f"{split} folder>))")
        bad = int(bank.nonfinite_rows().sum()) if isinstance(bank, FeatureBank) else 0
        if bad:
            raise NonFiniteError(f"{self.name}: {bad} of {len(bank)} rows of its fit bank hold NaN or infinite logits "
                                 "or features")
        if self.per_class and isinstance(bank, FeatureBank) and bank.labels is None:
            raise ConfigError(f"{self.name}: its fit bank has no labels, and its per-class statistics need them "
                              "(FeatureBank(labels=...): the ID class of each row)")
        if self.per_class and isinstance(bank, FeatureBank) and bank.labels is not None:
            check_labels(self, bank)
            classes = bank.logits.shape[1]
            missing = (torch.bincount(bank.labels.cpu(), minlength=classes)[:classes] == 0).nonzero().flatten().tolist()
            if missing:
                raise DetectorNotApplicable(
                    f"{self.name} fits statistics per class, and its fit bank has no rows of {len(missing)} of the "
                    f"network's {classes} classes (e.g. {missing[:5]}): every class needs rows (data.fit_fraction < 1 "
                    "can leave classes out: raise it)")
        fitted = fit(self, *args, **kwargs)
        fitted = self if fitted is None else fitted
        if isinstance(bank, FeatureBank):
            fitted._fit_shape = bank_shape(bank)
        return fitted

    return checked


def bank_shape(bank: FeatureBank) -> tuple[int, int | None]:
    """(classes, feature dimension or None for a bank without features) of a bank: what the statistics a detector
    fits on it are sized by."""
    return bank.logits.shape[1], None if bank.features is None else bank.features.shape[1]


def check_shape(det: Detector, bank: FeatureBank) -> None:
    """Refuse to score a bank of another network than the fit bank's (other classes or feature dimension) in one line:
    knn and nnguide failed with faiss' bare `AssertionError`, most others with a tensor-shape error, and react, klm,
    openmax and tempscale scored it with the other network's statistics without a word. The feature dimensions are
    compared where both banks have features (a logit-only detector may be fitted with them and score without)."""
    fitted = getattr(det, "_fit_shape", None)
    shape = bank_shape(bank)
    if fitted is not None and (shape[0] != fitted[0] or None not in (shape[1], fitted[1]) and shape[1] != fitted[1]):
        raise ConfigError(f"{det.name}: fitted on a bank of {fitted[0]} classes x {fitted[1]} features, asked to score one of "
                          f"{shape[0]} x {shape[1]}: fit and score banks must come from the same network")


def check_features(det: Detector, bank: FeatureBank) -> None:
    """Refuse a bank without penultimate features (`features=None`) to a detector that reads them (`reads_features`)
    in one line naming the detector, where it would fail on `None` deep inside its statistics."""
    if bank.features is None and det.reads_features:
        raise ConfigError(f"{det.name}: it reads the penultimate features and this FeatureBank has none (features=None); "
                          "build the bank with features=... (the [N, D] input of the final layer), or use a logit-only "
                          f"detector: {', '.join(logit_only_detectors())}")


def check_head(det: Detector, bank: FeatureBank, role: str) -> None:
    """Refuse a bank whose final-layer weight or bias holds NaN or +-inf (a diverged model) in one line
    (`NonFiniteError`): the detectors that read the head scored every row NaN without a word (ash, dice, react, ...),
    or failed inside a decomposition of it (vim's `svd`, weiper's histogram index); and a bank without them to a
    detector that reads them (`reads_head`; `ConfigError`), where `bank.head()` raised a ValueError naming no
    detector. `role`: "fit" or "score"."""
    if det.reads_head and (bank.weight is None or bank.bias is None):
        raise ConfigError(f"{det.name}: it reads the final layer's weight and bias and its {role} bank has none; build "
                          "the bank with weight=... and bias=... (the [C, D] weight and [C] bias of the final linear "
                          "layer)")
    bad = [k for k, t in (("weight", bank.weight), ("bias", bank.bias)) if t is not None and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteError(f"{det.name}: the final-layer {' and '.join(bad)} of its {role} bank hold"
                             f"{'' if len(bad) > 1 else 's'} NaN or infinite values (a diverged model): retrain it, or "
                             "load a checkpoint from before it diverged")


def check_labels(det: Detector, bank: FeatureBank) -> None:
    """Refuse fit labels outside [0, C) for the C network outputs in one line (`ConfigError`) to a detector that fits
    statistics per label: an OOD label (-1) or a label of a class the network lacks failed deep inside
    (`bincount`, an index error, cross-entropy's target check)."""
    if bank.labels is None:
        return
    classes = bank.logits.shape[1]
    outside = bank.labels[(bank.labels < 0) | (bank.labels >= classes)]
    if len(outside):
        raise ConfigError(f"{det.name}: {len(outside)} of the {len(bank)} labels of its fit bank are outside the "
                          f"network's {classes} classes [0, {classes}) (e.g. {outside.unique()[:5].tolist()}); fit it on "
                          "ID rows, each labelled by the index of its class among the network's outputs")


def check_classes(det: Detector, bank: FeatureBank) -> None:
    """Refuse a network with fewer outputs than the detector's `min_classes` (`DetectorNotApplicable`, one line)."""
    classes = bank.logits.shape[1]
    if classes < det.min_classes:
        raise DetectorNotApplicable(
            f"it compares the classes' scores and this network has {classes} output, where it would score every "
            "input alike; give a one-logit binary head as two logits [0, f]")


def plain_bank(det: Detector, bank: FeatureBank) -> FeatureBank:
    """`bank` as the detectors read it: its tensors detached from autograd (a user's `weight=model.fc.weight`, or
    outputs of a forward pass run with gradients on, made the scores carry a graph, and the detectors that go
    through NumPy, gmm and openmax, raise) and its labels int64 (int32 or int16 labels, e.g. from a NumPy array,
    failed in the per-class statistics and tempscale's cross-entropy); float labels are refused in one line. The same
    bank when nothing needs changing (no copy)."""
    tensors = {"logits": bank.logits, "features": bank.features, "weight": bank.weight, "bias": bank.bias}
    changes: dict[str, Any] = {k: t.detach() for k, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    if any(t.requires_grad for t in bank.extras.values()):
        changes["extras"] = {k: t.detach() for k, t in bank.extras.items()}
    if bank.labels is not None and bank.labels.dtype != torch.int64:
        if bank.labels.is_floating_point() or bank.labels.is_complex() or bank.labels.dtype == torch.bool:
            raise ConfigError(f"{det.name}: the bank's labels must be integer class indices, got {bank.labels.dtype}")
        changes["labels"] = bank.labels.long()
    return replace(bank, **changes) if changes else bank


def _with_plain_bank(det: Detector, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`args` / `kwargs` of a `fit` with its bank (first argument or `bank=`) made a `plain_bank`."""
    if args and isinstance(args[0], FeatureBank):
        return (plain_bank(det, args[0]), *args[1:]), kwargs
    if isinstance(kwargs.get("bank"), FeatureBank):
        return args, {**kwargs, "bank": plain_bank(det, kwargs["bank"])}
    return args, kwargs


def _in_eval_mode(run: Callable[..., Any]) -> Callable[..., Any]:
    """`score_inputs` / `score_inputs_grid` / `fit_statistics` running the model in eval mode, every module's own mode
    restored after: a model left in training mode (a user's, straight from its training loop) scored each input from
    its batch's batch-norm statistics (a score depending on the other rows) and had its running statistics
    overwritten by the scoring passes. Detectors that need a module active (mcdropout's dropout) switch it
    themselves inside."""

    @functools.wraps(run)
    def evaluating(self: Detector, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with eval_mode(model):
            return run(self, model, *args, **kwargs)

    return evaluating


def _nan_for_nonfinite(score: Callable[..., Any]) -> Callable[..., Any]:
    """`score` / `score_grid` giving NaN to the rows with NaN or infinite logits or features, and to the other rows
    what they score without those (NaN in, NaN out, for every detector: scored as they were, CF-OOD's and relation's
    such rows came out finite, WeiPer's histogram binning failed)."""

    @functools.wraps(score)
    def guarded(self: Detector, bank: FeatureBank, *args: Any, **kwargs: Any) -> Any:
        if isinstance(bank, FeatureBank):
            bank = plain_bank(self, bank)
            check_classes(self, bank)
            check_features(self, bank)
            check_shape(self, bank)
            check_head(self, bank, "score")
        bad = bank.nonfinite_rows() if isinstance(bank, FeatureBank) else None
        if bad is None or not bool(bad.any()):
            return score(self, bank, *args, **kwargs)
        out = score(self, bank.subset(~bad), *args, **kwargs)  # rows are scored independently of each other

        def spread(s: torch.Tensor | None) -> torch.Tensor | None:
            if s is None:
                return None
            full = torch.full((len(bank),), torch.nan, dtype=s.dtype, device=s.device)
            full[~bad.to(s.device)] = s
            return full

        return [spread(s) for s in out] if isinstance(out, list) else spread(out)

    return guarded


def check_declared(cls: type[Detector]) -> None:
    """Refuse, when the class is defined, a `grid`, `score_params` or `ranges` key that is no keyword of its
    constructor (one line naming the keys and the keywords): a misspelt grid key failed only when the evaluation tuned
    the detector, after the whole training, and a misspelt `score_params` or `ranges` key was silently never used. A
    constructor of its own taking `**kwargs` is not checked; without one (object's `*args, **kwargs`) it takes none."""
    init = cls.__init__
    if init is not object.__init__ and any(p.kind == p.VAR_KEYWORD for p in inspect.signature(init).parameters.values()):
        return
    accepted = hparam_names(cls)
    for attr in ("grid", "score_params", "ranges"):
        wrong = sorted(set(getattr(cls, attr)) - set(accepted))
        if wrong:
            raise ConfigError(f"detector {cls.__module__}.{cls.__qualname__}: {attr} keys {wrong} are not keywords of its "
                              f"__init__ (accepted: {accepted or 'none'}); name each after a constructor keyword")


def hparam_names(cls: type[Detector]) -> list[str]:
    """Keyword hyper-parameters of a detector's constructor (none for detectors without `__init__`)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def reference_name(name: str) -> str:
    """The name reference tables list detector `name` under: what it `reproduces`, else its own (a name outside the
    registry, e.g. a method's own score, as it is)."""
    cls = _REGISTRY.get(name)
    return cls.reproduces or name if cls is not None else name


def available_detectors() -> list[str]:
    """Registered detector names, sorted."""
    return sorted(_REGISTRY)


def float16_detectors() -> list[str]:
    """Registered detectors that accept float16 feature banks (`Detector.float16_features`), sorted."""
    return [n for n in available_detectors() if _REGISTRY[n].float16_features]


def logit_only_detectors() -> list[str]:
    """Registered detectors that score a bank without penultimate features (`Detector.reads_features` False), sorted."""
    return [n for n in available_detectors() if not _REGISTRY[n].reads_features]


def relative_count(value: float, total: int) -> int:
    """A count given absolutely (an integer, or a float >= 1) or as a fraction of `total` (a float in (0, 1),
    rounded, at least 1): lets a grid such as ViM's `dim` say "D/2" for every backbone."""
    if 0 < value < 1:
        return max(1, round(value * total))
    return int(value)


#: named selections of the registry usable in place of a list or inside one (`detectors.names: all`,
#: `[full, gram_stream]`); none selects another form of a detector (`reproduces`), which only its name does
SELECTIONS = {
    "full": "every registered detector (but another form of one)",
    "all": "every registered detector but the `full_only` ones (slow network passes, gram's large cache, the leaderboard's pre-fix gram_v15)",
    "cached": "the detectors of `all` that score from the cache alone (no odin, no network pass)",
}

#: a detector named by its registered name, or its class (already resolved: no registry lookup)
DetectorRef = str | type[Detector]


def resolve_detectors(names: str | Sequence[DetectorRef]) -> list[type[Detector]]:
    """Detector classes from one name, a registry selection (`full`, `all`, `cached`), or a list of names and
    selections (`[full, gram_stream]`); unknown names fail listing the choices, and a detector named twice counts
    once (one score, one set of rows). The one registry lookup of a run: the evaluation passes the classes on."""
    if isinstance(names, str):
        if names in _REGISTRY or "." in names:  # one detector named alone, by its name or import path
            return [detector_class(names)]
        if names not in SELECTIONS:  # as a one-name list: named with the detectors, not with the selections alone
            return resolve_detectors([names])
        keep = {"full": lambda c: True, "all": lambda c: not c.full_only, "cached": lambda c: not (c.needs_model or c.full_only)}[names]
        return [_REGISTRY[n] for n in available_detectors() if keep(_REGISTRY[n]) and _REGISTRY[n].reproduces is None]
    unknown = [n for n in names if isinstance(n, str) and n not in _REGISTRY and n not in SELECTIONS and "." not in n]
    if unknown:  # a list holds names and selections: the message lists both, and every unknown name at once
        named = ", ".join(f"{n!r}{_known_as(n)}" for n in dict.fromkeys(unknown))
        raise ConfigError(f"unknown detector{'s' if len(set(unknown)) > 1 else ''} {named}; available: "
                          f"{', '.join(available_detectors())}; selections: {', '.join(SELECTIONS)}{_OWN}")
    picked = (resolve_detectors(name) if isinstance(name, str) and name in SELECTIONS else [detector_class(name)]
              for name in names)
    return list(dict.fromkeys(cls for group in picked for cls in group))


#: how the unknown-detector messages say to name a detector defined outside ood
_OWN = "; a detector of your own: its import path, e.g. my_pkg.my_detectors.FeatureNorm"


def detector_class(name: DetectorRef) -> type[Detector]:
    """The class registered as `name`, or the `Detector` subclass at import path `name` (`my_pkg.detectors.MyDet`:
    a detector defined outside ood, which `ood-train` / `ood-eval` never import otherwise); a class is returned as it
    is. A class without a `name` is refused in one line: its rows would have no detector to be reported under."""
    if isinstance(name, str) and name not in _REGISTRY and "." in name:
        name = _imported(name)
    if isinstance(name, type) and issubclass(name, Detector):
        if getattr(name, "name", None) is None:
            raise ConfigError(f"detector class {name.__module__}.{name.__qualname__} has no `name`: set the class "
                              "attribute name = '<name>', the name its scores are reported and configured under")
        return name
    if name not in _REGISTRY:
        raise ConfigError(f"unknown detector {name!r}{_known_as(name)}; available: {', '.join(available_detectors())}{_OWN}")
    return _REGISTRY[name]


def _imported(path: str) -> type[Detector]:
    """The `Detector` subclass at import path `path` (`module.Class`), imported; one line for a module that cannot
    be imported, a missing attribute, or an attribute that is no detector class."""
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"detector {path!r} cannot be imported: {err}; give a detector's name or the import path "
                          "module.Class of your own, with its folder on PYTHONPATH (PYTHONPATH=. ood-train ...)") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Detector)):
        found = "nothing" if cls is None else f"a {type(cls).__name__}"
        raise ConfigError(f"detector {path!r}: {module_name} holds {found} named {attr!r}, not a Detector subclass; "
                          f"name the class, e.g. {module_name}.<YourDetector>")
    return cls


#: the names OpenOOD v1.5 (postprocessor keys) and pytorch-ood (class names, lower case) give detectors that are
#: registered here under another name; names that differ only in case (KNN, ViM, ReAct) are found without a listing
OTHER_NAMES = {
    "base": "msp", "mls": "maxlogit", "ebo": "energy", "temp_scaling": "tempscale", "mds": "mahalanobis",
    "dropout": "mcdropout", "maxsoftmax": "msp", "energybased": "energy", "temperaturescaling": "tempscale",
    "klmatching": "klm", "rmd": "rmds", "multimahalanobis": "mds_ensemble", "mahalanobisodin": "mahalanobis_odin",
    "nacue": "nac", "gradnormkl": "gradnorm", "temperature_scaling": "tempscale",
}
#: pytorch-ood classes whose lower-case name is another detector here, matched as written: its `ASH` defaults to the
#: variant ASH-S, our `ash` is ASH-B (OpenOOD's ash)
CASED_NAMES = {"ASH": "ash_s"}
#: OpenOOD v1.5 postprocessor keys and pytorch-ood classes (lower case) with no post-hoc detector here: what to use
#: instead, so that `godin` is not answered with "did you mean 'odin'?"
NOT_POST_HOC = {
    "grood": "a method here: method=grood", "mcm": "not in ood: it needs CLIP's text embeddings",
    "weightedebo": "not in ood: it needs VOS training",
    "mcd": "OpenOOD's mcd trains two heads: not in ood; pytorch-ood's MCD (MC dropout) is 'mcdropout'",
    **dict.fromkeys(("cider", "conf_branch", "godin", "npos", "mos", "t2fnorm", "reweightood", "rotpred", "rts",
                     "ensemble", "opengan", "patchcore", "cutpaste", "draem", "dsvdd", "rd4ad", "ssd"),
                    "not in ood: it trains a network of its own, needs several networks or is an anomaly-detection "
                    "pipeline, not a post-hoc detector of a trained classifier"),
}
#: options of the `detectors` config group that are no selection, answered with the selection they hold
#: (`detectors.names=fast` for `detectors=fast`, which `ood.evaluate(detectors="fast")` also takes)
GROUP_OPTIONS = {"fast": "cached"}


def _known_as(name: object) -> str:
    """For an unknown detector name another library uses (`mls`, `MaxSoftmax`, `KNN`) or a config group option
    (`fast`): ' (here: <ours>)'; for a misspelt one (`knnn`, `al`): ' (did you mean <closest>?)'; else ''."""
    key = str(name).lower()
    ours = CASED_NAMES.get(str(name)) or OTHER_NAMES.get(key) or GROUP_OPTIONS.get(key) or (key if key in _REGISTRY else None)
    if ours is not None:
        return f" (here: {ours!r})"
    if key in NOT_POST_HOC:
        return f" ({NOT_POST_HOC[key]})"
    close = difflib.get_close_matches(key, [*SELECTIONS, *available_detectors()], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build_detector(name: DetectorRef, **hparams: Any) -> Detector:
    """Construct the detector `name` (or class); unknown names or hyper-parameters raise `ConfigError` listing the
    choices. One setting: a list of values to tune is refused in one line, a one-value list is that value."""
    cls = detector_class(name)
    check_hparams(cls, hparams)
    fixed, grids = split_hparams(cls, hparams)
    if grids:
        key, values = next(iter(grids.items()))
        raise ConfigError(f"detector {cls.name!r}: {key}={values!r} lists values to tune, and build_detector builds one "
                          f"detector: give one value, e.g. {key}={values[0]!r} (ood's evaluation tunes a list given in "
                          "detectors.params)")
    return cls(**fixed)


def check_hparams(cls: type[Detector], hparams: Mapping[str, Any], tune: bool = True) -> None:
    """Raise `ConfigError` for a hyper-parameter `cls` does not take, naming ours where only the case differs
    (OpenOOD's `K` of knn and nnguide is `k` here), a value outside its declared range (each value of a grid:
    `split_hparams`), an empty grid, or with `tune` False a grid, which asks for tuning. The evaluation calls it as
    it starts, before the network pass, so that a misnamed parameter does not fail after it."""
    accepted = hparam_names(cls)
    lower = {name.lower(): name for name in accepted}
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        ours = {lower[u.lower()] for u in unknown if u.lower() in lower}
        hint = f" (here: {', '.join(sorted(ours))})" if ours else ""
        raise ConfigError(f"detector {cls.name!r} has no hyper-parameter {unknown}{hint}; accepted: {accepted or 'none'}")
    fixed, grids = split_hparams(cls, hparams)
    check_ranges(cls, fixed)
    for key, values in grids.items():
        if not values:
            raise ConfigError(f"detector {cls.name!r}: {key}=[] lists no value: give one, or several to tune")
        if not tune:
            raise ConfigError(f"detector {cls.name!r}: {key}={values!r} lists values to tune on validation OOD, and "
                              f"tuning is off (detectors.tune=false); give one value, e.g. {key}={values[0]!r}")
        for value in values:
            check_ranges(cls, {key: value})


def check_ranges(cls: type[Detector], hparams: Mapping[str, Any]) -> None:
    """Raise `ConfigError` for a hyper-parameter value outside the detector's declared `ranges` (a sequence value,
    e.g. AdaSCALE's percentile pair, element by element), a `seed` without one outside `SEED`, or a value its
    constructor's annotation rules out (`_check_annotated`)."""
    hints = _init_hints(cls)
    for key, value in hparams.items():
        allowed = cls.ranges.get(key, SEED if key == "seed" else None)
        values = value if _is_list(value) else [value]
        if allowed is not None and not all(allowed.admits(v) for v in values):
            raise ConfigError(f"detector {cls.name!r}: {key}={value!r} is outside its range {allowed}")
        _check_annotated(cls, key, value, hints.get(key))


def _init_hints(cls: type[Detector]) -> dict[str, Any]:
    """The resolved annotations of a detector's constructor; none where they cannot be resolved (a user's detector
    annotated with a name its module does not define)."""
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - annotations are a help here, not a requirement
        return {}


def _check_annotated(cls: type[Detector], key: str, value: Any, hint: Any) -> None:
    """One line for a value the annotation `hint` rules out, which was taken as given: `neco`'s
    `use_max_logit='no'` is a true string, knn's `index='exat'` failed when the index was built after the pass,
    mds_ensemble's `stages=7` in a TypeError (`stages='layer1'` read as its letters)."""
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"detector {cls.name!r}: {key}={value!r} must be true or false")
    options = [a for a in typing.get_args(hint) if typing.get_origin(hint) is Literal]
    if options and value not in options:
        raise ConfigError(f"detector {cls.name!r}: {key}={value!r}; choices: {options}")
    names = "Sequence[str]" in str(hint) and takes_sequence(cls, key)
    if names and value is not None and not (_is_list(value) and all(isinstance(v, str) for v in value)):
        raise ConfigError(f"detector {cls.name!r}: {key}={value!r} must be a list of names")


def split_hparams(cls: type[Detector], hparams: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """A user's hyper-parameters as (fixed values, tuning grids). A list given for a key that takes one value (knn's
    `k=[10, 50, 100]`, OpenOOD's `K_list`), or a list of sequences for a key that takes a sequence (`takes_sequence`:
    AdaSCALE's `percentile=[[60, 65], [70, 80]]`), is that key's grid, searched in place of the detector's own for
    that key; a one-value list is that value, fixed."""
    fixed: dict[str, Any] = {}
    grids: dict[str, list[Any]] = {}
    for key, value in hparams.items():
        listed = _is_list(value) and (not takes_sequence(cls, key) or (len(value) > 0 and all(map(_is_list, value))))
        if listed and len(value) == 1:
            fixed[key] = value[0]
        elif listed:
            grids[key] = list(value)
        else:
            fixed[key] = value
    return fixed, grids


#: an annotation naming a sequence or set type (`Sequence[str] | None`: mds_ensemble's stages, default None)
_SEQUENCE_ANNOTATION = re.compile(
    r"\b(Sequence|Collection|Iterable|list|tuple|List|Tuple|set|frozenset|Set|FrozenSet|AbstractSet)\b")
#: a `Literal[...]`'s values (quoted strings may hold a bracket): words there are values, not types (`Literal['tuple']`)
_LITERAL_VALUES = re.compile(r"""\bLiteral\[(?:'[^']*'|"[^"]*"|[^]'"])*\]""")


def takes_sequence(cls: type[Detector], key: str) -> bool:
    """Whether hyper-parameter `key` of `cls` takes a sequence as its one value (AdaSCALE's percentile pair,
    mds_ensemble's stages): its constructor default or a value of its grid is a list or tuple, or its annotation
    names a sequence or set type outside a `Literal[...]`'s values. A string is one value (combood's features,
    cadref's logit_score)."""
    param = inspect.signature(cls.__init__).parameters.get(key)
    default = param.default if param is not None else None
    annotation = param.annotation if param is not None else inspect.Parameter.empty
    return (_is_list(default) or any(map(_is_list, cls.grid.get(key, ())))
            or (annotation is not inspect.Parameter.empty
                and bool(_SEQUENCE_ANNOTATION.search(_LITERAL_VALUES.sub("Literal", str(annotation))))))


def _is_list(value: Any) -> bool:
    """A list, tuple or other sequence (an OmegaConf ListConfig), not a string."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))
