"""OpenMax, Bendale & Boult, "Towards Open Set Deep Networks", CVPR 2016 (arXiv 1511.06233), as OpenOOD's
`openmax` postprocessor (openood/postprocessors/openmax_postprocessor.py).

Fit (ID train): per class c, the mean activation vector mu_c (mean logits of the train samples of class c that the
network classifies correctly) and a Weibull fitted to the `tailsize` largest Euclidean distances ||f - mu_c|| of
those samples (libMR's `fit_high`: the tail is shifted by 1 - min(tail) and a two-parameter Weibull, location 0,
is fitted by maximum likelihood). Score: with the `alpha` top classes of f ranked r = 1..alpha and weights
omega_c = (alpha + 1 - r) / alpha (0 for the other classes), w_c = WeibullCDF(||f - mu_c|| + 1 - min(tail_c)) (0 where
that is negative),
    f'_c = f_c (1 - w_c omega_c),   f'_0 = sum_c f_c w_c omega_c,
    p_0 = exp(f'_0) / (exp(f'_0) + sum_c exp(f'_c)),
and the ID score is -p_0 (OpenOOD's `conf`). OpenOOD's settings: tailsize 20, alpha 3, Euclidean distance; no grid.
The shift of 1 is `libmr.MR()`'s default translate_amount in libmr 0.1.9, the libMR that OpenOOD installs
(`pip install libmr`); pytorch-ood's `LibNotMR` shifts by 10000, an older libMR's default, which moves scores far
more than rounding does (Spearman 0.993 against libMR on tests/fabricate's banks, AUROC 0.807 instead of 0.797).
The fit solves libMR's likelihood equation (weibull.c: sigma = 1 / shape of the log tail scaled to [-1, 0]) with
scipy's brentq to float precision, where libMR's own root finder stops once its bracket is within 2e-6 max(sigma, 1):
over 3000 random tails the shapes differ from libMR's by up to 4e-6 (relative), the scales by 1e-6 and w-scores by
1.5e-6; scores on tests/fabricate's banks by 1.7e-7 (tests/test_openmax_libmr.py holds a transcription of libMR).
A tail without spread (a class of two correct samples: both lie at the same distance from their mean; or duplicate
rows) has no maximum-likelihood Weibull: libMR refuses the fit and its w_score returns -9999, which OpenOOD
multiplies into the logits; here it is libMR's limit as the spread goes to 0, a step at the tail (shape inf:
w_c = 0 below min(tail_c), 1 - 1/e at it, 1 above).
Deviations: that step; the score is -log p_0 = log(exp(f'_0) + sum_c exp(f'_c)) - f'_0, in float64 (monotone in
-p_0, no float32 saturation ties); a class with fewer than 2 correctly classified train samples has no Weibull
(OpenOOD fails on an empty class) and counts as far from every input (w_c = 1, as
pytorch-ood's missing classes). pytorch-ood's `OpenMax` differs from OpenOOD: tailsize 25, alpha 10, distances of
all train samples of a class (not only the correctly classified ones), and an overflow clamp at 709.
State: C x C means and 3 floats per class; the fit and the score read the logits chunk by chunk (N x C distances
never materialise: one chunk of rows at a time).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import brentq

from ood.detectors.base import COUNT, Detector
from ood.detectors.mahalanobis import class_means, row_chunks
from ood.features.bank import FeatureBank

#: libMR's translation of the tail before the fit (translate_amount of `libmr.MR()` in libmr 0.1.9)
TRANSLATION = 1.0


def fit_high(tail: np.ndarray) -> tuple[float, float]:
    """(shape, scale) of libMR's `fit_high` on a tail of distances: the maximum-likelihood Weibull, location 0, of
    tail + TRANSLATION - min(tail); a tail without spread gets the step at its value (shape inf), the limit of the
    fit as the spread goes to 0."""
    shifted = tail + TRANSLATION - tail.min()
    x = np.log(shifted)
    top, spread = x.max(), x.max() - x.min()
    if spread == 0:  # the step's edge is the shifted tail itself (exp(log(.)) would move it by an ulp)
        return float("inf"), float(shifted.max())
    z = (x - top) / spread  # in [-1, 0]: the likelihood equation is well scaled whatever the distances' size

    def likelihood_eq(sigma: float) -> float:
        """sigma + mean(z) - the exp(z / sigma)-weighted mean of z: 0 at the MLE, < 0 as sigma -> 0, > 0 at 1."""
        w = np.exp(z / sigma)
        return float(sigma + z.mean() - (w @ z) / w.sum())

    sigma = brentq(likelihood_eq, 1e-300, 1.0, xtol=1e-300)
    mu = sigma * np.log(np.exp(z / sigma).mean())
    return float(1 / (spread * sigma)), float(np.exp(spread * mu + top))


class OpenMax(Detector):
    """-(OpenMax probability of the unknown class), from Weibull models of the distance to each class's mean logits."""

    name = "openmax"
    reads_features = False
    per_class = True
    ranges = {"tailsize": COUNT, "alpha": COUNT}
    float16_features = True

    def __init__(self, tailsize: int = 20, alpha: int = 3) -> None:
        self.tailsize = tailsize
        self.alpha = alpha

    def fit(self, bank: FeatureBank) -> OpenMax:
        assert bank.labels is not None, "openmax needs labelled ID-train logits"
        num_classes = bank.logits.shape[1]
        correct = torch.cat([bank.logits[rows].argmax(1) == bank.labels[rows] for rows in row_chunks(len(bank))])
        labels = torch.where(correct, bank.labels, num_classes)  # misclassified rows go to a dropped extra class
        counts = torch.bincount(labels, minlength=num_classes + 1)[:num_classes]
        self.means_ = class_means(bank.logits, labels, num_classes + 1)[:num_classes]
        # the `tailsize` largest distances of each class's correct samples, kept chunk by chunk
        tails = [torch.empty(0, dtype=torch.float64) for _ in range(num_classes)]
        for rows in row_chunks(len(bank)):
            keep = correct[rows]
            y = bank.labels[rows][keep]
            dist = torch.linalg.vector_norm(bank.logits[rows][keep].double() - self.means_.to(y.device)[y], dim=1).cpu()
            for c in y.unique().tolist():
                both = torch.cat([tails[c], dist[y.cpu() == c]])
                tails[c] = both.topk(min(self.tailsize, len(both))).values
        # per class: (shape, scale, min of the tail); NaN shape marks a class without a Weibull
        params = np.full((num_classes, 3), np.nan)
        for c in range(num_classes):
            if counts[c] >= 2:
                tail = tails[c].numpy()
                params[c] = *fit_high(tail), tail.min()
        self.weibull_ = torch.from_numpy(params)
        return self

    def _w_score(self, dist: torch.Tensor) -> torch.Tensor:
        """Weibull CDF of the distances [N, C] under each class's model (1 for classes without one; a step where the
        shape is inf)."""
        shape, scale, low = (self.weibull_[:, i].to(dist.device) for i in range(3))
        x = (dist + TRANSLATION - low) / scale
        cdf = 1 - torch.exp(-(x.clamp_min(0) ** shape))
        return torch.where(torch.isnan(shape), torch.ones_like(cdf), cdf)

    def score(self, bank: FeatureBank) -> torch.Tensor:
        out = []
        means = self.means_.to(bank.logits.device)
        for rows in row_chunks(len(bank)):
            f = bank.logits[rows].double()
            dist = torch.cdist(f, means, compute_mode="donot_use_mm_for_euclid_dist")
            k = min(self.alpha, f.shape[1])
            # omega: (alpha + 1 - rank) / alpha on the top-alpha classes, 0 elsewhere
            ranks = torch.arange(k, 0, -1, dtype=f.dtype, device=f.device).expand(len(f), k)
            omega = torch.zeros_like(f).scatter_(1, f.topk(k, dim=1).indices, ranks / self.alpha)
            revised = f * self._w_score(dist) * omega  # f_c - f'_c
            unknown = revised.sum(1, keepdim=True)
            out.append(torch.logsumexp(torch.cat([f - revised, unknown], 1), dim=1) - unknown[:, 0])
        return torch.cat(out)
