"""Cluster-based OOD detection in the embedding space (`method=cluster`), after Sinhamahapatra, Koner, Roscher and
Günnemann, "Is it all a cluster game? Exploring Out-of-Distribution Detection based on Clustering in the Embedding
Space", SafeAI workshop @ AAAI 2022 (CEUR-WS Vol-3087), arXiv 2203.08549. Formulas and quirks: docs/methods/cluster.md.

An empirical study turned into one configurable method, so every factor the paper compares can be swept:
- `objective`: `ce` (cross-entropy), `supcon` (supervised contrastive, two views, projection head, temperature),
  `simclr` (the same without labels); losses, head and tensor augmentation in `ood/methods/augment.py`.
- embedding z: the penultimate encoder output h (before any projection head); L2-normalised for the contrastive
  objectives, raw for CE. Clusters and distances use z.
- the linear probe (contrastive objectives) reads `probe_features`: `raw` h (default, OODformer's `main_linear.py`)
  or `normalized` z. The feature cache holds the probe's input and logits = probe(that), so every post-hoc detector
  sees a consistent (features, head) pair; the cluster score normalises the cached features itself.
- `clusters`: `class_mean` (one centre per class, mean train embedding) or `kmeans` (`k` centres, faiss Lloyd
  through `ood.neighbors.kmeans`, k-means++ seeding, `n_init` restarts, lowest inertia kept).
- `distance` d(z, c): squared Euclidean; cosine (1 - cos); squared Mahalanobis with the inverse of a `shared`
  (cluster-centred) or `per_cluster` covariance; `cov_inverse`: `pinv` (pseudo-inverse, SSD) or `inv` (OODformer's
  `np.linalg.inv`); `cov_ddof`: the covariance divides by n - ddof (0: maximum likelihood; 1: `np.cov`, OODformer).
- `id_assignment`: `nearest` (default): a test sample (ID or OOD) belongs to its nearest centre; `gt`: ID samples
  (label >= 0) are scored against their ground-truth class centre, OOD samples against the nearest (OODformer's
  default `pred_indist_lbl=False`; optimistic, as it uses the test labels; `class_mean` clusters only).
- `threshold`: `global`: s = -min_k d(z, c_k) (Euclidean, Mahalanobis), s = max_k cos(z, c_k) (cosine);
  `per_cluster`: s = -F_c(d(z, c)) with c the nearest centre and F_c the piecewise-linear CDF of the ID-train
  distances of cluster c's members to c (the inverse of numpy's linear-interpolation percentile, so
  F_c(t_c(p)) = p / 100); beyond the training range F_c continues linearly with its mean slope
  1 / (d_max - d_min), so far samples keep their order. A global threshold on s reproduces the paper's
  per-cluster percentile sweep "OOD if d >= t_c(p)" (on a finer grid). This rank form is our convention.
- diagnostics on the ID-train embeddings (logged as `test/cluster/*`, written to `cluster_stats.json`):
  per-cluster global separation GS_c = (min_{c' != c} P(c, c') - P(c, c)) / max(min_{c' != c} P(c, c'), P(c, c)),
  P the mean pairwise Euclidean distance between members (self-pairs excluded); k-means purity (majority-label
  share); silhouette (scikit-learn, Euclidean). On at most `stats_samples` random train rows. Deviation: OODformer's
  GS keeps the zero self-pairs in P(c, c), uses the run's metric and is computed on ID test (docs/methods/cluster.md).

Training (`objective` != ce): contrastive stage, then a linear probe. The last `probe_epochs` epochs freeze the
encoder (eval-mode batch norm, no gradients) and train only the backbone's `fc` with cross-entropy on what
`probe_features` names (raw h by default, or z) (Adam,
`probe_lr`), so the checkpoint holds the probe and `id_acc` is the probe accuracy. Two optimisers, manual
optimisation: the configured optimiser/scheduler (stepped per epoch during the contrastive stage only) for encoder
and head, Adam for the probe.

Under DDP the contrastive loss is one loss over the global batch: each rank gathers every rank's projections and
ids (with gradients) and uses its own rows as anchors (`ood.methods.distributed.gather_global`); SimCLR's ids are
dataset indices, unique across ranks. The parameters a stage does not train (`fc` while contrastive, encoder and
head while probing) get an exact zero gradient (`zero_touch`), so plain DDP (no `find_unused_parameters`) runs.

Defaults versus OODformer (https://github.com/rajatkoner08/oodformer, 4300c8f, the closest public code; no official
code exists): ours are `covariance=shared`, `cov_inverse=pinv`, `cov_ddof=0`, `id_assignment=nearest` (finite on
rank-deficient clusters, and no test labels in the score), OODformer's are `per_cluster`, `inv`, 1, `gt`;
`probe_features=raw` is OODformer's. The reproduce
preset (`conf/experiment/cluster_oodformer.yaml`) sets OODformer's choices but `pinv`: on CIFAR-100 (500 images per
class, 512 dims) a class covariance is singular and `inv` gave entries of 1e17 (now refused); where it is invertible
the two agree.

Deviations and gaps:
- recipes scaled to CPU: one optimiser config for all objectives (`conf/method/cluster.yaml`: Adam 3e-3 instead
  of SGD 0.8 / 0.5, which stays on the contrastive loss's initial plateau for several epochs at our budgets), no
  warm-up, short schedules, batch 64; the cosine schedule spans all epochs, so the contrastive stage ends above
  zero learning rate.
- the projection head is 2-layer with `head_hidden` (default = feature dim) and `head_dim` outputs.
- the probe sees the loader's (single-view) training augmentation and trains for a few epochs only, with Adam at
  `probe_lr` (0.1), constant, in the reproduce preset too: OODformer's `main_linear.py` defaults (RMSprop, lr 1,
  batch 32, 5 epochs) and SupContrast's linear-eval recipe (SGD 0.1, momentum 0.9, steps at 60/75/90 of 100 epochs)
  are followed by neither.
- not implemented: the SSD standardised variant, PCA before k-means, MSP-as-distance (MSP is a detector of its
  own here).
- with `probe_features=normalized`, input-perturbation detectors (`odin`) run `backbone` directly, i.e. the probe on
  the un-normalised features; cache-based detectors see the normalised z and the probe logits.
- per-cluster pseudo-inverse covariances of clusters with fewer members than dimensions ignore the directions
  outside the members' span (a warning says so); prefer `covariance=shared` for small clusters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ood.data.batch import Batch
from ood.data.benchmark import EvalSplit
from ood.data.fit import FitData
from ood.detectors.mahalanobis import class_means, gram, mahalanobis_sq
from ood.errors import ConfigError, check_every_class, check_range
from ood.features.bank import FeatureBank
from ood.losses import supcon
from ood.losses.contrastive import BASE_TEMPERATURE
from ood.methods.augment import ProjectionHead, TensorAugment
from ood.methods.base import OODMethod, OptimizerFactory, SchedulerFactory
from ood.methods.distributed import gather_global, zero_touch
from ood.models.base import Backbone
from ood.neighbors import kmeans
from ood.utils import get_logger

log = get_logger(__name__)

Objective = Literal["ce", "supcon", "simclr"]
Distance = Literal["euclidean", "cosine", "mahalanobis"]
CHOICES = {
    "objective": ("ce", "supcon", "simclr"),
    "clusters": ("class_mean", "kmeans"),
    "distance": ("euclidean", "cosine", "mahalanobis"),
    "threshold": ("global", "per_cluster"),
    "covariance": ("shared", "per_cluster"),
    "cov_inverse": ("pinv", "inv"),
    "id_assignment": ("nearest", "gt"),
    "probe_features": ("raw", "normalized"),
}
DEFAULT_TEMPERATURE = {"supcon": 0.1, "simclr": 0.5}


# ----- clusters, distances, scores (pure functions of tensors) ------------------------------------------------
def cluster_precisions(
    z: torch.Tensor, assign: torch.Tensor, centres: torch.Tensor, covariance: str, inverse: str = "pinv", ddof: int = 0
) -> torch.Tensor:
    """Inverse covariance (float64): [D, D] `shared` (cluster-centred) or [K, D, D] one `per_cluster`; the covariance
    divides by n - `ddof`, `inverse` is `pinv` (pseudo-inverse) or `inv` (exact; a singular one is a `ConfigError`:
    fewer rows than dimensions, or a dead feature, and `inv` returned entries of 1e17 that inverted rounding noise)."""

    def invert(centred: torch.Tensor, what: str) -> torch.Tensor:
        cov = gram(centred).to(centred.device) / max(centred.shape[0] - ddof, 1)
        if inverse == "pinv":
            return torch.linalg.pinv(cov, hermitian=True)
        rank = int(torch.linalg.matrix_rank(cov, hermitian=True))
        inv, info = torch.linalg.inv_ex(cov)
        if rank < cov.shape[0] or int(info) != 0 or not bool(torch.isfinite(inv).all()):
            raise ConfigError(
                f"cluster: the covariance of {what} ({centred.shape[0]} rows, {cov.shape[0]} dims) is singular (rank "
                f"{rank}): its exact inverse is rounding noise; use method.cov_inverse=pinv"
            )
        return inv

    z = z.double()
    if covariance == "shared":
        return invert(z - centres[assign], "the class-centred features")
    out = []
    for c in range(centres.shape[0]):
        centred = z[assign == c] - centres[c]
        if centred.shape[0] <= z.shape[1]:
            log.warning("cluster %d has %d members for %d dims: its covariance is rank-deficient", c, centred.shape[0], z.shape[1])
        out.append(invert(centred, f"cluster {c}"))
    return torch.stack(out)


def cluster_distances(
    z: torch.Tensor, centres: torch.Tensor, distance: str, precision: torch.Tensor | None = None
) -> torch.Tensor:
    """[N, K] distances of each row of `z` to each centre (float64): squared Euclidean, 1 - cos, squared Mahalanobis.

    `precision` ([D, D] shared or [K, D, D] per centre) is required for `mahalanobis`.
    """
    z, centres = z.double(), centres.double()
    if distance == "euclidean":
        return torch.cdist(z, centres).square()
    if distance == "cosine":
        return 1 - F.normalize(z, dim=1) @ F.normalize(centres, dim=1).T
    if distance == "mahalanobis":
        assert precision is not None, "mahalanobis needs a precision matrix"
        if precision.dim() == 2:
            return mahalanobis_sq(z, centres, precision.double())
        return torch.stack([(((z - mu) @ p) * (z - mu)).sum(1) for mu, p in zip(centres, precision.double())], 1)
    raise ConfigError(f"unknown distance {distance!r}; choices: {list(CHOICES['distance'])}")


#: train distances of a cluster closer than this, relative to their largest, count as one: two members of a class are
#: equidistant from its mean, which float64 distances may miss by rounding (torch.cdist's matrix-product form;
#: MKL's AVX2 kernels did), and `percentile_cdf`'s slope 1 / (d_max - d_min) would then be ~1e16
DISTINCT_RTOL = 1e-9


def distinct(sorted_d: torch.Tensor) -> bool:
    """Whether the ascending distances `sorted_d` hold two values apart by more than rounding (`DISTINCT_RTOL`)."""
    return len(sorted_d) >= 2 and bool(sorted_d[-1] - sorted_d[0] > DISTINCT_RTOL * sorted_d.abs().max())


def check_percentiles(sorted_own: Sequence[torch.Tensor], clusters: str) -> None:
    """Refuse per-cluster thresholds (`percentile_cdf`) for clusters with fewer than two distinct train distances,
    at fit time and naming them: the fix depends on the clusters (k-means: fewer centres; a class: the global
    threshold), and the score would fail only once the first test batch reaches it."""
    flat = [c for c, d in enumerate(sorted_own) if not distinct(d)]
    if flat:
        fix = "lower method.k" if clusters == "kmeans" else "use method.threshold=global"
        raise ConfigError(
            f"per_cluster threshold: {len(flat)} of the {len(sorted_own)} clusters have fewer than two distinct train "
            f"distances (first: {flat[:10]}, with {[len(sorted_own[c]) for c in flat[:10]]} members); {fix}"
        )


def check_kmeans_k(k: int, n: int) -> None:
    """Refuse more k-means centres `k` than the `n` ID-train embeddings they are fitted on (the fit split), naming
    `method.k`: `ood.neighbors.kmeans` refused it in a traceback once the training it waited for was over."""
    if k > n:
        raise ConfigError(f"method.k={k} k-means centres, but the fit split has {n} ID training images; lower method.k "
                          "(or raise data.fit_fraction)")


def percentile_cdf(sorted_d: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """F(t): the inverse of the linear-interpolation percentile of `sorted_d` (ascending, >= 2 distinct values).

    F(d_(i)) = i / (n - 1) at the order statistics, linear between them, and continued linearly with the mean
    slope 1 / (d_max - d_min) outside [d_min, d_max].
    """
    n = sorted_d.shape[0]
    lo, hi = sorted_d[0], sorted_d[-1]
    if not distinct(sorted_d):
        raise ConfigError("per_cluster threshold: a cluster needs at least two distinct train distances; lower method.k")
    i = (torch.searchsorted(sorted_d, t, right=True) - 1).clamp(0, n - 2)
    left, right = sorted_d[i], sorted_d[i + 1]
    inside = (i + (t - left) / (right - left).clamp_min(torch.finfo(t.dtype).tiny)) / (n - 1)
    slope = 1 / (hi - lo)
    return torch.where(t < lo, (t - lo) * slope, torch.where(t >= hi, 1 + (t - hi) * slope, inside))


def global_separation(z: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """[K] GS_c (docs/methods/cluster.md) from mean pairwise Euclidean distances P; NaN for clusters with < 2 members."""
    dist = torch.cdist(z.double(), z.double())
    onehot = F.one_hot(assign, k).double()
    sums = onehot.T @ dist @ onehot
    counts = onehot.sum(0)
    pairs = counts[:, None] * counts[None, :] - torch.diag(counts)  # self-pairs excluded on the diagonal
    p = sums / pairs
    within = torch.diag(p)
    off = torch.eye(k, dtype=torch.bool, device=z.device) | p.isnan()  # empty clusters have no distances
    between = p.masked_fill(off, float("inf")).min(1).values
    return (between - within) / torch.maximum(between, within)


def purity(assign: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(overall purity, [K] per-cluster majority-label share, [K] majority label) of a clustering."""
    table = torch.zeros(k, int(labels.max()) + 1, dtype=torch.long, device=assign.device)
    table.index_put_((assign, labels), torch.ones_like(assign), accumulate=True)
    majority, label = table.max(1)
    share = majority.double() / table.sum(1).clamp_min(1)
    return float(majority.sum()) / float(assign.numel()), share, label


# ----- the method ---------------------------------------------------------------------------------------------
class ClusterMethod(OODMethod):
    """CE / SupCon / SimCLR training, then OOD scores from the nearest cluster centre (see the module docstring).

    Args:
        objective: `ce`, `supcon` or `simclr`.
        clusters: `class_mean` or `kmeans`; `k` centres for k-means (None = number of classes).
        distance: `euclidean`, `cosine` or `mahalanobis` (`covariance`: `shared` or `per_cluster`).
        cov_inverse, cov_ddof: Mahalanobis inverse (`pinv` or `inv`) and covariance denominator n - ddof.
        id_assignment: `nearest` centre for every sample, or `gt`: ID samples against their label's centre.
        probe_features: what the linear probe reads, `raw` h (OODformer) or `normalized` z.
        threshold: `global` or `per_cluster`.
        temperature: contrastive temperature (None: 0.1 for supcon, 0.5 for simclr); the loss is scaled by
            temperature / `base_temperature` (SupContrast's 0.07).
        head_hidden, head_dim: projection head sizes (hidden None = feature dim).
        augment: two-view augmentation preset (`auto`, `digits`, `natural`, `none`).
        probe_epochs, probe_lr: the linear-probe stage of the contrastive objectives.
        n_init, kmeans_seed: k-means restarts and seed.
        stats_samples: train rows used for GS and silhouette (a seeded subsample when larger).
        init: as `OODMethod` (start from / freeze weights).
    """

    name = "cluster"

    def __init__(
        self,
        backbone: Backbone,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        objective: Objective = "ce",
        clusters: Literal["class_mean", "kmeans"] = "class_mean",
        k: int | None = None,
        distance: Distance = "cosine",
        threshold: Literal["global", "per_cluster"] = "global",
        covariance: Literal["shared", "per_cluster"] = "shared",
        cov_inverse: Literal["pinv", "inv"] = "pinv",
        cov_ddof: int = 0,
        id_assignment: Literal["nearest", "gt"] = "nearest",
        probe_features: Literal["raw", "normalized"] = "raw",
        temperature: float | None = None,
        base_temperature: float = BASE_TEMPERATURE,
        head_hidden: int | None = None,
        head_dim: int = 32,
        augment: str = "auto",
        probe_epochs: int = 5,
        probe_lr: float = 0.1,
        n_init: int = 20,
        kmeans_seed: int = 0,
        stats_samples: int = 2000,
        init: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(backbone, optimizer, scheduler, init)
        for key, value in (("objective", objective), ("clusters", clusters), ("distance", distance),
                           ("threshold", threshold), ("covariance", covariance), ("cov_inverse", cov_inverse),
                           ("id_assignment", id_assignment), ("probe_features", probe_features)):
            if value not in CHOICES[key]:
                raise ConfigError(f"method.{key}={value!r} is unknown; choices: {list(CHOICES[key])}")
        if id_assignment == "gt" and clusters != "class_mean":
            raise ConfigError("method.id_assignment=gt needs method.clusters=class_mean (k-means centres have no label)")
        for key, value in (("k", k), ("head_dim", head_dim), ("n_init", n_init), ("stats_samples", stats_samples),
                           ("head_hidden", head_hidden)):  # head_hidden=0 read as its default, the feature dim
            check_range(f"method.{key}", value, 1, integer=True)
        # probe_epochs=2.5 probed 2.5 epochs; kmeans_seed=0.5 failed in torch.manual_seed after the training
        for key, value in (("cov_ddof", cov_ddof), ("probe_epochs", probe_epochs), ("kmeans_seed", kmeans_seed)):
            check_range(f"method.{key}", value, 0, integer=True)
        check_range("method.probe_lr", probe_lr, 0, open_low=True)
        check_range("method.temperature", temperature, 0, open_low=True)
        check_range("method.base_temperature", base_temperature, 0, open_low=True)
        self.contrastive = objective != "ce"
        self.automatic_optimization = not self.contrastive
        if self.contrastive:
            dim = backbone.feature_dim
            self.head = ProjectionHead(dim, head_hidden or dim, head_dim)
            self.temperature = temperature if temperature is not None else DEFAULT_TEMPERATURE[objective]
            self.base_temperature = base_temperature
            self._augment_preset = augment
        self._fit: dict[str, Any] = {}
        #: the diagnostics of the last `setup_ood` (GS, silhouette, sizes, k-means purity)
        self.cluster_stats: dict[str, Any] = {}

    # ----- embedding and training -----------------------------------------------------------------------------
    def _embedding(self, h: torch.Tensor) -> torch.Tensor:
        """Penultimate (or cached probe-input) features as the embedding: L2-normalised for the contrastive
        objectives (idempotent), raw for CE."""
        return F.normalize(h, dim=1) if self.contrastive else h

    def _probe_input(self, h: torch.Tensor) -> torch.Tensor:
        """What the classifier reads: raw h, or z for a contrastive probe with `probe_features=normalized`."""
        return self._embedding(h) if self.hparams.probe_features == "normalized" else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the classifier (the linear probe for the contrastive objectives)."""
        return self.backbone.fc(self._probe_input(self.backbone.features(x)[0]))

    def eval_outputs(self, x: torch.Tensor, split: EvalSplit) -> dict[str, torch.Tensor]:
        h, layers = self.backbone.features(x, self.cache_layers)
        features = self._probe_input(h)
        return {"logits": self.backbone.fc(features), "features": features, **layers}

    @property
    def probing(self) -> bool:
        """True in the linear-probe stage (the last `probe_epochs` epochs of a contrastive run)."""
        return self.contrastive and self.current_epoch >= self.trainer.max_epochs - self.hparams.probe_epochs

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.contrastive and not (self.trainer.max_epochs or 0) > self.hparams.probe_epochs > 0:
            raise ConfigError(
                f"objective={self.hparams.objective} needs 0 < method.probe_epochs ({self.hparams.probe_epochs}) "
                f"< trainer.max_epochs ({self.trainer.max_epochs})"
            )

    def prepare(self, data: FitData) -> None:
        """Refuse more k-means centres than the fit split has images before training, not after it."""
        if self.hparams.clusters == "kmeans" and self.hparams.k:
            check_kmeans_k(self.hparams.k, len(data.datasets["fit"]))

    def training_loss(self, batch: Batch) -> torch.Tensor:
        x, y = batch.x, batch.y
        if not self.contrastive:
            return F.cross_entropy(self.backbone(x), y)
        if self.probing:
            self.backbone.eval()  # frozen encoder: batch-norm statistics stay as the contrastive stage left them
            with torch.no_grad():
                features = self._probe_input(self.backbone.features(x)[0])
            probe = set(self.backbone.fc.parameters())
            return F.cross_entropy(self.backbone.fc(features), y) + zero_touch(p for p in self.parameters() if p not in probe)
        augment = TensorAugment.preset(self._augment_preset, x.shape[1])
        views = torch.cat([augment(x), augment(x)])
        p = F.normalize(self.head(self.backbone.features(views)[0]), dim=1)
        ids = y if self.hparams.objective == "supcon" else batch.index  # dataset indices (a padded DDP shard repeats a few: views of one image)
        (p, ids), anchors = gather_global(self, p, ids.repeat(2))
        loss = supcon(p, ids, self.temperature, anchors=anchors, base_temperature=self.base_temperature)
        self.log_metrics({"train/contrastive_loss": loss}, len(batch))
        return loss + zero_touch(self.backbone.fc.parameters())

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if not self.automatic_optimization:
            optimizer = self.optimizers()[1 if self.probing else 0]
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        return loss

    def on_train_epoch_end(self) -> None:
        if not self.automatic_optimization and not self.probing and self.scheduler_factory is not None:
            self.lr_schedulers().step()

    def configure_optimizers(self) -> Any:
        if not self.contrastive:
            return super().configure_optimizers()
        probe = set(self.backbone.fc.parameters())
        encoder = self.optimizer_factory([p for p in self.parameters() if p not in probe])
        optimizers = [encoder, torch.optim.Adam(self.backbone.fc.parameters(), lr=self.hparams.probe_lr)]
        if self.scheduler_factory is None:
            return optimizers
        return optimizers, [self.epoch_scheduler(
            self.scheduler_factory, encoder, "method.scheduler",
            "give a per-epoch torch scheduler (method/scheduler=cosine)")]

    # ----- clusters and scores --------------------------------------------------------------------------------
    def setup_ood(self, banks: Mapping[str, FeatureBank]) -> None:
        """Fit centres (and covariances, per-cluster CDFs) on the ID-train embeddings; log the diagnostics."""
        train = banks["train"]
        assert train.labels is not None, "cluster needs labelled ID-train features"
        z, labels = self._embedding(train.features.double()), train.labels
        hp = self.hparams
        if hp.clusters == "class_mean":
            k = train.logits.shape[1]
            # OODformer's centres are those of the classes present (torch.unique); an absent class's mean was a
            # phantom centre at the origin that scored nearby samples as ID
            check_every_class("cluster", torch.bincount(labels, minlength=k).tolist(),
                              "they have no class-mean centre (method.clusters=class_mean)", fit_split=True)
            assign = labels
            centres = class_means(z, labels, k)
        else:
            k = hp.k or train.logits.shape[1]
            check_kmeans_k(k, len(z))
            centres, assign, _ = kmeans(z.float(), k, n_init=hp.n_init, seed=hp.kmeans_seed)
            centres = centres.double()
        precision = (
            cluster_precisions(z, assign, centres, hp.covariance, hp.cov_inverse, hp.cov_ddof)
            if hp.distance == "mahalanobis"
            else None
        )
        own = cluster_distances(z, centres, hp.distance, precision).gather(1, assign[:, None])[:, 0]
        sorted_own = [own[assign == c].sort().values for c in range(k)]
        if hp.threshold == "per_cluster":
            check_percentiles(sorted_own, hp.clusters)
        self._fit = {"centres": centres, "precision": precision, "sorted": sorted_own}
        self.cluster_stats = cluster_statistics(z, labels, assign, k, hp.clusters == "kmeans", hp.stats_samples, hp.kmeans_seed)

    def ood_score(self, bank: FeatureBank) -> torch.Tensor:
        if not self._fit:
            raise RuntimeError("cluster: ood_score called before setup_ood")
        z = self._embedding(bank.features)
        dist = cluster_distances(z, self._fit["centres"].to(z.device), self.hparams.distance,
                                 None if self._fit["precision"] is None else self._fit["precision"].to(z.device))
        d, nearest = dist.min(1)
        if self.hparams.id_assignment == "gt" and bank.labels is not None:
            nearest = torch.where(bank.labels >= 0, bank.labels.to(nearest), nearest)
            d = dist.gather(1, nearest[:, None])[:, 0]
        if self.hparams.threshold == "global":
            return 1 - d if self.hparams.distance == "cosine" else -d
        score = torch.empty_like(d)
        for c, sorted_d in enumerate(self._fit["sorted"]):
            rows = nearest == c
            score[rows] = -percentile_cdf(sorted_d.to(d.device), d[rows])
        return score

    def diagnostics(self) -> dict[str, Any]:
        """The cluster diagnostics of the last `setup_ood` with the settings they belong to (`cluster_stats.json`;
        the floats are logged as `test/cluster/*`)."""
        if not self.cluster_stats:
            return {}
        keys = ("objective", "clusters", "k", "distance", "threshold", "covariance")
        return {**{key: self.hparams[key] for key in keys}, **self.cluster_stats}


def cluster_statistics(
    z: torch.Tensor, labels: torch.Tensor, assign: torch.Tensor, k: int, with_purity: bool, max_samples: int, seed: int
) -> dict[str, Any]:
    """GS per cluster (+ mean/min), silhouette (absent unless 2 <= clusters present < rows), sizes and, for k-means,
    purity, on <= `max_samples` rows."""
    from sklearn.metrics import silhouette_score

    if z.shape[0] > max_samples:
        rows = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(seed))[:max_samples].to(z.device)
        z_s, a_s = z[rows], assign[rows]
    else:
        z_s, a_s = z, assign
    gs = global_separation(z_s, a_s, k)
    valid = gs[~gs.isnan()]
    stats: dict[str, Any] = {
        "gs_mean": float(valid.mean()) if valid.numel() else float("nan"),
        "gs_min": float(valid.min()) if valid.numel() else float("nan"),
        "gs": [None if v != v else v for v in gs.tolist()],
        "sizes": torch.bincount(assign, minlength=k).tolist(),
    }
    if 1 < len(a_s.unique()) < len(a_s):  # scikit-learn's range; a diagnostic, never worth failing the run over
        stats["silhouette"] = float(silhouette_score(z_s.cpu().numpy(), a_s.cpu().numpy(), metric="euclidean"))
    if with_purity:
        overall, share, label = purity(assign, labels, k)
        stats.update(purity=overall, cluster_purity=share.tolist(), majority_label=label.tolist())
    return stats
