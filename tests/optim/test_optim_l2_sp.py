"""L2-SP (½ b ‖θ - θ⁰‖², toward the pretrained weights) against float64 closed forms."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from toolkit.optim import HessianFree
from toolkit.optim.regularizers import Regularizer


def _problem(n: int = 50, d: int = 4, k: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, k, generator=g, dtype=torch.float64) + 0.2 * torch.randn(
        n, k, generator=g, dtype=torch.float64
    )
    return x, y


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_l2_sp_reaches_ridge_toward_the_start(curvature: str) -> None:
    x, y = _problem()
    n, d = x.shape
    k = y.shape[1]
    model = nn.Linear(d, k, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(k, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    w0 = model.weight.detach().clone()  # (k, d): the "pretrained" point
    lam = 0.3
    opt = HessianFree(model, F.mse_loss, l2_sp=lam, curvature=curvature, curvature_fraction=1.0, damping=1e-3)
    for _ in range(10):
        opt.step((x,), y)
    # F(W) = 1/(n k) ‖X Wᵀ - Y‖² + ½ λ ‖W - W0‖²  ⇒  (2/(n k) XᵀX + λ I) Wᵀ = 2/(n k) XᵀY + λ W0ᵀ
    c = 2.0 / (n * k)
    ref = torch.linalg.solve(c * x.T @ x + lam * torch.eye(d, dtype=x.dtype), c * x.T @ y + lam * w0.T).T
    torch.testing.assert_close(model.weight.detach(), ref, rtol=1e-6, atol=1e-8)
    # the solution really lies between the least-squares fit and W0 (the penalty acted)
    ls = torch.linalg.lstsq(x, y).solution.T
    w = model.weight.detach()
    assert float((w - ls).norm()) > 1e-3 and float((w - w0).norm()) < float((ls - w0).norm())


def test_l2_sp_value_gradient_curvature_match_autograd() -> None:
    g = torch.Generator().manual_seed(0)
    p = 9
    theta = torch.randn(p, generator=g, dtype=torch.float64)
    anchor = torch.randn(p, generator=g, dtype=torch.float64)
    b = torch.rand(p, generator=g, dtype=torch.float64)
    a = torch.rand(p, generator=g, dtype=torch.float64)
    reg = Regularizer(
        a, torch.zeros(p, dtype=torch.float64), 0.4, torch.arange(6), torch.tensor([0, 0, 0, 1, 1, 1]), 2,
        l2_sp=b, anchor=anchor,
    )  # fmt: skip
    dense = torch.func.hessian(lambda t: reg.value(t))(theta)  # (P, P) float64 reference
    grad = torch.func.grad(lambda t: reg.value(t))(theta)
    torch.testing.assert_close(reg.smooth_grad(theta), grad, rtol=1e-10, atol=1e-12)
    v = torch.randn(p, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        reg.apply_curvature(reg.curvature_product(theta), v), dense @ v, rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(reg.curvature_diag(theta), torch.diagonal(dense), rtol=1e-10, atol=1e-12)
    expected = 0.5 * (a * theta**2).sum() + 0.5 * (b * (theta - anchor) ** 2).sum()
    expected = expected + 0.4 * (theta[:3].norm() + theta[3:6].norm())
    torch.testing.assert_close(reg.value(theta), expected, rtol=1e-12, atol=0.0)


def test_l2_sp_anchor_survives_state_dict() -> None:
    x, y = _problem()
    model = nn.Linear(4, 2).double()
    start = [p.detach().clone() for p in model.parameters()]
    opt = HessianFree(model, F.mse_loss, l2_sp=1.0, curvature_fraction=1.0)
    opt.step((x,), y)
    state = copy.deepcopy(opt.state_dict())
    clone = nn.Linear(4, 2).double()
    clone.load_state_dict(model.state_dict())
    opt2 = HessianFree(clone, F.mse_loss, l2_sp=1.0, curvature_fraction=1.0)  # anchors = current values...
    opt2.load_state_dict(state)  # ...until the saved θ⁰ is restored
    for p, s in zip(clone.parameters(), start):
        torch.testing.assert_close(opt2.state[p]["l2_sp_anchor"], s, rtol=0, atol=0)
    a, b = opt.step((x,), y), opt2.step((x,), y)
    assert a.new_loss == pytest.approx(b.new_loss, rel=1e-12)
