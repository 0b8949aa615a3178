"""Deterministic train/val/test splits and the `load_data` entry point."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit.data.builtin import load_builtin
from toolkit.data.checks import check_targets, conform_input
from toolkit.data.files import load_file
from toolkit.errors import InputError


@dataclass
class Split:
    """One split: ``inputs`` graph input -> (N, ...) array, ``targets`` (N, ...)."""

    inputs: dict[str, np.ndarray]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)

    def take(self, idx: np.ndarray) -> Split:
        """The examples at ``idx`` (a new Split sharing nothing with this one)."""
        return Split({k: v[idx] for k, v in self.inputs.items()}, self.targets[idx])


@dataclass
class Splits:
    """The three splits of a dataset."""

    train: Split
    val: Split
    test: Split
    source: str = "<memory>"


def split_arrays(
    inputs: dict[str, np.ndarray], targets: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> Splits:
    """Shuffle with ``seed`` and cut into test (first), val, then train.

    Args:
        inputs: graph input -> (N, ...) array.
        targets: (N, ...) targets.
        val_fraction, test_fraction: fractions of N (rounded down, val/test may be empty).
        seed: permutation seed; the same seed always gives the same split.

    Returns:
        Splits(train, val, test).

    Raises:
        ValueError: when the arrays do not share N or the train split would be empty.
    """
    n = len(targets)
    for name, x in inputs.items():
        if len(x) != n:
            raise InputError(f"input {name!r}: expected {n} examples like the targets, got {len(x)}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test, n_val = int(n * test_fraction), int(n * val_fraction)
    if n - n_test - n_val < 1:
        raise InputError(f"expected at least one training example, got {n} examples in all")
    whole = Split(inputs, targets)
    return Splits(
        train=whole.take(perm[n_test + n_val :]),
        val=whole.take(perm[n_test : n_test + n_val]),
        test=whole.take(perm[:n_test]),
    )


def load_data(
    cfg: Any, input_specs: Mapping[str, Any], loss: str | None = None, output_size: int | None = None
) -> Splits:
    """Load the dataset a spec's ``train.data`` names, checked against the spec's inputs, and split it.

    Built-in datasets feed a single graph input; inputs are reshaped to the spec's per-example shape
    when the element counts agree (e.g. digits vectors into [1, 8, 8]).

    Args:
        cfg: a DataConfig (builtin | path, inputs, target, val_fraction, test_fraction, seed, limit).
        input_specs: graph input name -> InputSpec (or {"shape": [...], "dtype": ...}).
        loss: when given, targets are checked and converted for it (see check_targets).
        output_size: model outputs (classes) for the label-range check.

    Returns:
        Splits(train, val, test), inputs float32 (int64 for int64 inputs).

    Raises:
        FileNotFoundError: a missing file.
        ValueError: shapes not matching the spec, NaN/inf, labels out of range, unknown columns.
    """
    names = list(input_specs)
    if not names:
        raise InputError("expected the spec to have at least one input, got none")
    if cfg.builtin == "pydoc":  # split by topic, not by window (toolkit.data.pydoc_text)
        from toolkit.data.pydoc_text import load_pydoc_splits

        return load_pydoc_splits(cfg, input_specs)
    if cfg.builtin is not None:
        where = f"builtin dataset {cfg.builtin!r}"
        if len(names) != 1:
            raise InputError(f"{where}: expected a spec with exactly one input, got {names}")
        if cfg.target not in (None, "input") and cfg.target != "y":
            raise InputError(f"{where}: data.target: expected 'input' or nothing, got {cfg.target!r}")
        x, y = load_builtin(cfg.builtin, limit=cfg.limit, seed=cfg.seed)
        xs = {names[0]: x}
        if cfg.target == "input":
            y = x
    else:
        where = str(cfg.path)
        xs, y = load_file(cfg.path, names, cfg.inputs, cfg.target)
        if cfg.limit is not None:
            xs, y = {k: v[: cfg.limit] for k, v in xs.items()}, y[: cfg.limit]
    xs = {k: conform_input(where, k, v, input_specs[k]) for k, v in xs.items()}
    if loss is not None:
        y = check_targets(where, y, loss, output_size)
    splits = split_arrays(xs, y, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    splits.source = where
    return splits
