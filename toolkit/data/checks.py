"""Checks of data against the spec: shapes, finiteness, label range."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from toolkit.errors import InputError

CLASS_LOSSES = ("cross_entropy",)


def input_shape(spec: Any) -> tuple[int, ...]:
    """The per-example shape of an input spec (an InputSpec, a mapping with ``shape`` or a sequence)."""
    if isinstance(spec, Mapping):
        return tuple(int(s) for s in spec["shape"])
    if isinstance(spec, Sequence):
        return tuple(int(s) for s in spec)
    return tuple(int(s) for s in spec.shape)


def input_dtype(spec: Any) -> str:
    """The dtype name of an input spec ("float32" unless it says "int64")."""
    if isinstance(spec, Mapping):
        return str(spec.get("dtype", "float32"))
    if isinstance(spec, Sequence):
        return "float32"
    return str(getattr(spec, "dtype", "float32"))


def conform_input(where: str, name: str, x: np.ndarray, spec: Any) -> np.ndarray:
    """Reshape ``x`` (N, ...) to the spec's per-example shape when the sizes agree; check it is finite.

    Raises:
        ValueError: when the per-example size differs from the spec's, or the data holds NaN/inf.
    """
    shape = input_shape(spec)
    x = np.asarray(x)
    if x.ndim == 0:
        raise InputError(f"{where}: input {name!r}: expected an array (N, ...), got a scalar")
    n = x.shape[0]
    per = int(np.prod(x.shape[1:], dtype=np.int64))
    want = int(np.prod(shape, dtype=np.int64))
    if tuple(x.shape[1:]) != shape:
        if per != want:
            raise InputError(
                f"{where}: input {name!r}: expected examples of shape {list(shape)} (spec inputs), "
                f"got {list(x.shape[1:])}"
            )
        x = x.reshape((n, *shape))
    dtype = input_dtype(spec)
    if dtype == "int64":
        if not np.all(np.isfinite(x)) or np.any(x != np.round(x)):
            raise InputError(f"{where}: input {name!r}: expected integers (spec dtype int64)")
        return x.astype(np.int64)
    x = x.astype(np.float32)
    bad = ~np.isfinite(x.reshape(n, -1)).all(axis=1)
    if bad.any():
        raise InputError(
            f"{where}: input {name!r}: expected finite values, got NaN/inf in {int(bad.sum())} example(s), "
            f"first at row {int(np.argmax(bad))}"
        )
    return x


def check_targets(where: str, targets: np.ndarray, loss: str, output_size: int | None = None) -> np.ndarray:
    """Check targets for a loss and convert them to the dtype it needs.

    Args:
        where: the data source, for messages.
        targets: (N,) labels or (N, ...) regression targets.
        loss: the loss name (cross_entropy needs integer labels in [0, output_size)).
        output_size: classes (the model's last output dimension), when known.

    Returns:
        int64 labels for cross_entropy, float32 targets otherwise.

    Raises:
        ValueError: NaN/inf, non-integer or out-of-range labels, BCE targets outside [0, 1].
    """
    t = np.asarray(targets)
    if t.dtype.kind == "f" and not np.all(np.isfinite(t)):
        bad = ~np.isfinite(t.reshape(len(t), -1)).all(axis=1)
        raise InputError(
            f"{where}: targets: expected finite values, got NaN/inf first at row {int(np.argmax(bad))}"
        )
    if loss == "token_cross_entropy":
        if t.ndim != 2 or t.dtype.kind not in "iu":
            raise InputError(
                f"{where}: targets: expected (N, T) integer token ids for {loss}, got {t.dtype} {list(t.shape)}"
            )
        t = t.astype(np.int64)
        lo, hi = int(t.min(initial=0)), int(t.max(initial=0))
        if lo < 0 or (output_size is not None and hi >= output_size):
            raise InputError(f"{where}: targets: expected ids in [0, {output_size}), got ids in [{lo}, {hi}]")
        return t
    if loss in CLASS_LOSSES:
        if t.ndim != 1 or np.any(t != np.round(t)):
            raise InputError(
                f"{where}: targets: expected (N,) integer class labels for {loss}, got {t.dtype} {list(t.shape)}"
            )
        t = t.astype(np.int64)
        lo, hi = int(t.min(initial=0)), int(t.max(initial=0))
        if lo < 0 or (output_size is not None and hi >= output_size):
            raise InputError(
                f"{where}: targets: expected labels in [0, {output_size}) for a model with {output_size} outputs, "
                f"got labels in [{lo}, {hi}]"
            )
        return t
    t = t.astype(np.float32)
    if loss == "bce" and (t.min(initial=0) < 0 or t.max(initial=0) > 1):
        raise InputError(f"{where}: targets: expected values in [0, 1] for bce, got [{t.min()}, {t.max()}]")
    return t
