"""Detector zoo: contract tests enrolled over `available_detectors()`, and one known answer per detector."""

from __future__ import annotations

import copy
import io
import math
import pickle
import re
import sys
import typing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from fabricate import feature_bank as _bank
from fabricate import synthetic_banks
from helpers import doc_blocks
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import ood.detectors.base as base_module
import ood.detectors.mahalanobis as mahalanobis_module
from ood import CONFIG_DIR, PROJECT_ROOT
from ood.detectors import (
    DetectorNotApplicable,
    available_detectors,
    build_detector,
    detector_class,
    float16_detectors,
    logit_only_detectors,
    relative_count,
    resolve_detectors,
)
from ood.detectors.base import POSITIVE, Detector, hparam_names, split_hparams
from ood.detectors.tempscale import fit_temperature
from ood.errors import ConfigError, NonFiniteError
from ood.evaluation.evaluator import Evaluator
from ood.evaluation.scoring import detector_scorers, grid_points
from ood.features.bank import FeatureBank, row_slices
from ood.metrics import ood_metrics

#: AUROC floors below 0.9 on the synthetic banks, with the reason: the residual-only score sees nothing of an OOD
#: feature inside the ID principal space, and this OOD split's mean (0.3 in every dimension) lies in the span of
#: the class blocks; ViM, the same residual plus the energy, is held to 0.9
SEPARATION_FLOORS = {"residual": 0.7}
#: detectors that rank these 4-class banks backwards by construction, not by a bug: OTOD's softmax term puts a one-hot
#: and a uniform prediction at the same distance when C = 4 (and its logit term ranks flat logits as ID); its scoring
#: is checked against the authors' in tests/test_otod.py and its separation on the 6-class digits network
NO_SYNTHETIC_SEPARATION = {"otod"}
#: detectors that need a staged network, maps cached by its layer taps or a fit pass through it: enrolled on a tiny
#: CNN in tests/test_detectors_model.py instead of the synthetic banks here
NETWORK = {"adascale_a", "adascale_l", "combood", "gram", "gram_stream", "gram_v15", "mahalanobis_odin", "mcdropout",
           "mds_ensemble", "nac", "rankfeat"}
SYNTHETIC = [n for n in available_detectors() if n not in NETWORK]


@pytest.fixture(scope="module")
def synthetic() -> dict[str, FeatureBank]:
    return synthetic_banks()


def _fitted(name: str, banks: dict[str, FeatureBank], **hparams: Any) -> Detector:
    return build_detector(name, **hparams).fit(banks[detector_class(name).fit_split])


def _scores(det: Detector, bank: FeatureBank) -> torch.Tensor:
    """Cached score, or for input detectors the score with the linear head as the model and h as the input."""
    if not det.needs_model:
        return det.score(bank)
    w, b = bank.head()
    head = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    return det.score_inputs(head, bank.features)


# ----- contract, every registered detector -----------------------------------------------------------------------
@pytest.mark.parametrize("name", SYNTHETIC)
def test_separates_synthetic_id_from_ood(name: str, synthetic: dict[str, FeatureBank]) -> None:
    """Higher = more ID: a sign flip or a constant score fails (AUROC well above 0.5), scores are float64 [N]."""
    det = _fitted(name, synthetic)
    id_s, ood_s = _scores(det, synthetic["test"]), _scores(det, synthetic["ood"])
    assert id_s.shape == (200,) and id_s.dtype == torch.float64
    assert bool(torch.isfinite(id_s).all() and torch.isfinite(ood_s).all())
    if name not in NO_SYNTHETIC_SEPARATION:
        assert ood_metrics(id_s, ood_s)["auroc"] > SEPARATION_FLOORS.get(name, 0.9), name


@pytest.mark.parametrize("name", [n for n in SYNTHETIC if not detector_class(n).needs_model])
def test_nonfinite_rows_score_nan_and_stop_the_fit(name: str, synthetic: dict[str, FeatureBank]) -> None:
    """NaN in, NaN out, for every cached detector used as a library: a row with a NaN feature or an infinite logit
    scores NaN and the other rows score as without it (CF-OOD and relation scored such rows finite, WeiPer raised an
    IndexError); a fit bank holding one is refused in one line naming the detector (kNN, CF-OOD and relation fitted
    silently, the Mahalanobis family failed in `eigh`)."""
    cls = detector_class(name)
    det = _fitted(name, synthetic)
    bank = synthetic["test"]
    features, logits = bank.features.clone(), bank.logits.clone()
    features[3, 0], logits[7, 1] = torch.nan, torch.inf
    broken = replace(bank, features=features, logits=logits)
    keep = torch.ones(len(bank), dtype=torch.bool)
    keep[[3, 7]] = False
    points = grid_points({k: v for k, v in cls.grid.items() if k in cls.score_params})[:2] or [{}]
    clean = det.score_grid(bank.subset(keep), points)
    for got, want in zip(det.score_grid(broken, points), clean):
        if want is not None:
            assert bool(got[~keep].isnan().all()), name
            torch.testing.assert_close(got[keep], want, rtol=0, atol=0)
    torch.testing.assert_close(det.score(broken)[keep], det.score(bank.subset(keep)), rtol=0, atol=0)
    if cls.fit is Detector.fit:  # nothing fitted (msp, energy, ...): no fit bank to refuse
        return
    fit_bank = synthetic[cls.fit_split]
    fit_features = fit_bank.features.clone()
    fit_features[5, 2] = torch.nan
    with pytest.raises(NonFiniteError, match=rf"^{name}: 1 of {len(fit_bank)} rows of its fit bank hold NaN"):
        build_detector(name).fit(replace(fit_bank, features=fit_features))


@pytest.mark.parametrize("name", [n for n in SYNTHETIC if not detector_class(n).needs_model])
def test_a_row_scores_alike_in_any_batch(name: str, synthetic: dict[str, FeatureBank]) -> None:
    """A row's score is a function of the row and the fitted state: the ID test bank scored whole and in pieces (of 7
    rows, a prime that cuts classes and chunks unevenly, as `data.eval_batch_size=7` would) gives the same scores,
    at two points of the score grid too, to float32 summation order (WeiPer's and relation's float32 products: 1e-8
    relative), relative to the scores' scale: a score that is a difference of terms (ViM's energy minus its scaled
    residual) keeps their absolute rounding, which MKL's AVX2 kernels make depend on the batch (8e-6 relative to a
    score near 0)."""
    cls = detector_class(name)
    det = _fitted(name, synthetic)
    points = grid_points({k: v for k, v in cls.grid.items() if k in cls.score_params})[:2] or [{}]
    bank = synthetic["test"]
    whole = det.score_grid(bank, points)
    cuts = [*range(0, 70, 7), len(bank)]  # nine pieces of 7, then the other 137 rows
    pieces = [det.score_grid(bank.subset(torch.arange(a, b)), points) for a, b in zip(cuts, cuts[1:])]
    for k, want in enumerate(whole):
        if want is not None:
            scale = float(want.abs().max())
            torch.testing.assert_close(torch.cat([p[k] for p in pieces]), want, rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("name", [n for n in SYNTHETIC if not detector_class(n).needs_model])
def test_a_fit_bank_missing_a_class_is_refused_by_per_class_detectors(name: str, synthetic: dict[str, FeatureBank]) -> None:
    """A detector with per-class statistics fitted on a bank without rows of some class gave that class zero means
    (the Mahalanobis family scored AUROC 0.5 on a `data.fit_fraction` that drew none of a class): it is not
    applicable, saying why in a line that starts with its name, as a detector's other one-line errors do (it started
    "its fit bank has no rows", naming no detector); the other detectors fit as before."""
    per_class = {"ddu", "gem", "gram", "line", "mahalanobis", "mahalanobis_odin", "mahalanobis_pp", "mds_ensemble", "openmax",
                 "rmds", "rmds_pp", "she"}
    cls = detector_class(name)
    bank = synthetic[cls.fit_split]
    assert bank.labels is not None
    without = bank.subset(bank.labels != 1)
    if name in per_class:
        assert cls.per_class
        with pytest.raises(DetectorNotApplicable, match=rf"^{name} fits statistics per class, and its fit bank has no "
                                                        r"rows of 1 of the network's \d+ classes \(e.g. \[1\]\)"):
            build_detector(name).fit(without)
    else:
        assert not cls.per_class
        build_detector(name).fit(without)


def test_the_finite_check_sees_writes_into_a_checked_bank(synthetic: dict[str, FeatureBank]) -> None:
    """The check remembers a finite bank, but not past an in-place write into its tensors: a row made infinite after
    a first score scores NaN, and the fit refuses the bank (a stale memo let both through)."""
    bank = replace(synthetic["train"], logits=synthetic["train"].logits.clone())
    msp = build_detector("msp")
    assert bool(msp.score(bank).isfinite().all())
    bank.logits[0, 0] = torch.inf
    assert bool(msp.score(bank)[0].isnan()) and bool(msp.score(bank)[1:].isfinite().all())
    with pytest.raises(NonFiniteError, match="^mahalanobis: 1 of"):
        build_detector("mahalanobis").fit(bank)


@pytest.mark.parametrize("name", available_detectors())
def test_a_bank_without_features_runs_the_logit_only_detectors_alike_and_the_others_refuse_it(
        name: str, synthetic: dict[str, FeatureBank]) -> None:
    """A user with logits alone (precomputed, or a model whose penultimate layer is out of reach) had to fabricate
    features: `FeatureBank` required them. Without them (`features=None`) a detector that reads only the logits
    fits and scores as with them (a NaN row NaN, the others as before), and one that reads them refuses the bank in
    one line naming itself, at fit and at score."""
    cls = detector_class(name)
    bare = {split: replace(bank, features=None) for split, bank in synthetic.items()}
    refused = (rf"^{name}: it reads the penultimate features and this FeatureBank has none \(features=None\); build .*"
               rf"or use a logit-only detector: {', '.join(logit_only_detectors())}$")
    if cls.reads_features:
        with pytest.raises(ConfigError, match=refused):
            build_detector(name).fit(bare[cls.fit_split])
        if name in SYNTHETIC and not cls.needs_model:
            with pytest.raises(ConfigError, match=refused):
                _fitted(name, synthetic).score(bare["test"])
        return
    assert name in SYNTHETIC, f"{name} reads no features: score it on the synthetic banks here"
    with_features, without = _fitted(name, synthetic), _fitted(name, bare)
    for split in ("test", "ood"):
        want = _scores(with_features, synthetic[split])
        got = _scores(without, synthetic[split]) if cls.needs_model else without.score(bare[split])
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    if not cls.needs_model:
        logits = bare["test"].logits.clone()
        logits[3, 0] = torch.nan
        got, want = without.score(replace(bare["test"], logits=logits)), with_features.score(synthetic["test"])
        keep = torch.arange(len(got)) != 3
        assert bool(got[3].isnan()) and torch.allclose(got[keep], want[keep], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", SYNTHETIC)
def test_a_fitted_detector_pickles_and_scores_alike_after(name: str, synthetic: dict[str, FeatureBank]) -> None:
    """A user keeps fitted detectors with `torch.save`, `pickle` or `copy.deepcopy`: every one comes back scoring as
    it did (the network-pass detectors: tests/test_detectors_model.py; knn's and nnguide's faiss index on a GPU:
    tests/test_neighbors.py)."""
    det = _fitted(name, synthetic)
    want = _scores(det, synthetic["test"])
    saved = io.BytesIO()
    torch.save(det, saved)
    saved.seek(0)
    for restored in (pickle.loads(pickle.dumps(det)), copy.deepcopy(det), torch.load(saved, weights_only=False)):
        assert type(restored) is type(det) and restored.hparams == det.hparams
        torch.testing.assert_close(_scores(restored, synthetic["test"]), want, rtol=0, atol=0)


@pytest.mark.parametrize("name", available_detectors())
def test_declared_hyperparameters_are_consistent(name: str) -> None:
    """Grid and score-only keys are constructor hyper-parameters, and every default lies on the grid."""
    cls = detector_class(name)
    det = build_detector(name)
    assert set(cls.grid) <= set(det.hparams) and cls.score_params <= set(det.hparams)
    for key, values in cls.grid.items():
        assert det.hparams[key] in values, f"{name}.{key} default {det.hparams[key]} not on its grid {values}"
    assert cls.fit_split in ("train", "val")


@pytest.mark.parametrize("name", [n for n in SYNTHETIC if detector_class(n).score_params])
def test_score_grid_equals_fresh_detectors(name: str, synthetic: dict[str, FeatureBank]) -> None:
    """The shared-work path used by tuning (one fit, `score_grid`) equals fitting each grid point afresh."""
    cls = detector_class(name)
    grid = {k: v for k, v in cls.grid.items() if k in cls.score_params}
    points = grid_points(grid)
    det = _fitted(name, synthetic, **points[0])
    bank = synthetic["val"]
    if det.needs_model:
        shared = [_scores(det.set_params(**p), bank) for p in points]
    else:
        shared = det.score_grid(bank, points)
    for point, got in zip(points, shared):
        if got is None:  # dropped from the search: kNN's k beyond the 400 train rows
            assert point["k"] > len(synthetic["train"])
            continue
        torch.testing.assert_close(got, _scores(_fitted(name, synthetic, **point), bank), msg=f"{name} {point}")


def test_conf_groups_resolve_from_the_registry() -> None:
    """`full` is every registered detector but other forms of one (gram_stream), `all` every one but the slow
    `full_only` ones, `fast` every one of `all` that does not need the model, `none` none: resolved from the registry,
    not kept as lists; a list may hold selections; unknown selections and names list the choices."""
    load = lambda group: yaml.safe_load((Path(CONFIG_DIR) / "detectors" / f"{group}.yaml").read_text())  # noqa: E731
    registered = [n for n in available_detectors() if detector_class(n).reproduces is None]
    names = lambda selection: [cls.name for cls in resolve_detectors(selection)]  # noqa: E731
    assert names(load("full")["names"]) == registered and "gram_stream" not in registered
    assert names(["full", "gram_stream", "knn"]) == [*registered, "gram_stream"]
    assert names(load("all")["names"]) == [n for n in registered if not detector_class(n).full_only]
    assert {"adascale_a", "gram", "iodin"} <= set(registered) - set(names("all"))
    assert names(load("fast")["names"]) == [n for n in names("all") if not detector_class(n).needs_model]
    assert "odin" in registered and "odin" not in names("cached") and "gram" not in names("cached")
    assert names(load("none")["names"]) == []
    # resolved once: classes pass through unchanged
    assert resolve_detectors([detector_class("knn"), "msp"]) == [detector_class("knn"), detector_class("msp")]
    assert resolve_detectors(["msp", "knn", "msp"]) == [detector_class("msp"), detector_class("knn")]  # once each
    assert resolve_detectors("msp") == [detector_class("msp")]  # one name alone
    # one unknown name is named with every detector and the selections, as in a list (`detectors.names=mps` said
    # "unknown detector selection 'mps' (did you mean 'msp'?); choices: ['full', 'all', 'cached']")
    with pytest.raises(ConfigError, match=r"^unknown detector 'every' \(did you mean 'energy'\?\); available: adascale_a, "
                                          r".*, weiper; selections: full, all, cached; a detector of your own"):
        resolve_detectors("every")
    with pytest.raises(ConfigError, match=r"^unknown detector 'al' \(did you mean 'all'\?\); available: "):
        resolve_detectors("al")  # a misspelt selection names the closest choice (names and selections)
    with pytest.raises(ConfigError, match=r"^unknown detector 'xyz'; available: "):
        resolve_detectors("xyz")  # nothing close: no guess
    with pytest.raises(ConfigError, match=r"unknown detector 'msq' \(did you mean 'msp'\?\); available: adascale_a, adascale_l, ash"):
        resolve_detectors(["msp", "msq"])
    # a list holds names and selections: its message lists both (`fast` is a config of the group, not a selection)
    with pytest.raises(ConfigError, match=r"unknown detector 'fast' \(here: 'cached'\); available: adascale_a, .*, weiper; "
                                          r"selections: full, all, cached; a detector of your own: its import path, "
                                          r"e\.g\. my_pkg\.my_detectors\.FeatureNorm$"):
        resolve_detectors(["fast", "knn"])
    with pytest.raises(ConfigError, match=r"^unknown detector 'fast' \(here: 'cached'\); available: "):
        resolve_detectors("fast")  # detectors.names=fast, for the group's config detectors=fast
    for group in ("full", "all", "fast", "none"):
        assert set(load(group)) == {"names", "exclude", "params", "tune", "sensitivity"} and load(group)["exclude"] == []
        assert load(group)["sensitivity"] is False
    kept = [cls.name for cls in Evaluator("full", exclude=["gram", "iodin"]).detectors]
    assert kept == [n for n in registered if n not in ("gram", "iodin")]
    with pytest.raises(ConfigError, match=r"unknown detector 'grma' \(did you mean 'gram'\?\); available: adascale_a"):
        Evaluator("full", exclude=["grma"])


def test_params_for_a_detector_the_run_does_not_score(caplog: pytest.LogCaptureFixture) -> None:
    """A misspelt name in detectors.params fails listing the choices; params of a detector left out warn (they
    would be dropped silently)."""
    with pytest.raises(ConfigError, match=r"unknown detector 'kn' \(did you mean 'knn'\?\); available: adascale_a"):
        Evaluator(["msp"], params={"kn": {"k": 10}})
    with caplog.at_level("WARNING"):
        Evaluator(["msp", "energy"], params={"knn": {"k": 10}, "energy": {"temperature": 2.0}})
    assert [r.getMessage() for r in caplog.records] == [
        "detectors.params sets ['knn'], which this run does not score (detectors.names / exclude)"]


def test_vim_with_dim_at_least_feature_dim_is_not_applicable(synthetic: dict[str, FeatureBank]) -> None:
    for name in ("vim", "residual"):
        with pytest.raises(DetectorNotApplicable, match="dim < feature dim D=16"):
            build_detector(name, dim=16).fit(synthetic["train"])


def test_feature_counts_are_relative_to_the_network() -> None:
    """ViM's grid is OpenOOD's {256, 1000} at ImageNet's D=2048 written as {D/8, D/2}: it applies to every backbone."""
    dims = lambda d: [relative_count(v, d) for v in detector_class("vim").grid["dim"]]  # noqa: E731
    assert dims(2048) == [256, 1024] and dims(512) == [64, 256] and dims(64) == [8, 32]
    assert relative_count(256, 2048) == 256 and relative_count(0.25, 2048) == 512 and relative_count(0.001, 64) == 1


@pytest.mark.parametrize("feature_dim", [64, 512])
def test_no_cached_detector_is_skipped_at_common_feature_dims(feature_dim: int) -> None:
    """Digits' D=64 and CIFAR's D=512 (ImageNet's 2048 resolves as above): tuning every cached detector on its grid
    leaves none out (a grid with no applicable point would skip it). Detectors reading network maps (`NETWORK`)
    have no maps in these banks: tests/test_detectors_model.py enrols them on a tiny CNN."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(5, feature_dim, generator=gen)

    def split(n: int, shift: float) -> FeatureBank:
        y = torch.arange(n) % 5
        h = (weight[y] + shift + torch.randn(n, feature_dim, generator=gen)).relu()
        return _bank(h, y, weight, torch.zeros(5))

    banks = {"train": split(150, 0.0), "val": split(60, 0.0), "val_ood": split(60, 1.0)}
    cached = [cls for cls in resolve_detectors("full") if not cls.needs_model and cls.name not in NETWORK]
    scorers = detector_scorers(cached, {}, banks, tune=True)
    assert [s.name for s in scorers] == [cls.name for cls in cached]


@pytest.mark.parametrize("name", [n for n in float16_detectors() if n not in NETWORK])  # those read taps: test_combood
def test_float16_detectors_score_float16_banks_in_chunks(
    name: str, synthetic: dict[str, FeatureBank], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `float16_features` promises: float16 features (same values) in chunks of 7 rows give the whole-bank
    float32 scores."""
    as_dtype = lambda b, dtype: replace(b, features=b.features.half().to(dtype))  # noqa: E731
    f32 = {k: as_dtype(b, torch.float32) for k, b in synthetic.items()}
    f16 = {k: as_dtype(b, torch.float16) for k, b in synthetic.items()}
    expected = _fitted(name, f32).score(f32["test"])
    monkeypatch.setattr(mahalanobis_module, "CHUNK", 7)
    torch.testing.assert_close(_fitted(name, f16).score(f16["test"]), expected, rtol=1e-5, atol=1e-5)


#: detectors whose fit and score read every [N, D] feature bank in row chunks: no float32 / float64 copy of a whole bank
#: (hyper-parameters keeping weiper's perturbed heads and nnguide's guide bank small beside the banks)
CHUNKED = {name: {} for name in ["ash", "ash_p", "ash_s", "bats", "cadref", "caref", "ddu", "dice", "fdbd", "gem", "gradnorm", "graduncertainty",
                                 "line", "lts", "mahalanobis", "nci", "neco", "openmax", "otod", "pnml", "react", "residual", "rmds", "scale",
                                 "she", "vim", "vra"]} | {"knn": {"k": 5}, "nnguide": {"k": 5}, "weiper": {"n_repeats": 2, "n_bins": 20}}


class _WidestFeatureRows(TorchDispatchMode):
    """Records the most rows of any float32 / float64 [rows, D] tensor an operation makes."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim, self.rows = dim, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float64) and t.dim() == 2 and t.shape[1] == self.dim:
                self.rows = max(self.rows, t.shape[0])
        return out


@pytest.mark.parametrize("name", list(CHUNKED))
def test_chunked_detectors_never_widen_a_whole_float16_bank(name: str, synthetic: dict[str, FeatureBank], monkeypatch: pytest.MonkeyPatch) -> None:
    """At ImageNet scale a float32 or float64 copy of a float16 train bank (1.28 M x 2048) is 10 or 21 GB: with CHUNK = 50
    rows (and the kNN index built 50 rows at a time), no [rows, D] float tensor made while fitting (400 or 120 rows) and
    scoring (200 rows) has more than 50 rows. Thirteen of them (ash, ash_p, ash_s, scale, dice, she, fdbd, nci, nnguide,
    gradnorm, otod, weiper, and knn's score) made a float32 or float64 copy of a whole bank in their fit or score
    before."""
    monkeypatch.setattr(mahalanobis_module, "CHUNK", 50)
    monkeypatch.setattr("ood.neighbors.ADD_CHUNK", 50)
    monkeypatch.setattr("ood.detectors.ddu.SCORE_CHUNK", 50)  # its scores' own chunk (8192 rows)
    half = {k: replace(b, features=b.features.half()) for k, b in synthetic.items()}
    dim = half["train"].features.shape[1]
    with _WidestFeatureRows(dim) as fitting:
        det = _fitted(name, half, **CHUNKED[name])
    with _WidestFeatureRows(dim) as scoring:
        det.score(half["test"])
    assert max(fitting.rows, scoring.rows) <= 50, (fitting.rows, scoring.rows)


def test_she_known_answer_on_a_float16_bank_in_chunks_of_one_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """Patterns are the means of the correctly classified rows only: class 0 from rows (2, 0) and (4, 2) -> (3, 1);
    the row (6, 6) labelled 0 but predicted 1 is left out; class 1 from (0, 2) alone. Score = <h, m_yhat>."""
    monkeypatch.setattr(mahalanobis_module, "CHUNK", 1)
    h = torch.tensor([[2.0, 0.0], [4.0, 2.0], [6.0, 6.0], [0.0, 2.0]])
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    w = torch.eye(2)
    fit = FeatureBank(logits=logits, features=h.half(), labels=torch.tensor([0, 0, 0, 1]), weight=w, bias=torch.zeros(2))
    det = build_detector("she").fit(fit)
    assert torch.equal(det.patterns_, torch.tensor([[3.0, 1.0], [0.0, 2.0]], dtype=torch.float64))
    test = FeatureBank(logits=torch.tensor([[2.0, 1.0], [0.0, 3.0]]), features=torch.tensor([[1.0, 1.0], [1.0, 5.0]]).half(),
                       weight=w, bias=torch.zeros(2))
    assert det.score(test).tolist() == [4.0, 10.0]  # <(1, 1), (3, 1)> and <(1, 5), (0, 2)>


def test_float16_capability_is_declared_by_each_detector() -> None:
    """`float16_features` is a class attribute (inherited by subclasses such as rmds), listed by the registry."""
    assert {"msp", "knn", "mahalanobis", "rmds", "vim", "residual", "openmax", "react", "line", "gem", "optfs", *CHUNKED} <= set(float16_detectors())
    assert "odin" not in float16_detectors()
    assert "gram_stream" in float16_detectors() and "gram" not in float16_detectors()  # it reads no bank features



def test_scoring_before_fit_says_to_fit_first() -> None:
    """A fitted attribute read before `fit` names the detector, the attribute and the bank to fit on (it was Python's
    bare "'Mahalanobis' object has no attribute 'means_'")."""
    bank = FeatureBank(logits=torch.zeros(2, 3), features=torch.ones(2, 4), weight=torch.zeros(3, 4), bias=torch.zeros(3))
    with pytest.raises(AttributeError, match=r"^mahalanobis: means_ is set by fit; call fit\(bank\) with the ID train bank before score$"):
        build_detector("mahalanobis").score(bank)
    with pytest.raises(AttributeError, match=r"^react: threshold_ is set by fit; call fit\(bank\) with the ID val bank before score$"):
        build_detector("react").score(bank)
    assert not hasattr(build_detector("knn"), "index_") and not hasattr(build_detector("knn"), "kk")


class _Forgetful(Detector):
    """A user's detector whose `fit` ends without `return self` (named below, after the class statement, so that it
    stays out of the registry)."""

    grid = {"scale": [1.0, 2.0]}
    score_params = frozenset({"scale"})

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def fit(self, bank: FeatureBank) -> None:
        self.top_ = float(bank.logits.double().max())

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return self.scale * bank.logits.double().max(1).values / self.top_


_Forgetful.name = "forgetful"


def test_a_name_taken_by_a_registered_detector_names_both_classes() -> None:
    """A new detector named as a registered one stopped every command on "detector name 'msp' registered twice",
    naming neither class; the registry keeps the first."""
    with pytest.raises(RuntimeError, match=r"^detector name 'msp' registered twice: ood\.detectors\.logits\.MSP and "
                                           r"test_detectors\.test_a_name_taken.*\.Clash; give the new detector another name$"):
        class Clash(Detector):
            name = "msp"
    assert detector_class("msp").__qualname__ == "MSP"


def test_a_fit_without_return_self_gives_the_fitted_detector(synthetic: dict[str, FeatureBank]) -> None:
    """`fit` returning None: the evaluation's tuning retried the same grid point forever (the run hung) and an untuned
    run stopped on `'NoneType' object has no attribute`; the detector itself is the fitted one."""
    det = _Forgetful()
    assert det.fit(synthetic["train"]) is det
    top = float(synthetic["train"].logits.double().max())
    expected = synthetic["test"].logits.double().max(1).values / top
    for tune in (True, False):  # tuned: both scales rank alike, so the first (1.0) is kept
        (scorer,) = detector_scorers([_Forgetful], {}, synthetic, tune)
        assert scorer.hparams == {"scale": 1.0} and scorer.tuned == (["scale"] if tune else [])
        torch.testing.assert_close(scorer.score("test"), expected, rtol=0, atol=0)

@pytest.mark.parametrize(("attr", "value"), [("grid", {"pow": [1.0, 2.0]}), ("score_params", frozenset({"pow"})),
                                             ("ranges", {"pow": POSITIVE})])
def test_a_declared_key_that_is_no_constructor_keyword_is_refused_when_the_class_is_defined(attr: str, value: Any) -> None:
    """A user's grid key misspelt (`pow` for `power`) passed the class statement and the whole training and stopped
    the evaluation's tuning ("has no hyper-parameter"); a misspelt `score_params` or `ranges` key was never used. The
    class statement now refuses each in one line."""
    with pytest.raises(ConfigError, match=rf"^detector test_detectors\.test_a_declared_key.*\.Misspelt: {attr} keys "
                                          r"\['pow'\] are not keywords of its __init__ \(accepted: \['power'\]\); name "
                                          r"each after a constructor keyword$"):
        type("Misspelt", (Detector,), {attr: value, "__init__": _power_init, "__module__": "test_detectors",
                                       "__qualname__": "test_a_declared_key.<locals>.Misspelt"})
    assert "misspelt" not in available_detectors()


def _power_init(self: Detector, power: float = 1.0) -> None:
    self.power = power


def test_a_declared_key_of_a_detector_without_a_constructor_is_refused_when_the_class_is_defined() -> None:
    """A detector without `__init__` has no hyper-parameters, so every `grid` key is misspelt; its constructor is
    object's, whose `*args, **kwargs` the check took for a user's `**kwargs`, and let the class pass."""
    with pytest.raises(ConfigError, match=r"^detector test_detectors\.NoInit: grid keys \['power'\] are not keywords of "
                                          r"its __init__ \(accepted: none\); name each after a constructor keyword$"):
        type("NoInit", (Detector,), {"grid": {"power": [1.0, 2.0]}, "__module__": "test_detectors"})
    kwargs = type("Kwargs", (Detector,), {"grid": {"power": [1.0]}, "__init__": lambda self, **kw: None})
    assert kwargs.grid == {"power": [1.0]}  # a constructor of its own taking **kwargs is not checked


@pytest.fixture
def user_detector(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """docs/adding_a_detector.md's example module as `my_detectors` on the import path, unimported: imported (and its
    detector registered) by whatever names it; both undone after the test."""
    code = doc_blocks(PROJECT_ROOT / "docs" / "adding_a_detector.md", "python")[0]
    (tmp_path / "my_detectors.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    base_module._REGISTRY.pop("feature_norm", None)
    sys.modules.pop("my_detectors", None)


def test_a_detector_of_ones_own_runs_by_its_import_path(user_detector: Any, synthetic: dict[str, FeatureBank]) -> None:
    """`ood-train` / `ood-eval` never import a user's module, so `detectors.names=[feature_norm]` stopped on "unknown
    detector" and a detector outside ood could not run from the command line at all; its import path runs it, tuned
    over its grid, under its `name`, and a mistake in the path is one line."""
    (cls,) = resolve_detectors("my_detectors.FeatureNorm")
    assert cls.name == "feature_norm" and resolve_detectors(["msp", "my_detectors.FeatureNorm"]) == [detector_class("msp"), cls]
    evaluator = Evaluator(["msp", "my_detectors.FeatureNorm"], params={"feature_norm": {"percentile": 99}})
    assert [c.name for c in evaluator.detectors] == ["msp", "feature_norm"]
    (scorer,) = detector_scorers([cls], {}, synthetic, tune=True)
    chosen = scorer.hparams["percentile"]
    assert scorer.tuned == ["percentile"] and chosen in (90, 95, 99, 100)
    clip = float(torch.quantile(synthetic["train"].features.double().flatten(), chosen / 100))
    want = synthetic["test"].features.double().clamp(max=clip).norm(dim=1)
    torch.testing.assert_close(scorer.score("test"), want, rtol=1e-9, atol=1e-9)
    with pytest.raises(ConfigError, match=r"^detector 'no_such_pkg\.FeatureNorm' cannot be imported: No module named "
                                          r"'no_such_pkg'; give a detector's name or the import path module\.Class of "
                                          r"your own, with its folder on PYTHONPATH \(PYTHONPATH=\. ood-train \.\.\.\)$"):
        resolve_detectors(["msp", "no_such_pkg.FeatureNorm"])
    with pytest.raises(ConfigError, match=r"^detector 'my_detectors\.np': my_detectors holds a module named 'np', not a "
                                          r"Detector subclass; name the class, e.g\. my_detectors\.<YourDetector>$"):
        detector_class("my_detectors.np")


def test_a_detector_class_without_a_name_is_refused_in_one_line(synthetic: dict[str, FeatureBank]) -> None:
    """A user's class that forgot `name`, passed as a class (`detectors=[MyDetector]`), stopped the evaluation on
    "type object ... has no attribute 'name'"; it is refused in one line saying what to set."""

    class Nameless(Detector):
        def score(self, bank: FeatureBank) -> torch.Tensor:
            return bank.features.double().norm(dim=1)

    with pytest.raises(ConfigError, match=r"^detector class test_detectors\.test_a_detector_class_without.*\.Nameless has "
                                          r"no `name`: set the class attribute name = '<name>', the name its scores are "
                                          r"reported and configured under$"):
        Evaluator(["msp", Nameless])


def test_a_detector_without_score_stops_in_one_line(synthetic: dict[str, FeatureBank]) -> None:
    """A user's detector that forgot `score` stopped the evaluation on a bare `NotImplementedError`; it is one line
    naming the detector and what to implement."""

    class Scoreless(Detector):
        pass

    Scoreless.name = "scoreless"  # set after the class statement: kept out of the registry
    (scorer,) = detector_scorers([Scoreless], {}, synthetic, tune=True)
    with pytest.raises(ConfigError, match=r"^detector 'scoreless' \(test_detectors\.test_a_detector_without_score.*"
                                          r"\.Scoreless\) implements no score\(bank\): return a float64 \[N\] ID score "
                                          r"per row, higher = more in-distribution$"):
        scorer.score("test")


# ----- known answers ---------------------------------------------------------------------------------------------
def _logit_bank(logits: list[list[float]]) -> FeatureBank:
    z = torch.tensor(logits, dtype=torch.float64)
    return FeatureBank(logits=z, features=torch.zeros(len(z), 1))


def test_msp_maxlogit_entropy_known_logits() -> None:
    bank = _logit_bank([[0.0, math.log(3.0)], [1.0, 1.0]])
    torch.testing.assert_close(build_detector("msp").score(bank), torch.tensor([math.log(0.75), math.log(0.5)], dtype=torch.float64))
    torch.testing.assert_close(build_detector("maxlogit").score(bank), torch.tensor([math.log(3.0), 1.0], dtype=torch.float64))
    expected = [0.25 * math.log(0.25) + 0.75 * math.log(0.75), math.log(0.5)]
    torch.testing.assert_close(build_detector("entropy").score(bank), torch.tensor(expected, dtype=torch.float64))


def test_oe_xent_is_the_cross_entropy_from_uniform_known_logits() -> None:
    """Softmax (1/4, 3/4): -(log 1/4 + log 3/4) / 2 = log 4 - log(3) / 2; equal logits: log C."""
    bank = _logit_bank([[0.0, math.log(3.0)], [1.0, 1.0]])
    expected = [math.log(4.0) - math.log(3.0) / 2, math.log(2.0)]
    torch.testing.assert_close(build_detector("oe_xent").score(bank), torch.tensor(expected, dtype=torch.float64))



def test_msp_does_not_tie_saturated_softmax_up_to_hundreds_of_nats() -> None:
    """Margins of 40, 45 and 300 nats: float64's log_softmax rounds every one to 0 (a tie); the score stays
    -log(1 + 2 e^-margin), and tempscale too."""
    bank = _logit_bank([[40.0, 0.0, 0.0], [45.0, 0.0, 0.0], [0.0, 300.0, 0.0], [5.0, 5.0, 0.0]])
    expected = torch.tensor([-2 * math.exp(-40), -2 * math.exp(-45), -2 * math.exp(-300), -math.log(2 + math.exp(-5))],
                            dtype=torch.float64)
    torch.testing.assert_close(build_detector("msp").score(bank), expected, rtol=1e-12, atol=0)
    det = build_detector("tempscale")
    det.temperature_ = 1.0
    torch.testing.assert_close(det.score(bank), expected, rtol=1e-12, atol=0)

def test_energy_known_logits() -> None:
    bank = _logit_bank([[0.0, 0.0], [2.0, 2.0]])
    torch.testing.assert_close(build_detector("energy").score(bank), torch.tensor([math.log(2), 2 + math.log(2)], dtype=torch.float64))
    torch.testing.assert_close(
        build_detector("energy", temperature=2.0).score(bank), torch.tensor([2 * math.log(2), 2 * (1 + math.log(2))], dtype=torch.float64)
    )


def test_gen_known_logits() -> None:
    bank = _logit_bank([[0.0, 0.0], [0.0, math.log(3.0)]])
    # p = (1/2, 1/2): -(2 * (1/4)); p = (1/4, 3/4) with gamma 1: -2 * 3/16; M=1 keeps only 3/4
    torch.testing.assert_close(build_detector("gen", gamma=1.0).score(bank), torch.tensor([-0.5, -0.375], dtype=torch.float64))
    torch.testing.assert_close(build_detector("gen", gamma=1.0, M=1).score(bank)[1], torch.tensor(-0.1875, dtype=torch.float64))


def test_tempscale_fits_the_nll_optimum() -> None:
    """Logits (2, 0) with 3 of 4 labels 0: the NLL is minimal where sigmoid(2/T) = 3/4, T = 2 / ln 3."""
    logits, labels = torch.tensor([[2.0, 0.0]] * 4), torch.tensor([0, 0, 0, 1])
    assert fit_temperature(logits, labels, lr=1.0, max_iter=100) == pytest.approx(2 / math.log(3), rel=1e-5)
    # OpenOOD's settings (lr 0.01, 50 iterations) move from 1.5 towards the optimum without reaching it
    det = build_detector("tempscale").fit(FeatureBank(logits=logits, features=torch.zeros(4, 1), labels=labels))
    assert 1.5 < det.temperature_ < 2 / math.log(3)
    torch.testing.assert_close(det.score(_logit_bank([[2.0, 0.0]])), torch.log_softmax(torch.tensor([[2.0, 0.0]], dtype=torch.float64) / det.temperature_, 1)[:, 0])


def test_klm_template_scores_zero() -> None:
    """Templates are the mean softmax per predicted class; a sample equal to a template has KL 0."""
    val = _logit_bank([[2.0, 0.0], [4.0, 0.0], [0.0, 1.0]])
    det = build_detector("klm").fit(val)
    p = torch.softmax(val.logits, 1)
    t0, t1 = (p[0] + p[1]) / 2, p[2]
    q = torch.tensor([0.5, 0.5], dtype=torch.float64)
    expected = -min(float((q * (q / t0).log()).sum()), float((q * (q / t1).log()).sum()))
    scores = det.score(_logit_bank([[0.0, 1.0], [0.0, 0.0]]))
    assert float(scores[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(scores[1]) == pytest.approx(expected, rel=1e-12)


def _identity_cov_train() -> FeatureBank:
    """Two classes centred at (0, 0) and (10, 0), each at +-sqrt(2) along both axes: class-centred covariance I."""
    a = math.sqrt(2.0)
    offsets = torch.tensor([[a, 0.0], [-a, 0.0], [0.0, a], [0.0, -a]], dtype=torch.float64)
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    h = torch.cat([means[0] + offsets, means[1] + offsets])
    w = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    return _bank(h, torch.tensor([0] * 4 + [1] * 4), w, torch.tensor([5.0, -5.0], dtype=torch.float64))


def test_mahalanobis_with_identity_covariance_is_squared_euclidean() -> None:
    train = _identity_cov_train()
    det = build_detector("mahalanobis").fit(train)
    query = _bank(torch.tensor([[1.0, 2.0], [7.0, -1.0]], dtype=torch.float64), None, train.weight, train.bias)
    torch.testing.assert_close(det.score(query), torch.tensor([-5.0, -10.0], dtype=torch.float64))


def test_gem_is_the_log_sum_of_the_class_gaussians() -> None:
    """Identity covariance, centres (0, 0) and (10, 0): (1, 2) is at squared distances 5 and 85, (7, -1) at 50 and
    10, and (5, 0) at 25 from both, where MDS scores -25 and GEM's soft minimum adds log 2."""
    train = _identity_cov_train()
    det = build_detector("gem").fit(train)
    query = _bank(torch.tensor([[1.0, 2.0], [7.0, -1.0], [5.0, 0.0]], dtype=torch.float64), None, train.weight, train.bias)
    expected = [math.log(math.exp(-2.5) + math.exp(-42.5)), math.log(math.exp(-25.0) + math.exp(-5.0)), -12.5 + math.log(2.0)]
    torch.testing.assert_close(det.score(query), torch.tensor(expected, dtype=torch.float64))


def test_rmds_subtracts_the_background_distance() -> None:
    """MD_0 uses the train mean (5, 0) and whole-train covariance diag(26, 1): score = max_c -MD_c + MD_0."""
    train = _identity_cov_train()
    det = build_detector("rmds").fit(train)
    query = _bank(torch.tensor([[1.0, 2.0], [7.0, -1.0]], dtype=torch.float64), None, train.weight, train.bias)
    md0 = torch.tensor([16 / 26 + 4, 4 / 26 + 1], dtype=torch.float64)
    torch.testing.assert_close(det.score(query), md0 - torch.tensor([5.0, 10.0], dtype=torch.float64))


def test_knn_kth_distance_on_the_unit_circle(caplog: pytest.LogCaptureFixture) -> None:
    """Normalised train points at angles 0, 90, 180 degrees; query at 0 degrees: squared chords 0, 2, 4."""
    h = torch.tensor([[3.0, 0.0], [0.0, 2.0], [-5.0, 0.0]])
    train = _bank(h, torch.tensor([0, 1, 0]), torch.eye(2), torch.zeros(2))
    query = _bank(torch.tensor([[7.0, 0.0]]), None, torch.eye(2), torch.zeros(2))
    for k, expected in [(1, 0.0), (2, 2.0), (3, 4.0)]:
        assert float(build_detector("knn", k=k).fit(train).score(query)[0]) == pytest.approx(-expected, abs=1e-6)
    # k beyond the bank has no k-th neighbour: the farthest is read, with a warning (it ranks OOD above ID)
    with caplog.at_level("WARNING"):
        assert float(build_detector("knn", k=50).fit(train).score(query)[0]) == pytest.approx(-4.0, abs=1e-6)
    assert "knn: k=50 exceeds the 3 train features it searches" in caplog.text
    # and a tuning grid drops such points when another fits
    scores = build_detector("knn", k=1).fit(train).score_grid(query, [{"k": 2}, {"k": 4}, {"k": 3}])
    assert float(scores[0][0]) == pytest.approx(-2.0, abs=1e-6) and scores[1] is None
    assert float(scores[2][0]) == pytest.approx(-4.0, abs=1e-6)


def test_nnguide_known_guides() -> None:
    """alpha=1, k=1: LSE(f) * max_j <h_hat, h_hat_j * LSE(f_j)>."""
    w, b = torch.eye(2), torch.zeros(2)
    train = _bank(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]), w, b)
    query = _bank(torch.tensor([[3.0, 3.0]]), None, w, b)
    lse = lambda *z: math.log(sum(math.exp(v) for v in z))  # noqa: E731
    guides = [lse(2, 0), lse(0, 1)]
    expected = lse(3, 3) * max(g / math.sqrt(2) for g in guides)
    score = build_detector("nnguide", k=1, alpha=1.0).fit(train).score(query)
    assert float(score[0]) == pytest.approx(expected, rel=1e-6)


def test_vim_residual_along_the_least_variant_axis() -> None:
    """b = 0 so u = 0; train variance 9, 4, 1 along the axes: with dim=2 the residual is |h_3|."""
    h = torch.tensor([[3.0, 0, 0], [-3.0, 0, 0], [0, 2.0, 0], [0, -2.0, 0], [0, 0, 1.0], [0, 0, -1.0]])
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    train = _bank(h, torch.tensor([0, 0, 1, 1, 0, 1]), w, torch.zeros(2))
    det = build_detector("vim", dim=2).fit(train)
    max_logit_mean = (3 + 0 + 2 + 0 + 0 + 0) / 6
    alpha = max_logit_mean / (2 / 6)
    query = _bank(torch.tensor([[1.0, 2.0, 0.5]]), None, w, torch.zeros(2))
    expected = math.log(math.exp(1) + math.exp(2)) - alpha * 0.5
    assert float(det.score(query)[0]) == pytest.approx(expected, rel=1e-9)


def _shaping_bank() -> FeatureBank:
    return _bank(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), torch.tensor([0]), torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 1.0, 1.0]]), torch.tensor([0.0, 1.0]))


def _lse(logits: list[float]) -> float:
    return float(torch.logsumexp(torch.tensor(logits, dtype=torch.float64), 0))


def test_react_clip_that_changes_nothing_equals_energy(synthetic: dict[str, FeatureBank]) -> None:
    det = build_detector("react", percentile=100).fit(synthetic["test"])  # t = max activation of the bank itself
    torch.testing.assert_close(det.score(synthetic["test"]), build_detector("energy").score(synthetic["test"]))
    bank = _shaping_bank()
    det = build_detector("react", percentile=50).fit(bank)  # t = median of (4, 3, 2, 1) = 2.5 -> h' = (2.5, 2.5, 2, 1)
    assert det.threshold_ == 2.5
    assert float(det.score(bank)[0]) == pytest.approx(_lse([2.5, 6.5]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_the_activation_percentile_is_numpys_of_the_float64_copy_bit_for_bit(dtype: torch.dtype) -> None:
    """react's, vra's and line's thresholds: equal to `np.percentile` of the values widened to float64, to the last
    bit, at every q (ties, one value, the ends, NaN and inf as NumPy gives them)."""
    import numpy as np

    from ood.detectors.activation import percentile

    rng = np.random.default_rng(0)
    cases = [rng.standard_normal(n) for n in (1, 2, 3, 7, 100, 1001)] + [np.round(3 * rng.standard_normal(257)),
                                                                          np.array([1.0, np.inf, 2.0, -np.inf]),
                                                                          np.array([1.0, np.nan, 2.0])]
    for x in cases:
        t = torch.tensor(x).to(dtype)
        wide = t.to(torch.float64).numpy()
        for q in (0, 0.1, 1, 10, 25, 50, 65, 85, 90, 95, 99, 99.9, 100, float(rng.uniform(0, 100))):
            with np.errstate(invalid="ignore"):
                want = float(np.percentile(wide, q))
                got = percentile(t.reshape(-1, 1) if len(x) % 2 else t, q)
            assert got == want or (math.isnan(got) and math.isnan(want)), (len(x), q, got, want)


def test_the_activation_percentile_makes_no_float64_copy_of_a_float32_bank() -> None:
    """ImageNet's train bank (1.28 M x 2048 float32, 10 GB) must not be copied to float64 (21 GB) for a percentile:
    NumPy's allocations peak at one float32 copy (the partition) here, where a float64 copy and NumPy's partition of
    it peaked at twice that; a float16 bank's at one float16 copy (line's clip over a float16 train bank), where a
    float32 widening and its partition cost four times that."""
    import tracemalloc

    from ood.detectors.activation import percentile

    for dtype in (torch.float32, torch.float16):
        values = torch.randn(500, 1000).to(dtype)
        tracemalloc.start()
        try:
            percentile(values, 90)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1.25 * values.numel() * values.element_size(), (dtype, peak)


def test_ash_b_known_vector() -> None:
    """p=50 on D=4 keeps k=2 entries, both set to sum(h)/k = 5: a = (5, 5, 0, 0)."""
    assert float(build_detector("ash", percentile=50).score(_shaping_bank())[0]) == pytest.approx(_lse([5.0, 6.0]))


def test_scale_known_vector() -> None:
    """p=50 on D=4: k=2, r = 10 / 7, h' = h e^r."""
    s = math.exp(10 / 7)
    assert float(build_detector("scale", percentile=50).score(_shaping_bank())[0]) == pytest.approx(_lse([4 * s, 6 * s + 1]))


def test_ash_p_known_vector() -> None:
    """ASH-P keeps the top k entries as they are: p=50 on D=4 keeps (4, 3, 0, 0), p=75 keeps (4, 0, 0, 0)."""
    assert float(build_detector("ash_p", percentile=50).score(_shaping_bank())[0]) == pytest.approx(_lse([4.0, 4.0]))
    assert float(build_detector("ash_p", percentile=75).score(_shaping_bank())[0]) == pytest.approx(_lse([4.0, 1.0]))


def test_ash_s_known_vector() -> None:
    """ASH-S keeps the top k entries scaled by e^(s1/s2), s1 = sum(h) = 10, s2 = the kept sum: p=50 keeps
    (4, 3, 0, 0) e^(10/7), p=75 (4, 0, 0, 0) e^(10/4) (SCALE keeps the pruned 2 and 1, scaled). An all-zero row
    keeps zeros (the authors' 0/0 scale would make it NaN): LSE(b)."""
    bank = _shaping_bank()
    bank = _bank(torch.cat([bank.features, torch.zeros(1, 4)]), torch.tensor([0, 0]), bank.weight, bank.bias)
    s, t = math.exp(10 / 7), math.exp(10 / 4)
    assert build_detector("ash_s", percentile=50).score(bank).tolist() == pytest.approx([_lse([4 * s, 3 * s + 1]), _lse([0.0, 1.0])])
    assert float(build_detector("ash_s", percentile=75).score(bank)[0]) == pytest.approx(_lse([4 * t, 1.0]))


def test_dice_masks_small_contributions() -> None:
    """Contributions mean(h) * w = [[4,0,0,0],[0,3,2,1]]; their 60th percentile is 1.2, keeping 4, 3, 2."""
    bank = _shaping_bank()
    det = build_detector("dice", p=60).fit(bank)
    assert det.mask_.tolist() == [[True, False, False, False], [False, True, True, False]]
    assert float(det.score(bank)[0]) == pytest.approx(_lse([4.0, 6.0]))


def test_she_inner_product_with_correct_class_means() -> None:
    w = torch.eye(2)
    train = _bank(torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 3.0], [5.0, 1.0]]), torch.tensor([0, 0, 1, 1]), w, torch.zeros(2))
    det = build_detector("she").fit(train)  # the last row is misclassified (predicted 0) and left out
    torch.testing.assert_close(det.patterns_, torch.tensor([[3.0, 0.0], [0.0, 3.0]], dtype=torch.float64))
    query = _bank(torch.tensor([[1.0, 2.0], [2.0, 1.0]]), None, w, torch.zeros(2))
    torch.testing.assert_close(det.score(query), torch.tensor([6.0, 6.0], dtype=torch.float64))


def test_gradnorm_closed_form_equals_autograd(synthetic: dict[str, FeatureBank]) -> None:
    """L1 norm of d/dW sum_c -log softmax(W h + b)_c, by autograd per sample, equals the closed form."""
    ood = synthetic["ood"].subset(torch.arange(5))
    w, b = (t.double() for t in ood.head())
    bank = _bank(ood.features.double(), None, w, b)
    expected = []
    for h in bank.features.double():
        weight = w.clone().requires_grad_(True)
        loss = -torch.log_softmax(weight @ h + b, 0).sum()
        (grad,) = torch.autograd.grad(loss, weight)
        expected.append(grad.abs().sum())
    torch.testing.assert_close(build_detector("gradnorm").score(bank), torch.stack(expected))


def test_fdbd_and_nci_two_classes() -> None:
    """C=2: one boundary at |f_0 - f_1| / ||w_0 - w_1||; train mean (1, 1)."""
    w, b = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.zeros(2)
    train = _bank(torch.tensor([[0.0, 0.0], [2.0, 2.0]]), torch.tensor([0, 1]), w, b)
    query = _bank(torch.tensor([[4.0, 1.0]]), None, w, b)
    boundary = 3.0 / math.sqrt(2.0)
    assert float(build_detector("fdbd").fit(train).score(query)[0]) == pytest.approx(boundary / 3.0)
    assert float(build_detector("fdbd", distance_as_normalizer=False).fit(train).score(query)[0]) == pytest.approx(boundary / math.sqrt(17))
    # NCI: <w_0, (3, 0)> / 3 + alpha * 5
    assert float(build_detector("nci", alpha=0.1).fit(train).score(query)[0]) == pytest.approx(1.0 + 0.5)


def test_odin_without_noise_is_temperature_msp_and_noise_raises_confidence(synthetic: dict[str, FeatureBank]) -> None:
    bank = synthetic["ood"].subset(torch.arange(20))
    plain = _scores(build_detector("odin", temperature=10, noise=0.0), bank)
    torch.testing.assert_close(plain, torch.log_softmax(bank.logits.double() / 10, 1).max(1).values, rtol=1e-6, atol=1e-6)
    nudged = _scores(build_detector("odin", temperature=10, noise=0.01), bank)
    assert bool((nudged > plain).all())


def test_odin_step_is_noise_over_input_std_against_the_gradient_sign() -> None:
    """Linear model f = W x: the perturbed input is x - noise * sign(grad) / std, checked against autograd."""
    w = torch.tensor([[1.0, -2.0], [0.5, 1.0]])
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(w)
    x = torch.tensor([[1.0, 0.3]], requires_grad=True)
    F.cross_entropy(model(x) / 5.0, model(x).argmax(1)).backward()
    x_tilde = x.detach() - 0.1 * torch.sign(x.grad) / 0.5
    expected = torch.log_softmax((x_tilde @ w.T).double() / 5.0, 1).max(1).values
    got = build_detector("odin", temperature=5.0, noise=0.1, input_std=0.5).score_inputs(model, x.detach())
    torch.testing.assert_close(got, expected)


def test_optfs_known_intervals_and_theta() -> None:
    """Values {0, 0, 0.84375, 2.40625, 3.3125, 3.3125} (float32): the 1e-3 / 0.999 quantiles are 0 and 3.3125 (each
    between two equal order statistics), width = float32(0.033125); np.arange's length ceil(3.3125 / width), in float32
    as the quantiles, is ceil(100.00001) = 101: 101 left edges, the last one just below 3.3125. Dim 1, holding the
    3.3125s, has zero weights. Predicted classes (0, 1), not the labels (1, 0): contributions w_y h are 0.84375 in
    interval 25 and 2.40625 in interval 72, I = (0.84375 / 2) e_25 + (2.40625 / 2) e_72 and theta = 1000 I / ||I||.
    A test value below 0 or at or above 3.3125 + width is outside every interval (shaped to 0)."""
    w, b = torch.tensor([[1.0, 0.0, 0.5], [0.5, 0.0, 1.0]]), torch.tensor([0.25, -0.5])
    train = replace(_bank(torch.tensor([[0.84375, 3.3125, 0.0], [0.0, 3.3125, 2.40625]]), None, w, b), labels=torch.tensor([1, 0]))
    det = build_detector("optfs").fit(train)
    assert len(det.lefts_) == 101 and 3.3125 - 1e-6 < float(det.lefts_[100]) < 3.3125
    i25, i72 = 0.84375 / 2, 2.40625 / 2
    t25, t72 = 1000 * i25 / math.hypot(i25, i72), 1000 * i72 / math.hypot(i25, i72)
    expected = torch.zeros(101, dtype=torch.float64)
    expected[25], expected[72] = t25, t72
    torch.testing.assert_close(det.theta_, expected, rtol=1e-12, atol=1e-12)
    # row 1: predicted class 1 (logits 2.296875, 2.328125), h' = (0.84375 t25, 0, 2.40625 t72); row 2: predicted
    # class 0 (logits -0.75, -1), -1 and 4 dropped, 0 in interval 0 (theta 0)
    test = _bank(torch.tensor([[0.84375, 1.0, 2.40625], [-1.0, 4.0, 0.0]]), None, w, b)
    s0, s2 = 0.84375 * t25, 2.40625 * t72
    vanilla = torch.tensor([0.5 * s0 + s2, 0.0], dtype=torch.float64)
    torch.testing.assert_close(det.score(test), vanilla, rtol=1e-12, atol=1e-12)
    energy = torch.tensor([_lse([s0 + 0.5 * s2 + 0.25, 0.5 * s0 + s2 - 0.5]), _lse([0.25, -0.5])], dtype=torch.float64)
    torch.testing.assert_close(det.set_params(ood_score="energy").score(test), energy, rtol=1e-12, atol=1e-12)


def test_optfs_theta_and_scores_do_not_depend_on_the_chunk_sizes(synthetic: dict[str, FeatureBank], monkeypatch: pytest.MonkeyPatch) -> None:
    """theta's sums and the scores bit for bit the same in chunks of 3 (interval search) and 7 (scores) rows as in one
    chunk: index_add_ adds in row order, the scores are row by row (the interval search runs in small chunks to keep
    its int64 temporaries at 64 MiB, not a few GiB, at ImageNet scale)."""
    import ood.detectors.optfs as optfs_module

    whole = _fitted("optfs", synthetic)
    expected = [whole.score(synthetic["test"]), whole.set_params(ood_score="energy").score(synthetic["test"])]
    monkeypatch.setattr(optfs_module, "SEARCH_CHUNK", 3)
    monkeypatch.setattr(mahalanobis_module, "CHUNK", 7)
    chunked = _fitted("optfs", synthetic)
    assert torch.equal(chunked.theta_, whole.theta_) and int((chunked.theta_ != 0).sum()) > 10
    assert torch.equal(chunked.score(synthetic["test"]), expected[0])
    assert torch.equal(chunked.set_params(ood_score="energy").score(synthetic["test"]), expected[1])


def test_optfs_intervals_are_the_codes_masks_where_two_overlap_and_in_a_gap() -> None:
    """`intervals_of` against the code's masks e_i <= v < e_i + width on edges with an overlap ([1, 1.5) in intervals
    0 and 1, counted in both) and a gap ([2.9, 3): in none), at the edges themselves and between them."""
    from ood.detectors.optfs import intervals_of

    lefts = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    rights = torch.tensor([1.5, 2.0, 2.9, 4.0], dtype=torch.float64)
    values = torch.cat([torch.linspace(-0.5, 4.5, 201, dtype=torch.float64), lefts, rights])
    masks = (values[:, None] >= lefts) & (values[:, None] < rights)
    ours = torch.zeros_like(masks)
    for index, mask in intervals_of(values, lefts, rights):
        ours[mask.nonzero().flatten(), index[mask]] = True
    assert torch.equal(ours, masks) and int(masks.sum(1).max()) == 2 and bool((masks.sum(1) == 0).any())


@pytest.mark.parametrize(
    ("name", "hparams", "message"),
    [("ash", {"percentile": 120}, "percentile=120 is outside its range [0, 100]"),
     ("gen", {"M": 0}, "M=0 is outside its range whole numbers in [1, inf]"),
     ("energy", {"temperature": 0}, "temperature=0 is outside its range (0, inf]"),
     ("knn", {"k": 2.5}, "k=2.5 is outside its range whole numbers in [1, inf]"),
     ("adascale_a", {"percentile": (75, 185)}, "percentile=(75, 185) is outside its range [0, 100]"),
     ("react", {"percentile": float("nan")}, "percentile=nan is outside its range [0, 100]"),
     ("cfood", {"k": 2.0}, "k=2.0 is outside its range (0, 1]"),
     ("relation", {"pow": -1}, "pow=-1 is outside its range (0, inf]"),
     ("pnml", {"eps": 0.7}, "eps=0.7 is outside its range (0, 0.5)"),
     ("adascale_a", {"k1": 0}, "k1=0 is outside its range (0, 100]"),
     ("nac", {"bins": 1}, "bins=1 is outside its range whole numbers in [2, inf]"),
     ("vra", {"percentile_low": 95, "percentile_high": 90}, "percentile_low=95 must be below percentile_high=90")],
)
def test_a_hyper_parameter_out_of_range_is_refused_in_one_line(name: str, hparams: dict, message: str) -> None:
    """gen with M=0 scored constant zeros, ash with a percentile of 120 and energy with T=0 gave nonsense or NaN;
    so did cfood with k > 1 (every score -1), vra with percentile_low above percentile_high (every activation clipped
    to one value), relation with a negative power (NaN), pnml with eps >= 0.5 (an empty clamp)."""
    with pytest.raises(ConfigError, match=rf"^detector '{name}': {re.escape(message)}$"):
        build_detector(name, **hparams)


def test_flags_choices_stage_lists_and_seeds_are_checked_by_the_constructors_annotations() -> None:
    """Every registered detector, by its constructor's annotations: a `bool` given 'no' (neco's `use_max_logit`, a
    true string, was taken), a `Literal` given another word (knn's `index='exat'` failed after the pass, as the index
    was built), a list of names given a number (mds_ensemble's `stages=7`: a TypeError; 'layer1' read as letters), a
    seed of 0.5 or -1 (gmm's failed in scikit-learn after the pass) are one line naming the detector; its own
    defaults are taken."""
    checked = set()
    for name in available_detectors():
        cls = detector_class(name)
        hints = typing.get_type_hints(cls.__init__)
        defaults = inspect_defaults(cls)
        for key in hparam_names(cls):
            hint = hints.get(key)
            if key == "seed" and key not in cls.ranges:
                bad = [(0.5, "is outside its range whole numbers in [0, inf]"), (-1, "is outside its range whole")]
            elif hint is bool:
                bad = [("no", "must be true or false"), (1, "must be true or false")]
            elif typing.get_origin(hint) is typing.Literal:
                bad = [("exat", f"; choices: {list(typing.get_args(hint))}")]
            elif "Sequence[str]" in str(hint):
                bad = [(7, "must be a list of names"), ("layer1", "must be a list of names"), ([1], "must be a list")]
            else:
                continue
            for value, message in bad:
                with pytest.raises(ConfigError, match=rf"^detector '{name}': {key}={re.escape(repr(value))}"
                                                      rf"{'' if message.startswith(';') else ' '}{re.escape(message)}"):
                    build_detector(name, **{key: value})
            build_detector(name, **{key: defaults[key]})
            checked.add((name, key))
    assert {("neco", "use_max_logit"), ("fdbd", "distance_as_normalizer"), ("knn", "index"), ("combood", "features"),
            ("mds_ensemble", "stages"), ("gmm", "seed"), ("gram", "seed"), ("weiper", "seed")} <= checked
    assert build_detector("mds_ensemble", stages=["layer1"]).stages == ["layer1"]


def test_defaults_and_grids_are_in_range_and_set_params_checks_too() -> None:
    for name in available_detectors():
        cls = detector_class(name)
        for point in [{}, *grid_points(cls.grid)]:
            build_detector(name, **point)
    det = build_detector("knn", k=5)
    with pytest.raises(ConfigError, match=r"^detector 'knn': k=0 is outside"):
        det.set_params(k=0)
    assert det.k == 5


def test_row_slices_cover_the_rows_in_order_in_blocks_of_at_most_size() -> None:
    """The one block splitter of the bank, relation and CF-OOD (each had its own copy)."""
    assert row_slices(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert row_slices(6, 3) == [slice(0, 3), slice(3, 6)]
    assert row_slices(2, 5) == [slice(0, 2)]
    assert row_slices(0, 4) == []


def test_a_list_is_a_grid_only_for_a_hyperparameter_that_takes_one_value() -> None:
    """Every registered detector: each default and grid value is one value (AdaSCALE's percentile pair, mds_ensemble's
    stages, a string), a list of a one-value key's values is its grid, a one-value list that value; for a key that
    takes a sequence, a list of sequences is the grid."""
    for name in available_detectors():
        cls = detector_class(name)
        for key, default in inspect_defaults(cls).items():
            assert split_hparams(cls, {key: default}) == ({key: default}, {}), (name, key)
        for key, values in cls.grid.items():
            for value in values:
                assert split_hparams(cls, {key: value}) == ({key: value}, {}), (name, key)
            assert split_hparams(cls, {key: [values[0]]}) == ({key: values[0]}, {}), (name, key)
    knn, adascale, combood = (detector_class(n) for n in ("knn", "adascale_a", "combood"))
    assert split_hparams(knn, {"k": [10, 50], "index": "exact"}) == ({"index": "exact"}, {"k": [10, 50]})
    assert split_hparams(adascale, {"percentile": [60, 65]}) == ({"percentile": [60, 65]}, {})
    assert split_hparams(adascale, {"percentile": [[60, 65], (70, 80)]}) == ({}, {"percentile": [[60, 65], (70, 80)]})
    assert split_hparams(detector_class("mds_ensemble"), {"stages": ["layer3", "layer4"]})[1] == {}
    # a per-channel normalisation std (the data fact the evaluation passes in) is one value, by its annotation
    assert split_hparams(detector_class("odin"), {"input_std": (0.2, 0.3, 0.4)}) == ({"input_std": (0.2, 0.3, 0.4)}, {})
    assert split_hparams(combood, {"features": ["extreme", "penultimate"]}) == ({}, {"features": ["extreme", "penultimate"]})


@pytest.mark.parametrize(
    ("annotation", "sequence"),
    [("Sequence[str] | None", True), ("tuple[float, float]", True), ("set[str]", True), ("frozenset[str]", True),
     ("AbstractSet[str]", True), ("Literal['tuple', 'x']", False), ('Literal["a]", "list"] | float', False),
     ("Literal['mean', 'max'] | list[str]", True), ("str | None", False), ("float", False)],
)
def test_an_annotation_names_a_sequence_by_its_types_not_its_literal_values(annotation: str, sequence: bool) -> None:
    """`takes_sequence` read a word inside `Literal[...]` as a type (`Literal['tuple', 'x']` took a sequence, so a
    list of its values was no grid) and missed `set[str]` / `frozenset[str]` (a list of sets read as a grid). Each
    annotation is checked as `from __future__ import annotations` leaves it (a string) and as a typing object."""
    import typing
    from collections.abc import Sequence

    from ood.detectors.base import takes_sequence

    names = {"Sequence": Sequence, "AbstractSet": typing.AbstractSet, "Literal": typing.Literal}
    for given in (annotation, eval(annotation, names)):
        class Throwaway(Detector):  # no name: not registered
            def __init__(self, value: Any = None) -> None:
                self.value = value

        Throwaway.__init__.__annotations__["value"] = given
        assert takes_sequence(Throwaway, "value") is sequence, given
        assert split_hparams(Throwaway, {"value": ["a", "b"]}) == (({"value": ["a", "b"]}, {}) if sequence else
                                                                   ({}, {"value": ["a", "b"]})), given


def inspect_defaults(cls: type[Detector]) -> dict[str, Any]:
    """The constructor defaults of a detector's hyper-parameters (those with one)."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    return {k: params[k].default for k in hparam_names(cls) if params[k].default is not inspect.Parameter.empty}


@pytest.mark.parametrize(
    ("name", "hparams", "message"),
    [("knn", {"k": [10, 0]}, "k=0 is outside its range whole numbers in [1, inf]"),
     ("knn", {"k": []}, "k=[] lists no value: give one, or several to tune"),
     ("adascale_a", {"percentile": [[60, 65], [70, 185]]}, "percentile=[70, 185] is outside its range [0, 100]")],
)
def test_each_value_of_a_grid_is_range_checked(name: str, hparams: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^detector '{name}': {re.escape(message)}$"):
        Evaluator([name], params={name: hparams})


def test_build_detector_builds_one_setting() -> None:
    """A list of values to tune given to `build_detector` reached the constructor (knn's k a list, failing at score);
    a one-value list is the value."""
    with pytest.raises(ConfigError, match=r"^detector 'knn': k=\[10, 50\] lists values to tune, and build_detector "
                                          r"builds one detector: give one value, e.g\. k=10 \(ood's evaluation tunes a "
                                          r"list given in detectors\.params\)$"):
        build_detector("knn", k=[10, 50])
    assert build_detector("knn", k=[10]).k == 10


def test_set_params_takes_one_value_per_hyperparameter() -> None:
    """`set_params(k=[10, 50])` passed the range check element by element and set a list on the fitted detector."""
    det = build_detector("knn", k=2).fit(FeatureBank(features=torch.eye(4), logits=torch.eye(4), labels=torch.arange(4)))
    with pytest.raises(ValueError, match=r"^knn: set_params takes one value per hyper-parameter, got the lists "
                                         r"\{'k': \[1, 3\]\}$"):
        det.set_params(k=[1, 3])
    assert det.k == 2 and det.set_params(k=3).k == 3
