"""Martens' diagonal preconditioner from per-example gradients.

    M = (d + λ + d_reg)^α,   d = (1/B) Σ_i g_i ⊙ g_i   (g_i = ∇_θ ℓ_i, the per-example gradient)

d is the diagonal of the empirical Fisher; d_reg is the diagonal of the regularizers' curvature
(L2 coefficients, group-lasso blocks). Per-example gradients come from ``torch.func.vmap`` over
``torch.func.grad``, in chunks so that at most ``max_elements`` numbers are materialized at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad, vmap
from torch.utils._pytree import tree_map

from toolkit.optim.distributed import mean_across


def squared_gradient_diagonal(
    fn: Callable[[torch.Tensor, tuple[Any, ...]], Any],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    theta: torch.Tensor,
    inputs: tuple[Any, ...],
    targets: Any,
    max_elements: int = 2**24,
) -> torch.Tensor:
    """(1/B) Σ_i g_i ⊙ g_i over the examples of a batch, averaged across processes.

    Args:
        fn: (θ, inputs) ↦ model outputs for a batch.
        loss_fn: (outputs, targets) ↦ batch-mean loss; called here on batches of one example.
        theta: the point (P,).
        inputs: tuple of tensors with a leading batch axis B.
        targets: tensor (or pytree) with a leading batch axis B.
        max_elements: bound on chunk·P, the per-example gradients held at once.

    Returns:
        The diagonal d, shape (P,).
    """
    theta = theta.detach()

    def per_example_loss(th: torch.Tensor, x: tuple[Any, ...], t: Any) -> torch.Tensor:
        xb = tree_map(lambda a: a.unsqueeze(0), x)  # a batch of one example
        tb = tree_map(lambda a: a.unsqueeze(0), t)
        return loss_fn(fn(th, xb), tb)

    g_fn = vmap(grad(per_example_loss), in_dims=(None, 0, 0))
    batch = inputs[0].shape[0]
    chunk = max(1, min(batch, max_elements // max(1, theta.numel())))
    total = torch.zeros_like(theta)
    for start in range(0, batch, chunk):
        rows = slice(start, start + chunk)
        x = tree_map(lambda a, rows=rows: a[rows], inputs)
        t = tree_map(lambda a, rows=rows: a[rows], targets)
        g = g_fn(theta, x, t)  # (chunk, P)
        total += g.pow(2).sum(0)
    return mean_across(total / batch)


def preconditioner(diagonal: torch.Tensor, shift: torch.Tensor | float, alpha: float) -> torch.Tensor:
    """M = (diagonal + shift)^α, shape (P,); CG applies M⁻¹ r elementwise."""
    return (diagonal + shift).clamp_min(torch.finfo(diagonal.dtype).tiny).pow(alpha)
