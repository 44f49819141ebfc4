"""Pure loss functions (DESIGN §3.5): each module's docstring gives the formula and its source; the names and
signatures are public (outside checks call them)."""

from ood.losses.cluster_focal import cluster_focal, push_away
from ood.losses.contrastive import supcon
from ood.losses.energy import energy_margin, free_energy
from ood.losses.logitnorm import logitnorm
from ood.losses.outlier import outlier_exposure

__all__ = ["cluster_focal", "energy_margin", "free_energy", "logitnorm", "outlier_exposure", "push_away", "supcon"]
