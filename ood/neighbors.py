"""The one nearest-neighbour and k-means wrapper: an exact or IVF-Flat faiss index, on the GPU when CUDA and faiss-gpu
are present, else on the CPU; on CUDA without faiss-gpu (the `faiss-cpu` wheel ood installs) the exact search runs in
torch on the GPU instead (blocked float32 matrix products and top-k, as faiss' GPU flat index computes it), so a
GPU evaluation does not search a 1.28 M-row bank on the CPU.

Every nearest-neighbour user (KNN detector, GROOD's gradient bank, cluster k-means, OAL's boundary sampling,
heatmap prototypes) goes through here, so device handling and index choice live in one place.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import faiss
import numpy as np
import torch

from ood.errors import NonFiniteError
from ood.utils import exact_float32

Metric = Literal["l2", "ip"]
IndexKind = Literal["exact", "ivf", "auto"]
#: who searches: "auto" is faiss, but torch for an exact index on CUDA without a faiss GPU build
Backend = Literal["auto", "faiss", "torch"]
#: the most neighbours (k) and cells (nprobe) a faiss GPU index selects per query (faiss' `validateKSelect`,
#: `validateNProbe`); a search past them runs on a CPU copy of the index
GPU_MAX_SELECTION = 2048
#: `kind="auto"` switches from the exact index to IVF-Flat at this many bank rows (ImageNet-1K: 1.28 M)
AUTO_IVF_ROWS = 200_000
#: rows converted and added to faiss at a time (the bank is never copied whole)
ADD_CHUNK = 65536
#: the torch search's distance block: bank rows per block, and float32 distances held at a time (256 MB)
TORCH_ROWS = 262_144
TORCH_BLOCK = 1 << 26


def _np32(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


def gpu_available() -> bool:
    """True when both torch sees CUDA and the installed faiss is a GPU build."""
    return torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _has_gpu(index: int) -> bool:
    """Whether torch sees CUDA device `index` in this process."""
    return torch.cuda.is_available() and index < torch.cuda.device_count()


def _device(device: str | torch.device | None) -> torch.device:
    """`device`, None meaning the current CUDA device when there is one, else the CPU; `cuda` with its index."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _gpu_id(device: str | torch.device | None) -> int | None:
    """The CUDA device faiss should use for `device` (None: CPU). Each DDP rank keeps its index on its own GPU."""
    device = _device(device)
    return device.index if device.type == "cuda" and gpu_available() else None


def _torch_device(device: str | torch.device | None, backend: Backend, gpu_id: int | None) -> torch.device | None:
    """Where the torch search runs: `device` for `backend="torch"`, and for "auto" a CUDA device that faiss cannot
    search on (`gpu_id` None: no faiss GPU build); None: faiss searches."""
    where = _device(device)
    if backend == "torch" or (backend == "auto" and where.type == "cuda" and gpu_id is None):
        return where
    return None


@functools.cache
def _gpu_resources(gpu_id: int) -> Any:
    """One faiss `StandardGpuResources` per GPU for the whole process: each reserves temporary GPU memory, pinned
    host memory and a cuBLAS handle, too costly to make per index (k-means builds one index per restart)."""
    return faiss.StandardGpuResources()


def _on_device(index: faiss.Index, gpu_id: int | None) -> faiss.Index:
    """`index` moved to GPU `gpu_id` (None: left on the CPU), on the process's resources of that GPU."""
    if gpu_id is None:
        return index
    resources = _gpu_resources(gpu_id)
    gpu_index = faiss.index_cpu_to_gpu(resources, gpu_id, index)
    gpu_index.referenced_objects = [resources]
    return gpu_index


class KNNIndex:
    """Exact (`IndexFlat`) or IVF-Flat nearest-neighbour index.

    `metric="l2"` returns squared Euclidean distances, `"ip"` inner products (largest first).
    `kind="ivf"` is for ImageNet-scale banks: `nlist` cells (default 4*sqrt(N)), `nprobe` searched, trained on at
    most 256 points per cell (faiss' own cap) drawn with a fixed seed; `kind="auto"` is exact below
    `AUTO_IVF_ROWS` bank rows and IVF from there on. An IVF query whose `nprobe` cells hold fewer than k rows is
    searched again with twice the cells (up to all of them) until it has k neighbours.
    `device="cuda"` (or None with CUDA present) moves the index to the GPU when faiss supports it; a search with
    k or nprobe past what the GPU index selects (`GPU_MAX_SELECTION`) runs on a CPU copy of the index, made at the
    first such search. Where faiss has no GPU support, an exact index on CUDA keeps its rows on the GPU and searches
    them in torch (`backend="torch"` does so on any device; IVF stays faiss' on the CPU). It pickles (`torch.save`,
    `copy.deepcopy`) as the serialised CPU index (or the rows on the CPU), put back on the same GPU where that GPU
    is present, else on the CPU.
    """

    def __init__(
        self,
        metric: Metric = "l2",
        kind: IndexKind = "exact",
        nlist: int | None = None,
        nprobe: int = 8,
        device: str | torch.device | None = None,
        backend: Backend = "auto",
    ) -> None:
        if metric not in ("l2", "ip"):
            raise ValueError(f"metric must be 'l2' or 'ip', got {metric!r}")
        if kind not in ("exact", "ivf", "auto"):
            raise ValueError(f"kind must be 'exact', 'ivf' or 'auto', got {kind!r}")
        if backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
        if backend == "torch" and kind != "exact":
            raise ValueError(f"backend='torch' searches exactly; kind={kind!r} needs faiss")
        self.metric, self.kind, self.nlist, self.nprobe, self.backend = metric, kind, nlist, nprobe, backend
        self.gpu_id = None if backend == "torch" else _gpu_id(device)
        #: where the torch search keeps the rows (an exact index only, decided in `add`); None: faiss searches
        self.torch_device = _torch_device(device, backend, self.gpu_id)
        self._index: faiss.Index | None = None
        self._host: faiss.Index | None = None
        self._rows: torch.Tensor | None = None
        self._sq: torch.Tensor | None = None
        self.ntotal = 0

    def add(self, x: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> KNNIndex:
        """Build the index over the rows of `x` [N, D] (replaces any previous content), `transform` (e.g. L2
        normalisation) applied chunk by chunk, so neither `x` (any float dtype) nor its transform is copied whole."""
        prepare = (lambda t: _np32(transform(t.float()))) if transform is not None else _np32  # noqa: E731
        n, d = x.shape
        ivf = self.kind == "ivf" or (self.kind == "auto" and n >= AUTO_IVF_ROWS)
        self._index = self._host = self._rows = self._sq = None
        if self.torch_device is not None and not ivf:
            rows = torch.empty(n, d, dtype=torch.float32, device=self.torch_device)
            sq = torch.empty(n, dtype=torch.float32, device=self.torch_device) if self.metric == "l2" else None
            with torch.no_grad():  # a transform with trainable parameters would chain every chunk into one graph
                for start in range(0, n, ADD_CHUNK):
                    chunk = x[start : start + ADD_CHUNK].detach().to(self.torch_device, torch.float32)
                    chunk = transform(chunk) if transform is not None else chunk
                    rows[start : start + len(chunk)] = chunk
                    if sq is not None:  # per chunk: no second copy of the bank
                        sq[start : start + len(chunk)] = chunk.square().sum(1)
            self._rows, self._sq, self.ntotal = rows, sq, n
            return self
        flat = faiss.IndexFlatL2(d) if self.metric == "l2" else faiss.IndexFlatIP(d)
        if ivf:
            nlist = self.nlist or max(1, int(4 * math.sqrt(n)))
            faiss_metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
            index: faiss.Index = faiss.IndexIVFFlat(flat, d, nlist, faiss_metric)
            index.nprobe = min(self.nprobe, nlist)
            self._quantizer = flat  # keep the quantizer alive while the index lives
        else:
            index = flat
        index = _on_device(index, self.gpu_id)
        if ivf:
            sample = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: 256 * nlist].sort().values
            index.train(prepare(x[sample.to(x.device)]))
        for start in range(0, n, ADD_CHUNK):
            index.add(prepare(x[start : start + ADD_CHUNK]))
        self._index, self._host, self.ntotal = index, None, n
        return self

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances [M, k], indices [M, k]) of the `k` nearest bank rows, nearest first, on the queries' device."""
        if self._index is None and self._rows is None:
            raise RuntimeError("KNNIndex.search called before add()")
        if not 1 <= k <= self.ntotal:
            raise ValueError(f"k={k} must be between 1 and the bank size {self.ntotal}")
        if self._rows is not None:
            dist_t, idx_t = self._torch_search(queries, k)
            short = int((~torch.isfinite(dist_t)).any(1).sum())
        else:
            q = _np32(queries)
            on_gpu = self.gpu_id is not None and max(k, getattr(self._index, "nprobe", 1)) <= GPU_MAX_SELECTION
            index = self._index if on_gpu else self._host_index()
            dist, idx = index.search(q, k)
            short = self._complete(index, q, dist, idx)
            dist_t, idx_t = torch.from_numpy(dist), torch.from_numpy(idx)
        # k <= ntotal and every cell probed (on a GPU, k or more cells: each holds a row of the bank that trained it):
        # only NaN distances leave a neighbour out
        if short:
            raise NonFiniteError(f"{short} of {len(idx_t)} queries have fewer than k={k} neighbours: their features "
                                 "(or the bank's) hold NaN or infinite values")
        return dist_t.to(queries.device), idx_t.to(queries.device)

    def _torch_search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact search in torch on the rows' device: per block of bank rows, float32 distances as faiss' GPU flat
        index computes them (l2: |x|^2 - 2 q.x selected, then |q|^2 added and 0 clamped; ip: q.x) in full float32
        precision (no TF32, no autocast), their top k merged with the best so far; at most `TORCH_BLOCK` distances at
        a time. NaN
        distances rank last under either metric, so only a query that needs them comes back short. The results are
        filled in place (no concatenation holding them twice: 1.8 GB each for 150 k queries at k = 1000)."""
        rows, largest = self._rows, self.metric == "ip"
        step = min(self.ntotal, TORCH_ROWS)
        per = max(1, TORCH_BLOCK // step)
        dists = torch.empty(len(queries), k, dtype=torch.float32, device=rows.device)
        idxs = torch.empty(len(queries), k, dtype=torch.long, device=rows.device)
        with torch.no_grad(), torch.autocast(rows.device.type, enabled=False), exact_float32():
            for first in range(0, len(queries), per):
                q = queries[first : first + per].detach().to(rows.device, torch.float32)
                q_sq = q.square().sum(1, keepdim=True)
                best: tuple[torch.Tensor, torch.Tensor] | None = None
                for start in range(0, self.ntotal, step):
                    block = rows[start : start + step]
                    if largest:  # NaN ranks last as in l2 (topk takes it for the largest value; faiss skips it)
                        d = (q @ block.T).nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
                    else:  # |x|^2 - 2 q.x orders the rows as the distance does; |q|^2 and the clamp go to the k kept
                        d = torch.addmm(self._sq[start : start + step].unsqueeze(0), q, block.T, alpha=-2)
                    top_d, top_i = d.topk(min(k, len(block)), dim=1, largest=largest)
                    if not largest:  # as faiss' GPU flat index does: no pass over the whole block for them
                        top_d.add_(q_sq).clamp_(min=0)
                    top_i += start
                    if best is not None:
                        merged = torch.cat([best[0], top_d], 1)  # fewer than k columns while k > TORCH_ROWS
                        top_d, order = merged.topk(min(k, merged.shape[1]), dim=1, largest=largest)
                        top_i = torch.cat([best[1], top_i], 1).gather(1, order)
                    best = (top_d, top_i)
                dists[first : first + per], idxs[first : first + per] = best
        return dists, idxs

    def __getstate__(self) -> dict[str, Any]:
        """The attributes with the index as the bytes of its CPU form: faiss serialises no GPU index, nor pickles the
        GPU resources one references (a fitted knn or nnguide failed in `torch.save` / `copy.deepcopy` on a GPU)."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("_index", "_host", "_quantizer", "_rows", "_sq")}
        index = None if self._index is None else self._host if self._host is not None else self._cpu_copy()
        state["_index"] = None if index is None else faiss.serialize_index(index).tobytes()
        state["_rows"] = None if self._rows is None else self._rows.cpu()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """The index deserialised (an IVF index owning its quantizer) and moved to its GPU when this process has it;
        the torch search's rows back on their device, or, where this process lacks it, in a faiss index on the CPU.
        An exact index of faiss' GPU build loaded where faiss has no GPU build but that GPU is present searches there
        in torch, as one built in this process would (`backend="auto"`)."""
        blob, gpu_id, rows = state.pop("_index"), state.pop("gpu_id"), state.pop("_rows", None)
        state.setdefault("backend", "auto")  # absent from an index pickled before the backends
        self.__dict__.update(state)
        self.torch_device = state.get("torch_device")  # absent from an index pickled before the torch search
        self.gpu_id = gpu_id if gpu_id is not None and gpu_available() and gpu_id < faiss.get_num_gpus() else None
        index = None if blob is None else faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
        if (index is not None and gpu_id is not None and self.gpu_id is None and self.backend == "auto"
                and isinstance(index, faiss.IndexFlat) and _has_gpu(gpu_id)):
            self.torch_device = torch.device("cuda", gpu_id)
            rows, index = torch.from_numpy(index.reconstruct_n(0, index.ntotal)), None
        self._index = None if index is None else _on_device(index, self.gpu_id)
        self._host = self._rows = self._sq = None
        if rows is not None:
            if self.torch_device.type == "cuda" and not _has_gpu(self.torch_device.index):
                self.torch_device = None  # no such GPU here: faiss' exact index on the CPU
            self.add(rows)

    def _cpu_copy(self) -> faiss.Index:
        """The index on the CPU: the index itself, or a CPU copy of a GPU index at the same nprobe."""
        if self.gpu_id is None:
            return self._index
        host = faiss.index_gpu_to_cpu(self._index)
        if hasattr(self._index, "nprobe"):
            host.nprobe = self._index.nprobe
        return host

    def _host_index(self) -> faiss.Index:
        """The index on the CPU: the index itself, or for a GPU index its CPU copy (made once, at the same nprobe),
        which searches past the GPU's k and nprobe limits (`GPU_MAX_SELECTION`)."""
        if self._host is None and self.gpu_id is not None:
            self._host = self._cpu_copy()
        return self._host if self.gpu_id is not None else self._index

    def _complete(self, index: faiss.Index, q: np.ndarray, dist: np.ndarray, idx: np.ndarray) -> int:
        """IVF only: queries whose probed cells hold fewer than k rows (faiss pads them with index -1 and distance
        +-3.4e38, which a kNN score would take for a neighbour) are searched again on `index` with twice the cells,
        up to every cell (exact; on a GPU up to `GPU_MAX_SELECTION`), until they have k neighbours; `dist` and `idx`
        are filled in place. Returns how many queries are still short."""
        short = np.flatnonzero(idx[:, -1] < 0)
        nprobe = getattr(index, "nprobe", None)
        if not short.size or nprobe is None:
            return short.size
        gpu = index is self._index and self.gpu_id is not None
        limit = min(index.nlist, GPU_MAX_SELECTION) if gpu else index.nlist
        try:
            while short.size and index.nprobe < limit:
                index.nprobe = min(2 * index.nprobe, limit)
                dist[short], idx[short] = index.search(q[short], idx.shape[1])
                short = short[idx[short, -1] < 0]
        finally:
            index.nprobe = nprobe
        return short.size


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): k initial centres drawn from the rows of `x`."""
    n = x.shape[0]
    centres = [x[int(torch.randint(n, (1,), generator=generator))]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        probs = d2 / total if total > 0 else torch.full_like(d2, 1.0 / n)
        centres.append(x[int(torch.multinomial(probs, 1, generator=generator))])
        d2 = torch.minimum(d2, ((x - centres[-1]) ** 2).sum(1))
    return torch.stack(centres)


def kmeans(
    x: torch.Tensor, k: int, n_init: int = 10, max_iter: int = 100, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Lloyd's k-means on faiss over all rows of `x` (no subsampling), k-means++ seeding, `n_init` restarts;
    keeps the lowest inertia. Runs on the GPU of `x` when faiss has GPU support.

    Returns (centres [k, D], assignment [N], inertia = sum of squared distances to the assigned centre).
    """
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of points {n}")
    data = x.detach().to("cpu", torch.float32)
    gen = torch.Generator().manual_seed(seed)
    best: tuple[torch.Tensor, torch.Tensor, float] | None = None
    for restart in range(n_init):
        clus = faiss.Clustering(d, k)
        clus.niter = max_iter
        clus.seed = seed + restart
        clus.max_points_per_centroid = n  # faiss would otherwise train on a random subsample of 256 k points
        faiss.copy_array_to_vector(_np32(kmeans_plusplus(data, k, gen)).ravel(), clus.centroids)
        clus.train(_np32(data), _on_device(faiss.IndexFlatL2(d), _gpu_id(x.device)))
        centres = torch.from_numpy(faiss.vector_float_to_array(clus.centroids).reshape(k, d).copy())
        dist, assign = KNNIndex("l2", device="cpu").add(centres).search(data, 1)
        inertia = float(dist.sum())
        if best is None or inertia < best[2]:
            best = (centres, assign[:, 0], inertia)
    assert best is not None
    return best[0].to(x.device), best[1].to(x.device), best[2]
