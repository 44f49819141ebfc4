"""ViM (Virtual-logit Matching), Wang et al., CVPR 2022 (arXiv 2203.10807), as OpenOOD's `vim` postprocessor.

score(x) = LSE(f) - alpha * || (h - u) P_perp ||, with u = -W^+ b (the origin of the logit space in feature
space), P_perp the eigenvectors of the (uncentred) covariance of the train features h - u beyond the top `dim`,
and alpha = mean_train max_c f_c / mean_train ||(h - u) P_perp||.
Applicability: the principal space must be smaller than the feature space (dim < D). With dim >= D the residual
is empty (OpenOOD then divides by zero), so the detector raises `DetectorNotApplicable` and the run skips it
with that reason; during tuning, grid points with dim >= D are dropped. OpenOOD's grid {256, 1000} targets
D = 512 / 2048; for smaller backbones (digits SmallCNN, D = 64) pass `dim` explicitly, e.g. the paper's D/2.
Deviations: `eigh` on the symmetric covariance in float64 (OpenOOD: `np.linalg.eig`, float32), the residual
projections in float32 (relative error ~1e-6, no cancellation), one eigendecomposition shared by every `dim` of
the grid (alpha is computed per dim from the kept train features); covariance and residuals chunk by chunk
(`ood.detectors.mahalanobis.row_chunks`), so float16 or ImageNet-sized banks are never copied whole.
"""

from __future__ import annotations

import torch

from ood.detectors.base import Detector, DetectorNotApplicable
from ood.detectors.logits import energy_score
from ood.detectors.mahalanobis import centred_gram, row_chunks
from ood.features.bank import FeatureBank


class ViM(Detector):
    """LSE(f) - alpha * norm of the feature residual outside the principal subspace."""

    name = "vim"
    grid = {"dim": [256, 1000]}
    score_params = frozenset({"dim"})

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim

    def fit(self, bank: FeatureBank) -> ViM:
        self._check(bank.features.shape[1])
        w, b = bank.head()
        self.u_ = -torch.linalg.pinv(w.double()) @ b.double()
        zeros = torch.zeros(len(bank), dtype=torch.long, device=bank.features.device)
        _, vecs = torch.linalg.eigh(centred_gram(bank.features, zeros, self.u_[None].to(bank.features.device)) / len(bank))
        self.eigvecs_ = vecs.flip(1)  # columns by decreasing eigenvalue
        # max in the bank's dtype (exact), chunk by chunk: no float64 copy of ImageNet's 1.28 M x 1000 train logits
        max_logits = torch.cat([bank.logits[rows].max(1).values for rows in row_chunks(len(bank))])
        self.max_logit_mean_ = float(max_logits.double().mean())
        self.train_ = bank.features
        self.alpha_: dict[int, float] = {}
        return self

    def _check(self, feature_dim: int) -> None:
        if self.dim >= feature_dim:
            raise DetectorNotApplicable(
                f"vim needs dim < feature dim D={feature_dim}, got dim={self.dim}; "
                f"set e.g. detectors.params.vim.dim={feature_dim // 2} (the ViM paper's D/2)"
            )

    def _residual_norm(self, features: torch.Tensor) -> torch.Tensor:
        """||(h - u) P_perp||, the projection in float32 (a norm of a projection: no cancellation to protect)."""
        u, vecs = self.u_.to(features.device).float(), self.eigvecs_[:, self.dim :].to(features.device).float().contiguous()
        norms = [torch.linalg.vector_norm((features[rows].float() - u) @ vecs, dim=1) for rows in row_chunks(len(features))]
        return torch.cat(norms).double()

    def score(self, bank: FeatureBank) -> torch.Tensor:
        self._check(bank.features.shape[1])
        if self.dim not in self.alpha_:
            self.alpha_[self.dim] = self.max_logit_mean_ / float(self._residual_norm(self.train_).mean())
        return energy_score(bank.logits) - self.alpha_[self.dim] * self._residual_norm(bank.features)
