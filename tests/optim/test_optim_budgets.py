"""Adaptive CG cap and curvature batch: their rules, the noise estimate, exact resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from toolkit.optim import HessianFree
from toolkit.optim.budgets import CGBudget, CurvatureBudget, gradient_noise


def test_cg_cap_grows_only_when_cg_ran_into_it_with_a_trusted_model() -> None:
    b = CGBudget(initial=10, maximum=40)
    assert b.update(7, "progress", 0.9) == 10  # stopped by the progress rule
    assert b.update(10, "max_iters", 0.1) == 10  # hit the cap, but ρ < 1/4
    assert b.update(10, "max_iters", 0.5) == 13  # ⌈10·1.3⌉
    assert b.update(13, "max_iters", 0.9) == 17
    for _ in range(10):
        b.update(b.cap, "max_iters", 1.0)
    assert b.cap == 40  # bounded
    assert b.update(3, "nonpositive_curvature", -math.inf) == 40  # never shrinks
    fresh = CGBudget(initial=10, maximum=40)
    fresh.load_state_dict(b.state_dict())
    assert fresh.cap == 40
    with pytest.raises(ValueError, match="CGBudget"):
        CGBudget(initial=5, maximum=4)


def test_noise_ratio_is_unbiased_for_the_variance_of_the_mean() -> None:
    """Per-example gradients mu + N(0, s²I): E[ν‖ḡ‖²] = tr Σ / n for unequal halves."""
    g = torch.Generator().manual_seed(0)
    p, n1, n2, s = 50, 7, 13, 2.0
    mu = torch.full((p,), 0.1, dtype=torch.float64)
    est = []
    for _ in range(4000):
        e1 = mu + s * torch.randn(n1, p, generator=g, dtype=torch.float64)
        e2 = mu + s * torch.randn(n2, p, generator=g, dtype=torch.float64)
        g1, g2 = e1.mean(0), e2.mean(0)
        gbar = (n1 * g1 + n2 * g2) / (n1 + n2)
        est.append(gradient_noise(g1, g2, n1, n2) * float(gbar.pow(2).sum()))
    true_var = p * s**2 / (n1 + n2)
    assert abs(sum(est) / len(est) - true_var) / true_var < 0.03
    assert gradient_noise(torch.zeros(3), torch.zeros(3), 1, 1) == math.inf


def test_curvature_fraction_grows_as_the_noise_falls_below_target() -> None:
    b = CurvatureBudget(fraction=0.1, max_fraction=0.8, target=1.0, decay=0.0)
    assert b.current() == 0.1  # nothing observed yet
    assert b.observe(4.0) == 0.1  # noisy gradient: the base fraction
    assert b.observe(0.25) == pytest.approx(0.2)  # 0.1·√(1/0.25)
    assert b.observe(1e-6) == 0.8  # bounded
    assert b.observe(math.nan) == 0.8  # ignored
    smoothed = CurvatureBudget(fraction=0.1, target=1.0, decay=0.5)
    smoothed.observe(1.0)
    smoothed.observe(0.0)
    assert smoothed.noise == pytest.approx(0.5)
    resumed = CurvatureBudget(fraction=0.1, target=1.0, decay=0.5)
    resumed.load_state_dict(smoothed.state_dict())
    assert resumed.current() == smoothed.current()
    with pytest.raises(ValueError, match="CurvatureBudget"):
        CurvatureBudget(fraction=0.5, max_fraction=0.4)


def test_hessian_free_follows_the_budgets(small_net) -> None:
    """The CG cap grows from cg_initial_iters; the halves' gradient equals the full-batch gradient."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    y = torch.stack([torch.sin(x[:, 0]), x[:, 1] * x[:, 2]], dim=1)
    model = small_net(0)
    opt = HessianFree(
        model, F.mse_loss, adaptive_cg=True, cg_initial_iters=2, cg_max_iters=30, cg_min_iters=0,
        adaptive_curvature=True, curvature_fraction=0.25, preconditioner="none",
    )  # fmt: skip
    caps = []
    for _ in range(6):
        cap = opt.state_dict()["state"]["hessian_free"]["cg_cap"]
        info = opt.step((x,), y)
        assert info.cg_iters <= cap
        caps.append(cap)
    assert caps[0] == 2 and caps == sorted(caps) and caps[-1] > 2
    assert math.isfinite(opt.state_dict()["state"]["hessian_free"]["noise"])
    # gradient from the two halves = full-batch gradient (float64)
    plain = HessianFree(small_net(0), F.mse_loss, preconditioner="none")
    halves = HessianFree(small_net(0), F.mse_loss, preconditioner="none", adaptive_curvature=True)
    from toolkit.optim.flat import FlatParams

    flat = FlatParams(halves.model, halves._params())
    theta = flat.flatten()
    loss, grad, noise = halves._halves_gradient(flat, theta, (x,), y)
    th = theta.clone().requires_grad_(True)
    full = F.mse_loss(FlatParams(plain.model, plain._params()).function((x,))(th), y)
    (want,) = torch.autograd.grad(full, th)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, full.detach(), rtol=1e-12, atol=0)
    assert noise > 0
