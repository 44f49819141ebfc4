"""Known answers and the identities in docs/methods/energy_cfl.md for the energy-family losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ood.losses import cluster_focal, energy_margin, free_energy, logitnorm, outlier_exposure, push_away


def test_free_energy_is_minus_logsumexp() -> None:
    assert free_energy(torch.tensor([[0.0, 0.0]])).item() == pytest.approx(-math.log(2))
    # T = 2: -2 * LSE([1, 1]) = -2 (1 + ln 2)
    assert free_energy(torch.tensor([[2.0, 2.0]]), temperature=2.0).item() == pytest.approx(-2 * (1 + math.log(2)))


def test_energy_margin_hand_value() -> None:
    # E_in = (-ln 2, ~-10) vs m_in = -1: hinges (1 - ln 2, 0); E_out = (-ln 2, 5 - ln 2) vs m_out = 1 - ln 2: (1, 0)
    logits_in = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    logits_out = torch.tensor([[0.0, 0.0], [-5.0, -5.0]])
    loss = energy_margin(logits_in, logits_out, m_in=-1.0, m_out=1 - math.log(2))
    assert loss.item() == pytest.approx((1 - math.log(2)) ** 2 / 2 + 1 / 2, rel=1e-6)


def test_energy_margin_vanishes_inside_the_margins() -> None:
    logits_in, logits_out = torch.tensor([[10.0, 9.0]]), torch.tensor([[-8.0, -9.0]])  # E_in ~ -10.3, E_out ~ 7.7
    assert energy_margin(logits_in, logits_out, m_in=-10.0, m_out=7.0).item() == 0.0


def test_energy_margin_gradient_lowers_id_energy_and_raises_outlier_energy() -> None:
    gen = torch.Generator().manual_seed(0)
    logits_in = torch.randn(8, 5, generator=gen).requires_grad_()
    logits_out = torch.randn(8, 5, generator=gen).requires_grad_()
    energy_margin(logits_in, logits_out, m_in=-5.0, m_out=3.0).backward()
    with torch.no_grad():
        step_in, step_out = logits_in - 0.1 * logits_in.grad, logits_out - 0.1 * logits_out.grad
        assert (free_energy(step_in) < free_energy(logits_in)).all()
        assert (free_energy(step_out) > free_energy(logits_out)).all()


def test_logitnorm_hand_value_and_scale_invariance() -> None:
    # f = (3, 4): ||f|| = 5, f / (0.5 * 5) = (1.2, 1.6); CE for class 1 = ln(1 + e^-0.4)
    loss = logitnorm(torch.tensor([[3.0, 4.0]]), torch.tensor([1]), tau=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.4)), rel=1e-6)
    assert logitnorm(torch.tensor([[30.0, 40.0]]), torch.tensor([1]), tau=0.5).item() == pytest.approx(loss.item(), rel=1e-6)


def test_cluster_focal_hand_values() -> None:
    # z = 0, centres (0, 0) and (1, 0): distance logits (0, -1), p_0 = sigmoid(1)
    z, centres, y = torch.zeros(1, 2), torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([0])
    p0 = 1 / (1 + math.exp(-1))
    assert cluster_focal(z, centres, y, gamma=0.0, tau=1.0).item() == pytest.approx(-math.log(p0), rel=1e-6)
    assert cluster_focal(z, centres, y, gamma=2.0, tau=1.0).item() == pytest.approx((1 - p0) ** 2 * -math.log(p0), rel=1e-6)
    # tau = 0.5 doubles the distance logits: (0, -2)
    assert cluster_focal(z, centres, y, gamma=0.0, tau=0.5).item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)


def test_cluster_focal_gamma_zero_is_cross_entropy_on_distance_logits() -> None:
    gen = torch.Generator().manual_seed(1)
    z, centres, y = torch.randn(16, 4, generator=gen), torch.randn(3, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    logits = -torch.cdist(z, centres).pow(2) / 2.0
    assert cluster_focal(z, centres, y, gamma=0.0, tau=2.0).item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    focal = (1 - torch.softmax(logits, 1).gather(1, y[:, None])[:, 0]).pow(2) * F.cross_entropy(logits, y, reduction="none")
    assert cluster_focal(z, centres, y, gamma=2.0, tau=2.0).item() == pytest.approx(focal.mean().item(), rel=1e-5)


def test_cluster_focal_pulls_the_class_centre_towards_the_embedding() -> None:
    z = torch.tensor([[2.0, 1.0]])
    centres = torch.tensor([[0.0, 0.0], [3.0, -2.0]], requires_grad=True)
    cluster_focal(z, centres, torch.tensor([0]), gamma=2.0, tau=1.0).backward()
    direction = -centres.grad[0]
    cosine = F.cosine_similarity(direction, z[0] - centres.detach()[0], dim=0)
    assert cosine.item() == pytest.approx(1.0, abs=1e-6) and direction.norm() > 0


def test_push_away_hand_value_and_zero_outside_the_margin() -> None:
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    z_out = torch.tensor([[3.0, 4.0], [10.0, 7.0]])  # nearest distances 5 and 7
    assert push_away(z_out, centres, margin=6.0).item() == pytest.approx(0.5)  # (1^2 + 0) / 2
    assert push_away(z_out, centres, margin=5.0).item() == 0.0
    z = z_out.clone().requires_grad_()
    push_away(z, centres, margin=6.0).backward()
    assert z.grad[0] @ torch.tensor([3.0, 4.0]) < 0 and torch.equal(z.grad[1], torch.zeros(2))  # descent moves it away


def _logits(seed: int, n: int, c: int = 10, scale: float = 8.0) -> torch.Tensor:
    return scale * torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_outlier_exposure_is_hendrycks_and_openoods_line_by_line() -> None:
    """energy_ood train.py (`--score OE`) and OpenOOD OETrainer: 0.5 * -(x.mean(1) - logsumexp(x, 1)).mean()."""
    x = _logits(2, 12)
    ref = 0.5 * -(x.mean(1) - torch.logsumexp(x, dim=1)).mean()
    assert (0.5 * outlier_exposure(x)).item() == pytest.approx(ref.item(), rel=1e-12)
    assert outlier_exposure(torch.zeros(3, 10)).item() == pytest.approx(math.log(10))  # the constant is kept


def test_logitnorm_is_openoods_line_by_line() -> None:
    """OpenOOD LogitNormLoss: norms = ||x||_2 over the last dim + 1e-7; CE(x / norms / tau); tau 0.04."""
    x, y = _logits(3, 8, scale=1e-6), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])  # tiny logits: the 1e-7 matters
    norms = torch.norm(x, p=2, dim=-1, keepdim=True) + 1e-7
    ref = F.cross_entropy(torch.div(x, norms) / 0.04, y)
    assert logitnorm(x, y, 0.04).item() == pytest.approx(ref.item(), rel=1e-12)
