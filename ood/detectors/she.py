"""SHE (Simplified Hopfield Energy), Zhang et al., "Out-of-Distribution Detection based on In-Distribution
Data Patterns Memorization with Modern Hopfield Energy", ICLR 2023 (OpenReview KkazG4lgKL; no arXiv version).

score(h) = <h, m_yhat>, with m_c the mean penultimate feature of the correctly classified train samples of
class c and yhat the predicted class; OpenOOD's `she` with its default `metric: inner_product`.
A class without a correctly classified train sample gets a zero pattern (score 0 for inputs predicted as it).
"""

from __future__ import annotations

import torch

from ood.detectors.base import Detector
from ood.detectors.mahalanobis import class_means
from ood.features.bank import FeatureBank


class SHE(Detector):
    """Inner product of h with the stored pattern of the predicted class."""

    name = "she"
    per_class = True

    def fit(self, bank: FeatureBank) -> SHE:
        assert bank.labels is not None, "she needs labelled ID-train features"
        correct = bank.predictions == bank.labels
        self.patterns_ = class_means(bank.features[correct], bank.labels[correct], bank.logits.shape[1])
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        patterns = self.patterns_.to(bank.features.device)
        return (bank.features.double() * patterns[bank.predictions]).sum(1)
