"""Pure loss functions (DESIGN §3.5): each module's docstring gives the formula and its source; the names and
signatures are public (outside checks call them)."""

from ood.losses.club import club, club_nll
from ood.losses.contrastive import supcon
from ood.losses.distill import distill_kl
from ood.losses.heatmap import heatmap_loss
from ood.losses.outlier import outlier_exposure

__all__ = ["club", "club_nll", "distill_kl", "heatmap_loss", "outlier_exposure", "supcon"]
