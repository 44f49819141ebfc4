"""OAL (`method=oal`): outlier-aware learning by distillation from a frozen teacher plus CLUB on latent outliers.

Paper: H. Gao et al., "OAL: Enhancing OOD Detection Using Latent Diffusion", arXiv 2406.16525 (ICMR 2025).
Released code: HengGao12/OAL (an OpenOOD fork): `openood/trainers/oal_trainer.py` (the loss, the optimiser
groups, the schedule), `openood/trainers/ood_distill_trainer.py` (the kNN-only variant run on digits),
`openood/losses/mi_loss.py` + `deep_mi_loss.py` (CLUB), `openood/networks/kd_model.py` (the projector DT),
`openood/networks/knn.py` (boundary sampling), `outlier_generation/outlier_generate.py` (SD latents).

A fine-tuning stage. Before training (`prepare`, once, identically on every rank): the frozen teacher is built and
loaded from `method.teacher.ckpt` (or, when none is given, trained on the ID train set and cached: `ood.methods.oal_teacher`;
built for training only and in no checkpoint: evaluation reads the student alone);
its features of the ID train set (no augmentation) are cached on disk keyed by the teacher file's SHA-256 and the train images' preprocessing; per class, boundary outliers
o^knn are sampled in that feature space (`ood.methods.oal_sampling`) and rescaled (`outlier_norm`). Per ID batch of
N, with N random rows of the outlier bank (no pairing with the batch; outliers never enter the student):

  L = CE(l_s, y) + 4 KL(S(l_t) || S(l_s)) + 8 KL(S(DT(u)) || S(h)) + 0.1 CLUB(o^knn, h) [+ 0.2 CLUB_deep(o^sd, h)]

l_s, h = student logits and penultimate features; l_t, u = teacher logits and features on the same batch (no_grad);
DT = BN-Linear-ReLU-BN projector; KL batch-mean at T = 1 (`ood.losses.distill_kl`); CLUB = `ood.losses.club` with
the q-network `CLUBNet` (mu: D_t-256-D_s; logvar: D_t-256-D_s-tanh; deep: 64-32-16-256-D_s / 64-256-D_s-tanh).
Score (`detector=oal`): energy of the student logits, logsumexp(l_s) = -E(x).

Optimiser (released): SGD Nesterov, momentum 0.9, wd 5e-4; learning rates per group: student `lr`, projector
`lr_proj` (0.01), CLUB q-networks `lr_club` (1e-4); OpenOOD's cosine per step to 1e-8 on every group
(`method.scheduler`: `ood.methods.schedules.OpenOODCosine`, as the OpenOOD presets).

Released-code quirks, and where this differs:
- `club_fit: as_released` (default): the q-networks minimise the same total loss (so they *lower* the CLUB value
  instead of fitting q); `mle`: q is fitted by maximum likelihood (`ood.losses.club_nll`, the released but never
  called `learning_loss`) on detached h, while the student minimises CLUB through a detached q.
- The outlier rows of a step are drawn with `torch.randperm` from a generator seeded by (`sampling_seed`, step)
  (released: the global RNG), so every DDP rank draws the same global-batch rows; CLUB is estimated over the global
  batch (each rank's rows against every rank's h, `ood.losses.club(..., anchors=)`), as on one device. There are as
  many rows as images in the batch (released: `ood_sample_num` 128, and 80 on the last step: the partial last batch
  of 50,000 CIFAR images that OpenOOD's loader keeps, as the OAL presets do with `data.drop_last=false`).
- Token-norm rescaling of the outliers (the norm of a CLIP token embedding, about 27) needs the CLIP text encoder:
  `outlier_norm: clip_token` reads per-class token embeddings from `token_embeddings=<file.npy>`; `teacher_mean`
  (the digits default) rescales to the class's mean teacher-feature norm; a float is used as given.
- SD latents (`w_mi_sd`, default 0, `sd_latents=<file.npy>`): the released generator (DreamOOD's SD v1.4 script)
  runs PLMS 50 steps, guidance 7.5, 512 px, eta 0 on "A high-quality image of the <class>" with the class token
  embedding replaced by a stage-B outlier, keeps the final latent [4, 64, 64] (never decoded for training),
  averages its 4 channels, then its 64 rows: one 64-d vector per image, 300 per dataset. This project runs no SD
  model: the file is read from disk ([n, 64], [n, 64, 64] or the released [n_iter, batch, 64, 64]); without a file
  the branch is off and the run says so.
- `knn_features` (default null: the teacher's features of ID train). The released repository holds two samplers.
  The one its README runs (`scripts/get_id_features_cifar{10,100}.py`, then `scripts/get_embed_cifar{10,100}.py`)
  samples in ViT-B/16 features (CIFAR-100: the fine-tuned teacher's; CIFAR-10: the ImageNet ViT file
  `pytorch_model.bin`), 10 repetitions for CIFAR-10 and 100 for CIFAR-100 (the trainer's note on the CIFAR-10 bank it
  loads, "(10, 1000, 768)", is this one's shape). DreamOOD's copy (`outlier_generation/scripts/`) samples in a
  text-anchored ResNet-34's features (`outlier_generation/pretrain_cifar100.py`: 768-d outputs trained toward the CLIP
  class-token embeddings, the first 500 training images per class, `id_feat_<data>_199epoch.npy`, [C, 500, 768]),
  100 repetitions for both. `knn_features=<file>` samples in a file's rows instead (`load_knn_features`); their width
  must be the teacher's (the q-network's input).
- Not reproduced: the `energy_rl` ablation (off in the released runs); an unused ViT data loader (the teacher sees
  the student batch here as there).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ood.data.batch import Batch
from ood.data.fit import FitData
from ood.data.npy import load_npy
from ood.detectors.logits import energy_score
from ood.errors import ConfigError, check_every_class, check_range
from ood.features.bank import FeatureBank
from ood.losses import club, club_nll, distill_kl
from ood.methods.base import OODMethod, OptimizerFactory, SchedulerFactory
from ood.methods.distributed import gather_global
from ood.methods.oal_sampling import RANKINGS, boundary_samples, class_count
from ood.methods.oal_teacher import TEACHER_KEYS, teacher_features, teacher_file
from ood.models.base import Backbone, input_channels
from ood.models.checkpoint import load_modules, read_state_dict
from ood.utils import get_logger

log = get_logger(__name__)

CLUB_FITS = ("as_released", "mle")


class Projector(nn.Sequential):
    """OAL's DT: BatchNorm(in) - Linear(in, out) - ReLU - BatchNorm(out), teacher features -> student width."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(
            nn.BatchNorm1d(in_dim), nn.Linear(in_dim, out_dim), nn.ReLU(), nn.BatchNorm1d(out_dim)
        )


def _mlp(dims: Sequence[int], last: nn.Module | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers, *([last] if last is not None else []))


class CLUBNet(nn.Module):
    """The variational q(h | o) = N(mu(o), diag exp(logvar(o))) of CLUB: two MLPs, logvar squashed by tanh.

    `mu_hidden` / `logvar_hidden`: hidden widths (released CLUB: (256,) and (256,); DEEP_CLUB: (32, 16, 256), (256,)).
    """

    def __init__(
        self, x_dim: int, y_dim: int, mu_hidden: Sequence[int], logvar_hidden: Sequence[int]
    ) -> None:
        super().__init__()
        self.p_mu = _mlp([x_dim, *mu_hidden, y_dim])
        self.p_logvar = _mlp([x_dim, *logvar_hidden, y_dim], nn.Tanh())

    def forward(self, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.p_mu(o), self.p_logvar(o)


def load_sd_latents(path: str | Path) -> torch.Tensor:
    """SD latent outliers as [n, d]: rows of an [n, d] file; [n, H, W] (channel-averaged latents) averaged over rows;
    the released `[n_iter, batch, H, W]` flattened first, then averaged over rows."""
    array = torch.from_numpy(load_npy(path, "method.sd_latents")).float()
    if array.ndim == 4:
        array = array.reshape(-1, *array.shape[2:])
    if array.ndim == 3:
        array = array.mean(1)
    if array.ndim != 2:
        raise ConfigError(
            f"{path}: SD latents must be [n, d], [n, H, W] or [n_iter, batch, H, W]; got {tuple(array.shape)}"
        )
    return array


def knn_features_file(path: str | Path, classes: int, dim: int) -> np.ndarray:
    """The released `id_feat_*.npy` ([C, n, D]: n feature rows per class, class by class), memory-mapped, its shape
    checked: read before the teacher trains too (`OAL.check_training_files`), as a file of another layout failed
    after the teacher was trained."""
    array = load_npy(path, "method.knn_features", mmap=True)
    if array.ndim != 3 or len(array) != classes or array.shape[-1] != dim:
        raise ConfigError(
            f"{path}: method.knn_features must be [classes={classes}, n, teacher feature dim={dim}] (the released "
            f"id_feat_*.npy layout); got {tuple(array.shape)}"
        )
    return array


def load_knn_features(path: str | Path, classes: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [C * n, D], labels) of a released `id_feat_*.npy` (`knn_features_file`), the space the released
    boundary outliers were sampled in; D must be `dim`, the q-network's input."""
    array = torch.from_numpy(np.array(knn_features_file(path, classes, dim))).float()
    check_finite("method.knn_features", path, array)
    return array.reshape(-1, dim), torch.arange(classes).repeat_interleave(array.shape[1])


def load_token_embeddings(path: str | Path, classes: int) -> torch.Tensor:
    """The per-class CLIP token rows [classes, d] of `method.token_embeddings` (`outlier_norm: clip_token` rescales
    each class's outliers to its row's norm), checked: read before the teacher trains too
    (`OAL.check_training_files`)."""
    array = torch.from_numpy(load_npy(path, "method.token_embeddings")).float()
    if array.ndim != 2 or len(array) != classes:
        raise ConfigError(f"method.token_embeddings: {path} must be [classes={classes}, d] (one CLIP token row per "
                          f"class); got {tuple(array.shape)}")
    check_finite("method.token_embeddings", path, array)
    return array


def check_finite(what: str, path: str | Path, array: torch.Tensor) -> None:
    """Refuse a file of NaN or infinite values, naming its first bad row: they spread to every outlier silently."""
    bad = (~torch.isfinite(array)).flatten(1).any(1).nonzero().flatten().tolist() if array.ndim > 1 else []
    if bad:
        raise ConfigError(f"{what}: {path} holds NaN or infinite values in {len(bad)} rows (the first: row {bad[0]})")


class OAL(OODMethod):
    """Distillation from a frozen teacher + CLUB against boundary outliers; scored by the energy of the student.

    Args:
        backbone, optimizer, scheduler, init: as `OODMethod` (the student starts from `init.ckpt`; `scheduler`
            applies to every parameter group: released, OpenOOD's per-step cosine to 1e-8).
        teacher: `{backbone: factory(num_classes) -> Backbone, ckpt, source, epochs, lr, batch_size, seed}` (the
            `method/teacher=` group): `ckpt` null = train it on ID train first (cached under `cache_dir`); `source`
            = the prefix of the teacher's weights in the file (`backbone` for an `ood-train` checkpoint).
        w_kd_logit, w_kd_feat, w_mi_knn, w_mi_sd: loss weights (released: 4, 8, 0.1, 0.2; `w_mi_sd` default 0).
        sd_latents: a `.npy` of SD latent outliers (see the module docstring), or null (branch off).
        club_fit: `as_released` | `mle` (module docstring). club_hidden: the released q-network hidden size (512).
        lr_proj, lr_club: learning rates of the projector and the q-networks.
        knn_k, knn_select: K and the number of boundary points per class (>= 1: a count; < 1: a fraction of n_c).
        knn_per_class: use at most this many training features per class (seeded subset; null = all).
        knn_features: a released-layout `.npy` of ID features to sample in ([C, n, D_t]; null = the teacher's).
        n_candidates, knn_sigma, knn_keep, knn_repeats: candidate draws per point, noise scale, kept per point,
            repetitions. knn_ranking: `own` | `released` (the released code's index layout, see
            `ood.methods.oal_sampling`). outlier_norm: `teacher_mean` | `clip_token` | a float; token_embeddings: per-class rows
            for `clip_token`. sampling_seed: seed of the sampler. cache_dir: where teachers and features are cached.
    """

    name = "oal"
    #: parts a checkpoint of this method does not hold (older ones did: `ood.models.checkpoint.load_modules` and
    #: `on_load_checkpoint` skip them there)
    unstored_parts: ClassVar[tuple[str, ...]] = ("teacher",)

    def __init__(
        self,
        backbone: Backbone,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        init: Mapping[str, Any] | None = None,
        teacher: Mapping[str, Any] | None = None,
        w_kd_logit: float = 4.0,
        w_kd_feat: float = 8.0,
        w_mi_knn: float = 0.1,
        w_mi_sd: float = 0.0,
        sd_latents: str | None = None,
        club_fit: str = "as_released",
        club_hidden: int = 512,
        lr_proj: float = 0.01,
        lr_club: float = 1e-4,
        knn_k: float = 300,
        knn_select: float = 50,
        knn_per_class: int | None = None,
        knn_features: str | None = None,
        n_candidates: int = 1500,
        knn_sigma: float = 0.07,
        knn_keep: int = 2,
        knn_repeats: int = 10,
        knn_ranking: Literal["own", "released"] = "own",
        outlier_norm: str | float = "teacher_mean",
        token_embeddings: str | None = None,
        sampling_seed: int = 0,
        cache_dir: str = "cache",
    ) -> None:
        super().__init__(backbone, optimizer, scheduler, init)
        if club_fit not in CLUB_FITS:
            raise ConfigError(f"method.club_fit={club_fit!r}; choices: {list(CLUB_FITS)}")
        for key, value, low, open_low in (
            ("w_kd_logit", w_kd_logit, 0, False), ("w_kd_feat", w_kd_feat, 0, False), ("w_mi_knn", w_mi_knn, 0, False),
            ("w_mi_sd", w_mi_sd, 0, False), ("knn_k", knn_k, 0, True), ("knn_select", knn_select, 0, True),
            ("knn_sigma", knn_sigma, 0, True), ("lr_proj", lr_proj, 0, False), ("lr_club", lr_club, 0, False),
        ):
            check_range(f"method.{key}", value, low, open_low=open_low)
        for key, value in (("knn_k", knn_k), ("knn_select", knn_select)):  # >= 1 a count: 1.5 was cut to 1
            if value >= 1:
                check_range(f"method.{key}", value, 1, integer=True)
        # sampling_seed=0.5 failed in torch.manual_seed at fit start, after the teacher had trained
        for key, value, low in (("n_candidates", n_candidates, 1), ("knn_keep", knn_keep, 1),
                                ("knn_repeats", knn_repeats, 1), ("knn_per_class", knn_per_class, 1),
                                ("club_hidden", club_hidden, 2), ("sampling_seed", sampling_seed, 0)):
            check_range(f"method.{key}", value, low, integer=True)
        teacher = dict(teacher or {})
        if "backbone" not in teacher or set(teacher) - TEACHER_KEYS:
            raise ConfigError(
                f"method.teacher needs a backbone; keys {sorted(TEACHER_KEYS)}, got {sorted(teacher)}"
            )
        # a teacher trained here: epochs=-1 gave an untrained one, batch_size=2.5 batches of 2, seed=0.5 seed 0
        if not teacher.get("ckpt"):
            for key, low, open_low, integer in (("epochs", 1, False, True), ("lr", 0, True, False),
                                                ("batch_size", 1, False, True), ("seed", 0, False, True)):
                check_range(f"method.teacher.{key}", teacher.get(key), low, open_low=open_low, integer=integer)
        channels = input_channels(backbone)
        if channels is not None:  # the teacher reads the images the student reads (grey digits, RGB folders)
            teacher["backbone"] = partial(teacher["backbone"], in_channels=channels)
        self.teacher_cfg = teacher
        self._teacher: Backbone | None = None
        with torch.device("meta"):  # its feature width only: no weights, no draw from the run's random stream
            d_t = teacher["backbone"](num_classes=backbone.num_classes).feature_dim
        d_s, half = backbone.feature_dim, club_hidden // 2
        self.projector = Projector(d_t, d_s)
        self.club_knn = CLUBNet(d_t, d_s, (half,), (half,))
        self.w_mi_sd = self._sd_branch(w_mi_sd, sd_latents)
        self.club_sd = (
            CLUBNet(self.sd_dim, d_s, (self.sd_dim // 2, self.sd_dim // 4, half), (half,))
            if self.w_mi_sd
            else None
        )
        if not (isinstance(outlier_norm, (int, float)) or outlier_norm in ("teacher_mean", "clip_token")):
            raise ConfigError(
                f"method.outlier_norm={outlier_norm!r}; choices: teacher_mean, clip_token, or a number"
            )
        if not isinstance(outlier_norm, str):  # 0 put every outlier at the origin, a negative one flipped them
            check_range("method.outlier_norm", outlier_norm, 0, open_low=True)
        if outlier_norm == "clip_token" and not token_embeddings:
            raise ConfigError(
                "method.outlier_norm=clip_token needs method.token_embeddings=<file.npy> (one CLIP token row per class)"
            )
        self.w_kd_logit, self.w_kd_feat, self.w_mi_knn = w_kd_logit, w_kd_feat, w_mi_knn
        self.club_fit, self.lr_proj, self.lr_club = club_fit, lr_proj, lr_club
        self.sampling = dict(
            k=knn_k,
            select=knn_select,
            n_candidates=n_candidates,
            sigma=knn_sigma,
            keep=knn_keep,
            repeats=knn_repeats,
            ranking=knn_ranking,
        )
        if knn_ranking not in RANKINGS:
            raise ConfigError(f"method.knn_ranking={knn_ranking!r}; choices: {list(RANKINGS)}")
        self.knn_per_class, self.outlier_norm, self.token_embeddings = (
            knn_per_class,
            outlier_norm,
            token_embeddings,
        )
        self.sampling_seed, self.cache_dir = sampling_seed, Path(cache_dir)
        self.knn_features = knn_features
        self.register_buffer("outliers_knn", torch.empty(0, d_t), persistent=False)
        self.register_buffer("outliers_sd", torch.empty(0, self.sd_dim), persistent=False)
        self.stats: dict[str, Any] = {}

    def _sd_branch(self, weight: float, path: str | None) -> float:
        """The effective SD-branch weight; sets `sd_dim` (the latent width, read from the file header)."""
        self.sd_path, self.sd_dim = path, 64
        if not weight:
            if path:
                log.warning("oal: method.sd_latents=%s is ignored because method.w_mi_sd=0", path)
            return 0.0
        if not path:
            log.warning(
                "oal: SD latent branch off: method.w_mi_sd=%s but no method.sd_latents=<file.npy> given",
                weight,
            )
            return 0.0
        shape = load_npy(path, "method.sd_latents (a .npy of SD latents; see the oal docstring)", mmap=True).shape
        self.sd_dim = int(shape[-1])
        return float(weight)

    def check_training_files(self) -> None:
        """`method.token_embeddings` (with `outlier_norm: clip_token`) and `method.knn_features`' layout, first thing
        in `prepare`: they were read after the teacher's training and features, where a file of another layout failed
        (or a NaN row made a class's outliers NaN silently) long after the run started. Not at construction: an
        evaluation, which builds the method too, reads neither file."""
        if self.outlier_norm == "clip_token":
            load_token_embeddings(self.token_embeddings, self.backbone.num_classes)
        if self.knn_features:
            knn_features_file(self.knn_features, self.backbone.num_classes, self.teacher.feature_dim)

    # ----- the teacher: built for training only, no part of the method's weights ----------------------------------
    @property
    def teacher(self) -> Backbone:
        """The frozen teacher, built on first use (`prepare`: training) and never by evaluation, which reads the
        student alone. Not a registered sub-module: it is in no checkpoint (its weights are its file's, read again at
        every fit start, a resumed one too), in no optimiser group, and stays in eval mode through `train()`."""
        teacher = self._teacher
        if teacher is None:
            with torch.random.fork_rng(devices=[]):  # random weights, overwritten from its file: the run's stream is kept
                teacher = self.teacher_cfg["backbone"](num_classes=self.backbone.num_classes)
            teacher.requires_grad_(False).eval()
            object.__setattr__(self, "_teacher", teacher)  # not registered (nn.Module.__setattr__ would)
        return teacher

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming a run saved when the teacher was part of the method's weights: its `teacher.*` entries dropped."""
        state, skipped = checkpoint.get("state_dict", {}), tuple(f"{part}." for part in self.unstored_parts)
        for key in [k for k in state if k.startswith(skipped)]:
            del state[key]

    # ----- before training: teacher, its features, the outlier banks (once, identically on every rank) ---------
    def prepare(self, data: FitData) -> None:
        """Teacher (`ood.methods.oal_teacher`), its ID-train features, the outlier banks (skipped when present)."""
        if len(self.outliers_knn):
            return
        if not self.init_ckpt:  # as the energy fine-tunes say: the student is the CE classifier it distils into
            log.warning("%s fine-tunes a trained CE student, but no method.init.ckpt is set: starting from random weights",
                        self.name)
        self.check_training_files()
        path, seconds = teacher_file(self.teacher_cfg, data, self.cache_dir)
        if seconds is not None:
            self.stats["teacher_train_seconds"] = seconds
        self.load_teacher(path)
        self.teacher.to(data.device, data.dtype)  # where and as the student is (not moved with the method)
        if self.knn_features:
            feats, labels = load_knn_features(self.knn_features, self.backbone.num_classes, self.teacher.feature_dim)
            log.info("oal: boundary outliers sampled in the features of %s", self.knn_features)
        else:
            start = time.perf_counter()
            features, hit = teacher_features(self.teacher, path, data, self.cache_dir)
            seconds = time.perf_counter() - start
            self.stats.update(teacher_features_cache_hit=float(hit), teacher_features_seconds=seconds)
            log.info("oal: teacher features of ID train %s in %.2fs", "read from the cache" if hit else "computed and cached",
                     seconds)
            feats, labels = features["features"], features["labels"]
        self.outliers_knn = self._sample(feats, labels).to(data.device, data.dtype)
        n_knn = len(self.outliers_knn)
        if n_knn < data.batch_size:  # a training batch draws batch_size of them without replacement
            raise ConfigError(
                f"oal: {n_knn} boundary outliers < batch size {data.batch_size}; raise method.knn_repeats or lower "
                f"data.batch_size to {n_knn} or less"
            )
        if self.w_mi_sd:
            self.outliers_sd = load_sd_latents(self.sd_path).to(data.device)
        self.stats["n_outliers_knn"] = float(len(self.outliers_knn))

    def load_teacher(self, path: str | Path) -> None:
        """The frozen teacher's weights from `path`, strictly: an `ood-train` checkpoint (`method.teacher.source`: the
        prefix of its weights), a timm file (the released ViT-B/16 teachers: `pytorch_model.bin`, `best.ckpt`) or a
        Hugging Face ViT file (`vit_cifar100.yml`'s `pytorch_model_cifar100.bin`; `ood.models.timm_backbone`)."""
        state = read_state_dict(path)
        adopt = getattr(self.teacher, "adopt_state_dict", None)
        load_modules(
            self.teacher,
            adopt(state) if adopt else state,
            {"": self.teacher_cfg.get("source", "backbone")},
            path,
            hint="set method/teacher= to the architecture the file was trained with",
        )
        self.teacher.requires_grad_(False).eval()

    def _class_norms(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The norm each class's unit-norm outliers are rescaled to (`outlier_norm`)."""
        classes = self.backbone.num_classes
        if self.outlier_norm == "teacher_mean":
            return torch.stack([feats[labels == c].norm(dim=1).mean() for c in range(classes)])
        if self.outlier_norm == "clip_token":
            return load_token_embeddings(self.token_embeddings, classes).norm(dim=1)
        return torch.full((classes,), float(self.outlier_norm))

    def _sample(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-class boundary outliers (seeded by `sampling_seed`), rescaled per class; [sum_c R*select_c*keep, D_t]."""
        classes = self.backbone.num_classes
        check_every_class("oal", torch.bincount(labels, minlength=classes).tolist(),
                          "no boundary outliers can be sampled around them")
        gen = torch.Generator().manual_seed(self.sampling_seed)
        norms, out = self._class_norms(feats, labels), []
        s = self.sampling
        for c in range(classes):
            x = feats[labels == c]
            if self.knn_per_class and len(x) > self.knn_per_class:
                x = x[torch.randperm(len(x), generator=gen)[: self.knn_per_class]]
            n = len(x)
            o = boundary_samples(
                x,
                min(n, class_count(s["k"], n)),
                min(n, class_count(s["select"], n)),
                int(s["n_candidates"]),
                float(s["sigma"]),
                int(s["keep"]),
                int(s["repeats"]),
                gen,
                s["ranking"],
            )
            out.append(o * norms[c])
        return torch.cat(out)

    # ----- training ---------------------------------------------------------------------------------------------
    def _club_term(self, net: CLUBNet, bank: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """CLUB(o, h) over the global batch: N = global batch size random bank rows (drawn from (sampling_seed, step),
        the same on every rank), this rank's rows as anchors against every rank's h (gathered with gradients), so
        DDP trains on the single-device estimate; with `club_fit=mle` plus q's own likelihood fit."""
        (samples,), anchors = gather_global(self, h)
        gen = torch.Generator().manual_seed(self.sampling_seed * 1_000_003 + self.global_step)
        rows = torch.randperm(len(bank), generator=gen)[: len(samples)][anchors].to(bank.device)
        mu, logvar = net(bank[rows])
        if self.club_fit == "as_released":
            return club(mu, logvar, samples, anchors)
        return club(mu.detach(), logvar.detach(), samples, anchors) + club_nll(mu, logvar, h.detach())

    def training_loss(self, batch: Batch) -> torch.Tensor:
        out = self.backbone.run(batch.x)
        with torch.no_grad():
            t = self.teacher.run(batch.x)
        terms = {
            "ce": F.cross_entropy(out.logits, batch.y),
            "kd_logit": distill_kl(out.logits, t.logits),
            "kd_feat": distill_kl(out.features, self.projector(t.features)),
            "club_knn": self._club_term(self.club_knn, self.outliers_knn, out.features),
        }
        weights = {
            "ce": 1.0,
            "kd_logit": self.w_kd_logit,
            "kd_feat": self.w_kd_feat,
            "club_knn": self.w_mi_knn,
        }
        if self.club_sd is not None:
            terms["club_sd"] = self._club_term(self.club_sd, self.outliers_sd, out.features)
            weights["club_sd"] = self.w_mi_sd
        self.log_metrics({f"train/{k}": v for k, v in terms.items()}, len(batch))
        return sum(weights[k] * v for k, v in terms.items())

    def trainable_parameters(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The released parameter groups: student at the optimiser's `lr`, projector at `lr_proj`, q-networks at
        `lr_club` (the teacher is frozen and in none)."""
        clubs = [p for net in (self.club_knn, self.club_sd) if net is not None for p in net.parameters()]
        return [
            {"params": [p for p in self.backbone.parameters() if p.requires_grad]},
            {"params": list(self.projector.parameters()), "lr": self.lr_proj},
            {"params": clubs, "lr": self.lr_club},
        ]

    # ----- evaluation -------------------------------------------------------------------------------------------
    def ood_score(self, bank: FeatureBank) -> torch.Tensor:
        return energy_score(bank.logits)

    def diagnostics(self) -> dict[str, Any]:
        return dict(self.stats)
