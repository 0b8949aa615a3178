"""The exact layer-block Gauss-Newton preconditioner against dense float64 solves of the GN blocks."""

from __future__ import annotations

import pytest
import torch
from test_optim_kfac import LOSSES, block_index, dense_ggn, single_linear, sum_squared
from torch import nn

from toolkit.layers import FactorizedLinear
from toolkit.optim.block_gn import BlockGaussNewton
from toolkit.optim.cg import conjugate_gradient
from toolkit.optim.curvature import curvature_operator
from toolkit.optim.flat import FlatParams


class Scale(nn.Module):
    """x ↦ x ⊙ s: a parameter outside every linear block."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


def _tiny_net() -> nn.Module:
    """Linear, FactorizedLinear (U and V: two blocks), a bottleneck of 2, a scale, a linear head; float64."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 5), nn.Tanh(), FactorizedLinear(5, 4, rank=2), nn.Sigmoid(),
        nn.Linear(4, 2), Scale(2), nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3),
    ).double()  # fmt: skip


LOSS_NAMES = ["sum_squared", "cross_entropy"]  # of test_optim_kfac.LOSSES


def _reference(model: nn.Module, x: torch.Tensor, loss, blocks, lam: float) -> torch.Tensor:
    """(B + λI) with B the GN matrix's diagonal blocks (from torch.func.jacrev / hessian), 0 elsewhere."""
    ggn, flat = dense_ggn(model, x, loss)
    b = torch.zeros_like(ggn)
    for blk in blocks:
        idx = block_index(blk)
        b[idx[:, None], idx[None, :]] = ggn[idx[:, None], idx[None, :]]
    return b + lam * torch.eye(flat.numel, dtype=torch.float64)


@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_inverse_is_the_dense_solve_of_the_gn_blocks(loss_name: str) -> None:
    g = torch.Generator().manual_seed(3)
    loss_fn, make_t = LOSSES[loss_name]
    model = _tiny_net()
    n = 6
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    t = make_t(g, n)
    flat = FlatParams(model, list(model.parameters()))
    pre = BlockGaussNewton(model, flat.params, flat.offsets)
    pre.update((x,), lambda z: loss_fn(z, t))
    assert len(pre.blocks) == 6  # 4 Linear + U and V of the factorized layer; Scale is outside
    routes = {route for route, _ in pre.sizes()}
    assert routes == {"kernel", "block"}  # both factorizations are exercised
    lam = 0.07
    m = _reference(model, x, lambda z: loss_fn(z, t), pre.blocks, lam)
    r = torch.randn(flat.numel, generator=g, dtype=torch.float64)
    torch.testing.assert_close(pre.inverse(lam)(r), torch.linalg.solve(m, r), rtol=1e-9, atol=1e-11)


def test_rows_below_a_bottleneck_are_compressed_exactly() -> None:
    """Layers below the 2-unit bottleneck have per-example rank ≤ 2: N·2 rows, not N·K, and still exact."""
    g = torch.Generator().manual_seed(5)
    model = _tiny_net()
    n = 6
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    t = torch.randn(n, 3, generator=g, dtype=torch.float64)
    flat = FlatParams(model, list(model.parameters()))
    pre = BlockGaussNewton(model, flat.params, flat.offsets)
    pre.update((x,), lambda z: sum_squared(z, t))
    for data in pre.data[:4]:  # Linear(3, 5), V, U, Linear(4, 2): all feed the 2-unit layer
        assert len(data.rows) <= 2 * n
    assert len(pre.data[5].rows) == 3 * n  # the head: M_i = √(2/N) I₃
    m = _reference(model, x, lambda z: sum_squared(z, t), pre.blocks, 0.01)
    r = torch.randn(flat.numel, generator=g, dtype=torch.float64)
    torch.testing.assert_close(pre.inverse(0.01)(r), torch.linalg.solve(m, r), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_one_block_preconditioned_cg_converges_in_one_iteration(loss_name: str) -> None:
    """A single Linear: the block is the whole GN matrix, so PCG with its exact inverse takes 1 step."""
    model, x, loss = single_linear(loss_name, seed=7, n=9)
    flat = FlatParams(model, list(model.parameters()))
    theta = flat.flatten()
    op = curvature_operator(flat.function((x,)), loss, theta, "ggn")
    lam = 1e-3
    pre = BlockGaussNewton(model, flat.params, flat.offsets)
    pre.update((x,), loss)
    b = torch.randn(flat.numel, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    res = conjugate_gradient(
        lambda v: op(v) + lam * v, b, preconditioner=pre.inverse(lam), max_iters=5, tol=0, residual_tol=1e-10
    )
    assert res.reason == "converged" and res.iters == 1
    plain = conjugate_gradient(lambda v: op(v) + lam * v, b, max_iters=5, tol=0, residual_tol=1e-10)
    assert plain.iters > 1  # the system is not trivial without it


def test_float32_model_gives_the_float64_answer() -> None:
    """A float32 model (as in training): float64 inside, the result in r's dtype, close to float64's."""
    g = torch.Generator().manual_seed(11)
    model = _tiny_net()
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    t = torch.randn(6, 3, generator=g, dtype=torch.float64)
    flat = FlatParams(model, list(model.parameters()))
    want = _reference(
        model, x, lambda z: sum_squared(z, t), BlockGaussNewton(model, flat.params, flat.offsets).blocks, 0.1
    )
    r = torch.randn(flat.numel, generator=g, dtype=torch.float64)
    model32 = model.float()
    flat32 = FlatParams(model32, list(model32.parameters()))
    pre = BlockGaussNewton(model32, flat32.params, flat32.offsets)
    pre.update((x.float(),), lambda z: sum_squared(z, t.float()))
    got = pre.inverse(0.1)(r.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.linalg.solve(want, r), rtol=1e-4, atol=1e-5)


def test_refusals() -> None:
    model = _tiny_net()
    flat = FlatParams(model, list(model.parameters()))
    x = torch.randn(6, 3, dtype=torch.float64)
    pre = BlockGaussNewton(model, flat.params, flat.offsets, max_rows=8)
    with pytest.raises(ValueError, match="max_rows=8"):
        pre.update((x,), lambda z: z.pow(2).sum(1).mean())
    with pytest.raises(RuntimeError, match="update"):
        pre.inverse(0.1)
    pre = BlockGaussNewton(model, flat.params, flat.offsets)
    pre.update((x,), lambda z: z.pow(2).sum(1).mean())
    with pytest.raises(ValueError, match="damping"):
        pre.inverse(0.0)
    with pytest.raises(ValueError, match="max_rows"):
        BlockGaussNewton(model, flat.params, flat.offsets, max_rows=0)
