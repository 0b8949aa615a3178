"""Crash-safe writes: nothing half-written ever sits where a good file or directory is expected.

A file is written to a temporary name beside its final place, flushed and fsynced, then renamed
over the target (rename is atomic on POSIX); a directory (a checkpoint, an export) is assembled
under a temporary name and swapped in the same way. The parent directory is fsynced after each
rename so the new name itself survives a power cut. Standard library only.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def write_synced(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (not atomic on its own: use it inside a temp dir)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so the names created or renamed in it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, rename."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    write_synced(tmp, data)
    os.replace(tmp, p)
    fsync_dir(p.parent)


def replace_dir(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Move the finished directory ``tmp`` to ``final``, replacing any directory already there.

    The old directory is first renamed aside, so at every moment ``final`` is either the old
    complete directory or the new complete one; the old one is removed afterwards.
    """
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
