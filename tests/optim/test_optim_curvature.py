"""Curvature products and the preconditioner against dense float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import hessian as ag_hessian
from torch.autograd.functional import jacobian

from toolkit.optim.curvature import curvature_operator
from toolkit.optim.flat import FlatParams
from toolkit.optim.preconditioner import squared_gradient_diagonal

LOSSES = {
    "mse": lambda z, t: F.mse_loss(z, t),
    "ce": lambda z, t: F.cross_entropy(z, t),
}


def _setup(small_net, loss: str):
    net = small_net()
    flat = FlatParams(net, list(net.parameters()))
    theta = flat.flatten()
    torch.manual_seed(1)
    x = torch.randn(5, 3, dtype=torch.float64)
    t = torch.randn(5, 2, dtype=torch.float64) if loss == "mse" else torch.tensor([0, 1, 1, 0, 1])
    return flat, theta, x, t


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("mode", ["double_vjp", "linearize", "jvp"])
def test_ggn_equals_explicit_jacobian_product(small_net, loss: str, mode: str) -> None:
    flat, theta, x, t = _setup(small_net, loss)
    fn = flat.function((x,))
    lf = LOSSES[loss]
    op = curvature_operator(fn, lambda z: lf(z, t), theta, kind="ggn", jvp_mode=mode)
    z = fn(theta).detach()
    jac = jacobian(lambda th: fn(th).reshape(-1), theta)  # (B*d, P)
    h_l = ag_hessian(lambda zz: lf(zz.view_as(z), t), z.reshape(-1))  # (B*d, B*d)
    g_dense = jac.T @ h_l @ jac
    v = torch.randn_like(theta)
    torch.testing.assert_close(op(v), g_dense @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_hessian_product_equals_func_hessian(small_net, loss: str) -> None:
    flat, theta, x, t = _setup(small_net, loss)
    fn = flat.function((x,))
    lf = LOSSES[loss]
    op = curvature_operator(fn, lambda z: lf(z, t), theta, kind="hessian")
    h = torch.func.hessian(lambda th: lf(fn(th), t))(theta)
    v = torch.randn_like(theta)
    torch.testing.assert_close(op(v), h @ v, rtol=1e-10, atol=1e-12)


def _per_example_grads(flat, theta, x, t, lf) -> torch.Tensor:
    rows = []
    for i in range(x.shape[0]):
        th = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(lf(flat.function((x[i : i + 1],))(th), t[i : i + 1]), th)
        rows.append(g)
    return torch.stack(rows)  # (B, P)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_fisher_product_and_preconditioner_diagonal(small_net, loss: str) -> None:
    flat, theta, x, t = _setup(small_net, loss)
    lf = LOSSES[loss]
    gs = _per_example_grads(flat, theta, x, t, lf)
    fisher = gs.T @ gs / x.shape[0]
    op = curvature_operator(flat.function((x,)), lambda z: lf(z, t), theta, kind="fisher")
    v = torch.randn_like(theta)
    torch.testing.assert_close(op(v), fisher @ v, rtol=1e-10, atol=1e-12)
    for max_elements in (10**9, 3 * theta.numel()):  # one chunk, and chunks of 3 examples
        diag = squared_gradient_diagonal(
            lambda th, xx: flat.function(xx)(th), lf, theta, (x,), t, max_elements=max_elements
        )
        torch.testing.assert_close(diag, torch.diagonal(fisher), rtol=1e-10, atol=1e-14)


def test_unknown_curvature_rejected(small_net) -> None:
    flat, theta, x, t = _setup(small_net, "mse")
    with pytest.raises(ValueError, match="curvature: expected one of"):
        curvature_operator(flat.function((x,)), lambda z: F.mse_loss(z, t), theta, kind="kfac")
