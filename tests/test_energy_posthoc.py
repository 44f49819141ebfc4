"""The energy paper's post-hoc ODIN and Mahalanobis rows (`experiment=energy_ce`) as wetliu/energy_ood computes them:
its `utils/score_calculation.py` (`ODIN`, `sample_estimator`, `get_Mahalanobis_score`) transcribed line by line
against `odin` / `odin_energy_ood` and `mahalanobis_odin` on a small WRN (energy_ood's layout: the Mahalanobis layer
is `relu(bn1(block3))`, its `intermediate_forward`). The transcription runs in float64 on the CPU where the
released code casts to float32 and moves to the GPU (`.float()`, `.cuda()`), so that the two agree to rounding."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance
from torch import nn

from ood.detectors import build_detector
from ood.features.bank import FeatureBank
from ood.models import WideResNet

#: energy_ood's CIFAR-10 channel std, which its ODIN and Mahalanobis steps divide by (score_calculation.py:67-69)
STD = [x / 255 for x in (63.0, 62.1, 66.7)]
CLASSES = 4


class Released(nn.Module):
    """An ood WRN seen through energy_ood's `models/wrn.py` interface: `intermediate_forward(x, 0)` and
    `feature_list(x)` return `relu(bn1(block3(...)))`, the map before the 8x8 average pool."""

    def __init__(self, net: WideResNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def intermediate_forward(self, x: torch.Tensor, layer_index: int) -> torch.Tensor:
        return self.net.run(x, ["block3"]).layers["block3"]

    def feature_list(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = self.net.run(x, ["block3"])
        return out.logits, [out.layers["block3"]]


@pytest.fixture(scope="module")
def wrn() -> dict[str, Any]:
    """WRN-10-1 (64-d features) in float64, its batch-norm statistics taken from its train images; 96 train images
    of 4 classes (a full-rank shared covariance), 8 test images; 8 pixels a side (the global pool is energy_ood's
    8x8 average pool at 32)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = WideResNet(num_classes=CLASSES, depth=10, widen_factor=1).double()
    train, test = (torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64) for n in (96, 8))
    with torch.no_grad():
        net.train()(train)
    net.eval()
    labels = torch.arange(96) % CLASSES
    with torch.no_grad():
        out = net.run(train)
    return {"net": net, "train": train, "labels": labels, "test": test,
            "bank": FeatureBank(out.logits, out.features, labels)}


def released_odin(net: nn.Module, data: torch.Tensor, temper: float, noise: float) -> np.ndarray:
    """score_calculation.py:25-32 and `ODIN` (:49-84): -max softmax(f(x_tilde) / T) (its ID-positive score is the
    negation, test.py:221)."""
    data = data.clone().requires_grad_(True)
    outputs = net(data)
    max_index_temp = np.argmax(outputs.data.cpu().numpy(), axis=1)
    outputs = outputs / temper
    labels = torch.LongTensor(max_index_temp)
    loss = nn.CrossEntropyLoss()(outputs, labels)
    loss.backward()
    gradient = torch.ge(data.grad.data, 0)
    gradient = (gradient.double() - 0.5) * 2
    gradient[:, 0] = (gradient[:, 0]) / (63.0 / 255.0)
    gradient[:, 1] = (gradient[:, 1]) / (62.1 / 255.0)
    gradient[:, 2] = (gradient[:, 2]) / (66.7 / 255.0)
    temp_inputs = torch.add(data.data, gradient, alpha=-noise)
    outputs = net(temp_inputs) / temper
    nn_outputs = outputs.data.cpu().numpy()
    nn_outputs = nn_outputs - np.max(nn_outputs, axis=1, keepdims=True)
    nn_outputs = np.exp(nn_outputs) / np.sum(np.exp(nn_outputs), axis=1, keepdims=True)
    return -np.max(nn_outputs, 1)


def released_sample_estimator(model: Released, num_classes: int, data: torch.Tensor, target: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """score_calculation.py:150-229 for test.py's one layer (`feature_list` of one map), one batch: class means of
    the channel-mean features and the precision of the class-centred features (sklearn's EmpiricalCovariance)."""
    with torch.no_grad():
        _, out_features = model.feature_list(data)
    features = torch.mean(out_features[0].view(out_features[0].size(0), out_features[0].size(1), -1), 2)
    per_class = [features[target == c] for c in range(num_classes)]  # the rows of each class, in loader order
    sample_class_mean = torch.stack([torch.mean(rows, 0) for rows in per_class])
    x = torch.cat([per_class[i] - sample_class_mean[i] for i in range(num_classes)], 0)
    precision = EmpiricalCovariance(assume_centered=False).fit(x.cpu().numpy()).precision_
    return sample_class_mean, torch.from_numpy(precision)


def released_mahalanobis(model: Released, data: torch.Tensor, num_classes: int, sample_mean: torch.Tensor,
                         precision: torch.Tensor, magnitude: float) -> np.ndarray:
    """`get_Mahalanobis_score` (score_calculation.py:86-148) on one batch, layer_index 0 (test.py:185: count - 1):
    -max_c M_c of the features of the input stepped towards its closest class Gaussian."""
    data = data.clone().requires_grad_(True)
    out_features = model.intermediate_forward(data, 0)
    out_features = out_features.view(out_features.size(0), out_features.size(1), -1)
    out_features = torch.mean(out_features, 2)
    gaussian_score = torch.cat([(-0.5 * torch.mm(torch.mm(out_features.data - sample_mean[i], precision),
                                                 (out_features.data - sample_mean[i]).t()).diag()).view(-1, 1)
                                for i in range(num_classes)], 1)
    sample_pred = gaussian_score.max(1)[1]
    batch_sample_mean = sample_mean.index_select(0, sample_pred)
    zero_f = out_features - batch_sample_mean
    pure_gau = -0.5 * torch.mm(torch.mm(zero_f, precision), zero_f.t()).diag()
    loss = torch.mean(-pure_gau)
    loss.backward()
    gradient = torch.ge(data.grad.data, 0)
    gradient = (gradient.double() - 0.5) * 2
    for channel, std in enumerate((63.0, 62.1, 66.7)):
        gradient.index_copy_(1, torch.LongTensor([channel]), gradient.index_select(1, torch.LongTensor([channel])) / (std / 255.0))
    temp_inputs = torch.add(data.data, gradient, alpha=-magnitude)
    with torch.no_grad():
        noise_out_features = model.intermediate_forward(temp_inputs, 0)
    noise_out_features = torch.mean(noise_out_features.view(noise_out_features.size(0), noise_out_features.size(1), -1), 2)
    noise_gaussian_score = torch.cat([(-0.5 * torch.mm(torch.mm(noise_out_features.data - sample_mean[i], precision),
                                                       (noise_out_features.data - sample_mean[i]).t()).diag()).view(-1, 1)
                                      for i in range(num_classes)], 1)
    noise_gaussian_score, _ = torch.max(noise_gaussian_score, dim=1)
    return -noise_gaussian_score.cpu().numpy()


@pytest.mark.parametrize(("name", "temperature", "noise"), [("odin", 1000, 0.0014), ("odin_energy_ood", 1, 0.0048),
                                                            ("odin_energy_ood", 10, 0.0)])
def test_odin_is_energy_oods_odin(wrn: dict[str, Any], name: str, temperature: float, noise: float) -> None:
    """Our max log-softmax is the log of energy_ood's max softmax, whose negation it ranks ID-positive."""
    det = build_detector(name, temperature=temperature, noise=noise, input_std=STD)
    ours = det.score_inputs(wrn["net"], wrn["test"])
    theirs = torch.from_numpy(-released_odin(wrn["net"], wrn["test"], temperature, noise))
    torch.testing.assert_close(ours.exp(), theirs, rtol=0, atol=1e-9)
    clean = torch.from_numpy(-released_odin(wrn["net"], wrn["test"], temperature, 0.0))
    assert noise == 0 or (theirs - clean).abs().max() > 1e3 * 1e-9  # the step moves the scores beyond the tolerance


@pytest.mark.parametrize("noise", [0.0, 0.005])
def test_mahalanobis_odin_is_energy_oods_mahalanobis(wrn: dict[str, Any], noise: float) -> None:
    """One Gaussian on the last map's channel means (test.py:172-185: energy_ood's WRN lists that one layer), tied
    covariance of the class-centred train features, the input stepped by `noise` / std towards the closest class."""
    released = Released(wrn["net"])
    mean, precision = released_sample_estimator(released, CLASSES, wrn["train"], wrn["labels"])
    theirs = torch.from_numpy(-released_mahalanobis(released, wrn["test"], CLASSES, mean, precision, noise))
    det = build_detector("mahalanobis_odin", noise=noise, input_std=STD).fit(wrn["bank"])
    ours = det.score_inputs(wrn["net"], wrn["test"])
    # the same float32 network passes, the Gaussian in float64: measured 1e-14 relative
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=0)
    if noise:
        clean = torch.from_numpy(-released_mahalanobis(released, wrn["test"], CLASSES, mean, precision, 0.0))
        assert ((theirs - clean) / clean).abs().max() > 1e-3  # the step moves the scores beyond the tolerance
