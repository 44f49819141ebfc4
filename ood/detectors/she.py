"""SHE (Simplified Hopfield Energy), Zhang et al., "Out-of-Distribution Detection based on In-Distribution
Data Patterns Memorization with Modern Hopfield Energy", ICLR 2023 (OpenReview KkazG4lgKL; no arXiv version).

score(h) = <h, m_yhat>, with m_c the mean penultimate feature of the correctly classified train samples of
class c and yhat the predicted class; OpenOOD's `she` with its default `metric: inner_product`.
A class without a correctly classified train sample gets a zero pattern (score 0 for inputs predicted as it).
Memory: fit and score go through the bank in row chunks (`row_chunks`; the misclassified train rows are summed into
a class of their own and dropped, not copied out), so a float16 bank is widened one chunk at a time.
"""

from __future__ import annotations

import torch

from ood.detectors.base import Detector
from ood.detectors.mahalanobis import class_means, row_chunks
from ood.features.bank import FeatureBank


class SHE(Detector):
    """Inner product of h with the stored pattern of the predicted class."""

    name = "she"
    per_class = True
    float16_features = True

    def fit(self, bank: FeatureBank) -> SHE:
        assert bank.labels is not None, "she needs labelled ID-train features"
        classes = bank.logits.shape[1]
        # misclassified rows go to an extra class C, dropped: each class sums its correct rows in row order, as a
        # mean of the selected rows does, without copying them out of the bank
        kept = torch.where(bank.predictions == bank.labels, bank.labels, classes)
        self.patterns_ = class_means(bank.features, kept, classes + 1)[:classes]
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        patterns = self.patterns_.to(bank.features.device)
        return torch.cat([(bank.features[rows].double() * patterns[bank.logits[rows].argmax(1)]).sum(1)
                          for rows in row_chunks(len(bank))])
