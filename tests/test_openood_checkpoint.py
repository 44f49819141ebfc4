"""OpenOOD's released checkpoints (bare ResNet18_32x32 state dicts) load into our backbone unchanged."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ood.cli import load_weights
from ood.methods import CrossEntropy
from ood.models import ResNet18_32x32
from ood.models.checkpoint import checkpoint_format, from_openood


def _as_openood(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our backbone's state dict renamed to OpenOOD's module paths (written independently of the loader)."""
    out = {}
    for key, value in state.items():
        key = key.replace("stages.stem.0.", "conv1.").replace("stages.stem.1.", "bn1.")
        key = re.sub(r"^stages\.(layer\d\.\d+)\.downsample\.", r"\1.shortcut.", key)
        out["module." + key.removeprefix("stages.")] = value
    return out


def test_openood_names_map_to_ours(tmp_path: Path) -> None:
    source = ResNet18_32x32(10)
    for p in source.parameters():
        torch.nn.init.normal_(p)
    openood = _as_openood(source.state_dict())
    assert {"module.conv1.weight", "module.bn1.running_var", "module.layer2.0.shortcut.0.weight",
            "module.layer4.1.conv2.weight", "module.fc.bias"} <= set(openood)
    assert checkpoint_format(openood) == "openood" and checkpoint_format({"state_dict": {}}) == "lightning"
    assert set(from_openood(openood)) == {f"backbone.{k}" for k in source.state_dict()}

    path = tmp_path / "s0" / "best.ckpt"
    path.parent.mkdir()
    torch.save(openood, path)
    method = CrossEntropy(ResNet18_32x32(10), optimizer=torch.optim.SGD)
    load_weights(method, path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(method.backbone.eval()(x), source.eval()(x))


class _ReleasedBlock(torch.nn.Module):
    """hendrycks/outlier-exposure `CIFAR/models/wrn.py` BasicBlock (= energy_ood's, OpenOOD's networks/wrn.py), written
    out here from the released code: its module names and its forward (the raw input as the residual when the
    widths are equal, else `convShortcut` of the activated input)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        nn = torch.nn
        self.bn1, self.relu1 = nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(out_planes), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = None if self.equalInOut else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
            out = self.relu2(self.bn2(self.conv1(x)))
        else:
            out = self.relu2(self.bn2(self.conv1(self.relu1(self.bn1(x)))))
        out = self.conv2(out)
        return torch.add(self.convShortcut(x), out) if not self.equalInOut else torch.add(x, out)


class _ReleasedNetworkBlock(torch.nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = torch.nn.Sequential(*[_ReleasedBlock(in_planes if i == 0 else out_planes, out_planes,
                                                          stride if i == 0 else 1) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class _ReleasedWideResNet(torch.nn.Module):
    """The released `WideResNet(depth, num_classes, widen_factor)` in eval mode (dropout off): conv1, block1-3, bn1,
    relu, avg_pool2d(8), fc."""

    def __init__(self, depth: int, num_classes: int, widen_factor: int) -> None:
        super().__init__()
        widths, n = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor], (depth - 4) // 6
        self.conv1 = torch.nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _ReleasedNetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = _ReleasedNetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = _ReleasedNetworkBlock(n, widths[2], widths[3], 2)
        self.bn1, self.relu = torch.nn.BatchNorm2d(widths[3]), torch.nn.ReLU(inplace=True)
        self.fc = torch.nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))
        return self.fc(torch.nn.functional.avg_pool2d(out, 8).flatten(1))


@pytest.mark.parametrize(("depth", "widen"), [(40, 2), (16, 1)])
def test_a_released_wide_resnet_file_loads_and_gives_its_logits(tmp_path: Path, depth: int, widen: int) -> None:
    """The Wide ResNet files of outlier-exposure / energy_ood / OpenOOD (e.g. energy_ood's
    `cifar10_wrn_pretrained_epoch_99.pt`, a bare state dict) read as OpenOOD's ResNet-18 (their `conv1`, `bn1`,
    `fc`) and failed on the first key. They load into `backbone=wrn40_2` (any depth / width) and give the released
    network's logits: random weights and BatchNorm statistics, eval mode, saved as the released scripts save them
    (`torch.save(net.state_dict())`, DataParallel's `module.` too)."""
    from ood.models.wrn import WideResNet

    torch.manual_seed(depth)
    released = _ReleasedWideResNet(depth, 10, widen)
    for name, value in released.state_dict().items():
        if value.is_floating_point():
            value.copy_(torch.rand_like(value) + 0.5 if "running_var" in name else torch.randn_like(value) * 0.1)
    released.eval()
    x = torch.randn(3, 3, 32, 32)
    for state, name in ((released.state_dict(), "plain.pt"), ({f"module.{k}": v for k, v in released.state_dict().items()},
                                                                "parallel.pt")):
        torch.save(state, tmp_path / name)
        assert checkpoint_format(state) == "wide_resnet"
        method = CrossEntropy(WideResNet(10, depth=depth, widen_factor=widen, dropout=0.3), optimizer=torch.optim.SGD)
        load_weights(method, tmp_path / name)
        # the same conv / batch-norm modules; the pooling and the head sum in another order: a few float32 ulps of
        # logits below 0.3 (measured 6e-8)
        torch.testing.assert_close(method.backbone.eval()(x), released(x), rtol=0, atol=1e-6)


def test_a_released_network_file_fills_the_backbone_of_a_method_with_buffers_of_its_own(tmp_path: Path) -> None:
    """`ood-eval ckpt_path=cifar10_wrn_s1_energy_ft_epoch_9.pt method=energy_oe` (energy_ood's released fine-tune,
    scored by its own method) failed: 'missing energy_stats', a buffer of the method's training that no network
    file holds. A network's own file fills the backbone alone (the buffers stay unfitted: the score reads none); a
    method whose score reads parts only its training gives (energy_cfl's centres) is still refused."""
    from ood.errors import CheckpointError
    from ood.methods.energy import EnergyCFL, EnergyOE
    from ood.models.wrn import WideResNet

    torch.manual_seed(0)
    released = _ReleasedWideResNet(16, 10, 1).eval()
    torch.save(released.state_dict(), tmp_path / "cifar10_wrn_s1_energy_ft_epoch_9.pt")
    method = EnergyOE(WideResNet(10, depth=16, widen_factor=1), optimizer=torch.optim.SGD)
    load_weights(method, tmp_path / "cifar10_wrn_s1_energy_ft_epoch_9.pt")
    x = torch.randn(2, 3, 32, 32)
    # as above (measured 7e-9, 1 ulp): a BatchNorm eps of 2e-5 moves the logits by 6.6e-7
    torch.testing.assert_close(method.backbone.eval()(x), released(x), rtol=0, atol=1e-7)
    assert bool(torch.isnan(method.energy_stats).all())
    cfl = EnergyCFL(WideResNet(10, depth=16, widen_factor=1), optimizer=torch.optim.SGD)
    with pytest.raises(CheckpointError, match=r"does not fit the configured model \(pass the method= it was trained "
                                              r"with: the checkpoint's modules differ outside the backbone\): missing"):
        load_weights(cfl, tmp_path / "cifar10_wrn_s1_energy_ft_epoch_9.pt")


def test_a_network_file_under_another_backbone_names_the_backbone_it_fits(tmp_path: Path) -> None:
    """A released WRN file under backbone=resnet18_32x32 (and OpenOOD's ResNet-18 under wrn40_2) said "pass the
    data=/backbone= it was trained with": a file of another framework has no training config to look up. The
    mismatch names the backbone the file's layout is."""
    from ood.errors import CheckpointError
    from ood.models.wrn import WideResNet

    torch.save(_ReleasedWideResNet(16, 10, 1).state_dict(), tmp_path / "wrn.pt")
    torch.save(_as_openood(ResNet18_32x32(10).state_dict()), tmp_path / "resnet.pt")
    for file, net, hint in (("wrn.pt", ResNet18_32x32(10), r"pass backbone=wrn40_2 \(with the file's depth / "
                                                             r"widen_factor\) and the data= it was trained with"),
                            ("resnet.pt", WideResNet(10, depth=16, widen_factor=1),
                             "pass backbone=resnet18_32x32 and the data= it was trained with")):
        with pytest.raises(CheckpointError, match=rf"does not fit the configured model \({hint}\): missing"):
            load_weights(CrossEntropy(net, optimizer=torch.optim.SGD), tmp_path / file)


def test_a_network_file_of_other_classes_under_its_backbone_names_the_data(tmp_path: Path) -> None:
    """OpenOOD's CIFAR-100 ResNet-18 under backbone=resnet18_32x32 and 10 classes: the head's shape differs, and the
    hint said "pass backbone=resnet18_32x32", the backbone given; the data= (its classes) is what to change."""
    from ood.errors import CheckpointError

    torch.save(_as_openood(ResNet18_32x32(100).state_dict()), tmp_path / "cifar100.pt")
    with pytest.raises(CheckpointError, match=r"\(pass backbone=resnet18_32x32 and the data= it was trained with\): "
                                              r"backbone\.fc\.bias has shape \(100,\) in the file and \(10,\) in the model"):
        load_weights(CrossEntropy(ResNet18_32x32(10), optimizer=torch.optim.SGD), tmp_path / "cifar100.pt")
