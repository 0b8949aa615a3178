"""Crash-safe writes: nothing half-written ever sits where a good file or directory is expected.

A file is written to a temporary name beside its final place, flushed and fsynced, then renamed
over the target (rename is atomic on POSIX); a directory (a checkpoint, an export) is assembled
under a temporary name and swapped in the same way. The parent directory is fsynced after each
rename so the new name itself survives a power cut. Standard library only (and ``rlhf_runtime.errors``); ``toolkit.fsio`` re-exports it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from rlhf_runtime.errors import InputError


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


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file and directory under ``root`` (for files written by other libraries,
    e.g. ``save_pretrained``, before the directory is swapped in)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def check_new_dir(final: str | os.PathLike[str], overwrite: bool, option: str = "--overwrite") -> None:
    """Refuse an existing output directory unless ``overwrite``.

    Raises:
        InputError: ``final`` exists and ``overwrite`` is False (or it exists and is not a directory).
    """
    p = Path(final)
    if p.exists() and not p.is_dir():
        raise InputError(f"output directory {p}: expected a directory or a new path, got a file")
    if p.exists() and not overwrite:
        raise InputError(f"output directory {p} exists: expected a new path, or pass {option} to replace it")


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name beside ``final`` and swap it in when the block ends.

    On success every file is fsynced and the directory replaces ``final`` (``replace_dir``): an
    older ``final`` is gone as a whole, so no file of it (say an old ``model.onnx``) stays beside the
    new ones. On an exception the temporary directory is removed and ``final`` is untouched.

    Raises:
        InputError: ``final`` exists and ``overwrite`` is False (checked before the block runs).
    """
    check_new_dir(final, overwrite)
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
