"""DDU: Mukhoti, Kirsch, van Amersfoort, Torr & Gal, "Deep Deterministic Uncertainty: A Simple Baseline", CVPR 2023
(arXiv 2102.11582; code github.com/omegafragger/DDU, `utils/gmm_utils.py` `gmm_fit` / `gmm_evaluate`, scored in
`evaluate.py` by `logsumexp` of `metrics/uncertainty_confidence.py` as a confidence). The post-hoc part: a Gaussian
per ID class, fitted to the ID-train penultimate features and their labels, scored by the log of their unweighted sum:
  mu_c = mean of the class-c rows,  Sigma_c = 1/(n_c - 1) sum_i (h_i - mu_c)(h_i - mu_c)^T   (`centered_cov_torch`),
  score(h) = log sum_c N(h; mu_c, Sigma_c + eps I)                                            (no class prior),
  log N(h; mu, S) = -(D log(2 pi) + ||L^-1 (h - mu)||^2) / 2 - sum_d log L_dd,   S = L L^T (Cholesky),
as torch's `MultivariateNormal.log_prob` computes it. eps is one jitter for every class: the first of the code's
`JITTERS` list (0, the smallest normal float64, then 1e-308, 1e-307, ..., 1e-1) at which every class's Sigma_c + eps I
has a Cholesky factor (where the code's `MultivariateNormal(loc, covariance_matrix)` is built without an error).
The code adds `eps * torch.eye(D)`, a float32 identity, so the jitter added is eps rounded to float32 (1e-10 adds
1.0000000133e-10, every eps below 1.4e-45 adds 0); so is ours (`jitter_` is the value added, `jitter_eps_` the list's
entry). In float64, as the code (its `get_embeddings(..., dtype=torch.double)`): means, covariances, Cholesky factors
and log densities.

The score is a log density of a D-dimensional feature: not comparable across networks, of any sign and scale, and
it can be hugely negative (a feature outside a class's subspace under a tiny jitter): higher = more ID all the same.

Deviations from the released code:
- its `gmm_evaluate` stores the class log densities in float32 before `logsumexp`; ours stay float64.
- the covariances are accumulated over the bank in `CHUNK`-row float64 chunks (the rows of each class in a chunk, less
  their class mean, through `gram`: BLAS `syrk` on CPU) and scaled by 1/(n_c - 1) as the code does, instead of one
  product per class over a float64 copy of the whole bank (the same sums up to rounding); the class means are
  `class_means`' chunked sums (the code's `torch.mean`, up to rounding).
- the jitter search factors the classes one at a time and stops at the first that fails (the code builds every
  class's distribution, then fails), and skips a jitter that leaves every diagonal entry unchanged (the matrices are
  then those that just failed): the same jitter is chosen. The code's constraint check also asks for symmetry to
  1e-6, which these covariances have exactly (syrk; on CUDA, Cholesky reads the lower triangle).
- where no jitter of the list (up to 0.1) works, the code fails (`gmm` unbound); here `DetectorNotApplicable`. So is
  a class with fewer than two fit rows (the code's 1/(n-1) is a division by zero: NaN covariance, no jitter works).
- memory: the C x D x D float64 covariances and their Cholesky factors are held at once (2 C D^2 x 8 bytes at the
  peak of the fit, C D^2 x 8 kept); a network whose C D^2 x 8 exceeds `MAX_COVARIANCE_BYTES` (4 GiB: CIFAR-100 x
  ResNet-18's 512 features take 0.2 GB, 100 classes x 2048 features 3.4 GB; ImageNet-1k x ResNet-50's 2048 features
  would take 33.6 GB) is refused in one line (`DetectorNotApplicable`: the run skips ddu, saying why). Scores go
  through the bank in chunks of `SCORE_CHUNK` rows, one triangular solve per class.
"""

from __future__ import annotations

import math

import torch

from ood.detectors.base import Detector, DetectorNotApplicable
from ood.detectors.mahalanobis import class_means, gram, row_chunks
from ood.features.bank import FeatureBank

#: the released code's jitters (`utils/gmm_utils.py` JITTERS), tried in this order
JITTERS = [0.0, torch.finfo(torch.float64).tiny] + [10.0**exp for exp in range(-308, 0)]
#: the largest C x D x D x 8 bytes of float64 covariances ddu fits (its fit holds twice that at its peak)
MAX_COVARIANCE_BYTES = 4 * 2**30
#: rows per chunk of the scores (one triangular solve per class and chunk: SCORE_CHUNK x D float64 temporaries)
SCORE_CHUNK = 8192


def added_jitter(eps: float) -> float:
    """What the code's `eps * torch.eye(D)` adds to a float64 covariance's diagonal: eps rounded to float32."""
    return torch.tensor(eps, dtype=torch.float32).item()


def class_covariances(features: torch.Tensor, labels: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """[C, D, D] float64: 1/(n_c - 1) sum_{i in c} (h_i - mu_c)(h_i - mu_c)^T, one `CHUNK` of rows at a time (the rows
    of each class in the chunk through `gram`)."""
    num_classes, dim = means.shape
    out = torch.zeros(num_classes, dim, dim, dtype=torch.float64, device=means.device)
    for rows in row_chunks(features.shape[0]):
        chunk_labels = labels[rows]
        order = torch.argsort(chunk_labels, stable=True)
        centred = features[rows][order].double() - means[chunk_labels[order]]
        counts = torch.bincount(chunk_labels, minlength=num_classes).tolist()
        for c, block in enumerate(centred.split(counts)):
            if len(block):
                out[c] += gram(block).to(out.device)
    for c, n in enumerate(torch.bincount(labels, minlength=num_classes).tolist()):
        out[c] *= 1 / (n - 1)  # the code's `1 / (n - 1) * x.t().mm(x)`
    return out


def jittered_cholesky(covariances: torch.Tensor) -> tuple[float, torch.Tensor] | None:
    """(the list's first eps at which every Sigma_c + float32(eps) I has a Cholesky factor, the [C, D, D] lower
    factors at it), or None where no eps of `JITTERS` gives one to every class."""
    factors = torch.empty_like(covariances)
    eye = torch.eye(covariances.shape[1], dtype=torch.float64, device=covariances.device)
    diagonals = covariances.diagonal(dim1=1, dim2=2)
    failed = None  # the diagonals of the last try (off the diagonal the jitter adds 0)
    for eps in JITTERS:
        jitter = added_jitter(eps)
        shifted = diagonals + jitter
        if failed is not None and torch.equal(shifted, failed):
            continue  # the very matrices that just failed
        for c in range(len(covariances)):
            factor, info = torch.linalg.cholesky_ex(covariances[c] + jitter * eye)
            if info.item() != 0:
                failed = shifted
                break
            factors[c] = factor
        else:
            return eps, factors
    return None


class DDU(Detector):
    """log sum_c N(h; mu_c, Sigma_c + eps I), one Gaussian per class on ID-train features (DDU's GDA density)."""

    name = "ddu"
    per_class = True
    float16_features = True

    def fit(self, bank: FeatureBank) -> DDU:
        assert bank.labels is not None, "ddu needs labelled ID features"
        num_classes, dim = bank.logits.shape[1], bank.features.shape[1]
        size = num_classes * dim * dim * 8
        if size > MAX_COVARIANCE_BYTES:
            raise DetectorNotApplicable(
                f"ddu fits a float64 {dim} x {dim} covariance per class: {num_classes} classes x {dim} features take "
                f"{size / 1e9:.1f} GB, above its budget of {MAX_COVARIANCE_BYTES / 2**30:g} GiB (ddu.MAX_COVARIANCE_BYTES)")
        counts = torch.bincount(bank.labels.cpu(), minlength=num_classes)
        if int(counts.min()) < 2:
            few = (counts < 2).nonzero().flatten().tolist()
            raise DetectorNotApplicable(
                f"ddu fits a covariance per class (1/(n - 1)), and {len(few)} class(es) have fewer than two fit rows "
                f"(e.g. class {few[0]}: {int(counts[few[0]])} row)")
        self.means_ = class_means(bank.features, bank.labels, num_classes)
        covariances = class_covariances(bank.features, bank.labels, self.means_)
        found = jittered_cholesky(covariances)
        del covariances
        if found is None:
            raise DetectorNotApplicable(
                "ddu: no jitter of the released code's list (0 up to 0.1) makes every class covariance positive definite")
        self.jitter_eps_, self.cholesky_ = found
        self.jitter_ = added_jitter(self.jitter_eps_)
        self.half_log_det_ = self.cholesky_.diagonal(dim1=1, dim2=2).log().sum(1)
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        device = bank.features.device
        means, factors = self.means_.to(device), self.cholesky_.to(device)
        half_log_det = self.half_log_det_.to(device)
        constant = means.shape[1] * math.log(2 * math.pi)
        out = []
        for rows in row_chunks(len(bank), SCORE_CHUNK):
            h = bank.features[rows].double()
            log_density = torch.empty(len(h), len(means), dtype=torch.float64, device=device)
            for c in range(len(means)):
                # rows of (h - mu_c) L_c^-T: z = L_c^-1 (h - mu_c) per row
                z = torch.linalg.solve_triangular(factors[c].T, h - means[c], upper=True, left=False)
                log_density[:, c] = -0.5 * (constant + z.square().sum(1)) - half_log_det[c]
            out.append(torch.logsumexp(log_density, dim=1))
        return torch.cat(out)
