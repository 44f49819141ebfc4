"""OAL's boundary outliers in teacher-feature space (stage B of docs/methods/oal.md; NPOS / DreamOOD-style sampling).

Released code: HengGao12/OAL `openood/networks/knn.py` (`generate_outliers`, `KNN_dis_search_decrease`,
`KNN_dis_search_distance`), the DreamOOD procedure (Du et al., NeurIPS 2023, arXiv 2309.13415) that produced the
`*_outlier_npos_embed_noise_0.07_select_50_KNN_300.npy` banks. Per class, on the L2-normalised features X:

1. d_K(x) = distance of x to its K-th nearest neighbour in X (x itself is its first neighbour, as in the code);
2. the `select` points with the largest d_K are the boundary points b;
3. per repetition, `n_candidates` Gaussian draws e ~ N(0, I) give candidates normalize(b + sigma e) around every b
   (the released code reuses one draw of e for all boundary points of a repetition; so does this function);
4. per boundary point keep the `keep` candidates with the largest d_K to X;
5. `repeats` repetitions: (repeats * select * keep, D) unit-norm outliers per class.

Released-code quirk in step 4 (`ranking="released"` reproduces it; the default, `"own"`, does what the paper and
the code's comments describe): the candidates are stacked point by point (row p * L + c, L = n_candidates), but
`KNN_dis_search_distance` reshapes their d_K with `k_th.view(length, -1)`, an [L, select] view of that
point-major vector, then keeps per column p the rows c with the largest entry and returns candidate c of point p.
So candidate c of point p is ranked by the d_K of flat row c * select + p, another candidate (usually of another
point): the kept candidates are not the farthest ones. The OAL / DreamOOD banks behind the published numbers were
made this way (`scripts/get_embed_cifar10.py`: L = 1500, select = pic_nums = 50, 2 kept).

Distances are squared L2 (faiss `IndexFlatL2`, as the released code): the same ranking as L2. The released code
also picks `pic_nums` of the `select` boundary points at random; with pic_nums = select (the OAL banks: 50 and
2 per point give 100 per repetition) that is only an order, which is not reproduced.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ood.neighbors import KNNIndex

#: how a boundary point's candidates are ranked (module docstring)
RANKINGS = ("own", "released")


def kth_distances(index: KNNIndex, queries: torch.Tensor, k: int) -> torch.Tensor:
    """Squared L2 distance of every query row to its `k`-th nearest row of `index`."""
    return index.search(queries, k)[0][:, -1]


def boundary_samples(
    features: torch.Tensor,
    k: int,
    select: int,
    n_candidates: int,
    sigma: float,
    keep: int,
    repeats: int,
    generator: torch.Generator,
    ranking: Literal["own", "released"] = "own",
) -> torch.Tensor:
    """Unit-norm boundary outliers around one class's `features` [n, D] (module docstring): returns
    [repeats * select * keep, D], rows grouped by repetition, then boundary point (in order of decreasing d_K).
    `ranking`: which d_K ranks a point's candidates, its own (`own`) or the released code's view (`released`)."""
    if ranking not in RANKINGS:
        raise ValueError(f"ranking={ranking!r}; choices: {list(RANKINGS)}")
    n, d = features.shape
    if not (1 <= k <= n and 1 <= select <= n and 1 <= keep <= n_candidates):
        raise ValueError(
            f"need 1 <= k ({k}), select ({select}) <= n ({n}) and 1 <= keep ({keep}) <= n_candidates ({n_candidates})"
        )
    bank = F.normalize(features.float(), dim=1)
    index = KNNIndex("l2", device="cpu").add(bank)
    boundary = bank[kth_distances(index, bank, k).topk(select).indices]
    out = []
    for _ in range(repeats):
        noise = torch.randn(n_candidates, d, generator=generator)
        candidates = F.normalize(
            boundary[:, None, :] + sigma * noise[None], dim=2
        )  # [select, n_candidates, D]
        dk = kth_distances(index, candidates.reshape(-1, d), k)  # point-major: row p * n_candidates + c
        # [select, n_candidates]: row p ranks point p's candidates; released: column p of the [L, select] view
        ranks = dk.view(select, n_candidates) if ranking == "own" else dk.view(n_candidates, select).T
        far = ranks.topk(keep, dim=1).indices
        out.append(candidates.gather(1, far[..., None].expand(-1, -1, d)).reshape(-1, d))
    return torch.cat(out)


def class_count(value: float, n: int) -> int:
    """An absolute count (value >= 1) or a fraction of the class size n (0 < value < 1), at least 1."""
    return max(1, int(value if value >= 1 else round(value * n)))
