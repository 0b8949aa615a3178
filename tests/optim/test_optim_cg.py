"""Conjugate gradient against torch.linalg.solve on SPD systems."""

from __future__ import annotations

import pytest
import torch

from toolkit.optim.cg import conjugate_gradient


def _spd(n: int, cond: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    d = torch.rand(n, generator=g, dtype=torch.float64) * 10 + 0.1  # badly scaled rows/cols
    return d[:, None] * (q @ torch.diag(eig) @ q.T) * d[None, :]


@pytest.mark.parametrize("precondition", [False, True])
@pytest.mark.parametrize("warm", [False, True])
def test_cg_matches_solve(precondition: bool, warm: bool) -> None:
    a = _spd(30, 1e3, 0)
    b = torch.randn(30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m = torch.diagonal(a) if precondition else None
    x0 = 0.01 * torch.ones(30, dtype=torch.float64) if warm else None
    res = conjugate_gradient(lambda v: a @ v, b, x0=x0, preconditioner=m, max_iters=300, tol=0.0)
    expected = torch.linalg.solve(a, b)
    torch.testing.assert_close(res.x, expected, rtol=1e-7, atol=1e-9)
    # q(x) tracked by CG equals ½xᵀAx - bᵀx
    i, x, q = res.iterates[-1]
    assert i == res.iters
    torch.testing.assert_close(
        torch.tensor(q, dtype=torch.float64), 0.5 * x @ a @ x - b @ x, rtol=1e-9, atol=1e-12
    )


def test_preconditioner_speeds_up_badly_scaled_system() -> None:
    a = _spd(40, 10.0, 2)
    b = torch.ones(40, dtype=torch.float64)
    plain = conjugate_gradient(lambda v: a @ v, b, max_iters=200, tol=0.0)
    pre = conjugate_gradient(lambda v: a @ v, b, preconditioner=torch.diagonal(a), max_iters=200, tol=0.0)
    assert pre.iters < plain.iters


def test_cg_stops_on_negative_curvature_and_keeps_grid() -> None:
    a = torch.diag(torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64))
    b = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    res = conjugate_gradient(lambda v: a @ v, b, max_iters=10)
    assert res.reason == "nonpositive_curvature"
    assert [i for i, _, _ in res.iterates] == sorted({i for i, _, _ in res.iterates})


def test_cg_progress_rule_stops_early() -> None:
    a = _spd(200, 1e6, 3)
    b = torch.randn(200, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    res = conjugate_gradient(lambda v: a @ v, b, max_iters=1000, tol=5e-2)
    assert res.reason == "progress" and res.iters < 1000
    kept = [i for i, _, _ in res.iterates]
    assert kept[:5] == [0, 1, 2, 3, 4] and kept[-1] == res.iters


def test_cg_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="preconditioner: expected shape"):
        conjugate_gradient(lambda v: v, torch.ones(3), preconditioner=torch.ones(4))


@pytest.mark.parametrize("warm", [False, True])
def test_histories_match_the_kept_iterates(warm: bool) -> None:
    a = _spd(25, 1e3, 3)
    b = torch.randn(25, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x0 = 0.01 * torch.ones(25, dtype=torch.float64) if warm else None
    res = conjugate_gradient(lambda v: a @ v, b, x0=x0, preconditioner=torch.diagonal(a), max_iters=40, tol=0)
    assert len(res.q_history) == len(res.residual_history) == res.iters + 1
    for i, x, q in res.iterates:  # recomputed densely from the kept iterates
        assert q == res.q_history[i]
        want_q = float(0.5 * x @ a @ x - b @ x)
        assert res.q_history[i] == pytest.approx(want_q, rel=1e-9, abs=1e-12)
        assert res.residual_history[i] == pytest.approx(float((b - a @ x).norm()), rel=1e-6, abs=1e-12)


def test_stop_predicate_ends_cg_where_it_says_with_the_same_iterates() -> None:
    """``stop`` sees (i, q, ‖r‖) of every iteration; stopping at i is a run capped at i (same x, same histories)."""
    a = _spd(40, 1e4, 3)
    b = torch.randn(40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    full = conjugate_gradient(lambda v: a @ v, b, max_iters=60, tol=0.0, residual_tol=0.0)
    seen: list[tuple[int, float, float]] = []

    def stop(i: int, q: float, r: float) -> bool:
        seen.append((i, q, r))
        return i == 17

    part = conjugate_gradient(lambda v: a @ v, b, max_iters=60, tol=0.0, residual_tol=0.0, stop=stop)
    assert (part.reason, part.iters) == ("stopped", 17)
    assert [i for i, _, _ in seen] == list(range(1, 18))
    assert [q for _, q, _ in seen] == full.q_history[1:18]
    assert [r for _, _, r in seen] == full.residual_history[1:18]
    capped = conjugate_gradient(lambda v: a @ v, b, max_iters=17, tol=0.0, residual_tol=0.0)
    torch.testing.assert_close(part.x, capped.x, rtol=0, atol=0)
    assert [i for i, *_ in part.iterates] == [i for i, *_ in capped.iterates]
