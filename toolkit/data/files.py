"""The user's own data files: .npz (named arrays), .npy (one array, plain or structured), .csv (header row).

Mapping (``DataConfig.inputs`` / ``DataConfig.target``):

- ``inputs`` maps each graph input to an array name (.npz, structured .npy) or to a column name or a
  list of column names (.csv). When omitted, a graph input ``x`` reads the array/column ``x`` (.npz), or
  every column except the target (.csv, plain .npy, single graph input).
- ``target`` names the target array/column (default ``y``); the reserved value ``input`` means "the
  graph's only input" (autoencoders: the target is the input itself).
- A plain (non-structured) 2-D .npy array holds the input columns and, last, the target column,
  unless ``target: input``.

Loading never executes code: ``np.load(..., allow_pickle=False)``.
"""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import InputError

TARGET_IS_INPUT = "input"


def load_npy(path: str | Path) -> np.ndarray:
    """Read a .npy file; never unpickles.

    Raises:
        FileNotFoundError: when the file does not exist.
        InputError: when numpy cannot read it (truncated, not numpy, object arrays).
    """
    arr = _numpy_read(Path(path))
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{path}: expected one array (.npy), got an archive of several")
    return arr


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read a .npz file into name -> array; never unpickles.

    Raises:
        FileNotFoundError: when the file does not exist.
        InputError: when numpy cannot read it (truncated, not an archive, object arrays).
    """
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise InputError(f"{p}: expected a .npz archive of named arrays, got one array")
            return {k: z[k] for k in z.files}
    except (FileNotFoundError, IsADirectoryError, PermissionError, InputError):
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{p}: expected a readable .npz file (no pickles), got: {exc}") from None


def _numpy_read(p: Path) -> Any:
    try:
        return np.load(p, allow_pickle=False)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{p}: expected a readable .npy file (no pickles), got: {exc}") from None


def _columns(table: dict[str, np.ndarray], names: str | list[str], where: str) -> np.ndarray:
    cols = [names] if isinstance(names, str) else list(names)
    if not cols:
        raise InputError(f"{where}: expected at least one column name, got []")
    missing = [c for c in cols if c not in table]
    if missing:
        raise InputError(f"{where}: unknown column {missing[0]!r}; known: {sorted(table)}")
    if isinstance(names, str):
        return table[names]
    return np.stack([table[c] for c in cols], axis=1)  # (N, len(cols))


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise InputError(f"{path}: expected a header row with column names, got an empty file")
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header) or any(not h for h in header):
        raise InputError(f"{path}: expected unique non-empty column names in the header, got {header}")
    body = [r for r in rows[1:] if r]
    data = np.empty((len(body), len(header)), dtype=np.float64)
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise InputError(f"{path}:{i + 2}: expected {len(header)} fields, got {len(row)}")
        try:
            data[i] = [float(v) for v in row]
        except ValueError as exc:
            raise InputError(f"{path}:{i + 2}: expected numbers, got {row}") from exc
    return {h: data[:, j] for j, h in enumerate(header)}


def load_file(
    path: str | Path,
    input_names: list[str],
    inputs: dict[str, str | list[str]] | None = None,
    target: str | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read a data file into per-input arrays and targets.

    Args:
        path: a .npz, .npy or .csv file.
        input_names: the graph's input names.
        inputs: graph input -> array or column name(s); see the module docstring for defaults.
        target: target array/column name, or ``input`` for the graph's only input (default ``y``).

    Returns:
        (inputs, targets): dict graph input -> (N, ...) array, and the (N, ...) targets.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: unknown extension, unknown array/column, or an unusable layout.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {p} not found")
    target = target or "y"
    ext = p.suffix.lower()
    table: dict[str, np.ndarray]
    if ext == ".npz":
        table = load_npz(p)
    elif ext == ".csv":
        table = _read_csv(p)
    elif ext == ".npy":
        arr = load_npy(p)
        if arr.dtype.names:
            table = {n: arr[n] for n in arr.dtype.names}
        else:
            if len(input_names) != 1:
                raise InputError(
                    f"{p}: a plain .npy array feeds exactly one graph input, got inputs {input_names}"
                )
            if target == TARGET_IS_INPUT:
                return {input_names[0]: arr}, arr
            if arr.ndim != 2 or arr.shape[1] < 2:
                raise InputError(
                    f"{p}: expected a 2-D array (N, features + 1) whose last column is the target, got shape {arr.shape}"
                )
            return {input_names[0]: arr[:, :-1]}, arr[:, -1]
    else:
        raise InputError(f"{p}: expected a .npz, .npy or .csv file, got {ext or 'no extension'!r}")
    where = str(p)
    if inputs is None:
        if ext == ".csv" and len(input_names) == 1:
            rest = [c for c in table if c != target]
            inputs = {input_names[0]: rest}
        else:
            inputs = {n: n for n in input_names}
    unknown = sorted(set(inputs) - set(input_names))
    if unknown:
        raise InputError(
            f"{where}: data.inputs names unknown graph input {unknown[0]!r}; known: {input_names}"
        )
    missing = [n for n in input_names if n not in inputs]
    if missing:
        raise InputError(f"{where}: no data for graph input {missing[0]!r}; expected it in data.inputs")
    xs = {name: _columns(table, inputs[name], where) for name in input_names}
    if target == TARGET_IS_INPUT:
        if len(input_names) != 1:
            raise InputError(f"{where}: target 'input' needs exactly one graph input, got {input_names}")
        return xs, xs[input_names[0]]
    return xs, _columns(table, target, where)
