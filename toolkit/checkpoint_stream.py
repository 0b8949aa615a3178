"""Read a checkpoint's weights a few tensors at a time (for stage-by-stage work on large models).

``load_checkpoint`` reads the whole ``model.safetensors`` into memory; layer-wise training needs
one stage of a large teacher at a time. Here the file's SHA-256 is checked against
``checkpoint.json`` in chunks, the safetensors header (JSON) is parsed on its own, and each tensor
is read with one ``seek`` + ``readinto`` into its own buffer: no memory map (whose touched pages
would count in the resident set until it is closed) and never more than the requested tensors.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolkit.checkpoint import INDEX, WEIGHTS, find_checkpoint
from toolkit.errors import InputError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


class StreamedWeights:
    """The tensors of one checkpoint, read on demand; ``spec`` and ``meta`` from its header.

    Args:
        path: a run directory (its best checkpoint, else the last), a checkpoint directory
            (``checkpoint.json`` is checked) or a ``.safetensors`` file.

    Raises:
        FileNotFoundError: nothing to load.
        InputError: a hash mismatch, a malformed header or a file too short for its header.
    """

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        if p.is_dir() and not (p / INDEX).exists():
            p = find_checkpoint(p)
        if p.is_dir():
            index = json.loads((p / INDEX).read_text())
            file = p / WEIGHTS
            h = hashlib.sha256()
            with open(file, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            if h.hexdigest() != index.get("files", {}).get(WEIGHTS):
                raise InputError(
                    f"checkpoint {file} is corrupted or truncated: SHA-256 does not match {INDEX}"
                )
        elif p.is_file():
            file = p
        else:
            raise FileNotFoundError(f"checkpoint {p} not found")
        self.path = p
        self.file = file
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise InputError(f"checkpoint {file} is corrupted or truncated: no safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise InputError(f"checkpoint {file} is corrupted or truncated: header of {n} bytes")
            header = json.loads(f.read(n))
        self._base = 8 + n
        md = header.pop("__metadata__", None) or {}
        self.spec: dict[str, Any] = json.loads(md["spec"]) if "spec" in md else {}
        self.meta: dict[str, Any] = json.loads(md.get("meta", "{}"))
        self._entries: dict[str, _Entry] = {}
        for name, e in header.items():
            start, end = (int(x) for x in e["data_offsets"])
            entry = _Entry(_DTYPES[e["dtype"]], tuple(int(d) for d in e["shape"]), start, end)
            nbytes = torch.Size(entry.shape).numel() * torch.empty(0, dtype=entry.dtype).element_size()
            if end - start != nbytes or self._base + end > size:
                raise InputError(f"checkpoint {file} is corrupted or truncated: tensor {name}")
            self._entries[name] = entry

    def names(self, prefix: str = "") -> list[str]:
        """Tensor names starting with ``prefix``."""
        return [n for n in self._entries if n.startswith(prefix)]

    def read(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors whose names start with ``prefix``, keyed by the rest of the name."""
        out: dict[str, torch.Tensor] = {}
        with open(self.file, "rb") as f:
            for name in self.names(prefix):
                e = self._entries[name]
                buf = bytearray(e.end - e.start)
                f.seek(self._base + e.start)
                f.readinto(buf)
                t = torch.frombuffer(buf, dtype=e.dtype) if buf else torch.empty(0, dtype=e.dtype)
                out[name[len(prefix) :]] = t.reshape(e.shape)
        return out
