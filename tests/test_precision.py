"""`trainer=gpu_fast` (`ood.precision.FastMixedPrecision`): bf16 autocast, channels_last, optional compile."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from helpers import compose_config
from torch.utils.data import DataLoader, TensorDataset

from ood.data.batch import Batch, collate_batch
from ood.methods.ce import CrossEntropy
from ood.models.small_cnn import SmallCNN
from ood.precision import FastMixedPrecision
from ood.utils import instantiate


def test_gpu_stays_fp32_and_gpu_fast_adds_the_plugin(tmp_path: Path) -> None:
    gpu = compose_config(tmp_path, ["trainer=gpu"]).trainer
    assert "precision" not in gpu and "plugins" not in gpu
    fast = compose_config(tmp_path, ["trainer=gpu_fast", "trainer.plugins.0.compile=true",
                                     "trainer.plugins.0.compile_mode=max-autotune"]).trainer
    plugin = instantiate(fast.plugins[0])
    assert isinstance(plugin, FastMixedPrecision)
    assert (plugin.precision, plugin.device, plugin.channels_last, plugin.compile) == ("bf16-mixed", "cuda", True, True)
    assert (plugin.compile_backend, plugin.compile_mode) == ("inductor", "max-autotune")


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

