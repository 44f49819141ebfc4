"""Heatmap-based OOD detection (`method=heatmap`, spec shared/methods/heatmap.md §8): known answers for the loss,
score, prototypes, decoder plans and feature scaling, and a seeded digits run from the shared CE checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import compose_config, rows_by, run_config
from omegaconf import OmegaConf

from ood import CONFIG_DIR
from ood.losses import heatmap_loss
from ood.methods.heatmap import class_prototypes, heatmap_score, released_pairing
from ood.models.decoder import HeatmapDecoder, decoder_plan
from ood.utils import instantiate


def test_loss_known_answers() -> None:
    # w = 1 + 5|t| = [1, 6]; (0.5 + 0 - 0)^2 * 1 + (0 + 0 - 1)^2 * 6 = 6.25
    heat, x, t = torch.tensor([[[[0.5, 0.0]]]]), torch.zeros(1, 1, 1, 2), torch.tensor([[[[0.0, 1.0]]]])
    assert heatmap_loss(heat, x, t).item() == pytest.approx(6.25)
    assert heatmap_loss(heat, x, t, alpha=0.0).item() == pytest.approx(1.25)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.rand(4, 3, 5, 5, generator=gen) * 2 - 1, torch.rand(4, 3, 5, 5, generator=gen) * 2 - 1
    assert heatmap_loss(t - x, x, t).item() == pytest.approx(0.0, abs=1e-12)
    heat = torch.rand(4, 3, 5, 5, generator=gen, requires_grad=True)
    heatmap_loss(heat, x, t).backward()
    expected = 2 * (1 + 5 * t.abs()) * (heat.detach() + x - t) / 4  # per-sample 2w(M + x - t), batch mean
    torch.testing.assert_close(heat.grad, expected)


def test_score_range_and_zero() -> None:
    assert heatmap_score(torch.zeros(2, 3, 4, 4)).tolist() == [0.0, 0.0]
    heat = torch.zeros(1, 2, 1, 2)
    heat[0, 0, 0] = torch.tensor([0.5, -0.2])
    heat[0, 1, 0] = torch.tensor([-0.1, 0.8])
    assert heatmap_score(heat).item() == pytest.approx(-(0.5 + 0.8) / 2)
    scores = heatmap_score(torch.tanh(torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 3))
    assert bool(((scores >= -1) & (scores <= 0)).all())
    assert heatmap_score(-torch.ones(1, 1, 2, 2)).item() == -1.0


def test_prototypes_match_brute_force_and_released_order() -> None:
    gen = torch.Generator().manual_seed(0)
    bank, bank_preds = torch.randn(300, 16, generator=gen), torch.randint(0, 5, (300,), generator=gen)
    query, query_preds = torch.randn(40, 16, generator=gen), torch.randint(0, 5, (40,), generator=gen)
    proto = class_prototypes(bank, bank_preds, query, query_preds)
    for k in range(len(query)):
        dist = ((bank - query[k]) ** 2).sum(1).masked_fill(bank_preds != query_preds[k], float("inf"))
        assert int(proto[k]) == int(dist.argmin())
        assert int(bank_preds[proto[k]]) == int(query_preds[k])
    # the released loop: class by class, outliers of that class in position order; outlier k takes entry k
    released = [int(proto[j]) for cls in range(5) for j in range(len(query)) if int(query_preds[j]) == cls]
    assert released_pairing(proto, query_preds).tolist() == released
    assert (released_pairing(proto, query_preds) != proto).float().mean() > 0.5


def test_builder_reproduces_the_spec_table() -> None:
    table = {
        (512, 32, 100, None): (100, (512, 256, 128, 64)),  # ResNet-18 CIFAR-10
        (512, 32, None, None): (512, (512, 256, 128, 64)),  # ResNet-18 CIFAR-100
        (128, 32, None, 256): (128, (256, 128, 64, 32)),  # WRN-40-2 CIFAR-10/100
        (2048, 64, 512, None): (512, (2048, 1024, 512, 256, 128)),  # ResNet-50 Tiny ImageNet
        (64, 8, None, None): (64, (64, 32)),  # digits plan of spec §6 (8 px)
    }
    for (dim, size, latent, width), (d0, channels) in table.items():
        plan = decoder_plan(dim, size, 3, latent, width)
        assert (plan.latent, plan.channels, plan.start) == (d0, channels, 4)
    decoder = HeatmapDecoder(512, 10, decoder_plan(512, 32, 3, 100))
    assert [m.out_channels for m in decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)] == [512, 256, 128, 64, 3]
    assert all(m.bias is None for m in decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d))


INPUTS = {"small_cnn": (1, 16), "resnet50": (3, 224)}  # every other backbone config is a 32-px CIFAR network


@pytest.mark.parametrize("config", sorted(p.stem for p in (CONFIG_DIR / "backbone").glob("*.yaml")))
def test_decoder_output_has_the_input_shape(config: str) -> None:
    channels, size = INPUTS.get(config, (3, 32))
    backbone = instantiate(OmegaConf.load(CONFIG_DIR / "backbone" / f"{config}.yaml"), num_classes=10, in_channels=channels)
    # the shape depends on the feature dim and the input size only: a narrow decoder keeps the 224-px case quick
    plan = decoder_plan(backbone.feature_dim, size, channels, width=64)
    decoder = HeatmapDecoder(backbone.feature_dim, 10, plan).eval()
    with torch.no_grad():
        heat = decoder(torch.rand(2, backbone.feature_dim), torch.tensor([0, 9]))
    assert heat.shape == (2, channels, size, size)
    assert bool((heat.abs() <= 1).all())


def _method(tmp_path: Path, overrides: list[str]):
    cfg = compose_config(tmp_path, ["method=heatmap", *overrides])
    backbone = instantiate(cfg.backbone, num_classes=6, in_channels=1)
    return instantiate(cfg.method, backbone=backbone)


def test_feature_scaling(tmp_path: Path) -> None:
    method = _method(tmp_path, [])
    method.feature_range.copy_(torch.tensor([-2.0, 6.0]))
    feats = torch.tensor([[-2.0, 6.0, 2.0], [0.0, 4.0, 6.0]])
    torch.testing.assert_close(method.scale_features(feats), torch.tensor([[0.0, 1.0, 0.5], [0.25, 0.75, 1.0]]))
    method.feature_norm = "as_released"
    torch.testing.assert_close(method.scale_features(feats), torch.tensor([[0.0, 1.0, 0.5], [0.0, 4.0, 6.0]]))
    assert method.frozen == ("backbone",)


def test_bad_flag_names_the_choices(tmp_path: Path) -> None:
    from ood.errors import ConfigError

    with pytest.raises(ConfigError, match="as_released"):
        _method(tmp_path, ["method.pairing=released"])
