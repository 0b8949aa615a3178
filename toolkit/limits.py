"""Ceilings on what a file handed to the toolkit may ask for: spec text, nesting, sizes of a model.

A spec of a few hundred bytes can name a model of trillions of parameters, or (through YAML aliases)
expand to billions of values. Every reader checks these ceilings *before* it allocates anything, and
the error names the ceiling that was hit and how to raise it. Pure Python (no torch), so the spec
loader, the checkpoint reader and ``factorize.json`` all share one set of limits.

Ceilings and how to override them (environment variable, or the ``rlhf`` option of the same name):

=========================  ===============================  ==========================================
constant (default)         override                         what it bounds
=========================  ===============================  ==========================================
MAX_SPEC_BYTES (1 MiB)     RLHF_MAX_SPEC_BYTES              size of a spec file
MAX_SPEC_VALUES (100,000)  RLHF_MAX_SPEC_VALUES             values in a spec once YAML aliases expand
MAX_SPEC_DEPTH (32)        (fixed)                          nesting of lists / mappings in a spec
MAX_AUTO_STAGES (256)      (fixed)                          ``stages: {auto: {count: N}}``
MAX_NODE_PARAMS (1e9)      RLHF_MAX_NODE_PARAMS             parameters of one node / layer
MAX_MODEL_PARAMS (1e10)    RLHF_MAX_MODEL_PARAMS            parameters of a whole model
MAX_TENSOR_ELEMENTS (1e9)  RLHF_MAX_TENSOR_ELEMENTS         elements of one activation per example
=========================  ===============================  ==========================================

Byte ceilings are the parameter ceilings times ``BYTES_PER_PARAM`` (float32).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

from toolkit.errors import InputError

BYTES_PER_PARAM = 4  # float32

MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_VALUES = 100_000
MAX_SPEC_DEPTH = 32
MAX_AUTO_STAGES = 256
MAX_NODE_PARAMS = 1_000_000_000
MAX_MODEL_PARAMS = 10_000_000_000
MAX_TENSOR_ELEMENTS = 1_000_000_000

# limit name -> (environment variable, default)
LIMITS: dict[str, tuple[str, int]] = {
    "max_spec_bytes": ("RLHF_MAX_SPEC_BYTES", MAX_SPEC_BYTES),
    "max_spec_values": ("RLHF_MAX_SPEC_VALUES", MAX_SPEC_VALUES),
    "max_node_params": ("RLHF_MAX_NODE_PARAMS", MAX_NODE_PARAMS),
    "max_model_params": ("RLHF_MAX_MODEL_PARAMS", MAX_MODEL_PARAMS),
    "max_tensor_elements": ("RLHF_MAX_TENSOR_ELEMENTS", MAX_TENSOR_ELEMENTS),
}


def limit(name: str) -> int:
    """The current value of a ceiling: its environment variable when set, else the default.

    Args:
        name: a key of ``LIMITS`` (``"max_node_params"``, ...).

    Returns:
        The ceiling (a positive int).

    Raises:
        InputError: when the environment variable is set to something other than a positive integer.
        KeyError: for an unknown limit name (a bug in the caller).
    """
    env, default = LIMITS[name]
    raw = os.environ.get(env)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(float(raw)) if any(c in raw for c in ".eE") else int(raw)
    except (ValueError, OverflowError):
        raise InputError(f"{env}: expected a positive integer, got {raw!r}") from None
    if value < 1:
        raise InputError(f"{env}: expected a positive integer, got {raw!r}")
    return value


def describe(name: str) -> str:
    """How a ceiling is named in error messages: ``max_node_params = 1,000,000,000 (RLHF_MAX_NODE_PARAMS)``."""
    env, _ = LIMITS[name]
    return f"{name} = {limit(name):,} (raise it with {env} or --{name.replace('_', '-')})"


def numel(shape: Iterable[int]) -> int:
    """Number of elements of a shape, exact (Python ints never overflow)."""
    return math.prod(int(d) for d in shape)


_UNITS = {
    "max_node_params": "parameters",
    "max_model_params": "parameters",
    "max_tensor_elements": "elements",
    "max_spec_bytes": "bytes",
    "max_spec_values": "values",
}


def over(name: str, value: int, what: str) -> str | None:
    """The message refusing ``value`` when it exceeds the ceiling ``name``, else None.

    Args:
        name: a key of ``LIMITS``.
        value: the count asked for (parameters, elements, bytes, values).
        what: what asks for it, for the message: ``"node 'fc1'"``, ``"the model"``...

    Returns:
        "<what> needs 10,000,000,000 parameters, over the limit max_node_params = ..." or None.

    Raises:
        InputError: when the ceiling's environment variable is malformed.
    """
    if value <= limit(name):
        return None
    return f"{what} needs {value:,} {_UNITS.get(name, 'units')}, over the limit {describe(name)}"


def check(name: str, value: int, what: str) -> None:
    """Refuse ``value`` when it exceeds the ceiling ``name`` (see :func:`over`).

    Raises:
        InputError: naming ``what``, the count and the ceiling with its override.
    """
    message = over(name, value, what)
    if message is not None:
        raise InputError(message)


def check_params(count: int, what: str, *, scope: str = "node") -> None:
    """Refuse a parameter count over the per-node (``scope="node"``) or per-model ceiling.

    Args:
        count: number of parameters (for bytes, divide by the element size first).
        what: what asks for them, named in the message.
        scope: "node" (one layer / tensor) or "model" (the sum).

    Raises:
        InputError: naming ``what``, the count and the ceiling with its override.
    """
    check("max_node_params" if scope == "node" else "max_model_params", count, what)


def check_shape(shape: Iterable[int], what: str, *, scope: str = "node") -> int:
    """Refuse a weight tensor shape whose element count is over a parameter ceiling; return the count.

    Raises:
        InputError: for a negative dimension or a count over the ceiling.
    """
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise InputError(f"{what}: expected non-negative dimensions, got {dims}")
    count = math.prod(dims)
    check_params(count, what, scope=scope)
    return count
