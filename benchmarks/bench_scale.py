"""ImageNet-scale detector fitting and scoring on synthetic features: ours vs OpenOOD's and pytorch-ood's way.

`python -m benchmarks.bench_scale [--n 50000] [--m 5000] [--dim 2048] [--classes 1000] [--dtype float32]` runs every
(detector, implementation) pair in a fresh subprocess and prints one Markdown table: wall time of fit + score and
the peak resident memory above the process's baseline (banks already in memory; Linux VmHWM after a reset).

Detectors: knn (k = 50, L2-normalised), mahalanobis, rmds, vim (dim 1000) and GROOD's gradient bank (1-NN of
test gradients among train gradients). `ours` is the default index (exact, knn's and GROOD's); `ours-ivf` is
faiss IVF-Flat (knn's opt-in `index=ivf`). The "their way" columns re-implement what the public code does (read in
Jingkang50/OpenOOD `openood/postprocessors/{knn,mds,rmds,vim,grood}_postprocessor.py` and kkirchheim/pytorch-ood
`src/pytorch_ood/detector/{knn,mahalanobis,rmd,vim}.py`; no code copied):
- OpenOOD: knn = NumPy normalisation + `faiss.IndexFlatL2` over the whole bank; mds / rmds = per-class centred
  copies concatenated, `sklearn.covariance.EmpiricalCovariance` (float64 inside), then per test batch (256) and per
  class `-(x - mu_c) P (x - mu_c)^T` and its diagonal; vim = `EmpiricalCovariance` + `np.linalg.eig`; GROOD =
  `faiss.IndexIVFFlat`, nlist = floor(4 sqrt(T)), T = min(600, 0.8 x train batches of 256), nprobe 4.
- pytorch-ood: knn = scikit-learn `NearestNeighbors` (computed here with k = 50 on normalised features, the quantity
  the others compute; pytorch-ood's default is k = 1 on raw features); mahalanobis / rmd = per-class torch
  centred Gram sums, `torch.linalg.inv`, per class `mm(mm(z, P), z.T).diag()` over a batch; vim = as OpenOOD.
  pytorch-ood has no GROOD.
The per-class N x N products of the mds / rmds scoring (OpenOOD, pytorch-ood) cost C x B x (D^2 + B D) flops per
batch of B: that scoring is timed on `--score-rows` test rows and scaled linearly to `--m` (marked `*`; the fit is
timed as is).
The last column puts ours against the machine: the useful float32 work of knn, mahalanobis, rmds and vim
(`useful_flops`: the arithmetic of the textbook algorithm, no overheads) divided by ours' wall time, as GFLOP/s and
as a fraction of the same machine's float32 GEMM rate (`gemm_gflops`: torch.mm of 2048 x 2048 matrices, best of 5,
same thread count, measured in the same child process just before the detector runs, so that a shared machine's
load is the same for both; the header gives the parent's measurement).
The leaderboard rows (`neco`, `caref`, `cadref`, `mahalanobis_pp`, `rmds_pp`, `weiper`, `graduncertainty`, each
with its defaults) time the reference each detector is tested against (`REFERENCE_ROWS`): NECO the authors'
`StandardScaler` + full `PCA`; CARef / CADRef the authors' per-sample grouping of train features into per-class lists,
then batched scoring; Mahalanobis++ / RMDS++ OpenOOD's mds / rmds above on NumPy-normalised copies; WeiPer + KLD the
authors' OpenOOD code (a perturbed `nn.Linear`, train batches of 200, `batch_histogram`'s broadcast comparisons over
100 samples x 1000 values, `Conv1d` smoothing); GradUncertainty pytorch-ood's `vmap` of per-sample head gradients
(batches of 128). The rows of the other new cache detectors: `residual` and `vra` (OpenOOD's postprocessors: ViM's
`EmpiricalCovariance` + `np.linalg.eig` principal space; clipping at the 10th / 90th percentile of all fit
activations), `lts` and `pnml` (pytorch-ood's `LTS`, `PNML`); `relation`, `cfood`, `openmax`, `gmm` time ours only.
Rows of detectors not registered in this checkout are skipped.
`--memmap` runs ours on banks in memory-mapped .npy files (`evaluation.bank_dir`): the peak then also reports the
anonymous (non-file) resident memory, sampled every 10 ms.

`python -m benchmarks.bench_scale --gather N [--world 2]` measures instead the memory each DDP rank (gloo, CPU
processes) needs to bring a fit split of N rows x (`--dim` features + `--classes` logits) together, with
Lightning's padded sampler: `all_gather` (every rank receives every row: `SplitCollector.compute`, the torchmetrics
sync) vs `rank0` (`RankZeroRows`, the evaluation callback's way) vs `rank0-memmap` (`bank_dir`), the collection included.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

IMPLS = {
    "knn": ["ours", "ours-ivf", "openood", "pytorch-ood"],
    "mahalanobis": ["ours", "openood", "pytorch-ood"],
    "rmds": ["ours", "openood", "pytorch-ood"],
    "vim": ["ours", "openood", "pytorch-ood"],
    "grood_bank": ["ours", "ours-ivf", "openood"],
    # leaderboard / pytorch-ood detectors: the reference column is the code each one was checked against
    "neco": ["ours", "authors"],
    "caref": ["ours", "authors"],
    "cadref": ["ours", "authors"],
    "mahalanobis_pp": ["ours", "openood"],
    "rmds_pp": ["ours", "openood"],
    "weiper": ["ours", "authors"],
    "graduncertainty": ["ours", "pytorch-ood"],
    "residual": ["ours", "openood"],
    "vra": ["ours", "openood"],
    "lts": ["ours", "pytorch-ood"],
    "pnml": ["ours", "pytorch-ood"],
    "relation": ["ours"],
    "cfood": ["ours"],
    "openmax": ["ours"],
    "gmm": ["ours"],
}


def status_gb(field: str) -> float:
    """`VmRSS` (now) or `VmHWM` (peak since the last reset) of this process from /proc, GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise KeyError(field)


def reset_peak() -> None:
    """Start the peak (VmHWM) afresh from the current resident size (Linux >= 4.0: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class AnonPeak:
    """Peak `RssAnon` (resident memory not backed by a file: what a memory-mapped bank does not count) of this
    process, sampled every 10 ms by a thread while in the `with` block; `.gb` above the value at entry."""

    def __enter__(self) -> AnonPeak:
        self.base = self.peak = status_gb("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, status_gb("RssAnon"))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_gb("RssAnon"))

    @property
    def gb(self) -> float:
        return self.peak - self.base


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, path: Path | None) -> torch.Tensor:
    """In RAM, or a memory-mapped .npy at `path` (through the evaluation's own allocation)."""
    from ood.features.collector import _empty

    return _empty(shape, dtype, path, torch.device("cpu"))


def banks(n: int, m: int, dim: int, classes: int, dtype: torch.dtype, out_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """Class-structured non-negative features, a random head, labels, logits (`lh`, `lt`); generated chunk-wise (low
    peak), in RAM or (with `out_dir`) in memory-mapped .npy files reopened read-only (copy-on-write) as the evaluation
    callback does with `bank_dir`."""
    from ood.features.collector import open_bank_file

    gen = torch.Generator().manual_seed(0)
    centres = torch.rand(classes, dim, generator=gen) * 2
    w, b = torch.randn(classes, dim, generator=gen) / dim**0.5, torch.randn(classes, generator=gen)

    def make(rows: int, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = torch.arange(rows) % classes
        paths = [None, None] if out_dir is None else [out_dir / f"{name}_features.npy", out_dir / f"{name}_logits.npy"]
        h, logits = _alloc((rows, dim), dtype, paths[0]), _alloc((rows, classes), torch.float32, paths[1])
        for s in range(0, rows, 65536):
            e = min(rows, s + 65536)
            chunk = (centres[y[s:e]] + torch.randn(e - s, dim, generator=gen)).clamp_min(0).to(dtype)
            h[s:e], logits[s:e] = chunk, chunk.float() @ w.T + b
        if out_dir is not None:
            del h, logits
            h, logits = (open_bank_file(p) for p in paths)
        return h, y, logits

    h, y, lh = make(n, "train")
    t, _, lt = make(m, "test")
    return {"h": h, "y": y, "t": t, "w": w, "b": b, "lh": lh, "lt": lt}


def vim_dim(features: int) -> int:
    """OpenOOD's ImageNet ViM dim (1000 of 2048), halved features for smaller toy runs."""
    return min(1000, features // 2)


# ----- ours ---------------------------------------------------------------------------------------------------------
def ours(name: str, d: dict[str, torch.Tensor], index: str = "exact") -> torch.Tensor:
    from ood.detectors import build_detector
    from ood.features.bank import FeatureBank
    from ood.neighbors import KNNIndex

    if name == "grood_bank":
        return KNNIndex("l2", kind=index, device="cpu").add(d["h"]).search(d["t"].float(), 1)[0][:, 0]
    train = FeatureBank(d["lh"], d["h"], d["y"], d["w"], d["b"])
    test = FeatureBank(d["lt"], d["t"], None, d["w"], d["b"])
    kwargs = {"knn": {"k": 50, "index": index}, "vim": {"dim": vim_dim(d["h"].shape[1])}}.get(name, {})
    return build_detector(name, **kwargs).fit(train).score(test)


# ----- OpenOOD's way -------------------------------------------------------------------------------------------------
#: seconds spent in `_class_scores_batched` in this process (the part scaled from `--score-rows` to `--m`)
SCORING_SECONDS = [0.0]


def _class_scores_batched(t: np.ndarray, means: np.ndarray, precision: np.ndarray, batch: int = 256) -> np.ndarray:
    """-(x - mu_c) P (x - mu_c)^T diagonals, per batch and per class (OpenOOD's and pytorch-ood's scoring)."""
    start = time.perf_counter()
    prec = torch.from_numpy(precision).float()
    out = []
    for s in range(0, len(t), batch):
        x = torch.from_numpy(t[s : s + batch])
        scores = torch.zeros(len(x), len(means))
        for c in range(len(means)):
            tensor = x - torch.from_numpy(means[c])[None]
            scores[:, c] = -torch.matmul(torch.matmul(tensor, prec), tensor.t()).diag()
        out.append(scores)
    SCORING_SECONDS[0] += time.perf_counter() - start
    return torch.cat(out).numpy()


def openood(name: str, d: dict[str, torch.Tensor], score_rows: int) -> np.ndarray:
    import faiss
    from sklearn.covariance import EmpiricalCovariance

    h, y, t = d["h"].float().numpy(), d["y"].numpy(), d["t"].float().numpy()
    if name == "knn":
        unit = lambda x: x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-10)  # noqa: E731
        index = faiss.IndexFlatL2(h.shape[1])
        index.add(unit(h))
        return -index.search(unit(t), 50)[0][:, -1]
    if name == "grood_bank":
        batches = math.ceil(len(h) / 256)
        nlist = int(4 * math.sqrt(min(600, int(0.8 * batches))))
        quantizer = faiss.IndexFlatL2(h.shape[1])
        index = faiss.IndexIVFFlat(quantizer, h.shape[1], nlist)
        index.train(h)
        index.add(h)
        index.nprobe = 4
        return -index.search(t, 1)[0][:, 0]
    if name == "vim":
        w, b = d["w"].numpy(), d["b"].numpy()
        u = -np.matmul(np.linalg.pinv(w), b)
        ec = EmpiricalCovariance(assume_centered=True).fit(h - u)
        vals, vecs = np.linalg.eig(ec.covariance_)
        ns = np.ascontiguousarray((vecs.T[np.argsort(vals * -1)[vim_dim(h.shape[1]) :]]).T)
        alpha = (h @ w.T + b).max(-1).mean() / np.linalg.norm((h - u) @ ns, axis=-1).mean()
        lt = t @ w.T + b
        lse = np.log(np.exp(lt - lt.max(1, keepdims=True)).sum(1)) + lt.max(1)
        return lse - alpha * np.linalg.norm((t - u) @ ns, axis=-1)
    classes = int(y.max()) + 1
    means = np.stack([h[y == c].mean(0) for c in range(classes)])
    centred = np.concatenate([h[y == c] - means[c] for c in range(classes)])
    precision = EmpiricalCovariance(assume_centered=False).fit(centred.astype(np.float32)).precision_.astype(np.float32)
    scores = _class_scores_batched(t[:score_rows], means, precision)
    if name == "rmds":
        whole = h.mean(0)
        p0 = EmpiricalCovariance(assume_centered=False).fit(h - whole).precision_.astype(np.float32)
        scores = scores - _class_scores_batched(t[:score_rows], whole[None], p0)
    return scores.max(1)


# ----- pytorch-ood's way ---------------------------------------------------------------------------------------------
def pytorch_ood(name: str, d: dict[str, torch.Tensor], score_rows: int) -> np.ndarray:
    if name == "knn":
        from sklearn.neighbors import NearestNeighbors

        unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
        nn = NearestNeighbors(n_neighbors=50, n_jobs=-1).fit(unit(d["h"].float().numpy()))
        return -(nn.kneighbors(unit(d["t"].float().numpy()), n_neighbors=50)[0][:, -1] ** 2)
    if name == "vim":
        return openood("vim", d, score_rows)  # pytorch-ood's ViM follows the ViM reference code as OpenOOD does
    z, y = d["h"].float(), d["y"]
    classes = int(y.max()) + 1
    mu = torch.zeros(classes, z.shape[1])
    cov = torch.zeros(z.shape[1], z.shape[1])
    for c in range(classes):
        zs = z[y == c]
        mu[c] = zs.mean(0)
        cov += (zs - mu[c]).T.mm(zs - mu[c])
    cov /= len(z) - 1
    precision = torch.linalg.inv(cov + torch.eye(cov.shape[0]) * 1e-6)
    scores = _class_scores_batched(d["t"][:score_rows].float().numpy(), mu.numpy(), precision.numpy())
    if name == "rmds":
        bmu = z.mean(0)
        bcov = (z - bmu).T.mm(z - bmu) + torch.eye(z.shape[1]) * 1e-6
        scores = scores - _class_scores_batched(d["t"][:score_rows].float().numpy(), bmu[None].numpy(),
                                                torch.linalg.inv(bcov).numpy())
    return scores.max(1)


# ----- against the machine's limit ----------------------------------------------------------------------------------
def gemm_gflops(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 matrix-multiply rate (GFLOP/s) with `threads` threads: best of `repeats` torch.mm."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def useful_flops(name: str, n: int, m: int, d: int, c: int) -> float | None:
    """Floating-point operations a detector's fit + score needs at least (n train rows, m test rows, d features, c
    classes); None for detectors without a count. Dense d x d factorisations count d^3 (Cholesky / inverse-sized;
    vim's eigendecomposition 4 d^3: reduction to tridiagonal form plus back-transformation); a covariance n d^2
    (a symmetric rank-n update, half a product)."""
    k = vim_dim(d)
    counts = {
        "knn": 2 * m * n * d,  # the m x n distance GEMM (normalisation and top-k are O(nd + mn))
        "mahalanobis": n * d * d + d**3 + 2 * m * d * d + 2 * m * d * c,  # covariance, inverse, x P x^T, x P mu_c
        "rmds": 2 * n * d * d + 2 * d**3 + 4 * m * d * d + 2 * m * d * c,  # the same twice (class and background)
        "vim": n * d * d + 4 * d**3 + 2 * (n + m) * d * (d - k),  # covariance, eigh, residual projections
    }
    return counts.get(name)

# ----- the leaderboard detectors' reference code ------------------------------------------------------------------
def _np64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def neco_authors(d: dict[str, torch.Tensor], score_rows: int) -> np.ndarray:
    """gitlab drti/neco: StandardScaler on the train features, PCA(D) on them, ratio of the first d components' norm."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    h = _np64(d["h"])
    ss = StandardScaler()
    pca = PCA(h.shape[1]).fit(ss.fit_transform(h))
    z = ss.transform(_np64(d["t"]))
    dim = round(h.shape[1] / 8)
    return np.linalg.norm(pca.transform(z)[:, :dim], axis=1) / np.linalg.norm(z, axis=1)


def _caref_state(d: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """LingAndZero/CADRef get_features + get_mean_feature: rows appended one by one to per-predicted-class lists."""
    classes = d["w"].shape[0]
    features: list[list[torch.Tensor]] = [[] for _ in range(classes)]
    logits: list[list[torch.Tensor]] = [[] for _ in range(classes)]
    for s in range(0, len(d["h"]), 256):
        h, f = d["h"][s : s + 256].float(), d["lh"][s : s + 256]
        for i, c in enumerate(f.argmax(1).tolist()):
            features[c].append(h[i])
            logits[c].append(f[i])
    means = torch.stack([torch.stack(rows).mean(0) if rows else torch.full((h.shape[1],), float("nan")) for rows in features])
    return means, [[torch.stack(rows)] if rows else [] for rows in logits]


def caref_authors(d: dict[str, torch.Tensor], score_rows: int) -> np.ndarray:
    means, _ = _caref_state(d)
    out = []
    for s in range(0, len(d["t"]), 256):
        x, f = d["t"][s : s + 256].float(), d["lt"][s : s + 256]
        tm = means[torch.softmax(f, 1).argmax(1)]
        out.append(-((tm - x).norm(dim=1, p=1) / x.norm(dim=1, p=1)))
    return torch.cat(out).numpy()


def cadref_authors(d: dict[str, torch.Tensor], score_rows: int) -> np.ndarray:
    means, logits = _caref_state(d)
    global_mean = torch.cat([torch.logsumexp(rows[0], 1) for rows in logits if rows]).mean()
    w = d["w"]
    out = []
    for s in range(0, len(d["t"]), 256):
        x, f = d["t"][s : s + 256].float(), d["lt"][s : s + 256]
        ids = torch.softmax(f, 1).argmax(1)
        dist, sg = x - means[ids], w[ids].sign()
        ep, en = (dist * sg).clamp_min(0), (dist * -sg).clamp_min(0)
        norm = x.norm(dim=1, p=1)
        out.append(-(ep.norm(dim=1, p=1) / norm / torch.logsumexp(f, 1) + en.norm(dim=1, p=1) / norm / global_mean))
    return torch.cat(out).numpy()


def _unit_banks(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    unit = lambda x: torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))  # noqa: E731
    return {**d, "h": unit(d["h"].float().numpy()), "t": unit(d["t"].float().numpy())}


def weiper_authors(d: dict[str, torch.Tensor], score_rows: int) -> np.ndarray:
    """mgranz/weiper's OpenOOD postprocessor at the yml defaults (R = 100, delta 1.8, 100 bins, smoothing 4 / 15)."""
    import torch.nn.functional as F

    repeats, delta, n_bins, lam1, lam2 = 100, 1.8, 100, 2.5, 0.1
    w, b = d["w"], d["b"]
    perts = [delta * F.normalize(torch.randn_like(w), dim=1) * w.norm(dim=1)[:, None] for _ in range(repeats)]
    fc = torch.nn.Linear(w.shape[1], repeats * w.shape[0])
    fc.weight.data, fc.bias.data = torch.cat([w + p for p in perts]), b.repeat(repeats)

    def batches(x: torch.Tensor) -> list[torch.Tensor]:
        return list(x.float().split(200))

    def histogram(samples: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """batch_histogram(samples [values, n], (low, high), probability=True), chunks of 1000 values."""
        steps = torch.arange(n_bins + 1, dtype=torch.float32) / n_bins
        bins = (low + steps * (high + 1e-8 - low))[:, None].repeat(1, samples.shape[1])
        inf = torch.full((1, samples.shape[1]), float("inf"))
        bins = torch.cat([-inf, bins, inf])
        chunks = samples.split(1000)
        dens = sum(((c[None] < bins[1:, None]) & (c[None] >= bins[:-1, None])).float().mean(1) for c in chunks)
        dens = dens / len(chunks[-1])
        return dens[1:-1] / dens.sum(0)[None]

    def densities(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return torch.cat([histogram(part.T, low, high) for part in x.split(100)], dim=-1)

    def kl(p: torch.Tensor, q: torch.Tensor, width: int, eps: float) -> torch.Tensor:
        conv = torch.nn.Conv1d(100, 100, width, padding="same", padding_mode="replicate")
        conv.weight.data.zero_()
        conv.weight.data[range(100), range(100)] = torch.ones(1, 100, width) / width
        conv.bias.data.zero_()
        out = []
        for part in q.split(100, dim=-1):
            n = part.shape[-1]
            part = torch.cat([part, torch.ones(part.shape[0], 100 - n)], dim=-1)
            q_ = conv(part.T).T + eps
            p_ = (p + eps) / (p + eps).sum(0)
            q_ = q_ / q_.sum(0)
            q_p = q_.log()[:, None] - p_.log()[..., None]
            out.append((-(p_[..., None] * q_p).sum(0) - (q_[:, None] * (-q_p)).sum(0))[0, :n])
        return torch.cat(out)

    with torch.no_grad():
        lo = hi = lo_w = hi_w = None
        for x in batches(d["h"]):
            g = fc(x)
            lo = x.min() if lo is None else torch.minimum(lo, x.min())
            hi = x.max() if hi is None else torch.maximum(hi, x.max())
            lo_w = g.min() if lo_w is None else torch.minimum(lo_w, g.min())
            hi_w = g.max() if hi_w is None else torch.maximum(hi_w, g.max())
        parts = [(densities(x, lo, hi).mean(-1), densities(fc(x), lo_w, hi_w).mean(-1)) for x in batches(d["h"])]
        p = torch.stack([a for a, _ in parts]).mean(0)[:, None]
        p_w = torch.stack([c for _, c in parts]).mean(0)[:, None]
        out = []
        for x in batches(d["t"]):
            g = fc(x)
            msp = torch.stack([g[:, r * w.shape[0] : (r + 1) * w.shape[0]].softmax(1).max(1).values for r in range(repeats)], 1)
            out.append(-(kl(p, densities(x, lo, hi), 4, 0.01) + lam1 * kl(p_w, densities(g, lo_w, hi_w), 15, 0.025)
                         - lam2 * msp.mean(1)))
    return torch.cat(out).numpy()


def graduncertainty_pytorch_ood(d: dict[str, torch.Tensor], score_rows: int) -> np.ndarray:
    """pytorch-ood GradUncertainty with the head's parameters selected: vmap of per-sample BCE gradients."""
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    head = torch.nn.Linear(d["w"].shape[1], d["w"].shape[0])
    head.weight.data, head.bias.data = d["w"].clone(), d["b"].clone()
    params = dict(head.named_parameters())

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        logits = functional_call(head, p, (x[None],))
        return F.binary_cross_entropy(logits.softmax(1), torch.ones_like(logits), reduction="sum")

    out = []
    with torch.enable_grad():
        for x in d["t"].float().split(128):
            grads = vmap(grad(loss), in_dims=(None, 0))(params, x)
            out.append(-sum((g**2).sum(dim=tuple(range(1, g.ndim))) for g in grads.values()).detach())
    return torch.cat(out).numpy()


def residual_openood(d: dict[str, torch.Tensor], score_rows: int) -> np.ndarray:
    """OpenOOD residual: ViM's principal space (EmpiricalCovariance, np.linalg.eig) of OpenOOD's dim 512 at D = 2048
    (D / 4, configs/postprocessors/residual.yml), minus the residual norm."""
    from sklearn.covariance import EmpiricalCovariance

    h, t, w, b = d["h"].float().numpy(), d["t"].float().numpy(), d["w"].numpy(), d["b"].numpy()
    u = -np.matmul(np.linalg.pinv(w), b)
    vals, vecs = np.linalg.eig(EmpiricalCovariance(assume_centered=True).fit(h - u).covariance_)
    ns = np.ascontiguousarray((vecs.T[np.argsort(vals * -1)[h.shape[1] // 4 :]]).T)
    return -np.linalg.norm(np.matmul(t - u, ns), axis=-1)


def vra_openood(d: dict[str, torch.Tensor], score_rows: int) -> np.ndarray:
    """OpenOOD vra (penultimate): clip to the 10th / 90th percentiles of all fit activations, energy of the head."""
    log = d["h"].float().numpy()
    low, high = np.percentile(log.flatten(), 10), np.percentile(log.flatten(), 90)
    feature = d["t"].float().clip(min=float(low), max=float(high))
    return torch.logsumexp(feature @ d["w"].T + d["b"], dim=1).numpy()


def lts_pytorch_ood(d: dict[str, torch.Tensor], score_rows: int) -> np.ndarray:
    """pytorch-ood LTS: T = (sum z / sum of the top 5 % of z)^2, energy of f / T."""
    z = d["t"].float()
    k = max(1, round(z.shape[1] * 0.05))
    temperature = (z.sum(1) / z.topk(k, dim=1).values.sum(1)).square()
    return torch.logsumexp((z @ d["w"].T + d["b"]) / temperature[:, None], dim=1).numpy()


def pnml_pytorch_ood(d: dict[str, torch.Tensor], score_rows: int) -> np.ndarray:
    """pytorch-ood PNML: normalised train features, pinv(X^T X), regret from the head on normalised test features."""
    x = torch.nn.functional.normalize(d["h"].float(), p=2, dim=1)
    projector = torch.linalg.pinv(x.T @ x)
    z = torch.nn.functional.normalize(d["t"].float(), p=2, dim=1)
    probs = torch.softmax(z @ d["w"].T + d["b"], dim=1).clamp(min=1e-12, max=1 - 1e-12)
    proj = (z @ projector * z).sum(1)
    kappa = (proj / (1 + proj))[:, None]
    return (torch.log((probs / (probs + (1 - probs) * probs.pow(kappa))).sum(1)) / np.log(probs.shape[1])).numpy()


#: (detector, implementation) -> the reference's fit + score on the banks
REFERENCE_ROWS = {
    ("neco", "authors"): neco_authors,
    ("caref", "authors"): caref_authors,
    ("cadref", "authors"): cadref_authors,
    ("mahalanobis_pp", "openood"): lambda d, rows: openood("mahalanobis", _unit_banks(d), rows),
    ("rmds_pp", "openood"): lambda d, rows: openood("rmds", _unit_banks(d), rows),
    ("weiper", "authors"): weiper_authors,
    ("graduncertainty", "pytorch-ood"): graduncertainty_pytorch_ood,
    ("residual", "openood"): residual_openood,
    ("vra", "openood"): vra_openood,
    ("lts", "pytorch-ood"): lts_pytorch_ood,
    ("pnml", "pytorch-ood"): pnml_pytorch_ood,
}
#: rows whose reference scores with the per-class N x N products (timed on --score-rows, scaled to --m)
SCALED_ROWS = {"mahalanobis", "rmds", "mahalanobis_pp", "rmds_pp"}


def their_scores(name: str, impl: str, d: dict[str, torch.Tensor], score_rows: int) -> np.ndarray:
    """Detector `name`'s scores on the banks `d` the way `impl` (a non-ours column of `IMPLS`) computes them."""
    if (name, impl) in REFERENCE_ROWS:
        return np.asarray(REFERENCE_ROWS[name, impl](d, score_rows))
    return (openood if impl == "openood" else pytorch_ood)(name, d, score_rows)


def one(args: argparse.Namespace) -> None:
    """Child process: build the banks, run one (detector, implementation), print JSON."""
    torch.set_num_threads(args.threads)
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(args.threads)
    threadpool_limits(args.threads)
    import sklearn.covariance  # noqa: F401 - imports stay out of the timing
    import sklearn.neighbors  # noqa: F401

    import ood.detectors  # noqa: F401
    import ood.neighbors  # noqa: F401

    name, impl = args.one
    with tempfile.TemporaryDirectory(dir=args.memmap_dir) as tmp:
        d = banks(args.n, args.m, args.dim, args.classes, getattr(torch, args.dtype), Path(tmp) if args.memmap else None)
        import gc

        gc.collect()
        gemm = gemm_gflops(args.threads) if impl == "ours" else None
        reset_peak()
        base = status_gb("VmRSS")
        start = time.perf_counter()
        with AnonPeak() as anon:
            if impl.startswith("ours"):
                ours(name, d, index="ivf" if impl == "ours-ivf" else "exact")  # both defaults are exact
            else:
                their_scores(name, impl, d, args.score_rows)
        seconds = time.perf_counter() - start
    scaled = not impl.startswith("ours") and name in SCALED_ROWS
    print(json.dumps({"seconds": seconds, "scaled": scaled, "scoring_seconds": SCORING_SECONDS[0], "base_gb": base,
                      "extra_gb": status_gb("VmHWM") - base,
                      "anon_gb": anon.gb, "gemm_gflops": gemm}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="train rows")
    parser.add_argument("--m", type=int, default=5_000, help="test rows")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="our bank dtype")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--score-rows", type=int, default=256, help="test rows the per-class N x N scorers run on")
    parser.add_argument("--only", default=",".join(IMPLS), help="comma-separated detectors")
    parser.add_argument("--impls", default="", help="comma-separated implementations (default: all)")
    parser.add_argument("--memmap", action="store_true", help="ours on memory-mapped banks (evaluation.bank_dir)")
    parser.add_argument("--memmap-dir", default=None, help="where the memory-mapped banks go (default: the temp dir)")
    parser.add_argument("--gather", type=int, default=0, help="measure per-rank gather memory for this many rows")
    parser.add_argument("--world", type=int, default=2, help="ranks of --gather")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--gather-mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        one(args)
        return
    if args.gather:
        gather_table(args)
        return
    gemm = gemm_gflops(args.threads)
    print(f"synthetic banks: train {args.n} x {args.dim}, test {args.m}, {args.classes} classes, {args.threads} threads; "
          f"ours on {args.dtype} banks" + (" (memory-mapped)" if args.memmap else "") +
          f"; float32 GEMM on this machine: {gemm:.1f} GFLOP/s")
    print("| detector | implementation | fit + score (s) | x ours | peak extra memory (GB) | x ours | of it anonymous (GB) "
          "| ours GFLOP/s (of GEMM) |")
    print("|---|---|---|---|---|---|---|---|")
    from ood.detectors import available_detectors

    registered = set(available_detectors()) | {"grood_bank"}
    for name in args.only.split(","):
        if name not in registered:
            print(f"| {name} | skipped: not registered in this checkout | | | | | |", flush=True)
            continue
        ref: dict[str, float] = {}
        for impl in IMPLS[name]:
            if args.impls and impl not in args.impls.split(","):
                continue
            dtype = args.dtype if impl.startswith("ours") else "float32"
            cmd = [sys.executable, "-m", "benchmarks.bench_scale", "--one", name, impl, "--n", str(args.n), "--m", str(args.m),
                   "--dim", str(args.dim), "--classes", str(args.classes), "--dtype", dtype, "--threads", str(args.threads),
                   "--score-rows", str(args.score_rows)]
            if args.memmap and impl.startswith("ours"):
                cmd += ["--memmap"] + (["--memmap-dir", args.memmap_dir] if args.memmap_dir else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                ref = ref or {"s": float("nan"), "gb": float("nan")}
                print(f"| {name} | {impl} | failed: {out.stderr.strip().splitlines()[-1]} | | | | | |", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            # only the per-class scoring is scaled from --score-rows to --m test rows; the fit is timed as is
            seconds = r["seconds"] + r["scoring_seconds"] * (args.m / min(args.score_rows, args.m) - 1) * r["scaled"]
            if impl == "ours":
                ref = {"s": seconds, "gb": max(r["extra_gb"], 1e-3)}
            mark = "*" if r["scaled"] else ""
            flops = useful_flops(name, args.n, args.m, args.dim, args.classes) if impl == "ours" else None
            rate = f"{flops / seconds / 1e9:.1f} ({flops / seconds / 1e9 / r['gemm_gflops']:.0%})" if flops else ""
            print(f"| {name} | {impl} | {seconds:.1f}{mark} | {seconds / ref['s']:.1f} | {r['extra_gb']:.2f} | "
                  f"{r['extra_gb'] / ref['gb']:.1f} | {r['anon_gb']:.2f} | {rate} |", flush=True)


# ----- per-rank memory of the DDP gather --------------------------------------------------------------------------
GATHER_MODES = ("all_gather", "rank0", "rank0-memmap")


def gather_rank(rank: int, args: argparse.Namespace, init: str, out: str) -> None:
    """One spawned gloo rank: its padded shard of the fit split, collected and gathered one way; its peak memory
    from its first batch on (the collection included: rank 0 assembles the bank while it collects)."""
    import gc

    import torch.distributed as dist
    from torch.utils.data import DistributedSampler

    from ood.features.collector import RankZeroRows, SplitCollector, rank_zero_group, release_group

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=args.world)
    gen = torch.Generator().manual_seed(rank)
    shard = torch.tensor(list(DistributedSampler(range(args.gather), num_replicas=args.world, rank=rank, shuffle=False)))
    group = rank_zero_group()
    dist.barrier()
    gc.collect()
    reset_peak()
    base = status_gb("VmRSS")
    start = time.perf_counter()
    with AnonPeak() as anon, tempfile.TemporaryDirectory(dir=args.memmap_dir) as tmp:
        if args.gather_mode == "all_gather":
            collector: RankZeroRows | SplitCollector = SplitCollector(["features", "logits", "labels"])
        else:
            collector = RankZeroRows(args.gather, out_dir=Path(tmp) if args.gather_mode == "rank0-memmap" else None)
        for index in shard.split(4096):
            collector.update(index=index, features=torch.randn(len(index), args.dim, generator=gen),
                             logits=torch.randn(len(index), args.classes, generator=gen), labels=index % args.classes)
        if isinstance(collector, SplitCollector):
            rows = len(collector.compute()["index"])
        else:
            got = collector.gather(group)
            rows = 0 if got is None else len(got["index"])
            del got
        del collector
        dist.barrier(group=group)
        seconds = time.perf_counter() - start
        extra = status_gb("VmHWM") - base
    release_group(group)
    Path(out, f"{rank}.json").write_text(json.dumps({"rows": rows, "shard": len(shard), "extra_gb": extra,
                                                     "anon_gb": anon.gb, "seconds": seconds}))
    dist.destroy_process_group()


def gather_table(args: argparse.Namespace) -> None:
    """Per-rank peak memory of each gather mode (one fresh set of spawned ranks per mode)."""
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    gb = args.gather * (args.dim + args.classes) * 4 / 2**30
    print(f"fit split {args.gather} rows x ({args.dim} features + {args.classes} logits) float32 = {gb:.2f} GB, "
          f"{args.world} gloo ranks (shard {gb / args.world:.2f} GB each)")
    print("| mode | rank | rows it receives | peak extra memory (GB) | of it anonymous (GB) | time (s) |")
    print("|---|---|---|---|---|---|")
    for mode in GATHER_MODES:
        with tempfile.TemporaryDirectory() as tmp:
            args.gather_mode = mode
            mp.spawn(gather_rank, args=(args, f"file://{tmp}/rendezvous", tmp), nprocs=args.world, join=True)
            for rank in range(args.world):
                r = json.loads(Path(tmp, f"{rank}.json").read_text())
                print(f"| {mode} | {rank} | {r['rows']} | {r['extra_gb']:.2f} | {r['anon_gb']:.2f} | {r['seconds']:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
