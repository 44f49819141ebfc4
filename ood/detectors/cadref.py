"""CARef and CADRef, Ling et al., "CADRef: Robust Out-of-Distribution Detection via Class-Aware Decoupled Relative
Feature Leveraging", CVPR 2025 (arXiv 2503.00325). Reference code: LingAndZero/CADRef `ood_methods/CARef.py`,
`ood_methods/CADRef.py` (the authors'); pytorch-ood `detector/caref.py`, `detector/cadref.py`. Not in OpenOOD.

mu_c is the mean train feature of the samples *predicted* as c (not labelled c: the reference groups the train
features by argmax of the logits), yhat the predicted class of the scored sample, w_yhat its head row.
- CARef:  score(h) = -|| h - mu_yhat ||_1 / || h ||_1.
- CADRef: with a = sign(w_yhat) * (h - mu_yhat) (the relative feature, signed by whether it raises f_yhat),
  E_p = sum_i max(a_i, 0) / ||h||_1 and E_n = sum_i max(-a_i, 0) / ||h||_1,
  score(h) = -(E_p / S(f) + E_n / S_bar), S a logit score of the sample and S_bar its mean over the train split.
  S (`logit_score`): `energy` (LSE(f), the paper's default), `maxlogit`, `msp` (max softmax probability) or `gen`
  (the reference's 1 / sum over the top M = max(10, C // 10) probabilities of p^0.1 (1 - p)^0.1); the grid is the
  paper's ablation (pytorch-ood's `hyperparameter_space`), tuned on validation; all four S_bar are fitted at once.
The decoupling splits the *relative* feature by the sign of w_yhat, as both codes do (the paper's Eq. 7-8 print the
sign of w * h instead; pytorch-ood's docstring explains why the code's reading is the consistent one).
Deviations: a class never predicted on the train split gets the mean of all train features as its centre (the
reference leaves an empty mean, NaN scores; pytorch-ood does the same fallback); ||h||_1 is clamped at 1e-12 (an
all-zero h would divide by zero); float64. Fit and score go through the bank in row chunks (`row_chunks`):
state is C x D centres (float64, 16 MB at 1000 x 2048) and four scalars; working memory one float64 chunk, to
which a float16 bank is widened chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ood.detectors.base import Detector
from ood.detectors.logits import energy_score
from ood.detectors.mahalanobis import class_means, row_chunks
from ood.errors import ConfigError
from ood.features.bank import FeatureBank

NORM_EPS = 1e-12


def _gen_inverse(logits: torch.Tensor, gamma: float = 0.1) -> torch.Tensor:
    """CADRef's GEN confidence: 1 / sum over the top M = max(10, C // 10) probabilities of p^gamma (1 - p)^gamma."""
    p = torch.softmax(logits, dim=1)
    top = p.topk(min(max(10, p.shape[1] // 10), p.shape[1]), dim=1).values
    return 1.0 / (top**gamma * (1 - top) ** gamma).sum(1)


#: logit score S(f) of a float64 logit chunk, larger = more confident
LOGIT_SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "energy": energy_score,
    "maxlogit": lambda f: f.max(1).values,
    "msp": lambda f: torch.softmax(f, dim=1).max(1).values,
    "gen": _gen_inverse,
}


class CARef(Detector):
    """-|| h - mu_yhat ||_1 / || h ||_1, mu_c the mean train feature of the samples predicted as c."""

    name = "caref"
    float16_features = True

    def fit(self, bank: FeatureBank) -> CARef:
        predicted = bank.predictions
        means = class_means(bank.features, predicted, bank.logits.shape[1])
        empty = torch.bincount(predicted, minlength=means.shape[0]) == 0
        if bool(empty.any()):
            means[empty] = class_means(bank.features, torch.zeros_like(predicted), 1)[0]
        self.means_ = means
        return self

    def _relative(self, bank: FeatureBank, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h - mu_yhat, ||h||_1 clamped, yhat) of one row chunk, float64."""
        h = bank.features[rows].double()
        pred = bank.logits[rows].argmax(1)
        rel = h - self.means_.to(h.device)[pred]
        return rel, h.abs().sum(1).clamp_min(NORM_EPS), pred

    def score(self, bank: FeatureBank) -> torch.Tensor:
        out = []
        for rows in row_chunks(len(bank)):
            rel, norm, _ = self._relative(bank, rows)
            out.append(-rel.abs().sum(1) / norm)
        return torch.cat(out)


class CADRef(CARef):
    """-(E_p / S(f) + E_n / S_bar): the relative feature split by the sign of the predicted class's weights."""

    name = "cadref"
    reads_head = True
    grid = {"logit_score": ["energy", "maxlogit", "msp", "gen"]}
    score_params = frozenset({"logit_score"})

    def __init__(self, logit_score: str = "energy") -> None:
        if logit_score not in LOGIT_SCORES:
            raise ConfigError(f"cadref: unknown logit_score {logit_score!r}; choices: {list(LOGIT_SCORES)}")
        self.logit_score = logit_score

    def fit(self, bank: FeatureBank) -> CADRef:
        super().fit(bank)
        sums = dict.fromkeys(LOGIT_SCORES, 0.0)
        for rows in row_chunks(len(bank)):
            f = bank.logits[rows].double()
            for key, fn in LOGIT_SCORES.items():
                sums[key] += float(fn(f).sum())
        self.mean_logit_scores_ = {key: total / len(bank) for key, total in sums.items()}
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        w, _ = bank.head()
        confidence, mean_confidence = LOGIT_SCORES[self.logit_score], self.mean_logit_scores_[self.logit_score]
        out = []
        for rows in row_chunks(len(bank)):
            rel, norm, pred = self._relative(bank, rows)
            aligned = rel * w.to(rel.device)[pred].double().sign()
            positive = aligned.clamp_min(0).sum(1) / norm
            negative = (-aligned).clamp_min(0).sum(1) / norm
            out.append(-(positive / confidence(bank.logits[rows].double()) + negative / mean_confidence))
        return torch.cat(out)
