"""Deep nearest neighbours, Sun et al., ICML 2022 (arXiv 2204.06507).

score(h) = -|| h_hat - h_hat_(K) ||^2 with h_hat = h / ||h||, h_hat_(K) the K-th nearest L2-normalised
ID-train feature (exact faiss search through `ood.knn`). OpenOOD negates the (non-squared) distance;
squaring is monotone, so AUROC/FPR are identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ood.detectors.base import Detector
from ood.evaluation.bank import FeatureBank
from ood.knn import IndexKind, KNNIndex


class KNN(Detector):
    """-(squared distance to the K-th nearest normalised train feature)."""

    name = "knn"
    grid = {"k": [50, 100, 200, 500, 1000]}

    def __init__(self, k: int = 50, index: IndexKind = "exact") -> None:
        self.k = k
        self.index = index

    def fit(self, bank: FeatureBank) -> KNN:
        self.index_ = KNNIndex("l2", kind=self.index, device=bank.features.device).add(F.normalize(bank.features.float(), dim=1))
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        k = min(self.k, self.index_.ntotal)
        dist, _ = self.index_.search(F.normalize(bank.features.float(), dim=1), k)
        return -dist[:, -1].double()
