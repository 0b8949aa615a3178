"""K-FAC blocks against dense float64 Gauss-Newton blocks; K-FAC-preconditioned CG; HF with kfac."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian, jacrev

from toolkit.layers import FactorizedLinear
from toolkit.optim import HessianFree
from toolkit.optim.cg import conjugate_gradient
from toolkit.optim.curvature import curvature_operator
from toolkit.optim.flat import FlatParams
from toolkit.optim.kfac import KFAC


def sum_squared(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (z - t).pow(2).sum(1).mean()


def dense_ggn(model: nn.Module, x: torch.Tensor, loss) -> tuple[torch.Tensor, FlatParams]:
    """Jᵀ H_L J from torch.func.jacrev and torch.func.hessian (float64)."""
    flat = FlatParams(model, list(model.parameters()))
    theta = flat.flatten()
    f = flat.function((x,))
    z = f(theta)
    jac = jacrev(f)(theta).reshape(z.numel(), -1)  # (B·C, P)
    h = hessian(loss)(z).reshape(z.numel(), z.numel())  # (B·C, B·C)
    return jac.T @ h @ jac, flat


def block_index(blk) -> torch.Tensor:
    """θ indices of the (out, in [+1]) matrix [W b], row-major: the order of kron(G, A)."""
    idx = []
    for o in range(blk.out_features):
        idx += [blk.weight.start + o * blk.in_features + i for i in range(blk.in_features)]
        if blk.bias is not None:
            idx.append(blk.bias.start + o)
    return torch.tensor(idx)


LOSSES = {
    "sum_squared": (sum_squared, lambda g, n: torch.randn(n, 3, generator=g, dtype=torch.float64)),
    "cross_entropy": (F.cross_entropy, lambda g, n: torch.randint(0, 3, (n,), generator=g)),
    "bce": (
        F.binary_cross_entropy_with_logits,
        lambda g, n: torch.rand(n, 3, generator=g, dtype=torch.float64),
    ),  # diagonal, non-isotropic output Hessian
}


def single_linear(loss_name: str, seed: int, n: int) -> tuple[nn.Module, torch.Tensor, Callable]:
    """A float64 Linear(4, 3), ``n`` random inputs and the loss of ``LOSSES[loss_name]`` on random targets."""
    g = torch.Generator().manual_seed(seed)
    loss_fn, make_t = LOSSES[loss_name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    t = make_t(g, n)
    return model, x, lambda z: loss_fn(z, t)


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_single_linear_one_example_is_exact(loss_name: str) -> None:
    model, x, loss = single_linear(loss_name, seed=1, n=1)
    ref, flat = dense_ggn(model, x, loss)
    kfac = KFAC(model, flat.params, flat.offsets, samples="exact")
    ((a, gg),) = kfac.factors((x,), loss)
    idx = block_index(kfac.blocks[0])
    torch.testing.assert_close(torch.kron(gg, a), ref[idx][:, idx], rtol=1e-10, atol=1e-12)


def test_every_block_of_a_factorized_net_is_exact_for_one_example() -> None:
    """U and V of a factorized layer are two blocks; with one example each block is the GN block."""
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(0)
    model = nn.Sequential(FactorizedLinear(5, 6, rank=2), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(1, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([2])
    ref, flat = dense_ggn(model, x, lambda z: F.cross_entropy(z, y))
    kfac = KFAC(model, flat.params, flat.offsets, samples="exact")
    assert [(b.out_features, b.in_features, b.bias is not None) for b in kfac.blocks] == [
        (2, 5, False), (6, 2, True), (3, 6, True)
    ]  # fmt: skip
    for blk, (a, gg) in zip(kfac.blocks, kfac.factors((x,), lambda z: F.cross_entropy(z, y))):
        idx = block_index(blk)
        torch.testing.assert_close(torch.kron(gg, a), ref[idx][:, idx], rtol=1e-10, atol=1e-12)


def test_monte_carlo_factor_is_unbiased() -> None:
    """E[G] over draws of w ~ N(0, H_i) equals the exact G (cross-entropy: non-isotropic H_i)."""
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    flat = FlatParams(model, list(model.parameters()))
    loss = lambda z: F.cross_entropy(z, y)  # noqa: E731
    exact = KFAC(model, flat.params, flat.offsets, samples="exact").factors((x,), loss)
    mc = KFAC(model, flat.params, flat.offsets, samples=20000, seed=0).factors((x,), loss)
    for (a_e, g_e), (a_m, g_m) in zip(exact, mc):
        torch.testing.assert_close(a_m, a_e, rtol=1e-12, atol=1e-12)  # A does not depend on w
        assert float((g_m - g_e).norm() / g_e.norm()) < 0.05


def _token_ce_case(steps: int):
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    bsz, vocab = 2, 3
    model = nn.Sequential(nn.Linear(4, vocab)).double()
    x = torch.randn(bsz, steps, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, vocab, (bsz, steps), generator=g)
    loss = lambda z: F.cross_entropy(z.reshape(-1, vocab), t.reshape(-1))  # noqa: E731
    flat = FlatParams(model, list(model.parameters()))
    with torch.no_grad():
        p = torch.softmax(model(x), dim=-1).reshape(-1, vocab)  # (B·T, V)
    ref_g = (torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)).sum(0) / (bsz * steps)
    return model, flat, x, loss, ref_g


def test_per_token_cross_entropy_blocks_per_position() -> None:
    """(B, T, V) logits of a next-token loss with T·V > 256: one V×V block per position.

    For one linear layer z = W a + b the exact G is Σ_{b,t} H_bt, with H_bt = (diag p − p pᵀ)/(B·T)
    the softmax cross-entropy Hessian of position (b, t), written out by hand here.
    """
    model, flat, x, loss, ref_g = _token_ce_case(steps=100)  # 300 outputs per example, 200 positions
    ((a, gg),) = KFAC(model, flat.params, flat.offsets, samples="exact").factors((x,), loss)
    torch.testing.assert_close(gg, ref_g, rtol=1e-10, atol=1e-13)
    a_bar = torch.cat([x.reshape(-1, 4), torch.ones(x.shape[0] * x.shape[1], 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(a, a_bar.T @ a_bar / a_bar.shape[0], rtol=1e-12, atol=1e-12)


def test_per_token_blocks_on_a_subset_of_positions_are_unbiased() -> None:
    """More positions (300) than square roots are taken for (256): the scaled subset averages to G."""
    model, flat, x, loss, ref_g = _token_ce_case(steps=150)
    mc = KFAC(model, flat.params, flat.offsets, samples=1, seed=0)
    mean_g = sum(mc.factors((x,), loss)[0][1] for _ in range(400)) / 400
    assert float((mean_g - ref_g).norm() / ref_g.norm()) < 0.05


def test_coupled_outputs_beyond_the_limit_are_refused() -> None:
    """A loss that couples positions (not block-diagonal per row) with too many outputs: a clear error."""
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x = torch.randn(1, 100, 4, dtype=torch.float64)
    flat = FlatParams(model, list(model.parameters()))
    loss = lambda z: torch.logsumexp(z.reshape(1, -1), dim=1).sum()  # noqa: E731  one softmax over all 300
    with pytest.raises(ValueError, match="per-position loss"):
        KFAC(model, flat.params, flat.offsets, samples=1).factors((x,), loss)


def _one_linear_exact(seed: int, n_in: int, n_out: int, n: int):
    """K-FAC (exact) of one float64 Linear on n random examples: (kfac, A, G, a random r, the block's θ indices)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n_in, n_out)).double()
    x = torch.randn(n, n_in, generator=g, dtype=torch.float64)
    t = torch.randn(n, n_out, generator=g, dtype=torch.float64)
    flat = FlatParams(model, list(model.parameters()))
    kfac = KFAC(model, flat.params, flat.offsets, samples="exact")
    kfac.update((x,), lambda z: sum_squared(z, t))
    ((a, gg),) = kfac.factors((x,), lambda z: sum_squared(z, t))
    r = torch.randn(flat.numel, generator=g, dtype=torch.float64)
    return kfac, a, gg, r, block_index(kfac.blocks[0])


@pytest.mark.parametrize("mode", ["eigen", "pi"])
def test_inverse_matches_dense_solve(mode: str) -> None:
    kfac, a, gg, r, idx = _one_linear_exact(4, 4, 3, 10)
    lam = 0.3
    if mode == "eigen":
        m = torch.kron(gg, a) + lam * torch.eye(a.shape[0] * gg.shape[0], dtype=torch.float64)
    else:
        pi = math.sqrt((a.trace() / a.shape[0]) / (gg.trace() / gg.shape[0]))
        ia = torch.eye(a.shape[0], dtype=torch.float64)
        ig = torch.eye(gg.shape[0], dtype=torch.float64)
        m = torch.kron(gg + math.sqrt(lam) / pi * ig, a + pi * math.sqrt(lam) * ia)
    want = torch.empty_like(r)
    want[idx] = torch.linalg.solve(m, r[idx])
    torch.testing.assert_close(kfac.inverse(lam, mode=mode)(r), want, rtol=1e-9, atol=1e-12)


def test_kfac_cg_needs_fewer_iterations_on_badly_scaled_inputs() -> None:
    """Inputs spanning 4 orders of magnitude: K-FAC whitens them, the plain CG crawls."""
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 15), nn.Tanh(), nn.Linear(15, 4)).double()
    x = torch.randn(2000, 20, generator=g, dtype=torch.float64) * torch.logspace(
        -2, 2, 20, dtype=torch.float64
    )
    t = torch.randn(2000, 4, generator=g, dtype=torch.float64)
    flat = FlatParams(model, list(model.parameters()))
    theta = flat.flatten()
    loss = lambda z: sum_squared(z, t)  # noqa: E731
    op = curvature_operator(flat.function((x,)), loss, theta, "ggn")
    kfac = KFAC(model, flat.params, flat.offsets, samples=1, seed=0)
    kfac.update((x,), loss)
    lam = 1e-3
    b = torch.randn(flat.numel, generator=g, dtype=torch.float64)

    def damped(v: torch.Tensor) -> torch.Tensor:
        return op(v) + lam * v

    plain = conjugate_gradient(damped, b, max_iters=3000, tol=0, residual_tol=1e-6)
    pre = conjugate_gradient(
        damped, b, preconditioner=kfac.inverse(lam), max_iters=3000, tol=0, residual_tol=1e-6
    )
    assert plain.reason == pre.reason == "converged"
    assert pre.iters * 3 <= plain.iters, (pre.iters, plain.iters)
    torch.testing.assert_close(pre.x, plain.x, rtol=1e-3, atol=1e-3 * float(plain.x.abs().max()))


def _wide_autoencoder(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """30-60-4-60-30 sigmoid AE on 16 examples: the 60-wide layers are wider than the batch."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(30, 60), nn.Sigmoid(), nn.Linear(60, 4), nn.Linear(4, 60), nn.Sigmoid(), nn.Linear(60, 30)
    ).double()
    x = torch.rand(16, 30, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 30, dtype=torch.float64)
    return model, x


@pytest.mark.parametrize(
    "seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)]
)
def test_default_draws_precondition_like_the_exact_factors_on_wide_layers(seed: int) -> None:
    """Issue 17: with one draw per example G has rank <= B, below a layer's width, and CG got slower.

    Reference: the dense float64 Gauss-Newton matrix from jacrev (not the library's product);
    CG iterations to 99% of the best quadratic-model reduction q*, none / exact factors / default
    draws / one draw.
    """
    model, x = _wide_autoencoder(seed)
    loss = lambda z: sum_squared(z, x)  # noqa: E731
    ggn, flat = dense_ggn(model, x, loss)
    theta = flat.flatten().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(flat.function((x,))(theta)), theta)
    lam = 1e-3
    runs = {
        "none": conjugate_gradient(lambda v: ggn @ v + lam * v, -grad, max_iters=400, tol=0, residual_tol=0)
    }
    factors = {}
    for samples in ("exact", "default", 1):
        kfac = (
            KFAC(model, flat.params, flat.offsets, seed=0)
            if samples == "default"
            else KFAC(model, flat.params, flat.offsets, samples=samples, seed=0)
        )
        kfac.update((x,), loss)
        factors[samples] = kfac.factors((x,), loss)
        runs[samples] = conjugate_gradient(
            lambda v: ggn @ v + lam * v, -grad, preconditioner=kfac.inverse(lam), max_iters=400, tol=0,
            residual_tol=0,
        )  # fmt: skip
    q_best = min(min(r.q_history) for r in runs.values())
    to_q99 = {k: next(i for i, q in enumerate(r.q_history) if q <= 0.99 * q_best) for k, r in runs.items()}
    # the 60-wide layers' G: full rank with the default draws (as exact), rank <= 16 with one draw
    for k in (0, 2):
        g_exact, g_default, g_one = (factors[s][k][1] for s in ("exact", "default", 1))
        assert int(torch.linalg.matrix_rank(g_exact)) == 60
        assert int(torch.linalg.matrix_rank(g_default)) == 60
        assert int(torch.linalg.matrix_rank(g_one)) <= 16
    assert to_q99["default"] <= 2 * to_q99["exact"] + 1, to_q99
    assert to_q99[1] > 3 * to_q99["exact"], to_q99  # the defect the default avoids


def test_hessian_free_with_kfac_trains_and_resumes_exactly(trains_and_resumes) -> None:
    trains_and_resumes(dict(preconditioner="kfac", kfac_every=2, adaptive_cg=True, cg_initial_iters=2,
                            adaptive_curvature=True, curvature_fraction=0.25))  # fmt: skip


def test_bad_preconditioner_settings_rejected(small_net) -> None:
    with pytest.raises(ValueError, match="preconditioner: expected one of"):
        HessianFree(small_net(), F.mse_loss, preconditioner="shampoo")
    with pytest.raises(ValueError, match="kfac_damping"):
        HessianFree(small_net(), F.mse_loss, kfac_damping="tikhonov")
    with pytest.raises(ValueError, match="samples"):
        KFAC(small_net(), [], [0], samples=0)


def test_spec_preconditioner_reaches_the_optimizer(small_net) -> None:
    """train.optimizer.preconditioner / adaptive_cg go to HessianFree; unset ones keep its defaults."""
    from toolkit.spec.train_config import OptimizerConfig
    from toolkit.train.optimizers import make_stepper

    model = small_net()
    cfg = OptimizerConfig(name="hessian_free", preconditioner="diagonal", adaptive_cg=False, cg_max_iters=7,
                          kfac_samples=4)  # fmt: skip
    opt = make_stepper(model, F.mse_loss, list(model.parameters()), cfg).opt
    assert (opt.defaults["preconditioner"], opt.defaults["adaptive_cg"]) == ("diagonal", False)
    assert opt.defaults["kfac_samples"] == 4
    exact = OptimizerConfig(name="hessian_free", kfac_samples="exact")
    assert (
        make_stepper(model, F.mse_loss, list(model.parameters()), exact).opt.defaults["kfac_samples"]
        == "exact"
    )
    assert opt.state_dict()["state"]["hessian_free"]["cg_cap"] == 7
    plain = make_stepper(
        model, F.mse_loss, list(model.parameters()), OptimizerConfig(name="hessian_free")
    ).opt
    defaults = HessianFree(model, F.mse_loss).defaults
    for key in (
        "preconditioner",
        "adaptive_cg",
        "cg_max_iters",
        "preconditioner_alpha",
        "kfac_every",
        "kfac_samples",
    ):
        assert plain.defaults[key] == defaults[key], key
    with pytest.raises(ValueError, match="preconditioner"):
        OptimizerConfig(name="hessian_free", preconditioner="shampoo")
    for bad in (0, -3, "sixteen", True):
        with pytest.raises(ValueError, match="kfac_samples"):
            OptimizerConfig(name="hessian_free", kfac_samples=bad)


def test_inverse_on_a_layer_wider_than_the_batch_is_the_dense_solve(monkeypatch) -> None:
    """A of a 40-input layer from 6 examples has rank ≤ 6: the low-rank path equals the dense solve."""
    import toolkit.optim.kfac as kfac_module

    def full_basis(*args):  # the low-rank path must not fall back on the full eigenbases
        raise AssertionError("full-basis path taken")

    kfac, a, gg, r, idx = _one_linear_exact(5, 40, 5, 6)
    monkeypatch.setattr(kfac_module, "_rotate", full_basis)
    for lam in (1e-4, 0.3, 10.0):
        m = torch.kron(gg, a) + lam * torch.eye(a.shape[0] * gg.shape[0], dtype=torch.float64)
        want = torch.empty_like(r)
        want[idx] = torch.linalg.solve(m, r[idx])
        # R/γ minus a correction of the same size: rounding is relative to the largest entry
        torch.testing.assert_close(
            kfac.inverse(lam)(r), want, rtol=1e-9, atol=1e-12 * float(want.abs().max())
        )


def test_low_rank_inverse_drops_only_directions_below_the_tolerance() -> None:
    """Tiny but nonzero eigenvalues are treated as 0: off from the exact inverse by ≤ tol, relatively."""
    from toolkit.optim.kfac import _LOW_RANK_TOL, _eigen_inverse

    g = torch.Generator().manual_seed(6)
    qa, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    qg, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))
    eig_a = torch.tensor([2.0, 1.0, 0.5] + [1e-9] * 9, dtype=torch.float64)  # kept: 3 of 12
    eig_g = torch.tensor([3.0, 1.0, 0.2, 0.1, 1e-3, 1e-10, 0.0], dtype=torch.float64)  # kept: 5 of 7 (no cut)
    gamma = 1e-3
    a = qa @ torch.diag(eig_a) @ qa.T
    gg = qg @ torch.diag(eig_g) @ qg.T
    mat = torch.randn(7, 12, generator=g, dtype=torch.float64)
    want = torch.linalg.solve(torch.kron(gg, a) + gamma * torch.eye(84, dtype=torch.float64), mat.reshape(-1))
    got = _eigen_inverse(eig_a, qa, eig_g, qg, gamma)(mat).reshape(-1)
    # every dropped direction's scale 1/(g a + γ) became 1/γ: g a ≤ 3e-9 ≪ tol·γ
    assert float((got - want).norm() / want.norm()) <= _LOW_RANK_TOL
    assert float((got - want).norm() / want.norm()) > 0  # the truncation did happen
