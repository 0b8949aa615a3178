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

import torch
from torch import nn

from toolkit.errors import InputError
from toolkit.layers import (
    FactorizedConv2d,
    FactorizedEmbedding,
    FactorizedLinear,
    FactorizedMixin,
    balanced_svd_factors,
    check_conv2d,
)

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
        U = P_r Σ_r^½ and V = Σ_r^½ Q_rᵀ S⁻¹ where M·S = P Σ Qᵀ (S = I for plain SVD);
        see toolkit.layers.balanced_svd_factors.

    Raises:
        ValueError: for a rank outside [1, min(out, n)].
    """
    if not 1 <= rank <= min(matrix.shape):
        raise InputError(f"expected rank in [1, {min(matrix.shape)}], got {rank}")
    return balanced_svd_factors(matrix, rank, scale)


def scaled_singular_values(matrix: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values of M·S (of M when ``scale`` is None), float64, descending."""
    m = matrix.double()
    return torch.linalg.svdvals(m if scale is None else m * scale[None, :])


def build_factorized(layer: nn.Module, u: torch.Tensor, v: torch.Tensor) -> FactorizedMixin:
    """A factorized layer whose U·V equals the given factors of ``layer_matrix(layer)``.

    The bias is copied from ``layer``; the result has the layer's device and dtype.

    Raises:
        TypeError: for an unsupported layer type.
        ValueError: for a convolution FactorizedConv2d cannot represent.
    """
    w = layer.weight
    assert isinstance(w, torch.Tensor)
    u, v = u.to(w), v.to(w)  # the layer's device and dtype
    b = getattr(layer, "bias", None)  # nn.Embedding has none
    bias = b.detach() if isinstance(b, torch.Tensor) else None
    if isinstance(layer, nn.Linear):
        return FactorizedLinear.from_factors(u, v, bias)
    if isinstance(layer, nn.Conv2d):
        k = check_conv2d(layer)
        return FactorizedConv2d.from_factors(
            u, v, bias, in_channels=layer.in_channels, kernel_size=k,
            stride=layer.stride[0], padding=int(layer.padding[0]),
        )  # fmt: skip
    if isinstance(layer, nn.Embedding):
        return FactorizedEmbedding.from_factors(u, v)
    raise TypeError(f"expected nn.Linear, nn.Conv2d or nn.Embedding, got {type(layer).__name__}")
