"""Split a BERT-style encoder at a block: frozen features below (computed once), a trainable top.

``trainable``:
- ``"head"``: the classification head on the mean-pooled last hidden state; features (N, d).
- ``"last:k"``: the last k transformer blocks + the head; features are the hidden states at the
  input of the first trained block (N, T, d), with the attention mask.
- ``"factors"`` (head + the U factors of factorized layers) and ``"all"``: nothing is frozen below
  the first trained weight, so the model runs on token ids (no feature cache).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from toolkit.errors import InputError
from toolkit.factorize.hf import mean_pool


def parse_trainable(value: str, n_blocks: int) -> tuple[str, int]:
    """("head" | "last" | "factors" | "all", k) from "head", "last:K", "factors" or "all".

    Raises:
        InputError: anything else, or K outside 1..n_blocks.
    """
    if value in ("head", "factors", "all"):
        return value, 0
    if value.startswith("last:"):
        try:
            k = int(value[5:])
        except ValueError:
            k = -1
        if 1 <= k <= n_blocks:
            return "last", k
    raise InputError(
        f"--trainable: expected head, factors, all or last:K with K in 1..{n_blocks}, got {value!r}"
    )


def blocks_of(encoder: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a BERT-style encoder (``encoder.encoder.layer``).

    Raises:
        InputError: the model has no such list.
    """
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise InputError(
            f"model: expected a BERT-style encoder with encoder.layer blocks, got {type(encoder).__name__}"
        )
    return layers


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B, 1, 1, T) additive attention mask (0 kept, dtype-min masked)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def run_blocks(blocks: nn.ModuleList, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Apply blocks to (B, T, d) hidden states under a (B, T) mask -> (B, T, d)."""
    ext = additive_mask(mask, hidden.dtype)  # (B, 1, 1, T)
    for block in blocks:
        out = block(hidden, attention_mask=ext)
        hidden = out[0] if isinstance(out, tuple) else out  # (B, T, d)
    return hidden


class TopClassifier(nn.Module):
    """The trained top: k blocks (shared with the encoder, not copies) + mean pooling + head.

    forward(features (B, T, d), mask (B, T)) -> logits (B, K); with k = 0 the features are the
    already pooled (B, d) sentence vectors and the mask is ignored.
    """

    def __init__(self, blocks: nn.ModuleList, head: nn.Linear) -> None:
        super().__init__()
        self.blocks = blocks
        self.head = head

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if len(self.blocks) == 0:
            return self.head(features)  # (B, K)
        # math SDPA: the curvature products need second derivatives of attention
        with sdpa_kernel(SDPBackend.MATH):
            h = run_blocks(self.blocks, features, mask)  # (B, T, d)
        return self.head(mean_pool(h, mask))  # (B, K)


@torch.no_grad()
def frozen_features(
    encoder: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    batch_size: int = 128,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Features at the input of the first of the last ``k`` blocks, computed once.

    Args:
        encoder: a BERT-style transformers encoder.
        ids, mask: (N, T) token ids and attention mask.
        k: trained blocks (0: the mean-pooled last hidden state, (N, d)).
        batch_size: texts per forward.
        progress: called with the number of texts done after each batch.

    Returns:
        (N, T, d) float32 hidden states, or (N, d) pooled ones when k = 0.
    """
    blocks = blocks_of(encoder)
    below = nn.ModuleList(list(blocks)[: len(blocks) - k])
    encoder.eval()
    n, width = ids.shape
    d = int(getattr(encoder, "config").hidden_size)  # noqa: B009
    out = torch.zeros((n, d) if k == 0 else (n, width, d))
    order = torch.argsort(mask.sum(1), stable=True)  # similar lengths together: less padding to run
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        t = max(1, int(mask[idx].sum(1).max()))
        b_ids, b_mask = ids[idx, :t], mask[idx, :t]  # (B, t)
        embeddings: Callable[..., torch.Tensor] = getattr(encoder, "embeddings")  # noqa: B009
        h = embeddings(input_ids=b_ids, token_type_ids=torch.zeros_like(b_ids))  # (B, t, d)
        h = run_blocks(below, h, b_mask)  # (B, t, d)
        if k == 0:
            out[idx] = mean_pool(h, b_mask).float()  # (B, d)
        else:
            out[idx, :t] = h.float()
        if progress is not None:
            progress(len(idx))
    return out
