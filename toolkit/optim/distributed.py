"""Averaging across processes when torch.distributed is initialized (a no-op otherwise).

With N processes each holding 1/N of a global batch, averaging the batch-mean loss, the gradient,
every curvature-vector product and the preconditioner statistics makes every process follow exactly
the path one process on the whole batch would follow (equal local batch sizes assumed).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a default process group exists and has more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mean_across(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over all processes (``t`` itself when not distributed).

    Args:
        t: a tensor with the same shape on every process.

    Returns:
        A new tensor (or ``t``) holding the average.
    """
    if not is_distributed():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()
