"""Weights files as users bring them (a training script's own wrapping, safetensors, another program's file given to
resume), through every entry that reads one: `ood-eval ckpt_path=` (`load_weights`), `method.init.ckpt=`,
`backbone.weights=`, `ood-train ckpt_path=` (resume)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import compose_config
from safetensors.torch import save_file

from ood.cli import load_weights
from ood.errors import CheckpointError
from ood.files import read_torch_file
from ood.methods import CrossEntropy
from ood.models.adapters import module_backbone
from ood.models.small_cnn import SmallCNN
from ood.runs.checks import check_run
from ood.runs.trained import checkpoint_config

SMALL_CNN = "ood.models.small_cnn.SmallCNN"


def _network() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(6, width=8)


def _optimizer_state() -> dict[str, Any]:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9).state_dict()


#: how training scripts save a network's weights beside their own state
SAVED = {
    # timm's train script, pytorch-classification: no Lightning version key beside it
    "state_dict wrapper": lambda net: {"state_dict": net.state_dict(), "epoch": 3, "arch": "small_cnn"},
    # a tensor of the script's bookkeeping at the top level
    "model + optimizer + tensor accuracy": lambda net: {"model": net.state_dict(), "optimizer": _optimizer_state(),
                                                        "best_acc": torch.tensor(0.9)},
    "state dict + optimizer at the top level": lambda net: {**net.state_dict(), "optimizer": _optimizer_state(), "epoch": 3},
    # kuangliu/pytorch-cifar's first versions: the network object itself
    "pickled network under net": lambda net: {"net": net, "acc": 91.2, "epoch": 3},
}

#: entry -> the network it loads the file into
ENTRIES: dict[str, Callable[[Path], torch.nn.Module]] = {
    "ood-eval ckpt_path": lambda path: _evaluated(path),
    "method.init.ckpt": lambda path: _initialised(path),
    "backbone.weights": lambda path: module_backbone(SMALL_CNN, 6, 1, weights=str(path), width=8),
}


def _evaluated(path: Path) -> torch.nn.Module:
    method = CrossEntropy(SmallCNN(6, width=8), optimizer=torch.optim.SGD)
    load_weights(method, path)
    return method.backbone


def _initialised(path: Path) -> torch.nn.Module:
    method = CrossEntropy(SmallCNN(6, width=8), optimizer=torch.optim.SGD, init={"ckpt": str(path)})
    method.apply_init()
    return method.backbone


@pytest.mark.parametrize("saved", SAVED)
@pytest.mark.parametrize("entry", ENTRIES)
def test_a_training_scripts_file_loads_the_weights_of_the_plain_state_dict(tmp_path: Path, saved: str, entry: str) -> None:
    """A `{"state_dict": ...}` without Lightning's version key was read as a Lightning checkpoint (names unconverted:
    'modules differ outside the backbone'), a tensor beside `model` or an optimizer beside the parameters made the
    file's keys the parameters' ('set method.init.modules'), a pickled network under `net` was 'no parameters'. Each
    now loads exactly the weights of the plain `torch.save(net.state_dict())`."""
    net = _network()
    torch.save(net.state_dict(), tmp_path / "plain.pth")
    torch.save(SAVED[saved](net), tmp_path / "saved.pth")
    loaded, reference = ENTRIES[entry](tmp_path / "saved.pth").state_dict(), ENTRIES[entry](tmp_path / "plain.pth").state_dict()
    assert loaded.keys() == reference.keys() == net.state_dict().keys()
    for key, value in net.state_dict().items():
        assert torch.equal(loaded[key], value) and torch.equal(reference[key], value), key


def test_a_safetensors_file_is_read_by_every_reader_of_torch_files(tmp_path: Path) -> None:
    """`ood-eval ckpt_path=model.safetensors` reads the file for its stored config first (`checkpoint_config`), which
    refused it as 'not a file of torch.save ... it starts with b'...'': it is read as its tensors, with no config."""
    net = _network()
    save_file(net.state_dict(), str(tmp_path / "model.safetensors"))
    state = read_torch_file(tmp_path / "model.safetensors")
    assert state.keys() == net.state_dict().keys() and all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert checkpoint_config(tmp_path / "model.safetensors") == {}


def test_a_wrapped_networks_own_file_given_as_a_checkpoint_says_backbone_weights(tmp_path: Path) -> None:
    """timm's `pytorch_model.bin` given to `ckpt_path=` / `method.init.ckpt=` of a `backbone=timm` run was refused
    with 'pass backbone=resnet18 | resnet50, or backbone=torchvision ...' or 'the data=/backbone= it was trained
    with': the backbone it had. The wrapper keeps the network under `net.`; the refusal says `backbone.weights=`."""
    import timm

    from ood.models.adapters import timm_backbone

    torch.save(timm.create_model("test_resnet", num_classes=6, in_chans=1).state_dict(), tmp_path / "pytorch_model.bin")
    for init in (None, {"ckpt": str(tmp_path / "pytorch_model.bin")}):
        method = CrossEntropy(timm_backbone("test_resnet", 6, 1), optimizer=torch.optim.SGD, init=init)
        with pytest.raises(CheckpointError, match=r"\(backbone=torchvision\|timm\|module wraps its network: give a file of "
                                                  rf"that network as backbone.weights={tmp_path / 'pytorch_model.bin'}\)"):
            method.apply_init() if init else load_weights(method, tmp_path / "pytorch_model.bin")


@pytest.mark.parametrize("saved", ["state dict", "pickled network", "safetensors", "another Lightning file"])
def test_resuming_a_file_of_no_ood_run_is_one_line(tmp_path: Path, saved: str) -> None:
    """`ood-train ckpt_path=<file>` resumes a run: Lightning failed on any other file with a traceback ending in
    KeyError 'pytorch-lightning_version' (safetensors: 'not a file of torch.save'). Refused naming the file and
    `method.init.ckpt`, which starts a new run from its weights."""
    net, path = _network(), tmp_path / "weights.ckpt"
    if saved == "safetensors":
        save_file(net.state_dict(), str(path))
    else:
        torch.save({"state dict": net.state_dict(), "pickled network": net,
                    "another Lightning file": {"state_dict": net.state_dict(), "pytorch-lightning_version": "2.6.6"}}[saved],
                   path)
    with pytest.raises(CheckpointError, match=rf"^checkpoint {path} holds no ood run.s config .* start a new run from its "
                                              rf"weights with method.init.ckpt={path} instead of ckpt_path=$"):
        check_run(compose_config(tmp_path / "run", [f"ckpt_path={path}"]), str(path))


def test_a_pickled_network_whose_class_is_not_importable_says_to_save_its_state_dict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A released `torch.save(model)` of the authors' own class (`models.wrn.WideResNet`) read where their code is
    not: 'AttributeError: Can't get attribute ...' / 'No module named ...' said nothing of what to do."""
    import importlib
    import sys

    (tmp_path / "released_net.py").write_text("import torch\n\n\nclass Net(torch.nn.Linear):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save(importlib.import_module("released_net").Net(2, 6), tmp_path / "net.pt")
    monkeypatch.delitem(sys.modules, "released_net")
    (tmp_path / "released_net.py").unlink()
    with pytest.raises(CheckpointError, match=rf"^could not read checkpoint {tmp_path / 'net.pt'}: it holds a pickled object "
                                              r"whose class cannot be imported here \(No module named 'released_net'\): .*"
                                              r"save model.state_dict\(\) instead, or put that code on PYTHONPATH$"):
        load_weights(CrossEntropy(_network(), optimizer=torch.optim.SGD), tmp_path / "net.pt")


@pytest.mark.parametrize("saved", ["pickle protocol 1", "zip's end signature in its data"])
def test_a_file_in_torchs_format_before_1_6_is_read_whatever_its_bytes(tmp_path: Path, saved: str) -> None:
    """torch.load reads these; `read_torch_file` guessed the format itself and refused them: a pickle protocol below 2
    does not start with 0x80 ('not a file of torch.save'), and `zipfile.is_zipfile` finds zip's end-of-archive
    signature anywhere in a file's last 64 KiB (here the bytes of a tensor: 'it is a zip archive'). Both reads, the
    whole file and the memory-mapped one of a stored config, give the saved tensor."""
    protocol_1 = saved == "pickle protocol 1"
    weight = torch.arange(22, dtype=torch.uint8) if protocol_1 else torch.frombuffer(bytearray(b"PK\x05\x06" + bytes(18)),
                                                                                      dtype=torch.uint8)
    torch.save({"weight": weight}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False,
               pickle_protocol=1 if protocol_1 else 2)
    for mmap in (False, True):
        assert torch.equal(read_torch_file(tmp_path / "legacy.pth", mmap=mmap)["weight"], weight)


def test_a_state_dict_wrapper_whose_network_keeps_extra_state_reads_as_that_state(tmp_path: Path) -> None:
    """A module's `get_extra_state` is saved as any object under `<module>._extra_state`; a `{"state_dict": ...}` of
    such a network without Lightning's version key (timm's train script) was 'no parameters at the top level': only a
    mapping of tensors alone was taken for a state dict."""
    from ood.models.checkpoint import read_weights_file

    state = {**_network().state_dict(), "head._extra_state": {"scale": 2.0}}
    torch.save({"state_dict": state, "epoch": 3, "arch": "small_cnn"}, tmp_path / "saved.pth")
    read = read_weights_file(tmp_path / "saved.pth")
    assert read.keys() == state.keys() and read["head._extra_state"] == {"scale": 2.0}
    assert all(torch.equal(read[k], v) for k, v in state.items() if isinstance(v, torch.Tensor))


def test_an_empty_file_says_it_is_empty(tmp_path: Path) -> None:
    """A checkpoint left empty (a copy that failed, a full disk) said it 'starts with b'''."""
    (tmp_path / "last.ckpt").touch()
    with pytest.raises(CheckpointError, match=rf"^could not read checkpoint {tmp_path / 'last.ckpt'}: not a file of "
                                              r"torch.save \(neither its zip format nor a pickle\): it is empty$"):
        read_torch_file(tmp_path / "last.ckpt")


def test_a_checkpoint_cut_short_says_to_copy_it_again(tmp_path: Path) -> None:
    """A copy or download that stopped half-way keeps the zip format's start, not its end: it was called 'not a file
    of torch.save ... a zip archive' (torch: 'failed finding central directory ... likely ... corrupted')."""
    torch.save(_network().state_dict(), tmp_path / "full.ckpt")
    whole = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match=rf"^could not read checkpoint {tmp_path / 'last.ckpt'}: it is cut short or "
                                              r"damaged \(torch.save's zip format without its end\): copy or save it "
                                              r"again$"):
        read_torch_file(tmp_path / "last.ckpt")


def test_a_memory_mapped_read_names_the_file_as_torch_2_2_takes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.2's `torch.load(mmap=True)` took only a string ("f must be a string filename in order to use mmap
    argument"): every `ood-eval` of a `Path` failed there (found running the suite on torch 2.2)."""
    path = tmp_path / "w.ckpt"
    torch.save({"w": torch.ones(2)}, path)
    load = torch.load

    def torch_2_2(f: Any, *args: Any, mmap: bool | None = None, **kwargs: Any) -> Any:
        if mmap and not isinstance(f, str):
            raise ValueError("f must be a string filename in order to use mmap argument")
        return load(f, *args, mmap=mmap, **kwargs)

    monkeypatch.setattr(torch, "load", torch_2_2)
    assert torch.equal(read_torch_file(path, mmap=True)["w"], torch.ones(2))
