"""ood's CUDA-only branches, run on a CUDA device faked on the CPU (`fake_cuda`): no op mixes devices, and the
results equal the CPU run's. A GPU run (`make gpu-check`) is rare; a device mix-up would end it at its first batch."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import torch
from fabricate import E2E, make_openood_tree, synthetic_banks
from fake_cuda import DeviceMix, FakeCuda, buffers_on_gpu, fake_cuda, fake_gpu_run, wrap
from helpers import compose_config, fit_detector
from torch.overrides import TorchFunctionMode

from ood import CONFIG_DIR, neighbors
from ood.detectors import Detector, available_detectors, build_detector, detector_class
from ood.detectors.network import LayerTaps, first_map
from ood.features.bank import FeatureBank
from ood.features.collector import RankZeroRows
from ood.models.small_cnn import SmallCNN
from ood.neighbors import KNNIndex, kmeans

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


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_a_faiss_gpu_index_loaded_without_faiss_gpu_searches_on_its_gpu_in_torch(metric: str,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An exact index fitted with faiss-gpu and loaded on a CUDA machine with the faiss-cpu wheel searched on the
    CPU; it now keeps its rows on that GPU and searches them in torch, as an index built there does (same neighbours
    and distances). `backend="faiss"` and IVF indexes stay faiss' (on the CPU there), as do those loaded without CUDA."""
    gen = torch.Generator().manual_seed(4)
    x, q = torch.randn(300, 8, generator=gen), torch.randn(20, 8, generator=gen)
    torch_built = KNNIndex(metric, backend="torch", device="cpu").add(x).search(q, 5)
    with monkeypatch.context() as patch:  # faiss' GPU build, faked: its GPU index is the CPU one
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(faiss, "StandardGpuResources", object, raising=False)
        patch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
        patch.setattr(faiss, "index_cpu_to_gpu", lambda resources, gpu, index, options=None: index, raising=False)
        patch.setattr(faiss, "index_gpu_to_cpu", lambda index: index, raising=False)
        fitted = {(kind, backend): KNNIndex(metric, kind=kind, nlist=4, device="cuda:0", backend=backend).add(x)
                  for kind, backend in (("exact", "auto"), ("exact", "faiss"), ("ivf", "auto"))}
        assert {key: index.gpu_id for key, index in fitted.items()} == dict.fromkeys(fitted, 0)
        blobs = {key: pickle.dumps(index) for key, index in fitted.items()}
    assert pickle.loads(blobs["exact", "auto"])._rows is None  # no CUDA where loaded: faiss on the CPU
    with fake_cuda(monkeypatch):
        loaded = {key: pickle.loads(blob) for key, blob in blobs.items()}
        index = loaded["exact", "auto"]
        got = index.search(wrap(q), 5)
        assert index.gpu_id is None and index._index is None and isinstance(index._rows, FakeCuda)
        assert index.torch_device == torch.device("cuda", 0) and all(isinstance(t, FakeCuda) for t in got)
        assert torch.equal(got[0].cpu(), torch_built[0]) and torch.equal(got[1].cpu(), torch_built[1])
        assert all(loaded[key]._rows is None and loaded[key]._index is not None for key in (("exact", "faiss"),
                                                                                          ("ivf", "auto")))


def test_the_torch_search_on_a_faked_gpu_without_faiss_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA with the faiss-cpu wheel (ood's default install): an exact index keeps its rows on the GPU and searches
    them there in torch (the knn detector's and GROOD's bank included), no device mix-up, faiss' CPU neighbours back
    on the device; pickled, it comes back on the GPU, and where no GPU is, as faiss' CPU index with the same answer.
    An IVF index stays faiss', on the CPU."""
    gen = torch.Generator().manual_seed(0)
    x, q = torch.randn(300, 8, generator=gen), torch.randn(20, 8, generator=gen)
    unit = torch.nn.functional.normalize
    dist, idx = KNNIndex(device="cpu").add(x, unit).search(unit(q), 5)
    with fake_cuda(monkeypatch):
        index = KNNIndex(device=wrap(x).device).add(wrap(x), unit)
        got = index.search(unit(wrap(q)), 5)
        assert index.gpu_id is None and index._index is None and isinstance(index._rows, FakeCuda)
        assert all(isinstance(t, FakeCuda) for t in got) and torch.equal(got[1].cpu(), idx)
        assert float((got[0].cpu() - dist).abs().max()) <= 1e-6
        blob = pickle.dumps(index)
        again = pickle.loads(blob)
        assert isinstance(again._rows, FakeCuda) and torch.equal(again.search(unit(wrap(q)), 5)[1].cpu(), idx)
        ivf = KNNIndex(kind="ivf", nlist=4, device=wrap(x).device).add(wrap(x))
        assert ivf._rows is None and ivf.gpu_id is None and isinstance(ivf.search(wrap(q), 5)[0], FakeCuda)
    monkeypatch.undo()  # no GPU where it is unpickled
    restored = pickle.loads(blob)
    assert restored._rows is None and restored.torch_device is None and restored.ntotal == 300
    assert torch.equal(restored.search(unit(q), 5)[1], idx)


#: digits with 60 far-OOD and validation-OOD images and 200 outliers; `TINY`: two training batches an epoch
TINY_DIGITS = ["+data.benchmark.n_far=60", "+data.benchmark.n_val_ood=60", "+data.benchmark.n_outliers=200"]
TINY = [*TINY_DIGITS, "+trainer.limit_train_batches=2"]


def _cpu_and_gpu_rows(tmp_path: Path, overrides: list[str], monkeypatch: pytest.MonkeyPatch,
                      per_run: dict[str, list[str]] | None = None) -> dict[str, dict[tuple[str, str], tuple[float, float]]]:
    """The result rows, (detector, OOD set) -> (AUROC, FPR95), of a run trained and tested on the CPU and of one on
    the faked GPU, from the same seed; `per_run`: overrides of one run only (by `cpu` / `gpu`): a `gpu` run of a GPU
    trainer config (`trainer=gpu_fast`) is built inside the fake, as `ood-train` builds it."""
    import ood.train

    rows = {}
    for where in ("cpu", "gpu"):
        cfg = compose_config(tmp_path / where, [*overrides, *(per_run or {}).get(where, [])])
        gpu_trainer = where == "gpu" and cfg.trainer.accelerator == "gpu"
        with monkeypatch.context() as patch, fake_gpu_run(patch) if gpu_trainer else nullcontext():
            model, datamodule, trainer, evaluation = ood.train.build(cfg)
            model.apply_init()
            with fake_gpu_run(patch, model) if where == "gpu" and not gpu_trainer else nullcontext():
                trainer.fit(model, datamodule=datamodule)
                trainer.test(model, datamodule=datamodule, verbose=False)
        rows[where] = {(r["detector"], r["ood_dataset"]): (r["auroc"], r["fpr95"]) for r in evaluation.result.rows}
    return rows


#: knn's AUROC tolerance between the runs: on a CUDA device without faiss-gpu its exact search runs in torch (a float32
#: GEMM), on the CPU in faiss, so its distances agree to float32 rounding and a near-tie of an ID and an OOD score may
#: swap (one swap moved an AUROC by 6e-5 on one build host, its FPR95 not at all): a few swaps, far below any real fault
KNN_AUROC_ABS = 1e-3


def _assert_same_rows(rows: dict[str, dict[tuple[str, str], tuple[float, float]]], at_least: int) -> None:
    assert rows["gpu"].keys() == rows["cpu"].keys() and len(rows["cpu"]) >= at_least
    for key, (auroc, fpr) in rows["cpu"].items():
        assert rows["gpu"][key][1] == pytest.approx(fpr, abs=1e-6), key
        assert rows["gpu"][key][0] == pytest.approx(auroc, abs=KNN_AUROC_ABS if key[0] == "knn" else 1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ce", "oal"])
def test_a_method_trains_and_evaluates_on_a_faked_gpu(method: str, tmp_path: Path, ce_checkpoint: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Training batches, parameters and evaluation banks on the device, detectors with device branches and network
    passes included: no device mix-up, and every row equals the CPU run's. OAL: its fit-time passes, teacher
    training (`fork_rng` on the device) and boundary sampling."""
    # cluster and heatmap passed too (2 min each); OAL's boundary sampling draws 200 candidates a point, not 1500 (its
    # kNN ranking of them was 4 of the test's 10 s; the device path is the same)
    extra = {"ce": [], "oal": ["method.teacher.epochs=1", "method.n_candidates=200"]}[method]
    # two training batches and the small OOD sets (`TINY`): the same device paths and rows; the full epoch and sets
    # took 44 s of CPU for ce (26-33 s now), 44 s for oal (39 s)
    overrides = [f"method={method}", f"method.init.ckpt={ce_checkpoint}", "trainer.max_epochs=1", *TINY, *extra, *QUIET,
                 "detectors.names=[msp,knn,mahalanobis,vim,weiper,gram_stream,odin,nnguide]",
                 "+detectors.params.vim.dim=8", "detectors.tune=false"]
    # each run trains its teacher
    per_run = {where: [f"method.cache_dir={tmp_path / where}"] for where in ("cpu", "gpu")} if method == "oal" else None
    _assert_same_rows(_cpu_and_gpu_rows(tmp_path, overrides, monkeypatch, per_run), at_least=7)


#: every method config but those of the end-to-end test above
OTHER_METHODS = [p.stem for p in sorted((CONFIG_DIR / "method").glob("*.yaml")) if p.stem not in ("ce", "oal")]
#: a method's overrides for a step of each of its training stages: cluster's contrastive objective (two views
#: augmented on the device) then its probe, heatmap's diagnostics grid of one image and a 64-outlier pool
STAGES = {"cluster": ["method.objective=supcon", "method.probe_epochs=1", "trainer.max_epochs=2", "method.n_init=2"],
          "heatmap": ["method.n_images=1", "method.num_ood=64"]}


@pytest.mark.parametrize("method", OTHER_METHODS)
def test_every_method_trains_a_step_and_evaluates_on_a_faked_gpu(method: str, tmp_path: Path, ce_checkpoint: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Every method of the registry (a new one enrols itself), from the CE weights, two training steps and its
    evaluation with its own score and a detector, on the faked GPU: no device mix-up in its fit-time passes, losses
    or scores, and its rows equal the CPU run's."""
    overrides = [f"method={method}", f"method.init.ckpt={ce_checkpoint}", "trainer.max_epochs=1", *TINY, *QUIET,
                 *STAGES.get(method, []), "detectors.names=[msp]", "detectors.tune=false"]
    _assert_same_rows(_cpu_and_gpu_rows(tmp_path, overrides, monkeypatch), at_least=2)


def test_the_in_memory_pipeline_augments_on_a_faked_gpu(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """CIFAR-10 in memory (`ood.data.memory`), augmented: the crop and flip of the ID and outlier batches (OE) drawn
    and applied on the (faked) GPU, its fill on the device: no device mix-up, and the rows equal the CPU run's (the
    draws come from torch's global generator on both). The CPU run decodes the images into the cache, the GPU run
    reads them: decoding advanced the global generator, so the runs' augmentations differed (AUROC 0.57 vs 0.49)."""
    tree = make_openood_tree(tmp_path_factory.mktemp("openood"))
    overrides = ["data=cifar10", f"paths.data_dir={tree}", *E2E, "backbone=small_cnn", "method=oe", "data.batch_size=8",
                 "+trainer.limit_train_batches=2", *QUIET, "detectors.tune=false"]
    _assert_same_rows(_cpu_and_gpu_rows(tmp_path, overrides, monkeypatch), at_least=4)


#: `trainer=gpu_fast`'s plugin on the CPU: the autocast the faked GPU runs (`fake_cuda`), channels_last
FAST_ON_CPU = ["trainer=cpu", "trainer.deterministic=false", "+trainer.plugins=[{_target_:ood.precision.FastMixedPrecision,"
               "device:cpu,channels_last:true,precision:bf16-mixed}]"]


@pytest.mark.parametrize("method", ["grood", "energy_cfl"])  # GROOD trains as CE does
def test_gpu_fast_trains_and_evaluates_on_a_faked_gpu(method: str, tmp_path: Path, ce_checkpoint: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`trainer=gpu_fast` (bf16 autocast, channels_last weights) on the faked GPU: no device or dtype mix-up (a float32
    buffer or bank meeting a bf16 activation fails on the CPU as on CUDA) in training steps, fit-time passes (GROOD's
    maps cached under autocast, Energy-CFL's float32 class centres against bf16 embeddings) or the detectors' network
    passes and layer taps (taken outside CUDA's autocast), and the rows equal those of the same plugin's CPU
    autocast. (cluster's contrastive steps passed too, in 17 s of CPU bf16.)"""
    overrides = [f"method={method}", f"method.init.ckpt={ce_checkpoint}", "trainer.max_epochs=1", *TINY, *QUIET,
                 *STAGES.get(method, []), "detectors.names=[msp,knn,vim,odin,gram_stream,nnguide]",
                 "+detectors.params.vim.dim=8", "detectors.tune=false"]
    rows = _cpu_and_gpu_rows(tmp_path, overrides, monkeypatch, {"cpu": FAST_ON_CPU, "gpu": ["trainer=gpu_fast"]})
    _assert_same_rows(rows, at_least=7)


def test_ood_eval_of_a_checkpoint_runs_on_a_faked_gpu(tmp_path: Path, ce_checkpoint: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`ood-eval method=grood ckpt_path=<CE run> trainer=gpu` (`ood.train.run`, as the command runs it): the checkpoint
    loaded into a model on the (faked) GPU, GROOD fitted post-hoc on it, no device mix-up, and the rows equal those
    of `trainer=cpu`."""
    from helpers import run_config

    overrides = ["method=grood", f"ckpt_path={ce_checkpoint}", *TINY_DIGITS, *QUIET,
                 "detectors.names=[msp,knn,mahalanobis,odin]", "detectors.tune=false"]
    rows = {}
    for where in ("cpu", "gpu"):
        with monkeypatch.context() as patch, fake_gpu_run(patch) if where == "gpu" else nullcontext():
            got = run_config(tmp_path / where, [*overrides, f"trainer={where}"], config_name="eval")
        rows[where] = {(r["detector"], r["ood_dataset"]): (r["auroc"], r["fpr95"]) for r in got}
    _assert_same_rows(rows, at_least=5)


#: detectors that run the network or read maps cached by its layer taps
NETWORK = [n for n in available_detectors() if detector_class(n).needs_model or hasattr(detector_class(n), "taps")]
#: tempscale: its L-BFGS temperature is a leaf made on the device (`torch.full(..., requires_grad=True)`), which the
#: harness's factories hand back as a `FakeCuda` view, no leaf, that the optimiser refuses (no CUDA run would)
CACHED = [n for n in available_detectors() if n not in NETWORK and n != "tempscale"]


def _bank_on_gpu(bank: FeatureBank) -> FeatureBank:
    return dataclasses.replace(bank, **{f.name: wrap(getattr(bank, f.name)) for f in dataclasses.fields(bank) if f.init})


@pytest.fixture(scope="module")
def synthetic() -> dict[str, FeatureBank]:
    return synthetic_banks()


@pytest.mark.parametrize("name", CACHED)
def test_every_cached_detector_fits_and_scores_device_banks(name: str, synthetic: dict[str, FeatureBank],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Every detector that scores from the cache, fitted and scored on banks on the (faked) GPU, as a CUDA run's
    evaluation hands them over: no device mix-up, and the scores equal the CPU run's (the end-to-end faked run
    covers seven detectors)."""
    split = detector_class(name).fit_split
    det = build_detector(name).fit(synthetic[split])
    want = det.score(synthetic["ood"])
    with fake_cuda(monkeypatch):
        banks = {k: _bank_on_gpu(b) for k, b in synthetic.items()}
        got = build_detector(name).fit(banks[split]).score(banks["ood"])
    torch.testing.assert_close(got.as_subclass(torch.Tensor).cpu(), want, rtol=1e-6, atol=1e-9)


def test_cfoods_table_stays_on_the_banks_device(synthetic: dict[str, FeatureBank], monkeypatch: pytest.MonkeyPatch) -> None:
    """cfood's n x |K| reach table was kept on the CPU and copied to the GPU again for every query chunk and
    reference block it scored (a host-blocking copy of 7.5 MB a step at ImageNet scale): it now stays where the
    bank's distances were computed."""
    with fake_cuda(monkeypatch):
        det = build_detector("cfood").fit(_bank_on_gpu(synthetic["train"]))
        assert det.table_.device.type == "cuda"


@pytest.fixture(scope="module")
def network() -> dict[str, Any]:
    """A small staged CNN (random weights, batch-norm statistics of its train split, dropout in its last stage), each
    split's 8x8 inputs and banks with every detector's taps: the same scores on the CPU and the faked GPU, not a
    trained one's separation."""
    torch.manual_seed(0)
    net = SmallCNN(3, width=4, feature_dim=100)
    net.stages["block3"].append(torch.nn.Dropout(0.2))  # for mcdropout
    return _network_data(net, (1, 8, 8), available_detectors())


def _network_data(net: torch.nn.Module, shape: tuple[int, ...], detectors: list[str]) -> dict[str, Any]:
    """`net` with batch-norm statistics of its train split, in eval mode, each split's inputs of `shape` and banks
    with the taps of `detectors`."""
    x = {split: torch.randn(n, *shape) + (split in ("val_ood", "ood")) for split, n in
         (("train", 30), ("val", 15), ("val_ood", 15), ("test", 15), ("ood", 15))}
    with torch.no_grad():
        net(x["train"])  # batch-norm statistics
    net.eval()
    taps, banks = LayerTaps(net, detectors), {}
    with torch.no_grad():
        for split, inputs in x.items():
            out = net.run(inputs)
            labels = torch.arange(len(inputs)) % 3 if "ood" not in split else None
            banks[split] = FeatureBank(out.logits, out.features, labels, net.fc.weight.detach(), net.fc.bias.detach(),
                                       extras=taps.pop())
    taps.remove()
    return {"net": net, "x": x, "banks": banks}


def _run_network_detector(name: str, data: dict[str, Any], params: dict[str, Any] | None = None) -> torch.Tensor:
    """`name` fitted as the evaluation fits it (its network passes over whole splits in batches of 16), its test scores."""
    def model_scores(det: Detector, split: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        x = data["x"][split] if rows is None else data["x"][split][rows]
        return torch.cat([det.score_inputs(data["net"], chunk) for chunk in x.split(16)])

    params = {**({"input_std": 1.0} if "input_std" in build_detector(name).hparams else {}), **(params or {})}
    torch.manual_seed(0)
    det, _ = fit_detector(name, params, data["banks"], tune=False, model_scores=model_scores)
    return model_scores(det, "test") if det.needs_model else det.score(data["banks"]["test"])


@pytest.mark.parametrize("name", NETWORK)
def test_every_network_detector_fits_and_scores_on_the_device(name: str, network: dict[str, Any],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Every detector that runs the network or reads layer taps, fitted (network passes included) and scored with
    the network, its inputs and banks on the (faked) GPU: no device mix-up, scores on the device equal the CPU run's.
    The CPU run searches neighbours (combood) in torch, as CUDA without faiss-gpu does, so both run the same kernels."""
    with monkeypatch.context() as patch:
        patch.setattr(neighbors, "_torch_device", lambda device, backend, gpu_id: neighbors._device(device))
        want = _run_network_detector(name, network)
    with fake_cuda(monkeypatch):
        net = copy.deepcopy(network["net"])
        buffers_on_gpu(net)  # parameters count as on the device; buffers (batch-norm statistics) moved
        got = _run_network_detector(name, {"net": net, "x": wrap(network["x"]),
                                           "banks": {k: _bank_on_gpu(b) for k, b in network["banks"].items()}})
    assert isinstance(got, FakeCuda)
    torch.testing.assert_close(got.as_subclass(torch.Tensor), want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("name", "params"), [("gram_v15", {}), ("mds_ensemble", {"stages": ["feature1"]})])
def test_feature1_after_a_max_pool_on_the_device(name: str, params: dict[str, Any],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenOOD's feature1 on a torchvision ResNet (`network.first_map`: after the max-pool ood regroups into
    `layer1`; the small CNN above has none): gram_v15's cached row statistics and mds_ensemble's pass perturbed
    through the stem and that max-pool, on the (faked) GPU: no device mix-up, scores equal the CPU run's."""
    import torchvision

    from ood.models.adapters import as_backbone

    torch.manual_seed(0)
    resnet = torchvision.models.resnet
    net = as_backbone(resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=3))
    data = _network_data(net, (3, 16, 16), [name])
    assert first_map(net).pool is net.net.maxpool
    want = _run_network_detector(name, data, params)
    with fake_cuda(monkeypatch):
        gpu = copy.deepcopy(net)
        buffers_on_gpu(gpu)
        got = _run_network_detector(name, {"net": gpu, "x": wrap(data["x"]),
                                           "banks": {k: _bank_on_gpu(b) for k, b in data["banks"].items()}}, params)
    assert isinstance(got, FakeCuda)
    torch.testing.assert_close(got.as_subclass(torch.Tensor), want, rtol=1e-6, atol=1e-9)


class _CountCopies(TorchFunctionMode):
    """Counts `Tensor.to` calls on the tensors of `watched` (by identity)."""

    def __init__(self, watched: list[torch.Tensor]) -> None:
        super().__init__()
        self.watched, self.count = {id(t) for t in watched}, 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += func is torch.Tensor.to and id(args[0]) in self.watched
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["mahalanobis_odin", "mds_ensemble"])
def test_cpu_fitted_gaussians_go_to_the_device_once(name: str, network: dict[str, Any],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Gaussians fitted from CPU banks (memory-mapped, `evaluation.bank_dir`) and scored with the network on the
    (faked) GPU: each fitted tensor is copied to the device once, not in every batch (45 MB of precision a batch at
    ResNet-50 scale), a refit's scores use the new fit, and the scores equal the CPU run's in the same batches exactly
    (float32 matrix products may round by the batch size: MKL's AVX2 kernels do)."""
    x = network["x"]["test"]
    det = build_detector(name, input_std=1.0).fit(network["banks"]["train"])
    want = torch.cat([det.score_inputs(network["net"], chunk) for chunk in x.split(5)])
    with fake_cuda(monkeypatch):
        net = copy.deepcopy(network["net"])
        buffers_on_gpu(net)
        fitted = [t for pair in (det.gaussians_ if name == "mds_ensemble" else [(det.means_, det.precision_)]) for t in pair]
        with _CountCopies(fitted) as copies:
            got = torch.cat([det.score_inputs(net, chunk) for chunk in wrap(x).split(5)])
        assert copies.count == len(fitted)
        refit = det.fit(network["banks"]["val"]).score_inputs(net, wrap(x)).as_subclass(torch.Tensor)
    assert isinstance(got, FakeCuda)
    assert torch.equal(got.as_subclass(torch.Tensor), want)
    assert torch.equal(refit, build_detector(name, input_std=1.0).fit(network["banks"]["val"]).score_inputs(network["net"], x))


def test_a_bank_gathered_on_the_device_has_its_index_there(monkeypatch: pytest.MonkeyPatch) -> None:
    """`RankZeroRows` in RAM on the (faked) GPU, as the evaluation gathers a CUDA run's banks: every field, the dataset
    index included, on the device, so a bank built from it takes device rows (NNGuide's guide subset). The index was
    left on the CPU: `bank.subset(device rows)` raised CUDA's 'indices should be either on cpu or on the same
    device'."""
    gen = torch.Generator().manual_seed(0)
    features, labels = torch.randn(12, 4, generator=gen), torch.arange(12) % 3
    weight, bias = torch.randn(3, 4, generator=gen), torch.zeros(3)
    want = build_detector("nnguide", k=3, alpha=0.5).fit(FeatureBank(features @ weight.T, features, labels, weight, bias))
    with fake_cuda(monkeypatch):
        rows = RankZeroRows(12, device="cuda")
        for index in wrap(torch.tensor([7, 3, 11, 0, 3])), wrap(torch.tensor([*range(12)])):
            rows.update(index=index, features=wrap(features)[index], labels=wrap(labels)[index])
        assert not rows._batches  # written in place as they came ("cuda" is the batches' cuda:0), none kept back
        got = rows.gather()
        assert got is not None and all(isinstance(got[k], FakeCuda) for k in ("index", "features", "labels"))
        f, w = got["features"], wrap(weight)
        bank = FeatureBank(f @ w.T, f, got["labels"], w, wrap(bias), index=got["index"])
        scores = build_detector("nnguide", k=3, alpha=0.5).fit(bank).score(bank)
    assert torch.equal(got["index"].cpu(), torch.arange(12))
    torch.testing.assert_close(scores.as_subclass(torch.Tensor).cpu(),
                               want.score(FeatureBank(features @ weight.T, features, labels, weight, bias)))


def test_rank_zeros_device_batches_go_into_the_memory_map_each_dropped_once_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`evaluation.bank_dir` on a (faked) GPU: rank 0's batches wait on the device for `gather`, which writes them into
    the memory-mapped files and drops each once written (the README's claim). It held every batch of a field until
    the last one was written: all 3 of them alive at the third write."""
    import weakref

    features = torch.arange(24.0).reshape(12, 2)
    with fake_cuda(monkeypatch):
        rows = RankZeroRows(12, device="cuda", out_dir=tmp_path)
        for part in torch.arange(12).split(4):
            rows.update(index=wrap(part), features=wrap(features[part]))
        refs = [weakref.ref(b) for b in rows._batches["features"]]
        alive = []
        put = rows._put
        monkeypatch.setattr(rows, "_put", lambda name, target, value: (
            alive.append(sum(r() is not None for r in refs)) if name == "features" else None, put(name, target, value)))
        got = rows.gather()
    assert alive == [3, 2, 1]
    assert got is not None and torch.equal(got["features"], features) and torch.equal(got["index"], torch.arange(12))


def test_memory_mapped_banks_of_a_gpu_run_get_the_head_on_their_device(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`evaluation.bank_dir` on a (faked) GPU: the banks are memory-mapped on the CPU and the detectors run there,
    so the method's linear head (a GPU parameter) comes with them: react / vim multiply CPU features by it (CUDA's
    'Expected all tensors to be on the same device' before)."""
    from ood.data.benchmark import EvalSplit
    from ood.evaluation.callback import OODEvaluation
    from ood.evaluation.evaluator import Evaluator

    gen = torch.Generator().manual_seed(0)
    features = torch.randn(12, 4, generator=gen).relu()
    weight, bias = torch.randn(3, 4, generator=gen), torch.zeros(3)
    labels = torch.arange(12) % 3
    want = build_detector("react").fit(FeatureBank(features @ weight.T, features, labels, weight, bias))

    class GpuHead:
        def linear_head(self) -> tuple[torch.Tensor, torch.Tensor]:
            return wrap(weight), wrap(bias)

    callback = OODEvaluation(Evaluator(detectors=[]), bank_dir=tmp_path)
    with fake_cuda(monkeypatch):
        callback._collectors = {0: RankZeroRows(12, device="cuda", out_dir=tmp_path / "test")}
        index = wrap(torch.arange(12))
        callback._collectors[0].update(index=index, logits=wrap(features @ weight.T), features=wrap(features),
                                       labels=wrap(labels))
        bank = callback._banks([EvalSplit("test", "id_test")], GpuHead())["test"]  # type: ignore[arg-type]
        assert bank.weight.device == bank.features.device == torch.device("cpu")
        scores = build_detector("react").fit(bank).score(bank)
    torch.testing.assert_close(scores, want.score(FeatureBank(features @ weight.T, features, labels, weight, bias)))


def test_a_bank_extracted_on_the_gpu_is_scored_there(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ood.extract(..., device="cuda")` gave logits and features on the GPU beside the head's weight and bias on the
    CPU: react / vim / dice on that bank stopped with CUDA's 'Expected all tensors to be on the same device'."""
    import ood

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    data = torch.utils.data.TensorDataset(torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2]))
    want = build_detector("react").fit(ood.extract(net, data, batch_size=4))
    with fake_cuda(monkeypatch):
        bank = ood.extract(net, data, device="cuda", batch_size=4)
        assert {getattr(bank, k).device.type for k in ("logits", "features", "labels", "weight", "bias")} == {"cuda"}
        scores = build_detector("react").fit(bank).score(bank)
    torch.testing.assert_close(scores.as_subclass(torch.Tensor), want.score(ood.extract(net, data, batch_size=4)))


@pytest.mark.parametrize("method", [None, "grood"])
def test_evaluate_scores_a_model_on_the_gpu(method: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ood.evaluate(model, ...)` of a model on the (faked) GPU, `device` left to the call (CUDA when available), with
    detectors that read the head, run the network and fit on the device, and a post-hoc method (GROOD: its fit-time
    gradient passes, its noise prototype drawn on the device): no device mix-up, the scores equal a CPU evaluation's,
    the model handed back on the GPU."""
    import ood

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    gen = torch.Generator().manual_seed(0)
    data = {split: torch.utils.data.TensorDataset(torch.randn(n, 3, 8, 8, generator=gen) + shift, torch.arange(n) % 3)
            for split, n, shift in (("train", 24, 0.0), ("test", 12, 0.0), ("shifted", 12, 1.0))}
    detectors = ["msp", "knn", "mahalanobis", "react", "odin", "nnguide"]

    grood = ["method.n_proto=8", "method.ood_proto_source=uniform_noise"] if method else []

    def scores(device: str | None, out: str) -> dict[str, Any]:
        return ood.evaluate(net, {"train": data["train"], "test": data["test"]}, {"shifted": data["shifted"]},
                            detectors=detectors, method=method, device=device, batch_size=8, image_size=8,
                            mean=[0.0] * 3, std=[1.0] * 3, output_dir=tmp_path / out,
                            overrides=["detectors.tune=false", *grood]).scores

    want = scores("cpu", "cpu")
    with fake_gpu_run(monkeypatch):
        buffers_on_gpu(net)  # the caller's net.cuda(): parameters count as on the device
        got = scores(None, "gpu")
        assert isinstance(net[1].running_mean, FakeCuda)
    assert got.keys() == want.keys() and len(want) == len(detectors) + (method is not None)
    for detector, splits in want.items():
        for split, values in splits.items():
            np.testing.assert_allclose(got[detector][split], values, rtol=1e-5, atol=1e-7, err_msg=f"{detector} {split}")


def test_sensitivity_sweeps_device_banks_and_keeps_their_scores_on_the_cpu(
        synthetic: dict[str, FeatureBank], monkeypatch: pytest.MonkeyPatch) -> None:
    """`detectors.sensitivity=true` on the banks of a CUDA run: every grid point's test scores are kept to the run's
    end (~1 MB a point at ImageNet-1K's 130k test rows, 273 points for the default detectors' grids: ~0.3 GB); they
    were kept on the GPU and now go to the CPU as computed. No device mix-up in the sweep or its rows, which equal
    the CPU run's."""
    from ood.data.benchmark import EvalSplit
    from ood.evaluation.evaluator import Evaluator
    from ood.evaluation.scoring import Sweep, tune_detector
    from ood.methods import CrossEntropy

    splits = [EvalSplit("test", "id_test"), EvalSplit("ood", "ood", "far")]
    method = CrossEntropy(SmallCNN(6), optimizer=torch.optim.SGD)
    evaluator = Evaluator(detectors=["knn", "react"], tune=True, sensitivity=True)
    want = evaluator.evaluate(method, synthetic, splits, "synthetic").sensitivity
    with fake_cuda(monkeypatch):
        banks = {k: _bank_on_gpu(b) for k, b in synthetic.items()}
        sweep = Sweep(["test", "ood"])
        tune_detector("knn", {}, banks, True, sweep=sweep)
        got = evaluator.evaluate(method, banks, splits, "synthetic").sensitivity
    assert len(sweep.points) > 1 and {s.device.type for p in sweep.points for s in p.scores.values()} == {"cpu"}
    assert len(want) > 2 and got == want
