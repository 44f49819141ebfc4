"""`ood.neighbors`: the faiss wrapper and the torch search equal brute force; k-means uses every point and k-means++
seeding."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from ood.errors import NonFiniteError
from ood.neighbors import KNNIndex, _gpu_id, kmeans, kmeans_plusplus


def test_exact_l2_equals_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(700, 16, generator=gen), torch.randn(90, 16, generator=gen)
    dist, idx = KNNIndex("l2").add(bank).search(queries, 5)
    ref = torch.cdist(queries.double(), bank.double()).pow(2).topk(5, largest=False)
    assert torch.equal(idx, ref.indices)
    assert torch.allclose(dist.double(), ref.values, atol=1e-4)


def test_inner_product_returns_largest_first() -> None:
    bank = torch.eye(4)
    dist, idx = KNNIndex("ip").add(bank).search(torch.tensor([[0.1, 0.7, 0.2, 0.0]]), 2)
    assert idx.tolist() == [[1, 2]] and dist[0].tolist() == pytest.approx([0.7, 0.2])


def test_ivf_probing_every_cell_is_exact() -> None:
    gen = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(2000, 8, generator=gen), torch.randn(40, 8, generator=gen)
    exact = KNNIndex("l2").add(bank).search(queries, 3)[1]
    ivf = KNNIndex("l2", kind="ivf", nlist=16, nprobe=16).add(bank).search(queries, 3)[1]
    assert torch.equal(exact, ivf)



@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_ivf_search_with_fewer_than_k_rows_in_the_probed_cells_probes_more(metric: str) -> None:
    """One probed cell of 16 holds ~25 of 400 rows; faiss pads a k=100 answer with index -1 and distance 3.4e38
    (kNN scored such rows -3.4e38, the most OOD). Every query now gets k real neighbours: with k = every row they are
    the exact answer, and the index keeps its nprobe."""
    gen = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(400, 8, generator=gen), torch.randn(30, 8, generator=gen)
    ivf = KNNIndex(metric, kind="ivf", nlist=16, nprobe=1).add(bank)
    dist, idx = ivf.search(queries, 100)
    assert bool((idx >= 0).all()) and float(dist.abs().max()) < 100 and ivf._index.nprobe == 1
    exact_dist, exact_idx = KNNIndex(metric).add(bank).search(queries, 400)
    dist, idx = ivf.search(queries, 400)
    torch.testing.assert_close(dist, exact_dist, rtol=1e-5, atol=1e-4)
    assert torch.equal(idx.sort(1).values, exact_idx.sort(1).values)


@pytest.mark.parametrize(("kind", "backend"), [("exact", "faiss"), ("ivf", "faiss"), ("exact", "torch")])
def test_a_nan_query_is_an_error_not_a_distance_of_3e38(kind: str, backend: str) -> None:
    """faiss leaves a NaN query without neighbours (index -1, distance 3.4e38): the knn detector scored it -3.4e38,
    a finite value that ranks it as the most OOD. The search now says so in one line (the torch search too, whose
    NaN distances would otherwise be the answer)."""
    gen = torch.Generator().manual_seed(2)
    index = KNNIndex("l2", kind=kind, nlist=4, nprobe=1, backend=backend).add(torch.randn(200, 8, generator=gen))
    queries = torch.randn(3, 8, generator=gen)
    queries[1, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"^1 of 3 queries have fewer than k=2 neighbours: their features \(or the "
                                             r"bank's\) hold NaN or infinite values$"):
        index.search(queries, 2)

@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_the_torch_search_equals_brute_force_across_its_blocks(metric: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact search of CUDA machines without faiss-gpu, run here on the CPU (`backend="torch"`): blocks of 64 bank
    rows and 3 queries (so 11 row blocks, the last partial, and 30 query blocks, their top k merged), the rows
    added 128 at a time and normalised as knn's are: the float64 brute-force neighbours, and faiss' distances to
    float32 rounding."""
    from ood import neighbors

    monkeypatch.setattr(neighbors, "ADD_CHUNK", 128)
    monkeypatch.setattr(neighbors, "TORCH_ROWS", 64)
    monkeypatch.setattr(neighbors, "TORCH_BLOCK", 3 * 64)
    gen = torch.Generator().manual_seed(4)
    unit = torch.nn.functional.normalize
    bank, queries = torch.randn(700, 16, generator=gen), unit(torch.randn(90, 16, generator=gen))
    index = KNNIndex(metric, backend="torch").add(bank.half(), unit)
    dist, idx = index.search(queries, 7)
    rows = unit(bank.half().float()).double()
    ref = (torch.cdist(queries.double(), rows).pow(2).topk(7, largest=False) if metric == "l2"
           else (queries.double() @ rows.T).topk(7))
    assert index._index is None and index._rows.shape == (700, 16) and dist.dtype == torch.float32
    assert torch.equal(idx, ref.indices)
    torch.testing.assert_close(dist.double(), ref.values, rtol=0, atol=1e-6)
    faiss_dist, faiss_idx = KNNIndex(metric).add(bank.half(), unit).search(queries, 7)
    assert torch.equal(idx, faiss_idx)
    torch.testing.assert_close(dist, faiss_dist, rtol=0, atol=1e-6)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_the_torch_search_takes_k_past_its_row_blocks(metric: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """k above `TORCH_ROWS` (here blocks of 64 rows; on a GPU k > 262 144 of a larger bank, as k = bank size): the
    first blocks' merged top-k have fewer than k columns, which `topk(k)` refused ("selected index k out of range").
    Every k from one block past a block to the bank size: the float64 brute-force neighbours."""
    from ood import neighbors

    monkeypatch.setattr(neighbors, "TORCH_ROWS", 64)
    monkeypatch.setattr(neighbors, "TORCH_BLOCK", 5 * 64)
    gen = torch.Generator().manual_seed(6)
    bank, queries = torch.randn(300, 8, generator=gen), torch.randn(12, 8, generator=gen)
    index = KNNIndex(metric, backend="torch").add(bank)
    exact = (-torch.cdist(queries.double(), bank.double()).pow(2) if metric == "l2" else queries.double() @ bank.double().T)
    for k in (100, 300):
        dist, idx = index.search(queries, k)
        ref = exact.topk(k)
        assert torch.equal(idx, ref.indices)
        torch.testing.assert_close(dist.double(), ref.values.abs() if metric == "l2" else ref.values, rtol=0, atol=1e-5)


def test_the_torch_inner_product_search_ranks_a_nan_row_last() -> None:
    """A bank row holding NaN: faiss never takes it for a neighbour, nor did the torch l2 search, but the torch ip
    search (nnguide's) put its NaN products first (topk ranks NaN above every number), so every query came back
    short and raised. Now the finite rows are the neighbours, as faiss' are; a k that needs the NaN row still raises."""
    gen = torch.Generator().manual_seed(7)
    bank, queries = torch.randn(50, 8, generator=gen), torch.randn(6, 8, generator=gen)
    bank[3, 2] = float("nan")
    index = KNNIndex("ip", backend="torch").add(bank)
    dist, idx = index.search(queries, 49)
    ref = (queries.double() @ bank.double().T).nan_to_num(nan=-torch.inf).topk(49)
    assert torch.equal(idx, ref.indices) and not bool((idx == 3).any())
    torch.testing.assert_close(dist.double(), ref.values, rtol=0, atol=1e-5)
    faiss_dist, faiss_idx = KNNIndex("ip", device="cpu").add(bank).search(queries, 49)
    assert torch.equal(idx, faiss_idx)
    with pytest.raises(NonFiniteError, match=r"^6 of 6 queries have fewer than k=50 neighbours"):
        index.search(queries, 50)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_the_torch_search_of_no_queries_is_empty(metric: str) -> None:
    """An empty test bank scores empty (tests/test_detectors_degenerate.py, on faiss): the torch search, what knn,
    nnguide and combood run on CUDA without faiss-gpu, concatenated no query blocks and raised there."""
    bank = torch.randn(50, 8, generator=torch.Generator().manual_seed(8))
    got = KNNIndex(metric, backend="torch").add(bank).search(torch.zeros(0, 8), 3)
    want = KNNIndex(metric, backend="faiss").add(bank).search(torch.zeros(0, 8), 3)
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want] == [
        ((0, 3), torch.float32), ((0, 3), torch.int64)]


def test_the_torch_search_keeps_no_autograd_graph_of_its_rows() -> None:
    """A transform with a trainable parameter (faiss' path detaches it to NumPy): the torch search's rows were
    written in place from each transformed chunk, so they required grad and the graph kept every chunk alive."""
    scale = torch.tensor(2.0, requires_grad=True)
    bank = torch.randn(40, 4, generator=torch.Generator().manual_seed(9))
    index = KNNIndex("l2", backend="torch").add(bank, lambda h: h * scale)
    assert not index._rows.requires_grad and not index._sq.requires_grad
    torch.testing.assert_close(index._rows, 2 * bank, rtol=0, atol=0)


def test_the_torch_search_ignores_autocast() -> None:
    """Called inside a bf16 autocast region (a scorer run inside a mixed-precision step), the distances are still
    float32 products: bf16 ones changed the neighbours of 14 of these 90 queries."""
    gen = torch.Generator().manual_seed(5)
    bank, queries = torch.randn(500, 32, generator=gen), torch.randn(90, 32, generator=gen)
    index = KNNIndex("l2", backend="torch").add(bank)
    want = index.search(queries, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = index.search(queries, 5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_backends_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """faiss on the CPU; on CUDA faiss' GPU index where faiss has GPU support, else the torch search on the GPU for
    an exact index (an IVF index stays faiss', on the CPU); `backend=` forces one; a torch IVF is refused."""
    import faiss

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    cuda = torch.device("cuda", 1)
    choices = {(kind, dev, backend): (KNNIndex(kind=kind, device=dev, backend=backend).gpu_id,
                                      KNNIndex(kind=kind, device=dev, backend=backend).torch_device)
               for kind in ("exact", "auto") for dev in ("cpu", "cuda", None) for backend in ("auto", "faiss")}
    assert choices == {(kind, dev, backend): (None, cuda if dev != "cpu" and backend == "auto" else None)
                       for kind, dev, backend in choices}
    assert KNNIndex(device="cpu", backend="torch").torch_device == torch.device("cpu")
    assert KNNIndex(device="cuda:0", backend="torch").torch_device == torch.device("cuda", 0)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2, raising=False)
    index = KNNIndex(device="cuda")
    assert (index.gpu_id, index.torch_device) == (1, None)
    with pytest.raises(ValueError, match=r"^backend='torch' searches exactly; kind='ivf' needs faiss$"):
        KNNIndex(kind="ivf", backend="torch")
    with pytest.raises(ValueError, match=r"^backend must be 'auto', 'faiss' or 'torch', got 'cupy'$"):
        KNNIndex(backend="cupy")


def test_bad_k_is_a_clear_error() -> None:
    index = KNNIndex().add(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="between 1 and the bank size 3"):
        index.search(torch.zeros(1, 2), 4)


def test_cpu_tensors_use_the_cpu_index() -> None:
    assert _gpu_id("cpu") is None


def test_kmeans_recovers_blob_means_using_all_points() -> None:
    gen = torch.Generator().manual_seed(2)
    centres = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0]])
    labels = torch.arange(3).repeat_interleave(torch.tensor([3000, 1000, 500]))
    x = centres[labels] + torch.randn(len(labels), 2, generator=gen)
    found, assign, inertia = kmeans(x, 3, n_init=2, seed=0)
    # every point is assigned to its blob, and each centre is the exact mean of its points (no subsampling:
    # faiss alone would train on 256 * k = 768 of the 4 500 points)
    for c in range(3):
        members = x[assign == assign[labels == c][0]]
        assert len(members) == int((labels == c).sum())
        assert torch.allclose(found[assign[labels == c][0]], members.mean(0), atol=1e-4)
    assert inertia == pytest.approx(float(((x - found[assign]) ** 2).sum()), rel=1e-5)


def test_kmeans_plusplus_picks_distinct_far_points() -> None:
    x = torch.tensor([[0.0, 0.0], [0.0, 0.1], [100.0, 0.0], [0.0, 100.0]])
    seeds = kmeans_plusplus(x, 3, torch.Generator().manual_seed(0))
    assert len({tuple(r.tolist()) for r in seeds}) == 3
    assert {(100.0, 0.0), (0.0, 100.0)} <= {tuple(r.tolist()) for r in seeds}


def test_gpu_indexes_share_one_resource_object_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """faiss GPU resources are made once per GPU and process, not per index (stand-ins: no GPU here)."""
    import faiss

    from ood import neighbors

    made: list[object] = []
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: made.append(object()) or made[-1], raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, gpu, index: type("GpuIndex", (), {"res": res})(),
                        raising=False)
    neighbors._gpu_resources.cache_clear()
    try:
        first, second, other = (neighbors._on_device(faiss.IndexFlatL2(4), gpu) for gpu in (0, 0, 1))
    finally:
        neighbors._gpu_resources.cache_clear()
    assert len(made) == 2 and first.res is second.res is made[0] and other.res is made[1]
    assert neighbors._on_device(faiss.IndexFlatL2(4), None).d == 4


class _GpuIndex:
    """A faiss GPU index stand-in (no GPU here): the CPU index, refusing k or nprobe past `GPU_MAX_SELECTION` in a
    search as faiss' GPU indexes do (`validateKSelect`, `validateNProbe`); `searches` counts the searches it ran."""

    def __init__(self, index: object) -> None:
        self.__dict__.update(inner=index, searches=0)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: object) -> None:
        setattr(self.inner, name, value)

    def search(self, q: object, k: int) -> object:
        from ood import neighbors

        if k > neighbors.GPU_MAX_SELECTION or getattr(self.inner, "nprobe", 1) > neighbors.GPU_MAX_SELECTION:
            raise RuntimeError(f"GPU index only supports min/max-K selection up to {neighbors.GPU_MAX_SELECTION}")
        self.__dict__["searches"] += 1
        return self.inner.search(q, k)

    def __getstate__(self) -> object:
        """As faiss pickles an index (`serialize_index`), which knows no GPU index."""
        raise RuntimeError("Error in faiss::write_index: don't know how to serialize this type of index")


def _fake_gpu_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA and a faiss GPU build, faked: the GPU index is `_GpuIndex` around the CPU one."""
    import faiss

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, gpu, index: _GpuIndex(index), raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda index: faiss.clone_index(index.inner), raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.mark.parametrize(("kind", "nlist", "nprobe", "k", "gpu_searches"),
                         [("exact", 16, 8, 3, 1), ("exact", 16, 8, 10, 0), ("ivf", 16, 8, 3, 0), ("ivf", 16, 1, 4, 3),
                          ("ivf", 16, 1, 5, 0)])
def test_searches_past_the_gpu_limits_run_on_a_cpu_copy(kind: str, nlist: int, nprobe: int, k: int, gpu_searches: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """faiss' GPU indexes select at most 2048 neighbours and probe at most 2048 cells (here 4): a larger k (a kNN
    k=5000 on ImageNet) or a larger nprobe failed in faiss (RuntimeError); they now run on a CPU copy of the index,
    with the CPU index's results. Within the limits the GPU index searches alone (IVF: probing up to 4 cells of one
    row each for k=4)."""
    from ood import neighbors

    _fake_gpu_faiss(monkeypatch)
    monkeypatch.setattr(neighbors, "GPU_MAX_SELECTION", 4)
    gen = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(nlist, 8, generator=gen), torch.randn(30, 8, generator=gen)
    cpu = KNNIndex("l2", kind=kind, nlist=nlist, nprobe=nprobe, device="cpu").add(bank)
    gpu = KNNIndex("l2", kind=kind, nlist=nlist, nprobe=nprobe, device="cuda:0").add(bank)
    got, want = gpu.search(queries, k), cpu.search(queries, k)
    assert gpu.gpu_id == 0 and gpu._index.searches == gpu_searches and (gpu._host is None) == (gpu_searches > 0)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]) and bool((got[1] >= 0).all())
    assert getattr(gpu._index, "nprobe", nprobe) == getattr(gpu._host, "nprobe", nprobe) == nprobe


@pytest.mark.parametrize(("kind", "metric"), [("exact", "l2"), ("ivf", "ip")])
def test_a_gpu_index_pickles_through_its_cpu_form_and_returns_to_its_gpu(kind: str, metric: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """faiss serialises no GPU index (nor pickles the GPU resources it references): a fitted knn or nnguide on a GPU
    failed in `torch.save`, `pickle` and `copy.deepcopy`. The index pickles as its CPU form, comes back on the same
    GPU at the same nprobe and searches alike; unpickled where no GPU is, it searches alike on the CPU."""
    _fake_gpu_faiss(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    bank, queries = torch.randn(400, 8, generator=gen), torch.randn(30, 8, generator=gen)
    index = KNNIndex(metric, kind=kind, nlist=16, nprobe=2, device="cuda:0").add(bank)
    want = index.search(queries, 5)
    blob = pickle.dumps(index)
    for restored in (pickle.loads(blob), copy.deepcopy(index)):
        got = restored.search(queries, 5)
        assert restored.gpu_id == 0 and type(restored._index).__name__ == "_GpuIndex" and restored.ntotal == 400
        assert getattr(restored._index, "nprobe", 2) == 2
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    monkeypatch.undo()  # no GPU where it is unpickled
    restored = pickle.loads(blob)
    got = restored.search(queries, 5)
    assert restored.gpu_id is None and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
