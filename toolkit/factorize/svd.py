"""Truncated SVD and activation-aware SVD (ASVD) of dense layers, as 2-D maps.

Every supported layer is a linear map ``M`` (out x n) of its input features:

- nn.Linear (out, in):          M = W, features = x;
- nn.Conv2d (out, in, k, k):    M = W.reshape(out, in·k·k), features = the unfolded k x k patches;
- nn.Embedding (vocab, d):      M = Eᵀ (d, vocab), features = the one-hot id.

Plain SVD keeps the rank-r truncation of M, the best rank-r approximation in Frobenius norm.
ASVD (Yuan et al., 2023, "ASVD: Activation-aware Singular Value Decomposition") instead truncates
M·S, where S = diag(s) and s_j = (mean |x_j|)^α over calibration inputs (α ≈ 0.5): columns that see
large activations weigh more, so the truncation error lands where inputs are small. With
M·S = P Σ Qᵀ the factors are U = P_r Σ_r^½ and V = Σ_r^½ Q_rᵀ S⁻¹ (V is "unscaled"), so U·V
approximates M itself. Statistics are floored at ``floor`` x their mean so unseen channels
(e.g. embedding ids absent from the calibration text) are not discarded entirely.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from toolkit.layers import FactorizedConv2d, FactorizedEmbedding, FactorizedLinear, FactorizedMixin

DENSE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.Embedding)


def layer_matrix(layer: nn.Module) -> torch.Tensor:
    """The dense layer as a float64 (out, n) matrix of its input features (see the module docstring).

    Raises:
        TypeError: for a layer that is not nn.Linear, nn.Conv2d or nn.Embedding.
    """
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().double()
    if isinstance(layer, nn.Conv2d):
        w = layer.weight.detach().double()
        return w.reshape(w.shape[0], -1)
    if isinstance(layer, nn.Embedding):
        return layer.weight.detach().double().t()
    raise TypeError(f"expected nn.Linear, nn.Conv2d or nn.Embedding, got {type(layer).__name__}")


def column_scale(
    layer: nn.Module, channel_mean_abs: torch.Tensor, alpha: float = 0.5, floor: float = 0.1
) -> torch.Tensor:
    """ASVD column scaling s (n,) for ``layer_matrix(layer)`` from per-channel mean |x|.

    Args:
        layer: the dense layer.
        channel_mean_abs: (in_channels,) mean |x| per input channel (per id for embeddings).
        alpha: exponent (0 gives plain SVD).
        floor: statistics below ``floor`` · mean are raised to it (keeps S invertible).

    Returns:
        (n,) positive float64 scale; conv channels are repeated over the k·k kernel positions.
    """
    m = channel_mean_abs.double()
    m = torch.clamp(m, min=max(float(m.mean()) * floor, 1e-12))
    s = m.pow(alpha)
    if isinstance(layer, nn.Conv2d):
        kk = layer.kernel_size[0] * layer.kernel_size[1]
        s = s.repeat_interleave(kk)  # weight.reshape(out, in·k·k) is channel-major
    return s


def svd_factors(
    matrix: torch.Tensor, rank: int, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors U (out, r), V (r, n) of ``matrix`` by (activation-aware) truncated SVD, float64.

    Args:
        matrix: (out, n) dense map.
        rank: r, 1 <= r <= min(out, n).
        scale: (n,) ASVD column scale s, or None for plain SVD.

    Returns:
        U = P_r Σ_r^½ and V = Σ_r^½ Q_rᵀ S⁻¹ where M·S = P Σ Qᵀ (S = I for plain SVD).
    """
    m = matrix.double()
    if not 1 <= rank <= min(m.shape):
        raise ValueError(f"expected rank in [1, {min(m.shape)}], got {rank}")
    target = m if scale is None else m * scale[None, :]  # (out, n)
    p, sv, qh = torch.linalg.svd(target, full_matrices=False)
    root = sv[:rank].sqrt()
    u = p[:, :rank] * root  # (out, r)
    v = root[:, None] * qh[:rank]  # (r, n)
    if scale is not None:
        v = v / scale[None, :]
    return u, v


def scaled_singular_values(matrix: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values of M·S (of M when ``scale`` is None), float64, descending."""
    m = matrix.double()
    return torch.linalg.svdvals(m if scale is None else m * scale[None, :])


def _empty(cls: type[nn.Module], like: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """Construct a factorized layer without running its (SVD-based) initialisation, on like's device/dtype."""
    with torch.device("meta"):
        mod = cls(*args, **kwargs)
    return mod.to_empty(device=like.device).to(dtype=like.dtype)


def build_factorized(layer: nn.Module, u: torch.Tensor, v: torch.Tensor) -> FactorizedMixin:
    """A factorized layer whose U·V equals the given factors of ``layer_matrix(layer)``.

    The bias is copied from ``layer``; the result has the layer's device and dtype.

    Raises:
        TypeError: for an unsupported layer type.
    """
    rank = int(u.shape[1])
    w = layer.weight
    assert isinstance(w, torch.Tensor)
    if isinstance(layer, nn.Linear):
        lin = _empty(
            FactorizedLinear, w, layer.in_features, layer.out_features, rank, bias=layer.bias is not None
        )
        with torch.no_grad():
            lin.U.weight.copy_(u)
            lin.V.weight.copy_(v)
            if layer.bias is not None and lin.U.bias is not None:
                lin.U.bias.copy_(layer.bias.detach())
        return lin  # type: ignore[no-any-return]
    if isinstance(layer, nn.Conv2d):
        FactorizedConv2d.from_dense(layer, rank=rank, fallback=False)  # validates the convolution's geometry
        k = layer.kernel_size[0]
        padding = layer.padding[0] if isinstance(layer.padding, tuple) else 0
        conv = _empty(
            FactorizedConv2d,
            w,
            layer.in_channels,
            layer.out_channels,
            k,
            rank,
            stride=layer.stride[0],
            padding=int(padding),
            bias=layer.bias is not None,
        )
        with torch.no_grad():
            conv.U.weight.copy_(u.reshape(layer.out_channels, rank, 1, 1))
            conv.V.weight.copy_(v.reshape(rank, layer.in_channels, k, k))
            if layer.bias is not None and conv.U.bias is not None:
                conv.U.bias.copy_(layer.bias.detach())
        return conv  # type: ignore[no-any-return]
    if isinstance(layer, nn.Embedding):
        emb = _empty(FactorizedEmbedding, w, layer.num_embeddings, layer.embedding_dim, rank)
        with torch.no_grad():
            emb.U.weight.copy_(u)  # (d, r)
            emb.V.weight.copy_(v.t())  # (vocab, r)
        return emb  # type: ignore[no-any-return]
    raise TypeError(f"expected nn.Linear, nn.Conv2d or nn.Embedding, got {type(layer).__name__}")
