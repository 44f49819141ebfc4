"""`trainer=gpu_fast`: bf16 mixed precision, channels_last memory format and optional `torch.compile`, as one
Lightning precision plugin, so choosing the trainer config alone switches them on.

`trainer=gpu` stays fp32 (OpenOOD's setting, for leaderboard parity). `gpu_fast` is faster on GPUs with bf16
tensor cores; its numbers may differ slightly from the leaderboard's (bf16 rounding of activations and gradients,
other convolution algorithms), so reproduce published rows with `trainer=gpu`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from ood.errors import ConfigError

#: inductor's `torch.compile` modes that capture CUDA graphs (`torch._inductor.list_mode_options`: "triton.cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class FastMixedPrecision(MixedPrecision):
    """Autocast at `precision` (default bf16) on `device`, plus channels_last weights and, when `compile`,
    `torch.compile` of every top-level sub-module of the method (the backbone, heads), in place so that checkpoints
    keep their keys, with `compile_backend` and `compile_mode` (`torch.compile`'s `backend`, `mode`: e.g.
    "max-autotune-no-cudagraphs"; "aot_eager" traces as inductor does without generating kernels, quick on a CPU).
    Inductor's modes that capture CUDA graphs ("reduce-overhead", "max-autotune") are refused on CUDA: a graph's
    replay overwrites the outputs of the previous call, and the evaluation keeps every test batch's outputs (its
    feature cache) and methods keep tensors across steps (`CUDA_GRAPH_MODES`).

    Batches are not converted: Lightning converts inputs before moving them to the device, so a conversion here
    would copy every batch on the CPU in the main process. Convolutions with channels_last weights compute and
    return channels_last activations from NCHW inputs, on the device, so the layout is the same from the first
    layer on.

    `precision="16-mixed"` (fp16, for GPUs without bf16: V100, T4) makes Lightning's `MixedPrecision` add a
    `torch.amp.GradScaler(device)`: `manual_backward` scales the loss and each optimiser step goes through the scaler
    (skipped, its scale halved, when the gradients overflowed), in automatic and manual optimisation alike.

    Checked on the CPU only (no GPU has run this yet; `make gpu-check` does): every method trains and evaluates
    in bf16 and fp16 with the scaler (CPU autocast keeps more ops in fp16 than CUDA's, which runs softmax, exp, sum,
    norm and pow in fp32, so CUDA overflows no sooner), CE and cluster compiled with the `aot_eager` backend (dynamo
    and AOTAutograd as inductor's, donated buffers included) alone and under 2-rank gloo DDP, channels_last with the
    input-gradient detectors and ResNet-50's layer taps. Not checked: inductor's generated kernels (CUDA/Triton),
    the `max-autotune-no-cudagraphs` mode, NCCL, and any speed-up."""

    def __init__(
        self,
        precision: Literal["16-mixed", "bf16-mixed"] = "bf16-mixed",
        device: str = "cuda",
        channels_last: bool = True,
        compile: bool = False,  # noqa: A002 - the config key users set
        compile_backend: str = "inductor",
        compile_mode: str | None = None,
    ) -> None:
        if compile and not hasattr(torch.compiler, "set_stance"):
            raise ConfigError(f"trainer.plugins.0.compile=true needs torch >= 2.6 (the evaluation runs the compiled modules "
                              f"eagerly with torch.compiler.set_stance); this is torch {torch.__version__}")
        if compile and compile_backend == "inductor" and torch.device(device).type == "cuda" and compile_mode in CUDA_GRAPH_MODES:
            raise ConfigError(f"trainer.plugins.0.compile_mode={compile_mode} captures CUDA graphs, whose replays overwrite "
                              "the outputs of the previous batch that the evaluation cache keeps: use "
                              "compile_mode=max-autotune-no-cudagraphs (or null, inductor's default)")
        super().__init__(precision, device)
        self.channels_last = channels_last
        self.compile = compile
        self.compile_backend, self.compile_mode = compile_backend, compile_mode

    def convert_module(self, module: nn.Module) -> nn.Module:
        """channels_last and compiled in place (class doc); bf16 on a GPU without bf16 kernels is refused here, once
        the trainer has picked the rank's GPU (asking CUDA earlier would start it in the launching process)."""
        if self.precision == "bf16-mixed" and torch.device(self.device).type == "cuda" and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            if major < 8:
                raise ConfigError(f"trainer=gpu_fast runs bf16, which {torch.cuda.get_device_name()} (compute capability "
                                  f"{major}.{minor}) has no kernels for (bf16 needs 8.0+): use "
                                  "trainer.plugins.0.precision=16-mixed, or trainer=gpu (fp32)")
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if self.compile:
            for child in module.children():
                child.compile(backend=self.compile_backend, mode=self.compile_mode)
        return module


@contextmanager
def float32_matmuls() -> Iterator[None]:
    """Full float32 matrix products within (`torch.set_float32_matmul_precision("highest")`), the caller's setting put
    back after. "high" or "medium" (Lightning's hint on Ampere GPUs, which many scripts follow) computes float32 CUDA
    matmuls in TF32 (10 mantissa bits) or bf16: the detectors' distances and projections (Mahalanobis, kNN, ViM,
    cfood's 2 - 2<u, v>) would lose most of float32's precision, and with it the order of near scores."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@contextmanager
def eager() -> Iterator[None]:
    """Run every `torch.compile`d module eagerly inside: the evaluation's network passes take input gradients with
    `retain_graph=True` (ODIN, i-ODIN, the staged detectors), which a compiled backward with donated buffers refuses,
    and hook layers for one pass (gram_stream), which a forward compiled before the hooks were added does not call;
    toggling dropout (mcdropout) would recompile. Before torch 2.6 (no `set_stance`) it does nothing:
    `FastMixedPrecision` compiles nothing there."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    with set_stance("force_eager") if set_stance is not None else nullcontext():
        yield
