"""OTOD, Gao, He & Pu, "Detecting OOD Samples via Optimal Transport Scoring Function" (arXiv 2502.16115; code
github.com/HengGao12/OTOD, `openood/postprocessors/otdp_postprocessor.py`, run by `scripts/ood/otd/
cifar10_test_ood_otod.sh` with `configs/postprocessors/otdp.yml`), the OpenOOD v1.5 leaderboard's `OTOD` row.

Each of three vectors of a row -- the penultimate features h, the logits f and the softmax p = softmax(f / T),
T = 3 -- is L2-normalised, v' = v / ||v|| + 1e-10 (the authors' `normalizer`: the 1e-10 is added to the quotient),
and its D entries are read as a 1-D empirical distribution. Its Wasserstein-1 distance to a point mass at c is
mean_j |v'_j - c| (what the authors' `scipy.stats.wasserstein_distance(v', c * ones)` computes); OTOD takes the
nearer of the two references c = 1/D ("the mean vector") and c = 0 ("the zero vector"):

    score = -(1/3) * sum_{v in (h, f, p)} min(mean_j |v'_j - 1/D_v|, mean_j |v'_j|),   higher = more ID.

Nothing is fitted: a row's score is a function of that row alone (post-hoc, per sample; not transductive, despite
the name). Deviations: float64 throughout (the authors normalise in float32); a zero vector, NaN there (0 / 0),
is normalised to 0 (then 1e-10 added) instead. Memory: scored in row chunks of `CHUNK` rows (`row_chunks`), so a
float16 bank is widened to float64 one chunk at a time, never copied whole.
"""

from __future__ import annotations

import torch

from ood.detectors.base import POSITIVE, Detector
from ood.detectors.mahalanobis import row_chunks
from ood.features.bank import FeatureBank


def w1_to_references(v: torch.Tensor) -> torch.Tensor:
    """Per row: min over c in {1/D, 0} of the W1 distance between the entries of the L2-normalised row (plus the
    authors' 1e-10) and a point mass at c, i.e. min(mean_j |v'_j - 1/D|, mean_j |v'_j|)."""
    v = v.double()
    unit = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-300) + 1e-10
    return torch.minimum((unit - 1.0 / v.shape[1]).abs().mean(1), unit.abs().mean(1))


class OTOD(Detector):
    """Minus the mean of the feature, logit and softmax(f / T) W1 distances to the nearer of a uniform and a zero
    reference."""

    name = "otod"
    float16_features = True
    ranges = {"temperature": POSITIVE}
    score_params = frozenset({"temperature"})

    def __init__(self, temperature: float = 3.0) -> None:
        self.temperature = temperature

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return torch.cat([self._score_rows(bank.features[rows], bank.logits[rows]) for rows in row_chunks(len(bank))])

    def _score_rows(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.double()
        probs = torch.softmax(logits / self.temperature, dim=1)
        parts = [w1_to_references(v) for v in (features, logits, probs)]
        return -(parts[0] + parts[1] + parts[2]) / 3
