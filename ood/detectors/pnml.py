"""Single-layer pNML regret, Bibas, Feder & Hassner, "Single Layer Predictive Normalized Maximum Likelihood for
Out-Of-Distribution Detection", NeurIPS 2021 (arXiv 2110.09246), as pytorch-ood's `PNML` (detector/pnml.py;
OpenOOD has none).

With z = h / ||h||, X the normalised ID-train features, G = (X^T X)^+ (= X^+ X^+^T),
kappa(z) = z^T G z / (1 + z^T G z) and p = softmax(W z + b) clamped to [eps, 1 - eps] (the head applied to the
normalised feature, as the reference), the regret is
    R(z) = log( sum_c p_c / (p_c + (1 - p_c) p_c^kappa) ) / log C,
high for OOD; the ID score is -R. No tuning grid (the reference has none).
Deviations: G and the quadratic form in float64 (the reference: float32); X^T X summed chunk by chunk, so the train
bank is never copied. State: G, D x D float64 (32 MiB at D = 2048).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ood.detectors.base import Detector, Range
from ood.detectors.logits import head_logits
from ood.detectors.mahalanobis import gram, row_chunks
from ood.features.bank import FeatureBank


def _unit_rows(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.double(), dim=1)


class PNML(Detector):
    """-(normalised pNML regret) of the last layer, from the ID-train feature geometry."""

    name = "pnml"
    reads_head = True
    #: the probabilities' clamp [eps, 1 - eps]: eps >= 0.5 would make it empty
    ranges = {"eps": Range(0, 0.5, open_low=True, open_high=True)}
    min_classes = 2
    float16_features = True

    def __init__(self, eps: float = 1e-12) -> None:
        self.eps = eps

    def fit(self, bank: FeatureBank) -> PNML:
        xtx = sum(gram(_unit_rows(bank.features[rows])).to(bank.features.device) for rows in row_chunks(len(bank)))
        self.projector_ = torch.linalg.pinv(xtx, hermitian=True)
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        projector = self.projector_.to(bank.features.device)
        out = []
        for rows in row_chunks(len(bank)):
            z = _unit_rows(bank.features[rows])
            p = torch.softmax(head_logits(z, bank), dim=1).clamp(self.eps, 1 - self.eps)
            quad = ((z @ projector) * z).sum(1)
            kappa = (quad / (1 + quad))[:, None]
            regret = torch.log((p / (p + (1 - p) * p**kappa)).sum(1)) / math.log(p.shape[1])
            out.append(-regret)
        return torch.cat(out)
