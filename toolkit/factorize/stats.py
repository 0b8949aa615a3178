"""Calibration plumbing: run calibration batches, capture one layer's inputs, per-channel statistics.

Calibration data is a sequence of batches; each batch is passed to the model as
``model(batch)`` for a tensor, ``model(*batch)`` for a tuple/list and ``model(**batch)`` for a dict
(Hugging Face style). Capturing stops the forward pass right after the layer of interest, so each
capture costs only the part of the network in front of that layer and holds only that layer's inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from toolkit.errors import InputError

Batch = Any


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass early."""


def as_batches(calibration: Iterable[Batch] | None) -> list[Batch] | None:
    """Materialise calibration batches once (they are iterated once per layer).

    Raises:
        TypeError: when ``calibration`` is not an iterable of tensors, tuples or dicts.
        ValueError: when it is empty.
    """
    if calibration is None:
        return None
    if isinstance(calibration, torch.Tensor | Mapping):
        batches: list[Batch] = [calibration]
    else:
        try:
            batches = list(calibration)
        except TypeError as exc:
            raise TypeError(
                f"calibration: expected an iterable of batches, got {type(calibration).__name__}"
            ) from exc
    if not batches:
        raise InputError("calibration: expected at least one batch, got none")
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor | Mapping | Sequence):
            raise TypeError(f"calibration[{i}]: expected a Tensor, tuple or dict, got {type(b).__name__}")
    return batches


def call_model(model: nn.Module, batch: Batch) -> Any:
    """Call ``model`` on one calibration batch (tensor, tuple or dict of keyword arguments)."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(*batch)


def _first_tensor_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    raise TypeError("expected the layer to be called with a tensor input")  # pragma: no cover


def _rows(x: torch.Tensor, layer: nn.Module) -> int:
    if isinstance(layer, nn.Conv2d):
        return int(x.shape[0] * x.shape[-1] * x.shape[-2])
    if isinstance(layer, nn.Embedding):
        return int(x.numel())
    return int(x.numel() // x.shape[-1])


@torch.no_grad()
def capture_inputs(
    model: nn.Module, layer: nn.Module, batches: Sequence[Batch], max_rows: int = 8192
) -> list[torch.Tensor]:
    """Inputs seen by ``layer`` when ``model`` runs the calibration batches.

    Args:
        model: the model containing ``layer``.
        layer: the layer whose first tensor argument is captured.
        batches: calibration batches.
        max_rows: stop after this many input rows (tokens / positions / ids) have been captured.

    Returns:
        The captured input tensors (detached), one per batch run.
    """
    captured: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(_first_tensor_arg(args, kwargs).detach())
        raise _StopForward

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    rows = 0
    try:
        for batch in batches:
            with contextlib.suppress(_StopForward):
                call_model(model, batch)
            if captured:
                rows += _rows(captured[-1], layer)
            if rows >= max_rows:
                break
    finally:
        handle.remove()
    return captured


def channel_mean_abs(layer: nn.Module, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean |x| per input channel of a layer (float64), the ASVD statistic.

    Linear: over all leading axes of (..., in); Conv2d: over (B, H, W) of (B, in, H, W);
    Embedding: the frequency of each id (the mean of the one-hot input), shape (vocab,).
    """
    total: torch.Tensor | None = None
    count = 0
    for x in inputs:
        if isinstance(layer, nn.Embedding):
            s = torch.bincount(x.flatten().long(), minlength=layer.num_embeddings).double()
            n = x.numel()
        elif isinstance(layer, nn.Conv2d):
            s = x.double().abs().sum(dim=(0, 2, 3))
            n = x.shape[0] * x.shape[2] * x.shape[3]
        else:
            flat = x.double().reshape(-1, x.shape[-1])  # (N, in)
            s = flat.abs().sum(0)
            n = flat.shape[0]
        total = s if total is None else total + s
        count += n
    if total is None or count == 0:
        raise ValueError("expected captured calibration inputs, got none")
    return total / count


@torch.no_grad()
def all_channel_stats(
    model: nn.Module, layers: Mapping[str, nn.Module], batches: Sequence[Batch]
) -> dict[str, torch.Tensor]:
    """Mean |x| per input channel for many layers in one pass (used by the global budget)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name, layer in layers.items():

        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name) -> None:
            x = _first_tensor_arg(args, kwargs)
            s = channel_mean_abs(m, [x]) * _rows(x, m)
            sums[name] = s if name not in sums else sums[name] + s
            counts[name] = counts.get(name, 0) + _rows(x, m)

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        for batch in batches:
            call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}
