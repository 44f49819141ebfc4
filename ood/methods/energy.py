"""The energy family with outliers: Energy-OE fine-tuning (`method=energy_oe`) and the semantic-driven energy
method with Cluster Focal Loss (`method=energy_cfl`, reported as `energy_cfl_recon`: a reconstruction).

**Energy-OE.** W. Liu, X. Wang, J. D. Owens, Y. Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020,
arXiv 2010.03759; released code wetliu/energy_ood (`CIFAR/train.py`, `CIFAR/run.sh`). Fine-tunes a CE classifier
(`method.init.ckpt`) with one forward pass over the concatenated ID and outlier batch:
  L = CE(f(x_in), y) + lambda * [mean relu(E(x_in) - m_in)^2 + mean relu(m_out - E(x_out))^2],  E = -T LSE(f / T)
(`ood.losses.energy_margin`), lambda = 0.1, T = 1, 10 epochs, SGD Nesterov lr 1e-3 cosine per iteration to 1e-6
(its `scheduler.step()` before `optimizer.step()`: `OpenOODCosine(offset=1)` in the CIFAR presets), wd 5e-4,
batches 128 ID + 256 outliers. Score: -E(x) = T LSE(f / T) (`detector=energy_oe`, the same values as `energy`).
Margins: `margins: absolute` takes `m_in`, `m_out` as given (CIFAR-10 -23 / -5, CIFAR-100 -27 / -5 from `run.sh`;
the argparse defaults -25 / -7 are not what the paper ran); `margins: id_energy` reads them as offsets from the
mean ID-train energy of the starting model, computed once at fit start over the un-augmented fit split (ID train,
or its `data.fit_fraction`), identical on every rank (the digits rule: mean - 5 and mean - 5 + 18, 18 being the
CIFAR-10 gap; see docs/methods/energy_cfl.md). The margins used are written into the results' `method_params.fitted`.
The CIFAR presets keep the last partial ID batch, as released (`data.drop_last: false`: 391 iterations an epoch,
all counted by the cosine); the data configs' default drops it.
Deviations: the `id_energy` margins stay at that rule, not tuned on validation OOD afterwards (only the CFL score's
beta is tuned); the digits default (`conf/method/energy_oe.yaml`) steps its cosine per epoch; outliers come from the
shared outlier stream (a reshuffled permutation per epoch; the code starts 80M Tiny Images at a random offset each
epoch).

**Semantic-driven energy (SDE) with Cluster Focal Loss: RECONSTRUCTION.** A. Joshi, S. Chalasani,
K. Nanjunda Iyer, "Semantic Driven Energy based Out-of-Distribution Detection", arXiv 2208.10787; no public code.
What the paper says: an energy score coupled with a representation score; ID energy minimised while ID features
are pulled to learnt class representations, OOD energy maximised and OOD features pushed away from them; a Cluster
Focal Loss for better class centres; end-to-end trainable. It gives no formula for the CFL, no loss weights,
margins, focal exponent, scoring or combination rule, and no outlier set. What we chose (docs/methods/energy_cfl.md),
and why:
  z = penultimate features h (or a projection head MLP(h) when `projection_dim` is set); learnable centres c_k,
      initialised to the CE class means of z on ID-train at fit start (so the representation starts where the CE
      classifier already clusters, instead of from random points);
  L = L_Energy-OE + lam_cfl * L_CFL + lam_push * L_push, with
      L_CFL  = mean -(1 - p_y)^gamma log p_y, p = softmax(-||z - c_k||^2 / tau)   (focal loss on distance logits,
               the most direct reading of "cluster focal"; gamma = 2 is the focal-loss default, tau = 1)
      L_push = mean_out relu(m_d - min_k ||z_out - c_k||)^2   (the energy hinge's shape, applied to distance;
               m_d = 95th percentile of ID-train ||z - c_y|| at initialisation, so outliers are pushed outside the
               region that holds 95 % of the ID data), lam_cfl = lam_push = 0.1 (the energy weight);
  score s = Z(-E(x)) - beta * Z(min_k ||z - c_k||^2) (`score.combine: sum`), or the product of the two logistic
      ID likelihoods, log sigmoid(Z(-E)) + beta * log sigmoid(-Z(d)) (`product`); Z = z-score with ID-validation
      mean and std (standardising puts the two terms on one scale without looking at OOD data); beta from
      `score.grid` by AUROC on ID-val vs validation OOD (`score.tune`), else `score.beta` (default 1).
The parts are reported as their own rows: `energy_cfl_recon_energy` (Z(-E) alone: ranks as `energy`) and
`energy_cfl_recon_dist` (-Z(d) alone). With lam_cfl = lam_push = 0 and beta = 0 the method is Energy-OE exactly
(same loss, same weights, same metrics for the same seed; tested). Its numbers are not the paper's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ood.data.batch import Batch
from ood.data.benchmark import EvalSplit, Stream
from ood.data.fit import FitData
from ood.detectors.logits import energy_score
from ood.errors import ConfigError, check_every_class, check_range
from ood.features.bank import FeatureBank
from ood.losses import cluster_focal, energy_margin, free_energy, push_away
from ood.losses.cluster_focal import squared_distances
from ood.methods.base import OODMethod, OptimizerFactory, SchedulerFactory
from ood.metrics import auroc_pairs, ood_metrics
from ood.models.base import Backbone
from ood.utils import get_logger

log = get_logger(__name__)

MARGIN_MODES = ("absolute", "id_energy")
COMBINE = ("sum", "product")


class EnergyOE(OODMethod):
    """CE + `lam` x the squared energy hinges on ID and outliers; scored by -E(x) (module doc).

    Args:
        backbone, optimizer, scheduler, init: as `OODMethod` (`init.ckpt`: the CE classifier to fine-tune).
        lam: weight of the energy term (paper: 0.1).
        margins: `absolute` (m_in, m_out as given) or `id_energy` (offsets from the starting model's mean ID-train
            energy, computed once at fit start).
        m_in, m_out: the margins, or their offsets.
        temperature: T of E = -T LSE(f / T), in the loss and the score (paper: 1).
    """

    name = "energy_oe"
    streams: ClassVar[tuple[Stream, ...]] = ("id", "outliers")

    def __init__(
        self,
        backbone: Backbone,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        init: Mapping[str, Any] | None = None,
        lam: float = 0.1,
        margins: str = "id_energy",
        m_in: float = -5.0,
        m_out: float = 13.0,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(backbone, optimizer, scheduler, init)
        if margins not in MARGIN_MODES:
            raise ConfigError(f"method.margins={margins!r}; choices: {list(MARGIN_MODES)}")
        check_range("method.lam", lam, 0)
        check_range("method.temperature", temperature, 0, open_low=True)
        for key, value in (("m_in", m_in), ("m_out", m_out)):  # any sign (the papers' -23 / -5); NaN trained on NaN
            check_range(f"method.{key}", value, -math.inf)
        self.lam, self.temperature = lam, temperature
        # statistics fitted at fit start (buffers, so a resumed or evaluated checkpoint keeps them):
        # [mean ID-train energy of the starting model, m_in used, m_out used]; NaN = not fitted yet
        self.register_buffer("energy_stats", torch.full((3,), float("nan")))

    # ----- statistics of the starting model, once at fit start --------------------------------------------------
    @property
    def margins(self) -> tuple[float, float]:
        """(m_in, m_out) the loss uses."""
        return float(self.energy_stats[1]), float(self.energy_stats[2])

    def prepare(self, data: FitData) -> None:
        """The starting model's statistics over the fit split (skipped when the buffers hold them already: a
        resumed or evaluated checkpoint). The pass is sharded over DDP ranks and gathered, so every rank computes
        the same values."""
        if bool(torch.isnan(self.energy_stats).any()):
            if not self.init_ckpt:
                log.warning("%s fine-tunes a trained classifier, but no method.init.ckpt is set: starting from random weights", self.name)
            fitted = self.fit_statistics(self._id_train_outputs(data))
            with torch.no_grad():
                for name, value in fitted.items():
                    getattr(self, name).copy_(value.to(self.energy_stats.device))
        log.info("%s: %s", self.name, self.fitted_values())

    def _id_train_outputs(self, data: FitData) -> dict[str, torch.Tensor]:
        """Logits, features and labels of the whole un-augmented fit split (the one shared pass)."""
        backbone = self.backbone

        def outputs(x: torch.Tensor) -> dict[str, torch.Tensor]:
            h = backbone.features(x)[0]
            return {"logits": backbone.fc(h), "features": h}

        return data.forward(
            outputs, data.datasets["fit"], self, f"{self.name}: ID-train statistics", distributed=data.world_size > 1
        )

    def fit_statistics(self, train: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """New values of the fitted buffers from the starting model's ID-train outputs (subclasses add theirs)."""
        mean_energy = free_energy(train["logits"], self.temperature).mean()
        m_in, m_out = self.hparams.m_in, self.hparams.m_out
        if self.hparams.margins == "id_energy":
            m_in, m_out = mean_energy + m_in, mean_energy + m_out
        margins = [torch.as_tensor(m, dtype=mean_energy.dtype, device=mean_energy.device) for m in (m_in, m_out)]
        return {"energy_stats": torch.stack([mean_energy, *margins]).float()}

    def fitted_values(self) -> dict[str, float]:
        """The statistics fitted at fit start, as reported in `method_params.fitted` and the diagnostics."""
        return dict(zip(("id_train_energy", "m_in", "m_out"), self.energy_stats.tolist()))

    # ----- training ---------------------------------------------------------------------------------------------
    def loss_terms(self, batch: Batch, logits: torch.Tensor, features: torch.Tensor) -> dict[str, tuple[float, torch.Tensor]]:
        """name -> (weight, value) of the loss terms on the concatenated [ID; outlier] outputs; terms with weight
        0 are not computed (so switching a term off is exactly the method without it)."""
        n = len(batch)
        terms = {"ce": (1.0, F.cross_entropy(logits[:n], batch.y))}
        if self.lam:
            m_in, m_out = self.margins
            terms["energy"] = (self.lam, energy_margin(logits[:n], logits[n:], m_in, m_out, self.temperature))
        return terms

    def training_loss(self, batch: Batch) -> torch.Tensor:
        assert batch.x_out is not None, f"{self.name} trains on outliers: the DataModule serves them (streams)"
        # one pass over ID and outliers together, as the released code (batch-norm statistics see both)
        h = self.backbone.features(torch.cat([batch.x, batch.x_out]))[0]
        terms = self.loss_terms(batch, self.backbone.fc(h), h)
        self.log_metrics({f"train/{k}": v for k, (_, v) in terms.items()}, len(batch))
        loss = torch.zeros((), device=h.device)
        for weight, value in terms.values():
            loss = loss + weight * value
        return loss

    # ----- evaluation -------------------------------------------------------------------------------------------
    def fitted(self) -> dict[str, Any]:
        return self.fitted_values()

    def ood_score(self, bank: FeatureBank) -> torch.Tensor:
        return energy_score(bank.logits, self.temperature)

    def diagnostics(self) -> dict[str, Any]:
        return self.fitted_values()


class EnergyCFL(EnergyOE):
    """Energy-OE + Cluster Focal Loss on learnt class centres + outlier push-away; scored by standardised energy
    minus beta x standardised centre distance. A RECONSTRUCTION (module doc): reported as `energy_cfl_recon`.

    Args:
        backbone, optimizer, scheduler, init, lam, margins, m_in, m_out, temperature: as `EnergyOE`.
        lam_cfl, lam_push: weights of the Cluster Focal Loss and of the push-away term.
        gamma, tau: focal exponent and distance temperature of the CFL.
        projection_dim: embed with a projection head MLP(h) of this width; None = the penultimate features.
        push_margin: m_d of the push term; None = the 95th percentile of ID-train ||z - c_y|| at initialisation.
        score: `{combine: sum|product, beta, tune, grid}`: the combination rule; beta chosen from `grid` on
            ID-val vs validation OOD when `tune`, else `beta`.
        reconstruction: must be true (the paper's definitions are not public); carried into `method_params`.
    """

    name = "energy_cfl_recon"
    trained_parts = ("centres", "head")

    def __init__(
        self,
        backbone: Backbone,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        init: Mapping[str, Any] | None = None,
        lam: float = 0.1,
        margins: str = "id_energy",
        m_in: float = -5.0,
        m_out: float = 13.0,
        temperature: float = 1.0,
        lam_cfl: float = 0.1,
        lam_push: float = 0.1,
        gamma: float = 2.0,
        tau: float = 1.0,
        projection_dim: int | None = None,
        push_margin: float | None = None,
        score: Mapping[str, Any] | None = None,
        reconstruction: bool = True,
    ) -> None:
        super().__init__(backbone, optimizer, scheduler, init, lam, margins, m_in, m_out, temperature)
        if not reconstruction:
            raise ConfigError("method=energy_cfl exists only as a reconstruction (reconstruction: true): the paper's CFL and score are not public")
        for key, value in (("lam_cfl", lam_cfl), ("lam_push", lam_push), ("gamma", gamma)):
            check_range(f"method.{key}", value, 0)
        check_range("method.tau", tau, 0, open_low=True)
        self.score_cfg = {"combine": "sum", "beta": 1.0, "tune": True, "grid": [0.0, 0.25, 0.5, 1.0, 2.0, 4.0], **(score or {})}
        unknown = sorted(set(self.score_cfg) - {"combine", "beta", "tune", "grid"})
        if unknown:
            raise ConfigError(f"method.score: unknown key(s) {unknown}; keys: ['combine', 'beta', 'tune', 'grid']")
        if self.score_cfg["combine"] not in COMBINE:
            raise ConfigError(f"method.score.combine={self.score_cfg['combine']!r}; choices: {list(COMBINE)}")
        if self.score_cfg["tune"] and not self.score_cfg["grid"]:
            raise ConfigError("method.score.grid is empty with method.score.tune=true: give the beta values to tune "
                              "over, or tune=false with a fixed method.score.beta")
        check_range("method.score.beta", self.score_cfg["beta"], 0)
        for beta in self.score_cfg["grid"]:
            check_range("method.score.grid entry", beta, 0)
        check_range("method.projection_dim", projection_dim, 1, integer=True)
        check_range("method.push_margin", push_margin, 0, open_low=True)
        d = backbone.feature_dim
        self.head: nn.Module = nn.Identity()
        if projection_dim:
            self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, projection_dim))
            d = projection_dim
        self.centres = nn.Parameter(torch.zeros(backbone.num_classes, d))
        self.register_buffer("push_stats", torch.full((1,), float("nan")))  # m_d used by the push term
        self.beta = float(self.score_cfg["beta"])
        self._beta_tuned = False  # set by setup_ood
        self._zstats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def fit_statistics(self, train: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Also the centres (class means of z) and m_d (95th percentile of ||z - c_y||) of the starting model."""
        fitted = super().fit_statistics(train)
        with torch.no_grad():
            z, y = self.head(train["features"]), train["labels"]
            classes = self.centres.shape[0]
            check_every_class(self.name, torch.bincount(y, minlength=classes).tolist(),
                              "their centres (class means) are NaN, and so is the loss", fit_split=True)
            centres = torch.stack([z[y == k].mean(0) for k in range(classes)])
            margin = self.hparams.push_margin
            if margin is None:
                margin = torch.quantile((z - centres[y]).norm(dim=1), 0.95)
        return {**fitted, "centres": centres, "push_stats": torch.as_tensor(margin, dtype=torch.float32).reshape(1)}

    def prepare(self, data: FitData) -> None:
        if bool(torch.isnan(self.push_stats).any()):
            self.energy_stats.fill_(float("nan"))  # centres and margins come from the same pass
        super().prepare(data)

    def fitted_values(self) -> dict[str, float]:
        return {**super().fitted_values(), "push_margin": float(self.push_stats[0]), "beta": self.beta}

    def loss_terms(self, batch: Batch, logits: torch.Tensor, features: torch.Tensor) -> dict[str, tuple[float, torch.Tensor]]:
        terms = super().loss_terms(batch, logits, features)
        n, hp = len(batch), self.hparams
        if hp.lam_cfl or hp.lam_push:
            z = self.head(features)
            if hp.lam_cfl:
                terms["cfl"] = (hp.lam_cfl, cluster_focal(z[:n], self.centres, batch.y, hp.gamma, hp.tau))
            if hp.lam_push:
                terms["push"] = (hp.lam_push, push_away(z[n:], self.centres, float(self.push_stats[0])))
        return terms

    # ----- evaluation -------------------------------------------------------------------------------------------
    def eval_outputs(self, x: torch.Tensor, split: EvalSplit) -> dict[str, torch.Tensor]:
        out = self.backbone.run(x, self.cache_layers)
        dist = squared_distances(self.head(out.features), self.centres).min(1).values
        return {"logits": out.logits, "features": out.features, "centre_dist": dist, **out.layers}

    def _raw(self, bank: FeatureBank) -> dict[str, torch.Tensor]:
        return {"energy": energy_score(bank.logits, self.temperature), "dist": bank.extras["centre_dist"].double()}

    def _standardised(self, bank: FeatureBank) -> dict[str, torch.Tensor]:
        return {k: (v - self._zstats[k][0]) / self._zstats[k][1] for k, v in self._raw(bank).items()}

    def _combine(self, parts: Mapping[str, torch.Tensor], beta: float) -> torch.Tensor:
        if self.score_cfg["combine"] == "sum":
            return parts["energy"] - beta * parts["dist"]
        return F.logsigmoid(parts["energy"]) + beta * F.logsigmoid(-parts["dist"])

    def setup_ood(self, banks: Mapping[str, FeatureBank]) -> None:
        """Z-score statistics from ID-val only; beta from the grid by AUROC on ID-val vs validation OOD."""
        self._zstats = {k: (v.mean(), v.std().clamp_min(1e-12)) for k, v in self._raw(banks["val"]).items()}
        self.beta = float(self.score_cfg["beta"])
        self._beta_tuned = self.score_cfg["tune"] and "val_ood" in banks
        if self._beta_tuned:
            val, val_ood = self._standardised(banks["val"]), self._standardised(banks["val_ood"])
            scored = {b: (self._combine(val, b), self._combine(val_ood, b)) for b in self.score_cfg["grid"]}
            aurocs = {b: ood_metrics(*pair)["auroc"] for b, pair in scored.items()}
            self.beta = float(max(scored, key=lambda b: auroc_pairs(*scored[b])))  # equal AUROCs (exact): the first
            log.info("%s: beta %s (val AUROC %s)", self.name, self.beta, {b: round(a, 4) for b, a in aurocs.items()})

    def ood_score(self, bank: FeatureBank) -> torch.Tensor:
        return self._combine(self._standardised(bank), self.beta)

    def tuned(self) -> dict[str, dict[str, Any]]:
        return {self.name: {"beta": self.beta}} if self._beta_tuned else {}

    def ood_scores(self, bank: FeatureBank) -> dict[str, torch.Tensor]:
        """The combined score and its two parts, each reported as its own detector rows."""
        parts = self._standardised(bank)
        return {
            self.name: self._combine(parts, self.beta),
            f"{self.name}_energy": parts["energy"],
            f"{self.name}_dist": -parts["dist"],
        }
