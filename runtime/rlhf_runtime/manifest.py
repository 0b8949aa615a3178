"""Read and check an export directory's manifest.json (stdlib only: runs on a device without torch).

The manifest is written by ``toolkit.export``; its layout (format version 2)::

    {"format": "rlhf-export", "version": 2, "name": ..., "opset": 18,
     "inputs":  [{"name": "x", "dtype": "float32", "shape": [null, 64]}],   # null = batch axis
     "outputs": [...],
     "stages": [{"index": 0, "inputs": [...], "outputs": [...], "parameters": 18752,
                 "files": {"fp32": {"file": "stage_00.onnx", "sha256": ..., "bytes": ...,
                                    "data": {"file": "stage_00.onnx.data", "sha256": ...,
                                             "bytes": ..., "gathered": ...}},   # version 2, optional
                           "int8": {...}},                                   # optional variants
                 "parity": {"max_abs": ..., "max_rel": ...}}],
     "fused": {"files": {"fp32": {...}}, "parity": {...}},
     "parity": {...}, "quantization": {...} | null, "optimization": null | "basic",
     "text": {...},                  # text models only: tokenizer and limits (rlhf_runtime.text)
     "providers": "cpu" | "cuda" | ["CUDAExecutionProvider", ...]}          # optional

Version 2 adds ``data``: the file holding the entry's weights as ONNX *external data* (beside
the ONNX file, whose initializers name it as their ``location``), with its own sha256 and size, and
``gathered``: the length of its leading region holding the tables read only through ``Gather``
(embeddings), which a memory-mapped session faults in row by row instead of whole (the executor's memory estimate,
``weight_bytes``). Version 1 manifests (no ``data``) are still read. A manifest of a newer
``version`` than ``VERSION`` is refused with "upgrade rlhf-runtime"; the
optional ``providers`` is what ``Executor(providers="auto")`` uses, checked against this
onnxruntime build (``session.manifest_providers``).

Every file path is relative to the export directory; a path that is absolute, climbs out with
``..`` or resolves (through symlinks) outside the directory is refused before anything is read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from rlhf_runtime.errors import InputError
from rlhf_runtime.limits import MAX_MANIFEST_BYTES, limit

FORMAT = "rlhf-export"
VERSION = 2
READS = (1, 2)  # format versions this runtime reads
MANIFEST_NAME = "manifest.json"
DTYPES = ("float32", "float16", "float64", "int64", "int32", "bool")


@dataclass(frozen=True)
class TensorInfo:
    """Name, dtype and shape of a tensor crossing a cut.

    ``None`` in the shape is a dynamic axis: the first is the batch axis, any later one (e.g. a
    sequence length) takes whatever size the input has.
    """

    name: str
    dtype: str
    shape: tuple[int | None, ...]

    def describe(self) -> str:
        """``'x' float32 (B, 64)``: the form error messages use (``*`` for a later dynamic axis)."""
        dims = ", ".join(("B" if i == 0 else "*") if d is None else str(d) for i, d in enumerate(self.shape))
        return f"'{self.name}' {self.dtype} ({dims})"


@dataclass(frozen=True)
class FileEntry:
    """One ONNX file of the export: path relative to the directory, sha256 and size; ``data``: the
    external-data file holding its weights (format version 2), with ``gathered`` the length of its
    leading region holding the tables read only through Gather (embeddings)."""

    file: str
    sha256: str
    bytes: int
    data: FileEntry | None = None
    gathered: int = 0

    @property
    def data_location(self) -> str | None:
        """The name the ONNX file's initializers use for the data file (its name beside the file)."""
        return None if self.data is None else self.data.file.replace("\\", "/").rsplit("/", 1)[-1]

    @property
    def total_bytes(self) -> int:
        """The ONNX file plus its data file."""
        return self.bytes + (self.data.bytes if self.data is not None else 0)


@dataclass(frozen=True)
class StageEntry:
    """One stage: its tensors, parameter count and files per variant ("fp32", "int8")."""

    index: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    parameters: int
    files: dict[str, FileEntry]


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest; ``raw`` keeps the whole JSON document (parity, quantization reports)."""

    name: str
    opset: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    stages: tuple[StageEntry, ...]
    fused: dict[str, FileEntry]
    raw: dict[str, Any]

    def variants(self) -> list[str]:
        """Variants every stage has a file for (e.g. ``['fp32', 'int8']``)."""
        names = set(self.stages[0].files)
        for st in self.stages[1:]:
            names &= set(st.files)
        return sorted(names, key=lambda v: (v != "fp32", v))


def _fail(where: str, expected: str, got: Any) -> InputError:
    text = repr(got)
    if len(text) > 200:
        text = text[:200] + "..."
    return InputError(f"invalid manifest, {where}: expected {expected}, got {text}")


def _tensor(obj: Any, where: str) -> TensorInfo:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise _fail(where, "an object with a string 'name'", obj)
    dtype = obj.get("dtype")
    if dtype not in DTYPES:
        raise _fail(f"{where}.dtype", f"one of {list(DTYPES)}", dtype)
    shape = obj.get("shape")
    if not isinstance(shape, list) or not all(d is None or (isinstance(d, int) and d >= 0) for d in shape):
        raise _fail(f"{where}.shape", "a list of non-negative ints or null", shape)
    if any(d is True or d is False for d in shape):
        raise _fail(f"{where}.shape", "a list of non-negative ints or null, not booleans", shape)
    if not shape or shape[0] is not None:
        raise _fail(f"{where}.shape", "null (the batch axis) first", shape)
    return TensorInfo(obj["name"], dtype, tuple(shape))


def _tensors(obj: Any, where: str) -> tuple[TensorInfo, ...]:
    if not isinstance(obj, list) or not obj:
        raise _fail(where, "a non-empty list", obj)
    out = tuple(_tensor(t, f"{where}[{i}]") for i, t in enumerate(obj))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise _fail(where, "distinct tensor names", names)
    return out


def _int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(entry: Any, w: str, version: int, nested: bool = False) -> FileEntry:
    if not isinstance(entry, dict):
        raise _fail(w, "an object", entry)
    file, digest, size = entry.get("file"), entry.get("sha256"), entry.get("bytes")
    if not isinstance(file, str) or not file:
        raise _fail(f"{w}.file", "a relative path", file)
    if (
        not isinstance(digest, str)
        or len(digest) != 64
        or any(c not in "0123456789abcdefABCDEF" for c in digest)
    ):
        raise _fail(f"{w}.sha256", "64 hex digits", digest)
    if not _int(size):
        raise _fail(f"{w}.bytes", "a non-negative int", size)
    if nested:
        gathered = entry.get("gathered", 0)
        if not _int(gathered) or gathered > size:
            raise _fail(f"{w}.gathered", f"an int from 0 to the data file's {size} bytes", gathered)
        return FileEntry(file, digest.lower(), size, gathered=gathered)
    raw_data = entry.get("data")
    if raw_data is None:
        return FileEntry(file, digest.lower(), size)
    if version < 2:
        raise _fail(
            f"{w}.data", "no external data file in a version 1 manifest (version 2 has them)", raw_data
        )
    data = _entry(raw_data, f"{w}.data", version, nested=True)
    # beside ``file``: checked where both paths are resolved (session.open_session), like every path
    return FileEntry(
        file, digest.lower(), size, data=FileEntry(data.file, data.sha256, data.bytes), gathered=data.gathered
    )


def _files(obj: Any, where: str, version: int = VERSION) -> dict[str, FileEntry]:
    if not isinstance(obj, dict) or "fp32" not in obj:
        raise _fail(where, "an object with at least an 'fp32' entry", obj)
    return {variant: _entry(entry, f"{where}.{variant}", version) for variant, entry in obj.items()}


def parse_manifest(doc: Any) -> Manifest:
    """Check a manifest document's structure (not the files) and return it parsed.

    Raises:
        InputError: a field is missing or has the wrong type; the message names the field.
    """
    if not isinstance(doc, dict):
        raise _fail("top level", "a JSON object", type(doc).__name__)
    if doc.get("format") != FORMAT:
        raise _fail("format", repr(FORMAT), doc.get("format"))
    version = doc.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise InputError(
            f"manifest.json: format version {version} is newer than this rlhf-runtime reads ({VERSION}): "
            "upgrade rlhf-runtime (pip install -U rlhf-runtime, or install the wheel of the bundle)"
        )
    if not isinstance(version, int) or isinstance(version, bool) or version not in READS:
        raise _fail("version", " or ".join(map(str, READS)), version)
    stages_raw = doc.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise _fail("stages", "a non-empty list", stages_raw)
    stages = []
    for i, st in enumerate(stages_raw):
        w = f"stages[{i}]"
        if not isinstance(st, dict):
            raise _fail(w, "an object", st)
        parameters = st.get("parameters", 0)
        if not isinstance(parameters, int) or isinstance(parameters, bool) or parameters < 0:
            raise _fail(f"{w}.parameters", "a non-negative int", parameters)
        stages.append(
            StageEntry(
                index=i,
                inputs=_tensors(st.get("inputs"), f"{w}.inputs"),
                outputs=_tensors(st.get("outputs"), f"{w}.outputs"),
                parameters=parameters,
                files=_files(st.get("files"), f"{w}.files", version),
            )
        )
    fused_raw = doc.get("fused")
    fused = _files(fused_raw.get("files"), "fused.files", version) if isinstance(fused_raw, dict) else {}
    opset = doc.get("opset")
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise _fail("opset", "an int", opset)
    inputs = _tensors(doc.get("inputs"), "inputs")
    outputs = _tensors(doc.get("outputs"), "outputs")
    _check_flow(inputs, outputs, stages)
    return Manifest(
        name=str(doc.get("name", "")),
        opset=opset,
        inputs=inputs,
        outputs=outputs,
        stages=tuple(stages),
        fused=fused,
        raw=doc,
    )


def _check_flow(
    inputs: tuple[TensorInfo, ...], outputs: tuple[TensorInfo, ...], stages: list[StageEntry]
) -> None:
    """Every stage reads only graph inputs or earlier stages' outputs (with the same dtype and
    shape), and every graph output is produced somewhere."""
    known = {t.name: t for t in inputs}
    for st in stages:
        for j, t in enumerate(st.inputs):
            if t.name not in known:
                raise _fail(
                    f"stages[{st.index}].inputs[{j}].name",
                    f"a graph input or an earlier stage's output ({sorted(known)})",
                    t.name,
                )
            if (known[t.name].dtype, known[t.name].shape) != (t.dtype, t.shape):
                raise _fail(
                    f"stages[{st.index}].inputs[{j}]",
                    f"{known[t.name].describe()} as produced earlier",
                    t.describe(),
                )
        for t in st.outputs:
            known.setdefault(t.name, t)
    for j, t in enumerate(outputs):
        if t.name not in known or (known[t.name].dtype, known[t.name].shape) != (t.dtype, t.shape):
            raise _fail(
                f"outputs[{j}]", "a tensor some stage produces, with its dtype and shape", t.describe()
            )


def read_manifest(export_dir: str | os.PathLike[str], *, max_bytes: int | None = None) -> Manifest:
    """Load ``export_dir/manifest.json`` with the json module (never executes code) and check it.

    Args:
        export_dir: the export directory.
        max_bytes: largest manifest read (default ``limits.MAX_MANIFEST_BYTES``, or the environment
            variable ``RLHF_MAX_MANIFEST_BYTES``).

    Raises:
        FileNotFoundError: the directory or its manifest does not exist.
        InputError: the manifest is larger than ``max_bytes``, not valid JSON (or nested too
            deeply), or has the wrong structure.
    """
    root = Path(export_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"export directory not found: {root}")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {root}: expected an export directory written by `rlhf export`"
        )
    ceiling = max_bytes if max_bytes is not None else limit("RLHF_MAX_MANIFEST_BYTES", MAX_MANIFEST_BYTES)
    size = path.stat().st_size
    if size > ceiling:
        raise InputError(
            f"invalid manifest {path}: {size} bytes, above the limit max_manifest_bytes={ceiling} "
            "(raise it with RLHF_MAX_MANIFEST_BYTES)"
        )
    with open(path, "rb") as f:
        data = f.read(ceiling + 1)
    return parse_manifest_bytes(data, str(path))


def parse_manifest_bytes(data: bytes, where: str = MANIFEST_NAME) -> Manifest:
    """Decode and check a manifest document given as bytes (what ``read_manifest`` reads).

    Raises:
        InputError: not UTF-8 JSON, nested too deeply, or the wrong structure.
    """
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"invalid manifest {where}: not JSON ({exc})") from None
    except RecursionError:
        raise InputError(f"invalid manifest {where}: JSON nested too deeply") from None
    return parse_manifest(doc)


def safe_path(root: str | os.PathLike[str], rel: str) -> Path:
    """Resolve a manifest path inside ``root``, refusing anything that escapes it.

    Raises:
        InputError: ``rel`` is absolute, contains ``..``, or resolves (through symlinks) outside ``root``.
    """
    if "\x00" in rel:
        raise InputError(f"manifest path {rel!r} contains a NUL byte: expected a file name")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise InputError(
            f"manifest path {rel!r} is absolute: expected a path relative to the export directory"
        )
    parts = rel.replace("\\", "/").split("/")
    if ".." in parts:
        raise InputError(f"manifest path {rel!r} contains '..': expected a path inside the export directory")
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise InputError(f"manifest path {rel!r} resolves to {target}, outside the export directory {base}")
    return target


def source_path(root: str | os.PathLike[str], manifest: Manifest) -> Path | None:
    """The checkpoint the manifest's ``source`` names, under the same path policy as its files.

    ``source`` is provenance written by the exporter; it is only followed when it is a path
    relative to the export directory that stays inside it. Anything else (absolute, ``..``, a
    symlink out) is refused: a caller that wants it passes the path explicitly instead.

    Returns:
        The resolved path, or None when the manifest names no source.

    Raises:
        InputError: ``source`` is not a string, or escapes the export directory.
    """
    raw = manifest.raw.get("source")
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise _fail("source", "a path relative to the export directory", raw)
    try:
        return safe_path(root, raw)
    except InputError as exc:
        raise InputError(f"manifest source: {exc}") from None


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_verified(root: str | os.PathLike[str], entry: FileEntry) -> bytes:
    """Read a manifest file's bytes after checking its path, size and sha256.

    The bytes that were hashed are the bytes returned, so a file swapped between the check and
    the load cannot slip through.

    Raises:
        InputError: unsafe path, or the size/sha256 differ from the manifest (file tampered with).
        FileNotFoundError: the file is missing.
    """
    path = safe_path(root, entry.file)
    if not path.is_file():
        raise FileNotFoundError(f"{entry.file} listed in the manifest is missing from {root}")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != entry.bytes or digest != entry.sha256:
        raise InputError(
            f"{entry.file}: sha256 mismatch, expected {entry.sha256} ({entry.bytes} bytes), "
            f"got {digest} ({len(data)} bytes); the file was modified after export, refusing to load it"
        )
    return data


def verified_path(root: str | os.PathLike[str], entry: FileEntry) -> tuple[Path, os.stat_result]:
    """Check a manifest file's path, size and sha256 (read in chunks) and return its resolved path.

    Loading by path lets onnxruntime read the file itself, which needs about one stage's size of
    memory instead of three (Python bytes + protobuf + tensors). The returned ``stat`` lets the
    caller check that the file was not replaced while it was being loaded (``same_file``).

    Raises:
        InputError: unsafe path, or the size/sha256 differ from the manifest.
        FileNotFoundError: the file is missing.
    """
    path = safe_path(root, entry.file)
    if not path.is_file():
        raise FileNotFoundError(f"{entry.file} listed in the manifest is missing from {root}")
    before = path.stat()
    digest = sha256_file(path)
    if before.st_size != entry.bytes or digest != entry.sha256:
        raise InputError(
            f"{entry.file}: sha256 mismatch, expected {entry.sha256} ({entry.bytes} bytes), "
            f"got {digest} ({before.st_size} bytes); the file was modified after export, refusing to load it"
        )
    return path, before


def same_file(path: Path, before: os.stat_result) -> bool:
    """True when ``path`` is still the file (inode, size, mtime) that was hashed."""
    try:
        now = path.stat()
    except OSError:
        return False
    return (now.st_ino, now.st_dev, now.st_size, now.st_mtime_ns) == (
        before.st_ino,
        before.st_dev,
        before.st_size,
        before.st_mtime_ns,
    )
