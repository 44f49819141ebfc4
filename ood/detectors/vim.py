"""ViM and its residual-only score: distances of the feature to the principal subspace of the ID features.

- ViM (Virtual-logit Matching), Wang et al., CVPR 2022 (arXiv 2203.10807), as OpenOOD's `vim` postprocessor:
  score(x) = LSE(f) - alpha * || (h - u) P_perp ||, with u = -W^+ b (the origin of the logit space in feature
  space), P_perp the eigenvectors of the (uncentred) covariance of the train features h - u beyond the top `dim`,
  and alpha = mean_train max_c f_c / mean_train ||(h - u) P_perp||.
- Residual, the ViM paper's residual-only ablation, as OpenOOD's `residual` postprocessor
  (openood/postprocessors/residual_postprocessor.py): score(x) = -|| (h - u) P_perp ||, the principal space fitted
  on ID-val features (OpenOOD's choice: its `setup` reads the `val` loader). No tuning grid (OpenOOD has none).

`dim` is a count, or a fraction of the feature dimension D (`ood.detectors.base.relative_count`). ViM's grid is
OpenOOD's {256, 1000} written relative to ImageNet's ResNet-50, D = 2048: {D/8, D/2} (256 and 1024 there; on
CIFAR's D = 512 the points are 64 and 256, OpenOOD's one applicable point 256 = D/2 included; on the digits
SmallCNN, D = 64, 8 and 32), so every backbone is tuned and none is skipped. Deviations from vim.yml: its point
1000 is 1024 at D = 2048 (an ImageNet ResNet-50 run searches {256, 1024}); the default (`detectors.tune=false`) is
the paper's D/2, not the yml's `dim: 256` (D/8 there), both of them grid points, so a tuned run is unaffected.
Residual's default is OpenOOD's dim = 512 at D = 2048, i.e. D/4.
Applicability: the principal space must be smaller than the feature space (dim < D). With dim >= D the residual
is empty (OpenOOD then divides by zero), so the detector raises `DetectorNotApplicable` and the run skips it
with that reason; during tuning, grid points with dim >= D are dropped.
Deviations: `eigh` on the symmetric covariance in float64 (OpenOOD: `np.linalg.eig`, float32), the residual
projections in float32 (relative error ~1e-6, no cancellation), one eigendecomposition shared by every `dim` of
the grid (alpha is computed per dim from the kept train features); covariance and residuals chunk by chunk
(`ood.detectors.mahalanobis.row_chunks`), so float16 or ImageNet-sized banks are never copied whole.
State: u and the D x D eigenvectors (float64, 32 MiB at D = 2048); ViM also a reference to the fit bank (no copy).
"""

from __future__ import annotations

import torch

from ood.detectors.base import POSITIVE, Detector, DetectorNotApplicable, relative_count
from ood.detectors.logits import energy_score
from ood.detectors.mahalanobis import centred_gram, row_chunks
from ood.features.bank import FeatureBank


class _PrincipalSpace(Detector):
    """Shared fit: u = -W^+ b and the eigenvectors of the uncentred covariance of h - u, by decreasing eigenvalue."""

    float16_features = True
    reads_head = True
    score_params = frozenset({"dim"})
    relative_counts = frozenset({"dim"})

    def __init__(self, dim: float = 0.5) -> None:
        self.dim = dim

    def fit(self, bank: FeatureBank) -> _PrincipalSpace:
        self._check(bank.features.shape[1])
        w, b = bank.head()
        self.u_ = -torch.linalg.pinv(w.double()) @ b.double()
        zeros = torch.zeros(len(bank), dtype=torch.long, device=bank.features.device)
        _, vecs = torch.linalg.eigh(centred_gram(bank.features, zeros, self.u_[None].to(bank.features.device)) / len(bank))
        self.eigvecs_ = vecs.flip(1)  # columns by decreasing eigenvalue
        return self

    def _kept(self, feature_dim: int) -> int:
        """`dim` as a count of principal directions for features of dimension `feature_dim`."""
        return relative_count(self.dim, feature_dim)

    def _check(self, feature_dim: int) -> None:
        if self._kept(feature_dim) >= feature_dim:
            raise DetectorNotApplicable(
                f"{self.name} needs dim < feature dim D={feature_dim}, got dim={self.dim}; "
                f"set e.g. detectors.params.{self.name}.dim=0.5 (D/2, the ViM paper's choice)"
            )

    def _residual_norm(self, features: torch.Tensor) -> torch.Tensor:
        """||(h - u) P_perp||, the projection in float32 (a norm of a projection: no cancellation to protect)."""
        kept = self._kept(features.shape[1])
        u, vecs = self.u_.to(features.device).float(), self.eigvecs_[:, kept:].to(features.device).float().contiguous()
        norms = [torch.linalg.vector_norm((features[rows].float() - u) @ vecs, dim=1) for rows in row_chunks(len(features))]
        return torch.cat(norms).double()


class ViM(_PrincipalSpace):
    """LSE(f) - alpha * norm of the feature residual outside the principal subspace."""

    name = "vim"
    ranges = {"dim": POSITIVE}
    grid = {"dim": [0.125, 0.5]}

    def fit(self, bank: FeatureBank) -> ViM:
        super().fit(bank)
        self.train_ = bank.features
        # max in the bank's dtype (exact), chunk by chunk: no float64 copy of ImageNet's 1.28 M x 1000 train logits
        max_logits = torch.cat([bank.logits[rows].max(1).values for rows in row_chunks(len(bank))])
        self.max_logit_mean_ = float(max_logits.double().mean())
        self.alpha_: dict[int, float] = {}
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        self._check(bank.features.shape[1])
        kept = self._kept(bank.features.shape[1])
        if kept not in self.alpha_:
            self.alpha_[kept] = self.max_logit_mean_ / float(self._residual_norm(self.train_).mean())
        return energy_score(bank.logits) - self.alpha_[kept] * self._residual_norm(bank.features)


class Residual(_PrincipalSpace):
    """-norm of the feature residual outside the principal subspace of the ID-val features."""

    name = "residual"
    ranges = {"dim": POSITIVE}
    fit_split = "val"

    def __init__(self, dim: float = 0.25) -> None:
        super().__init__(dim)

    def score(self, bank: FeatureBank) -> torch.Tensor:
        self._check(bank.features.shape[1])
        return -self._residual_norm(bank.features)
