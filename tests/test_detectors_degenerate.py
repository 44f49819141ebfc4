"""Every cached detector on degenerate hand-made banks, as a user's own model and data give them: a class with one
row or none, fewer rows than feature dimensions, constant or zero features, duplicate rows, one class, a diverged
model (NaN in the bank or its head), float16 / bfloat16 banks, an empty bank, huge logits. Each gives finite scores
(agreeing with the reference where one is transcribed) or one line naming the detector and what to do."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import sklearn.covariance
import torch

from ood.detectors import DetectorNotApplicable, available_detectors, build_detector, detector_class
from ood.detectors.base import Detector
from ood.errors import ConfigError, NonFiniteError
from ood.features.bank import FeatureBank

#: the detectors scored from a cached bank alone (those needing network passes or combood's / the grams' layer taps are
#: enrolled on a tiny CNN in tests/test_detectors_model.py)
CACHED = [n for n in available_detectors() if not detector_class(n).needs_model and detector_class(n).reproduces is None
          and n not in {"combood", "gram", "gram_v15"}]
#: those that fit statistics (the others' `fit` is the base class's checks alone)
FITTED = [n for n in CACHED if detector_class(n).fit is not Detector.fit]
#: those that fit statistics per label: labels outside the network's classes are refused
LABELLED = [n for n in FITTED if detector_class(n).per_class or n == "tempscale"]
CLASSES = 4
#: hyper-parameters that the tiny banks admit (gmm's 50 clusters and knn's k = 50 exceed their rows)
SMALL = {"gmm": {"num_clusters": 4}, "knn": {"k": 3}, "nnguide": {"k": 3}}


def bank(n: int, d: int, labels: torch.Tensor | None = None, seed: int = 0, scale: float = 1.0) -> FeatureBank:
    """ReLU features around one centre per class (labels cycling over the 4 classes unless given), a random head."""
    gen = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(CLASSES, d, generator=torch.Generator().manual_seed(99)).relu()
    weight = torch.randn(CLASSES, d, generator=torch.Generator().manual_seed(98)) / d**0.5
    bias = 0.1 * torch.randn(CLASSES, generator=torch.Generator().manual_seed(97))
    y = torch.arange(n) % CLASSES if labels is None else labels
    h = (centres[y] + torch.randn(n, d, generator=gen)).relu()
    return FeatureBank(logits=scale * (h @ weight.T + bias), features=h, labels=y, weight=weight, bias=bias)


def with_features(b: FeatureBank, h: torch.Tensor) -> FeatureBank:
    """`b` with features `h` and the logits its head gives them."""
    return replace(b, features=h, logits=h @ b.weight.T + b.bias)


def fit(name: str, b: FeatureBank) -> Detector:
    with warnings.catch_warnings():  # sklearn's and scipy's warnings on degenerate fits: the scores are asserted
        warnings.simplefilter("ignore")
        return build_detector(name, **SMALL.get(name, {})).fit(b)


def _constant_columns() -> FeatureBank:
    h = bank(60, 16).features.clone()
    h[:, :4], h[:, 5] = 0.0, 1.5
    return with_features(bank(60, 16), h)


def _zero_row() -> FeatureBank:
    h = bank(60, 16).features.clone()
    h[3] = 0.0
    return with_features(bank(60, 16), h)


#: case -> fit bank; test banks are `bank(12, D, seed=1)`
FIT_CASES: dict[str, Callable[[], FeatureBank]] = {
    "one_row_of_a_class": lambda: bank(61, 16, labels=torch.tensor([0] + [1, 2, 3] * 20)),
    "a_class_absent": lambda: bank(60, 16, labels=torch.tensor([0, 1, 3] * 20)),
    "fewer_rows_than_dims": lambda: bank(20, 64),
    "constant_columns": _constant_columns,
    "a_zero_row": _zero_row,
    "duplicate_rows": lambda: bank(60, 16).subset(torch.arange(60) % 8),
    "one_class": lambda: bank(60, 16, labels=torch.zeros(60, dtype=torch.long)),
}


@pytest.mark.parametrize("case", FIT_CASES)
@pytest.mark.parametrize("name", CACHED)
def test_degenerate_fit_banks_give_finite_scores_or_one_line(name: str, case: str) -> None:
    """Finite float64 scores, one per row, or -- for a per-class detector missing a class -- `DetectorNotApplicable`
    naming the missing class (the run skips it, saying why); never a raw error or a NaN score."""
    fit_bank = FIT_CASES[case]()
    cls = detector_class(name)
    if cls.per_class and case in {"a_class_absent", "one_class"}:
        with pytest.raises(DetectorNotApplicable, match=rf"^{name} fits statistics per class, and its fit bank has no rows "
                                                        r"of \d of the network's 4 classes"):
            fit(name, fit_bank)
        return
    if name == "ddu" and case == "one_row_of_a_class":  # a covariance per class, 1/(n - 1): tests/test_ddu.py
        with pytest.raises(DetectorNotApplicable, match=r"^ddu fits a covariance per class \(1/\(n - 1\)\), and 1 class"):
            fit(name, fit_bank)
        return
    scores = fit(name, fit_bank).score(bank(12, fit_bank.features.shape[1], seed=1))
    assert scores.dtype == torch.float64 and scores.shape == (12,)
    assert bool(torch.isfinite(scores).all()), (name, case, scores)


@pytest.mark.parametrize("case", ["fewer_rows_than_dims", "constant_columns", "duplicate_rows"])
def test_mahalanobis_on_a_singular_covariance_is_openoods(case: str) -> None:
    """A singular shared covariance (n < d, constant columns, duplicates) takes its pseudo-inverse, as OpenOOD's `mds`
    (scikit-learn's `EmpiricalCovariance.precision_` of the class-centred features), never an inverse's error."""
    fit_bank = FIT_CASES[case]()
    test = bank(12, fit_bank.features.shape[1], seed=1)
    h, y = fit_bank.features.double().numpy(), fit_bank.labels.numpy()
    means = np.stack([h[y == c].mean(0) for c in range(CLASSES)])
    precision = sklearn.covariance.EmpiricalCovariance(assume_centered=False).fit(h - means[y]).precision_
    diff = test.features.double().numpy()[:, None, :] - means[None]
    want = -np.einsum("ncd,de,nce->nc", diff, precision, diff).min(1)
    # float64 on both sides (the zero eigenvalues fall far below either pseudo-inverse's cut): measured 9e-15
    np.testing.assert_allclose(fit("mahalanobis", fit_bank).score(test).numpy(), want, rtol=1e-10)


@pytest.mark.parametrize("name", FITTED)
def test_an_empty_fit_bank_is_refused_in_one_line(name: str) -> None:
    """0 fit rows: cadref divided by zero, klm stacked nothing, react / vra / weiper indexed an empty array, vim's
    `eigh` failed, knn and nnguide asked for k=0, fdbd and nci scored every row NaN; now one line says what to do
    (a bank of the ID fit split's images: `data.fit_fraction`, which it named, is always above 0 and keeps a row)."""
    split = detector_class(name).fit_split
    with pytest.raises(ConfigError, match=rf"^{name}: its fit bank has no rows, and its statistics are fitted to them; "
                                          rf"fit it on the ID {split} bank, one row per ID {split} image "
                                          rf"\(ood\.extract\(model, <the ID {split} folder>\)\)$"):
        fit(name, bank(0, 16))


@pytest.mark.parametrize("label", [-1, CLASSES])
@pytest.mark.parametrize("name", LABELLED)
def test_fit_labels_outside_the_classes_are_refused_in_one_line(name: str, label: int) -> None:
    """An OOD label (-1) or a class the network lacks (4 of 4 outputs) in the fit bank failed in `bincount`, an index
    error or cross-entropy's target check; now one line names the labels and the classes."""
    b = bank(60, 16)
    labels = b.labels.clone()
    labels[[5, 9]] = label
    with pytest.raises(ConfigError, match=rf"^{name}: 2 of the 60 labels of its fit bank are outside the network's 4 "
                                          rf"classes \[0, 4\) \(e.g. \[{label}\]\)"):
        fit(name, replace(b, labels=labels))


@pytest.mark.parametrize("name", CACHED)
def test_a_diverged_head_is_refused_by_fit_and_score(name: str) -> None:
    """A NaN in the final-layer weight (a diverged model): ash, dice, react, scale, ... scored every row NaN without a
    word, vim failed in `svd` and weiper with an index error; now fit and score refuse it in one line."""
    b = bank(60, 16)
    weight, bias = b.weight.clone(), b.bias.clone()
    weight[1, 2], bias[0] = torch.nan, torch.inf
    if detector_class(name).fit is not Detector.fit:
        with pytest.raises(NonFiniteError, match=rf"^{name}: the final-layer weight and bias of its fit bank hold NaN"):
            fit(name, replace(b, weight=weight, bias=bias))
    det = fit(name, b)
    with pytest.raises(NonFiniteError, match=rf"^{name}: the final-layer weight of its score bank holds NaN or infinite values \(a "):
        det.score(replace(bank(12, 16, seed=1), weight=weight))


@pytest.mark.parametrize("name", CACHED)
def test_a_bank_without_the_final_layer_is_refused_by_the_detectors_that_read_it(name: str) -> None:
    """A bank built by hand without weight / bias: the 12 detectors that read the head raised `bank.head()`'s bare
    ValueError, naming no detector; they now refuse it in one line (`reads_head`), and the others score it as with."""
    train, test = bank(60, 16), bank(12, 16, seed=1)
    headless = lambda b: replace(b, weight=None, bias=None)  # noqa: E731
    if detector_class(name).reads_head:
        with pytest.raises(ConfigError, match=rf"^{name}: it reads the final layer's weight and bias and its fit bank has "
                                              "none; build the bank with weight=... and bias=..."):
            fit(name, headless(train))
        with pytest.raises(ConfigError, match=rf"^{name}: it reads the final layer's weight and bias and its score bank"):
            fit(name, train).score(headless(test))
        return
    torch.testing.assert_close(fit(name, headless(train)).score(headless(test)), fit(name, train).score(test), rtol=0, atol=0)


@pytest.mark.parametrize("name", CACHED)
def test_nan_rows_float16_empty_and_huge_logit_banks(name: str) -> None:
    """NaN / inf rows of a test bank score NaN and the others as without them; float16 and bfloat16 banks score
    finite, and as float32 banks of the same values for the detectors that declare `float16_features` (the others
    may compute in the bank's precision: `evaluation.feature_dtype=float16` refuses them); an empty test bank
    scores empty; logits of 1e4 (a softmax's exp overflows in float32) score as the same bank in float64, finite."""
    train, test = bank(60, 16), bank(12, 16, seed=1)
    det = fit(name, train)
    h, logits = test.features.clone(), test.logits.clone()
    h[1, 0], logits[4, 2] = torch.nan, torch.inf
    broken = det.score(replace(test, features=h, logits=logits))
    keep = torch.ones(12, dtype=torch.bool)
    keep[[1, 4]] = False
    assert bool(broken[~keep].isnan().all())
    torch.testing.assert_close(broken[keep], det.score(test.subset(keep)), rtol=0, atol=0)
    assert det.score(test.subset(torch.zeros(0, dtype=torch.long))).shape == (0,)
    for dtype in (torch.float16, torch.bfloat16):
        cast = lambda b, to: replace(b, features=b.features.to(dtype).to(to), logits=b.logits.to(dtype).to(to))  # noqa: E731,B023
        low = fit(name, cast(train, dtype)).score(cast(test, dtype))
        assert bool(torch.isfinite(low).all()), (name, dtype)
        if detector_class(name).float16_features:
            torch.testing.assert_close(low, fit(name, cast(train, torch.float32)).score(cast(test, torch.float32)),
                                       rtol=1e-5, atol=1e-6)
    huge, huge_test = bank(60, 16, scale=1e4), bank(12, 16, seed=1, scale=1e4)
    wide = lambda b: replace(b, features=b.features.double(), logits=b.logits.double(), weight=b.weight.double(),  # noqa: E731
                             bias=b.bias.double())
    got = fit(name, huge).score(huge_test)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, fit(name, wide(huge)).score(wide(huge_test)), rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_react_scores_a_float16_bank_as_the_float32_bank_of_its_values(dtype: torch.dtype) -> None:
    """react clamped a float16 / bfloat16 bank in the bank's dtype, so its threshold was rounded to that dtype: scores
    about 3e-4 (bfloat16: 6e-4) relative off the float32 bank of the same values. It clamps and applies the head in
    float64, as vra does: the same scores, up to the head's summation order."""
    train, test = bank(60, 16), bank(12, 16, seed=1)
    cast = lambda b, to: replace(b, features=b.features.to(dtype).to(to))  # noqa: E731
    low = fit("react", cast(train, dtype)).score(cast(test, dtype))
    torch.testing.assert_close(low, fit("react", cast(train, torch.float32)).score(cast(test, torch.float32)),
                               rtol=1e-12, atol=0)


def test_adascales_ratio_keeps_one_entry_where_the_percentile_leaves_none() -> None:
    """AdaSCALE's step 4 sums the top D - round(D p / 100) activations: 0 of them at p = 99 below D = 50 (a 32-wide
    network), so its score was 0 / 0 and `detectors=full` stopped on NaN; at least 1 is kept, as ASH / SCALE's k."""
    from ood.detectors.adascale import scale_ratio

    h = torch.tensor([[3.0, -1.0, 1.0] + [0.5] * 29, [1.0] * 32])
    got = scale_ratio(h, torch.tensor([99.0, 50.0]))
    assert torch.equal(got, torch.tensor([(3 + 1 + 0.5 * 29) / 3, 32 / 16], dtype=torch.float64))


def test_knn_tuning_leaves_out_grid_values_beyond_its_fit_rows_saying_so_once(caplog: pytest.LogCaptureFixture) -> None:
    """On a fit bank of 120 rows (a small train split, `data.fit_fraction`) knn's grid values 200, 500 and 1000 have
    no k-th neighbour: tuning dropped them without a word. Now one line says so (not one per scored split), and the
    choice is among the others, scored as fresh detectors score them."""
    from ood.evaluation.scoring import tune_detector

    banks = {"train": bank(120, 8), "val": bank(40, 8, seed=1), "val_ood": bank(40, 8, seed=2, scale=0.1)}
    with caplog.at_level("WARNING", logger="ood.detectors.knn"):
        det, tuned, scores = tune_detector("knn", {}, banks, tune=True)
    assert [r.getMessage() for r in caplog.records] == [
        "knn: tuning leaves out k=[200, 500, 1000] of its grid, beyond the 120 train features it searches (a fit on "
        "fewer rows: data.fit_fraction); it chooses among k=[50, 100]"]
    assert tuned and det.k in (50, 100)
    torch.testing.assert_close(scores["val"], build_detector("knn", k=det.k).fit(banks["train"]).score(banks["val"]))


def test_knn_grid_beyond_every_fit_row_scores_one_point_not_five_copies(caplog: pytest.LogCaptureFixture) -> None:
    """Where every grid k exceeds the fit rows, each point read the same farthest row: five equal scores tuned as if
    they differed. Now the first point alone is scored (its fit's warning names detectors.params.knn.k and
    data.fit_fraction); the others are left out."""
    train, val = bank(30, 8), bank(10, 8, seed=1)
    with caplog.at_level("WARNING", logger="ood.detectors.knn"):
        det = build_detector("knn").fit(train)
    assert [r.getMessage() for r in caplog.records] == [
        "knn: k=50 exceeds the 30 train features it searches: it reads the farthest of them, which ranks OOD above "
        "ID; set detectors.params.knn.k below 30, or fit on more rows (data.fit_fraction)"]
    first, *rest = det.score_grid(val, [{"k": k} for k in detector_class("knn").grid["k"]])
    unit = lambda h: torch.nn.functional.normalize(h.double(), dim=1)  # noqa: E731
    farthest = torch.cdist(unit(val.features), unit(train.features)).max(1).values ** 2
    torch.testing.assert_close(first, -farthest, rtol=1e-5, atol=1e-6)
    assert rest == [None] * 4


def test_knn_with_no_grid_k_within_its_fit_rows_is_recorded_untuned_as_a_one_point_grid() -> None:
    """Where no k of knn's grid fits the 30 fit rows, its first point alone is scored, yet the rows said tuned=True,
    tuned_params=['k']: a choice among one. Now they say what a one-point grid says (tuned=False, no tuned_params),
    with the k used (the grid's first) among its parameters; a grid with two k within the rows is still tuned."""
    from ood.evaluation.scoring import detector_scorers

    banks = {"train": bank(30, 8), "val": bank(10, 8, seed=1), "val_ood": bank(10, 8, seed=2, scale=0.1)}
    (scorer,) = detector_scorers(["knn"], {}, banks, tune=True)
    assert (scorer.hparams, scorer.tuned) == ({"k": 50, "index": "exact"}, [])
    (scorer,) = detector_scorers(["knn"], {}, {**banks, "train": bank(120, 8)}, tune=True)
    assert scorer.tuned == ["k"]
