"""CF-OOD, Angiulli et al., SISAP 2025 (no arXiv version; a reverse-nearest-neighbour outlier score on
normalised features), as OpenOOD's `cfood` postprocessor (openood/postprocessors/cfood_postprocessor.py,
configs/postprocessors/cfood.yml).

Fit (ID train): a reference set R of n = alpha N L2-normalised train features (a random subset when alpha < 1)
and, for each r in R and each fraction kappa of the fixed list K (100 values in [0.001, 0.1], 81 in [0.105, 0.5],
49 in [0.51, 0.99]; positions floor(kappa n - 1), duplicates dropped), the squared distance delta_kappa(r) from r
to its (floor(kappa n - 1) + 1)-th nearest neighbour in R (itself excluded).
Score: for a normalised query v, c_kappa(v) = |{r in R : delta_kappa(r) >= ||v - r||^2}| / n (the fraction of
reference points that would count v among their kappa n nearest neighbours); CFOOD(v) is the smallest kappa in
K with c_kappa(v) >= k (1 when none), and the ID score is -CFOOD(v).
Grid: the sweep cfood.yml lists, alpha in {0.1, 0.5, 1} x k in {0.001, 0.005, 0.01, 0.05} (k is score-only: one
pass over R per query chunk gives every k), searched in the yml's order (alpha outer, k fastest: `grid` names k
first). Defaults alpha = 0.1, k = 0.01 (the yml's `postprocessor_args`).
Deviation: OpenOOD v1.5 never searches that sweep: cfood.yml sets `APS_mode: false` (and the postprocessor has no
`args_dict` for its evaluator's search), so its results are at the defaults; here it is tuned on validation OOD like
every detector with a grid (`+detectors.params.cfood.alpha=0.1 +detectors.params.cfood.k=0.01` runs OpenOOD's
setting).
Deviations: the subset is drawn with a seeded generator (`seed`; OpenOOD: the global torch RNG); squared
distances as 2 - 2 <u, v> - (1 - ||u||^2) - (1 - ||v||^2) blocks in float32 (OpenOOD: sum of squared differences,
float32; differences ~1e-7); c_kappa by a per-reference binary search of ||v - r||^2 in the sorted
delta(r) row (`searchsorted`) instead of comparing with every kappa (same counts, klen / log klen fewer
comparisons); normalisation h / (||h|| + 1e-10) as OpenOOD.
Cost and memory: the fit is quadratic in n (n^2 distances, OpenOOD's cost: 1.6 * 10^12 at alpha = 1 on ImageNet,
for a GPU), the score N_query x n. State: the subset's row indices and inverse norms (n int64 + n float64) and the
n x |K| float32 delta table on the bank's device (1.2 GB at n = 1.28 M, |K| <= 230); the train features are read from the bank in
chunks, never copied; peak temporaries ~BLOCK_BYTES per block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ood.detectors.base import Detector, DetectorNotApplicable, Range
from ood.features.bank import FeatureBank, row_slices

#: bytes of the largest float32 distance block (rows x columns) a step holds
BLOCK_BYTES = 1 << 27


def kappa_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenOOD's neighbourhood fractions K and their positions floor(kappa n - 1), duplicate positions dropped."""
    kval = np.concatenate((np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81), np.linspace(0.51, 0.99, 49)))
    kpos = np.array(kval * n - 1, dtype=int)
    keep = np.concatenate(([True], kpos[:-1] < kpos[1:]))
    return kval[keep], kpos[keep]


class CFOOD(Detector):
    """-(smallest neighbourhood fraction kappa at which at least a fraction k of the ID references reach the input)."""

    name = "cfood"
    #: k first: the evaluation's search order (first key fastest) is then cfood.yml's list order
    grid = {"k": [0.001, 0.005, 0.01, 0.05], "alpha": [0.1, 0.5, 1.0]}
    #: fractions: of the train bank kept as references, of the references that must reach an input (k > 1 is never
    #: reached and k <= 0 always is: every input would score alike)
    ranges = {"alpha": Range(0, 1, open_low=True), "k": Range(0, 1, open_low=True)}
    score_params = frozenset({"k"})
    float16_features = True

    def __init__(self, alpha: float = 0.1, k: float = 0.01, seed: int = 0) -> None:
        self.alpha = alpha
        self.k = k
        self.seed = seed

    def _unit(self, features: torch.Tensor) -> torch.Tensor:
        h = features.float()
        return h / (torch.linalg.vector_norm(h, dim=1, keepdim=True) + 1e-10)

    def _reference(self, cols: slice) -> torch.Tensor:
        return self._unit(self.train_[self.index_[cols].to(self.train_.device)])

    def _sq_dist(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2 * a @ b.T).clamp_min(0)

    def fit(self, bank: FeatureBank) -> CFOOD:
        total = len(bank)
        n = int(self.alpha * total) if self.alpha < 1 else total
        if n < 2:
            raise DetectorNotApplicable(f"cfood needs at least 2 reference samples, got alpha * N = {self.alpha} * {total}")
        if self.alpha < 1:
            perm = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed))[:n]
        else:
            perm = torch.arange(total)
        self.train_, self.index_ = bank.features, perm
        self.kval_, kpos = kappa_grid(n)
        positions = torch.from_numpy(kpos + 1)
        rows_per_step = max(1, BLOCK_BYTES // (4 * n))
        cols_per_step = max(1, BLOCK_BYTES // (4 * rows_per_step))
        table = []
        for rows in row_slices(n, rows_per_step):
            a = self._reference(rows)
            dist = torch.cat([self._sq_dist(a, self._reference(cols)) for cols in row_slices(n, cols_per_step)], dim=1)
            table.append(dist.sort(dim=1).values[:, positions.to(dist.device)])
        self.table_ = torch.cat(table).contiguous()  # where the bank is: scoring reads a block of it every step
        return self

    def _reach_counts(self, bank: FeatureBank) -> torch.Tensor:
        """[N, |K|] c_kappa * n: for each query, how many references have delta_kappa(r) >= ||v - r||^2."""
        n, klen = self.table_.shape
        out = []
        rows_per_step = max(1, BLOCK_BYTES // (12 * min(n, 8192)))
        for qrows in row_slices(len(bank), rows_per_step):
            v = self._unit(bank.features[qrows])
            hist = torch.zeros(len(v), klen + 1, dtype=torch.long, device=v.device)
            for cols in row_slices(n, 8192):
                dist = self._sq_dist(v, self._reference(cols).to(v.device))
                # first kappa index with delta_kappa(r) >= dist, per reference r: from there on r counts v
                first = torch.searchsorted(self.table_[cols].to(v.device), dist.T.contiguous())
                hist.scatter_add_(1, first.T, torch.ones_like(first.T))
            out.append(hist[:, :klen].cumsum(1).cpu())
        return torch.cat(out) if out else torch.zeros(0, klen, dtype=torch.long)

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return self.score_grid(bank, [{}])[0]

    def score_grid(self, bank: FeatureBank, points: Sequence[dict[str, Any]]) -> list[torch.Tensor]:
        """The reach counts once; each k of `points` reads its smallest kappa from them."""
        counts = self._reach_counts(bank).double() / self.table_.shape[0]
        kval = torch.from_numpy(np.append(self.kval_, 1.0))
        scores = []
        for point in points:
            self.set_params(**point)
            reached = counts >= self.k
            first = torch.where(reached.any(1), reached.double().argmax(1), len(self.kval_))
            scores.append(-kval[first].to(bank.features.device))
        return scores
