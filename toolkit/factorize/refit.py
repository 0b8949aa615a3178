"""Layer-wise refit: fit one factorized layer to its dense layer's outputs on calibration inputs.

With features X (N, n) (inputs of a linear layer, unfolded patches of a convolution), dense
targets Y = X Mᵀ + b (N, out) and the factorized map Ŷ = X Vᵀ Uᵀ + b̂:

- U-step (closed form): with Z = X Vᵀ (N, r) and Z₁ = [Z, 1], [Uᵀ; b̂ᵀ] = argmin ‖Z₁ [Uᵀ; b̂ᵀ] − Y‖²,
  solved from the normal equations (Z₁ᵀ Z₁ + λI) A = Z₁ᵀ Y in float64;
- V-step (closed form): with R = Y − b̂, Xᵀ X Vᵀ (UᵀU) = Xᵀ R U, i.e.
  Vᵀ = (XᵀX + λI)⁻¹ Xᵀ R U (UᵀU + λI)⁻¹;
- alternate the two a few times, then a few Adam steps on the mean squared error of the layer's own
  forward (keeps the best iterate, so refit never makes the layer worse on its calibration data).

Only one layer's inputs and outputs are held at a time. Embedding layers are not refit (their
truncated SVD is already the least-squares fit of the table rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.layers import FactorizedConv2d, FactorizedLinear, FactorizedMixin


@dataclass(frozen=True)
class RefitOptions:
    """Settings of the layer-wise refit.

    Attributes:
        alternations: closed-form rounds (at least one).
        v_step: each round solves U, then V, then U again (alternating least squares); False: U only.
        steps: Adam steps after the closed-form rounds.
        lr: Adam learning rate (relative to the RMS of the factor weights).
        ridge: λ, relative to the mean diagonal of the Gram matrix.
    """

    alternations: int = 2
    v_step: bool = True
    steps: int = 20
    lr: float = 1e-3
    ridge: float = 1e-6


def features(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input features (N, n) of a linear layer (rows of x) or convolution (unfolded patches), float64."""
    if isinstance(layer, nn.Conv2d | FactorizedConv2d):
        conv = layer if isinstance(layer, nn.Conv2d) else layer.V
        assert isinstance(conv, nn.Conv2d)
        padding = conv.padding if isinstance(conv.padding, tuple) else 0  # from_dense rejects string padding
        cols = F.unfold(
            x.double(), conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride
        )
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B·L, in·k·k)
    return x.double().reshape(-1, x.shape[-1])  # (N, in)


def outputs_as_rows(y: torch.Tensor, conv: bool) -> torch.Tensor:
    """Layer outputs as (N, out) rows (channels last for convolutions), float64."""
    if conv:
        return y.double().permute(0, 2, 3, 1).reshape(-1, y.shape[1])  # (B·H·W, out)
    return y.double().reshape(-1, y.shape[-1])


def _ridge(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    lam = ridge * float(gram.diagonal().mean().clamp(min=1e-30))
    return gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


@dataclass(frozen=True)
class NormalStats:
    """Sufficient statistics of a least-squares layer fit: G = XᵀX, C = XᵀY, Σx, Σy, N (float64)."""

    gram: torch.Tensor  # (n, n)
    cross: torch.Tensor  # (n, out)
    sum_x: torch.Tensor  # (n,)
    sum_y: torch.Tensor  # (out,)
    count: int

    @classmethod
    def of(cls, x: torch.Tensor, y: torch.Tensor) -> NormalStats:
        """Statistics of features x (N, n) and targets y (N, out)."""
        xd, yd = x.double(), y.double()
        return cls(xd.t() @ xd, xd.t() @ yd, xd.sum(0), yd.sum(0), int(xd.shape[0]))


def u_step(
    st: NormalStats, v: torch.Tensor, bias: bool, ridge: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Closed-form U (out, r) and bias for fixed V from the normal equations of Z₁ = [X Vᵀ, 1]."""
    vd = v.double()
    a = vd @ st.gram @ vd.t()  # (r, r) = ZᵀZ
    rhs = vd @ st.cross  # (r, out) = ZᵀY
    if bias:
        zs = (vd @ st.sum_x)[:, None]  # (r, 1) = Zᵀ1
        a = torch.cat([torch.cat([a, zs], 1), torch.cat([zs.t(), a.new_full((1, 1), float(st.count))], 1)], 0)
        rhs = torch.cat([rhs, st.sum_y[None, :]], 0)  # (r+1, out)
    sol = torch.linalg.solve(_ridge(a, ridge), rhs)  # (r[+1], out)
    if bias:
        return sol[:-1].t().contiguous(), sol[-1].contiguous()
    return sol.t().contiguous(), None


def v_step(st: NormalStats, u: torch.Tensor, b: torch.Tensor | None, ridge: float = 0.0) -> torch.Tensor:
    """Closed-form V (r, n) for fixed U and bias: Vᵀ = G⁻¹ Xᵀ(Y − 1bᵀ) U (UᵀU)⁻¹."""
    ud = u.double()
    xr = st.cross if b is None else st.cross - st.sum_x[:, None] * b.double()[None, :]  # (n, out) = XᵀR
    left = torch.linalg.solve(_ridge(st.gram, ridge), xr @ ud)  # (n, r)
    return torch.linalg.solve(_ridge(ud.t() @ ud, ridge), left.t())  # (r, n)


def lstsq_u(
    x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, bias: bool, ridge: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Closed-form U (and bias) minimising ‖X Vᵀ Uᵀ + b − Y‖² for fixed V.

    Args:
        x: (N, n) features; y: (N, out) targets; v: (r, n) fixed factor.
        bias: whether to fit a bias b (out,).
        ridge: relative ridge λ (0 for the plain least-squares solution).

    Returns:
        U (out, r) and b (out,) or None, float64.
    """
    return u_step(NormalStats.of(x, y), v, bias, ridge)


def lstsq_v(x: torch.Tensor, r_target: torch.Tensor, u: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """Closed-form V (r, n) minimising ‖X Vᵀ Uᵀ − R‖² for fixed U (R = Y − b)."""
    return v_step(NormalStats.of(x, r_target), u, None, ridge)


def _get_uv(layer: FactorizedMixin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    assert isinstance(layer, FactorizedLinear | FactorizedConv2d)
    r = layer.rank
    u = layer.U.weight.detach().reshape(-1, r).double()
    v = layer.V.weight.detach().reshape(r, -1).double()
    b = None if layer.U.bias is None else layer.U.bias.detach().double()
    return u, v, b


def _set_uv(layer: FactorizedMixin, u: torch.Tensor, v: torch.Tensor, b: torch.Tensor | None) -> None:
    assert isinstance(layer, FactorizedLinear | FactorizedConv2d)
    with torch.no_grad():
        layer.U.weight.copy_(u.reshape(layer.U.weight.shape))
        layer.V.weight.copy_(v.reshape(layer.V.weight.shape))
        if b is not None and layer.U.bias is not None:
            layer.U.bias.copy_(b)


@torch.no_grad()
def relative_error(dense: nn.Module, fact: nn.Module, inputs: Sequence[torch.Tensor]) -> float:
    """Normalised output error ‖Y − Ŷ‖_F / ‖Y‖_F of ``fact`` against ``dense`` on the inputs."""
    num = den = 0.0
    for x in inputs:
        y = dense(x).double()
        num += float((y - fact(x).double()).pow(2).sum())
        den += float(y.pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else float(num > 0)


def refit_layer(
    fact: FactorizedMixin,
    dense: nn.Module,
    inputs: Sequence[torch.Tensor],
    options: RefitOptions | None = None,
) -> float:
    """Refit ``fact`` in place to ``dense``'s outputs on ``inputs``; returns its final relative error.

    Args:
        fact: a FactorizedLinear or FactorizedConv2d (embeddings are returned unchanged).
        dense: the dense layer it replaces.
        inputs: captured calibration inputs of the layer.
        options: RefitOptions (defaults when None).
    """
    opts = options or RefitOptions()
    assert isinstance(fact, nn.Module)
    if not isinstance(fact, FactorizedLinear | FactorizedConv2d):
        return relative_error(dense, fact, inputs)
    conv = isinstance(fact, FactorizedConv2d)
    with torch.no_grad():
        x = torch.cat([features(dense, t) for t in inputs])  # (N, n)
        y = torch.cat([outputs_as_rows(dense(t), conv) for t in inputs])  # (N, out)
        st = NormalStats.of(x, y)
        del x, y
    u, v, b = _get_uv(fact)
    best_err = relative_error(dense, fact, inputs)
    best = (u, v, b)
    for _ in range(max(1, opts.alternations)):
        has_bias = b is not None
        u, b = u_step(st, v, has_bias, opts.ridge)
        if opts.v_step:
            v = v_step(st, u, b, opts.ridge)
            u, b = u_step(st, v, has_bias, opts.ridge)
        _set_uv(fact, u, v, b)
        err = relative_error(dense, fact, inputs)
        if err < best_err:
            best_err, best = err, (u, v, b)
    _set_uv(fact, *best)
    if opts.steps > 0:
        best_err = _adam_steps(fact, dense, inputs, opts, best_err)
    return best_err


def _adam_steps(
    fact: FactorizedMixin,
    dense: nn.Module,
    inputs: Sequence[torch.Tensor],
    opts: RefitOptions,
    start_err: float,
) -> float:
    assert isinstance(fact, nn.Module)
    params = [p for p in fact.parameters() if p.requires_grad]
    with torch.no_grad():
        targets = [dense(t) for t in inputs]
        scale = torch.cat([p.detach().flatten() for p in params]).pow(2).mean().sqrt().item()
    opt = torch.optim.Adam(params, lr=opts.lr * max(scale, 1e-8))
    best_err = start_err
    best_state = {k: t.detach().clone() for k, t in fact.state_dict().items()}
    for _ in range(opts.steps):
        opt.zero_grad()
        loss = sum(F.mse_loss(fact(t), y, reduction="sum") for t, y in zip(inputs, targets))
        assert isinstance(loss, torch.Tensor)
        loss.backward()
        opt.step()
    err = relative_error(dense, fact, inputs)
    if err < best_err:
        return err
    fact.load_state_dict(best_state)
    return best_err
