"""Adaptive budgets of a Hessian-free step: the CG iteration cap and the curvature batch.

CG cap (Martens 2010 §4.6, Martens & Sutskever 2012): early in training a short CG run is enough
(the damping is large and the quadratic model is only trusted nearby); late in training, with λ
small, the useful CG runs get long. The cap therefore starts at ``initial`` and grows by ``growth``
after every step whose CG was stopped by the cap while the model was trustworthy (ρ ≥ 1/4), up to
``maximum``; it never shrinks (Martens' progress rule still stops CG early when it stalls).

Curvature batch: compare the gradient's sampling noise with its size (the "norm test" of Byrd,
Chin, Nocedal & Wu 2012). With the gradient batch split into two halves of n₁ and n₂ examples and
their mean gradients g₁, g₂, the variance of the full-batch mean ḡ is estimated without bias by

    V = ‖g₁ - g₂‖² · n₁ n₂ / (n₁ + n₂)²,      ν = V / ‖ḡ‖²  (noise-to-signal ratio),

smoothed by an exponential moving average. While ν ≥ ``target`` the gradient is noisy and a small
curvature batch (``fraction``) is all it can use; as ν falls below the target, the gradient becomes
precise and the curvature estimate is what limits the step, so the curvature batch grows as
fraction · √(target / ν), up to ``max_fraction``.

Both are plain objects with ``state_dict`` / ``load_state_dict`` so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class CGBudget:
    """The CG iteration cap; see the module docstring.

    Attributes:
        initial: the first cap (≥ 1).
        maximum: the largest cap (≥ initial).
        growth: factor applied after a step that hit the cap with ρ ≥ 1/4 (> 1).
        cap: the current cap.
    """

    initial: int
    maximum: int
    growth: float = 1.3
    cap: int = 0

    def __post_init__(self) -> None:
        if self.initial < 1 or self.maximum < self.initial or not self.growth > 1:
            raise ValueError(
                f"CGBudget: expected 1 <= initial <= maximum and growth > 1, got "
                f"{self.initial}, {self.maximum}, {self.growth}"
            )
        self.cap = self.cap or self.initial

    def update(self, iters: int, reason: str, rho: float) -> int:
        """Grow the cap after a step whose CG ran into it with a trustworthy model; returns the cap."""
        if reason == "max_iters" and iters >= self.cap and rho >= 0.25:
            self.cap = min(self.maximum, max(self.cap + 1, math.ceil(self.cap * self.growth)))
        return self.cap

    def state_dict(self) -> dict[str, Any]:
        return {"cap": self.cap}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cap = int(state["cap"])


def gradient_noise(g1: torch.Tensor, g2: torch.Tensor, n1: int, n2: int) -> float:
    """ν = V / ‖ḡ‖² from the mean gradients of two disjoint halves (see the module docstring).

    Args:
        g1, g2: mean gradients over n1 and n2 examples (P,).
        n1, n2: the halves' sizes (≥ 1 each).

    Returns:
        The noise-to-signal ratio (inf when ḡ = 0).
    """
    n = n1 + n2
    g = (n1 * g1 + n2 * g2) / n
    var = float((g1 - g2).pow(2).sum()) * n1 * n2 / n**2
    sq = float(g.pow(2).sum())
    return var / sq if sq > 0 else math.inf


@dataclass
class CurvatureBudget:
    """The curvature batch as a fraction of the gradient batch; see the module docstring.

    Attributes:
        fraction: the smallest fraction (used while the gradient is noisy), in (0, 1].
        max_fraction: the largest fraction, in [fraction, 1].
        target: the noise ratio ν below which the curvature batch grows (> 0).
        decay: EMA coefficient of ν, in [0, 1).
        noise: the smoothed ν (NaN before the first observation).
    """

    fraction: float
    max_fraction: float = 1.0
    target: float = 1.0
    decay: float = 0.7
    noise: float = math.nan

    def __post_init__(self) -> None:
        if (
            not (0 < self.fraction <= self.max_fraction <= 1)
            or not self.target > 0
            or not 0 <= self.decay < 1
        ):
            raise ValueError(
                "CurvatureBudget: expected 0 < fraction <= max_fraction <= 1, target > 0, 0 <= decay < 1, got "
                f"{self.fraction}, {self.max_fraction}, {self.target}, {self.decay}"
            )

    def observe(self, noise: float) -> float:
        """Fold one ν into the average (non-finite values are ignored); returns the new fraction."""
        if math.isfinite(noise):
            self.noise = (
                noise if math.isnan(self.noise) else self.decay * self.noise + (1 - self.decay) * noise
            )
        return self.current()

    def current(self) -> float:
        """The curvature fraction for the next step."""
        if math.isnan(self.noise) or self.noise >= self.target:
            return self.fraction
        grown = self.fraction * math.sqrt(self.target / max(self.noise, 1e-30))
        return min(self.max_fraction, grown)

    def state_dict(self) -> dict[str, Any]:
        return {"noise": self.noise}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.noise = float(state["noise"])
