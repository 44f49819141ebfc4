"""Nearest-neighbour detectors on L2-normalised penultimate features (faiss search through `ood.neighbors`). The index
is exact by default, as OpenOOD's `IndexFlatL2` at every size; `index="ivf"` (IVF-Flat, nprobe 8) or `"auto"` (exact
below 200 k bank rows, IVF-Flat above, e.g. on ImageNet-1K's 1.28 M) trade accuracy for search time on a CPU: on
200 k x 64 clustered unit vectors, IVF's K-th distance was 3 % off at K = 50 and 7 % (up to 58 %) at K = 1000, where
AUROC fell from 97.7 to 96.6 % and FPR95 rose from 10 to 19 % (knn's grid reaches K = 1000). The bank is
normalised and added chunk by chunk (float16 banks too), and a scored bank is normalised and searched chunk by chunk.

- Deep nearest neighbours (KNN), Sun et al., ICML 2022 (arXiv 2204.06507):
  score(h) = -|| h_hat - h_hat_(K) ||^2, h_hat = h / ||h||, h_hat_(K) the K-th nearest normalised ID-train
  feature, as OpenOOD (faiss squared L2 on normalised features, negated).
  Tuning searches once at the largest K of the grid and reads every K from that one result.
- NNGuide, Park et al., "Nearest Neighbor Guidance for Out-of-Distribution Detection", ICCV 2023
  (arXiv 2309.14888), OpenOOD's `nnguide`: guide bank g_j = h_hat_j * LSE(f_j) over the first `alpha` fraction
  of the train bank, drawn at random; score(x) = LSE(f(x)) * mean of the top-K inner products <h_hat(x), g_j>.
  The guide rows are a uniformly random subset, as the authors' code (roomo7time/nnguide,
  `dataloaders/datasets_large.py`: `subsample` shuffles the bank set before keeping its first alpha N) and OpenOOD
  (the first batches of its shuffled train loader); the bank's own first rows would be a few classes only where
  the train split is stored class by class (ImageFolder, ImageNet: 1 % is its first 10 classes).
  Deviations: K is clipped to the guide-bank size (on small benchmarks alpha * N_train < K); the guide bank is
  exactly round(alpha * N_train) rows, where OpenOOD keeps whole loader batches until it has more than
  int(alpha * N_train) (CIFAR-10 with its train batch of 200: 600 rows, here 500); the draw is seeded (`seed`,
  as cfood's subset), so a run's guide bank does not depend on the global random state. Memory: scored `CHUNK`
  rows at a time (`row_chunks`: normalised in float32 and searched chunk by chunk), so a float16 bank is never
  copied whole; the fit widens only the guide rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ood.detectors.base import COUNT, Detector, Range
from ood.detectors.logits import energy_score
from ood.detectors.mahalanobis import row_chunks
from ood.features.bank import FeatureBank
from ood.neighbors import IndexKind, KNNIndex
from ood.utils import get_logger

log = get_logger(__name__)


def _normalised(bank: FeatureBank) -> torch.Tensor:
    return F.normalize(bank.features.float(), dim=1)


def normalised_distances(index: KNNIndex, features: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k] float32 distances of the L2-normalised rows of `features` to their `k` nearest rows of `index`, nearest
    first: normalised in float32 and searched `CHUNK` rows at a time (`row_chunks`), so that a scored bank (float16
    too) is never copied whole, only its distances are kept."""
    out = torch.empty(len(features), k, dtype=torch.float32, device=features.device)
    for rows in row_chunks(len(features)):
        out[rows] = index.search(F.normalize(features[rows].float(), dim=1), k)[0]
    return out


class KNN(Detector):
    """-(squared distance to the K-th nearest normalised train feature)."""

    name = "knn"
    ranges = {"k": COUNT}
    float16_features = True
    grid = {"k": [50, 100, 200, 500, 1000]}
    score_params = frozenset({"k"})

    def __init__(self, k: int = 50, index: IndexKind = "exact") -> None:
        self.k = k
        self.index = index

    def fit(self, bank: FeatureBank) -> KNN:
        normalise = lambda h: F.normalize(h, dim=1)  # noqa: E731
        if self.k > len(bank):
            log.warning("knn: k=%d exceeds the %d train features it searches: it reads the farthest of them, which "
                        "ranks OOD above ID; set detectors.params.knn.k below %d, or fit on more rows "
                        "(data.fit_fraction)", self.k, len(bank), len(bank))
        self.index_ = KNNIndex("l2", kind=self.index, device=bank.features.device).add(bank.features, normalise)
        self.grid_said_ = False
        return self

    def _distances(self, bank: FeatureBank, k: int) -> torch.Tensor:
        return normalised_distances(self.index_, bank.features, min(k, self.index_.ntotal)).double()

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return -self._distances(bank, self.k)[:, -1]

    def score_grid(self, bank: FeatureBank, points: Sequence[dict[str, Any]]) -> list[torch.Tensor | None]:
        """One search at the largest k within the bank; column k-1 is the score at k. A k beyond the bank has no k-th
        neighbour: None (tuning drops it; said once per fit). Where no k fits, the first point alone is scored,
        reading the farthest row as `score` does (its fit said so): every other point would read that same row, tuned
        as if they differed; the run records that one point as untuned (`tune_detector`), its k as the k used."""
        n = self.index_.ntotal
        ks = [p.get("k", self.k) for p in points]
        fits = [k for k in ks if k <= n]
        beyond = sorted({k for k in ks if k > n})
        if fits and beyond and not self.grid_said_:
            log.warning("knn: tuning leaves out k=%s of its grid, beyond the %d train features it searches (a fit on "
                        "fewer rows: data.fit_fraction); it chooses among k=%s", beyond, n, sorted(set(fits)))
        self.grid_said_ = True
        dist = self._distances(bank, max(fits or ks[:1]))
        scores: list[torch.Tensor | None] = []
        for i, point in enumerate(points):
            self.set_params(**point)
            scores.append(-dist[:, min(self.k, n) - 1] if self.k <= n or not fits and i == 0 else None)
        return scores


class NNGuide(Detector):
    """LSE(f) x mean top-K inner product with the confidence-weighted guide bank."""

    name = "nnguide"
    ranges = {"k": COUNT, "alpha": Range(0, 1, open_low=True)}
    float16_features = True
    grid = {"k": [100], "alpha": [0.01]}

    def __init__(self, k: int = 100, alpha: float = 0.01, index: IndexKind = "exact", seed: int = 0) -> None:
        self.k = k
        self.alpha = alpha
        self.index = index
        self.seed = seed

    def fit(self, bank: FeatureBank) -> NNGuide:
        n = max(1, round(self.alpha * len(bank)))
        rows = torch.randperm(len(bank), generator=torch.Generator().manual_seed(self.seed))[:n]
        guide = bank.subset(rows.to(bank.features.device))
        guides = _normalised(guide) * energy_score(guide.logits).float()[:, None]
        self.index_ = KNNIndex("ip", kind=self.index, device=bank.features.device).add(guides)
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        k, out = min(self.k, self.index_.ntotal), []
        for rows in row_chunks(len(bank)):
            sims, _ = self.index_.search(F.normalize(bank.features[rows].float(), dim=1), k)
            out.append(energy_score(bank.logits[rows]) * sims.double().mean(1))
        return torch.cat(out)
