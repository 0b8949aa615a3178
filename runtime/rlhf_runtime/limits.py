"""Ceilings on what an export directory may make the runtime read or allocate (stdlib only).

A manifest is input from whoever wrote the directory: its shapes decide how many bytes the
executor preallocates, and its size decides how much JSON is parsed. Each ceiling is a named
setting with a default far above any real edge model; override it per call
(``Executor(max_buffer_bytes=...)``, ``read_manifest(max_bytes=...)``) or for the whole process
with the environment variable named beside it. The error raised when one is hit names the limit.

The runtime keeps its own constants (it must not import ``toolkit.spec``, which holds the
builder-side parameter ceiling).
"""

from __future__ import annotations

import os

from rlhf_runtime.errors import InputError

MAX_MANIFEST_BYTES = 16 * 2**20
"""Largest manifest.json read (bytes); env ``RLHF_MAX_MANIFEST_BYTES``."""

MAX_BUFFER_BYTES = 4 * 2**30
"""Largest total of the buffers one batch size preallocates for the tensors crossing the cuts
(bytes); env ``RLHF_MAX_BUFFER_BYTES``."""

BINDING_CACHE_SIZE = 4
"""Batch sizes whose IO bindings *and* preallocated buffers stay cached (least recently used
first out)."""


def limit(name: str, default: int) -> int:
    """The value of a ceiling: the environment variable ``name`` when set (an int), else ``default``.

    Raises:
        InputError: the environment variable is set but not a positive integer.
    """
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise InputError(f"environment variable {name}: expected a positive integer, got {raw!r}")
    return value
