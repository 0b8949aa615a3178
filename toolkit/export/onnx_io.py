"""Export one torch module to a self-contained ONNX file, and check it.

The exporter is ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript). With torch 2.13
it keeps every parameter under its module path as the initializer name (``fc1.V.weight``) and
emits one ``Gemm`` per linear layer, whereas the TorchScript exporter (``dynamo=False``) is
deprecated, renames folded weights (``onnx::MatMul_11``, stored transposed) and warns that it
will be removed. Its minimum opset is 18, which onnxruntime supports since 1.14.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from toolkit.errors import InputError
from toolkit.fsio import write_synced

DEFAULT_OPSET = 18
BATCH = "batch"
SEQUENCE = "sequence"


_REGISTRY_CACHE: dict[Any, Any] = {}


@contextlib.contextmanager
def _cached_torchlib_registry() -> Iterator[None]:
    """Build the exporter's op registry once per opset instead of once per call (~3 s each).

    torch.onnx rebuilds ``ONNXRegistry.from_torchlib`` on every export; a staged model exports
    one graph per stage plus the fused one. The registry is only read when no custom translation
    table is given (we never give one). Private API: when it is not there, nothing is patched.
    """
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:  # pragma: no cover - other torch versions
        yield
        return
    cls = getattr(_registration, "ONNXRegistry", None)
    original = cls.__dict__.get("from_torchlib") if cls is not None else None
    if cls is None or not isinstance(original, classmethod):
        yield
        return
    build = original.__get__(None, cls)

    def cached(*args: Any, **kwargs: Any) -> Any:
        key = (args, tuple(sorted(kwargs.items())))
        if key not in _REGISTRY_CACHE:
            _REGISTRY_CACHE[key] = build(*args, **kwargs)
        return _REGISTRY_CACHE[key]

    cls.from_torchlib = staticmethod(cached)
    try:
        yield
    finally:
        cls.from_torchlib = original


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's progress warnings (torchvision ops missing, deprecations)."""
    loggers = [
        logging.getLogger(n)
        for n in ("torch.onnx", "torch.export", "torch._export", "torch.__trace", "torch.fx", "onnxscript")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


_PREFIX = "_rlhf_inner"


class _Holder(nn.Module):
    """Holds a module one level down, so its children's names cannot collide with attributes of
    torch.fx.GraphModule (a node id ``code`` breaks torch.export: ``GraphModule.code`` is a property)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        setattr(self, _PREFIX, inner)

    def forward(self, *xs: torch.Tensor) -> Any:
        return getattr(self, _PREFIX)(*xs)


def _needs_holder(module: nn.Module) -> bool:
    reserved = set(dir(torch.fx.GraphModule))
    return any(name in reserved for name, _ in module.named_children())


def rename_inputs(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    """Point every node input named in ``names`` at its new name."""
    for node in graph.node:
        node.input[:] = [names.get(name, name) for name in node.input]


def _strip_prefix(proto: onnx.ModelProto, prefix: str) -> None:
    """Rename initializers ``prefix.a.b`` back to ``a.b`` everywhere they are referenced."""
    renames = {i.name: i.name[len(prefix) :] for i in proto.graph.initializer if i.name.startswith(prefix)}
    if not renames:
        return
    for init in proto.graph.initializer:
        init.name = renames.get(init.name, init.name)
    rename_inputs(proto.graph, renames)
    for vi in proto.graph.value_info:
        vi.name = renames.get(vi.name, vi.name)


def export_module(
    module: nn.Module,
    args: Sequence[torch.Tensor],
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int = DEFAULT_OPSET,
    sequence: Sequence[bool] | None = None,
    max_sequence: int | None = None,
) -> onnx.ModelProto:
    """Trace ``module(*args)`` to ONNX with a dynamic batch axis (axis 0 of every input and output).

    With ``sequence``, axis 1 of the flagged inputs is a second dynamic axis (one sequence length
    shared by all of them, at most ``max_sequence``).

    Args:
        module: the stage (or whole model), in eval mode.
        args: example inputs, batch size >= 2 (torch.export specializes a batch of 1).
        input_names, output_names: names of the graph inputs/outputs (the tensors crossing the cut).
        opset: ONNX opset (>= 18 for this exporter).

    Returns:
        The ModelProto, weights embedded.

    Raises:
        ValueError: the exporter failed, or names collide (a stage returning one of its inputs unchanged).
    """
    if opset < 18:
        raise InputError(f"opset: expected >= 18 (torch.onnx dynamo exporter), got {opset}")
    clash = set(input_names) & set(output_names)
    if clash:
        raise ValueError(
            f"tensor names {sorted(clash)} are both inputs and outputs of one stage: expected a stage to "
            "produce new tensors (the executor keeps earlier tensors available to later stages)"
        )
    batch = torch.export.Dim(BATCH)
    seq = torch.export.Dim(SEQUENCE, max=max_sequence) if sequence and any(sequence) else None
    flags = list(sequence or [False] * len(args))
    per_arg = tuple({0: batch, 1: seq} if flag and seq is not None else {0: batch} for flag in flags)
    held = _needs_holder(module)
    target: nn.Module = _Holder(module) if held else module
    params = list(inspect.signature(target.forward).parameters.values())
    varargs = bool(params) and params[0].kind is inspect.Parameter.VAR_POSITIONAL
    dynamic = (per_arg,) if varargs else per_arg  # forward(*xs) takes one nested spec
    with _quiet(), _cached_torchlib_registry(), torch.no_grad():
        try:
            program = torch.onnx.export(
                target.eval(),
                tuple(args),
                None,
                input_names=list(input_names),
                output_names=list(output_names),
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=dynamic,
                optimize=True,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many internal types
            root = exc.__cause__ or exc
            first = (str(root).strip().splitlines() or [type(root).__name__])[0]
            raise ValueError(f"torch.onnx.export failed for {type(module).__name__}: {first}") from exc
    assert program is not None
    proto = program.model_proto
    if held:
        _strip_prefix(proto, _PREFIX + ".")
    return proto


def check_model(
    proto: onnx.ModelProto, input_names: Sequence[str], output_names: Sequence[str]
) -> onnx.ModelProto:
    """onnx.checker (full) and strict shape inference; names of inputs/outputs must be as asked.

    Returns:
        The model with inferred value_info.

    Raises:
        ValueError: the checker or shape inference fails, or the names differ.
    """
    try:
        onnx.checker.check_model(proto, full_check=False)
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ValueError(f"ONNX check failed: {exc}") from exc
    got_in = [i.name for i in proto.graph.input]
    got_out = [o.name for o in proto.graph.output]
    if got_in != list(input_names) or got_out != list(output_names):
        raise ValueError(
            f"ONNX graph names: expected inputs {list(input_names)} outputs {list(output_names)}, "
            f"got inputs {got_in} outputs {got_out}"
        )
    return inferred


def save_model(proto: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Write one self-contained file (no external-data sidecar) and fsync it."""
    write_synced(path, proto.SerializeToString())  # raises ValueError above the 2 GB protobuf limit


def gemm_to_matmul(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite ``Gemm(A, B, C)`` with a constant B as ``MatMul(A, Bᵀ) + C``.

    onnxruntime's dynamic quantization handles MatMul (MatMulInteger) but not Gemm, which is what
    the exporter emits for linear layers. Only alpha = beta = 1, transA = 0 is rewritten.
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (
            node.op_type != "Gemm"
            or node.input[1] not in inits
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
            or attrs.get("transA", 0) != 0
        ):
            nodes.append(node)
            continue
        b = inits[node.input[1]]
        if attrs.get("transB", 0):
            w = numpy_helper.to_array(b)
            b.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T), b.name))
        has_bias = len(node.input) > 2 and node.input[2] != ""
        mm_out = node.output[0] + "_matmul" if has_bias else node.output[0]
        nodes.append(
            onnx.helper.make_node(
                "MatMul", [node.input[0], node.input[1]], [mm_out], name=node.name + "_MatMul"
            )
        )
        if has_bias:
            nodes.append(
                onnx.helper.make_node(
                    "Add", [mm_out, node.input[2]], [node.output[0]], name=node.name + "_Add"
                )
            )
    del g.node[:]
    g.node.extend(nodes)
    return out


def compact(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop what a deployed file does not need: per-node metadata (the exporter's stack traces,
    which also leak source paths), doc strings and intermediate value_info (onnxruntime infers
    shapes itself). Graph inputs/outputs, initializer names and opsets are untouched."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    out.doc_string = ""
    g = out.graph
    g.doc_string = ""
    for node in g.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del g.value_info[:]
    for t in g.initializer:
        t.doc_string = ""
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute
    ):
        return out  # subgraphs may refer to outer names: leave the names alone
    # intermediate tensor and node names carry nothing a user sees: make them short
    keep = {i.name for i in g.input} | {o.name for o in g.output} | {t.name for t in g.initializer}
    short: dict[str, str] = {}
    for i, node in enumerate(g.node):
        node.name = f"n{i}"
        for j, name in enumerate(node.output):
            if name and name not in keep:
                short.setdefault(name, f"t{len(short)}")
                node.output[j] = short[name]
    rename_inputs(g, short)
    return out


def biases_to_fp16(proto: onnx.ModelProto, min_elements: int = 32) -> onnx.ModelProto:
    """Store float32 bias vectors as float16, each followed by a ``Cast`` back to float32.

    A bias is a 1-D float32 initializer whose only consumers are ``Add`` nodes (what dynamic
    quantization leaves of a linear layer's bias). Compute stays in float32: onnxruntime's constant
    folding turns ``Cast(initializer)`` into a float32 tensor once, when the session is created.
    Halves the bytes of the biases, which int8 weight storage leaves as a visible share of a small
    model's file; the rounding (relative 2⁻¹¹) is far below int8 weight error. The initializer keeps
    the parameter's name; the Cast output gets ``<name>_fp32``. Biases under ``min_elements``
    stay float32: their Cast node would cost more bytes than it saves.
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    consumers: dict[str, set[str]] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    graph_inputs = {i.name for i in g.input}
    casts: list[onnx.NodeProto] = []
    renamed: dict[str, str] = {}
    for init in g.initializer:
        if (
            init.data_type != onnx.TensorProto.FLOAT
            or len(init.dims) != 1
            or init.dims[0] < min_elements
            or init.name in graph_inputs
            or consumers.get(init.name) != {"Add"}
        ):
            continue
        value = numpy_helper.to_array(init)
        init.CopyFrom(numpy_helper.from_array(value.astype(np.float16), init.name))
        renamed[init.name] = f"{init.name}_fp32"
        casts.append(
            onnx.helper.make_node(
                "Cast", [init.name], [renamed[init.name]], to=onnx.TensorProto.FLOAT, name=f"{init.name}_cast"
            )
        )
    if not casts:
        return out
    rename_inputs(g, renamed)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(casts + nodes)  # casts read only initializers: placing them first keeps topological order
    return out


EXTERNAL_MIN_BYTES = 1024  # tensors this large or larger go to the data file (onnx's own default)
EXTERNAL_ALIGN = 4096  # each tensor starts on a page boundary of the data file: mapped in place


def gathered_initializers(graph: onnx.GraphProto) -> set[str]:
    """Initializers read only as the table (input 0) of ``Gather`` nodes of this graph: embeddings,
    of which a run reads the rows of its tokens. A name any subgraph or other input mentions is not."""
    uses: dict[str, set[tuple[str, int]]] = {}

    def walk(g: onnx.GraphProto, top: bool) -> None:
        for node in g.node:
            for k, name in enumerate(node.input):
                uses.setdefault(name, set()).add((node.op_type if top else "", k))
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    walk(sub, False)
        for out in g.output:
            uses.setdefault(out.name, set()).add(("", -1))

    walk(graph, True)
    return {t.name for t in graph.initializer if uses.get(t.name) and uses[t.name] <= {("Gather", 0)}}


def to_external_data(
    data: bytes, location: str, min_bytes: int = EXTERNAL_MIN_BYTES, align: int = EXTERNAL_ALIGN
) -> tuple[bytes, bytes, int]:
    """Move a model's large initializers into one external-data file.

    Each initializer of the main graph with ``raw_data`` of at least ``min_bytes`` is written to the
    data file at an offset aligned to ``align`` (onnxruntime maps such a file and uses the mapped
    pages as the tensors' memory) and replaced by a reference to ``location`` (a name beside the
    model file). The tables read only through Gather come first, so they form one leading region
    that the runtime can evict from the page cache (``rlhf_runtime.session.evict_cached``). Same bytes, same graph: a session of the pair computes exactly what one of the
    self-contained file computes.

    Args:
        data: a serialized self-contained ModelProto.
        location: the data file's name, as the model will refer to it.

    Returns:
        (the model's new bytes, the data file's bytes (empty when no tensor qualified), the length
        of the data file's leading region holding the tables read only through Gather, see
        ``gathered_initializers``; 0 when there are none).
    """
    proto = onnx.load_from_string(data)
    gathered = gathered_initializers(proto.graph)
    blob = bytearray()
    gathered_bytes = 0
    big = [
        t
        for t in proto.graph.initializer
        if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= min_bytes
    ]
    big.sort(key=lambda t: t.name not in gathered)  # the Gather-only tables first: one leading region
    for tensor in big:
        raw = tensor.raw_data
        offset = -len(blob) % align + len(blob)
        blob.extend(b"\0" * (offset - len(blob)))
        blob.extend(raw)
        if tensor.name in gathered:
            gathered_bytes = len(blob)
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    if not blob:
        return data, b"", 0
    return proto.SerializeToString(), bytes(blob), gathered_bytes
