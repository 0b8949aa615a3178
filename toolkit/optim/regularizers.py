"""L2, L1 and group-lasso penalties on the flat vector θ, consistent in value, gradient and curvature.

    R(θ) = ½ Σ_j a_j θ_j²  +  Σ_j c_j |θ_j|  +  μ Σ_k ‖θ_{G_k}‖₂  +  ½ Σ_j b_j (θ_j - θ⁰_j)²

- L2 (coefficients a_j, zero on 1-D parameters unless ``l2_on_bias``): gradient a ⊙ θ, curvature
  diag(a), which shifts the damped operator G + λI to G + diag(λ + a) in CG and in the preconditioner.
- L1 (coefficients c_j, same bias rule): handled orthant-wise (OWL-QN, Andrew & Gao 2007): CG
  solves for the pseudo-gradient, the direction and the new point are projected onto the orthant
  of the current point, so coordinates reach exact zeros. It adds no curvature.
- Group lasso (weight μ) over the rank components of factorized layers: group G_k is component k
  (a column of U with its row of V, ``rank_factors()``). For c = θ_{G_k} ≠ 0 the gradient is μ c/‖c‖
  and the curvature μ (I - ĉĉᵀ)/‖c‖ (ĉ = c/‖c‖; PSD), whose diagonal μ(1 - ĉ²)/‖c‖ joins the
  preconditioner. Components whose norm falls under a threshold are pruned by the optimizer.
- L2-SP (coefficients b_j, anchor θ⁰: the pretrained weights; Li, Grandvalet & Davoine 2018): the
  penalty toward the starting point of fine-tuning. Gradient b ⊙ (θ - θ⁰), curvature diag(b), so it
  enters CG and the preconditioner exactly as L2 does.
"""

from __future__ import annotations

import torch


class Regularizer:
    """The penalty R(θ) above on a flat vector of P numbers.

    Args:
        l2: (P,) L2 coefficients a_j.
        l1: (P,) L1 coefficients c_j.
        group_lasso: μ ≥ 0.
        group_pos: (M,) positions in θ that belong to a group (long).
        group_id: (M,) the group of each such position, in [0, n_groups) (long).
        n_groups: number of groups.
        l2_sp: (P,) L2-SP coefficients b_j (None: no L2-SP term).
        anchor: (P,) θ⁰, the point L2-SP pulls toward (required with ``l2_sp``).
    """

    def __init__(
        self,
        l2: torch.Tensor,
        l1: torch.Tensor,
        group_lasso: float = 0.0,
        group_pos: torch.Tensor | None = None,
        group_id: torch.Tensor | None = None,
        n_groups: int = 0,
        l2_sp: torch.Tensor | None = None,
        anchor: torch.Tensor | None = None,
    ) -> None:
        self.l2, self.l1, self.mu = l2, l1, float(group_lasso)
        dev = l2.device
        self.group_pos = group_pos if group_pos is not None else torch.zeros(0, dtype=torch.long, device=dev)
        self.group_id = group_id if group_id is not None else torch.zeros(0, dtype=torch.long, device=dev)
        self.n_groups = n_groups
        self.has_l2 = bool(torch.any(l2 != 0))
        self.has_l1 = bool(torch.any(l1 != 0))
        self.has_group = self.mu > 0 and n_groups > 0
        self.has_l2_sp = l2_sp is not None and bool(torch.any(l2_sp != 0))
        if self.has_l2_sp and (anchor is None or anchor.shape != l2_sp.shape):  # type: ignore[union-attr]
            raise ValueError("l2_sp: expected an anchor θ⁰ of the same shape as the coefficients")
        self.l2_sp: torch.Tensor = l2_sp if l2_sp is not None and self.has_l2_sp else torch.zeros_like(l2)
        self.anchor: torch.Tensor = anchor if anchor is not None and self.has_l2_sp else torch.zeros_like(l2)
        # L2 and L2-SP add the same kind of curvature: diag(a + b)
        self.quad = self.l2 + self.l2_sp
        self.has_quad = self.has_l2 or self.has_l2_sp

    # group lasso helpers
    def group_norms(self, theta: torch.Tensor) -> torch.Tensor:
        """(n_groups,) Euclidean norm of each group."""
        sq = torch.zeros(self.n_groups, dtype=theta.dtype, device=theta.device)
        sq.index_add_(0, self.group_id, theta[self.group_pos].pow(2))
        return sq.sqrt()

    def _unit_and_inv_norm(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        norms = self.group_norms(theta)  # (K,)
        inv = torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(theta.dtype).tiny), 0.0)  # (K,)
        unit = theta[self.group_pos] * inv[self.group_id]  # (M,)
        return unit, inv

    def value(self, theta: torch.Tensor) -> torch.Tensor:
        """R(θ), a scalar tensor."""
        out = theta.new_zeros(())
        if self.has_l2:
            out = out + 0.5 * (self.l2 * theta.pow(2)).sum()
        if self.has_l1:
            out = out + (self.l1 * theta.abs()).sum()
        if self.has_group:
            out = out + self.mu * self.group_norms(theta).sum()
        if self.has_l2_sp:
            out = out + 0.5 * (self.l2_sp * (theta - self.anchor).pow(2)).sum()
        return out

    def smooth_grad(self, theta: torch.Tensor) -> torch.Tensor:
        """Gradient of the L2 and group-lasso terms (the L1 term is handled orthant-wise), (P,)."""
        g = self.l2 * theta if self.has_l2 else torch.zeros_like(theta)
        if self.has_l2_sp:
            g = g + self.l2_sp * (theta - self.anchor)
        if self.has_group:
            unit, _ = self._unit_and_inv_norm(theta)
            g = g.index_add(0, self.group_pos, self.mu * unit)
        return g

    def curvature_diag(self, theta: torch.Tensor) -> torch.Tensor:
        """Diagonal of the penalty's curvature, (P,)."""
        d = self.quad.clone() if self.has_quad else torch.zeros_like(theta)
        if self.has_group:
            unit, inv = self._unit_and_inv_norm(theta)
            d = d.index_add(0, self.group_pos, self.mu * (1 - unit.pow(2)) * inv[self.group_id])
        return d

    def curvature_product(self, theta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Precomputed pieces for ``apply_curvature`` at θ: (unit vectors (M,), 1/‖c‖ (K,))."""
        if not self.has_group:
            return ()
        return self._unit_and_inv_norm(theta)

    def apply_curvature(self, pieces: tuple[torch.Tensor, ...], v: torch.Tensor) -> torch.Tensor:
        """The penalty's curvature times v, (P,), from ``curvature_product(θ)``."""
        out = self.quad * v if self.has_quad else torch.zeros_like(v)
        if self.has_group and pieces:
            unit, inv = pieces
            vg = v[self.group_pos]  # (M,)
            proj = torch.zeros_like(inv).index_add_(0, self.group_id, unit * vg)  # ĉᵀv per group, (K,)
            hv = self.mu * inv[self.group_id] * (vg - unit * proj[self.group_id])  # (M,)
            out = out.index_add(0, self.group_pos, hv)
        return out

    # L1, orthant-wise
    def pseudo_gradient(self, theta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """OWL-QN pseudo-gradient of f + Σ c|θ| given ∇f = g, (P,): the minimum-norm subgradient."""
        if not self.has_l1:
            return g
        c = self.l1
        right, left = g + c, g - c  # one-sided derivatives at θ_j = 0
        at_zero = torch.where(right < 0, right, torch.where(left > 0, left, torch.zeros_like(g)))
        return torch.where(theta != 0, g + c * torch.sign(theta), at_zero)

    def orthant(self, theta: torch.Tensor, pg: torch.Tensor) -> torch.Tensor:
        """The orthant ξ of the step: sign(θ) where θ ≠ 0, else sign(-pseudo-gradient)."""
        return torch.where(theta != 0, torch.sign(theta), -torch.sign(pg))

    def project_direction(self, p: torch.Tensor, pg: torch.Tensor) -> torch.Tensor:
        """Zero the L1 coordinates of a direction that disagree in sign with -pseudo-gradient."""
        if not self.has_l1:
            return p
        bad = (self.l1 != 0) & (p * pg >= 0)
        return torch.where(bad, torch.zeros_like(p), p)

    def project_point(self, theta_new: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        """Zero the L1 coordinates of a new point that left the orthant ξ."""
        if not self.has_l1:
            return theta_new
        bad = (self.l1 != 0) & (theta_new * xi <= 0)
        return torch.where(bad, torch.zeros_like(theta_new), theta_new)
