"""openmax's Weibull models against libMR, the library OpenOOD's openmax postprocessor fits them with
(`libmr.MR().fit_high(tail, len(tail))`, then `w_score`; libmr 0.1.9 from PyPI, github.com/Vastlab/libMR).

libMR's MetaRecognition.cpp (FitHigh, EvtGeneric, CDF) and weibull.c (weibull_fit, its bracketing of the root and
wdfzero, the Brent root finder with libMR's stopping rule) are transcribed below in plain Python / NumPy, never through
ood's code. The transcription is pinned to values printed by the real libmr 0.1.9 (built from its PyPI sdist): it
agreed with it to 9e-16 relative in (shape, scale) and 3e-15 in w-scores over 2000 random tails. ood solves the same
likelihood equation to float precision, libMR stops its root finder once the bracket is within 2e-6 max(sigma, 1) of
sigma (1 / shape of the log tail scaled to [-1, 0]): the fits are compared to that bound, carried to shape and scale.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fabricate import centred_banks

from ood.detectors import build_detector
from ood.detectors.openmax import fit_high
from ood.features.bank import FeatureBank

#: `libmr.MR()`'s translate_amount (libmr 0.1.9; older libMR, and pytorch-ood's LibNotMR, shift by 10000)
TRANSLATE = 1.0
#: weibull.c's tolerance of its root finder, and its stopping rule: the bracket's half-width <= 2 TOL max(|b|, 1)
TOL = 1e-6


# ----- libMR, transcribed ---------------------------------------------------------------------------------------------
def _likelihood_eq(sigma: float, x0: np.ndarray, xbar: float) -> float:
    """weibull_scale_likelihood."""
    w = np.exp(x0 / sigma)
    return sigma + xbar - float(np.sum(w * x0)) / float(np.sum(w))


def _wdfzero(a: float, b: float, x0: np.ndarray, xbar: float) -> float | None:
    """weibull.c's wdfzero (dfzero): Brent's method; its acceptance test of an interpolated step runs after a bisection
    too, on the p, q left from the last interpolation (uninitialised in C before the first: 0 here, which rejects)."""
    f = lambda s: _likelihood_eq(s, x0, xbar)  # noqa: E731
    fa, fb = f(a), f(b)
    if fa == 0:
        return a
    if fb == 0:
        return b
    if (fa > 0) == (fb > 0):
        return None
    fc = fb
    c = d = e = p = q = 0.0
    while fb != 0:
        if (fb > 0) == (fc > 0):
            c, fc = a, fa
            d = e = b - a
        if abs(fc) < abs(fb):
            a, b, c = b, c, b
            fa, fb, fc = fb, fc, fb
        m = 0.5 * (c - b)
        tol = 2.0 * TOL * max(abs(b), 1.0)
        if abs(m) <= tol or fb == 0.0:
            break
        if abs(e) < tol or abs(fa) <= abs(fb):
            d = e = m
        else:
            s = fb / fa
            if a == c:
                p, q = 2.0 * m * s, 1.0 - s
            else:
                q, r = fa / fc, fb / fc
                p = s * (2.0 * m * q * (q - r) - (b - a) * (r - 1.0))
                q = (q - 1.0) * (r - 1.0) * (s - 1.0)
            if p > 0:
                q = -q
            else:
                p = -p
        if 2.0 * p < 3.0 * m * q - abs(tol * q) and p < abs(0.5 * e * q):
            e, d = d, p / q
        else:
            d = e = m
        a, fa = b, fb
        if abs(d) > tol:
            b = b + d
        elif b > c:
            b = b - tol
        else:
            b = b + tol
        fb = f(b)
    return b


def libmr_weibull_fit(data: list[float]) -> tuple[float, float] | None:
    """weibull_fit: (shape, scale), None where libMR returns an error code (then MetaRecognition resets: invalid)."""
    x = np.log(np.asarray(data, dtype=np.float64))
    n = len(x)
    spread, top = float(x.max() - x.min()), float(x.max())
    if n <= 1 or spread <= 0:  # "Insufficient distinct data range in weibull_fit"
        return None
    x0 = (x - top) / spread
    mean = sum(float(v) for v in x0) / n
    std = math.sqrt(sum((float(v) - mean) ** 2 for v in x0) / (n - 1))
    sigma = math.sqrt(6.0) * std / math.pi
    xbar = sum(float(v) / n for v in x0)
    if _likelihood_eq(sigma, x0, xbar) > 0:
        upper, lower = sigma, 0.5 * sigma
        while _likelihood_eq(lower, x0, xbar) > 0:
            upper, lower = lower, 0.5 * lower
            if lower < 2.225073858507201e-308:
                return None
    else:
        lower, upper = sigma, 2.0 * sigma
        while _likelihood_eq(upper, x0, xbar) < 0:
            lower, upper = upper, 2.0 * upper
            if upper > 1.797693134862315e308:
                return None
    root = _wdfzero(lower, upper, x0, xbar)
    if root is None:
        return None
    mu = root * math.log(float(np.sum(np.exp(x0 / root))) / n)
    return 1.0 / (spread * root), math.exp(spread * mu + top)


def libmr_fit_high(tail: np.ndarray) -> tuple[float, float, float] | None:
    """MetaRecognition::FitHigh (sign 1, EvtGeneric): (shape, scale, small_score) or None where the fit is invalid."""
    small = float(np.min(tail))
    fit = libmr_weibull_fit([(float(t) + TRANSLATE) - small for t in tail])
    return None if fit is None else (*fit, small)


def libmr_w_score(model: tuple[float, float, float] | None, x: float) -> float:
    """MetaRecognition::W_score = CDF: -9999 from an invalid model, 0 below the translated origin."""
    if model is None:
        return -9999.0
    shape, scale, small = model
    t = (x + TRANSLATE) - small
    if t < 0:
        return 0.0
    with np.errstate(over="ignore"):  # C's pow gives inf there, and w = 1
        return 1.0 - math.exp(-float(np.power(t / scale, shape)))


# ----- the transcription is libMR -------------------------------------------------------------------------------------
T20 = [7.0705, 7.0715, 7.3501, 7.3693, 7.5028, 7.6337, 7.7122, 7.922, 7.9649, 8.1031, 8.1746, 8.6433, 8.7604, 9.1276,
       9.1521, 9.5562, 9.6095, 10.0537, 10.6946, 12.5562]  # the 20 largest of 200 gamma(4, 1) draws
T5 = [12.5546, 12.857, 12.859, 12.9991, 14.0484]  # the 5 largest of 40 normal(10, 2) draws
NEAR = (3.0 + np.linspace(0, 1e-12, 20)).tolist()  # spread 1e-12
#: libmr 0.1.9's get_params()[:2] (scale, shape) and w_score at the points given, printed with repr
LIBMR = [
    (T20, (2.8732405970878365, 2.0083998469172943), [T20[0] - 2, T20[0], T20[10], T20[-1], T20[-1] + 3],
     [0.0, 0.11313459566169126, 0.41425743784816293, 0.9940850060983638, 0.9999834495719349]),
    (T5, (1.689590647278541, 3.0416820769825392), [T5[0] - 0.5, T5[0], T5[2], T5[-1], T5[-1] + 1],
     [0.02433242965867899, 0.1835940041157721, 0.36568009379191424, 0.9619191845175096, 0.9998898681132057]),
    (NEAR, (1.000000000000651, 3645686960261.1206), [2.9, 3.0, 3.0 + 5e-13, 3.0 + 1e-12, 3.1],
     [0.0, 0.08894954780972786, 0.4382410672609054, 0.971841779495128, 1.0]),
]


@pytest.mark.parametrize("tail, params, xs, w", LIBMR, ids=["gamma20", "normal5", "spread1e-12"])
def test_the_transcription_gives_libmrs_fit_and_w_scores(tail: list, params: tuple, xs: list, w: list) -> None:
    model = libmr_fit_high(np.array(tail))
    assert model is not None
    np.testing.assert_allclose([model[1], model[0]], params, rtol=1e-13)
    np.testing.assert_allclose([libmr_w_score(model, x) for x in xs], w, rtol=1e-13, atol=1e-14)


def test_libmr_refuses_a_tail_without_spread() -> None:
    """libMR's is_valid is False and w_score -9999 (fed by OpenOOD into its revised logits): ood needs a rule there."""
    assert libmr_fit_high(np.full(4, 3.0)) is None and libmr_w_score(None, 3.0) == -9999.0


# ----- ood against the transcription ----------------------------------------------------------------------------------
def _bound(tail: np.ndarray, shape: float) -> tuple[float, float]:
    """libMR's root tolerance carried to (relative shape, absolute log scale): its sigma is within
    4 TOL max(sigma, 1) of the root (the bracket [b, c] holds it and |c - b| <= 4 TOL max(|b|, 1) at the stop); shape
    = 1 / (spread sigma) moves by the same fraction, and log scale = spread mu(sigma) + max with |d mu / d sigma| =
    |mu - weighted mean| / sigma <= 1 / sigma (both in [-1, 0])."""
    spread = float(np.log((tail.max() + TRANSLATE) - tail.min()))  # log of the translated max; the min's log is 0
    sigma = 1 / (spread * shape)
    rel = 4 * TOL * max(sigma, 1.0) / sigma * 1.01  # 1 % for the float rounding of spread and sigma
    return rel, spread * rel


@pytest.mark.parametrize("tail", [T20, T5, NEAR, [0.3, 0.9], [5.0, 5.0, 5.0 + 1e-9]], ids=["gamma20", "normal5",
                                                                                          "spread1e-12", "two", "ulp"])
def test_ood_fits_libmrs_weibull_within_libmrs_root_tolerance(tail: list) -> None:
    t = np.array(tail)
    shape, scale, _ = libmr_fit_high(t)
    ours = fit_high(t)
    rel, log_scale = _bound(t, shape)
    assert abs(ours[0] / shape - 1) <= rel, (ours, shape, rel)
    assert abs(math.log(ours[1] / scale)) <= log_scale, (ours, scale, log_scale)


def _reference_openmax(train: FeatureBank, banks: list[FeatureBank], tail: int = 20, alpha: int = 3) -> list:
    """OpenOOD's fit_weibull + openmax (Euclidean) with the transcribed libMR, as -log p_0 (ood's monotone form)."""
    logits, labels = train.logits.double().numpy(), train.labels.numpy()
    models = []
    for c in range(logits.shape[1]):
        right = logits[(labels == c) & (logits.argmax(1) == c)]
        mav = right.mean(0)
        tail_c = np.sort(np.linalg.norm(right - mav, axis=1))[-tail:]
        models.append((mav, tail_c, libmr_fit_high(tail_c)))
    out = []
    for bank in banks:
        scores = []
        for x in bank.logits.double().numpy():
            w = np.array([libmr_w_score(m, float(np.linalg.norm(x - mav))) for mav, _, m in models])
            omega = np.zeros(len(x))
            omega[x.argsort()[::-1][:alpha]] = [(alpha + 1 - r) / alpha for r in range(1, alpha + 1)]
            revised = x * (1 - w * omega)
            unknown = float(np.sum(x - revised))
            scores.append(np.logaddexp.reduce(np.append(revised, unknown)) - unknown)
        out.append(np.array(scores))
    return models, out


def test_openmax_scores_as_openood_with_libmr() -> None:
    """Weibulls within libMR's root tolerance (as above), scores within 1e-5: libMR's relative root tolerance 4e-6
    moves a w-score by at most a few 1e-6 (measured <= 1.5e-6 over 3000 random tails) and -log p_0 by
    sum_c |f_c| omega_c |dw_c| (measured 1.7e-7 here; the scipy fit with pytorch-ood's shift of 10000 was 3.9 off)."""
    banks = centred_banks(7, {"train": 300, "test": 60, "ood": 60}, ood_labelled=False)
    models, theirs = _reference_openmax(banks["train"], [banks["test"], banks["ood"]])
    det = build_detector("openmax").fit(banks["train"])
    for c, (_, tail, (shape, scale, small)) in enumerate(models):
        ours = det.weibull_[c].tolist()
        rel, log_scale = _bound(tail, shape)
        assert abs(ours[0] / shape - 1) <= rel and abs(math.log(ours[1] / scale)) <= log_scale, (c, ours, shape, scale)
        assert ours[2] == pytest.approx(small, rel=1e-12)
    for split, ref in zip(("test", "ood"), theirs):
        np.testing.assert_allclose(det.score(banks[split]).numpy(), ref, rtol=0, atol=1e-5)


# ----- tails without spread: libMR's limit, a step at the tail --------------------------------------------------------
def _degenerate_bank(eps: float) -> FeatureBank:
    """Class 0: two correct rows (their distances to their mean are equal, up to rounding; `eps` moves one row a
    little); class 1: 30 rows; class 2: five duplicate rows (a tail of zeros)."""
    gen = torch.Generator().manual_seed(0)
    two = torch.tensor([[5.0, 1.0, 0.5], [4.0, 2.0, 0.25 + eps]], dtype=torch.float64)
    many = 0.5 * torch.randn(30, 3, generator=gen, dtype=torch.float64) + torch.tensor([0.0, 6.0, 1.0]).double()
    same = torch.tensor([[0.0, 1.0, 7.0]] * 5, dtype=torch.float64)
    return FeatureBank(logits=torch.cat([two, many, same]), labels=torch.tensor([0, 0] + [1] * 30 + [2] * 5))


@pytest.mark.parametrize("eps", [0.0, 1e-16, 1e-13], ids=["equal", "ulp", "1e-13"])
def test_a_tail_without_spread_is_a_step_at_the_tail(eps: float) -> None:
    """w = 0 below the tail, 1 - 1/e at it, 1 above, for the class of two samples (with or without rounding noise
    between their distances) and the duplicate rows; the old scipy fit gave a smooth ramp there (shape 2.6e6 on
    10000.000365: w 0.5 a 1e-3 below the tail), or shape 0.005 / scale 1e-72 (w 0.9 at any distance) at spread 1e-12."""
    det = build_detector("openmax").fit(_degenerate_bank(eps))
    small = det.weibull_[:, 2]
    half = math.sqrt(0.5**2 + 0.5**2 + (0.125 - eps / 2) ** 2)  # each row's distance to the class-0 mean
    assert small[0].item() == pytest.approx(half, rel=1e-14) and small[2].item() == 0.0
    for c in (0, 2):
        shape, at = det.weibull_[c, 0].item(), small[c].item()
        dist = torch.full((3, 3), 50.0, dtype=torch.float64)
        dist[:, c] = torch.tensor([max(at - 1e-3, 0.0), at, at + 1e-3], dtype=torch.float64)
        w = det._w_score(dist)[:, c].tolist()
        assert shape > 1e15 and w[0] == (0.0 if at > 0 else w[1]) and w[2] == 1.0, (c, shape, w)
        if shape == math.inf:  # at the tail itself: a finite shape puts the edge within an ulp of it, either side
            assert w[1] == pytest.approx(1 - math.exp(-1), abs=1e-15)
