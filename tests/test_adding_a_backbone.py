"""docs/adding_a_backbone.md: its example module and config, copied out of the page, work as written on digits: the
config found through `hydra.searchpath` builds the class with its stages, `backbone.weights=` loads a saved state dict,
the features and a stage-reading detector equal a hand forward pass of the file's tensors, and the run's name and
hash follow the config."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import compose_config, doc_blocks
from hydra.core.hydra_config import HydraConfig

from ood import PROJECT_ROOT
from ood.detectors import build_detector
from ood.runs.identity import run_identity
from ood.utils import instantiate

DOC = PROJECT_ROOT / "docs" / "adding_a_backbone.md"


def _blocks() -> tuple[str, str]:
    """The page's python and yaml blocks (one each)."""
    (code,), (yaml,) = doc_blocks(DOC, "python"), doc_blocks(DOC, "yaml")
    return code, yaml


@pytest.fixture
def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The page's `my_nets.py` importable from tmp_path (never the checkout) and its config in `my_conf/backbone/`."""
    code, yaml = _blocks()
    (tmp_path / "my_nets.py").write_text(code)
    (tmp_path / "my_conf" / "backbone").mkdir(parents=True)
    (tmp_path / "my_conf" / "backbone" / "tiny_resnet.yaml").write_text(yaml)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_nets", raising=False)
    yield tmp_path
    sys.modules.pop("my_nets", None)


def _config(example: Path, *overrides: str):  # noqa: ANN202 - a DictConfig
    return compose_config(example / "run", [f"hydra.searchpath=[file://{example / 'my_conf'}]", "backbone=tiny_resnet",
                                            *overrides])


def _hand_forward(w: dict[str, torch.Tensor], x: torch.Tensor, drop: str | None = None) -> dict[str, torch.Tensor]:
    """The example's layers written out from the state dict `w` (eval-mode batch norm): stage outputs, features and
    logits; `drop`: the stage whose output loses its rank-1 component (RankFeat) before the stages after it run."""

    def conv_bn(z: torch.Tensor, conv: str, bn: str, stride: int = 1) -> torch.Tensor:
        z = F.conv2d(z, w[f"{conv}.weight"], stride=stride, padding=1)
        return F.batch_norm(z, w[f"{bn}.running_mean"], w[f"{bn}.running_var"], w[f"{bn}.weight"], w[f"{bn}.bias"], eps=1e-5)

    def residual(z: torch.Tensor, p: str) -> torch.Tensor:
        return (z + conv_bn(conv_bn(z, f"{p}.body.0", f"{p}.body.1").relu(), f"{p}.body.3", f"{p}.body.4")).relu()

    def rank1_removed(z: torch.Tensor) -> torch.Tensor:
        flat = z.flatten(2).double()
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        return (flat - s[:, :1, None] * u[:, :, :1] @ vh[:, :1, :]).float().view_as(z)

    out = {"stem": conv_bn(x, "stages.stem.0", "stages.stem.1").relu()}
    out["layer1"] = residual(out["stem"], "stages.layer1")
    z = rank1_removed(out["layer1"]) if drop == "layer1" else out["layer1"]
    out["layer2"] = residual(conv_bn(z, "stages.layer2.0", "stages.layer2.1", stride=2).relu(), "stages.layer2.3")
    z = rank1_removed(out["layer2"]) if drop == "layer2" else out["layer2"]
    out["features"] = z.mean((2, 3))
    out["logits"] = out["features"] @ w["fc.weight"].T + w["fc.bias"]
    return out


def test_the_example_loads_weights_and_runs_as_its_layers_on_digits(example: Path) -> None:
    from my_nets import TinyResNet

    torch.manual_seed(0)
    saved = TinyResNet(6, in_channels=1)
    for bn in (m for m in saved.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics of a trained network
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 1.5)
    torch.save(saved.state_dict(), example / "tiny.pth")

    cfg = _config(example, f"backbone.weights={example / 'tiny.pth'}")
    net = instantiate(cfg.backbone, num_classes=6, in_channels=1).eval()
    assert type(net) is TinyResNet and net.layer_names == ("stem", "layer1", "layer2") and net.feature_dim == 64
    test = instantiate(cfg.data, seed=0).fit_data().datasets["test"]
    x = torch.stack([test[i][0] for i in range(16)])
    assert x.shape[1:] == (1, 16, 16)  # digits: one channel, passed to the constructor as in_channels

    w = torch.load(example / "tiny.pth")
    hand = _hand_forward(w, x)
    with torch.no_grad():
        out = net.run(x, ["layer1"])
        # the same float32 conv / batch-norm kernels on both sides (measured: equal); the pooling's and the linear
        # layer's sums of 64 terms may round otherwise: a few ulps. A BatchNorm eps of 2e-5 moves them by 2e-6 - 3e-5
        torch.testing.assert_close(out.features, hand["features"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.layers["layer1"], hand["layer1"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.logits, hand["logits"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(net(x), out.logits, rtol=0, atol=0)  # training's forward is the evaluation's run

    # RankFeat re-runs the network from the last two stages (forward_from): its score is its formula on the hand pass
    last, before = _hand_forward(w, x, drop="layer2")["logits"], _hand_forward(w, x, drop="layer1")["logits"]
    expected = torch.logsumexp((last.double() + before.double()) / 2, 1)
    # float32 logits of the same kernels (measured: equal), their energy in float64: a few float32 ulps of scores near 2
    torch.testing.assert_close(build_detector("rankfeat").score_inputs(net, x), expected, rtol=0, atol=1e-6)


def test_the_example_names_the_run_and_each_width_is_its_own_configuration(example: Path) -> None:
    identities = []
    for width in ([], ["backbone.width=16"]):
        cfg = _config(example, *width)
        choices = HydraConfig.get().runtime.choices
        identities.append(run_identity(cfg, choices, example / "run", None))
        assert (cfg.backbone.target, cfg.backbone.width) == ("my_nets.TinyResNet", 16 if width else 32)
    assert [i.names for i in identities] == [["ce", "digits", "tiny_resnet"]] * 2
    assert identities[0].hash != identities[1].hash
    assert identities[0].group == f"ce-digits-tiny_resnet-{identities[0].hash}"
