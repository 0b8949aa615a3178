"""Sequence ops of transformer specs: position embeddings, masked mean pooling, selecting a position.

Inputs are (B, T, ...) with the sequence on axis 1; a mask is (B, T) with 1 = real token, 0 = padding.
Every op works for any T up to the spec's length (exports keep the sequence axis dynamic).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    """The fixed (max_len, dim) table of "Attention is all you need": sin on even, cos on odd features.

    P[pos, 2i] = sin(pos / 10000^(2i/dim)), P[pos, 2i+1] = cos(pos / 10000^(2i/dim)).
    """
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]  # (L, 1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))  # (d/2,)
    table = torch.zeros(max_len, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table.float()


class PositionEmbedding(nn.Module):
    """y = x + P[:T] for x (B, T, d): P a learned table (``table.weight``) or the sinusoidal one."""

    def __init__(self, max_len: int, dim: int, kind: str = "learned") -> None:
        super().__init__()
        self.kind = kind
        if kind == "learned":
            self.table = nn.Embedding(max_len, dim)
        else:
            self.register_buffer("fixed", sinusoidal_table(max_len, dim), persistent=False)

    def positions(self) -> torch.Tensor:
        """The whole (max_len, d) table."""
        if self.kind == "learned":
            return self.table.weight
        fixed: torch.Tensor = self.get_buffer("fixed")
        return fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        return x + self.positions()[:t].to(x.dtype)  # (B, T, d)


class Mul(nn.Module):
    """y = x₁ · x₂ · … elementwise (inputs of one shape)."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out * x
        return out


class MaskedMean(nn.Module):
    """Mean over the sequence axis (B, T, ...) -> (B, ...), counting only positions whose mask is 1.

    Without a mask every position counts. The count is clamped at 1e-9 (sentence-transformers'
    convention), so an all-padding row gives zeros rather than NaN.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return x.mean(dim=1)
        m = mask.to(x.dtype).reshape(*mask.shape, *([1] * (x.dim() - 2)))  # (B, T, 1...)
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)  # (B, ...)


class Select(nn.Module):
    """One position of the sequence axis: x[:, index]; with a mask, the last position whose mask is 1."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return x[:, self.index]  # (B, ...)
        last = (mask != 0).to(torch.int64).sum(dim=1).clamp(min=1) - 1  # (B,)
        idx = last.reshape(-1, 1, *([1] * (x.dim() - 2))).expand(-1, 1, *x.shape[2:])
        return x.gather(1, idx).squeeze(1)  # (B, ...)
