"""Neural Relation Graph, Kim et al., "Neural Relation Graph: A Unified Framework for Identifying Label Noise and
Outlier Data", NeurIPS 2023 (arXiv 2301.12321), as OpenOOD's `relation` postprocessor
(openood/postprocessors/relation_postprocessor.py, itself from snu-mllab/Neural-Relation-Graph).

The relation of a sample x to an ID-train sample j is r_j(x) = max(<h_hat, h_hat_j>, 0) * <p, p_j>, with
h_hat = h / sqrt(||h||^2 + 1e-10) and p = softmax(f); edges with r_j <= 0.03 are cut, and
score(x) = sum_j r_j(x)^pow over the kept edges (OpenOOD's `sign(r) |r|^pow`; r >= 0 here). Grid: OpenOOD's
pow in {1, 2, 4, 6, 8}, a score-only parameter: tuning computes every relation once and reads all powers from it.
Deviations: relations in float32 blocks as OpenOOD, accumulated in float64; the train bank is read in row chunks
(normalised and softmaxed per chunk), never copied.
Cost and memory: N_query x N_train relations (OpenOOD's cost; 64 k x 1.28 M on ImageNet is ~10^14 flops, for
a GPU). State: a reference to the train bank, nothing copied; peak extra memory is a few QUERY_BLOCK x
TRAIN_BLOCK temporaries (128 MiB float32, 256 MiB float64 each), the normalised query block (QUERY_BLOCK x D) and
the N_query x len(grid) float64 sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ood.detectors.base import POSITIVE, Detector
from ood.features.bank import FeatureBank, row_slices

#: rows of the query bank per block, and rows of the train bank per chunk inside a block
QUERY_BLOCK, TRAIN_BLOCK = 8192, 4096
#: OpenOOD's cut-off for small relation edges
THRESHOLD = 0.03


def _normalised_and_probs(bank: FeatureBank, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """h / sqrt(||h||^2 + 1e-10) and softmax(f) of `rows`, float32 (OpenOOD's `normalize`)."""
    h = bank.features[rows].float()
    return h / (h.square().sum(1, keepdim=True) + 1e-10).sqrt(), torch.softmax(bank.logits[rows].float(), dim=1)


class Relation(Detector):
    """Sum over ID-train samples of (feature cosine clipped at 0) x (softmax inner product), small edges cut."""

    name = "relation"
    grid = {"pow": [1, 2, 4, 6, 8]}
    ranges = {"pow": POSITIVE}
    score_params = frozenset({"pow"})
    float16_features = True

    def __init__(self, pow: float = 1) -> None:  # noqa: A002 - OpenOOD's name
        self.pow = pow

    def fit(self, bank: FeatureBank) -> Relation:
        self.train_ = bank
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return self.score_grid(bank, [{}])[0]

    def score_grid(self, bank: FeatureBank, points: Sequence[dict[str, Any]]) -> list[torch.Tensor]:
        """Every relation once; each `pow` of `points` summed from the same kept edges."""
        powers = []
        for point in points:
            self.set_params(**point)
            powers.append(self.pow)
        out = torch.zeros(len(bank), len(powers), dtype=torch.float64)
        train = self.train_
        for qrows in row_slices(len(bank), QUERY_BLOCK):
            q_feat, q_prob = _normalised_and_probs(bank, qrows)
            for trows in row_slices(len(train), TRAIN_BLOCK):
                t_feat, t_prob = _normalised_and_probs(train, trows)
                t_feat, t_prob = t_feat.to(q_feat.device), t_prob.to(q_feat.device)
                rel = (q_feat @ t_feat.T).clamp_min(0) * (q_prob @ t_prob.T)
                rel = torch.where(rel > THRESHOLD, rel, 0.0).double()  # r >= 0: OpenOOD's |r| > t and sign(r)|r|^p
                for i, p in enumerate(powers):
                    out[qrows, i] += (rel**p).sum(1).cpu()
        return list(out.to(bank.features.device).unbind(1))
