"""Gaussian mixture density on penultimate features, a classic density baseline (no single paper, no arXiv id),
as OpenOOD's `gmm` postprocessor (openood/postprocessors/gmm_postprocessor.py).

Fit (ID train): V, the top `reduce_dim` principal directions of the train features (OpenOOD's `pca_50`:
sklearn PCA components; the features are projected without centring, x = V^T h), then scikit-learn's
`GaussianMixture(n_components=num_clusters, covariance_type="tied", random_state=0)` on x. Score:
    score(h) = log sum_k pi_k exp(-(x - m_k)^T P (x - m_k) / 2),
the log mixture density up to its constant (the tied covariance's normaliser is shared by every component).
OpenOOD's configuration lists three layers with weights (0, 0, 1); only the last one counts, (50 clusters, flat
features, pca_50): that is the default here, applied to the cached penultimate features (the position of that
layer in OpenOOD's feature list is a network block; the cache has the penultimate features). No tuning grid.
pytorch-ood's `GMM` differs: one Gaussian per class with its own covariance, scored by the smallest Mahalanobis
distance / D; OpenOOD's mixture is followed here.
Deviations: the principal directions from the chunked float64 covariance (`eigh`) instead of sklearn's SVD
of the whole bank (same subspace, signs free; the mixture is fitted on the same data up to reflections); with
reduce_dim >= D no reduction (OpenOOD's `none`); log-sum-exp in float64 instead of log(sum exp + 1e-45) in
float32 (no underflow ties).
Memory: the projection chunk by chunk; the mixture is fitted on the N x reduce_dim float64 projection (512 MiB
for 1.28 M x 50); state D x reduce_dim + K x reduce_dim + reduce_dim^2 floats.
"""

from __future__ import annotations

import torch

from ood.detectors.base import COUNT, POSITIVE, Detector, DetectorNotApplicable
from ood.detectors.mahalanobis import centred_gram, class_means, mahalanobis_sq, row_chunks
from ood.features.bank import FeatureBank


class GMM(Detector):
    """Log density (up to a constant) of a tied-covariance Gaussian mixture on PCA-reduced features."""

    name = "gmm"
    ranges = {"num_clusters": COUNT, "reduce_dim": POSITIVE}
    float16_features = True

    def __init__(self, num_clusters: int = 50, reduce_dim: int = 50, seed: int = 0) -> None:
        self.num_clusters = num_clusters
        self.reduce_dim = reduce_dim
        self.seed = seed

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        basis = self.basis_.to(features.device)
        return torch.cat([features[rows].double() @ basis for rows in row_chunks(len(features))])

    def fit(self, bank: FeatureBank) -> GMM:
        if len(bank) < self.num_clusters:
            raise DetectorNotApplicable(f"gmm needs at least num_clusters={self.num_clusters} fit rows, got {len(bank)}")
        d = bank.features.shape[1]
        if self.reduce_dim >= d:
            self.basis_ = torch.eye(d, dtype=torch.float64)
        else:
            zeros = torch.zeros(len(bank), dtype=torch.long, device=bank.features.device)
            mean = class_means(bank.features, zeros, 1)
            _, vecs = torch.linalg.eigh(centred_gram(bank.features, zeros, mean))
            self.basis_ = vecs[:, -self.reduce_dim :].flip(1).contiguous()
        x = self._project(bank.features).cpu().numpy()
        # imported here: scikit-learn's import was 0.3 s of every entry point's start
        from sklearn.mixture import GaussianMixture

        mixture = GaussianMixture(n_components=self.num_clusters, covariance_type="tied", random_state=self.seed).fit(x)
        self.means_ = torch.from_numpy(mixture.means_)
        self.precision_ = torch.from_numpy(mixture.precisions_)
        self.log_weights_ = torch.from_numpy(mixture.weights_).log()
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        device = bank.features.device
        x = self._project(bank.features)
        md = mahalanobis_sq(x, self.means_.to(device), self.precision_.to(device))
        return torch.logsumexp(self.log_weights_.to(device) - md / 2, dim=1)
