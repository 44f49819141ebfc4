"""OptFS: Zhao, Xu, Gupta, Asthana, Zheng & Gould, "Towards Optimal Feature-Shaping Methods for Out-of-Distribution
Detection", ICLR 2024 (arXiv 2402.00865; code github.com/Qinyu-Allen-Zhao/OptFSOOD, `detector/ours.py` `Ours`, run by
`eval_ood.py -d ours`). A piecewise-constant shaping of each penultimate activation, fitted in closed form on ID data.

Fit, on the ID-train features h [N, D] and the network's predicted classes y_n = argmax_c f_c (not the labels: the
code's `get_feature_train`):
  a, b = the 1e-3 and 1 - 1e-3 quantiles of all N D values (`np.quantile`, linear), width = (b - a) / 100,
  left edges e = np.arange(a, b, width): 100 edges, or 101 where np.arange's length ceil((b - a) / width), computed
  in the quantiles' dtype (float32 for a float32 bank: a, b and the width are NumPy float32 scalars), rounds above 100
  (about 6% of random float32 (a, b) pairs; e.g. a = 0, b = 3.3125); then a last interval [e_100, e_100 + width)
  reaches above b. Kept as the code makes them under the project's NumPy >= 2 (NEP 50 keeps float32 / 100.0 a
  float32; NumPy 1.x, the code's 2024 release, made the width a float64 scalar, the edges then differing at float32
  rounding);
  I_i = (1/N) sum_n sum_d w_{y_n, d} h_nd [e_i <= h_nd < e_i + width], theta = I / ||I||_2 * 1000.
Score: h'_d = h_d theta_i for the interval i holding h_d, 0 for a value outside every interval (below a, or at or
above the last e_i + width: dropped, as the code drops it); `ood_score`:
  - "vanilla" (the default of eval_ood.py's `-o`, "Ours (V)" of the code's README): sum_d w_{y, d} h'_d, y the
    predicted class, no bias;
  - "energy" (`-o energy`, the README's energy variant): LSE(W h' + b).
No grid: the code fixes the quantiles, the 100 intervals and the score; the README names both scores, so either is
a fixed choice (`detectors.params.optfs.ood_score=energy`).

Deviations from the released code:
- float64 sums and scores (the code's are float32): equal to rounding.
- the 100 (or 101) interval masks become two `searchsorted`s per value, against the left edges and the right edges
  e_i + width (computed as the code does, in float64): the same intervals, bit for bit, a value in the overlap of
  two intervals (where e_i + width rounds above e_{i+1}) counted in both as the masks count it. The comparisons are in
  float64 at fit and score; the code's `postprocess` compares its float32 torch features with the edges rounded to
  float32, so a test value within a float32 rounding of an edge may fall in the neighbouring interval there.
- the predicted class is the argmax of the logits (the code's: of their float32 softmax, the same class but where
  rounding ties two probabilities).
- left out: the "dynamic weight" fit (the appendix's, off in the code: `dynamic_weight = False`), the "ratio of changed
  weights" diagnostic (printed only, on 10000 sampled train rows; theta does not depend on it) and the stored-npz
  cache. The code's `scripts/example_imagenet_rn50.sh` runs `-d optact`, which its `get_ood_detector` does not know
  (it raises); `-d ours` is this method.
Memory: the quantiles go through one float32 copy of the train features at a time (each `np.quantile` call
partitions its own; a float16 or bfloat16 bank is widened to float32 first, one more copy, as NumPy has no bfloat16),
never a float64 one; never an [N, D, 100] mask: theta's sums go through the bank `SEARCH_CHUNK` rows at a time
(index_add_ adds in row order on CPU, so the chunk size does not change them), the scores `CHUNK` rows at a time in
float64 with their interval search `SEARCH_CHUNK` rows at a time (a few 64 MiB temporaries, not a few GiB).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch

from ood.detectors.base import Detector, DetectorNotApplicable
from ood.detectors.logits import energy_score, head_logits
from ood.detectors.mahalanobis import row_chunks
from ood.features.bank import FeatureBank

#: the code's lower quantile of all ID-train activations (the upper one is 1 - QUANTILE)
QUANTILE = 1e-3
#: the code's number of intervals between the quantiles
INTERVALS = 100
#: rows per interval search (theta's fit and the scores' factors): 4096 x 2048 int64 = 64 MiB per temporary
SEARCH_CHUNK = 4096


def intervals_of(values: torch.Tensor, lefts: torch.Tensor, rights: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(interval index, mask) pairs, one per overlap depth: entry v of `values` lies in every interval i with
    lefts_i <= v < rights_i, i.e. lo <= i < hi (hi = #lefts <= v, lo = #rights <= v; both edge lists increase), one
    interval but where two overlap; a value in none is in no pair's mask. hi - lo counts v's intervals, so the
    deepest overlap is known after the two searches (one pass each, not one per depth tried)."""
    values = values.contiguous()  # searchsorted copies a strided input (a user's transposed bank) with a warning
    hi = torch.searchsorted(lefts, values, right=True)
    count = hi - torch.searchsorted(rights, values, right=True)
    for depth in range(1, int(count.max()) + 1 if count.numel() else 1):
        yield (hi - depth).clamp_min(0), count >= depth


def shaping_factors(h: torch.Tensor, lefts: torch.Tensor, rights: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """theta of each entry's interval (summed over the intervals holding it, 0 in none), [N, D] as `h`; the interval
    search runs `SEARCH_CHUNK` rows at a time, its int64 temporaries a few of that size, not of `h`'s."""
    factor = torch.zeros_like(h)
    for rows in row_chunks(len(h), SEARCH_CHUNK):
        for index, mask in intervals_of(h[rows], lefts, rights):
            factor[rows] += torch.where(mask, theta[index], 0.0)
    return factor


class OptFS(Detector):
    """sum_d w_{y,d} h_d theta(h_d) (or LSE(W h' + b)), theta piecewise constant over 100 intervals, fitted on ID train."""

    name = "optfs"
    reads_head = True
    float16_features = True
    score_params = frozenset({"ood_score"})

    def __init__(self, ood_score: Literal["vanilla", "energy"] = "vanilla") -> None:
        self.ood_score = ood_score

    def fit(self, bank: FeatureBank) -> OptFS:
        values = bank.features.detach().cpu()
        values = values if values.dtype in (torch.float32, torch.float64) else values.float()
        flat = values.numpy().reshape(-1)
        # two scalar calls, as the code: one call with both quantiles rounds the upper one otherwise (float64 result)
        left, right = np.quantile(flat, QUANTILE), np.quantile(flat, 1 - QUANTILE)
        width = (right - left) / float(INTERVALS)  # in the features' dtype, as the code under NumPy >= 2 (NEP 50)
        if not width > 0:
            raise DetectorNotApplicable(f"optfs: the {QUANTILE:g} and {1 - QUANTILE:g} quantiles of the ID-train activations are "
                                        f"equal ({float(left):g}): no interval to shape")
        edges = np.arange(left, right, width)
        device = bank.features.device
        self.lefts_ = torch.from_numpy(edges).to(device)
        self.rights_ = torch.from_numpy(edges + np.float64(width)).to(device)
        w = bank.head()[0].double()
        sums = torch.zeros(len(edges), dtype=torch.float64, device=device)
        for rows in row_chunks(len(bank), SEARCH_CHUNK):  # index_add_ sums in row order: the same sums for any chunk
            h = bank.features[rows].double()
            contribution = w[bank.logits[rows].argmax(1)] * h
            for index, mask in intervals_of(h, self.lefts_, self.rights_):
                sums.index_add_(0, index[mask], contribution[mask])
        mean = sums / len(bank)
        norm = torch.linalg.vector_norm(mean)
        if not norm > 0:
            raise DetectorNotApplicable("optfs: every interval's mean contribution w_y h of the ID-train activations is 0: theta is undefined")
        self.theta_ = mean / norm * 1000
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        device = bank.features.device
        lefts, rights, theta = self.lefts_.to(device), self.rights_.to(device), self.theta_.to(device)
        w = bank.head()[0].double()
        out = []
        for rows in row_chunks(len(bank)):
            h = bank.features[rows].double()
            shaped = h * shaping_factors(h, lefts, rights, theta)
            if self.ood_score == "energy":
                out.append(energy_score(head_logits(shaped, bank)))
            else:
                out.append((w[bank.logits[rows].argmax(1)] * shaped).sum(1))
        return torch.cat(out)
