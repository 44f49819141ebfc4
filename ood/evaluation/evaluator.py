"""The pure evaluator: cached banks of one evaluation pass -> result rows and per-split scores.

No Lightning: given the method (for its own score, post-hoc fit, predictions and diagnostics), the banks keyed by
split name, the split list, the detector settings and (for input-perturbing detectors) a function that scores a
split through the network, it returns an `EvaluationResult`. The callback collects the banks and hands the
result to its sinks (results file, logger scalars, wandb, run table).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ood.data.benchmark import EvalSplit
from ood.detectors import detector_class, resolve_detectors
from ood.detectors.mahalanobis import row_chunks
from ood.errors import ConfigError, NonFiniteError
from ood.evaluation.scoring import (
    ModelScoreFn,
    Scorer,
    check_search,
    detector_scorers,
    evaluate,
    sensitivity_rows,
    with_data_facts,
)
from ood.features.bank import FeatureBank
from ood.methods.base import OODMethod
from ood.metrics import validation_aurocs
from ood.precision import float32_matmuls
from ood.utils import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Samples:
    """The images behind one split's score arrays, row for row: dataset `index` (the row in the split's dataset),
    `labels` (ID class; -1 for OOD) and `names` (image file, or `<split>[index]`: `ood.data.samples`)."""

    index: list[int]
    labels: list[int]
    names: list[str]


@dataclass
class EvaluationResult:
    """What one evaluation produced: result rows (`ood.evaluation.scoring.evaluate`), scores[scorer][split] (ID test and test OOD
    sets), ID accuracy, the method's name and its `diagnostics()`."""

    rows: list[dict[str, Any]]
    scores: dict[str, dict[str, torch.Tensor]]
    id_acc: float
    method: str
    diagnostics: dict[str, Any] = field(default_factory=dict)
    #: AUROC of ID val vs validation OOD per scorer (`ood.metrics.validation_aurocs`): the sweep objective
    validation: dict[str, float] = field(default_factory=dict)
    #: classification accuracy on each covariate-shifted ID (csid) split (full-spectrum evaluation)
    csid_acc: dict[str, float] = field(default_factory=dict)
    #: per split of `scores`, the image of each score (filled in by the evaluation callback, which has the data)
    samples: dict[str, Samples] = field(default_factory=dict)
    #: every grid point of the swept detectors on every test set (`Evaluator(sensitivity=True)`:
    #: `ood.evaluation.scoring.sensitivity_rows`); empty without the option
    sensitivity: list[dict[str, Any]] = field(default_factory=list)


@contextmanager
def without_autocast() -> Iterator[None]:
    """CPU and CUDA autocast off within: `ood.evaluate` called inside a caller's `torch.autocast` (a training script's
    validation block) ran the detectors' float32 products in bf16 / fp16 (cfood's distances, relation's similarities,
    ViM's projections), which reordered near scores; the float64 work is never cast, and Lightning's own autocast
    covers the test steps only."""
    with ExitStack() as stack:
        for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            stack.enter_context(torch.autocast(device, enabled=False))
        yield


class Evaluator:
    """Fits the method's score and every configured detector on the cache, then scores and measures.

    Args:
        detectors: detector names, or a registry selection (`all`, `cached`).
        exclude: detector names left out of `detectors` (`detectors=full detectors.exclude=[gram]`).
        params: hyper-parameters per detector name: a value is fixed (never tuned); a list of values for a
            hyper-parameter that takes one (`{"knn": {"k": [10, 50, 100]}}`) is its grid, tuned in place of the
            detector's own (`ood.evaluation.scoring.search_grid`).
        tune: choose the remaining hyper-parameters on ID-val vs validation OOD from each detector's grid; False
            refuses a list of values to tune.
        sensitivity: also score every grid point of each cached detector's search on every test set, from the fits
            tuning makes (the result's `sensitivity` rows: `sensitivity.jsonl`); the choice and the result rows stay
            as without it. Needs `tune`.
    """

    def __init__(
        self,
        detectors: str | Sequence[str] = ("msp", "maxlogit", "energy", "mahalanobis", "knn"),
        params: Mapping[str, Mapping[str, Any]] | None = None,
        tune: bool = True,
        exclude: Sequence[str] = (),
        sensitivity: bool = False,
    ) -> None:
        left_out = set(resolve_detectors(list(exclude)))  # unknown names fail listing the choices
        # classes, resolved once; unknown names fail now, not after training
        self.detectors = [cls for cls in resolve_detectors(detectors) if cls not in left_out]
        self.params = {k: dict(v) for k, v in (params or {}).items()}
        unused = sorted({cls.name for cls in resolve_detectors(list(self.params))} - {cls.name for cls in self.detectors})
        if unused:  # a typo in a name fails above, listing the choices; a detector left out is only a warning
            log.warning("detectors.params sets %s, which this run does not score (detectors.names / exclude)", unused)
        for name, values in self.params.items():  # a misnamed hyper-parameter fails now, not after the network pass
            check_search(detector_class(name), values, tune)
        if sensitivity and not tune:
            raise ConfigError("detectors.sensitivity=true scores the points of the tuning grids: it needs detectors.tune=true")
        self.tune = tune
        self.sensitivity = sensitivity

    def check_own_names(self, method: str, names: Iterable[str]) -> None:
        """Raise `ConfigError` when a score of the method (`names`) has the name of a detector this run scores: two
        scorers of one name doubled the rows, and one's scores and logged metrics replaced the other's. `ood-train`
        checks the method's name before training, the evaluation every name `ood_scores` gives."""
        clash = sorted(set(names) & {cls.name for cls in self.detectors})
        if clash:
            raise ConfigError(f"{method}: its own score {clash} has the name of a detector this run scores; rename the "
                              f"score (the method's `name`, its `ood_scores` keys) or leave the detector out "
                              f"(detectors.exclude={clash})")

    @float32_matmuls()  # a user's TF32 setting would round the detectors' float32 distances (`float32_matmuls`)
    @without_autocast()  # nor may a caller's autocast
    def evaluate(
        self,
        method: OODMethod,
        banks: Mapping[str, FeatureBank],
        splits: Sequence[EvalSplit],
        id_dataset: str,
        data_facts: Mapping[str, Any] | None = None,
        model_scores: ModelScoreFn | None = None,
        modes: Sequence[str] = ("standard",),
        info: Mapping[str, Any] | None = None,
    ) -> EvaluationResult:
        """Run the method's `setup_ood`, fit/tune the detectors, score ID test and every OOD set, in each of the
        evaluation `modes` (`standard`, `fsood`: `ood.evaluation.scoring.evaluate`); `info` (backbone, seed, ...) and
        the method's `fitted()` values (as `method_params.fitted`) go into every row."""
        check_banks_finite(banks)
        check_id_labels(banks, splits)
        method.setup_ood(banks)
        accuracy = {s.name: accuracy_of(method, banks[s.name]) for s in splits if s.role in ("id_test", "csid")}
        id_acc = accuracy.pop("test")
        chosen = method.tuned()
        own = method.ood_scores(banks["test"])
        check_prepared(method, own)
        self.check_own_names(method.name, own)
        scorers = [
            Scorer(name, lambda split, name=name: method.ood_scores(banks[split])[name], dict(chosen.get(name, {})),
                   sorted(chosen.get(name, {})))
            for name in own
        ]
        params = with_data_facts(self.detectors, self.params, data_facts or {})
        tests = [s.name for s in splits if s.role in ("id_test", "ood", "csid")] if self.sensitivity else []
        scorers += detector_scorers(self.detectors, params, banks, self.tune, model_scores, tests)
        method_params = dict(method.hparams)
        fitted = method.fitted()
        if fitted:
            method_params["fitted"] = fitted
        common = {"method": method.name, "id_dataset": id_dataset, **(info or {}), "method_params": plain(method_params)}
        rows, scores = evaluate(scorers, splits, id_acc, common, modes=modes, csid_acc=accuracy)
        validation = validation_aurocs(scorers, [s.name for s in splits])
        swept = sensitivity_rows(scorers, splits, common, modes)
        return EvaluationResult(rows, scores, id_acc, method.name, method.diagnostics(), validation, accuracy,
                                sensitivity=swept)


class NonFiniteBankError(NonFiniteError):
    """A split's logits or features came out of the pass NaN or infinite (`check_banks_finite`)."""


def check_banks_finite(banks: Mapping[str, FeatureBank]) -> None:
    """Raise `NonFiniteError` naming the split when its logits or penultimate features hold NaN or +-inf (a network
    that overflowed, or float16 features above 65504); chunk by chunk, so a memory-mapped bank is not copied. The
    detectors themselves would refuse such a fit bank or score such rows NaN; this names the split before any runs."""
    for split, bank in banks.items():
        if not bool(bank.nonfinite_rows().any()):  # remembered: the detectors' own checks of this bank cost nothing
            continue
        for name in ("logits", "features"):
            values = getattr(bank, name)
            bad = sum(int((~torch.isfinite(values[rows])).sum()) for rows in row_chunks(len(values)))
            if bad:
                hint = ("; float16 features overflow above 65504: use evaluation.feature_dtype=float32"
                        if values.dtype == torch.float16 else "")
                raise NonFiniteBankError(f"split {split}: {bad} of {values.numel()} {name[:-1]} values are NaN or infinite{hint}")


def check_prepared(method: OODMethod, own: Mapping[str, torch.Tensor]) -> None:
    """Raise `NonFiniteError` when the method's own ID-test scores `own` hold NaN or +-inf and some of its `fitted()`
    values are NaN: statistics its `prepare` measures at fit start, which evaluating a network it was not trained on
    (`ood.evaluate(model, method=...)`, `ood-eval` without the method's checkpoint) never runs. The scoring's own check
    said only "detector <method> on test: N of N values are NaN or infinite"."""
    unmeasured = sorted(k for k, v in method.fitted().items() if isinstance(v, float) and math.isnan(v))
    if unmeasured and not all(bool(torch.isfinite(s).all()) for s in own.values()):
        raise NonFiniteError(
            f"{method.name}: its own score is NaN or infinite on test and its fitted values {unmeasured} are NaN: "
            "prepare() measures them at fit start (ood-train), and this evaluation did not train it; evaluate a "
            "checkpoint of its training run, or fit them from the cached banks in setup_ood(banks)")


def check_id_labels(banks: Mapping[str, FeatureBank], splits: Sequence[EvalSplit]) -> None:
    """Raise `ConfigError` when an ID split (train, val, test, a csid set) holds a label outside the network's classes
    0..C-1 (C: the logits' width): a Dataset passed to `ood.evaluate` with other labels would give a wrong accuracy and
    wrong class-conditional fits, silently (folders and image lists are checked when read)."""
    for split in splits:
        bank = banks.get(split.name) if split.role in ("fit", "id_val", "id_test", "csid") else None
        if bank is None or bank.labels is None:
            continue
        classes = bank.logits.shape[1]
        bad = bank.labels[(bank.labels < 0) | (bank.labels >= classes)]
        if len(bad):
            raise ConfigError(f"split {split.name}: {len(bad)} labels outside the network's {classes} classes "
                              f"0..{classes - 1} (e.g. {sorted(set(bad.tolist()))[:5]}); ID labels must index its outputs")


def accuracy_of(method: OODMethod, bank: FeatureBank) -> float:
    """The method's classification accuracy on a labelled bank."""
    assert bank.labels is not None
    return float((method.predict(bank) == bank.labels).double().mean())


def plain(value: Any) -> Any:
    """Hyper-parameters as JSON-friendly builtins (OmegaConf containers and tuples become lists/dicts; a factory
    given as `_partial_: true`, e.g. OAL's teacher backbone, its `_target_` and keywords; a class or function its
    import path; a tensor or NumPy value its numbers: a `fitted()` buffer was written as the string "tensor(1.5)")."""
    if isinstance(value, functools.partial):
        return {"_target_": plain(value.func), **({"args": plain(value.args)} if value.args else {}),
                **{str(k): plain(v) for k, v in value.keywords.items()}}
    if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return plain(value.tolist())
    return str(value)
