"""Heatmap-based OOD detection (`method=heatmap`): a decoder on a frozen classifier that detects and localises.

Paper: J. Hornauer, V. Belagiannis, "Heatmap-based Out-of-Distribution Detection", WACV 2023, arXiv 2211.08115.
Released code: jhornauer/heatmap_ood (`prototype_heatmap.py`, `optimization.py`, `Networks/generator.py`).
Formulas and the released code's quirks: docs/methods/heatmap.md.

The CE classifier is frozen (`method.init.ckpt=<CE checkpoint>`, `init.freeze` always contains `backbone`), or,
with no checkpoint, trained with CE in the same run for `classifier_epochs` epochs and then frozen (one Lightning
fit, manual optimisation with one optimiser per phase: the classifier's CE recipe, then the decoder's Adam). A
conditional decoder (`ood.models.decoder`) maps [min-max scaled penultimate feature; one-hot predicted class] to a
heatmap M(x) in [-1, 1] of the input's shape, trained with `ood.losses.heatmap_loss`
  L = mean_batch sum_{c,i,j} (1 + alpha |t|) (M + x - t)^2,   alpha = 5,
on ID training images (t = x: target heatmap 0) and an outlier-exposure pool of `num_ood` images drawn once without
replacement (t = prototype: the ID training image with the same *predicted* class nearest in penultimate-feature
Euclidean distance, found once per run by an exact per-class search through `ood.neighbors`).
Score (`detector=heatmap`): s(x) = -mean_{i,j} max_c |M_cij(x)| in [-1, 0] (higher = more ID), computed inside the
one evaluation pass (`eval_outputs` returns it as the extra `heatmap_score`).

Input space: the released code feeds the classifier and the loss x in [-1, 1] (mean = std = 0.5). Here the classifier
keeps its own normalisation x_c = (p - mean) / std (the benchmark's `input_mean` / `input_std`); the loss and the
heatmap live in the method's space x = 2 p - 1 = 2 (x_c std + mean) - 1, so M + x - t is the released quantity
for the same pixels p whatever the classifier's normalisation.

Flags for the released code's behaviour (defaults = the paper's intent; docs/methods/heatmap.md):
- `pairing: intended|as_released`: `as_released` gives outlier k the prototype of the k-th outlier in
  class-sorted order (the released dataset's indexing).
- `feature_norm: global|as_released`: `global` scales every feature with the min/max over all ID-train features;
  `as_released` scales only the first sample of each batch (training and test alike), with the released range:
  min(0, min) and max(0, max) over the first feature row of each 200-image batch of the ID-train set
  (`released_feature_range`; `get_norm_values` and `learn_prototype` index the batch tensor with the layer index).
- The released evaluation keeps the first len(ID test) // 5 samples of every test OOD set: a data option,
  `data.ood_subset=first_fifth`, applied before the evaluation pass (every scorer sees the same samples).

Deviations: the outlier pool and its prototypes are held by the method (built in `prepare` from the benchmark's
outlier set, seeded by the run seed, through the shared pass `ood.features.passes.forward_dataset`), not served by the DataModule's outlier stream, because every outlier needs
its fixed prototype; each epoch visits the pool once in a (seed, epoch)-seeded order, `ceil(num_ood / steps)` per ID
batch (the released code shuffles ID and outliers into one loader, i.e. the same ratio in expectation). The ID
images come from the benchmark's training stream: its augmentation applies unless `data.benchmark.augment=false`
(the released code has none; the presets switch it off). Outlier images get the benchmark's outlier transform once
(when the pool is built). No released skip connections (`fw_layers` = 1, every released config).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ood.data.batch import Batch
from ood.data.benchmark import EvalSplit
from ood.data.fit import FitData
from ood.errors import CheckpointError, ConfigError, check_range
from ood.features.bank import FeatureBank
from ood.losses import heatmap_loss
from ood.methods.base import OODMethod, OptimizerFactory, SchedulerFactory, check_optimizer, check_scheduler
from ood.methods.distributed import zero_touch
from ood.models.base import Backbone, input_channels
from ood.models.checkpoint import load_modules, read_checkpoint
from ood.models.decoder import HeatmapDecoder, decoder_plan
from ood.neighbors import KNNIndex
from ood.plots import heatmap_grid
from ood.utils import get_logger

log = get_logger(__name__)

Pairing = Literal["intended", "as_released"]
FeatureNorm = Literal["global", "as_released"]
CHOICES = {
    "pairing": ("intended", "as_released"),
    "feature_norm": ("global", "as_released"),
}


def heatmap_score(heatmap: torch.Tensor) -> torch.Tensor:
    """ID score -mean_{i,j} max_c |M_cij| of heatmaps [B, C, H, W] in [-1, 1]: 0 for a zero heatmap, in [-1, 0].
    The mean is taken in float32 (a bf16 mean under `trainer=gpu_fast` would round most scores to a few values)."""
    return -heatmap.abs().amax(1).flatten(1).float().mean(1)


def class_prototypes(
    bank_features: torch.Tensor,
    bank_preds: torch.Tensor,
    query_features: torch.Tensor,
    query_preds: torch.Tensor,
) -> torch.Tensor:
    """For every query row, the bank row with the same predicted class nearest in Euclidean distance (exact
    `ood.neighbors` search per class). A class no bank row is predicted as falls back to the whole bank (logged)."""
    proto = torch.empty(len(query_preds), dtype=torch.long)
    for cls in query_preds.unique().tolist():
        queries = query_preds == cls
        rows = torch.nonzero(bank_preds == cls)[:, 0]
        if len(rows) == 0:
            log.warning(
                "heatmap: no ID training image is predicted as class %d; its outliers pair with any class",
                cls,
            )
            rows = torch.arange(len(bank_preds))
        _, nearest = KNNIndex("l2", device="cpu").add(bank_features[rows]).search(query_features[queries], 1)
        proto[queries] = rows[nearest[:, 0].cpu()]
    return proto


#: the batch size of the released `get_norm_values` pass over the ID-train set (`ood_training.py` sets 200)
RELEASED_NORM_BATCH = 200


def released_feature_range(id_features: torch.Tensor, batch_size: int = RELEASED_NORM_BATCH) -> torch.Tensor:
    """The released (min, max) of ID-train features [N, D] in loader order: `get_norm_values` takes zs[0], the
    first row of each `batch_size` batch, and starts both ends at 0, so (min(0, min rows), max(0, max rows))."""
    rows = id_features[::batch_size]
    return torch.stack([rows.min().clamp_max(0.0), rows.max().clamp_min(0.0)])


def released_pairing(prototypes: torch.Tensor, query_preds: torch.Tensor) -> torch.Tensor:
    """The released code's pairing: outlier k gets the prototype of the k-th outlier in class-sorted order."""
    return prototypes[torch.sort(query_preds, stable=True).indices]


def _input_channels(backbone: Backbone) -> int:
    channels = input_channels(backbone)
    if channels is None:
        raise ConfigError(
            f"method=heatmap needs a convolutional backbone to read the image channels from, got {type(backbone).__name__}"
        )
    return channels


class HeatmapOOD(OODMethod):
    """Frozen classifier + heatmap decoder (module doc).

    Args:
        backbone, optimizer, scheduler, init: as `OODMethod` (the optimiser and scheduler see only the decoder;
            `scheduler` none by default, the paper's, and refused with a CE phase, which schedules the classifier only).
        input_size: image side the decoder reproduces (the benchmark's input size).
        latent, width: decoder plan overrides (`ood.models.decoder.decoder_plan`; None = the feature dim).
        alpha: loss weight of |t| (paper 5).
        num_ood: outlier-pool size (None = the whole outlier set).
        pairing, feature_norm: released-code flags (module doc).
        n_images: images per split in the `heatmaps/<split>` diagnostics grids.
        feature_batch_size: batch size of the once-per-run feature pass that builds the prototypes.
        classifier_epochs: without `init.ckpt`, train the classifier with CE for this many epochs first (the
            `classifier_optimizer` / `classifier_scheduler` recipe), then freeze it for the remaining epochs.
        decoder_ckpt: a decoder file of the authors' code (`checkpoints/<run>/model.pt`, `ood.models.checkpoint.
            from_heatmap_ood_decoder`): its decoder and feature range, with the released input normalisation
            (mean = std = 0.5); the classifier then comes from `ckpt_path=<Models/... .pt>` alone
            (`experiment=heatmap_released`, docs/methods/heatmap.md).
    """

    name = "heatmap"
    trained_parts = ("decoder",)
    #: the `method.*` key of a file that fills a trained part: with the authors' decoder file an evaluation from
    #: `backbone.weights` or a released classifier file is complete (`ood.runs.checks.untrained_parts`)
    part_files: ClassVar[dict[str, str]] = {"decoder": "decoder_ckpt"}

    def __init__(
        self,
        backbone: Backbone,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        init: Mapping[str, Any] | None = None,
        input_size: int | None = 32,
        latent: int | None = None,
        width: int | None = None,
        alpha: float = 5.0,
        num_ood: int | None = None,
        pairing: Pairing = "intended",
        feature_norm: FeatureNorm = "global",
        n_images: int = 8,
        feature_batch_size: int = 512,
        classifier_epochs: int = 0,
        classifier_optimizer: OptimizerFactory | None = None,
        classifier_scheduler: SchedulerFactory | None = None,
        decoder_ckpt: str | None = None,
    ) -> None:
        super().__init__(backbone, optimizer, scheduler, init)
        for key, value in (("pairing", pairing), ("feature_norm", feature_norm)):
            if value not in CHOICES[key]:
                raise ConfigError(f"method.{key}={value!r}; choices: {list(CHOICES[key])}")
        for key, value, low in (("classifier_epochs", classifier_epochs, 0), ("num_ood", num_ood, 1),
                                ("feature_batch_size", feature_batch_size, 1), ("n_images", n_images, 0),
                                ("input_size", input_size, 1), ("latent", latent, 1), ("width", width, 1)):
            check_range(f"method.{key}", value, low, integer=True)
        check_range("method.alpha", alpha, 0)
        # the classifier is always frozen for the decoder: from the start, or after the CE phase
        self.classifier_epochs = classifier_epochs
        #: `evaluation.weights=best_val_acc` keeps no epoch of the CE phase (its decoder untrained)
        self.first_complete_epoch = classifier_epochs
        self.classifier_optimizer, self.classifier_scheduler = classifier_optimizer, classifier_scheduler
        if classifier_epochs > 0:
            if classifier_optimizer is None:
                raise ConfigError(
                    "method.classifier_epochs > 0 needs method.classifier_optimizer (the CE recipe)"
                )
            check_optimizer(classifier_optimizer, "method.classifier_optimizer")
            check_scheduler(classifier_scheduler, "method.classifier_scheduler")
            if scheduler is not None:  # the two phases step their optimisers by hand; only the classifier's is scheduled
                raise ConfigError(
                    f"method.scheduler: heatmap with a CE phase (method.classifier_epochs={classifier_epochs}) schedules "
                    "only the classifier (method.classifier_scheduler), so the decoder's schedule would be ignored: set "
                    "method.scheduler=null, or train the decoder from a CE checkpoint (method.init.ckpt=<CE last.ckpt>)"
                )
            self.frozen = tuple(f for f in self.frozen if f != "backbone")
            self.automatic_optimization = False
        elif "backbone" not in self.frozen:
            self.frozen = ("backbone", *self.frozen)
        if input_size is None:
            raise ConfigError("method=heatmap builds its decoder for one image side: set data.image_size (or method.input_size)")
        channels = _input_channels(backbone)
        self.plan = decoder_plan(backbone.feature_dim, input_size, channels, latent, width)
        self.decoder = HeatmapDecoder(backbone.feature_dim, backbone.num_classes, self.plan)
        self.alpha, self.num_ood, self.n_images = alpha, num_ood, n_images
        self.pairing, self.feature_norm = pairing, feature_norm
        self.feature_batch_size = feature_batch_size
        # the classifier's input normalisation and the ID-train feature range: saved with the decoder
        self.register_buffer("pixel_mean", torch.zeros(channels, 1, 1))
        self.register_buffer("pixel_std", torch.ones(channels, 1, 1))
        self.register_buffer("feature_range", torch.tensor([0.0, 1.0]))
        self._pool_x: torch.Tensor | None = None
        self._pool_t: torch.Tensor | None = None
        self._batch_idx = 0
        self._examples: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._stats: dict[str, float] = {}
        self._data: FitData | None = None
        #: which outlier set stood in for the paper's, and how many of it (`fitted()`, in every result row)
        self._outliers = ""
        if decoder_ckpt is not None:
            self._load_released_decoder(decoder_ckpt)

    def _load_released_decoder(self, path: str) -> None:
        """The authors' decoder and feature range from `path`; the released classifiers read x in [-1, 1]
        (mean = std = 0.5, `selection.select_transform`). The decoder is then no part only training gives:
        `ood.cli.load_weights` fills the backbone alone from the classifier file."""
        state, kind = read_checkpoint(path)
        if kind != "heatmap_ood_decoder":
            raise CheckpointError(f"method.decoder_ckpt={path} is a {kind} file, not a decoder of jhornauer/heatmap_ood "
                                  "(checkpoints/<run>/model.pt, a dict of 'min', 'max' and the epochs' generators)")
        load_modules(self, state, {"decoder": "decoder"}, path,
                     hint="pass the data= and backbone= of the released decoder")
        self.feature_range.copy_(state["feature_range"])
        self.pixel_mean.fill_(0.5)
        self.pixel_std.fill_(0.5)
        self.trained_parts = ()

    # ----- spaces ---------------------------------------------------------------------------------------------
    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Classifier inputs -> the method's space 2 p - 1 in [-1, 1] (p = pixels in [0, 1])."""
        return 2.0 * (x * self.pixel_std + self.pixel_mean) - 1.0

    def scale_features(self, features: torch.Tensor) -> torch.Tensor:
        """Min-max scaling of the decoder input (`feature_norm`, module doc)."""
        low, high = self.feature_range
        scaled = (features - low) / (high - low).clamp_min(1e-12)
        if self.feature_norm == "global":
            return scaled
        return torch.cat([scaled[:1], features[1:]])

    def heatmap(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(heatmap M(x), logits, features) of classifier inputs `x`; the classifier runs without gradients."""
        with torch.no_grad():
            out = self.backbone.run(x)
        return self.decoder(self.scale_features(out.features), out.logits.argmax(1)), out.logits, out.features

    # ----- the outlier pool, once per run ---------------------------------------------------------------------
    def _classify(self, data: Dataset | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, predicted classes) of a dataset or an image tensor, on the CPU (the shared pass)."""
        assert self._data is not None, "prepare() gives the fit data"
        def classify(x: torch.Tensor) -> dict[str, torch.Tensor]:
            out = self.backbone.run(x)
            return {"features": out.features.float().cpu(), "preds": out.logits.argmax(1).cpu()}

        out = self._data.forward(classify, data, self.backbone, "heatmap: classify", batch_size=self.feature_batch_size)
        return out["features"], out["preds"]

    def prepare(self, data: FitData) -> None:
        """Checks the classifier source and the outliers (both in one line when both fail, so one failed run names
        every fix); builds the pool now unless the classifier trains first."""
        problems: list[str] = []
        if (self.init_ckpt is None) == (self.classifier_epochs == 0):
            problems.append(
                "method=heatmap needs exactly one classifier source: method.init.ckpt=<CE checkpoint> (frozen), or "
                f"method.classifier_epochs=N (CE first, then frozen); got init.ckpt={self.init_ckpt}, "
                f"classifier_epochs={self.classifier_epochs}"
            )
        try:
            outliers = data.require("outliers", self.name)
        except ConfigError as e:
            problems.append(str(e))
        if problems:
            raise ConfigError("; and ".join(problems))
        n = len(outliers)  # type: ignore[arg-type]
        # known before the pool: a run resumed from its last epoch's checkpoint builds none yet reports it
        self._outliers = f"{data.outlier_set}: {min(self.num_ood or n, n)} of {n}"
        side = data.datasets["fit"][0][0].shape[-1]
        if side != self.plan.output_size:
            raise ConfigError(
                f"method=heatmap's decoder draws {self.plan.output_size} px heatmaps but the data's images are {side} px: "
                f"set method.input_size={side}"
            )
        self._data = data
        if self.classifier_epochs == 0:
            self._build_pool()

    def on_train_epoch_start(self) -> None:
        """The switch from the CE phase (`classifier_epochs`) to the decoder: freeze the classifier, build the pool
        (also when resuming inside the decoder phase)."""
        if self.current_epoch >= self.classifier_epochs and self._pool_x is None:
            if "backbone" not in self.frozen:
                # frozen by eval mode, no gradient through `heatmap` and an optimiser never stepped again; it keeps
                # requires_grad, as DDP registered its parameters: `training_loss` gives them exact-zero gradients
                self.frozen = ("backbone", *self.frozen)
                self.backbone.eval()
            self._build_pool()

    def _build_pool(self) -> None:
        """Input normalisation, ID-train feature range, the outlier pool and its prototypes (identical on every
        rank: a function of the frozen classifier, the data and the seed)."""
        data = self._data
        assert data is not None, "prepare() gives the fit data"
        outliers = data.require("outliers", self.name)
        self.pixel_mean.copy_(torch.tensor(data.input_mean).view(-1, 1, 1))
        self.pixel_std.copy_(torch.tensor(data.input_std).view(-1, 1, 1))
        train = data.datasets["train"]
        id_feats, id_preds = self._classify(train)
        if self.feature_norm == "global":
            self.feature_range.copy_(torch.stack([id_feats.min(), id_feats.max()]))
        else:
            self.feature_range.copy_(released_feature_range(id_feats))
        gen = torch.Generator().manual_seed(data.seed)
        n = len(outliers)  # type: ignore[arg-type]
        pool = torch.randperm(n, generator=gen)[: min(self.num_ood or n, n)].sort().values
        pool_x = torch.stack([outliers[int(i)][0] for i in pool])
        q_feats, q_preds = self._classify(pool_x)
        proto = class_prototypes(id_feats, id_preds, q_feats, q_preds)
        if self.pairing == "as_released":
            proto = released_pairing(proto, q_preds)
        self._pool_x = pool_x.to(data.device, data.dtype)
        self._pool_t = torch.stack([train[int(i)][0] for i in proto]).to(data.device, data.dtype)
        log.info(
            "heatmap: %d outliers paired with ID prototypes (%s pairing), feature range [%.3g, %.3g]",
            len(pool),
            self.pairing,
            *self.feature_range.tolist(),
        )

    def _outlier_rows(self) -> torch.Tensor:
        """This step's rows of the pool: the epoch's (seed, epoch)-seeded permutation, this rank's shard, in
        `ceil(shard / steps)`-sized chunks, so every epoch visits the pool once."""
        assert self._pool_x is not None and self._data is not None, "the pool is built in prepare"
        gen = torch.Generator().manual_seed(self._data.seed * 1_000_003 + self.current_epoch + 104_729)
        shard = torch.randperm(len(self._pool_x), generator=gen)[self._data.rank :: self._data.world_size]
        steps = max(int(self.trainer.num_training_batches), 1)
        size = math.ceil(len(shard) / steps)
        rows = shard[(self._batch_idx % steps) * size :][:size]
        return rows if len(rows) else shard[:size]

    # ----- training -------------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """The base step (loss, NaN check, logging); with a CE phase (manual optimisation) each phase steps its own
        optimiser: the classifier's while `current_epoch < classifier_epochs`, then the decoder's."""
        self._batch_idx = batch_idx
        loss = super().training_step(batch, batch_idx)
        if not self.automatic_optimization:
            classifier, decoder = self.optimizers()
            optimizer = classifier if self.current_epoch < self.classifier_epochs else decoder
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        return loss

    def on_train_epoch_end(self) -> None:
        scheduler = None if self.automatic_optimization else self.lr_schedulers()
        if scheduler is not None and self.current_epoch < self.classifier_epochs:
            scheduler.step()

    def configure_optimizers(self) -> Any:
        """The decoder's optimiser (`optimizer`); with a CE phase also the classifier's (and its scheduler)."""
        if self.automatic_optimization:
            return super().configure_optimizers()
        assert self.classifier_optimizer is not None
        optimizers = [
            self.classifier_optimizer(self.backbone.parameters()),
            self.optimizer_factory(self.decoder.parameters()),
        ]
        if self.classifier_scheduler is None:
            return optimizers
        return optimizers, [self.epoch_scheduler(
            self.classifier_scheduler, optimizers[0], "method.classifier_scheduler",
            "give a per-epoch torch scheduler (heatmap.yaml's CosineAnnealingLR)")]

    def training_loss(self, batch: Batch) -> torch.Tensor:
        # each phase gives the other phase's parameters an exact-zero gradient (`zero_touch`): DDP registered them all
        if self.current_epoch < self.classifier_epochs:
            return F.cross_entropy(self.backbone(batch.x), batch.y) + zero_touch(self.decoder.parameters())
        assert self._pool_x is not None and self._pool_t is not None
        rows = self._outlier_rows().to(self.device)
        n = len(batch)
        x = torch.cat([batch.x, self._pool_x[rows]])
        heat, _, _ = self.heatmap(x)
        inputs = self.to_unit(x)
        targets = torch.cat([inputs[:n], self.to_unit(self._pool_t[rows])])
        loss = heatmap_loss(heat, inputs, targets, self.alpha) + zero_touch(self.backbone.parameters())
        with torch.no_grad():
            self.log_metrics(
                {
                    "train/heatmap_id": heatmap_loss(heat[:n], inputs[:n], targets[:n], self.alpha),
                    "train/heatmap_ood": heatmap_loss(heat[n:], inputs[n:], targets[n:], self.alpha),
                },
                len(x),
            )
        return loss

    # ----- evaluation -----------------------------------------------------------------------------------------
    def begin_evaluation(self, splits: Sequence[EvalSplit]) -> None:
        super().begin_evaluation(splits)
        self._examples, self._stats = {}, {}

    def eval_outputs(self, x: torch.Tensor, split: EvalSplit) -> dict[str, torch.Tensor]:
        heat, logits, features = self.heatmap(x)
        if split.role in ("id_test", "ood"):
            images, maps = self._examples.setdefault(split.name, ([], []))
            have = sum(len(m) for m in maps)
            if have < self.n_images:
                take = self.n_images - have
                images.append(((self.to_unit(x[:take]) + 1) / 2).float().cpu())
                maps.append(heat[:take].abs().amax(1).float().cpu())
        return {"logits": logits, "features": features, "heatmap_score": heatmap_score(heat)}

    def setup_ood(self, banks: Mapping[str, FeatureBank]) -> None:
        """Records mean max_c |M| per split (ID test and every test OOD set)."""
        self._stats = {
            f"mean_abs_heatmap/{s.name}": float(-banks[s.name].extras["heatmap_score"].mean())
            for s in self.eval_splits
            if s.role in ("id_test", "ood")
        }

    def fitted(self) -> dict[str, Any]:
        """Which outlier set stands in for the paper's, and how many of it (from `prepare`)."""
        return {"outliers": self._outliers} if self._outliers else {}

    def ood_score(self, bank: FeatureBank) -> torch.Tensor:
        return bank.extras["heatmap_score"]

    def diagnostics(self) -> dict[str, Any]:
        """Mean max_c |M| per split, and `heatmaps/<split>` grids (input | heatmap | overlay) of the first
        `n_images` images of ID test and every test OOD set."""
        grids = {
            f"heatmaps/{name}": heatmap_grid(torch.cat(images), torch.cat(maps), f"{name}: max_c |M(x)|")
            for name, (images, maps) in self._examples.items()
        }
        return {**self._stats, **grids}
