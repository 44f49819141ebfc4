"""A CUDA device faked on the CPU, to run ood's CUDA-only branches where no GPU is (no test machine has one).

`FakeCuda` tensors hold CPU data but report `cuda:0`; inside `fake_cuda()` tensors moved or created on `cuda` are
`FakeCuda`, module parameters count as on the device (a trainer puts them there), `torch.cuda` answers as one
visible GPU, CUDA's autocast is the CPU's, and ood's own code raises `DeviceMix` where real CUDA would: an op mixing device tensors with CPU tensors
other than 0-dim scalars, `.numpy()` of a device tensor, a CPU generator drawing onto the device, a CPU tensor indexed
with device indices. Torch's and Lightning's code is not checked (a real run moves their tensors itself).
`fake_gpu_run()` adds what a CUDA trainer does: batches on the device, its `device` the GPU (the evaluation banks go
where the callback puts them, as in a real run). Device mix-ups are
found; no kernel runs on a GPU, so CUDA numerics are not checked."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

CUDA = torch.device("cuda", 0)
#: functions that may take tensors of both devices (copies, host reads) or create on a `device=` argument
CROSS = {"to", "copy_", "cpu", "cuda", "item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__len__",
         "__format__", "__repr__", "__reduce_ex__", "__deepcopy__", "size", "dim", "numel", "__getitem__",
         "__setitem__", "is_floating_point", "element_size", "data_ptr", "untyped_storage", "storage_offset", "stride",
         "is_contiguous", "__hash__", "__iter__", "__array__", "detach", "clone",
         "requires_grad_", "as_subclass", "_is_view", "__get__", "__set__", "type_as", "new_tensor"}
FACTORIES = {"zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint", "randperm", "eye", "linspace",
             "logspace", "tensor", "as_tensor", "zeros_like", "ones_like", "full_like", "empty_like", "rand_like",
             "randn_like", "randint_like", "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "normal"}


class DeviceMix(RuntimeError):
    """What CUDA would have raised."""


def _is_cuda(device: Any) -> bool:
    return device is not None and torch.device(device).type == "cuda" if isinstance(device, str | torch.device) else False


class FakeCuda(torch.Tensor):
    """A CPU tensor that says it is on `cuda:0` (module doc)."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name == "__get__":
            attr = getattr(func.__self__, "__name__", "")
            if attr in ("device", "is_cuda", "is_cpu"):
                return {"device": CUDA, "is_cuda": True, "is_cpu": False}[attr]
        if name in ("numpy", "__array__"):
            raise DeviceMix("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first")
        if name == "get_device":
            return 0
        return super().__torch_function__(func, types, args, kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> FakeCuda:
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(torch.Tensor).clone().as_subclass(FakeCuda)


def _on_device(t: Any) -> bool:
    """On the (fake) GPU: a `FakeCuda`, or a module parameter (the trainer puts the module on the GPU)."""
    return isinstance(t, FakeCuda | torch.nn.Parameter)


def _from_project() -> bool:
    """Whether the innermost caller outside torch and this file is ood's own code (the only code checked)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if path != __file__ and "/torch/" not in path and "contextlib" not in path:
            return f"{os.sep}ood{os.sep}" in path or f"{os.sep}benchmarks{os.sep}" in path
        frame = frame.f_back
    return False


def _tensors(x: Any, out: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors in `x` and its nested lists, tuples and dicts, appended to `out`: `tree_flatten`'s leaves for the
    arguments of a torch call, without its per-node bookkeeping (a third of the harness's time a call)."""
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, list | tuple):
        for v in x:
            _tensors(v, out)
    elif isinstance(x, dict):
        for v in x.values():
            _tensors(v, out)
    return out


def _check(name: str, args: Any, kwargs: Any) -> bool:
    """Raise where CUDA would (mixed devices) when ood's code made the call; True when the result is on the device."""
    tensors = _tensors(kwargs, _tensors(args, []))
    if not any(_on_device(t) for t in tensors):
        return False
    if name in CROSS - {"__getitem__", "__setitem__"}:
        return True
    if name in ("__getitem__", "__setitem__"):
        self_, keys = args[0], _tensors(args[1], [])
        value = args[2] if name == "__setitem__" else None
        if not _on_device(self_) and any(_on_device(k) for k in keys):
            error = f"{name}: indices should be either on cpu or on the same device as the indexed tensor (cpu)"
        elif keys and isinstance(value, torch.Tensor) and value.dim() > 0 and _on_device(value) != _on_device(self_):
            error = "index_put_: values and self on different devices"
        else:
            return _on_device(self_)
    else:
        inplace = name.endswith("_") or name.startswith("__i")
        plain = [t for t in tensors if not _on_device(t) and (t.dim() > 0 or (inplace and t is args[0]))]
        if not plain:
            return True
        error = f"{name}: Expected all tensors to be on the same device, but found cuda:0 and cpu {[tuple(t.shape) for t in plain]}"
    if _from_project():
        raise DeviceMix(error)
    return True


def _target_cpu(args: Any, kwargs: Any) -> bool:
    targets = [a for a in args[1:] if isinstance(a, str | torch.device)] + [kwargs.get("device")]
    targets += [a.device for a in args[1:] if isinstance(a, torch.Tensor)]
    return any(t is not None and torch.device(t).type == "cpu" for t in targets)


def _strip(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k != "device"}


def _unwrap(x: Any) -> Any:
    return tree_map(lambda t: t.as_subclass(torch.Tensor) if isinstance(t, FakeCuda) else t, x)


def _call(func: Any, args: Any, kwargs: Any) -> Any:
    with torch._C.DisableTorchFunctionSubclass():
        args, kwargs = _unwrap(args), _unwrap(kwargs)
        args = tuple(torch.device("cpu") if isinstance(a, torch.device) and a.type == "cuda" else a for a in args)
        args = tuple("cpu" if isinstance(a, str) and a.startswith("cuda") else a for a in args)
        return func(*args, **kwargs)


def _wrap_if(fake: bool, out: Any) -> Any:
    return wrap(out) if fake else out


def wrap(x: Any) -> Any:
    """Every tensor in `x` as a `FakeCuda` (sharing its data)."""
    if isinstance(x, torch.Tensor):  # most results: one tensor, no tree to walk
        return x if isinstance(x, FakeCuda | torch.nn.Parameter) else x.as_subclass(FakeCuda)
    return tree_map(lambda t: t.as_subclass(FakeCuda) if isinstance(t, torch.Tensor) and not isinstance(t, FakeCuda)
                    and not isinstance(t, torch.nn.Parameter) else t, x)


class _Mode(TorchFunctionMode):
    """Plain tensors moved to `cuda` and factories given `device="cuda"` make `FakeCuda` tensors."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "__get__" and isinstance(args[0], torch.nn.Parameter) and not isinstance(args[0], FakeCuda):
            attr = getattr(func.__self__, "__name__", "")
            if attr in ("device", "is_cuda", "is_cpu"):
                return {"device": CUDA, "is_cuda": True, "is_cpu": False}[attr]
        if name in ("to", "cuda") and args and (
                name == "cuda" or _is_cuda(kwargs.get("device"))
                or any(_is_cuda(a) for a in args[1:] if isinstance(a, str | torch.device))
                or any(isinstance(a, FakeCuda) for a in args[1:])):
            return wrap(_call(func, args, _strip(kwargs)) if name == "to" else args[0])
        if name in FACTORIES and _is_cuda(kwargs.get("device")):
            generator = kwargs.get("generator")
            if generator is not None and generator.device.type != "cuda":
                raise DeviceMix(f"{name}: Expected a 'cuda' device type for generator but found 'cpu'")
            return wrap(_call(func, args, _strip(kwargs)))
        if name == "cpu" or (name == "to" and _target_cpu(args, kwargs)):
            # Lightning moves the module to its root device (the CPU here, the GPU in a real run): kept on the device
            return _unwrap(func(*args, **kwargs)) if _from_project() else func(*args, **kwargs)
        return _wrap_if(_check(name, args, kwargs), func(*args, **kwargs))


@contextmanager
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`torch.cuda` answers as one visible GPU (compute capability 9.0); tensors moved or created on `cuda` are
    `FakeCuda`; CUDA's autocast (`torch.autocast("cuda")`, `trainer=gpu_fast`'s) is the CPU's, on the CPU data, so
    a float32 tensor meeting a bf16 one fails as on CUDA and code that leaves CUDA's autocast leaves it."""
    for fn, value in {"is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
                      "is_initialized": lambda: True, "synchronize": lambda *a, **k: None,
                      "get_rng_state": lambda *a, **k: torch.get_rng_state(), "set_rng_state": lambda *a, **k: None,
                      "get_rng_state_all": lambda: [torch.get_rng_state()], "set_rng_state_all": lambda s: None,
                      "get_device_name": lambda *a: "fake", "get_device_capability": lambda *a: (9, 0)}.items():
        monkeypatch.setattr(torch.cuda, fn, value)
    autocast = torch.autocast.__init__
    monkeypatch.setattr(torch.autocast, "__init__", lambda self, device_type, *args, **kwargs: autocast(
        self, "cpu" if device_type == "cuda" else device_type, *args, **kwargs))
    # an optimiser's step asks CUDA whether it captures a graph (the second name: the check in older torch, e.g. 2.6)
    for check in ("_accelerator_graph_capture_health_check", "_cuda_graph_capture_health_check"):
        if hasattr(torch.optim.Optimizer, check):
            monkeypatch.setattr(torch.optim.Optimizer, check, lambda self: None)
    with _Mode():
        yield


def _on_gpu(obj: Any) -> Any:
    """A dataclass (`Batch`, `FeatureBank`), or a dict of them, with every tensor field a `FakeCuda`."""
    if isinstance(obj, dict):
        return {k: _on_gpu(v) for k, v in obj.items()}
    return type(obj)(**{f.name: wrap(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init})


def buffers_on_gpu(module: torch.nn.Module) -> None:
    """Every buffer of `module` a `FakeCuda` (its parameters count as on the device already)."""
    for sub in module.modules():
        sub._buffers.update({k: wrap(v) for k, v in sub._buffers.items() if v is not None})


@contextmanager
def fake_gpu_run(monkeypatch: pytest.MonkeyPatch, method: torch.nn.Module | None = None) -> Iterator[None]:
    """`fake_cuda()` plus what a CUDA trainer does to `method` (an `OODMethod` of a `trainer=cpu` run): its buffers,
    the batches it receives on the device, its `device` the GPU. The evaluation callback builds its banks itself (on
    the device in RAM, on the CPU with `bank_dir`), as in a CUDA run: moving them all to the device here hid a bank
    whose dataset index the callback left on the CPU. `method=None`: every method `ood.train.build` builds inside
    (`ood.evaluate`'s, `ood-eval`'s), its `trainer=gpu` run by a CPU trainer, as the faked device is."""
    import ood.train
    from ood.data.benchmark import OODDataModule
    from ood.methods.base import OODMethod

    transfer = OODDataModule.on_after_batch_transfer
    monkeypatch.setattr(OODDataModule, "on_after_batch_transfer", lambda self, batch, i: transfer(self, _on_gpu(batch), i))
    monkeypatch.setattr(OODMethod, "device", property(lambda self: CUDA))
    if method is None:
        build = ood.train.build

        def build_on_gpu(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            assert cfg.trainer.accelerator == "gpu", "the run asked for no GPU"
            cfg.trainer.accelerator = "cpu"
            built = build(cfg, *args, **kwargs)
            buffers_on_gpu(built[0])
            return built

        monkeypatch.setattr(ood.train, "build", build_on_gpu)
    with fake_cuda(monkeypatch):
        if method is not None:
            buffers_on_gpu(method)
        yield
