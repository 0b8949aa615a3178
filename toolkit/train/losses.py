"""Losses (batch means, convex in the outputs, as Hessian-free expects) and metrics.

- cross_entropy: mean_b -log softmax(z_b)[y_b]                      (z: logits (B, C), y: (B,) int)
- token_cross_entropy: mean_{b,t} -log softmax(z_bt)[y_bt]          (z: (B, T, V), y: (B, T) int;
                 a language model's next-token loss, in nats per token)
- mse:           mean over batch and features of (z - t)^2
- sum_squared:   mean_b sum_f (z_bf - t_bf)^2   (the squared error of deep autoencoder papers)
- bce:           mean over batch and features of BCE(sigmoid(z), t)  (z: logits, t in [0, 1])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from toolkit.errors import InputError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _as_output(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    if isinstance(outputs, tuple):
        if len(outputs) != 1:
            raise InputError(f"expected a model with one output for training, got {len(outputs)}")
        return outputs[0]
    return outputs


def _like(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return t.reshape(z.shape).to(z.dtype)


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, C) against labels (B,)."""
    z = _as_output(outputs)
    return F.cross_entropy(z.reshape(len(z), -1), targets.long())


def token_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over batch and positions of logits (B, T, V) against ids (B, T)."""
    z = _as_output(outputs)
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), targets.long().reshape(-1))


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error over batch and features."""
    z = _as_output(outputs)
    return F.mse_loss(z, _like(targets, z))


def sum_squared(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Squared error summed over features, averaged over the batch."""
    z = _as_output(outputs)
    return (z - _like(targets, z)).pow(2).reshape(len(z), -1).sum(dim=1).mean()


def bce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of logits, mean over batch and features."""
    z = _as_output(outputs)
    return F.binary_cross_entropy_with_logits(z, _like(targets, z))


LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "token_cross_entropy": token_cross_entropy,
    "mse": mse,
    "sum_squared": sum_squared,
    "bce": bce,
}


def get_loss(name: str) -> LossFn:
    """The loss function called ``name``.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in LOSSES:
        raise InputError(f"unknown loss {name!r}; known: {sorted(LOSSES)}")
    return LOSSES[name]


def has_accuracy(loss: str) -> bool:
    """Whether accuracy means something for this loss (classification losses)."""
    return loss in ("cross_entropy", "bce")


def correct_count(loss: str, outputs: torch.Tensor, targets: torch.Tensor) -> int:
    """Number of correct predictions: argmax for cross_entropy, for bce an example is correct when every (z > 0) == (t > 0.5)."""
    z = _as_output(outputs)
    if loss == "cross_entropy":
        return int((z.reshape(len(z), -1).argmax(dim=1) == targets.long()).sum())
    if loss == "bce":
        hit = (z > 0) == (_like(targets, z) > 0.5)  # (B, ...)
        return int(hit.reshape(len(z), -1).all(dim=1).sum())
    raise ValueError(f"accuracy is not defined for loss {loss!r}")
