"""ood's CUDA-only branches, run on a CUDA device faked on the CPU (`fake_cuda`): no op mixes devices, and the
results equal the CPU run's. A GPU run (`make gpu-check`) is rare; a device mix-up would end it at its first batch."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import faiss
import pytest
import torch
from fake_cuda import DeviceMix, FakeCuda, fake_cuda, fake_gpu_run, wrap
from helpers import compose_config

from ood.neighbors import KNNIndex, kmeans
from ood.train import build

QUIET = ["trainer.enable_progress_bar=false", "logger=none", "callbacks=none", "~evaluation.sinks.results",
         "~evaluation.sinks.table", "~evaluation.sinks.wandb"]


def test_fake_cuda_raises_where_cuda_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """Called from ood's code (the only code it checks): mixed devices raise, CPU scalars and copies do not."""
    import ood.utils as where  # any module of ood: the check reads the caller's file

    with fake_cuda(monkeypatch):
        x = wrap(torch.ones(3))
        run = lambda code: eval(compile(code, where.__file__, "eval"), {"torch": torch, "x": x})  # noqa: E731, S307 - as if in ood
        assert x.device == torch.device("cuda", 0) and torch.cuda.is_available()
        assert isinstance(run("x * torch.tensor(2.0) + torch.zeros(3, device=x.device)"), FakeCuda)
        assert run("float((x + torch.ones(3).to(x.device)).sum())") == 6.0
        assert not isinstance(run("x.cpu()"), FakeCuda) and run("x.cpu().numpy().sum()") == 3.0
        for mixed in ("x + torch.ones(3)", "torch.cat([x, torch.ones(3)])", "torch.ones(3)[x > 0]", "x.numpy()",
                      "torch.randperm(3, generator=torch.Generator(), device=x.device)",
                      "torch.nn.Linear(3, 2)(torch.ones(1, 3))"):
            with pytest.raises(DeviceMix):
                run(mixed)


def test_neighbours_and_kmeans_on_a_faked_gpu_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA and a faiss GPU build (faked: the GPU index is the CPU one), device features take the GPU index and
    give the CPU results back on their device."""
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda resources, gpu, index, options=None: index, raising=False)
    gen = torch.Generator().manual_seed(0)
    x, q = torch.randn(300, 8, generator=gen), torch.randn(20, 8, generator=gen)
    want = [KNNIndex(kind=kind, nlist=4, device="cpu").add(x).search(q, 5) for kind in ("exact", "ivf")]
    centres, assign, inertia = kmeans(x, 3, n_init=2)
    with fake_cuda(monkeypatch):
        for kind, (dist, idx) in zip(("exact", "ivf"), want, strict=True):
            index = KNNIndex(kind=kind, nlist=4, device=wrap(x).device).add(wrap(x))
            got = index.search(wrap(q), 5)
            assert index.gpu_id == 0 and all(isinstance(t, FakeCuda) for t in got)
            assert torch.equal(got[0].cpu(), dist) and torch.equal(got[1].cpu(), idx)
        got = kmeans(wrap(x), 3, n_init=2)
        assert isinstance(got[0], FakeCuda) and isinstance(got[1], FakeCuda)
        assert torch.equal(got[0].cpu(), centres) and torch.equal(got[1].cpu(), assign) and got[2] == inertia


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ce", "oal"])
def test_a_method_trains_and_evaluates_on_a_faked_gpu(method: str, tmp_path: Path, ce_checkpoint: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Training batches, parameters and evaluation banks on the device, detectors with device branches and network
    passes included: no device mix-up, and every row equals the CPU run's. OAL: its fit-time passes, teacher
    training (`fork_rng` on the device) and boundary sampling."""
    extra = {"ce": [], "oal": ["method.teacher.epochs=1"]}[method]  # cluster and heatmap passed too (2 min each)
    overrides = [f"method={method}", f"method.init.ckpt={ce_checkpoint}", "trainer.max_epochs=1", *extra, *QUIET,
                 "detectors.names=[msp,knn,mahalanobis,vim,weiper,gram_stream,odin]",
                 "+detectors.params.vim.dim=8", "detectors.tune=false"]
    rows = {}
    for where in ("cpu", "gpu"):
        cache = [f"method.cache_dir={tmp_path / where}"] if method == "oal" else []  # each run trains its teacher
        model, datamodule, trainer, evaluation = build(compose_config(tmp_path / where, [*overrides, *cache]))
        model.apply_init()
        with monkeypatch.context() as patch, fake_gpu_run(patch, model) if where == "gpu" else nullcontext():
            trainer.fit(model, datamodule=datamodule)
            trainer.test(model, datamodule=datamodule, verbose=False)
        rows[where] = {(r["detector"], r["ood_dataset"]): (r["auroc"], r["fpr95"]) for r in evaluation.result.rows}
    assert rows["gpu"].keys() == rows["cpu"].keys() and len(rows["cpu"]) >= 7
    for key, (auroc, fpr) in rows["cpu"].items():
        assert rows["gpu"][key] == pytest.approx((auroc, fpr), abs=1e-6), key
