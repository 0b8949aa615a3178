"""The registry of node types, by short name: parameters, arity, shape inference and cost.

A spec names an op from this table and nothing else, so it can never import or run code. Shapes
here never include the batch axis; axes count over the per-example shape (negative from the end).
Costs are per example: parameters and multiply-adds of the matrix products (elementwise ops,
normalisation and pooling count as 0 multiply-adds; attention counts QKᵀ and the weighted sum of V).
Transformer ops treat axis 0 of the per-example shape as the sequence axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from toolkit.errors import InputError

Shape = tuple[int, ...]
TensorInfo = tuple[Shape, str]  # (shape without batch axis, dtype)

REQUIRED = object()  # marker: the op needs this parameter


class OpError(InputError):
    """Shape inference failed; ``key`` is the node field to blame (``in``, ``axis``, ...)."""

    def __init__(self, message: str, key: str = "in") -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class OpDef:
    """One node type.

    Attributes:
        name: the short name used in specs.
        params: parameter name -> default (``REQUIRED`` when the op needs it).
        min_inputs, max_inputs: how many ``in`` references (max None = any number).
        infer: (node, input infos) -> output info; raises OpError.
        factorizable: True for linear, conv2d, embedding.
        doc: one line for the JSON schema and ``rlhf show``.
    """

    name: str
    params: dict[str, Any]
    min_inputs: int
    max_inputs: int | None
    infer: Callable[[Any, list[TensorInfo]], TensorInfo]
    factorizable: bool = False
    doc: str = ""
    float_only: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _axis(axis: int, ndim: int, key: str = "axis") -> int:
    if not -ndim <= axis < ndim:
        raise OpError(f"axis {axis} out of range for a {ndim}-d input (per example, no batch axis)", key)
    return axis % ndim


def _single(node: Any, infos: list[TensorInfo]) -> TensorInfo:
    return infos[0]


def _linear(node: Any, infos: list[TensorInfo]) -> TensorInfo:
    shape, _ = infos[0]
    return (*shape[:-1], node.param("out")), "float32"


def _conv2d(node: Any, infos: list[TensorInfo]) -> TensorInfo:
    shape, _ = infos[0]
    if len(shape) != 3:
        raise OpError(f"expected a [channels, height, width] input, got shape {list(shape)}")
    k, s, p = node.param("kernel"), node.param("stride"), node.param("padding")
    h, w = ((n + 2 * p - k) // s + 1 for n in shape[1:])
    if h < 1 or w < 1:
        raise OpError(f"kernel {k} with padding {p} does not fit an input of {shape[1]}x{shape[2]}", "kernel")
    return (node.param("out"), h, w), "float32"


def _embedding(node: Any, infos: list[TensorInfo]) -> TensorInfo:
    shape, dtype = infos[0]
    if dtype != "int64":
        raise OpError(f"expected int64 token ids, got {dtype}")
    return (*shape, node.param("out")), "float32"


def _batch_norm(node: Any, infos: list[TensorInfo]) -> TensorInfo:
    shape, dtype = infos[0]
    if len(shape) > 3:
        raise OpError(f"expected a [C], [C, L] or [C, H, W] input, got shape {list(shape)}")
    return shape, dtype


def _softmax(node: Any, infos: list[TensorInfo]) -> TensorInfo:
    shape, dtype = infos[0]
    _axis(node.param("axis"), len(shape))
    return shape, dtype


def _add(node: Any, infos: list[TensorInfo]) -> TensorInfo:
    shapes = [list(s) for s, _ in infos]
    if any(s != shapes[0] for s in shapes):
        raise OpError(f"expected inputs of one shape, got {shapes}")
    return infos[0]


def _concat(node: Any, infos: list[TensorInfo]) -> TensorInfo:
    shapes = [s for s, _ in infos]
    if len({len(s) for s in shapes}) != 1:
        raise OpError(f"expected inputs with the same number of axes, got shapes {[list(s) for s in shapes]}")
    a = _axis(node.param("axis"), len(shapes[0]))
    rest = {s[:a] + s[a + 1 :] for s in shapes}
    if len(rest) != 1:
        raise OpError(f"expected shapes equal except along axis {a}, got {[list(s) for s in shapes]}")
    out = list(shapes[0])
    out[a] = sum(s[a] for s in shapes)
    return tuple(out), "float32"


def _flatten(node: Any, infos: list[TensorInfo]) -> TensorInfo:
    return (math.prod(infos[0][0]),), infos[0][1]


def _reshape(node: Any, infos: list[TensorInfo]) -> TensorInfo:
    shape, dtype = infos[0]
    target = list(node.param("shape"))
    total = math.prod(shape)
    if target.count(-1) > 1 or any(d == 0 or d < -1 for d in target):
        raise OpError(f"expected positive sizes and at most one -1, got {target}", "shape")
    known = math.prod(d for d in target if d != -1)
    if -1 in target:
        if total % known:
            raise OpError(f"cannot reshape {list(shape)} ({total} values) to {target}", "shape")
        target[target.index(-1)] = total // known
    if math.prod(target) != total:
        raise OpError(f"cannot reshape {list(shape)} ({total} values) to {target}", "shape")
    return tuple(target), dtype


def _mean(node: Any, infos: list[TensorInfo]) -> TensorInfo:
    shape, dtype = infos[0]
    axes = node.param("axis")
    axes = [axes] if isinstance(axes, int) else list(axes)
    norm = sorted({_axis(a, len(shape)) for a in axes})
    if len(norm) != len(axes) or len(norm) == len(shape):
        raise OpError(
            f"expected distinct axes leaving at least one axis of {list(shape)}, got {axes}", "axis"
        )
    return tuple(d for i, d in enumerate(shape) if i not in norm), dtype


def _float(infos: list[TensorInfo], count: int, what: str) -> None:
    for k, (_, dtype) in enumerate(infos[:count]):
        if dtype != "float32":
            raise OpError(f"expected float32 {what} (input {k}), got {dtype} (embed token ids first)")


def _mask(shape: Shape, mask: TensorInfo, what: str) -> None:
    if mask[0] != shape:
        raise OpError(f"expected a mask of shape {list(shape)} ({what}), got {list(mask[0])}")


def _attention(node: Any, infos: list[TensorInfo]) -> TensorInfo:
    _float(infos, 3, "queries, keys and values")
    (q, _), (k, _), (v, _) = infos[:3]
    if len(q) != 2 or len(k) != 2 or len(v) != 2:
        raise OpError(f"expected [seq, width] queries, keys, values, got {[list(q), list(k), list(v)]}")
    if q[1] != k[1] or k != v:
        raise OpError(
            f"expected queries [T, d], keys and values [S, d] of one width, got {[list(q), list(k), list(v)]}"
        )
    heads = node.param("heads")
    if heads < 1 or q[1] % heads:
        raise OpError(f"heads {heads} does not divide the width {q[1]}", "heads")
    if node.param("causal") and q[0] != k[0]:
        raise OpError(f"causal attention needs as many queries as keys, got {q[0]} and {k[0]}", "causal")
    if len(infos) == 4:
        _mask((k[0],), infos[3], "one value per key position")
    return q, "float32"


def _position_embedding(node: Any, infos: list[TensorInfo]) -> TensorInfo:
    _float(infos, 1, "embeddings")
    shape, dtype = infos[0]
    if len(shape) != 2:
        raise OpError(f"expected a [seq, width] input, got shape {list(shape)}")
    kind, max_len = node.param("kind"), node.param("max_len")
    if kind not in ("learned", "sinusoidal"):
        raise OpError(f"expected kind 'learned' or 'sinusoidal', got {kind!r}", "kind")
    if shape[0] > max_len:
        raise OpError(f"sequence length {shape[0]} exceeds max_len {max_len}", "max_len")
    if kind == "sinusoidal" and shape[1] % 2:
        raise OpError(f"sinusoidal positions need an even width, got {shape[1]}", "kind")
    return shape, dtype


def _pool_input(infos: list[TensorInfo]) -> Shape:
    _float(infos, 1, "values")
    shape = infos[0][0]
    if len(shape) < 2:
        raise OpError(f"expected a [seq, ...] input with at least 2 axes, got shape {list(shape)}")
    if len(infos) == 2:
        _mask(shape[:1], infos[1], "one value per position")
    return shape


def _masked_mean(node: Any, infos: list[TensorInfo]) -> TensorInfo:
    return _pool_input(infos)[1:], "float32"


def _select(node: Any, infos: list[TensorInfo]) -> TensorInfo:
    shape = _pool_input(infos)
    index = node.param("index")
    if not -shape[0] <= index < shape[0]:
        raise OpError(f"index {index} out of range for a sequence of {shape[0]}", "index")
    if len(infos) == 2 and index != -1:
        raise OpError(f"a mask input selects the last real position: expected index -1, got {index}", "index")
    return shape[1:], "float32"


_ACT = "elementwise activation"

OPS: dict[str, OpDef] = {
    op.name: op
    for op in [
        OpDef(
            "linear", {"out": REQUIRED, "bias": True}, 1, 1, _linear, True, "y = x Wᵀ + b on the last axis"
        ),
        OpDef(
            "conv2d",
            {"out": REQUIRED, "kernel": REQUIRED, "stride": 1, "padding": 0, "bias": True},
            1,
            1,
            _conv2d,
            True,
            "2-d convolution of a [C, H, W] input (square kernel)",
        ),
        OpDef(
            "embedding",
            {"out": REQUIRED, "vocab": None},
            1,
            1,
            _embedding,
            True,
            "lookup of int64 token ids; vocab defaults to the input's",
            float_only=False,
        ),
        OpDef(
            "layer_norm", {"eps": 1e-5}, 1, 1, _single, doc="normalise the last axis (learned scale, shift)"
        ),
        OpDef(
            "batch_norm",
            {"eps": 1e-5},
            1,
            1,
            _batch_norm,
            doc="normalise per channel (axis 0) over the batch",
        ),
        OpDef("dropout", {"p": 0.5}, 1, 1, _single, doc="zero a share p of values while training"),
        OpDef("relu", {}, 1, 1, _single, doc=_ACT),
        OpDef("gelu", {}, 1, 1, _single, doc=_ACT),
        OpDef("tanh", {}, 1, 1, _single, doc=_ACT),
        OpDef("sigmoid", {}, 1, 1, _single, doc=_ACT),
        OpDef("softplus", {}, 1, 1, _single, doc=_ACT),
        OpDef("softmax", {"axis": -1}, 1, 1, _softmax, doc="softmax along an axis"),
        OpDef("add", {}, 2, None, _add, doc="sum of inputs of one shape"),
        OpDef("mul", {}, 2, None, _add, doc="elementwise product of inputs of one shape"),
        OpDef(
            "attention",
            {"heads": REQUIRED, "causal": False},
            3,
            4,
            _attention,
            doc="multi-head softmax(Q Kᵀ/√d_head + mask) V; in: [q, k, v] or [q, k, v, mask] "
            "(mask [S]: 1 = attend, 0 = padding); causal: each position sees itself and earlier ones",
            float_only=False,
        ),
        OpDef(
            "position_embedding",
            {"max_len": REQUIRED, "kind": "learned"},
            1,
            1,
            _position_embedding,
            doc="x + P[:T] for a [T, d] input; P learned (max_len x d) or sinusoidal (fixed)",
        ),
        OpDef(
            "masked_mean",
            {},
            1,
            2,
            _masked_mean,
            doc="mean over the sequence axis 0, counting only positions whose mask is 1; in: [x] or [x, mask]",
            float_only=False,
        ),
        OpDef(
            "select",
            {"index": 0},
            1,
            2,
            _select,
            doc="one position of the sequence axis 0 (0 = first / CLS, -1 = last); "
            "with a mask input and index -1, the last position whose mask is 1",
            float_only=False,
        ),
        OpDef("concat", {"axis": -1}, 2, None, _concat, doc="concatenate along an axis"),
        OpDef("flatten", {}, 1, 1, _flatten, doc="flatten the per-example shape to one axis"),
        OpDef("reshape", {"shape": REQUIRED}, 1, 1, _reshape, doc="reshape each example (one -1 allowed)"),
        OpDef(
            "mean", {"axis": REQUIRED}, 1, 1, _mean, doc="mean over axes (e.g. [1, 2] = global average pool)"
        ),
    ]
}

# every op-specific key a node may carry (the keys NodeSpec knows besides id, op, in, factorize)
PARAM_KEYS = (
    "out",
    "kernel",
    "stride",
    "padding",
    "bias",
    "vocab",
    "p",
    "axis",
    "shape",
    "eps",
    "heads",
    "causal",
    "max_len",
    "kind",
    "index",
)


def dense_map_shape(op: str, node: Any, in_shape: Shape, vocab: int | None) -> tuple[int, int]:
    """(out, in) of the matrix W ≈ U·V a factorizable node stands for (conv: out, in·k·k; embedding: vocab, dim)."""
    if op == "linear":
        return node.param("out"), in_shape[-1]
    if op == "conv2d":
        k = node.param("kernel")
        return node.param("out"), in_shape[0] * k * k
    if op == "embedding":
        return int(vocab or 0), node.param("out")
    raise ValueError(f"expected a factorizable op (linear, conv2d, embedding), got {op}")


def node_cost(
    op: str, node: Any, in_shape: Shape, out_shape: Shape, rank: int | None, vocab: int | None
) -> tuple[int, int]:
    """(parameters, multiply-adds) per example of one node; ``rank`` None means dense.

    Linear: dense out·in (+out bias), factorized r·(out+in) (+out), times the leading positions for
    multiply-adds. Conv2d: the same with in·k·k per output position (Ho·Wo positions). Embedding:
    vocab·d parameters and no multiply-adds dense; factorized vocab·r + r·d parameters and r·d
    multiply-adds per token. Norms have 2 parameters per normalised feature. Attention: 2·T²·d
    multiply-adds (its projections are separate ``linear`` nodes); learned positions max_len·d parameters.
    """
    if op in ("linear", "conv2d", "embedding"):
        m, n = dense_map_shape(op, node, in_shape, vocab)
        bias = m if op != "embedding" and node.param("bias") else 0
        if op == "linear":
            positions = math.prod(out_shape[:-1])
        elif op == "conv2d":
            positions = out_shape[1] * out_shape[2]
        else:
            positions = math.prod(out_shape[:-1])
        if rank is None:
            params = m * n + bias
            macs = 0 if op == "embedding" else m * n * positions
        else:
            params = rank * (m + n) + bias
            macs = rank * n * positions if op == "embedding" else rank * (m + n) * positions
        return params, macs
    if op == "layer_norm":
        return 2 * in_shape[-1], 0
    if op == "batch_norm":
        return 2 * in_shape[0], 0
    if op == "attention":
        t, d = in_shape  # QKᵀ and (weights)·V: T·S·d each (self-attention: S = T)
        return 0, 2 * t * t * d
    if op == "position_embedding":
        return (node.param("max_len") * in_shape[-1] if node.param("kind") == "learned" else 0), 0
    return 0, 0
