"""GROOD (`method=grood`): gradient-aware OOD detection with class prototypes and an OOD prototype.

Paper: M. ElAraby, S. Sahoo, Y. Pequignot, P. Novello, L. Paull, "GROOD: GRadient-Aware Out-of-Distribution
Detection", TMLR 2025, arXiv 2312.14427. Released code: github.com/mostafaelaraby/Gradient-Aware-OOD-Detection,
merged by the first author into OpenOOD as `openood/postprocessors/grood.py` (the reference followed here).

Post-hoc on a cross-entropy classifier: `ood-train method=grood` trains exactly like `method=ce`; the state dict
is the backbone's alone, so `ood-eval method=grood ckpt_path=<CE checkpoint>` applies GROOD to any CE run.

Score. h = penultimate feature, z_l = output of stage `mix_layer`, y_hat = argmax logits.
  p_c = mean{h : y = c}, p^l_c = mean{z_l : y = c} over every training sample (true labels);
  p_ood (`ood_proto_source`): `synthetic_mixup` (paper) = mean of forward_from(l, lam z_l(x) + (1 - lam) p^l_{c2(x)})
  over the first >= `n_proto` training images (whole batches), c2 = second most likely class;
  `val_ood` = mean h of the first >= `n_proto` validation-OOD images (whole batches; OpenOOD's yaml default);
  `uniform_noise` = mean h of blurred U[0,1] images (kernel 5x7, sigma ~ U[0.2, 5] per batch of 100, keep the 10
  of each 100 with the lowest logsumexp); `proto_mean` = mean of the p_c.
  NCP loss L(h) = CE(softmax(s), y_hat), s_j = -||h - P_j||_2 (not squared), P = [p_1..p_C, p_ood].
  gamma(h) = dL/dp_ood = q_ood(h) (h - p_ood) / ||h - p_ood||, q_ood = softmax(s)_{C+1}   (closed form, batched)
  bank = {gamma(x) : x in train, argmax logits(x) = y(x)} (`correct_only`);
  score(x) = -(squared L2 distance from gamma(x) to its k-th nearest bank gradient)   (an ID score)
  `score: grad_norm`: -||gamma(x)||_1 (the first author's tood-continual-ood config). Prediction = nearest p_c.

One evaluation pass (`ood.evaluation.callback`). During the fit split's pass `test_step` also takes z_l, which is never cached:
it feeds per-class sums and keeps z_l of the first `n_proto` (rounded up to whole batches) training samples, both
through the shared DDP-exact reducers of `ood.features.reduce` (`ClassSums`, `FirstN`), so the prototypes equal
the single-process ones (up to float summation order); `setup_ood` re-runs the network from `mix_layer` on the
kept samples only.

Deviations from the paper and the released code:
- `k` is honoured (distance to the k-th neighbour); the released code ignores it (1-NN). Default 1 = released.
- `index: exact` (default) is an exact index via `ood/neighbors.py`. `ivf_as_released` reproduces the released faiss
  IVF-Flat (nlist = floor(4 sqrt(T)), T = min(600, int(0.8 x train batches)), nprobe 4, gradients of batch T
  dropped) except that faiss k-means is trained on at most 256 nlist rows drawn from the whole kept bank, not on the
  first T batches only, and that a query whose 4 probed cells hold fewer than k gradients probes more cells
  (released: faiss' -1 / 3.4e38 padding).
- The released yaml's `lam: 0.8` is unused (mix-up hard-codes 0.5): `mix_lambda` defaults to 0.5 and is used.
- The released code mixes on OpenOOD's training loader (legacy pipeline: shuffled, augmented, batch
  `dataset.train.batch_size`); here the first training samples in dataset order, without augmentation, from the
  shared evaluation pass. `val_ood` rounds `n_proto` up to whole `proto_batch_size` batches too (released: whole
  batches of the OOD loader, `ood_dataset.batch_size`).
- `mix_layer` is a stage name (default: the first stage after the stem); the released code uses a feature-list
  index (yaml 3, sweep [1]) and its ResNet-18 restart lookup misses the stem ReLU; `forward_from` is exact.
- `uniform_noise` draws from a fixed-seed generator (seed 0) and, like the released code, does not apply the
  dataset normalisation to the noise images (the released code computes mean/std and leaves them unused).
- The APS grid (a no-op in the released code), `sampling_ratio` (fixed at 1: every training sample), the
  leftover flags (`use_mixup_loss`, `use_nearest_proto`) and the off-by-default variants (`use_pseudo_prototype`,
  `distance_loss`, `no_gradients`, `filter_ood`, `use_cosine`, `use_val`) are not implemented.
- The penultimate prototypes p_c are accumulated in the same evaluation-pass sums as p^l_c (one DDP-safe code
  path); they equal the class means of the cached train bank (tested).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from ood.data.batch import Batch
from ood.data.benchmark import EvalSplit
from ood.data.fit import FitData
from ood.errors import ConfigError, check_every_class, check_range
from ood.features.bank import FeatureBank
from ood.features.passes import forward_dataset
from ood.features.reduce import ClassSums, FirstN
from ood.methods.base import OptimizerFactory, SchedulerFactory
from ood.methods.ce import CrossEntropy
from ood.models.adapters import unsplit_error
from ood.models.base import Backbone
from ood.neighbors import KNNIndex
from ood.utils import get_logger

log = get_logger(__name__)

ProtoSource = Literal["synthetic_mixup", "val_ood", "uniform_noise", "proto_mean"]
PROTO_SOURCES = ("synthetic_mixup", "val_ood", "uniform_noise", "proto_mean")
SCORES = ("knn", "grad_norm")
INDEXES = ("exact", "ivf_as_released")


VAL_OOD_MISSING = (
    "grood: ood_proto_source=val_ood needs a benchmark with a validation-OOD set (data=folder: "
    "'+data.ood.val=<folder>'); or pick synthetic_mixup, uniform_noise or proto_mean"
)


def ncp_gradient(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """GROOD's gradient feature, closed form: q_ood(h) * unit(h - p_ood) for every row h of `features` [N, D].

    `prototypes` [C+1, D] stacks the class prototypes and the OOD prototype (last). This is the gradient of
    CE(softmax(-||h - P_j||), y_hat) w.r.t. p_ood for any class label y_hat (never the OOD index).
    """
    dist = torch.cdist(features, prototypes, compute_mode="donot_use_mm_for_euclid_dist")
    q_ood = (-dist).softmax(1)[:, -1:]
    return q_ood * F.normalize(features - prototypes[-1], dim=1)


def nearest_prototype(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """[N] index of the nearest row of `prototypes` [C, D] (Euclidean)."""
    dist = torch.cdist(features, prototypes.to(features), compute_mode="donot_use_mm_for_euclid_dist")
    return dist.argmin(1)


def default_mix_layer(backbone: Backbone) -> str:
    """The first stage after the stem (`layer_names[1]` when stage 0 is `stem`, else `layer_names[0]`)."""
    names = backbone.layer_names
    return names[1] if names[0] == "stem" and len(names) > 1 else names[0]


@dataclass
class FitSummary:
    """What the fit split's pass yields: early and penultimate class prototypes, the kept mix-up samples."""

    early_prototypes: torch.Tensor
    class_prototypes: torch.Tensor
    counts: torch.Tensor
    kept_maps: torch.Tensor
    kept_logits: torch.Tensor
    input_shape: tuple[int, ...]
    batch_size: int
    #: `n_proto` rounded up to whole batches of `batch_size`: the images that build the OOD prototype
    n_keep: int


class FitSplitStats:
    """Accumulates, batch by batch, the fit split's class sums and the first `n_keep` samples' early maps, through
    the shared DDP-exact reducers (`ood.features.reduce`).

    `n_keep` = `n_proto` rounded up to whole batches of the training batch size B (the released code's "whole
    batches" rule; on the unshuffled fit loader these are dataset indices 0..n_keep-1 on any number of ranks).
    """

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], n_proto: int, batch_size: int) -> None:
        self.batch_size = batch_size
        self.input_shape = input_shape
        self.n_keep = math.ceil(n_proto / self.batch_size) * self.batch_size
        # float32 at least: maps cached under bf16 autocast (trainer=gpu_fast) would be summed in bf16, whose 8
        # mantissa bits stop a running sum of 5,000 values near 0.7 at 256
        self.sums = ClassSums(num_classes, dtypes={"features": torch.float64, "maps": torch.float32})
        self.kept = FirstN(self.n_keep, ["maps", "logits"])
        self._summary: FitSummary | None = None

    def update(
        self,
        index: torch.Tensor,
        labels: torch.Tensor,
        maps: torch.Tensor,
        features: torch.Tensor,
        logits: torch.Tensor,
    ) -> None:
        self.sums.update(index, labels, maps=maps, features=features)
        if self.kept.device != maps.device:
            self.kept = self.kept.to(maps.device)
        self.kept.update(index=index, maps=maps, logits=logits)

    def summary(self) -> FitSummary:
        """Synced (under DDP) prototypes and kept samples; computed once."""
        if self._summary is None:
            sums, counts = self.sums.compute()
            check_every_class("grood", counts.tolist(), "they have no prototype", fit_split=True)
            maps = sums["maps"]
            kept = self.kept.compute()
            self._summary = FitSummary(
                early_prototypes=maps / counts.view(-1, *([1] * (maps.dim() - 1))).to(maps),
                class_prototypes=(sums["features"] / counts[:, None]).float(),
                counts=counts,
                kept_maps=kept["maps"],
                kept_logits=kept["logits"],
                input_shape=self.input_shape,
                batch_size=self.batch_size,
                n_keep=self.n_keep,
            )
        return self._summary


class GROOD(CrossEntropy):
    """CE training; GROOD score (nearest-neighbour distance of NCP-loss gradients w.r.t. an OOD prototype).

    Args:
        backbone, optimizer, scheduler: as `CrossEntropy`.
        ood_proto_source: `synthetic_mixup` | `val_ood` | `uniform_noise` | `proto_mean`.
        mix_layer: stage whose output is mixed (None: the first stage after the stem).
        mix_lambda: weight of the sample's own early map in the mix-up.
        n_proto: at least this many images (whole batches) build the OOD prototype.
        k: the score is the distance to the k-th nearest bank gradient (released code: 1).
        correct_only: bank only the gradients of correctly classified training samples.
        score: `knn` (paper) or `grad_norm` (-||gamma||_1).
        index: `exact` or `ivf_as_released`; `nprobe` cells are searched by the latter (released: 4).
        proto_batch_size: the batch size `n_proto` is rounded up to (the training batch size, `${data.batch_size}`).
        init: as `OODMethod`.
    """

    name = "grood"

    def __init__(
        self,
        backbone: Backbone,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        ood_proto_source: ProtoSource = "synthetic_mixup",
        mix_layer: str | None = None,
        mix_lambda: float = 0.5,
        n_proto: int = 100,
        k: int = 1,
        correct_only: bool = True,
        score: Literal["knn", "grad_norm"] = "knn",
        index: Literal["exact", "ivf_as_released"] = "exact",
        nprobe: int = 4,
        proto_batch_size: int = 128,
        init: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(backbone, optimizer, scheduler, init)
        for key, value, choices in (
            ("ood_proto_source", ood_proto_source, PROTO_SOURCES),
            ("score", score, SCORES),
            ("index", index, INDEXES),
        ):
            if value not in choices:
                raise ConfigError(f"grood: unknown {key} {value!r}; choices: {list(choices)}")
        for key, value in (("k", k), ("n_proto", n_proto), ("nprobe", nprobe), ("proto_batch_size", proto_batch_size)):
            check_range(f"method.{key}", value, 1, integer=True)
        check_range("method.mix_lambda", mix_lambda, 0, 1)
        self.mix_layer = mix_layer if mix_layer is not None else default_mix_layer(backbone)
        backbone.check_layer(self.mix_layer)
        if ood_proto_source == "synthetic_mixup" and not backbone.staged:
            # refused here, not after training and the evaluation pass: the mix-up re-runs the network from mix_layer
            raise unsplit_error(getattr(backbone, "net", backbone), self.mix_layer)
        self.ood_proto_source, self.mix_lambda, self.n_proto = ood_proto_source, mix_lambda, n_proto
        self.k, self.correct_only, self.nprobe = k, correct_only, nprobe
        self.proto_batch_size = proto_batch_size
        self.score_kind, self.index_kind = score, index
        self._stats: FitSplitStats | None = None
        self.prototypes: torch.Tensor | None = None
        self.early_prototypes: torch.Tensor | None = None
        self.bank_index: KNNIndex | None = None

    # ----- fit-time check -------------------------------------------------------------------------------------
    def prepare(self, data: FitData) -> None:
        """Refuses `ood_proto_source=val_ood` on a benchmark without a validation-OOD set at fit start, not after
        training and the evaluation pass (`setup_ood` needs it)."""
        if self.ood_proto_source == "val_ood" and "val_ood" not in data.datasets:
            raise ConfigError(VAL_OOD_MISSING)

    # ----- the evaluation pass --------------------------------------------------------------------------------
    def begin_evaluation(self, splits: Sequence[EvalSplit]) -> None:
        super().begin_evaluation(splits)
        self._stats, self.prototypes, self.early_prototypes, self.bank_index = None, None, None, None

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        if self.eval_split(dataloader_idx).role != "fit":
            return super().test_step(batch, batch_idx, dataloader_idx)
        x, y, index = batch.x, batch.y, batch.index
        out = self.backbone.run(x, (self.mix_layer,))
        early = out.layers[self.mix_layer]
        if self._stats is None:
            # "whole batches" are training batches (the released code mixes on the training loader it is handed), so
            # results do not depend on the evaluation batch size
            self._stats = FitSplitStats(
                self.backbone.num_classes, tuple(x.shape[1:]), self.n_proto, self.proto_batch_size
            )
        self._stats.update(index, y, early, out.features, out.logits)
        return {"index": index, "labels": y, "logits": out.logits, "features": out.features}

    def fit_summary(self) -> FitSummary:
        """The fit split's prototypes and kept samples (available once the fit split has been evaluated)."""
        if self._stats is None:
            raise RuntimeError(
                "grood: no training split was evaluated; run the evaluation pass (trainer.test) first"
            )
        return self._stats.summary()

    # ----- setup ---------------------------------------------------------------------------------------------
    def setup_ood(self, banks: Mapping[str, FeatureBank]) -> None:
        """Class and OOD prototypes, then the bank of training gradients (`FeatureBank` keyed by split)."""
        start = time.perf_counter()
        summary = self.fit_summary()
        self.early_prototypes = summary.early_prototypes
        p_ood = self.ood_prototype(banks, summary)
        self.prototypes = torch.cat([summary.class_prototypes, p_ood[None].to(summary.class_prototypes)])
        if self.score_kind == "knn":
            self.bank_index = self._build_index(banks["train"], summary.batch_size)
        log.info("grood setup (%s prototype): %.2f s", self.ood_proto_source, time.perf_counter() - start)

    def ood_prototype(self, banks: Mapping[str, FeatureBank], summary: FitSummary) -> torch.Tensor:
        """[D] OOD prototype from `ood_proto_source`; `val_ood` reads `banks["val_ood"]` and nothing else."""
        if self.ood_proto_source == "proto_mean":
            return summary.class_prototypes.double().mean(0)
        if self.ood_proto_source == "val_ood":
            if "val_ood" not in banks:
                raise ConfigError(VAL_OOD_MISSING)
            return banks["val_ood"].features[:summary.n_keep].double().mean(0)
        if self.ood_proto_source == "uniform_noise":
            return self._noise_features(summary.input_shape).double().mean(0)
        return self._mixup_features(summary).double().mean(0)

    def _mixup_features(self, summary: FitSummary) -> torch.Tensor:
        """Penultimate features of the kept training samples mixed with their second class's early prototype."""
        second = summary.kept_logits.topk(2, dim=1).indices[:, 1]
        mixed = self.mix_lambda * summary.kept_maps + (1 - self.mix_lambda) * summary.early_prototypes[second]
        # maps cached under bf16 autocast (trainer=gpu_fast) are bf16; this pass runs outside autocast
        mixed = mixed.to(next(self.backbone.parameters()).dtype)
        with torch.no_grad():
            return torch.cat(
                [self.backbone.forward_from(self.mix_layer, z) for z in mixed.split(summary.batch_size)]
            )

    def _noise_features(self, input_shape: tuple[int, ...]) -> torch.Tensor:
        """Penultimate features of the 10 lowest-logsumexp of every 100 blurred uniform-noise images."""
        gen = torch.Generator().manual_seed(0)
        chunks = []
        for _ in range(math.ceil(self.n_proto / 100)):
            images = torch.rand((100, *input_shape), generator=gen)
            sigma = float(torch.empty(()).uniform_(0.2, 5.0, generator=gen))
            chunks.append(gaussian_blur(images, [5, 7], [sigma, sigma]))
        backbone = self.backbone

        def features_and_lse(x: torch.Tensor) -> dict[str, torch.Tensor]:
            out = backbone.run(x)
            return {"features": out.features, "lse": out.logits.logsumexp(1)}

        out = forward_dataset(
            features_and_lse, torch.cat(chunks), module=backbone, batch_size=100, desc="grood: noise prototype"
        )
        keep = [i * 100 + torch.topk(-lse, 10).indices for i, lse in enumerate(out["lse"].split(100))]
        return out["features"][torch.cat(keep)]

    def _build_index(self, train: FeatureBank, batch_size: int) -> KNNIndex:
        assert train.labels is not None and self.prototypes is not None
        grads = ncp_gradient(train.features, self.prototypes.to(train.features))
        keep = (
            train.predictions == train.labels
            if self.correct_only
            else torch.ones_like(train.labels, dtype=torch.bool)
        )
        if not bool(keep.any()):
            raise ConfigError(
                f"grood: none of the {len(train)} training images is classified correctly, so its gradient bank "
                "(correct_only=true) is empty; check that the model's class order is the data's (class folders "
                "sorted by name), or set method.correct_only=false"
            )
        if self.index_kind == "exact":
            return KNNIndex("l2", "exact", device=grads.device).add(grads[keep])
        n_batches = math.ceil(len(train) / batch_size)
        t = min(600, int(0.8 * n_batches))
        dropped = (train.index >= t * batch_size) & (train.index < (t + 1) * batch_size)
        return KNNIndex(
            "l2", "ivf", nlist=max(1, int(4 * math.sqrt(t))), nprobe=self.nprobe, device=grads.device
        ).add(grads[keep & ~dropped])

    # ----- scoring -------------------------------------------------------------------------------------------
    def gradients(self, bank: FeatureBank) -> torch.Tensor:
        """[N, D] gradient features of `bank` (after `setup_ood`)."""
        if self.prototypes is None:
            raise RuntimeError("grood: setup_ood has not run")
        return ncp_gradient(bank.features, self.prototypes.to(bank.features))

    def ood_score(self, bank: FeatureBank) -> torch.Tensor:
        grads = self.gradients(bank)
        if self.score_kind == "grad_norm":
            return -grads.abs().sum(1)
        assert self.bank_index is not None
        dist, _ = self.bank_index.search(grads, self.k)
        return -dist[:, -1]

    def predict(self, bank: FeatureBank) -> torch.Tensor:
        """Nearest class prototype (the released code's NCC prediction), not the softmax argmax."""
        return nearest_prototype(bank.features, self.fit_summary().class_prototypes)
