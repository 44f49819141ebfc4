"""Model adapters: exact stage splits of timm / torchvision models, any nn.Module by hooks, weights from local files,
and every detector / GROOD through `ood.evaluate` on each adapter."""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torchvision
from helpers import make_image_folders
from torch import nn
from torchvision.models.convnext import CNBlockConfig

import ood
from ood.detectors import DetectorNotApplicable, build_detector, resolve_detectors
from ood.detectors.network import LayerTaps, backbone_of, channel_mean
from ood.errors import CheckpointError, ConfigError
from ood.models.adapters import (
    ModuleBackbone,
    StagedModel,
    as_backbone,
    module_backbone,
    timm_backbone,
)
from ood.utils import exact_float32


def _timm_vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8, depth=2)


def _tv_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3)


def _tv_efficientnet() -> nn.Module:
    from torchvision.models.efficientnet import MBConvConfig

    setting = [MBConvConfig(1, 3, 1, 8, 8, 1), MBConvConfig(4, 3, 2, 8, 16, 1)]
    return torchvision.models.EfficientNet(setting, dropout=0.2, num_classes=3, last_channel=32)


class OpenOODResNet(nn.Module):
    """OpenOOD's ResNet18_32x32 (openood/networks/resnet18_32x32.py) as a user copies it in, with one block per stage
    (its `num_blocks`) and torchvision's BasicBlock in place of OpenOOD's, which computes the same (the split calls
    each `layerN` whole): the forward is OpenOOD's, line for line."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        block = torchvision.models.resnet.BasicBlock
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        widths = (8, 16, 32, 64)
        for i, (cin, cout) in enumerate(zip((8, *widths), widths), start=1):
            stride = 1 if i == 1 else 2
            down = None if stride == 1 else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            setattr(self, f"layer{i}", nn.Sequential(block(cin, cout, stride, down)))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor, return_feature: bool = False, return_feature_list: bool = False) -> Any:
        feature1 = nn.functional.relu(self.bn1(self.conv1(x)))
        feature2 = self.layer1(feature1)
        feature3 = self.layer2(feature2)
        feature4 = self.layer3(feature3)
        feature5 = self.layer4(feature4)
        feature5 = self.avgpool(feature5)
        feature = feature5.view(feature5.size(0), -1)
        logits_cls = self.fc(feature)
        feature_list = [feature1, feature2, feature3, feature4, feature5]
        if return_feature:
            return logits_cls, feature
        if return_feature_list:
            return logits_cls, feature_list
        return logits_cls


MODELS: dict[str, Callable[[], nn.Module]] = {
    "timm_resnet": lambda: timm.create_model("resnet10t", pretrained=False, num_classes=3),
    "timm_convnext": lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=3, dims=(8, 16, 24, 32)),
    "timm_vit": _timm_vit,
    "timm_other": lambda: timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=3),
    "tv_resnet": lambda: torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=3),
    "tv_densenet": lambda: torchvision.models.DenseNet(8, (1, 1, 1, 1), 8, num_classes=3),
    "tv_efficientnet": _tv_efficientnet,
    "tv_convnext": lambda: torchvision.models.ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=3),
    "tv_vit": _tv_vit,
    "openood_resnet": OpenOODResNet,
}
STAGES = {
    "timm_resnet": ("stem", "layer1", "layer2", "layer3", "layer4"),
    "timm_convnext": ("stem", "stage1", "stage2", "stage3", "stage4"),
    "timm_vit": ("stem", "block0", "block1"),
    "timm_other": ("features",),
    "tv_resnet": ("stem", "layer1", "layer2", "layer3", "layer4"),
    "tv_densenet": ("stem", "block1", "block2", "block3", "block4"),
    "tv_efficientnet": ("stem", "stage1", "stage2", "top"),
    "tv_convnext": ("stem", "stage1", "stage2"),
    "tv_vit": ("stem", "block0", "block1"),
    "openood_resnet": ("stem", "layer1", "layer2", "layer3", "layer4"),
}


#: the run figures (matplotlib) cost seconds and are not what these tests check
pytestmark = pytest.mark.usefixtures("no_figures")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_image_folders(tmp_path_factory.mktemp("adapters"), train=6, test=3, ood=4)


@pytest.mark.parametrize("kind", list(MODELS))
def test_stage_split_reproduces_the_network(kind: str) -> None:
    torch.manual_seed(0)
    net = MODELS[kind]().eval()
    backbone = as_backbone(net)
    assert isinstance(backbone, StagedModel) and backbone.layer_names == STAGES[kind]
    named = as_backbone(net, feature_layer=backbone.head)  # naming the split's own head keeps the split
    assert isinstance(named, StagedModel) and named.layer_names == STAGES[kind]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = backbone.run(x, backbone.layer_names)
        torch.testing.assert_close(out.logits, net(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.features @ backbone.fc.weight.T + backbone.fc.bias, net(x), atol=1e-5, rtol=1e-5)
        for layer in backbone.layer_names:  # running on from every stage gives the same features
            torch.testing.assert_close(backbone.forward_from(layer, out.layers[layer]), out.features, atol=1e-5, rtol=1e-5)
            assert torch.equal(backbone.forward_to(layer, x), out.layers[layer]), layer  # and up to it, its output
    with pytest.raises(ConfigError, match=r"unknown layer 'nope'.*choices: \['" + STAGES[kind][0]):
        backbone.features(x, ["nope"])


def test_openoods_resnet_splits_as_its_feature_list() -> None:
    """OpenOOD's ResNet18_32x32 copied into a user's code was wrapped as a whole: rankfeat, gram, mds_ensemble, nac
    and the AdaSCALEs were skipped on it. It splits into OpenOOD's own feature list now (`return_feature_list`:
    feature1 the stem, then layer1..layer3), its penultimate feature `return_feature`'s."""
    torch.manual_seed(0)
    net = OpenOODResNet().eval()
    backbone = as_backbone(net)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = backbone.run(x, backbone.layer_names)
        logits, feature = net(x, return_feature=True)
        _, feature_list = net(x, return_feature_list=True)
    assert torch.equal(out.logits, logits) and torch.equal(out.features, feature)
    for name, theirs in zip(("stem", "layer1", "layer2", "layer3"), feature_list):
        assert torch.equal(out.layers[name], theirs), name


class PooledStemResNet(OpenOODResNet):
    """A user's modification of OpenOOD's class: a functional max-pool in the stem, which its layout does not show."""

    def forward(self, x: torch.Tensor, return_feature: bool = False, return_feature_list: bool = False) -> Any:
        x = nn.functional.max_pool2d(nn.functional.relu(self.bn1(self.conv1(x))), 2)
        return self.fc(torch.flatten(self.avgpool(self.layer4(self.layer3(self.layer2(self.layer1(x))))), 1))


def test_a_modified_copy_of_openoods_resnet_is_wrapped_whole_with_one_warning() -> None:
    """OpenOOD's layout was matched by structure alone: a copy whose forward adds a max-pool in the stem was split as
    OpenOOD's, and the split's logits differed from `net(x)` without a word. The split is now checked on one random
    image (the caller's hooks and modes untouched); where it differs, the network is wrapped whole, with one warning."""
    torch.manual_seed(0)
    net = PooledStemResNet().eval()
    net.layer1.train()  # modes of the caller's, put back after the check
    seen: list[int] = []
    net.fc.register_forward_hook(lambda module, args, output: seen.append(len(output)))
    with pytest.warns(UserWarning) as caught:
        backbone = as_backbone(net)
    assert isinstance(backbone, ModuleBackbone) and backbone.head == "fc"
    assert len(caught) == 1 and re.fullmatch(
        r"PooledStemResNet has the layout of OpenOOD's ResNet18_32x32 / _64x64 but its forward computes other logits "
        r"than that split \(largest difference (0\.[0-9]+) on a random image\): wrapped as a whole, so the detectors that read "
        r"or re-run its stages \(rankfeat, mds_ensemble, nac, the AdaSCALEs\) are skipped on it", str(caught[0].message))
    assert seen == [] and not net.training and net.layer1.training  # the check's forward was no pass of the caller's
    x, net = torch.randn(2, 3, 32, 32), net.eval()
    with torch.no_grad():
        assert torch.equal(backbone.run(x).logits, net(x))  # the network's own logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for own in (OpenOODResNet(), OpenOODResNet().double()):  # OpenOOD's own: still split, checked in its dtype
            assert isinstance(as_backbone(own), StagedModel)


class ShiftedResNet(OpenOODResNet):
    """A copy of OpenOOD's class whose forward adds a learnt logit shift, zero at initialisation: its split differs
    from its forward once trained weights are loaded, not before."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__(num_classes)
        self.shift = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x: torch.Tensor, return_feature: bool = False, return_feature_list: bool = False) -> Any:
        return super().forward(x) + self.shift


def test_the_split_is_checked_on_the_loaded_weights(tmp_path: Path) -> None:
    """`backbone=module` with `backbone.weights`: the split was checked on the random initial weights, before the
    file was loaded, so a step that is a no-op at initialisation (a zero shift) passed and the trained network was
    split without a word. The check runs on the loaded weights now."""
    trained = ShiftedResNet()
    with torch.no_grad():
        trained.shift.fill_(1.0)
    torch.save(trained.state_dict(), tmp_path / "trained.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(module_backbone("test_adapters.ShiftedResNet", num_classes=3), StagedModel)  # zero shift
    with pytest.warns(UserWarning, match=r"^ShiftedResNet has the layout of OpenOOD's ResNet18_32x32 .* \(largest "
                      r"difference 1 on a random image\)"):
        backbone = module_backbone("test_adapters.ShiftedResNet", num_classes=3, weights=str(tmp_path / "trained.pth"))
    assert isinstance(backbone, ModuleBackbone) and torch.equal(backbone.net.shift, trained.shift)


class FlagsResNet(OpenOODResNet):
    """OpenOOD's class recording, at each forward, the float32 precision settings and autocast it runs under."""

    seen: list[tuple[Any, ...]] = []

    def forward(self, x: torch.Tensor, return_feature: bool = False, return_feature_list: bool = False) -> Any:
        FlagsResNet.seen.append(_float32_settings())
        return super().forward(x)


def _float32_settings() -> tuple[Any, ...]:
    cudnn = torch.backends.cudnn
    return (cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.conv.fp32_precision,
            torch.backends.mkldnn.matmul.fp32_precision, cudnn.deterministic, cudnn.benchmark,
            torch.is_autocast_enabled("cpu"))


def test_the_split_check_runs_in_exact_float32_outside_autocast() -> None:
    """The split check compares two passes at sqrt(float32 eps): on a GPU, cuDNN's default TF32 convolutions (or a
    benchmark choice of algorithm) differ by ~1e-3, and OpenOOD's own class was wrapped whole there. Its passes run
    in full float32 precision by deterministic algorithms and outside any autocast (under a caller's bf16 autocast its
    tolerance was bf16's, 0.09, and a copy with a max-pool in the stem, off by ~0.02, was split); the caller's
    settings are put back, also on an exception. (Flags read on the CPU: no GPU runs here.)"""
    cudnn = torch.backends.cudnn
    caller = [(cudnn.conv, "fp32_precision", "tf32"), (torch.backends.cuda.matmul, "fp32_precision", "tf32"),
              (torch.backends.mkldnn.matmul, "fp32_precision", "bf16"), (cudnn, "benchmark", True),
              (cudnn, "deterministic", False)]
    before = [(owner, name, getattr(owner, name)) for owner, name, _ in caller]
    FlagsResNet.seen.clear()
    try:  # (monkeypatch cannot put back these properties)
        for owner, name, value in caller:
            setattr(owner, name, value)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert isinstance(as_backbone(FlagsResNet()), StagedModel)
            assert _float32_settings() == ("tf32", "tf32", "none", "bf16", False, True, True)
            with pytest.warns(UserWarning, match="PooledStemResNet has the layout of OpenOOD's ResNet18_32x32"):
                assert isinstance(as_backbone(PooledStemResNet()), ModuleBackbone)
        with pytest.raises(RuntimeError, match="inside"), exact_float32():
            raise RuntimeError("inside")
        assert _float32_settings() == ("tf32", "tf32", "none", "bf16", False, True, False)
    finally:
        for owner, name, value in before:
            setattr(owner, name, value)
    assert FlagsResNet.seen == [("ieee", "ieee", "ieee", "ieee", True, False, False)]  # its forward (the split runs modules)


class Custom(nn.Module):
    """A user's own classifier: the head is called `logits_layer`, after a hidden linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.hidden = nn.Linear(4, 5)
        self.logits_layer = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_layer(torch.relu(self.hidden(self.body(x))))


def test_an_output_that_is_not_the_heads_is_warned_of_once() -> None:
    """A forward that scales its head's output (a cosine classifier's temperature): the logit scores read the output,
    react / ash / vim recompute the head's, so the two families scored different functions without a word."""

    class Scaled(Custom):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 10 * super().forward(x)

    x = torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModuleBackbone(Custom().eval()).run(x)  # the head's output itself: no warning
    scaled = ModuleBackbone(Scaled().eval())
    with pytest.warns(UserWarning, match=r"^Scaled's output is not the output of its head 'logits_layer' \(largest "
                                         r"difference [0-9.]+\): msp, energy and the other logit scores read its output"):
        scaled.run(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled.run(x)  # once per model


def test_module_wrapper_hooks_head_input_and_named_layers() -> None:
    torch.manual_seed(0)
    net = Custom().eval()
    backbone = as_backbone(net)
    assert isinstance(backbone, ModuleBackbone) and backbone.head == "logits_layer"  # the last nn.Linear
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = backbone.run(x, ["body.1"])
        h = torch.relu(net.hidden(net.body(x)))
        torch.testing.assert_close(out.features, h)
        torch.testing.assert_close(out.logits, net(x))
        torch.testing.assert_close(out.layers["body.1"], torch.relu(net.body[0](x)))
    assert as_backbone(net, feature_layer="hidden").feature_dim == 4
    with pytest.raises(ConfigError, match=r"feature_layer='body' is not a linear layer.*\['hidden', 'logits_layer'\]"):
        as_backbone(net, feature_layer="body")
    with pytest.raises(ConfigError, match="cannot be run from layer 'body' onward.*torchvision ResNet"):
        backbone.forward_from("body", x)


class TupleOut(Custom):
    """A classifier whose forward returns (logits, features)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        h = torch.relu(self.hidden(self.body(x)))
        return self.logits_layer(h), h


def test_a_model_returning_a_tuple_is_one_line() -> None:
    """A tuple does not say which of its tensors are the logits (OpenOOD's networks return (logits, features), others
    (features, logits)): refused, naming the way out."""
    with pytest.raises(ConfigError, match=r"TupleOut returns a tuple, not a logits tensor or an output with `logits`: wrap it"):
        as_backbone(TupleOut()).run(torch.randn(2, 3, 8, 8))


class ModelOutput(dict):
    """Hugging Face's `ModelOutput` in short: a dict whose keys are also attributes (`ImageClassifierOutput`)."""

    __getattr__ = dict.__getitem__


class Outputs:
    """An output object with a `logits` attribute, no mapping."""

    def __init__(self, logits: torch.Tensor, hidden: torch.Tensor) -> None:
        self.logits, self.hidden = logits, hidden


@pytest.mark.parametrize("wrap", [dict, ModelOutput, Outputs], ids=["dict", "hf_model_output", "attribute"])
def test_a_model_returning_its_logits_by_name_is_read_as_they_are(wrap: Any) -> None:
    """A forward returning `{"logits": ...}` (a dict, Hugging Face's `ImageClassifierOutput`) or an object with a
    `logits` tensor: its logits are that tensor, exactly, in the one pass (`run`) and in the forward the network-pass
    detectors call; the features are its head's input as for any model."""

    class Named(Custom):
        def forward(self, x: torch.Tensor) -> Any:  # type: ignore[override]
            h = torch.relu(self.hidden(self.body(x)))
            return wrap(logits=self.logits_layer(h), hidden=h)

    torch.manual_seed(0)
    net, x = Named().eval(), torch.randn(4, 3, 8, 8)
    backbone = as_backbone(net)
    out = backbone.run(x)
    with torch.no_grad():
        expected = net.logits_layer(torch.relu(net.hidden(net.body(x))))
        assert torch.equal(out.logits, expected) and torch.equal(backbone(x), expected)
        assert torch.equal(out.features, torch.relu(net.hidden(net.body(x))))


def test_an_output_whose_logits_are_no_tensor_is_one_line() -> None:
    class NoTensor(Custom):
        def forward(self, x: torch.Tensor) -> Any:  # type: ignore[override]
            return {"logits": super().forward(x).tolist()}

    with pytest.raises(ConfigError, match=r"^NoTensor returns a dict, not a logits tensor or an output with `logits`: wrap"):
        as_backbone(NoTensor()).run(torch.randn(2, 3, 8, 8))


class Softmaxed(Custom):
    """A classifier whose forward ends in a softmax (or, with `log`, a log-softmax)."""

    def __init__(self, log: bool) -> None:
        super().__init__()
        self.log = log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits.log_softmax(1) if self.log else logits.softmax(1)


def test_a_model_returning_probabilities_is_one_line() -> None:
    """Probabilities were scored as logits, silently: energy of log-softmax rows is 0 for every image (AUROC 0.5)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    for log, what in ((False, r"probabilities \(softmax\)"), (True, r"log-probabilities \(log-softmax\)")):
        with pytest.raises(ConfigError, match=rf"^Softmaxed returns {what}, not logits: .*before the softmax$"):
            as_backbone(Softmaxed(log)).run(x)
    net = Custom()
    with torch.no_grad():
        torch.testing.assert_close(as_backbone(net).run(x).logits, net(x))  # logits pass


def test_a_model_without_a_linear_head_is_told_what_feature_layer_can_name() -> None:
    """SqueezeNet's head is a 1x1 convolution: the message no longer asks for a feature_layer= that is then refused
    for not being a linear layer."""
    net = torchvision.models.squeezenet1_1(num_classes=3)
    with pytest.raises(ConfigError, match=r"^SqueezeNet has no nn.Linear layer: .* \(feature_layer= can only name such a "
                                          r"layer\); give a model that ends in an nn.Linear$"):
        as_backbone(net)
    with pytest.raises(ConfigError, match=r"^feature_layer='classifier.1' is not a linear layer of SqueezeNet"):
        as_backbone(net, feature_layer="classifier.1")


def test_weights_from_local_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    x = torch.randn(1, 3, 32, 32)
    expected = source.eval()(x)
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))  # timm / Hugging Face names
    torch.save({"state_dict": {f"backbone.net.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "run.ckpt")
    torch.save({f"_orig_mod.{k}": v for k, v in source.state_dict().items()}, tmp_path / "compiled.pth")  # torch.compile's
    # training scripts' files: torchvision's reference scripts / DeiT, kuangliu's pytorch-cifar, a pickled module
    torch.save({"model": source.state_dict(), "epoch": 89, "args": "..."}, tmp_path / "reference.pth")
    torch.save({"net": source.state_dict(), "acc": 95.1}, tmp_path / "cifar.pth")
    torch.save(source, tmp_path / "module.pth")
    for name in ("model.safetensors", "run.ckpt", "compiled.pth", "reference.pth", "cifar.pth", "module.pth"):
        backbone = timm_backbone("resnet10t", num_classes=3, weights=str(tmp_path / name)).eval()
        torch.testing.assert_close(backbone(x), expected)
    torch.save({"epoch": 89, "optimizer": {"lr": 0.1}}, tmp_path / "no_model.pth")
    with pytest.raises(CheckpointError, match=r"no_model.pth hold no parameters at the top level \(keys: \['epoch', "
                                              r"'optimizer'\]\) nor under \['model', .*save model.state_dict\(\) itself$"):
        timm_backbone("resnet10t", num_classes=3, weights=str(tmp_path / "no_model.pth"))
    (tmp_path / "hf").mkdir()
    save_file(source.state_dict(), str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"hf is a folder, not a checkpoint file; did you mean .*hf/model.safetensors\?$"):
        timm_backbone("resnet10t", num_classes=3, weights=str(tmp_path / "hf"))
    torch.save(timm.create_model("resnet10t", pretrained=False, num_classes=1000).state_dict(), tmp_path / "in1k.pth")
    with pytest.raises(ConfigError, match=r"in1k.pth have a 1000-class head \(fc.weight \(1000, 512\)\) but the ID data has "
                                          r"3 classes: evaluate weights trained on these classes"):
        timm_backbone("resnet10t", num_classes=3, weights=str(tmp_path / "in1k.pth"))
    wider = Custom()
    wider.hidden, wider.logits_layer = nn.Linear(4, 7), nn.Linear(7, 3)  # same classes, another width
    torch.save(wider.state_dict(), tmp_path / "wider.pth")
    with pytest.raises(ConfigError, match=r"wider.pth do not fit: their head logits_layer.weight reads 7 features, the model's 5"):
        module_backbone("test_adapters.Custom", num_classes=3, weights=str(tmp_path / "wider.pth"))
    with pytest.raises(CheckpointError, match="model.safetensors do not fit ConvNeXt: missing"):
        timm_backbone("convnext_atto", num_classes=3, weights=str(tmp_path / "model.safetensors"), dims=(8, 16, 24, 32))
    wrapped = module_backbone("torchvision.models.mobilenet_v3_small", num_classes=3)
    assert isinstance(wrapped, ModuleBackbone) and wrapped.head == "classifier.3"
    with pytest.raises(ConfigError, match="unknown timm model 'resnet_nope'"):
        timm_backbone("resnet_nope", num_classes=3)
    with pytest.raises(ConfigError, match=r"^unknown timm model 'convnext_atoo'; closest: \['convnext_atto', "):
        timm_backbone("convnext_atoo", num_classes=3)
    # timm said "Invalid pretrained tag (bad) for resnet18." (a RuntimeError traceback, no choices)
    with pytest.raises(ConfigError, match=r"^timm has no pretrained tag 'bad' of resnet18; its tags: \['a1_in1k', .*'tv_in1k'\] "
                                          r"\(or 'resnet18' alone\)$"):
        timm_backbone("resnet18.bad", num_classes=3)


def test_a_module_target_in_the_working_directory_names_pythonpath(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ood-eval backbone=module backbone.target=my_nets.Net` from the folder holding my_nets.py: an entry point's
    sys.path does not hold the working directory (`python -m` would), so the error says how to add it."""
    (tmp_path / "my_nets_here.py").write_text("from torch import nn\nNet = nn.Linear\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    with pytest.raises(ConfigError, match=r"^backbone.target='my_nets_here.Net' cannot be imported: No module named "
                                          r"'my_nets_here' \(my_nets_here is in the working directory, which is not on "
                                          r"sys.path: run with PYTHONPATH=.\)$"):
        module_backbone("my_nets_here.Net", num_classes=3)
    with pytest.raises(ConfigError, match=r"cannot be imported: No module named 'elsewhere'$"):
        module_backbone("elsewhere.Net", num_classes=3)


class ThreeChannelNet(nn.Module):
    """A user's net whose constructor takes no `in_channels`: its stem reads RGB."""

    def __init__(self, num_classes: int, width: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class AuxHeadFirstNet(nn.Module):
    """A grey-image net whose auxiliary head (a 1x1 convolution on the stem's output, for a training loss) is
    defined before its stem: its first registered convolution reads 4 channels, the first one run `in_channels`."""

    def __init__(self, num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        self.aux = nn.Conv2d(4, num_classes, 1)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stem(x)))


class GreyToRGBNet(nn.Module):
    """An RGB net that reads grey images: its forward repeats the one channel before the 3-channel stem."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x.expand(-1, 3, -1, -1)))


@pytest.mark.parametrize(("target", "features"), [
    ("AuxHeadFirstNet", lambda net, x: net.pool(net.stem(x))),
    ("GreyToRGBNet", lambda net, x: net.body(x.expand(-1, 3, -1, -1))),
])
def test_a_module_whose_first_registered_convolution_is_not_its_stem_takes_the_data_it_runs_on(
    target: str, features: Callable[[nn.Module, torch.Tensor], torch.Tensor]
) -> None:
    """The channel check read the first registered convolution and refused, with 1-channel data, a net whose
    auxiliary head is defined before the stem ("reads 4-channel images") or that makes grey input RGB itself
    ("reads 3-channel images"), though both run on it; one forward of one image decides, in eval mode, and each
    module's mode is as it was."""
    torch.manual_seed(0)
    wrapped = module_backbone(f"test_adapters.{target}", num_classes=3, in_channels=1)
    assert wrapped.net.training and all(m.training for m in wrapped.net.modules())
    x = torch.rand(2, 1, 8, 8)
    out = wrapped.eval().run(x)
    torch.testing.assert_close(out.features, features(wrapped.net, x), rtol=0, atol=0)
    torch.testing.assert_close(out.logits, wrapped.net(x), rtol=0, atol=0)


def rgb_aux_head_first_net(num_classes: int) -> nn.Module:
    """`AuxHeadFirstNet` with an RGB stem, whatever the data (a factory that takes no `in_channels`)."""
    return AuxHeadFirstNet(num_classes, in_channels=3)


def test_a_real_mismatch_behind_an_auxiliary_head_names_the_channels_of_the_stem() -> None:
    """A net whose forward fails on the data's channels is refused as before, in one line naming the channels of the
    convolution that refused them (the stem's 3), not those of the auxiliary head registered first (4)."""
    with pytest.raises(ConfigError, match=r"^test_adapters.rgb_aux_head_first_net reads 3-channel images \(its first "
                                          r"convolution\) but the data has 1: .*\+backbone.<its argument>=1$"):
        module_backbone("test_adapters.rgb_aux_head_first_net", num_classes=3, in_channels=1)


class GreyToRGBLeNet(nn.Module):
    """`GreyToRGBNet` with a head sized for 16-pixel images (flattened maps, no global pool): it runs on 1-channel
    16x16 digits but not on the channel probe's default 224-pixel image, which fails in the head."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten())
        self.fc = nn.Linear(4 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x.expand(-1, 3, -1, -1)))


def test_a_probe_that_fails_past_the_convolutions_is_no_channel_mismatch() -> None:
    """The channel probe's forward failed in the head (a 224-pixel image for a 16-pixel net) after the 3-channel stem
    had run on the expanded grey image, and that stem's channels were taken as the cause: "reads 3-channel images"
    for a net that runs on the data. Only a convolution given other channels than it reads refuses them."""
    wrapped = module_backbone("test_adapters.GreyToRGBLeNet", num_classes=3, in_channels=1)
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(wrapped.eval().run(x).logits, wrapped.net(x), rtol=0, atol=0)


def test_a_module_target_built_for_other_channels_than_the_data_is_one_line() -> None:
    """`backbone=module` passes `in_channels` only to a constructor that names it; one that does not built a 3-channel
    stem for 1-channel digits and failed at the first batch ("expected input[64, 1, 16, 16] to have 3 channels")."""
    with pytest.raises(ConfigError, match=r"^test_adapters.ThreeChannelNet reads 3-channel images \(its first "
                                          r"convolution\) but the data has 1: give its constructor an `in_channels` "
                                          r"argument \(ood passes the data's\), or set its own channel argument: "
                                          r"\+backbone.<its argument>=1$"):
        module_backbone("test_adapters.ThreeChannelNet", num_classes=3, in_channels=1)
    assert module_backbone("test_adapters.ThreeChannelNet", num_classes=3, in_channels=3).feature_dim == 4


def test_every_cached_detector_on_a_timm_vit(folders: dict[str, Path], tmp_path: Path) -> None:
    torch.manual_seed(0)
    results = ood.evaluate(_timm_vit(), folders["id"], {"near": [folders["near"]], "far": [folders["far"]]},
                           detectors="cached", image_size=32, resize=32, device="cpu", output_dir=tmp_path,
                           overrides=["+detectors.params.vim.dim=16"])
    detectors = {r["detector"] for r in results.rows}
    # not applicable here, each for its stated reason: gmm (50 clusters) and cfood (alpha * N >= 2 reference rows)
    # need more than these 15 fit images
    skipped = {"gmm", "cfood"}
    assert detectors == {cls.name for cls in resolve_detectors("cached")} - skipped
    assert all(0 <= r["auroc"] <= 1 and r["n_id"] == 9 and r["n_ood"] == 4 for r in results.rows)


@pytest.mark.parametrize("kind", ["timm_convnext", "tv_resnet", "tv_vit", "tv_efficientnet"])
def test_adapters_evaluate(kind: str, folders: dict[str, Path], tmp_path: Path) -> None:
    torch.manual_seed(0)
    detectors = ["msp", "energy", "knn", "mahalanobis", "react"]
    results = ood.evaluate(MODELS[kind](), folders["id"], {"near": [folders["near"]], "far": [folders["far"]]},
                           detectors=detectors, image_size=32, resize=32, device="cpu", output_dir=tmp_path)
    assert [(r["detector"], r["ood_dataset"]) for r in results.rows] == [(d, s) for d in detectors for s in ("noise", "checkers")]


NETWORK_DETECTORS = ["rankfeat", "mds_ensemble", "gram", "adascale_a", "nac", "mahalanobis_odin"]


@pytest.mark.parametrize("kind", ["tv_resnet", "timm_resnet", "timm_vit"])
def test_network_detectors_on_adapted_library_models(kind: str, folders: dict[str, Path], tmp_path: Path) -> None:
    """The detectors that read or re-run stages run on torchvision / timm models adapted stage by stage (they were
    skipped as "no staged backbone"); a network wrapped as a whole is still refused."""
    torch.manual_seed(0)
    results = ood.evaluate(MODELS[kind](), folders["id"], {"near": [folders["near"]], "far": [folders["far"]]},
                           detectors=NETWORK_DETECTORS, image_size=32, resize=32, device="cpu", output_dir=tmp_path)
    assert sorted({r["detector"] for r in results.rows}) == sorted(NETWORK_DETECTORS)
    with pytest.raises(DetectorNotApplicable, match="staged backbone"):
        backbone_of(ModuleBackbone(Custom()))


def _pass_with_stage_means(backbone: nn.Module, x: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor]]:
    """One pass keeping every stage output, and the stage means mds_ensemble's layer taps cached in it."""
    taps = LayerTaps(backbone, ["mds_ensemble"])
    with torch.no_grad():
        out = backbone.run(x, backbone.layer_names)
    cached = taps.pop()
    taps.remove()
    return out, cached


def test_stage_caches_and_rankfeat_on_an_adapted_torchvision_resnet() -> None:
    """mds_ensemble's cached stage means are the channel means of each stage's output; rankfeat equals its formula
    written with the torchvision modules themselves."""
    torch.manual_seed(0)
    net = MODELS["tv_resnet"]().eval()
    backbone = as_backbone(net)
    x = torch.randn(4, 3, 32, 32)
    out, cached = _pass_with_stage_means(backbone, x)
    assert sorted(cached) == sorted(f"stage_mean.{n}" for n in (*STAGES["tv_resnet"], "feature1"))
    for name in STAGES["tv_resnet"]:
        assert torch.equal(cached[f"stage_mean.{name}"], out.layers[name].mean((2, 3))), name
    # OpenOOD's feature1: after the max-pool
    assert torch.equal(cached["stage_mean.feature1"], net.maxpool(out.layers["stem"]).mean((2, 3)))

    def rank1_removed(z: torch.Tensor) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(z.flatten(2).double(), full_matrices=False)
        return (z.flatten(2).double() - s[:, :1, None] * u[:, :, :1] @ vh[:, :1, :]).float().view_as(z)

    with torch.no_grad():
        l3 = net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))))
        l4 = net.layer4(l3)
        head = lambda z: net.fc(torch.flatten(net.avgpool(z), 1))  # noqa: E731
        expected = torch.logsumexp((head(rank1_removed(l4)).double() + head(net.layer4(rank1_removed(l3))).double()) / 2, 1)
    torch.testing.assert_close(build_detector("rankfeat").score_inputs(backbone, x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["timm_vit", "tv_vit"])
def test_stage_reductions_on_vit_tokens_average_over_the_tokens(kind: str) -> None:
    """A ViT's stage outputs are tokens [B, T, D]: mds_ensemble's cached stage means and nac's neuron states are the
    D embedding channels averaged over the T tokens (they were T token values averaged over the embedding), and
    rankfeat removes the rank-1 part of each sample's [T, D] token matrix."""
    torch.manual_seed(0)
    backbone = as_backbone(MODELS[kind]().eval())
    x = torch.randn(3, 3, 32, 32)
    out, cached = _pass_with_stage_means(backbone, x)
    # the stem ends in a step: its output is cached as feature1, the first block's input
    assert sorted(cached) == sorted(f"stage_mean.{n}" for n in (*STAGES[kind][1:], "feature1"))
    for name in STAGES[kind][1:]:
        torch.testing.assert_close(cached[f"stage_mean.{name}"], out.layers[name].mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cached["stage_mean.feature1"], out.layers["stem"].mean(1), rtol=1e-6, atol=1e-6)
    states = build_detector("nac").states(backbone, x)
    assert [s.shape[1] for s in states] == [backbone.feature_dim] * len(STAGES[kind])

    def rank1_removed(z: torch.Tensor) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(z.double(), full_matrices=False)
        return (z.double() - s[:, :1, None] * u[:, :, :1] @ vh[:, :1, :]).float()

    last, before = STAGES[kind][-1], STAGES[kind][-2]
    with torch.no_grad():
        expected = (backbone.fc(backbone.forward_from(last, rank1_removed(out.layers[last]))).double()
                    + backbone.fc(backbone.forward_from(before, rank1_removed(out.layers[before]))).double()) / 2
    torch.testing.assert_close(build_detector("rankfeat").score_inputs(backbone, x), torch.logsumexp(expected, 1),
                               rtol=1e-5, atol=1e-5)


def test_nhwc_stage_outputs_are_read_channels_last() -> None:
    """A timm model that declares `output_fmt = "NHWC"` (Swin) has its 4-d stage outputs read as [B, H, W, C]."""
    net = MODELS["timm_other"]()
    net.output_fmt = "NHWC"
    backbone = as_backbone(net)
    z = torch.arange(2 * 2 * 3 * 5, dtype=torch.float32).view(2, 2, 3, 5)
    assert backbone.channel_dim(z) == -1 and as_backbone(MODELS["timm_other"]()).channel_dim(z) == 1
    torch.testing.assert_close(channel_mean(backbone, z), z.mean((1, 2)))


@pytest.mark.parametrize("kind", ["timm_resnet", "tv_vit"])
def test_grood_post_hoc_mixes_at_a_stage(kind: str, folders: dict[str, Path], tmp_path: Path) -> None:
    torch.manual_seed(0)
    results = ood.evaluate(MODELS[kind](), folders["id"], [folders["far"]], detectors=["msp"], method="grood",
                           image_size=32, resize=32, device="cpu", output_dir=tmp_path,
                           overrides=["method.n_proto=4", "method.proto_batch_size=4"])
    rows = {r["detector"]: r for r in results.rows}
    assert set(rows) == {"grood", "msp"} and rows["grood"]["method"] == "grood"
    assert rows["grood"]["method_params"]["mix_layer"] is None  # the default: the first stage after the stem
    assert 0 <= rows["grood"]["auroc"] <= 1


def test_grood_on_a_model_without_split_names_the_choices(folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot be run from layer .* onward.*ood_proto_source= one of \[val_ood"):
        ood.evaluate(Custom(), folders["id"], [folders["far"]], detectors=["msp"], method="grood", image_size=32,
                     resize=32, device="cpu", output_dir=tmp_path, overrides=["method.n_proto=4", "method.proto_batch_size=4"])


def test_grood_mixup_on_a_model_without_split_is_refused_before_training() -> None:
    """The mix-up prototype needs `forward_from`: a network wrapped as a whole is refused when the method is built,
    not after training and the evaluation pass; the sources that need no split still build."""
    from ood.methods.grood import GROOD

    with pytest.raises(ConfigError, match=r"Custom is wrapped as a whole.*ood_proto_source= one of \[val_ood"):
        GROOD(ModuleBackbone(Custom()), optimizer=torch.optim.SGD)
    assert GROOD(ModuleBackbone(Custom()), optimizer=torch.optim.SGD, ood_proto_source="val_ood").mix_layer


class LazyStemNet(nn.Module):
    """A net whose stem is a `LazyConv2d`: it reads whatever channels its first batch has."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def test_a_lazy_first_convolution_reads_the_datas_channels() -> None:
    """A `LazyConv2d` stem has `in_channels == 0` until its first forward: the channel check refused it ("reads
    0-channel images"); it takes the data's channels."""
    torch.manual_seed(0)
    wrapped = module_backbone("test_adapters.LazyStemNet", num_classes=3, in_channels=1)
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(wrapped.eval().run(x).logits, wrapped.net(x), rtol=0, atol=0)
    assert wrapped.net.body[0].in_channels == 1  # materialised by that forward, for the data's channels


def test_exact_float32_before_torch_2_9_sets_and_puts_back_the_legacy_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.2-2.8 (pyproject allows them) have no per-operator `fp32_precision`: `exact_float32` turns cuDNN's
    `allow_tf32` off and the float32 matmul precision to "highest", makes cuDNN deterministic without benchmark, and
    puts the caller's values back after, also on an exception. (cuDNN stood in for by the legacy flags alone.)"""
    legacy = type("LegacyCudnn", (), {"allow_tf32": True, "deterministic": False, "benchmark": True})()
    precision = ["high"]
    monkeypatch.setattr(torch.backends, "cudnn", legacy)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: precision[0])
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda value: precision.__setitem__(0, value))
    flags = lambda: (legacy.allow_tf32, legacy.deterministic, legacy.benchmark, precision[0])  # noqa: E731
    with pytest.raises(RuntimeError, match="^inside$"), exact_float32():
        assert flags() == (False, True, False, "highest")
        raise RuntimeError("inside")
    assert flags() == (True, False, True, "high")
