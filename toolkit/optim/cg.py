"""Preconditioned conjugate gradient with Martens' (2010) stopping rule and iterate grid.

Minimizes the quadratic q(x) = ½ xᵀA x - bᵀx (A symmetric, positive definite where it matters),
i.e. solves A x = b, with a preconditioner M (CG runs on M⁻¹ r): a diagonal (a vector) or any
symmetric positive definite map r ↦ M⁻¹ r (e.g. Kronecker-factored blocks, ``toolkit.optim.kfac``):

- q is tracked for free: q(x) = -½ xᵀ(b + r) with the residual r = b - A x;
- stop after iteration i ≥ min_iters when q(x_i) < 0 and
  (q(x_i) - q(x_{i-k})) / q(x_i) < k·tol with k = max(10, ⌈0.1 i⌉) (relative progress stalls);
- stop at max_iters, on non-positive (or non-finite) curvature pᵀA p ≤ 0, once ‖r‖ ≤ residual_tol·‖b‖,
  or when the caller's ``stop(i, q(x_i), ‖r_i‖)`` says so;
- warm start from x0; if q(x0) > 0 the warm start is dropped and CG starts from 0;
- iterates at i = ⌈γ^j⌉ (γ = 1.3) and the last one are kept, for backtracking by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from toolkit.errors import InputError


@dataclass
class CGResult:
    """Outcome of a CG run.

    Attributes:
        x: the last iterate (P,).
        iterates: kept iterates as (iteration, x, q(x)), increasing iteration, the last one included.
        iters: iterations run (curvature-vector products, the warm-start product excluded).
        reason: why CG stopped: "progress", "max_iters", "nonpositive_curvature", "converged",
            "stopped" (the caller's ``stop``).
        q_history: q(x_i) for every iteration i = 0..iters (q(x_0) = 0 without a warm start).
        residual_history: ‖r_i‖ = ‖b - A x_i‖ (as CG updates it) for i = 0..iters.
    """

    x: torch.Tensor
    iterates: list[tuple[int, torch.Tensor, float]] = field(default_factory=list)
    iters: int = 0
    reason: str = "max_iters"
    q_history: list[float] = field(default_factory=list)
    residual_history: list[float] = field(default_factory=list)


def _grid(gamma: float, max_iters: int) -> set[int]:
    out: set[int] = set()
    j = 0
    while True:
        i = math.ceil(gamma**j)
        if i > max_iters:
            return out
        out.add(i)
        j += 1


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: torch.Tensor | None = None,
    preconditioner: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_iters: int = 100,
    min_iters: int = 1,
    tol: float = 5e-4,
    grid: float = 1.3,
    residual_tol: float = 1e-10,
    stop: Callable[[int, float, float], bool] | None = None,
) -> CGResult:
    """Solve A x = b approximately with preconditioned CG (see the module docstring).

    Args:
        matvec: v ↦ A v, (P,) -> (P,).
        b: right-hand side (P,).
        x0: warm start (P,) or None for zero.
        preconditioner: the diagonal of M (P,), positive; or a callable r ↦ M⁻¹ r (SPD); or None
            for M = I.
        max_iters: iteration cap (≥ 1).
        min_iters: no progress-based stop before this iteration.
        tol: ε of the relative-progress rule; 0 disables it.
        grid: ratio γ > 1 of the geometric grid of kept iterates.
        residual_tol: stop ("converged") once ‖r‖ ≤ residual_tol·‖b‖.
        stop: (i, q(x_i), ‖r_i‖) ↦ whether to stop ("stopped") after iteration i; None: never.

    Returns:
        A CGResult.

    Raises:
        ValueError: shapes differ or a setting is out of range.
    """
    if b.dim() != 1:
        raise ValueError(f"b: expected a vector, got shape {tuple(b.shape)}")
    if max_iters < 1 or min_iters < 0 or tol < 0 or grid <= 1:
        raise InputError(
            f"expected max_iters >= 1, min_iters >= 0, tol >= 0, grid > 1, got {max_iters}, {min_iters}, {tol}, {grid}"
        )
    for name, t in (("x0", x0), ("preconditioner", preconditioner)):
        if isinstance(t, torch.Tensor) and t.shape != b.shape:
            raise ValueError(f"{name}: expected shape {tuple(b.shape)}, got {tuple(t.shape)}")

    def solve_m(r: torch.Tensor) -> torch.Tensor:
        if preconditioner is None:
            return r
        if callable(preconditioner):
            return preconditioner(r)
        return r / preconditioner

    if x0 is not None and bool(torch.any(x0 != 0)):
        x = x0.clone()
        r = b - matvec(x)
        q0 = -0.5 * float(x.dot(b + r))
        if not math.isfinite(q0) or q0 > 0:
            x, r, q0 = torch.zeros_like(b), b.clone(), 0.0
    else:
        x, r, q0 = torch.zeros_like(b), b.clone(), 0.0

    keep = _grid(grid, max_iters)
    r_stop = residual_tol * float(b.norm())
    result = CGResult(x=x, iterates=[(0, x.clone(), q0)], q_history=[q0], residual_history=[float(r.norm())])
    qs = [q0]  # q(x_i), index i
    y = solve_m(r)
    p = y.clone()
    ry = float(r.dot(y))
    if ry == 0.0:
        result.reason = "converged"
        return result
    i = 0
    for i in range(1, max_iters + 1):
        ap = matvec(p)
        pap = float(p.dot(ap))
        if not math.isfinite(pap) or pap <= 0.0:
            result.reason = "nonpositive_curvature"
            i -= 1
            break
        a = ry / pap
        x = x + a * p
        r = r - a * ap
        q = -0.5 * float(x.dot(b + r))
        qs.append(q)
        r_norm = float(r.norm())
        result.residual_history.append(r_norm)
        if i in keep:
            result.iterates.append((i, x.clone(), q))
        if stop is not None and stop(i, q, r_norm):
            result.reason = "stopped"
            break
        k = max(10, math.ceil(0.1 * i))
        if tol > 0 and i >= min_iters and i > k and q < 0 and (q - qs[i - k]) / q < k * tol:
            result.reason = "progress"
            break
        y = solve_m(r)
        ry_new = float(r.dot(y))
        if r_norm <= r_stop or ry_new <= 0.0 or not math.isfinite(ry_new):
            result.reason = "converged"
            break
        p = y + (ry_new / ry) * p
        ry = ry_new
    else:
        i = max_iters
        result.reason = "max_iters"
    result.x, result.iters, result.q_history = x, i, qs
    if result.iterates[-1][0] != i:
        result.iterates.append((i, x.clone(), qs[i]))
    return result
