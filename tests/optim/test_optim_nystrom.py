"""The randomized Nyström preconditioner against dense float64 linear algebra."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from toolkit.optim import HessianFree
from toolkit.optim.cg import conjugate_gradient
from toolkit.optim.nystrom import Nystrom


def _psd(n: int, eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * eigenvalues) @ q.T


def test_the_sketch_is_the_nystrom_formula_with_its_test_matrix() -> None:
    """Ĉ = Y (Ωᵀ Y)⁻¹ Yᵀ (dense pinv) with the Ω the sketch drew; and a matrix of rank ≤ k is recovered."""
    n, k = 120, 25
    a = _psd(n, torch.logspace(2, -4, n, dtype=torch.float64))
    sketch = Nystrom(k, seed=3)
    sketch.update(lambda v: a @ v, torch.zeros(n, dtype=torch.float64))
    omega = torch.randn(n, k, generator=torch.Generator().manual_seed(3), dtype=torch.float32).double()
    omega = omega / math.sqrt(n)
    y = a @ omega
    want = y @ torch.linalg.pinv(omega.T @ y) @ y.T
    torch.testing.assert_close(sketch.approximation(), want, rtol=0, atol=1e-9 * float(a.norm()))

    low = _psd(n, torch.cat([torch.logspace(3, 0, 20, dtype=torch.float64), torch.zeros(n - 20)]))
    exact = Nystrom(k)
    exact.update(lambda v: low @ v, torch.zeros(n, dtype=torch.float64))
    torch.testing.assert_close(exact.approximation(), low, rtol=0, atol=1e-9 * float(low.norm()))
    u = exact.vectors
    torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=torch.float64), rtol=0, atol=1e-10)


def test_inverse_is_the_dense_preconditioner_and_cg_needs_few_iterations() -> None:
    """P⁻¹ = (Λ_k + μ) U (Λ + μ)⁻¹ Uᵀ + I − U Uᵀ; on rank ≤ k curvature PCG converges in ≤ 3 iterations."""
    n, k, mu = 200, 30, 1e-3
    a = _psd(n, torch.cat([torch.logspace(4, -1, 24, dtype=torch.float64), torch.zeros(n - 24)]), seed=1)
    sketch = Nystrom(k)
    sketch.update(lambda v: a @ v, torch.zeros(n, dtype=torch.float64))
    u, lam = sketch.vectors, sketch.values
    eye = torch.eye(n, dtype=torch.float64)
    want = (lam[-1] + mu) * u @ torch.diag(1 / (lam + mu)) @ u.T + eye - u @ u.T
    r = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(sketch.inverse(mu)(r), want @ r, rtol=1e-10, atol=1e-12)

    def damped(v: torch.Tensor) -> torch.Tensor:
        return a @ v + mu * v

    kw = dict(max_iters=500, tol=0, residual_tol=1e-8)
    plain = conjugate_gradient(damped, r, **kw)
    pre = conjugate_gradient(damped, r, preconditioner=sketch.inverse(mu), **kw)
    assert pre.reason == "converged" and pre.iters <= 3, pre
    assert plain.iters > 10 * pre.iters, (plain.iters, pre.iters)
    torch.testing.assert_close(pre.x, torch.linalg.solve(a + mu * eye, r), rtol=1e-6, atol=1e-8)


def test_bad_rank_and_use_before_update_are_refused() -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="rank"):
            Nystrom(bad)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="update"):
        Nystrom(3).inverse(0.1)


def test_hessian_free_with_nystrom_trains_and_resumes_exactly(trains_and_resumes, small_net) -> None:
    settings = dict(preconditioner="nystrom", nystrom_rank=8, kfac_every=2, curvature_fraction=0.25)
    state = trains_and_resumes(settings)
    assert state["state"]["hessian_free"]["nystrom"][0].shape == (26, 8)  # U of the 26 parameters
    with pytest.raises(ValueError, match="nystrom_rank"):
        HessianFree(small_net(), F.mse_loss, preconditioner="nystrom", nystrom_rank=0)


def test_spec_nystrom_settings_reach_the_optimizer(small_net) -> None:
    from toolkit.spec.train_config import OptimizerConfig
    from toolkit.train.optimizers import make_stepper

    model = small_net()
    cfg = OptimizerConfig(name="hessian_free", preconditioner="nystrom", nystrom_rank=12)
    opt = make_stepper(model, F.mse_loss, list(model.parameters()), cfg).opt
    assert (opt.defaults["preconditioner"], opt.defaults["nystrom_rank"]) == ("nystrom", 12)
    with pytest.raises(ValueError, match="nystrom_rank"):
        OptimizerConfig(name="hessian_free", nystrom_rank=0)
