"""Crash-safe writes (temp name, fsync, rename): ``rlhf_runtime.fsio``, re-exported.

The runtime writes placements and bundles atomically too, so the one implementation lives in the
runtime distribution (standard library only); the toolkit imports it from here as before.
"""

from __future__ import annotations

from rlhf_runtime.fsio import (
    atomic_write_bytes,
    check_new_dir,
    fsync_dir,
    fsync_tree,
    replace_dir,
    staged_dir,
    write_synced,
)

__all__ = [
    "atomic_write_bytes",
    "check_new_dir",
    "fsync_dir",
    "fsync_tree",
    "replace_dir",
    "staged_dir",
    "write_synced",
]
