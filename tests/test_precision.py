"""`trainer=gpu_fast` (`ood.precision.FastMixedPrecision`): bf16 autocast, channels_last, optional compile; weights
saved from compiled networks (a compiled model given to `ood.evaluate`: `test_api.py`)."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision
from helpers import compose_config
from torch.utils.data import DataLoader, TensorDataset

import ood
from ood.cli import load_weights
from ood.data.batch import Batch, collate_batch
from ood.detectors.gram import GramStream
from ood.detectors.network import FoldInputs
from ood.detectors.odin import ODIN
from ood.errors import ConfigError, NonFiniteError
from ood.evaluation.callback import OODEvaluation
from ood.methods.ce import CrossEntropy
from ood.models.checkpoint import plain_key, read_weights_file
from ood.models.small_cnn import SmallCNN
from ood.precision import CUDA_GRAPH_MODES, FastMixedPrecision
from ood.utils import instantiate


def test_gpu_stays_fp32_and_gpu_fast_adds_the_plugin(tmp_path: Path) -> None:
    gpu = compose_config(tmp_path, ["trainer=gpu"]).trainer
    assert "precision" not in gpu and "plugins" not in gpu
    fast = compose_config(tmp_path, ["trainer=gpu_fast", "trainer.plugins.0.compile=true",
                                     "trainer.plugins.0.compile_mode=max-autotune-no-cudagraphs"]).trainer
    plugin = instantiate(fast.plugins[0])
    assert isinstance(plugin, FastMixedPrecision)
    assert (plugin.precision, plugin.device, plugin.channels_last, plugin.compile) == ("bf16-mixed", "cuda", True, True)
    assert (plugin.compile_backend, plugin.compile_mode) == ("inductor", "max-autotune-no-cudagraphs")


def test_training_runs_in_bf16_with_channels_last() -> None:
    """bf16 autocast and channels_last weights; the batch reaches the step as loaded (no CPU-side copy) and the
    first convolution's activations are channels_last."""
    seen: list[tuple[bool, torch.dtype, bool, bool, bool]] = []

    class Probe(CrossEntropy):
        def training_loss(self, batch: Batch) -> torch.Tensor:
            x = batch.x
            weight = [p for p in self.parameters() if p.dim() == 4][-1]
            first = next(iter(self.backbone.stages.values()))
            seen.append(
                (
                    torch.is_autocast_enabled("cpu"),
                    torch.get_autocast_dtype("cpu"),
                    x.is_contiguous(),
                    weight.is_contiguous(memory_format=torch.channels_last),
                    first(x).is_contiguous(memory_format=torch.channels_last),
                )
            )
            return super().training_loss(batch)

    method = Probe(SmallCNN(6, in_channels=3, width=4), optimizer=torch.optim.SGD)
    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.zeros(8, dtype=torch.long), torch.arange(8))
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, plugins=[FastMixedPrecision(device="cpu")], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(method, DataLoader(data, batch_size=4, collate_fn=collate_batch))
    assert seen == [(True, torch.bfloat16, True, True, True)] * 2


def test_compile_is_in_place_and_keeps_checkpoint_keys() -> None:
    method = CrossEntropy(SmallCNN(6, width=4), optimizer=torch.optim.SGD)
    keys = list(method.state_dict())
    converted = FastMixedPrecision(device="cpu", compile=True).convert_module(method)
    assert converted is method and list(method.state_dict()) == keys
    assert all(child._compiled_call_impl is not None for child in method.children())


def test_the_evaluations_network_passes_run_compiled_modules_eagerly() -> None:
    """Through a compiled backbone, ODIN's input gradient (`retain_graph=True`) fails once the evaluation's batch size
    differs from the training's (the recompile, with dynamic shapes, donates buffers to its backward), and
    gram_stream's layer hooks, added after an earlier pass compiled the forward, are not called; the evaluation's
    network passes run it eagerly: the uncompiled network's ODIN scores and Gram rows, bit for bit. The `aot_eager`
    backend traces as inductor does (AOTAutograd, donated buffers) without generating kernels."""
    torch.manual_seed(0)
    method = CrossEntropy(SmallCNN(3, in_channels=3), optimizer=torch.optim.SGD).eval()
    reference = copy.deepcopy(method)
    FastMixedPrecision(device="cpu", channels_last=False, compile=True, compile_backend="aot_eager").convert_module(method)
    x = torch.randn(8, 3, 16, 16)
    method(x[:4]).sum().backward()  # a training step's compiled forward and backward, at another batch size
    with torch.no_grad():
        method(x)  # an earlier no-grad pass (ODIN's nudged inputs), compiled without hooks
    loader = DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long), torch.arange(8)), batch_size=8,
                        collate_fn=collate_batch)
    gram: list[list[torch.Tensor]] = []
    OODEvaluation._model_scores(FoldInputs(lambda model, x, _: gram.append(GramStream._forward(model, x)[1]),
                                           torch.arange(8)), method, loader)
    want = GramStream._forward(reference, x)[1]
    assert len(gram[0]) == len(want) == 6 and all(torch.equal(a, b) for a, b in zip(gram[0], want))
    odin = ODIN(temperature=10, noise=0.01)
    assert torch.equal(OODEvaluation._model_scores(odin, method, loader), odin.score_inputs(reference, x))


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_compile_modes_that_capture_cuda_graphs_are_refused_on_cuda(mode: str) -> None:
    """A CUDA graph's replay overwrites the previous call's outputs, which the evaluation cache keeps: refused at
    construction, naming the mode to use instead; the same modes on the CPU (no CUDA graphs) and inductor's other
    modes on CUDA are accepted. The list is inductor's own (`triton.cudagraphs` on)."""
    import torch._inductor

    assert {m for m, o in torch._inductor.list_mode_options().items() if o.get("triton.cudagraphs")} == set(CUDA_GRAPH_MODES)
    with pytest.raises(ConfigError, match=f"compile_mode={mode} captures CUDA graphs.*max-autotune-no-cudagraphs"):
        FastMixedPrecision(compile=True, compile_mode=mode)
    assert FastMixedPrecision(compile=True, compile_mode=mode, device="cpu").compile_mode == mode
    for fine in (None, "default", "max-autotune-no-cudagraphs"):
        assert FastMixedPrecision(compile=True, compile_mode=fine).compile_mode == fine


@pytest.mark.parametrize(("capability", "precision", "refused"),
                         [((7, 5), "bf16-mixed", True), ((7, 5), "16-mixed", False), ((8, 0), "bf16-mixed", False)])
def test_bf16_on_a_gpu_without_bf16_kernels_is_refused(capability: tuple[int, int], precision: str, refused: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A T4 or V100 (compute capability 7.x) has no bf16 tensor-core kernels: `trainer=gpu_fast` there ran bf16
    emulated or failed in cuDNN. Refused as the trainer sets the module up on its GPU, naming fp16 and fp32; fp16
    there, and bf16 on an A100 (8.0), are set up as before (a stand-in GPU: none here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    plugin = FastMixedPrecision(precision=precision, channels_last=True)
    net = SmallCNN(3)
    if refused:
        with pytest.raises(ConfigError, match=r"^trainer=gpu_fast runs bf16, which Tesla T4 \(compute capability 7.5\) has "
                                              r"no kernels for \(bf16 needs 8.0\+\): use trainer.plugins.0.precision=16-mixed"):
            plugin.convert_module(net)
    else:
        assert plugin.convert_module(net).stages["block1"][0].weight.is_contiguous(memory_format=torch.channels_last)


def test_compile_needs_set_stance(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.compiler, "set_stance")
    with pytest.raises(ConfigError, match=r"^trainer.plugins.0.compile=true needs torch >= 2.6 "):
        FastMixedPrecision(device="cpu", compile=True)
    assert not FastMixedPrecision(device="cpu").compile


def test_weights_saved_from_compiled_networks_load(tmp_path: Path) -> None:
    """State dicts of `torch.compile`d networks name every tensor with `_orig_mod.` (mid-name for a compiled
    sub-module; under DDP's `module.` too): a method, a Lightning checkpoint, a bare backbone and a library model
    saved so load as the plain network's (a CheckpointError naming `_orig_mod` before)."""
    torch.manual_seed(0)
    source = CrossEntropy(SmallCNN(3), optimizer=torch.optim.SGD)
    want = {k: v.clone() for k, v in source.state_dict().items()}
    files = {"backbone.pt": {f"module.{k}": v for k, v in torch.compile(source.backbone).state_dict().items()}}
    source.backbone = torch.compile(source.backbone)  # lazily: nothing is compiled before a call
    files |= {"method.pt": source.state_dict(), "last.ckpt": {"state_dict": source.state_dict(), "epoch": 0}}
    for name, state in files.items():
        assert any("_orig_mod." in k for k in (state.get("state_dict") or state))
        torch.save(state, tmp_path / name)
        target = CrossEntropy(SmallCNN(3), optimizer=torch.optim.SGD)
        load_weights(target, tmp_path / name)
        assert all(torch.equal(v, want[k]) for k, v in target.state_dict().items()), name
    net = torchvision.models.resnet18(num_classes=3)
    torch.save(torch.compile(net).state_dict(), tmp_path / "resnet18.pth")
    assert read_weights_file(tmp_path / "resnet18.pth").keys() == net.state_dict().keys()
    # only whole `_orig_mod` parts go: a parameter whose name ends in it keeps its name
    assert plain_key("module._orig_mod.backbone._orig_mod.fc.weight") == "backbone.fc.weight"
    assert plain_key("head.proj_orig_mod.weight") == "head.proj_orig_mod.weight"


def test_a_compiled_method_given_to_evaluate_is_its_backbone() -> None:
    """`torch.compile(method)`: the wrapper is taken off before the method is recognised (its backbone evaluated,
    not the compiled method as one opaque module)."""
    from ood.api import _network

    method = CrossEntropy(SmallCNN(3), optimizer=torch.optim.SGD)
    assert _network(torch.compile(method)) is method.backbone
    assert _network(torch.compile(method.backbone)) is method.backbone


def test_a_float16_overflow_in_the_evaluation_pass_names_the_precision(tmp_path: Path) -> None:
    """Activations above 65504 are inf under fp16 autocast (`precision: 16-mixed`); the evaluation stops naming the
    split, and now the precision and the fix (the message named neither: the banks are float32)."""
    gen = torch.Generator().manual_seed(0)

    def images(n: int) -> TensorDataset:
        return TensorDataset(torch.rand(n, 3, 8, 8, generator=gen), torch.arange(n) % 3)

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        net[1].weight.mul_(1e6)
    fp16 = "+trainer.plugins=[{_target_:ood.precision.FastMixedPrecision,precision:16-mixed,device:cpu}]"
    with pytest.raises(NonFiniteError, match=r"^split train: \d+ of \d+ logit values are NaN or infinite; the pass ran in "
                                             r"float16 \(trainer precision 16-mixed\), whose activations overflow above "
                                             r"65504: use bf16-mixed, or fp32 \(trainer=gpu\)$"):
        ood.evaluate(net, {"train": images(6), "test": images(3)}, {"other": images(3)}, detectors=["msp"], device="cpu",
                     output_dir=tmp_path, overrides=[fp16])
