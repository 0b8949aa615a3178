"""Multi-head scaled dot-product attention as explicit math (no fused kernel).

softmax(Q Kᵀ / √d_head + mask) V per head, written with matmul / add (or masked_fill) / softmax so that
torch.func's jvp and vjp (and their compositions: the Hessian-free optimizer's curvature products)
work through it, double differentiation included; fused ``scaled_dot_product_attention`` kernels
are not all twice differentiable. The Q, K, V and output projections are not part of this module:
they are ordinary (factorizable) ``linear`` nodes of the spec. A padding mask without ``causal`` is
added in BERT's form, (1 − mask)·lowest, which onnxruntime's attention fusion matches.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Attention(nn.Module):
    """Attention of queries (B, T, d) over keys / values (B, S, d) with ``heads`` heads.

    ``mask`` (B, S): 1 (or True) = attend, 0 = padding; a masked key gets the dtype's lowest
    value before the softmax (so a row stays finite even when every key is masked). ``causal``
    also hides keys after the query position.
    """

    def __init__(self, heads: int, causal: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.causal = causal

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, t, d = q.shape
        s = k.shape[1]
        h = self.heads
        dh = d // h
        qh = q.reshape(b, t, h, dh).transpose(1, 2)  # (B, h, T, dh)
        kh = k.reshape(b, s, h, dh).transpose(1, 2)  # (B, h, S, dh)
        vh = v.reshape(b, s, h, dh).transpose(1, 2)  # (B, h, S, dh)
        scores = torch.matmul(qh, kh.transpose(-1, -2)) / math.sqrt(dh)  # (B, h, T, S)
        if mask is not None and not self.causal:
            # the additive form of BERT (0 or the lowest value added before the softmax): the pattern
            # onnxruntime's attention fusion recognizes (toolkit.export.fusion)
            low = torch.finfo(scores.dtype).min
            scores = scores + (1.0 - mask.unsqueeze(1).unsqueeze(2).to(scores.dtype)) * low  # (B, 1, 1, S)
            mask = None
        hide: torch.Tensor | None = None
        if mask is not None:
            hide = (mask == 0)[:, None, None, :]  # (B, 1, 1, S)
        if self.causal:
            later = torch.ones(t, s, dtype=torch.bool, device=q.device).triu(1)  # (T, S)
            hide = later if hide is None else hide | later
        if hide is not None:
            scores = scores.masked_fill(hide, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1)  # (B, h, T, S)
        out = torch.matmul(weights, vh)  # (B, h, T, dh)
        return out.transpose(1, 2).reshape(b, t, d)  # (B, T, d)
