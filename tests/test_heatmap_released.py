"""The heatmap paper's released models (jhornauer/heatmap_ood) evaluate as they are: `experiment=heatmap_released`
with `ckpt_path=<their classifier file>` and `method.decoder_ckpt=<their decoder file>` gives their logits and their
`evaluation.test_generator` score. The released modules are transcribed here independently (names and forward of
`Networks/resnet.py`, `Networks/wideresnet.py` and `Networks/generator.py`), filled with random weights and saved as
`optimization.py` saves them; no download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import compose_config
from omegaconf import OmegaConf
from torch import nn

from ood.cli import load_weights
from ood.errors import CheckpointError, ConfigError
from ood.methods.heatmap import heatmap_score
from ood.models.checkpoint import from_meliketoy_wrn
from ood.models.decoder import DecoderPlan, decoder_plan
from ood.models.wrn import MeliketoyWideResNet
from ood.runs.checks import check_run
from ood.utils import instantiate


# ----- transcription of jhornauer/heatmap_ood Networks/resnet.py (ResNet18, ResNet_Linear) -----------------------
class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ReleasedResNet18(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, 1)
        self.layer2 = self._make_layer(128, 2)
        self.layer3 = self._make_layer(256, 2)
        self.layer4 = self._make_layer(512, 2)
        self.avgpool = nn.AvgPool2d(kernel_size=4)

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        layers = []
        for s in (stride, 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # fw_layers = 1: the pooled feature only
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).view(x.size(0), -1)


class ResNetLinear(nn.Module):  # = WideResNet_Linear with 64 * widen_factor features
    def __init__(self, num_classes: int, features: int = 512) -> None:
        super().__init__()
        self.linear = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


# ----- transcription of Networks/resnet.py ResNet50(img_size=64) (Bottleneck, [3, 4, 6, 3]) -------------------------
class ReleasedBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != 4 * planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, 4 * planes, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(4 * planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ReleasedResNet50At64(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, 3, 1)
        self.layer2 = self._make_layer(128, 4, 2)
        self.layer3 = self._make_layer(256, 6, 2)
        self.layer4 = self._make_layer(512, 3, 2)
        self.avgpool = nn.AvgPool2d(kernel_size=4)
        self.maxpool = nn.MaxPool2d(kernel_size=2)  # img_size == 64

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(ReleasedBottleneck(self.in_planes, planes, s))
            self.in_planes = planes * 4
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # fw_layers = 1: the pooled feature only
        x1 = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x5 = self.layer4(self.layer3(self.layer2(self.layer1(x1))))
        xr = self.avgpool(x5)
        return xr.view(xr.size(0), -1)


# ----- transcription of Networks/wideresnet.py (Wide_ResNet(40, 2, 0.3), WideResNet_Linear; meliketoy's) -----------
class WideBasic(nn.Module):
    def __init__(self, in_planes: int, planes: int, dropout_rate: float, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, padding=1, bias=True)
        self.dropout = nn.Dropout(p=dropout_rate)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class ReleasedWideResNet(nn.Module):
    def __init__(self, depth: int = 40, k: int = 2, dropout_rate: float = 0.3) -> None:
        super().__init__()
        self.in_planes = 16
        n = (depth - 4) // 6
        stages = [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(3, stages[0], kernel_size=3, stride=1, padding=1, bias=True)
        self.layer1 = self._wide_layer(stages[1], n, dropout_rate, 1)
        self.layer2 = self._wide_layer(stages[2], n, dropout_rate, 2)
        self.layer3 = self._wide_layer(stages[3], n, dropout_rate, 2)
        self.bn1 = nn.BatchNorm2d(stages[3], momentum=0.9)
        self.avgpool = nn.AvgPool2d(kernel_size=8)

    def _wide_layer(self, planes: int, num_blocks: int, dropout_rate: float, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(WideBasic(self.in_planes, planes, dropout_rate, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # fw_layers = 1: the pooled feature only
        x4 = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        xr = self.avgpool(F.relu(self.bn1(x4)))
        return xr.view(xr.size(0), -1)


# ----- transcription of Networks/generator.py ResNet18_CIFAR10_Deconv_GAN / WideResNet_40x2_Deconv_GAN /
# TImageNet_Deconv_GAN (fw_layers = 1): the same modules, d0 = 100 / 128 / 512, filters 512..64 / 256..32 /
# 2048..128 (five up-blocks, the 1x1 output conv_block6) ---------------------------------------------------------------
class ReleasedGenerator(nn.Module):
    def __init__(self, latent_dim: int, num_classes: int, d0: int, f: tuple[int, ...] = (512, 256, 128, 64)) -> None:
        super().__init__()
        self.num_classes, self.d0 = num_classes, d0
        self.fc1 = nn.Linear(latent_dim, d0)

        def block(cin: int, cout: int, k: int, s: int, p: int) -> nn.Sequential:
            return nn.Sequential(nn.ConvTranspose2d(cin, cout, k, s, p, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))

        self.conv_block1 = block(d0, f[0], 4, 1, 0)
        for i, (cin, cout) in enumerate(zip(f, f[1:]), start=2):
            setattr(self, f"conv_block{i}", block(cin, cout, 4, 2, 1))
        setattr(self, f"conv_block{len(f) + 1}", nn.Sequential(nn.ConvTranspose2d(f[-1], 3, 1, 1, 0, bias=False),
                                                                nn.Tanh()))

    def forward(self, z: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
        x = self.fc1(torch.cat((z, F.one_hot(y_hat, num_classes=self.num_classes)), dim=1)).view(-1, self.d0, 1, 1)
        for i in range(1, len(self._modules)):  # conv_block1 .. conv_block<n + 1>, in order
            x = getattr(self, f"conv_block{i}")(x)
        return x


def released_scores(enc: nn.Module, cls: nn.Module, gen: nn.Module, x: torch.Tensor, low: float, high: float,
                    batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, `evaluation.test_generator` scores) over `x` in loader batches of `batch_size`: with fw_layers = 1,
    `zs[l_idx]` for l_idx in range(1) rescales row 0 of each batch only; score mean_ij max_c |x_hat| (higher = OOD)."""
    logits, scores = [], []
    for images in x.split(batch_size):
        zs = enc(images)
        out = cls(zs)
        ys = torch.argmax(out, dim=1)
        for l_idx in range(1):
            zs[l_idx] = (zs[l_idx] - low) / (high - low)
        max_ch = torch.max(torch.abs(gen(zs, ys)), dim=1)[0]
        logits.append(out)
        scores.append(torch.mean(max_ch, dim=tuple(range(1, max_ch.dim()))))
    return torch.cat(logits), torch.cat(scores)


def _randomise(module: nn.Module, gen: torch.Generator, *inputs: torch.Tensor) -> nn.Module:
    """Random BN affines, and BN statistics of `inputs` (as training leaves them: activations at unit scale, so
    images are scored apart; the defaults would hide a swapped mean / variance or a missed BN)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
                m.reset_running_stats()
                m.momentum = None  # a cumulative average: the statistics of `inputs`
        module.train()(*inputs)
    return module.eval()




def _save_released(root: Path, classifier_name: str, decoder_run: str, enc: nn.Module, cls: nn.Module,
                   generator: nn.Module, backbone: str) -> dict:
    """A released classifier / decoder pair, saved as `train_classifier` and `learn_prototype` save them."""
    classifier = root / "Models" / classifier_name
    classifier.parent.mkdir(exist_ok=True)
    torch.save({"net_state_dict": enc.state_dict(), "cls_state_dict": cls.state_dict()}, classifier)
    decoder = root / "checkpoints" / decoder_run / "model.pt"
    decoder.parent.mkdir(parents=True)
    low, high = np.float64(-0.25), np.float64(1.75)  # `get_norm_values`: min(0, ...), max(0, ...)
    stale = {"fc1.weight": torch.zeros(1)}  # an earlier epoch's generator: not the one read
    torch.save({"min": low, "max": high, 9: {"generator": stale}, 149: {"generator": generator.state_dict()}}, decoder)
    return {"enc": enc, "cls": cls, "gen": generator, "range": (float(low), float(high)),
            "classifier": classifier, "decoder": decoder, "root": root, "backbone": backbone}


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The released CIFAR-10 ResNet-18 pair."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    enc = _randomise(ReleasedResNet18(), gen, torch.rand(4, 3, 32, 32, generator=gen) * 2 - 1)
    cls = ResNetLinear(10).eval()
    # features of the released scale (scaled row 0 in [0, 1], the other rows as they come)
    generator = _randomise(ReleasedGenerator(512 + 10, 10, 100), gen, torch.rand(4, 512, generator=gen), torch.arange(4))
    return _save_released(tmp_path_factory.mktemp("heatmap_released"), "cifar10_resnet18.pt",
                          "cifar10_resnet18_ood_fw1_2022_07_05_07_27_20", enc, cls, generator, "resnet18_32x32")


@pytest.fixture(scope="module")
def released_wrn(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The released CIFAR-10 WRN-40-2 pair (`classifier_pretraining.py -arch wideresnet`: `<data>_wideresnet_40_2`)."""
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)  # PyTorch's default init, as released (conv biases nonzero)
    enc = _randomise(ReleasedWideResNet(), gen, torch.rand(4, 3, 32, 32, generator=gen) * 2 - 1)
    cls = ResNetLinear(10, 128).eval()
    generator = _randomise(ReleasedGenerator(128 + 10, 10, 128, (256, 128, 64, 32)), gen,
                           torch.rand(4, 128, generator=gen), torch.arange(4))
    return _save_released(tmp_path_factory.mktemp("heatmap_released_wrn"), "cifar10_wideresnet_40_2.pt",
                          "cifar10_wideresnet_ood_fw1_2022_07_06_10_11_12", enc, cls, generator, "wrn40_2_heatmap")


def _evaluated_method(tmp_path: Path, released: dict, overrides: tuple[str, ...] = ()):
    """The method `ood-eval experiment=heatmap_released ckpt_path=<classifier> method.decoder_ckpt=<decoder>` builds
    and loads (`ood.train.build`, then `ood.cli.load_weights`)."""
    cfg = compose_config(tmp_path, ["experiment=heatmap_released", "data=cifar10", "trainer=cpu",
                                    f"backbone={released['backbone']}", f"method.decoder_ckpt={released['decoder']}",
                                    *overrides], config_name="eval")
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone, num_classes=10))
    load_weights(method, released["classifier"], cfg)
    return cfg, method.eval()


# the released decoders' plans (Networks/generator.py): d0, up-block widths
RELEASED_PLANS = {"released": DecoderPlan(100, 4, (512, 256, 128, 64), 3),
                  "released_wrn": DecoderPlan(128, 4, (256, 128, 64, 32), 3)}


@pytest.mark.parametrize("pair", sorted(RELEASED_PLANS))
def test_released_pair_gives_the_released_logits_and_score(tmp_path: Path, pair: str,
                                                          request: pytest.FixtureRequest) -> None:
    """ResNet-18 under backbone=resnet18_32x32, WRN-40-2 (meliketoy's) under backbone=wrn40_2_heatmap."""
    released = request.getfixturevalue(pair)
    cfg, method = _evaluated_method(tmp_path, released)
    assert method.plan == RELEASED_PLANS[pair]
    # the released test transform: ToTensor + Normalize((0.5,) * 3, (0.5,) * 3), x in [-1, 1]
    assert list(cfg.data.benchmark.mean) == [0.5] * 3 and list(cfg.data.benchmark.std) == [0.5] * 3
    assert cfg.method.feature_norm == "as_released" and cfg.data.eval_batch_size == 200
    assert cfg.data.ood_subset == "first_fifth"
    # noise on a per-image brightness (noise alone gives a random network near-equal features)
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.2
    pixels += torch.linspace(0.0, 0.8, 3).view(-1, 1, 1, 1)
    x = (pixels - 0.5) / 0.5
    with torch.no_grad():  # one batch: its row 0 is scaled, rows 1, 2 enter as they are (feature_norm=as_released)
        want_logits, want_scores = released_scores(released["enc"], released["cls"], released["gen"], x,
                                                   *released["range"], len(x))
        heat, logits, _ = method.heatmap(x)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-5)
    # ood's ID score is the released OOD score negated (eval_ood.py ranks with invert_score=True)
    torch.testing.assert_close(heatmap_score(heat), -want_scores, rtol=0, atol=1e-5)
    assert float(want_scores.std()) > 1e-3  # the scores differ between images: a real comparison
    assert method.feature_range.tolist() == list(released["range"])
    # the method's [-1, 1] space is the released input itself (heatmap grids)
    torch.testing.assert_close(method.to_unit(x), x)


def test_the_heatmap_wrn_trains_as_the_released_one() -> None:
    """`backbone=wrn40_2_heatmap` in training mode, where the logits compared above (eval mode) see neither dropout
    nor BN momentum: the same dropout masks drawn at the same place (between a block's conv1 and bn2) give the same
    logits, and one batch moves the final BN's running statistics with momentum 0.9, the blocks' with 0.1, as the
    released Wide_ResNet's."""
    torch.manual_seed(3)
    released, head = ReleasedWideResNet(depth=16), ResNetLinear(10, 128)
    ours = MeliketoyWideResNet(10, depth=16, widen_factor=2)
    linear = {"fc." + k.removeprefix("linear."): v for k, v in head.state_dict().items()}
    ours.load_state_dict(from_meliketoy_wrn({**released.state_dict(), **linear}, prefix=""))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    torch.manual_seed(5)
    want = head(released.train()(x))
    torch.manual_seed(5)
    got = ours.train()(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.manual_seed(5)
    assert not torch.allclose(ours.eval()(x), got, atol=1e-3)  # the dropout draws mattered
    for mine, theirs in ((ours.stages.block3[-2], released.bn1), (ours.stages.block2[0].bn2, released.layer2[0].bn2)):
        assert mine.momentum == theirs.momentum
        torch.testing.assert_close(mine.running_mean, theirs.running_mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(mine.running_var, theirs.running_var, rtol=0, atol=1e-5)
    assert float(released.bn1.running_mean.abs().max()) > 0.05  # moved far from the init's 0 in one batch


def test_a_classifier_file_alone_loads_under_any_method(tmp_path: Path, released: dict) -> None:
    """The classifier file is a network's own file: `experiment=heatmap_ce` (method=ce) scores MSP and energy on it."""
    cfg = compose_config(tmp_path, ["experiment=heatmap_ce", "data=cifar10", "trainer=cpu"], config_name="eval")
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone, num_classes=10)).eval()
    load_weights(method, released["classifier"], cfg)
    # the same mapping as under method=heatmap, whose logits the test above compares
    torch.testing.assert_close(method.backbone.fc.weight, released["cls"].linear.weight, rtol=0, atol=0)
    block = method.backbone.stages.layer2[0]
    torch.testing.assert_close(block.downsample[1].running_var, released["enc"].layer2[0].shortcut[1].running_var,
                               rtol=0, atol=0)


def test_released_mismatches_are_one_line_naming_the_file_and_key(tmp_path: Path, released: dict,
                                                                  released_wrn: dict) -> None:
    # the released Wide_ResNet (meliketoy's layout) under backbone=wrn40_2 (the OE / OpenOOD layout, bias-free)
    wrn = released_wrn["classifier"]
    cfg = compose_config(tmp_path, ["experiment=heatmap_ce", "backbone=wrn40_2", "trainer=cpu"], config_name="eval")
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone, num_classes=10))
    with pytest.raises(CheckpointError, match=rf"^checkpoint {wrn} does not fit the configured model \(pass "
                                              r"backbone=wrn40_2_heatmap and the data= it was trained with\): "
                                              r".*'backbone\.stages\.") as err:
        load_weights(method, wrn, cfg)
    assert "\n" not in str(err.value)
    # a CIFAR-10 decoder under data=cifar100: the shapes differ, named with the file and the key
    with pytest.raises(CheckpointError, match=rf"{released['decoder']}.*decoder\.\S+ has shape") as err:
        _evaluated_method(tmp_path, released, ("data=cifar100",))
    assert "\n" not in str(err.value)
    # the two files swapped
    cfg = compose_config(tmp_path, ["experiment=heatmap_released", "trainer=cpu",
                                    f"method.decoder_ckpt={released['classifier']}"], config_name="eval")
    with pytest.raises(CheckpointError, match=rf"decoder_ckpt={released['classifier']} is a heatmap_ood file"):
        instantiate(cfg.method, backbone=instantiate(cfg.backbone, num_classes=10))
    # the preset needs the decoder file
    cfg = compose_config(tmp_path, ["experiment=heatmap_released"], config_name="eval")
    assert OmegaConf.is_missing(cfg.method, "decoder_ckpt")


def test_the_released_tiny_imagenet_resnet50_loads_under_resnet50_64x64(tmp_path: Path) -> None:
    """The released 64-px ResNet-50 classifier (`tinyimagenet_resnet50.pt`, was refused in one line) loads under
    `backbone=resnet50_64x64` with the released logits; the decoder plan for its 2048-d features on 64-px images is
    the released `TImageNet_Deconv_GAN`'s; under `backbone=resnet50` (torchvision's) the mismatch names the right one."""
    gen = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    x = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    enc = _randomise(ReleasedResNet50At64(), gen, x.flip(0) * 0.8)
    cls = ResNetLinear(200, 2048).eval()
    path = tmp_path / "Models" / "tinyimagenet_resnet50.pt"
    path.parent.mkdir()
    torch.save({"net_state_dict": enc.state_dict(), "cls_state_dict": cls.state_dict()}, path)
    cfg = compose_config(tmp_path, ["experiment=heatmap_ce", "data=tinyimagenet", "backbone=resnet50_64x64",
                                    "trainer=cpu"], config_name="eval")
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone, num_classes=200))
    load_weights(method, path, cfg)
    with torch.no_grad():
        want, got = cls(enc(x)), method.backbone.eval()(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert float((want[0] - want[1]).abs().max()) > 1e-2  # the two images' logits differ: a real comparison
    assert decoder_plan(2048, 64, 3) == DecoderPlan(512, 4, (2048, 1024, 512, 256, 128), 3)
    cfg = compose_config(tmp_path, ["experiment=heatmap_ce", "backbone=resnet50", "trainer=cpu"], config_name="eval")
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone, num_classes=200))
    with pytest.raises(CheckpointError, match=r"pass backbone=resnet50_64x64 and the data= it was trained with"):
        load_weights(method, path, cfg)


def test_the_released_tiny_imagenet_decoder_file_maps_onto_the_plans_decoder() -> None:
    """The Tiny ImageNet decoder (`TImageNet_Deconv_GAN`: five up-blocks, the 1x1 output in `conv_block6`, 61 M
    parameters: built on the meta device, no memory) maps key for key, shape for shape, onto ood's decoder for the
    released ResNet-50's plan; `conv_block6` is the output, not a sixth up-block."""
    from ood.models.checkpoint import from_heatmap_ood_decoder
    from ood.models.decoder import HeatmapDecoder

    plan = decoder_plan(2048, 64, 3)
    with torch.device("meta"):
        released = ReleasedGenerator(2048 + 200, 200, 512, (2048, 1024, 512, 256, 128)).state_dict()
        ours = HeatmapDecoder(2048, 200, plan).state_dict()
    mapped = from_heatmap_ood_decoder({"min": -0.5, "max": 2.0, 149: {"generator": released}}, prefix="")
    assert mapped.pop("feature_range").tolist() == [-0.5, 2.0]
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert "conv_block6.0.weight" in released and "out.weight" in ours


def test_a_decoder_file_completes_a_backbone_weights_evaluation(tmp_path: Path, released: dict) -> None:
    """`ood-eval experiment=heatmap_released backbone.weights=<classifier> method.decoder_ckpt=<decoder>` was refused
    ("parts trained with the network (decoder), which backbone.weights does not hold"): the check read `trained_parts`
    from the method class, though the decoder file fills the decoder. Refused only without the decoder file."""
    weights = ["experiment=heatmap_released", "backbone=torchvision", "backbone.name=resnet18",
               f"backbone.weights={released['classifier']}", "trainer=cpu"]
    check_run(compose_config(tmp_path, [*weights, f"method.decoder_ckpt={released['decoder']}"], config_name="eval"),
              None)
    with pytest.raises(ConfigError, match=r"^method 'heatmap' scores with parts trained with the network \(decoder\)"):
        check_run(compose_config(tmp_path, weights, config_name="eval"), None)  # the preset's decoder_ckpt: ???
    with pytest.raises(ConfigError, match=r"\(decoder\), which backbone.weights does not hold"):
        check_run(compose_config(tmp_path, ["method=heatmap", "+method.decoder_ckpt=null"], config_name="eval"), None)


def test_ood_heatmap_draws_a_released_pairs_heatmaps(tmp_path: Path, released: dict,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`ood-heatmap` rebuilt only a run from its folder's config.yaml (`experiment=` was an unexpected argument): it
    takes `ood-eval`'s arguments for a released pair and prints the released scores and classes, drawn in the
    evaluation's batches (200: `feature_norm=as_released` scales row 0 of each), not its own `BATCH`."""
    from PIL import Image

    from ood import heatmap_cli

    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.2
    pixels += torch.linspace(0.0, 0.8, 3).view(-1, 1, 1, 1)
    quantised = (pixels * 255).round().to(torch.uint8)  # as a PNG holds them
    folder = tmp_path / "mine"
    folder.mkdir()
    for i, image in enumerate(quantised):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    monkeypatch.setattr(heatmap_cli, "BATCH", 2)
    pair = [f"ckpt_path={released['classifier']}", "experiment=heatmap_released", "data=cifar10",
            f"method.decoder_ckpt={released['decoder']}"]
    heatmap_cli.main([*pair, f"image={folder}", f"out={tmp_path / 'maps'}"])
    printed = [line.split() for line in capsys.readouterr().out.splitlines()]
    with torch.no_grad():
        want_logits, want_scores = released_scores(released["enc"], released["cls"], released["gen"],
                                                   (quantised / 255.0 - 0.5) / 0.5, *released["range"], 200)
    assert [p[0] for p in printed] == [str(tmp_path / "maps" / f"{i}_heatmap.png") for i in range(3)]
    assert [float(p[2]) for p in printed] == pytest.approx((-want_scores).tolist(), abs=6e-5)
    # CIFAR-10's classes by name (it printed their indices)
    assert [p[4] for p in printed] == [heatmap_cli.CIFAR10_CLASSES[k] for k in want_logits.argmax(1).tolist()]
    assert float(want_scores.std()) > 1e-3
    assert Image.open(tmp_path / "maps" / "0_heatmap.png").size == (420, 185)
    # the classifier file without its decoder file, and a run folder with overrides: one line each
    for args, message in (
        ([f"ckpt_path={released['classifier']}", "experiment=heatmap_released"],
         f"error: {released['classifier']} holds the classifier alone: add its decoder file, "
         "method.decoder_ckpt=<checkpoints/<run>/model.pt> (experiment=heatmap_released)\n"),
        ([f"ckpt_path={tmp_path}", "data=cifar10"],
         f"error: ood-heatmap: {tmp_path} is a run folder, rebuilt from its config.yaml: drop ['data=cifar10'], or "
         "pass a checkpoint file\n"),
    ):
        with pytest.raises(SystemExit):
            heatmap_cli.main([*args, f"image={folder}", f"out={tmp_path / 'refused'}"])
        assert capsys.readouterr().err == message
