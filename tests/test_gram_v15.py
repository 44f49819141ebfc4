"""`gram_v15` (OpenOOD's gram as the v1.5 leaderboard ran it, before commit bdf6a55) against an independent
transcription of OpenOOD's pre-fix `gram_postprocessor.py` (its loops, flat per-class lists and Python-float row sums)
on a network returning OpenOOD's 5-entry feature list; its taps on the torchvision ResNet regroupings; the sign (more
deviation, higher score) on a hand-built bank."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ood.detectors import build_detector
from ood.detectors.gram_v15 import row_stats
from ood.detectors.network import LayerTaps
from ood.features.bank import FeatureBank
from ood.models import ResNet18
from ood.models.adapters import StagedModel, as_backbone

POWERS = [1, 2, 3, 4, 5]


class OpenOODNet(nn.Module):
    """OpenOOD's ResNet18_32x32 forward (functional stem ReLU, layer1..4, avgpool, `return_feature_list`) with one
    small conv per stage."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        for i, (cin, cout, stride) in enumerate(((4, 4, 1), (4, 6, 2), (6, 6, 1), (6, 8, 2)), start=1):
            setattr(self, f"layer{i}", nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=1), nn.ReLU()))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, return_feature: bool = False, return_feature_list: bool = False) -> Any:
        feature1 = F.relu(self.bn1(self.conv1(x)))
        feature2 = self.layer1(feature1)
        feature3 = self.layer2(feature2)
        feature4 = self.layer3(feature3)
        feature5 = self.avgpool(self.layer4(feature4))
        logits_cls = self.fc(feature5.view(feature5.size(0), -1))
        if return_feature:
            return logits_cls, feature5.flatten(1)
        if return_feature_list:
            return logits_cls, [feature1, feature2, feature3, feature4, feature5]
        return logits_cls


# ----- OpenOOD's pre-fix gram_postprocessor.py (zjysteven/OpenOOD main), transcribed: its loops and lists, no .cuda()
def tensor2list(x: torch.Tensor) -> list:
    return x.data.tolist()


def gram_rows_as_released(feature: torch.Tensor, p: int) -> torch.Tensor:
    """The G_p rows both released functions compute inline (the same lines twice there)."""
    temp = feature.detach()
    temp = temp**p
    temp = temp.reshape(temp.shape[0], temp.shape[1], -1)
    temp = (torch.matmul(temp, temp.transpose(dim0=2, dim1=1))).sum(dim=2)
    return (temp.sign() * torch.abs(temp) ** (1 / p)).reshape(temp.shape[0], -1)


def sample_estimator(model: nn.Module, train_loader: list, num_classes: int, powers: list[int]) -> tuple[list, list]:
    num_layer = 5
    num_poles = len(powers)
    feature_class: list = [[[None for x in range(num_poles)] for y in range(num_layer)] for z in range(num_classes)]
    mins: list = [[[None for x in range(num_poles)] for y in range(num_layer)] for z in range(num_classes)]
    maxs: list = [[[None for x in range(num_poles)] for y in range(num_layer)] for z in range(num_classes)]
    for data, label in train_loader:
        _, feature_list = model(data, return_feature_list=True)
        label_list = tensor2list(label)
        for layer_idx in range(num_layer):
            for pole_idx, p in enumerate(powers):
                temp = tensor2list(gram_rows_as_released(feature_list[layer_idx], p))
                for feature, lab in zip(temp, label_list):
                    if isinstance(feature_class[lab][layer_idx][pole_idx], type(None)):
                        feature_class[lab][layer_idx][pole_idx] = feature
                    else:
                        feature_class[lab][layer_idx][pole_idx].extend(feature)
    for lab in range(num_classes):
        for layer_idx in range(num_layer):
            for poles_idx in range(num_poles):
                feature = torch.tensor(np.array(feature_class[lab][layer_idx][poles_idx]))
                mins[lab][layer_idx][poles_idx] = feature.min(dim=0, keepdim=True)[0]
                maxs[lab][layer_idx][poles_idx] = feature.max(dim=0, keepdim=True)[0]
    return mins, maxs


def get_deviations(model: nn.Module, data: torch.Tensor, mins: list, maxs: list, powers: list[int]) -> torch.Tensor:
    num_layer = 5
    dev: list = [0 for x in range(data.shape[0])]
    logits, feature_list = model(data, return_feature_list=True)
    confs = F.softmax(logits, dim=1).cpu().detach().numpy()
    preds = torch.tensor(np.argmax(confs, axis=1))
    for layer_idx in range(num_layer):
        for pole_idx, p in enumerate(powers):
            temp = tensor2list(gram_rows_as_released(feature_list[layer_idx], p))
            for idx in range(len(temp)):
                lo, hi = mins[preds[idx]][layer_idx][pole_idx], maxs[preds[idx]][layer_idx][pole_idx]
                dev[idx] += (F.relu(lo - sum(temp[idx])) / torch.abs(lo + 10**-6)).sum()
                dev[idx] += (F.relu(sum(temp[idx]) - hi) / torch.abs(hi + 10**-6)).sum()
    return torch.tensor([float(i / 50) for i in dev], dtype=torch.float64)


# ----- tests ---------------------------------------------------------------------------------------------------------
def _banks(model: nn.Module, splits: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, FeatureBank]:
    """One tapped pass per split in batches of 16, as the evaluation caches it."""
    taps = LayerTaps(model, ["gram_v15"])
    banks = {}
    with torch.no_grad():
        for name, (x, y) in splits.items():
            logits, extras = [], []
            for chunk in x.split(16):
                logits.append(model(chunk))
                extras.append(taps.pop())
            cat = {k: torch.cat([e[k] for e in extras]) for k in extras[0]}
            banks[name] = FeatureBank(torch.cat(logits), torch.zeros(len(x), 1), y, extras=cat)
    taps.remove()
    return banks


def test_gram_v15_equals_openoods_released_gram() -> None:
    """Bounds from every train sample's flattened rows, scored by row sums, as OpenOOD's v1.5 code (1e-6)."""
    torch.manual_seed(0)
    net = OpenOODNet().eval()
    train = (torch.randn(48, 1, 8, 8), torch.arange(48) % 3)
    test, ood = torch.randn(24, 1, 8, 8), 2 * torch.rand(24, 1, 8, 8)
    backbone = as_backbone(net)
    banks = _banks(backbone, {"train": train, "test": (test, None), "ood": (ood, None)})
    assert list(banks["test"].extras) == [f"gram_v15.feature{k}" for k in range(1, 6)]
    det = build_detector("gram_v15").fit(banks["train"])
    with torch.no_grad():
        mins, maxs = sample_estimator(net, list(zip(*(t.split(16) for t in train))), 3, POWERS)
        for split, x in (("test", test), ("ood", ood)):
            torch.testing.assert_close(det.score(banks[split]), get_deviations(net, x, mins, maxs, POWERS), rtol=1e-6, atol=0)
    assert float(det.mins_[2, 4, 0]) == pytest.approx(float(mins[2][4][0]), rel=1e-6)


@pytest.mark.parametrize("regrouped", [True, False])
def test_taps_read_openoods_feature_list_of_a_torchvision_resnet(regrouped: bool) -> None:
    """feature1 after the max-pool (ood's ResNet18 regroups it into `layer1`; the adapted torchvision net has it as a
    step), layer1..layer3, the pooled layer4: OpenOOD's 224 px ResNet feature list."""
    torch.manual_seed(0)
    backbone = ResNet18(num_classes=3) if regrouped else as_backbone(torchvision.models.resnet18(num_classes=3))
    net = backbone.stages if regrouped else backbone.net
    backbone.eval()
    x = torch.randn(2, 3, 32, 32)
    taps = LayerTaps(backbone, ["gram_v15"])
    with torch.no_grad():
        backbone(x)
        got = taps.pop()
        if regrouped:
            f1 = net.layer1[0](net.stem(x))
            f2 = net.layer1[1](f1)
        else:
            f1 = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            f2 = net.layer1(f1)
        f3 = net.layer2(f2)
        f4 = net.layer3(f3)
        f5 = net.layer4(f4).mean((2, 3), keepdim=True)
    taps.remove()
    assert list(got) == [f"gram_v15.feature{k}" for k in range(1, 6)]
    for k, theirs in enumerate((f1, f2, f3, f4, f5), start=1):
        torch.testing.assert_close(got[f"gram_v15.feature{k}"], row_stats(backbone, theirs).float(), rtol=1e-5, atol=0)


def test_feature1_is_the_input_of_a_second_stage_of_several_steps() -> None:
    """An adapted model whose second stage is two module steps (torchvision DenseNet's denseblock + transition):
    feature1 is the stage's input, the stem's output; the tap read the input of its last step (the first step's
    output)."""
    torch.manual_seed(0)
    net = nn.Sequential()
    net.stem, net.a, net.b, net.c = (nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1),
                                     nn.Conv2d(4, 5, 3, padding=1), nn.Conv2d(5, 6, 3, padding=1))
    net.avgpool, net.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(6, 3)
    backbone = StagedModel(net, {"stem": ("stem",), "block1": ("a", "b"), "block2": ("c",)}, ("avgpool", "@flatten"), "fc")
    x = torch.randn(2, 1, 8, 8)
    taps = LayerTaps(backbone, ["gram_v15"])
    with torch.no_grad():
        backbone.run(x)
        got = taps.pop()["gram_v15.feature1"]
        theirs = net.stem(x)
    taps.remove()
    torch.testing.assert_close(got, row_stats(backbone, theirs).float(), rtol=1e-5, atol=0)


def test_more_deviation_scores_higher() -> None:
    """Known answer on hand-made row statistics: class 0's bounds [1, 2] (every power), class 1's [5, 6]; a row sum
    inside its predicted class's bounds scores 0, one at 4 (2 above class 0's max, 5 powers) 5 * 2/2 / 50 = 0.1, one
    at 8: 0.3, one at 0 predicted as class 1: 5 * 5/5 / 50 = 0.1; the class is the logits' argmax."""

    def bank(mins: list[float], maxs: list[float], sums: list[float], pred: list[int]) -> FeatureBank:
        stats = torch.tensor([mins, maxs, sums]).T[:, None, :].expand(-1, 5, -1).contiguous()
        logits = F.one_hot(torch.tensor(pred), 2).float()
        return FeatureBank(logits, torch.zeros(len(pred), 1), torch.tensor(pred), extras={"gram_v15.feature1": stats})

    det = build_detector("gram_v15").fit(bank([1.5, 1.0, 5.0, 5.5], [2.0, 1.2, 5.5, 6.0], [0, 0, 0, 0], [0, 0, 1, 1]))
    assert det.mins_[:, 0, 0].tolist() == [1.0, 5.0] and det.maxs_[:, 0, 0].tolist() == [2.0, 6.0]
    scores = det.score(bank([0.0] * 5, [0.0] * 5, [1.5, 4.0, 8.0, 5.5, 0.0], [0, 0, 0, 1, 1]))
    expected = [0.0, 0.1, 0.3, 0.0, 0.1]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
