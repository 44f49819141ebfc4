"""KL matching (KLM), Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings",
ICML 2022 (arXiv 1911.11132).

score(x) = -min_c KL(p(x) || p_bar_c), with p_bar_c the mean softmax of the ID-val samples predicted as c
(OpenOOD's `klm` postprocessor, which fits on ID-val; the paper used a held-out ID set the same way).
Classes that no ID-val sample is predicted as have no template and are left out of the minimum.
Deviation: float64, KL as sum p (log p - log p_bar) with log-softmax, so p = 0 terms contribute 0 exactly.
"""

from __future__ import annotations

import torch

from ood.detectors.base import Detector
from ood.features.bank import FeatureBank


class KLM(Detector):
    """-min_c KL(p || mean softmax of ID-val samples predicted c)."""

    name = "klm"
    reads_features = False
    min_classes = 2
    float16_features = True
    fit_split = "val"

    def fit(self, bank: FeatureBank) -> KLM:
        p = torch.softmax(bank.logits.double(), dim=1)
        pred = p.argmax(1)
        present = torch.unique(pred)
        self.templates_ = torch.stack([p[pred == c].mean(0) for c in present.tolist()])
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        logp = torch.log_softmax(bank.logits.double(), dim=1)
        templates = self.templates_.to(logp.device)
        # KL(p || q_c) = sum p log p - sum p log q_c, for all templates at once
        kl = (logp.exp() * logp).sum(1, keepdim=True) - logp.exp() @ templates.clamp_min(1e-300).log().T
        return -kl.min(1).values
