"""Which tensors of a transformer spec carry the sequence axis, so exports can keep it dynamic.

A spec is a sequence model when it has a transformer op (attention, position_embedding,
masked_mean, select). Its sequence axis is axis 0 of the per-example shape of the graph inputs
feeding them; it flows through ops that work position by position (linear, embedding, norms,
activations, add / mul, attention, positions) and ends at masked_mean / select. A sequence tensor
reaching any other op (flatten, reshape, mean, concat, conv2d, softmax over the sequence, ...) pins
the length: then no tensor is dynamic and exports keep the spec's fixed shapes.
"""

from __future__ import annotations

from typing import Any

SEQUENCE_OPS = frozenset({"attention", "position_embedding", "masked_mean", "select"})
KEEPS = frozenset(
    {
        "linear",
        "embedding",
        "layer_norm",
        "dropout",
        "relu",
        "gelu",
        "tanh",
        "sigmoid",
        "softplus",
        "add",
        "mul",
        "attention",
        "position_embedding",
    }
)
ENDS = frozenset({"masked_mean", "select"})


def sequence_tensors(spec: Any) -> set[str]:
    """Names (graph inputs and node ids) whose per-example axis 0 is a dynamic sequence axis.

    Args:
        spec: a validated GraphSpec.

    Returns:
        The names; empty when the spec is no sequence model or something pins the length.
    """
    a = spec.analysis
    by_id = {n.id: n for n in spec.nodes}
    if not any(n.op in SEQUENCE_OPS for n in spec.nodes):
        return set()
    # the graph inputs that reach a sequence op through sequence-keeping ops
    seq: set[str] = set()
    users: dict[str, list[str]] = {}
    for n in spec.nodes:
        for r in n.in_:
            users.setdefault(r, []).append(n.id)
    for name, inp in spec.inputs.items():
        if len(inp.shape) >= 1:
            seq.add(name)
    lengths = {spec.inputs[k].shape[0] for k in seq}
    if len(lengths) != 1:
        return set()
    for nid in a.order:
        node = by_id[nid]
        ins = [r in seq for r in node.in_]
        if not any(ins):
            continue
        if node.op in KEEPS:
            if node.op == "softmax" or (node.op == "attention" and not ins[0]):
                return set()
            seq.add(nid)
        elif node.op in ENDS:
            if not ins[0]:
                return set()
        else:
            return set()
    return seq
