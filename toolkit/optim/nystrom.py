"""Randomized Nyström preconditioner for CG on the damped curvature system (C + μ I) p = b.

Layer-wise preconditioners (K-FAC, EKFAC, even the exact inverse of the layer blocks) cannot act on
the coupling between layers, and on the benchmark's autoencoders that is where CG spends its
iterations (docs/benchmarks/optim.md, section 4). The Nyström preconditioner ignores layers: it
takes the top of C's spectrum from k products with a random test matrix (Frangella, Tropp & Udell,
"Randomized Nyström preconditioning", SIAM J. Matrix Anal. Appl. 2023, Algorithms 2.1 and 5.1):

    Ω ∈ ℝ^{P×k} orthonormal random,   Y = C Ω   (k curvature products),
    C ≈ Ĉ = Y (Ωᵀ Y)⁺ Yᵀ = U diag(Λ) Uᵀ,   computed stably with a shift ν = √P·eps·‖Y‖,
    P⁻¹ = (Λ_k + μ) U (Λ + μ)⁻¹ Uᵀ + (I − U Uᵀ),

so that the preconditioned system has its top k eigenvalues pressed down to about Λ_k + μ: its
condition number falls from λ_max(C)/μ to about (Λ_k + μ)/μ. The sketch is of the undamped
curvature; μ (the damping, which changes every step) enters only the apply, so one sketch serves
several outer steps. The factorization is done in float64 whatever the parameters' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# Σ² below this fraction of the largest is lost to rounding in B's dtype (its Gram squares κ)
_GRAM_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


class Nystrom:
    """A rank-``rank`` Nyström approximation U diag(Λ) Uᵀ of a PSD operator, and its preconditioner.

    Args:
        rank: k, the number of curvature products per sketch (≥ 1; capped at the dimension).
        seed: seed of the random test matrix when no generator is given to ``update``.

    Raises:
        ValueError: rank < 1.
    """

    def __init__(self, rank: int, seed: int = 0) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank: expected a count >= 1, got {rank!r}")
        self.rank = rank
        self.generator = torch.Generator().manual_seed(int(seed))
        self.vectors: torch.Tensor | None = None  # U (P, k)
        self.values: torch.Tensor | None = None  # Λ (k,), descending, ≥ 0

    @property
    def ready(self) -> bool:
        """Whether a sketch has been taken."""
        return self.vectors is not None

    def update(self, matvec: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor) -> None:
        """Sketch the PSD operator ``matvec`` (vectors shaped like ``like``) with k products.

        The tall (P, k) work stays in ``like``'s dtype; only k×k matrices are factorized, in float64.
        Ω is Gaussian scaled by 1/√P (orthonormal up to about √(k/P), and Ĉ does not depend on
        Ω's basis: Y (ΩᵀY)⁺ Yᵀ is unchanged by Ω → Ω R), so it needs no QR.
        """
        n = like.numel()
        k = min(self.rank, n)
        omega = torch.randn(n, k, generator=self.generator, dtype=torch.float32)
        omega = (omega / math.sqrt(n)).to(dtype=like.dtype, device=like.device)
        y = torch.stack([matvec(omega[:, j]).reshape(-1) for j in range(k)], dim=1)  # (P, k)
        norm = math.sqrt(max(float(torch.linalg.eigvalsh((y.T @ y).double())[-1]), 0.0))  # ‖Y‖₂
        nu = math.sqrt(n) * torch.finfo(like.dtype).eps * max(norm, 1e-30)
        for _ in range(8):  # the shift makes ΩᵀY_ν positive definite; rounding may need a larger one
            y_nu = y + nu * omega
            core = (omega.T @ y_nu).double()
            chol, info = torch.linalg.cholesky_ex(0.5 * (core + core.T))
            if int(info) == 0:
                break
            nu *= 10.0
        else:
            raise RuntimeError("Nystrom.update: the sketch is not positive definite (is the operator PSD?)")
        b = torch.linalg.solve_triangular(chol.to(like.dtype), y_nu.T, upper=False).T  # Y_ν L⁻ᵀ (P, k)
        sq, vec = torch.linalg.eigh((b.T @ b).double())  # B = U Σ Vᵀ: Σ² and V from the k×k Gram
        sq, vec = sq.flip(0), vec.flip(1)
        keep = sq > _GRAM_TOL[like.dtype] * float(sq[0])  # directions the tall dtype resolves
        sq, vec = sq[keep], vec[:, keep]
        self.vectors = b @ (vec / sq.sqrt()).to(like.dtype)  # U = B V Σ⁻¹ (P, k')
        self.values = (sq - nu).clamp_min(0).to(dtype=like.dtype, device=like.device)

    def approximation(self) -> torch.Tensor:
        """The dense Ĉ = U diag(Λ) Uᵀ (for tests and small problems)."""
        if self.vectors is None or self.values is None:
            raise RuntimeError("Nystrom.approximation: call update() first")
        return self.vectors @ torch.diag(self.values) @ self.vectors.T

    def inverse(self, damping: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """r ↦ P⁻¹ r = (Λ_k + μ) U (Λ + μ)⁻¹ Uᵀ r + r − U Uᵀ r with μ = ``damping`` > 0.

        Raises:
            RuntimeError: ``update`` was never called.
        """
        if self.vectors is None or self.values is None:
            raise RuntimeError("Nystrom.inverse: call update() first")
        u, lam = self.vectors, self.values
        mu = max(float(damping), 1e-30)
        scale = (float(lam[-1]) + mu) / (lam + mu) - 1.0  # (k,): P⁻¹ = I + U diag(scale) Uᵀ

        def apply(r: torch.Tensor) -> torch.Tensor:
            return r + u @ (scale * (u.T @ r))

        return apply
