"""Curvature-vector products through torch.func: Gauss-Newton, exact Hessian, empirical Fisher.

With network outputs z = f(θ) on the curvature batch, J = ∂z/∂θ and the batch-mean loss L(z):

- Gauss-Newton (``"ggn"``):  G v = Jᵀ H_L J v,  H_L = ∂²L/∂z² (PSD for a loss convex in z).
  The linearization is built once per outer step and reused by every CG iteration: by default one
  forward graph z(θ) plus the graph of g(u) = Jᵀu (a create_graph backward at u = 0); then
  J v = ∂(vᵀ g(u))/∂u (a backward through the backward: the flops of a linearized forward) and
  Jᵀ w (a backward through the retained forward). Alternatives: ``torch.func.linearize`` (the
  linearized forward traced by make_fx; same per-product flops, but tracing costs seconds per
  outer step) or ``torch.func.jvp`` at every product (redoes the forward), each with a
  ``torch.func.vjp`` for Jᵀ w. H_L u is a vjp of ∂L/∂z (cheap: L alone, no network).
- Hessian (``"hessian"``):  H v = vjp of ∇L at θ applied to v (H symmetric; reverse-over-reverse,
  graph built once per outer step).
- Empirical Fisher (``"fisher"``):  F v = (1/B) Σ_i g_i g_iᵀ v with g_i = ∇ℓ_i = J_iᵀ q_i and
  q_i = ∂ℓ_i/∂z_i = B ∂L/∂z_i. So F = Jᵀ D J with D = blockdiag((1/B) q_i q_iᵀ): the same two
  passes as Gauss-Newton, with the output Hessian replaced by rank-one blocks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.func import grad, jvp, linearize, vjp
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from toolkit.errors import InputError
from toolkit.optim.distributed import mean_across

CurvatureKind = Literal["ggn", "hessian", "fisher"]
JvpMode = Literal["double_vjp", "linearize", "jvp"]
JVP_MODES: tuple[str, ...] = ("double_vjp", "linearize", "jvp")
CURVATURES: tuple[str, ...] = ("ggn", "hessian", "fisher")

MatVec = Callable[[torch.Tensor], torch.Tensor]


def _tree_dot_rows(a: Any, b: Any) -> torch.Tensor:
    """Per-example inner product Σ over non-batch axes of a*b, summed over the leaves: (B,)."""
    la, _ = tree_flatten(a)
    lb, _ = tree_flatten(b)
    total = None
    for x, y in zip(la, lb):
        s = (x * y).reshape(x.shape[0], -1).sum(1)  # (B,)
        total = s if total is None else total + s
    assert total is not None
    return total


def _double_vjp(fn: Callable[[torch.Tensor], Any], theta: torch.Tensor) -> tuple[Any, Any, Any]:
    """J v and Jᵀ w from one forward graph: g(u) = Jᵀu is linear in u, so J v = ∂(vᵀg(u))/∂u.

    One forward and one create_graph backward (at u = 0) per outer step; then each J v is a
    backward through the backward graph (the flops of a linearized forward) and each Jᵀ w a
    backward through the retained forward graph.
    """
    with torch.enable_grad():
        th = theta.clone().requires_grad_(True)
        out = fn(th)
        leaves, spec = tree_flatten(out)
        us = [torch.zeros_like(t, requires_grad=True) for t in leaves]
        (g_of_u,) = torch.autograd.grad(leaves, th, us, create_graph=True)

    def jv(v: torch.Tensor) -> Any:
        with torch.enable_grad():
            raw = torch.autograd.grad(g_of_u, us, v, retain_graph=True, allow_unused=True)
        parts = [torch.zeros_like(u) if p is None else p for p, u in zip(raw, us)]
        return tree_unflatten(parts, spec)

    def jtv(w: Any) -> torch.Tensor:
        with torch.enable_grad():
            (g,) = torch.autograd.grad(leaves, th, tree_flatten(w)[0], retain_graph=True)
        return g

    z = tree_unflatten([t.detach() for t in leaves], spec)
    return jv, jtv, z


def curvature_operator(
    fn: Callable[[torch.Tensor], Any],
    loss_of_outputs: Callable[[Any], torch.Tensor],
    theta: torch.Tensor,
    kind: str = "ggn",
    jvp_mode: str = "double_vjp",
    average: bool = True,
) -> MatVec:
    """Build v ↦ C v for the curvature C of ``loss_of_outputs(fn(θ))`` at ``theta``.

    Args:
        fn: θ (P,) ↦ model outputs (a tensor or a pytree of tensors with a leading batch axis).
        loss_of_outputs: outputs ↦ batch-mean loss (a scalar), convex in the outputs for ``"ggn"``.
        theta: the point (P,), detached.
        kind: ``"ggn"``, ``"hessian"`` or ``"fisher"``.
        jvp_mode: how J v is computed: ``"double_vjp"`` (default; the graph of Jᵀu, linear in u,
            built once per outer step, differentiated in u at each product), ``"linearize"``
            (``torch.func.linearize``: the linearized forward traced once, then reused) or ``"jvp"``
            (``torch.func.jvp``, forward-mode AD redoing the forward at every product).
        average: average each product across processes when torch.distributed is initialized.

    Returns:
        A function (P,) -> (P,) computing C v; the linearization is built here, once.

    Raises:
        ValueError: unknown ``kind`` or ``jvp_mode``.
    """
    if kind not in CURVATURES:
        raise InputError(f"curvature: expected one of {list(CURVATURES)}, got {kind!r}")
    if jvp_mode not in JVP_MODES:
        raise InputError(f"jvp_mode: expected one of {list(JVP_MODES)}, got {jvp_mode!r}")
    theta = theta.detach()
    reduce = mean_across if average else (lambda t: t)

    if kind == "hessian":
        # reverse-over-reverse, graph built once: H is symmetric, so vjp(∇L)(v) = H v.
        def total_loss(th: torch.Tensor) -> torch.Tensor:
            return loss_of_outputs(fn(th))

        hess_vjp = vjp(grad(total_loss), theta)[1]

        def hvp(v: torch.Tensor) -> torch.Tensor:
            return reduce(hess_vjp(v)[0])

        return hvp

    if jvp_mode == "double_vjp":
        jv, jtv, z = _double_vjp(fn, theta)
    else:
        if jvp_mode == "linearize":
            with warnings.catch_warnings():  # const-folding chatter from torch.fx, harmless
                warnings.filterwarnings(
                    "ignore", message="Attempted to insert a get_attr", category=UserWarning
                )
                _, j_fn = linearize(fn, theta)

            def jv(v: torch.Tensor) -> Any:
                return j_fn(v)

        else:

            def jv(v: torch.Tensor) -> Any:
                return jvp(fn, (theta,), (v,))[1]

        z_and_fn = vjp(fn, theta)
        vjp_fn = z_and_fn[1]
        z = tree_map(lambda t: t.detach(), z_and_fn[0])

        def jtv(w: Any) -> torch.Tensor:
            return vjp_fn(w)[0]

    if kind == "ggn":
        # H_L u as a vjp of ∂L/∂z (H_L symmetric), graph built once; forward-over-reverse through
        # some losses (mse_loss) is broken in torch.func.
        out_hess_vjp = vjp(grad(loss_of_outputs), z)[1]

        def out_hvp(u: Any) -> Any:
            return out_hess_vjp(u)[0]

    else:  # fisher
        gz = tree_map(lambda t: t.detach(), grad(loss_of_outputs)(z))  # ∂L/∂z, (B, ...)
        batch = tree_flatten(z)[0][0].shape[0]
        q = tree_map(lambda t: t * batch, gz)  # per-example output gradients q_i

        def out_hvp(u: Any) -> Any:
            c = _tree_dot_rows(q, u) / batch  # (B,)
            return tree_map(lambda t: t * c.view(-1, *([1] * (t.dim() - 1))), q)

    def gvp(v: torch.Tensor) -> torch.Tensor:
        u = jv(v)  # J v, shaped like the outputs
        w = out_hvp(u)  # H_L J v
        return reduce(jtv(w))  # Jᵀ H_L J v, (P,)

    return gvp
