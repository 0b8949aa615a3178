"""Levenberg-Marquardt damping and the Armijo backtracking line search.

Reduction ratio of a step p:  ρ = (F(θ + p) - F(θ)) / (q(p) - q(0)), with q the (undamped) quadratic
model the step was computed from. Levenberg-Marquardt (Martens 2010):
ρ < 1/4 ⇒ λ ← λ·3/2;  ρ > 3/4 ⇒ λ ← λ·2/3;  λ stays in [min_damping, max_damping].

Armijo: the largest α ∈ {1, β, β², …} with F(θ + α p) ≤ F(θ) + c α gᵀp (c = 10⁻², β = 0.8 by default),
α = 0 when none of ``max_tries`` candidates qualifies (the step is rejected).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class LevenbergMarquardt:
    """The λ update rule; see the module docstring."""

    lower: float = 0.25
    upper: float = 0.75
    increase: float = 1.5
    decrease: float = 2.0 / 3.0
    min_damping: float = 1e-8
    max_damping: float = 1e8

    def update(self, damping: float, rho: float) -> float:
        """The next λ from the current one and the reduction ratio ρ (NaN counts as a failure)."""
        if not rho >= self.lower:  # also NaN / -inf
            damping *= self.increase
        elif rho > self.upper:
            damping *= self.decrease
        return min(max(damping, self.min_damping), self.max_damping)


def reduction_ratio(f_new: float, f_old: float, predicted: float) -> float:
    """ρ = (f_new - f_old) / predicted; -inf when the model predicts no decrease or f_new is not finite."""
    if not math.isfinite(f_new) or not predicted < 0:
        return -math.inf
    return (f_new - f_old) / predicted


def armijo(
    objective: Callable[[float], float],
    f0: float,
    slope: float,
    c: float = 1e-2,
    shrink: float = 0.8,
    max_tries: int = 20,
    f_at_one: float | None = None,
) -> tuple[float, float]:
    """Backtracking line search along a direction.

    Args:
        objective: α ↦ F(θ + α p) (non-finite values count as failures).
        f0: F(θ).
        slope: directional derivative gᵀp (negative for a descent direction).
        c: sufficient-decrease constant.
        shrink: factor β applied to α after each failure.
        max_tries: candidates tried, α = 1 first.
        f_at_one: F(θ + p) if already known (saves one evaluation).

    Returns:
        (α, F(θ + α p)); (0.0, f0) when no candidate qualifies.
    """
    alpha = 1.0
    for k in range(max_tries):
        f = f_at_one if (k == 0 and f_at_one is not None) else objective(alpha)
        if math.isfinite(f) and f <= f0 + c * alpha * min(slope, 0.0):
            return alpha, f
        alpha *= shrink
    return 0.0, f0
