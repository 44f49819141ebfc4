"""Pure loss functions: each module's docstring gives the formula and its source; the names and
signatures are public (outside checks call them)."""

from ood.losses.club import club, club_nll
from ood.losses.cluster_focal import cluster_focal, push_away
from ood.losses.contrastive import supcon
from ood.losses.distill import distill_kl
from ood.losses.energy import energy_margin, free_energy
from ood.losses.heatmap import heatmap_loss
from ood.losses.logitnorm import logitnorm
from ood.losses.outlier import outlier_exposure

__all__ = [
    "club",
    "club_nll",
    "cluster_focal",
    "distill_kl",
    "energy_margin",
    "free_energy",
    "heatmap_loss",
    "logitnorm",
    "outlier_exposure",
    "push_away",
    "supcon",
]
