"""The external-data files an ONNX model refers to, read from its protobuf bytes (standard library only).

An initializer stored as ONNX *external data* names a file (``location``) that onnxruntime opens
beside the model. The runtime must know every such name before a session is created: a model whose
manifest entry lists ``stage_00.onnx.data`` must not read ``weights.bin`` (unhashed) or
``../../etc/passwd``. The ``onnx`` package is not a runtime dependency, so this walks the protobuf
wire format itself, descending only into the fields that can hold a TensorProto:

    ModelProto.graph (7), .training_info (20: .initialization 1, .algorithm 2), .functions (25)
    GraphProto.node (1), .initializer (5), .sparse_initializer (15)
    FunctionProto.node (7)
    NodeProto.attribute (5)
    AttributeProto.t (5), .g (6), .tensors (10), .graphs (11), .sparse_tensor (22), .sparse_tensors (23)
    SparseTensorProto.values (1), .indices (2)
    TensorProto.external_data (13: StringStringEntryProto key 1 / value 2), .data_location (14)

Tensor payloads (``raw_data``) are skipped by their length, never copied, so a 100 MB inline file
costs one pass over its few thousand field headers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from rlhf_runtime.errors import InputError

_MODEL, _GRAPH, _FUNCTION, _NODE, _ATTR, _SPARSE, _TENSOR, _TRAINING = range(8)
# message kind -> {field number: kind of the embedded message}
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _FUNCTION: {7: _NODE},
    _NODE: {5: _ATTR},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
}
MAX_DEPTH = 64  # nested subgraphs (If / Loop bodies); deeper is refused, not recursed into


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value or (start, end) of a length-delimited payload)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == 1:
            pos += 8
            yield number, wire, None
        elif wire == 5:
            pos += 4
            yield number, wire, None
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise ValueError("a field runs past the end of its message")
            yield number, wire, (pos, pos + length)
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > end:
            raise ValueError("a field runs past the end of its message")


def _tensor_location(buf: memoryview, start: int, end: int) -> str | None:
    external = False
    location = None
    for number, wire, value in _fields(buf, start, end):
        if number == 14 and wire == 0:
            external = value == 1  # TensorProto.DataLocation.EXTERNAL
        elif number == 13 and wire == 2:
            s, e = value
            key = val = None
            for n2, w2, v2 in _fields(buf, s, e):
                if w2 == 2 and n2 in (1, 2):
                    text = bytes(buf[v2[0] : v2[1]]).decode("utf-8", errors="replace")
                    if n2 == 1:
                        key = text
                    else:
                        val = text
            if key == "location":
                location = val if val is not None else ""
    if external or location is not None:
        return location if location is not None else ""
    return None


def external_locations(model: bytes | bytearray | memoryview, where: str = "model") -> set[str]:
    """Every ``location`` an initializer or tensor attribute of ``model`` (serialized ModelProto)
    stores its data in; empty for a self-contained file.

    Raises:
        InputError: the bytes are not a well-formed ONNX protobuf (one line naming ``where``).
    """
    buf = memoryview(model)
    found: set[str] = set()
    stack = [(_MODEL, 0, len(buf), 0)]
    try:
        while stack:
            kind, start, end, depth = stack.pop()
            if kind == _TENSOR:
                loc = _tensor_location(buf, start, end)
                if loc is not None:
                    found.add(loc)
                continue
            children = _CHILDREN[kind]
            for number, wire, value in _fields(buf, start, end):
                child = children.get(number)
                if child is not None and wire == 2:
                    if depth >= MAX_DEPTH:
                        raise ValueError(f"nested deeper than {MAX_DEPTH} messages")
                    stack.append((child, value[0], value[1], depth + 1))
    except ValueError as exc:
        raise InputError(f"{where}: not a well-formed ONNX file ({exc}): refusing it") from None
    return found


def check_locations(model: bytes | bytearray | memoryview, allowed: str | None, where: str) -> None:
    """Refuse a model whose external data is anything but the one file its manifest entry lists.

    Args:
        model: the serialized ModelProto.
        allowed: the data file's name (beside the model) from the manifest, or None when the entry
            lists no data file (then the model must be self-contained).
        where: the model's name, for the message.

    Raises:
        InputError: one line naming the model and the location it may not read.
    """
    for loc in sorted(external_locations(model, where)):
        if loc != allowed:
            expected = (
                f"only {allowed!r}, the data file its manifest entry lists"
                if allowed
                else ("no external data (its manifest entry lists no data file)")
            )
            raise InputError(f"{where}: stores tensors in {loc!r}: expected {expected}; refusing it")
