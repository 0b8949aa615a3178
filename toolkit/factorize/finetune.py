"""End-to-end recovery of a factorized model with the Hessian-free optimizer (toolkit.optim)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from toolkit.errors import InputError


def fine_tune_hessian_free(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    targets: torch.Tensor,
    *,
    steps: int = 20,
    batch_size: int = 512,
    seed: int = 0,
    **hf_options: Any,
) -> list[float]:
    """Fine-tune every parameter of ``model`` with HessianFree on shuffled mini-batches.

    Args:
        model: the (factorized) model, ``model(*inputs)``.
        loss_fn: batch-mean loss (outputs, targets), convex in the outputs.
        inputs: tensors with the batch first; targets: the matching targets.
        steps: Hessian-free steps (one mini-batch each).
        batch_size: gradient batch size (the curvature batch is a fraction of it, see HessianFree).
        seed: shuffling seed.
        hf_options: passed to HessianFree.

    Returns:
        The loss reported by each step.
    """
    from toolkit.optim import HessianFree

    if steps < 0 or batch_size < 1:
        raise InputError(f"expected steps >= 0 and batch_size >= 1, got {steps} and {batch_size}")
    n = int(targets.shape[0])
    g = torch.Generator().manual_seed(seed)
    opt = HessianFree(model, loss_fn, **hf_options)
    losses: list[float] = []
    order = torch.randperm(n, generator=g)
    pos = 0
    was_training = model.training
    model.eval()
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        info = opt.step(tuple(t[idx] for t in inputs), targets[idx])
        losses.append(float(info.loss))
    model.train(was_training)
    return losses
