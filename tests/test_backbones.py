"""CIFAR / ImageNet backbones: known parameter counts, stage shapes, exact `forward_from`, `fc` last."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import compose_config
from torch import nn
from torchvision.models import resnet18, resnet50

from ood.data.batch import Batch
from ood.errors import ConfigError
from ood.models import Backbone, DenseNet, GlobalPool, ResNet18, ResNet18_32x32, ResNet50, WideResNet
from ood.models.resnet import ResNet50_64x64
from ood.models.wrn import MeliketoyWideResNet
from ood.utils import instantiate

# Small members of each family keep the forward passes cheap on CPU (the full configs are built in
# tests/test_configs.py and counted below): name -> constructor, input side, stage output shapes (C, H, W), feature dim.
SHAPES = {
    "resnet18_32x32": (lambda: ResNet18_32x32(10), 32, {"stem": (64, 32, 32), "layer1": (64, 32, 32),
                       "layer2": (128, 16, 16), "layer3": (256, 8, 8), "layer4": (512, 4, 4)}, 512),
    "wrn16_2": (lambda: WideResNet(10, depth=16, widen_factor=2), 32,
                {"stem": (16, 32, 32), "block1": (32, 32, 32), "block2": (64, 16, 16), "block3": (128, 8, 8)}, 128),
    "wrn16_2_heatmap": (lambda: MeliketoyWideResNet(10, depth=16, widen_factor=2), 32,
                        {"stem": (16, 32, 32), "block1": (32, 32, 32), "block2": (64, 16, 16), "block3": (128, 8, 8)}, 128),
    "densenet22": (lambda: DenseNet(10, depth=22, growth=12), 32,
                   {"stem": (24, 32, 32), "block1": (30, 16, 16), "block2": (33, 8, 8), "block3": (69, 8, 8)}, 69),
    "resnet50": (lambda: ResNet50(10), 32, {"stem": (64, 16, 16), "layer1": (256, 8, 8), "layer2": (512, 4, 4),
                 "layer3": (1024, 2, 2), "layer4": (2048, 1, 1)}, 2048),
    "resnet50_64x64": (lambda: ResNet50_64x64(10), 64, {"stem": (64, 32, 32), "layer1": (256, 32, 32),
                       "layer2": (512, 16, 16), "layer3": (1024, 8, 8), "layer4": (2048, 4, 4)}, 2048),
}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module", params=sorted(SHAPES))
def built(request: pytest.FixtureRequest) -> tuple[str, Backbone]:
    torch.manual_seed(0)
    return request.param, SHAPES[request.param][0]().eval()


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: ResNet18_32x32(10), 11_173_962),  # OpenOOD ResNet18_32x32, 10 classes
        (lambda: ResNet18_32x32(100), 11_220_132),
        (lambda: WideResNet(10, depth=40, widen_factor=2), 2_243_546),  # WRN-40-2 (OE / Energy)
        (lambda: WideResNet(100, depth=40, widen_factor=2), 2_255_156),
        (lambda: MeliketoyWideResNet(10), 2_246_474),  # the heatmap paper's WRN-40-2 (biased convs)
        (lambda: MeliketoyWideResNet(100), 2_258_084),
        (lambda: DenseNet(10, depth=100, growth=12), 769_162),  # DenseNet-BC-100, k=12 ("0.8M")
        (lambda: ResNet50(1000), 25_557_032),  # torchvision resnet50
        (lambda: ResNet50_64x64(200), 23_910_152),  # the heatmap paper's Tiny ImageNet ResNet-50 (3x3 stem)
    ],
)
def test_parameter_counts(make: type, expected: int) -> None:
    assert n_params(make()) == expected


def test_stage_shapes_and_features(built: tuple[str, Backbone]) -> None:
    name, backbone = built
    _, side, shapes, dim = SHAPES[name]
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        out = backbone.run(x, backbone.layer_names)
    assert backbone.layer_names == tuple(shapes)
    assert {k: tuple(v.shape[1:]) for k, v in out.layers.items()} == shapes
    assert backbone.feature_dim == dim and out.features.shape == (2, dim)
    assert torch.equal(out.features, out.layers[backbone.layer_names[-1]].mean((2, 3)))
    assert torch.equal(backbone.fc(out.features), out.logits)
    assert torch.equal(backbone(x), out.logits)


def test_forward_from_every_stage_is_exact(built: tuple[str, Backbone]) -> None:
    name, backbone = built
    side = SHAPES[name][1]
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        out = backbone.run(x, backbone.layer_names)
        for layer in backbone.layer_names:
            assert torch.equal(backbone.forward_from(layer, out.layers[layer]), out.features), layer
            assert torch.equal(backbone.forward_to(layer, x), out.layers[layer]), layer


def test_fc_is_the_last_layer_and_all_parameters_are_in_stages_pool_fc(built: tuple[str, Backbone]) -> None:
    _, backbone = built
    children = list(backbone.named_children())
    assert [n for n, _ in children] == ["stages", "pool", "fc"]
    assert isinstance(backbone.fc, nn.Linear) and backbone.num_classes == 10
    assert n_params(backbone) == sum(n_params(m) for _, m in children)


@pytest.mark.parametrize("ours, theirs", [(ResNet50, resnet50), (ResNet18, resnet18)])
def test_torchvision_resnets_are_torchvision(ours: type, theirs: Callable) -> None:
    torch.manual_seed(0)
    ours, reference = ours(num_classes=7).eval(), theirs(weights=None, num_classes=7).eval()
    with torch.no_grad():
        for mine, theirs in zip(ours.state_dict().values(), reference.state_dict().values(), strict=True):
            theirs.copy_(mine)
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(ours(x), reference(x))


def test_wrn_dropout_is_active_in_training_only(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, ["backbone=wrn40_2"])
    assert (cfg.backbone.depth, cfg.backbone.widen_factor, cfg.backbone.dropout) == (40, 2, 0.3)
    torch.manual_seed(0)
    net = instantiate(cfg.backbone, num_classes=10, in_channels=3, depth=10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        net.train()
        assert not torch.equal(net(x), net(x))
        net.eval()
        assert torch.equal(net(x), net(x))


def test_wrn_relus_are_modules_with_the_same_outputs_and_state_dict() -> None:
    """Each block calls its ReLUs as modules (`relu1`, `relu2`, in place, as OpenOOD's WRN), not `F.relu`: the
    outputs for the same weights are the former functional forward's, to the bit, the state dict holds no new key,
    and CombOOD's activation taps see every ReLU call (13 on WRN-16-2, not the final one alone)."""
    from ood.detectors.network import LayerTaps
    from ood.models.wrn import WideBasic

    def functional(block: WideBasic, x: torch.Tensor) -> torch.Tensor:  # the forward before, with F.relu
        act = F.relu(block.bn1(x))
        out = block.conv2(F.relu(block.bn2(block.conv1(act))))
        return out + (x if block.shortcut is None else block.shortcut(act))

    torch.manual_seed(0)
    net = WideResNet(10, depth=16, widen_factor=2).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        h = net.stages["stem"](x)
        for stage in ("block1", "block2", "block3"):
            for module in net.stages[stage]:
                h = functional(module, h) if isinstance(module, WideBasic) else module(h)
        expected = net.fc(h.mean((2, 3)))
        taps = LayerTaps(net, ["combood"])
        logits = net.run(x).logits
    tapped = taps.pop()
    taps.remove()
    assert torch.equal(logits, expected)
    assert not [key for key in net.state_dict() if "relu" in key]
    assert sum(t[0].numel() for key, t in tapped.items() if key.startswith("combood:")) == 2 * 13
    block = net.stages["block1"][0]
    with torch.no_grad():
        pre = block.bn2(block.conv1(F.relu(block.bn1(net.stages["stem"](x)))))  # the first block's second ReLU input
    torch.testing.assert_close(tapped["combood:stages.block1.0.relu2"], torch.stack([pre.amax((1, 2, 3)),
                                                                                   -pre.amin((1, 2, 3))], 1))


def test_wrn_final_relu_is_in_place_as_openoods() -> None:
    """OpenOOD's WRN closes with `self.relu = nn.ReLU(inplace=True)`; ours was not in place, so CombOOD's
    `features=extreme_as_released` (the authors' hook: each module's input as its call left it) read the final ReLU's
    pre-activation where their hook on OpenOOD's WRN reads its output, the `block3` map: -min <= 0, not > 0."""
    from ood.detectors.network import LayerTaps

    torch.manual_seed(0)
    net = WideResNet(10, depth=10, widen_factor=1).eval()
    taps = LayerTaps(net, ["combood"])
    with torch.no_grad():
        block3 = net.run(torch.randn(3, 3, 32, 32), ["block3"]).layers["block3"]
    tapped = taps.pop()
    taps.remove()
    torch.testing.assert_close(tapped["combood_after:stages.block3.2"],
                               torch.stack([block3.amax((1, 2, 3)), -block3.amin((1, 2, 3))], 1), rtol=0, atol=0)


def test_heatmap_wrn_has_the_released_init_and_trains_under_ce(tmp_path: Path) -> None:
    """`backbone=wrn40_2_heatmap` (meliketoy's layout, the heatmap paper's): PyTorch's default init as heatmap_ood
    trained it (its `conv_init` is never applied: conv biases uniform in +-1/sqrt(fan_in), not zero; nor is OE's
    `he_init`, whose normal conv weights pass that bound and whose head bias is zero), the final BN's momentum 0.9,
    and one `method=ce` step on 32-px RGB images gives a finite loss and moves the conv biases."""
    cfg = compose_config(tmp_path, ["method=ce", "backbone=wrn40_2_heatmap"])
    assert (cfg.backbone.depth, cfg.backbone.widen_factor, cfg.backbone.dropout) == (40, 2, 0.3)
    torch.manual_seed(0)
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone, num_classes=6, in_channels=3, depth=10))
    net = method.backbone
    bound = 1 / (3 * 9) ** 0.5
    stem_bias = net.stages["stem"].bias.detach().clone()
    assert 0 < float(stem_bias.abs().max()) <= bound and float(stem_bias.abs().min()) > 0
    for conv in (m for m in net.modules() if isinstance(m, nn.Conv2d)):  # kaiming_uniform(a=sqrt 5): 1/sqrt(fan_in)
        assert float(conv.weight.abs().max()) <= conv.weight[0].numel() ** -0.5, conv
    assert float(net.fc.bias.abs().min()) > 0
    assert net.stages["block3"][-2].momentum == 0.9 and net.stages["block1"][0].dropout.p == 0.3
    batch = Batch(torch.rand(4, 3, 32, 32) * 2 - 1, torch.tensor([0, 1, 2, 5]), torch.arange(4))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = method.training_loss(batch)
    loss.backward()
    optimizer.step()
    assert 0 < loss.item() < float("inf")
    assert not torch.equal(net.stages["stem"].bias, stem_bias)


def _own(stages: Any = None, pool: Any = None, fc: Any = None) -> Backbone:
    """A user's `Backbone` subclass on 1-channel images that sets only the given parts (None: left unset)."""

    class Mine(Backbone):
        def __init__(self) -> None:
            super().__init__()
            for name, part in (("stages", stages), ("pool", pool), ("fc", fc)):
                if part is not None:
                    setattr(self, name, part)

    return Mine()


def _stem() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())


@pytest.mark.parametrize(("parts", "read", "message"), [
    ({"pool": GlobalPool(), "fc": nn.Linear(8, 3)}, "layer_names", "Mine sets no `stages` in __init__"),
    ({"stages": nn.Sequential(_stem()), "pool": GlobalPool(), "fc": nn.Linear(8, 3)}, "layer_names",
     "Mine's `stages` is a Sequential, not an nn.ModuleDict"),
    ({"stages": nn.ModuleDict({"a": _stem()}), "fc": nn.Linear(8, 3)}, "pool", "Mine sets no `pool` in __init__"),
    ({"stages": nn.ModuleDict({"a": _stem()}), "pool": GlobalPool(), "fc": nn.Sequential(nn.Dropout(), nn.Linear(8, 3))},
     "num_classes", "Mine's `fc` is a Sequential, not an nn.Linear"),
])
def test_a_broken_backbone_contract_is_one_line_naming_the_part(parts: dict[str, Any], read: str, message: str) -> None:
    """A user's subclass missing `stages` / `pool` / `fc`, or with one of the wrong type, failed with
    "'Mine' object has no attribute 'layer_names'" (a property failing inside reads as the property missing) or
    "'Sequential' object has no attribute 'in_features'"; now reading the part, a property on it or the forward pass
    names the part."""
    mine = _own(**parts)
    for attempt in (lambda: getattr(mine, read), lambda: mine(torch.zeros(2, 1, 8, 8))):
        with pytest.raises(ConfigError, match=re.escape(message)):
            attempt()
    assert not hasattr(mine, "no_such_attribute")  # other missing attributes stay AttributeErrors


@pytest.mark.parametrize(("pool", "fc", "message"), [
    (nn.AdaptiveAvgPool2d(1), nn.Linear(8, 3), "Mine's pool gives features of shape (2, 8, 1, 1), not [N, 8]"),
    (GlobalPool(), nn.Linear(16, 3), "Mine's pool gives features of shape (2, 8), not [N, 16]"),
])
def test_features_the_head_cannot_read_are_one_line(pool: nn.Module, fc: nn.Linear, message: str) -> None:
    """A pool without the flatten, or a head of another width than the last stage: "mat1 and mat2 shapes cannot be
    multiplied (16x1 and 8x3)" from inside the first training step."""
    mine = _own(nn.ModuleDict({"a": _stem()}), pool, fc)
    for read in (lambda: mine(torch.zeros(2, 1, 8, 8)), lambda: mine.run(torch.zeros(2, 1, 8, 8))):
        with pytest.raises(ConfigError, match=re.escape(message)):
            read()


def test_a_subclass_with_its_own_forward_is_warned_of_when_defined() -> None:
    """Training calls `forward`, the evaluation and every detector `run` / `features` (stages, pool, fc): a subclass
    whose own `forward` computes something else (here a skip over the second stage) trained one function and was
    scored as another, silently."""
    with pytest.warns(UserWarning, match=r"^Skipping overrides forward: training calls forward, but the evaluation and "
                                         r"the detectors read run\(\) / features\(\) \(stages, pool, fc\)"):
        class Skipping(Backbone):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                a = self.stages["a"](x)
                return self.fc(self.pool(a + self.stages["b"](a)))

    with warnings.catch_warnings():
        warnings.simplefilter("error")

        class Plain(Backbone):  # no forward of its own: nothing to say
            pass


def test_a_wrapped_network_has_no_parts_of_its_own_to_complain_of() -> None:
    """The adapters wrap a whole network (no `stages` / `pool` ModuleDict): a missing attribute there stays Python's
    AttributeError, not the contract's line about a user's subclass."""
    from ood.models.adapters import as_backbone

    wrapped = as_backbone(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))
    with pytest.raises(AttributeError) as caught:
        wrapped.pool  # noqa: B018 - the read is the test
    assert not isinstance(caught.value, ConfigError)
    assert wrapped.num_classes == 3 and wrapped.feature_dim == 4


class _NoChannels(torch.nn.Module):
    """A user's network whose constructor takes the class count but not the input channels."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, num_classes)


def test_a_backbone_without_a_keyword_ood_passes_is_told_to_take_it() -> None:
    """ood passes `num_classes` and `in_channels` (from the data) to every backbone's target at run time; a class
    without `in_channels` was told "every key of backbone but _target_ is a keyword of that class: fix the key", but
    the backbone config holds no such key to fix."""
    from omegaconf import OmegaConf

    from ood.errors import ConfigError
    from ood.utils import instantiate

    node = OmegaConf.create({"backbone": {"_target_": f"{__name__}._NoChannels"}}).backbone
    with pytest.raises(ConfigError, match=r"^backbone: .*unexpected keyword argument 'in_channels' \(_target_: "
                                          r"test_backbones\._NoChannels\); ood passes in_channels= to it at run time "
                                          r"\(from the data\): give the class an `in_channels` argument$"):
        instantiate(node, num_classes=3, in_channels=1)
    assert instantiate(node, num_classes=3).fc.out_features == 3


@pytest.mark.parametrize("model_name", ["dla34", "levit_128s"])  # a Conv2d classifier, a pair of heads
def test_a_timm_model_without_one_linear_head_is_named(model_name: str) -> None:
    """`backbone=timm` of a model whose classifier is no linear layer failed in the first forward with the contract
    error meant for a Backbone subclass of one's own (which the user never wrote)."""
    from ood.errors import ConfigError
    from ood.models.timm_backbone import TimmBackbone

    with pytest.raises(ConfigError, match=rf"^timm model '{model_name}' classifies with a \w+, not one linear layer"):
        TimmBackbone(model_name, num_classes=3)


@pytest.mark.parametrize(("overrides", "label"), [
    (["backbone=timm", "backbone.name=resnet10t"], "timm/resnet10t"),
    (["backbone=torchvision", "backbone.name=resnet18"], "torchvision/resnet18"),
    (["backbone=module", "backbone.target=torchvision.models.mobilenet_v3_small"],
     "module/torchvision.models.mobilenet_v3_small"),
    (["backbone=resnet18_32x32"], "resnet18_32x32"),
])
def test_result_rows_name_the_network_of_a_generic_backbone_group(tmp_path: Path, overrides: list[str], label: str) -> None:
    """Rows said `backbone: timm` for every `backbone.name` (also `torchvision`, `module`): `ood-report` took two
    networks for one backbone. A named group keeps its name (references match on it)."""
    from ood.train import build

    pytest.importorskip("timm")
    *_, evaluation = build(compose_config(tmp_path, ["data=cifar10", f"paths.data_dir={tmp_path}", *overrides]))
    assert evaluation.info["backbone"] == label


def test_backbone_label_outside_hydra_and_of_a_named_group_extending_a_library() -> None:
    """No Hydra choice (a build outside a Hydra run): the generic node still names its network, a named node its
    class; a user's config extending `timm` (its own choice) names itself; `ood.evaluate`'s shapes digest stays out of
    the label (its rows equal `ood-eval`'s of the same network, which records none)."""
    from ood.runs.identity import backbone_label

    assert backbone_label(None, {"_target_": "x.timm_backbone", "library": "timm", "name": "vit_tiny"}) == "timm/vit_tiny"
    assert backbone_label(None, {"_target_": "ood.models.ResNet50"}) == "ResNet50"
    assert backbone_label("my_vit", {"library": "timm", "name": "vit_tiny"}) == "my_vit"
    assert backbone_label("module", {"library": "module", "target": "pkg.Net", "shapes": "0123456789ab"}) == \
        "module/pkg.Net"
