"""vCLUB: the sampled contrastive log-ratio upper bound of mutual information, as OAL's released code computes it.

P. Cheng et al., "CLUB: A Contrastive Log-ratio Upper Bound of Mutual Information", ICML 2020 (arXiv 2006.12013);
used by H. Gao et al., "OAL", arXiv 2406.16525, code HengGao12/OAL `openood/losses/mi_loss.py` (`CLUB.forward`,
`CLUB.loglikeli`). With a variational q(h | o) = N(mu(o), diag exp(logvar(o))) and N paired rows (o_i, h_i):

  CLUB = 1/N sum_i sum_d [ -(mu_id - h_id)^2 / (2 s2_id) + (1/N sum_j (h_jd - mu_id)^2) / (2 s2_id) ],  s2 = exp(logvar)

(the j-sum includes j = i, as in the released code: with the true conditional of standard Gaussians of correlation
rho the expectation is (N-1)/N * rho^2 / (1 - rho^2) per dimension). The q-network that produces (mu, logvar) is a
separate module (`ood.methods.oal.CLUBNet`); `club_nll` is the released `learning_loss` (negative unnormalised
log-likelihood), which the released trainer never calls (`club_fit: mle` uses it).
"""

from __future__ import annotations

import torch


def club(mu: torch.Tensor, logvar: torch.Tensor, samples: torch.Tensor, anchors: slice | None = None) -> torch.Tensor:
    """vCLUB estimate from the conditional mean `mu` [N, D] and log-variance `logvar` [N, D] of q(h | o_i) and the
    paired `samples` h [N, D] (row i is the positive of row i; all rows are the negatives).

    `anchors` (DDP, default: every row): `mu`, `logvar` hold only the rows `samples[anchors]` (this rank's share of
    a global batch gathered in `samples`); the estimate is the mean over those anchors, each against every sample,
    so the mean over equal-sized ranks is the estimate of the whole batch.
    """
    positives = samples if anchors is None else samples[anchors]
    inv_var = 0.5 * torch.exp(-logvar)
    positive = -((mu - positives) ** 2) * inv_var
    # [n, N, D] differences, averaged over j (the released broadcast; n x N x D floats)
    negative = -((samples.unsqueeze(0) - mu.unsqueeze(1)) ** 2).mean(1) * inv_var
    return (positive.sum(-1) - negative.sum(-1)).mean()


def club_nll(mu: torch.Tensor, logvar: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """Negative unnormalised Gaussian log-likelihood of `samples` under q (the released `CLUB.learning_loss`):
    mean_i sum_d [(mu_id - h_id)^2 / s2_id + logvar_id]; minimising it fits q by maximum likelihood."""
    return (((mu - samples) ** 2) * torch.exp(-logvar) + logvar).sum(1).mean(0)
