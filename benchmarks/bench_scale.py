"""ImageNet-scale detector fitting and scoring on synthetic features: ours vs OpenOOD's and pytorch-ood's way.

`python -m benchmarks.bench_scale [--n 50000] [--m 5000] [--dim 2048] [--classes 1000] [--dtype float32]` runs every
(detector, implementation) pair in a fresh subprocess and prints one Markdown table: wall time of fit + score and
the peak resident memory above the process's baseline (banks already in memory; Linux VmHWM after a reset).

Detectors: knn (k = 50, L2-normalised), mahalanobis, rmds, vim (dim 1000) and GROOD's gradient bank (1-NN of
test gradients among train gradients). The "their way" columns re-implement what the public code does (read in
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
batch of B: they are timed on `--score-rows` test rows and scaled linearly to `--m` (marked `*`).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

IMPLS = {
    "knn": ["ours", "openood", "pytorch-ood"],
    "mahalanobis": ["ours", "openood", "pytorch-ood"],
    "rmds": ["ours", "openood", "pytorch-ood"],
    "vim": ["ours", "openood", "pytorch-ood"],
    "grood_bank": ["ours", "ours-ivf", "openood"],
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


def banks(n: int, m: int, dim: int, classes: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Class-structured non-negative features, a random head, labels; generated chunk-wise (low peak)."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.rand(classes, dim, generator=gen) * 2
    w, b = torch.randn(classes, dim, generator=gen) / dim**0.5, torch.randn(classes, generator=gen)

    def make(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(rows) % classes
        h = torch.empty(rows, dim, dtype=dtype)
        for s in range(0, rows, 65536):
            e = min(rows, s + 65536)
            h[s:e] = (centres[y[s:e]] + torch.randn(e - s, dim, generator=gen)).clamp_min(0).to(dtype)
        return h, y

    h, y = make(n)
    t, _ = make(m)
    return {"h": h, "y": y, "t": t, "w": w, "b": b}


def vim_dim(features: int) -> int:
    """OpenOOD's ImageNet ViM dim (1000 of 2048), halved features for smaller toy runs."""
    return min(1000, features // 2)


# ----- ours ---------------------------------------------------------------------------------------------------------
def ours(name: str, d: dict[str, torch.Tensor], index: str = "auto") -> torch.Tensor:
    from ood.detectors import build_detector
    from ood.features.bank import FeatureBank
    from ood.knn import KNNIndex

    if name == "grood_bank":
        return KNNIndex("l2", kind=index, device="cpu").add(d["h"]).search(d["t"].float(), 1)[0][:, 0]
    logits = lambda x: torch.cat([x[s : s + 65536].float() @ d["w"].T + d["b"] for s in range(0, len(x), 65536)])  # noqa: E731
    train = FeatureBank(logits(d["h"]), d["h"], d["y"], d["w"], d["b"])
    test = FeatureBank(logits(d["t"]), d["t"], None, d["w"], d["b"])
    kwargs = {"knn": {"k": 50}, "vim": {"dim": vim_dim(d["h"].shape[1])}}.get(name, {})
    return build_detector(name, **kwargs).fit(train).score(test)


# ----- OpenOOD's way -------------------------------------------------------------------------------------------------
def _class_scores_batched(t: np.ndarray, means: np.ndarray, precision: np.ndarray, batch: int = 256) -> np.ndarray:
    """-(x - mu_c) P (x - mu_c)^T diagonals, per batch and per class (OpenOOD's and pytorch-ood's scoring)."""
    prec = torch.from_numpy(precision).float()
    out = []
    for s in range(0, len(t), batch):
        x = torch.from_numpy(t[s : s + batch])
        scores = torch.zeros(len(x), len(means))
        for c in range(len(means)):
            tensor = x - torch.from_numpy(means[c])[None]
            scores[:, c] = -torch.matmul(torch.matmul(tensor, prec), tensor.t()).diag()
        out.append(scores)
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
    import ood.knn  # noqa: F401

    d = banks(args.n, args.m, args.dim, args.classes, getattr(torch, args.dtype))
    import gc

    gc.collect()
    reset_peak()
    base = status_gb("VmRSS")
    name, impl = args.one
    start = time.perf_counter()
    if impl.startswith("ours"):
        ours(name, d, index="ivf" if impl == "ours-ivf" else "auto")
    elif impl == "openood":
        openood(name, d, args.score_rows)
    else:
        pytorch_ood(name, d, args.score_rows)
    seconds = time.perf_counter() - start
    scaled = impl != "ours" and impl != "ours-ivf" and name in ("mahalanobis", "rmds")
    print(json.dumps({"seconds": seconds, "scaled": scaled, "base_gb": base, "extra_gb": status_gb("VmHWM") - base}))


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
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        one(args)
        return
    print(f"synthetic banks: train {args.n} x {args.dim}, test {args.m}, {args.classes} classes, {args.threads} threads; "
          f"ours on {args.dtype} banks")
    print("| detector | implementation | fit + score (s) | x ours | peak extra memory (GB) | x ours |")
    print("|---|---|---|---|---|---|")
    for name in args.only.split(","):
        ref: dict[str, float] = {}
        for impl in IMPLS[name]:
            dtype = args.dtype if impl.startswith("ours") else "float32"
            cmd = [sys.executable, "-m", "benchmarks.bench_scale", "--one", name, impl, "--n", str(args.n), "--m", str(args.m),
                   "--dim", str(args.dim), "--classes", str(args.classes), "--dtype", dtype, "--threads", str(args.threads),
                   "--score-rows", str(args.score_rows)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                ref = ref or {"s": float("nan"), "gb": float("nan")}
                print(f"| {name} | {impl} | failed: {out.stderr.strip().splitlines()[-1]} | | | |", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            seconds = r["seconds"] * (args.m / min(args.score_rows, args.m) if r["scaled"] else 1)
            if impl == "ours":
                ref = {"s": seconds, "gb": max(r["extra_gb"], 1e-3)}
            mark = "*" if r["scaled"] else ""
            print(f"| {name} | {impl} | {seconds:.1f}{mark} | {seconds / ref['s']:.1f} | {r['extra_gb']:.2f} | "
                  f"{r['extra_gb'] / ref['gb']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
