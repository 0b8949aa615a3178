"""Per-node summary rows (parameters, multiply-adds, stage) and graph drawings, from a spec alone.

Nothing here builds torch modules. Ranks come from the spec; ``energy`` ranks are only known once
the builder has drawn the dense weights, so pass ``ranks`` (``model.ranks()``) to use the real ones
(without them an energy node is counted as dense).
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.spec.ops import node_cost
from toolkit.spec.schema import GraphSpec


@dataclass(frozen=True)
class NodeRow:
    """One node of ``rlhf show``.

    Attributes:
        id, op, stage: the node, its op and its stage index.
        shape: output shape without the batch axis.
        rank: factorization rank, or None when dense / not factorizable.
        dense_params, params: parameters of the dense counterpart and as specified.
        dense_macs, macs: multiply-adds per example, dense and as specified.
        note: e.g. "energy 0.9" or why a factorization was dropped.
    """

    id: str
    op: str
    stage: int
    shape: tuple[int, ...]
    rank: int | None
    dense_params: int
    params: int
    dense_macs: int
    macs: int
    note: str = ""


def summarize(spec: GraphSpec, ranks: dict[str, int] | None = None) -> list[NodeRow]:
    """One row per node, in stage then topological order.

    Args:
        spec: a validated spec.
        ranks: optional node id -> rank overriding the spec (e.g. a built or pruned model's ranks).

    Returns:
        The rows; sum them for totals (see ``totals``).
    """
    a = spec.analysis
    by_id = {n.id: n for n in spec.nodes}
    rows: list[NodeRow] = []
    for s, ids in enumerate(a.stages):
        for nid in ids:
            node = by_id[nid]
            in_shape, out_shape = a.infos[node.in_[0]][0], a.infos[nid][0]
            plan = a.plans.get(nid)
            rank = plan.rank if plan is not None and plan.kind == "rank" else None
            note = plan.note if plan is not None else ""
            if plan is not None and plan.kind == "energy":
                note = f"energy {plan.energy}" + ("" if ranks and nid in ranks else " (rank set at build)")
            if ranks is not None and plan is not None:
                rank = ranks.get(nid)
            voc = a.vocab.get(nid)
            dp, dm = node_cost(node.op, node, in_shape, out_shape, None, voc)
            p, m = node_cost(node.op, node, in_shape, out_shape, rank, voc)
            rows.append(NodeRow(nid, node.op, s, out_shape, rank, dp, p, dm, m, note))
    return rows


def totals(rows: list[NodeRow]) -> dict[str, int]:
    """Sums of dense_params, params, dense_macs, macs over rows."""
    return {k: sum(getattr(r, k) for r in rows) for k in ("dense_params", "params", "dense_macs", "macs")}


def _label(spec: GraphSpec, nid: str) -> str:
    node = spec.node(nid)
    shape = "x".join(str(d) for d in spec.analysis.infos[nid][0])
    plan = spec.analysis.plans.get(nid)
    extra = ""
    if plan is not None and plan.kind == "rank":
        extra = f" r={plan.rank}"
    elif plan is not None and plan.kind == "energy":
        extra = f" e={plan.energy}"
    return f"{nid}: {node.op}{extra} [{shape}]"


def _runs(spec: GraphSpec, ids: list[str]) -> list[tuple[str | None, list[str]]]:
    """A stage's node ids split into runs of one repeated-block instance (group) or of none."""
    runs: list[tuple[str | None, list[str]]] = []
    for nid in ids:
        group = spec.node(nid).group
        if runs and runs[-1][0] == group:
            runs[-1][1].append(nid)
        else:
            runs.append((group, [nid]))
    return runs


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def to_mermaid(spec: GraphSpec) -> str:
    """A Mermaid flowchart: graph inputs, one subgraph per stage (nested: one per block repeat),
    edges along ``in`` references."""
    a = spec.analysis
    lines = ["flowchart TD"]
    for name, inp in spec.inputs.items():
        lines.append(f'    {name}[/"{name} [{"x".join(map(str, inp.shape))}] {inp.dtype}"/]')
    for s, ids in enumerate(a.stages):
        lines.append(f'    subgraph stage{s}["stage {s}"]')
        for group, run in _runs(spec, ids):
            indent = "        " if group is None else "            "
            if group is not None:
                lines.append(f'        subgraph block_{_safe(group)}["block {group}"]')
            lines += [f'{indent}{nid}["{_label(spec, nid)}"]' for nid in run]
            if group is not None:
                lines.append("        end")
        lines.append("    end")
    for node in spec.nodes:
        lines += [f"    {ref} --> {node.id}" for ref in node.in_]
    for out in spec.outputs:
        lines.append(f"    {out} --> out_{out}(((output {out})))")
    return "\n".join(lines) + "\n"


def to_dot(spec: GraphSpec) -> str:
    """A Graphviz digraph: graph inputs, one ``cluster_stage<s>`` per stage, edges along ``in``."""
    a = spec.analysis
    lines = [f'digraph "{spec.name}" {{', "    rankdir=TB;", "    node [shape=box, fontname=Helvetica];"]
    for name, inp in spec.inputs.items():
        lines.append(
            f'    "{name}" [shape=invhouse, label="{name} [{"x".join(map(str, inp.shape))}] {inp.dtype}"];'
        )
    for s, ids in enumerate(a.stages):
        lines.append(f"    subgraph cluster_stage{s} {{")
        lines.append(f'        label="stage {s}"; style=rounded;')
        for group, run in _runs(spec, ids):
            indent = "        " if group is None else "            "
            if group is not None:
                lines.append(f"        subgraph cluster_block_{_safe(group)} {{")
                lines.append(f'            label="block {group}"; style=dashed;')
            lines += [f'{indent}"{nid}" [label="{_label(spec, nid)}"];' for nid in run]
            if group is not None:
                lines.append("        }")
        lines.append("    }")
    for node in spec.nodes:
        lines += [f'    "{ref}" -> "{node.id}";' for ref in node.in_]
    for out in spec.outputs:
        lines.append(f'    "out_{out}" [shape=doublecircle, label="{out}"];')
        lines.append(f'    "{out}" -> "out_{out}";')
    lines.append("}")
    return "\n".join(lines) + "\n"
