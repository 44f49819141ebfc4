"""AdaSCALE, Regmi et al., "AdaSCALE: Adaptive Scaling for OOD Detection", 2025 (arXiv 2503.08023), as OpenOOD's
`adascale_a` / `adascale_l` postprocessors (`openood/postprocessors/adascale_postprocessor.py`,
`openood/networks/adascale_net.py`, `configs/postprocessors/adascale_{a,l}.yml`; sudarshanregmi/AdaSCALE).

Per input x with penultimate features h and yhat = argmax f(x):
1. x' = x + 0.5 sign(g) m, g = grad_x f_yhat(x), m the mask of the fraction `o` of input elements with the
   smallest |g| (a perturbation of the least sensitive elements, in normalised input units);
2. Q'(x) = sum_{i in top_k1(h)} relu(h'_i) + lambda sum_{i in top_k2(h)} |h_i - h'_i|, h' = features of x',
   top_k the indices of the k largest h, k = max(1, floor(D k% / 100));
3. an adaptive percentile p(x) = p_min + (1 - ECDF(Q'(x))) (p_max - p_min), the ECDF of Q' over ID val samples;
4. r(x) = sum(relu(h)) / (sum of the top D - round(D p(x) / 100) entries of relu(h)) (SCALE's ratio at p(x));
   `adascale_a`: score = logsumexp(fc(h e^r)); `adascale_l`: score = logsumexp(fc(h) r^2).
Fit: Q' over the ID val split (`fit_split = val`; OpenOOD's setup on its ID val loader), a `ModelFitted` pass
(one forward with an input gradient and one perturbed forward per batch); scoring repeats those two passes, once
for both variants when they score a batch together (`SharedPasses`).
Grid: OpenOOD's 36 (p_min, p_max) pairs, all scored from the same passes (p only enters steps 3-4); k1 = 5 %,
k2 = 1 %, lambda = 10, o = 5 % (OpenOOD's single sweep values, relative to D and the input size already).
Deviations: k = max(1, ...) (OpenOOD's floor gives k2 = 0 below D = 100, e.g. the 64-d digits network, dropping
the shift term), and so is step 4's count of top entries (OpenOOD's is 0 once D p / 100 rounds to D, at p = 99 for
D < 50: a 0 / 0 score; ASH / SCALE's k has the same floor); features and head are the backbone's (`backbone.run`); scores in float64; OpenOOD's ECDF sample
of at most `num_samples` = 5000 val samples is drawn with a fixed seed (`seed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ood.detectors.base import COUNT, NON_NEGATIVE, PERCENTILE, Range, SharedPasses
from ood.detectors.logits import energy_score
from ood.detectors.network import ModelFitted, backbone_of, staged_forward
from ood.features.bank import FeatureBank
from ood.utils import linear_params

#: OpenOOD's percentile sweep: every (low, high) pair of 60, 65, ..., 95, 99 with low < high
PERCENTILES = [(lo, hi) for i, lo in enumerate((60, 65, 70, 75, 80, 85, 90, 95, 99)) for hi in (60, 65, 70, 75, 80, 85, 90, 95, 99)[i + 1 :]]


def top_count(dim: int, percent: float) -> int:
    """k = max(1, floor(dim * percent / 100))."""
    return max(1, int(dim * percent / 100))


def scale_ratio(h: torch.Tensor, percentile: torch.Tensor) -> torch.Tensor:
    """[N] sum(relu(h)) / sum of the top max(1, D - round(D p / 100)) entries of relu(h), p per row."""
    a = h.double().clamp_min(0)
    dim = a.shape[1]
    ks = (dim - torch.round(dim * percentile.double() / 100).long()).clamp_min(1)  # as ASH / SCALE's k (activation.py)
    top = a.topk(int(ks.max()), 1).values
    keep = torch.arange(top.shape[1], device=a.device)[None, :] < ks[:, None]
    return a.sum(1) / (top * keep).sum(1)


class AdaScaleA(ModelFitted):
    """Energy of the features scaled per sample by an adaptive-percentile SCALE ratio (activation scaling)."""

    name = "adascale_a"
    ranges = {"percentile": PERCENTILE, "num_samples": COUNT, "k1": Range(0, 100, open_low=True),
              "k2": Range(0, 100, open_low=True), "lmbda": NON_NEGATIVE, "o": Range(0, 1, open_low=True)}
    fit_split = "val"
    pass_group = "staged"
    #: the extra network passes would slow the default run: `detectors=full` runs it, `all` does not
    full_only = True
    grid = {"percentile": PERCENTILES}
    score_params = frozenset({"percentile"})
    #: logit scaling (`adascale_l`) instead of activation scaling
    logit_scaling = False

    def __init__(
        self,
        percentile: Sequence[float] = (75, 85),
        k1: float = 5,
        k2: float = 1,
        lmbda: float = 10,
        o: float = 0.05,
        num_samples: int = 5000,
        seed: int = 0,
    ) -> None:
        self.percentile = tuple(percentile)
        self.k1, self.k2, self.lmbda, self.o = k1, k2, lmbda, o
        self.num_samples, self.seed = num_samples, seed

    def _passes(self, model: nn.Module, x: torch.Tensor, shared: SharedPasses | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, features, Q') of one batch: a forward pass with the input gradient (the batch's clean pass,
        shared with mds_ensemble / mahalanobis_odin), one perturbed forward."""
        backbone, clean = staged_forward(model, x, shared)
        logits, h = clean.out.logits, clean.out.features
        grad = clean.input_grad(logits.gather(1, logits.detach().argmax(1, keepdim=True)).sum())
        flat = grad.flatten(1).abs()
        mask = torch.zeros_like(flat).scatter_(1, flat.topk(int(flat.shape[1] * self.o), 1, largest=False).indices, 1.0)
        with torch.no_grad():
            h_perturbed = backbone.run(clean.x.detach() + grad.sign() * mask.view_as(x) * 0.5).features
        h, h_perturbed = h.detach().double(), h_perturbed.double()
        top1 = h.topk(top_count(h.shape[1], self.k1), 1).indices
        top2 = h.topk(top_count(h.shape[1], self.k2), 1).indices
        q = h_perturbed.clamp_min(0).gather(1, top1).sum(1) + self.lmbda * (h - h_perturbed).abs().gather(1, top2).sum(1)
        return logits.detach().double(), h, q

    def fit_statistics(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._passes(model, x)[2]

    def fit_inputs(self, bank: FeatureBank, statistics: torch.Tensor) -> AdaScaleA:
        gen = torch.Generator().manual_seed(self.seed)
        keep = torch.randperm(len(statistics), generator=gen)[: self.num_samples].to(statistics.device)
        self.reference_ = statistics[keep].double().sort().values
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} perturbs the inputs: score it with score_inputs(model, x)")

    def score_inputs(self, model: nn.Module, x: torch.Tensor, shared: SharedPasses | None = None) -> torch.Tensor:
        return self.score_inputs_grid(model, x, [{}], shared)[0]

    def score_inputs_grid(
        self, model: nn.Module, x: torch.Tensor, points: Sequence[dict[str, Any]], shared: SharedPasses | None = None
    ) -> list[torch.Tensor]:
        """Every percentile pair of `points` from the same two passes (shared with the other variant scoring the
        same batch: the passes do not depend on the scaling)."""
        backbone = backbone_of(model)
        shared = shared or SharedPasses()
        key = ("adascale.passes", self.k1, self.k2, self.lmbda, self.o)
        logits, h, q = shared.get(key, lambda: self._passes(model, x, shared))
        reference = self.reference_.to(q.device)
        below = 1 - torch.searchsorted(reference, q, right=True).double() / len(reference)  # 1 - ECDF(Q')
        weight, bias = (t.detach().double() for t in linear_params(backbone.fc))
        scores = []
        for point in points:
            lo, hi = self.set_params(**point).percentile
            r = scale_ratio(h, lo + below * (hi - lo))
            if self.logit_scaling:
                scaled = logits * r[:, None] ** 2
            else:
                scaled = (h * r.exp()[:, None]) @ weight.T + bias
            scores.append(energy_score(scaled))
        return scores


class AdaScaleL(AdaScaleA):
    """AdaSCALE with the ratio applied to the logits (r^2) instead of the features (e^r)."""

    name = "adascale_l"
    logit_scaling = True
