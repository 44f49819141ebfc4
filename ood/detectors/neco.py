"""NECO, Ammar et al., "NECO: NEural Collapse Based Out-of-distribution detection", ICLR 2024 (arXiv 2310.06823).
Reference code: the authors' (gitlab.com/drti/neco, `StandardScaler` then sklearn `PCA` on the train features) and
pytorch-ood `detector/neco.py` (a transcription of it). Not in OpenOOD.

With z = (h - m) / s the train-standardised feature (per-dimension train mean m and std s, ddof 0; a dimension
without variance keeps s = 1, as sklearn), mu_z the train mean of z (0 up to rounding) and P_d the top-d principal
directions of the train z (eigenvectors of their covariance by decreasing eigenvalue):
    score(x) = || P_d^T (z - mu_z) ||_2 / || z ||_2                     (ResNet form, the paper's CNN results)
    score(x) = || P_d^T (z - mu_z) ||_2 / || z ||_2 * max_c f_c(x)      (`use_max_logit=True`: its ViT/Swin form)
ID features lie in the low-dimensional span of the collapsed class means, so the ratio is high for ID. `dim`: a
count d, or a fraction of D in (0, 1) (d = round(dim * D), at least 1), so one grid fits every backbone: the grid
is fractions 1/64 ... 1/2 (D = 2048: 32 ... 1024, bracketing pytorch-ood's absolute {16 ... 768} for D = 768;
digits' D = 64: 1 ... 32), crossed with `use_max_logit` (the reference picks it by architecture; here validation
picks it). d >= D keeps the whole space (ratio 1 up to centring): `DetectorNotApplicable`. Defaults (used untuned):
dim = D/8 for the reference's d = 100 (0.13 D at its D = 768) and use_max_logit False, the reference's CNN form
(pytorch-ood's default is True, its ViT form).
Deviations: the covariance is accumulated in float64 chunks and eigendecomposed with `eigh` (sklearn's full SVD of
the centred data: same subspace); no `standardize=False` variant (the reference always standardises CNN features).
State: m, s, mu_z (D) and the D x D eigenvectors (float64, 32 MB at D = 2048); fit and score read the bank in row
chunks (`row_chunks`), working memory one float64 chunk (scores: N x grid points); a float16 bank is widened one
chunk at a time, never copied whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ood.detectors.base import POSITIVE, Detector, DetectorNotApplicable, relative_count
from ood.detectors.mahalanobis import centred_gram, class_means, row_chunks
from ood.features.bank import FeatureBank


class NECO(Detector):
    """Share of the standardised feature's norm inside the top principal subspace of the train features."""

    name = "neco"
    float16_features = True
    ranges = {"dim": POSITIVE}
    grid = {"dim": [1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2], "use_max_logit": [False, True]}
    score_params = frozenset({"dim", "use_max_logit"})
    relative_counts = frozenset({"dim"})

    def __init__(self, dim: float = 1 / 8, use_max_logit: bool = False) -> None:
        self.dim = dim
        self.use_max_logit = use_max_logit

    def fit(self, bank: FeatureBank) -> NECO:
        features, n = bank.features, len(bank)
        zeros = torch.zeros(n, dtype=torch.long, device=features.device)
        self.mean_ = class_means(features, zeros, 1)[0]
        var = centred_gram(features, zeros, self.mean_[None]).diagonal() / n
        std = var.sqrt()
        self.std_ = torch.where(std > 1e-12, std, torch.ones_like(std))
        self.z_mean_ = sum((self._standardised(features[rows]).sum(0) for rows in row_chunks(n)), torch.zeros_like(self.mean_))
        self.z_mean_ = self.z_mean_ / max(n, 1)
        cov = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64, device=features.device)
        for rows in row_chunks(n):
            z = self._standardised(features[rows]) - self.z_mean_
            cov += z.T @ z
        _, vecs = torch.linalg.eigh(cov)
        self.components_ = vecs.flip(1)  # columns by decreasing eigenvalue
        return self

    def _standardised(self, h: torch.Tensor) -> torch.Tensor:
        return (h.double() - self.mean_.to(h.device)) / self.std_.to(h.device)

    def _dim(self, feature_dim: int) -> int:
        d = relative_count(self.dim, feature_dim)
        if d >= feature_dim:
            raise DetectorNotApplicable(f"neco needs dim < feature dim D={feature_dim}, got {self.dim} (d={d}); "
                                        f"pass a fraction of D, e.g. detectors.params.neco.dim=0.125")
        return d

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return self.score_grid(bank, [{}])[0]

    def score_grid(self, bank: FeatureBank, points: Sequence[dict[str, Any]]) -> list[torch.Tensor]:
        """One standardisation per row chunk; each subspace size d of the grid its own projection, so that a point's
        scores are bit for bit those `score` gives at it alone (the first d columns of a projection onto more
        directions round differently, ~1e-16: tuning and `detectors.sensitivity` compare a fixed run's numbers)."""
        feature_dim = bank.features.shape[1]
        dims = [self.set_params(**p)._dim(feature_dim) for p in points]
        tops = {d: self.components_[:, :d].to(bank.features.device) for d in dict.fromkeys(dims)}
        sq: dict[int, list[torch.Tensor]] = {d: [] for d in tops}
        norms, max_logit = [], []
        for rows in row_chunks(len(bank)):
            z = self._standardised(bank.features[rows])
            centred = z - self.z_mean_.to(z.device)
            for d, top in tops.items():  # squared norm of the projection on the first d directions
                sq[d].append((centred @ top).square().cumsum(1)[:, -1])
            norms.append(torch.linalg.vector_norm(z, dim=1).clamp_min(1e-300))
            max_logit.append(bank.logits[rows].double().max(1).values)
        norm, logit = torch.cat(norms), torch.cat(max_logit)
        cum_sq = torch.stack([torch.cat(sq[d]) for d in dims], 1)
        scores = []
        for i, point in enumerate(points):
            self.set_params(**point)
            ratio = cum_sq[:, i].sqrt() / norm
            scores.append(ratio * logit if self.use_max_logit else ratio)
        return scores
