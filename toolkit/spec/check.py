"""Graph checks of a spec: references, cycles, shapes, ranks, stages; and the analysis they produce.

``check_graph`` works on the parts of a spec that passed pydantic validation, so a spec with a bad
node still gets its other problems reported in the same pass. Issues are (location, message) pairs;
the loader turns them into ``Problem`` objects with file and line.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from toolkit import limits
from toolkit.layers.rank import choose_rank
from toolkit.spec.errors import Loc, Problem, SpecError, format_path, suggest
from toolkit.spec.ops import OPS, PARAM_KEYS, REQUIRED, OpError, Shape, TensorInfo, dense_map_shape, node_cost

if TYPE_CHECKING:
    from toolkit.spec.schema import AutoStages, Factorize, GraphSpec, InputSpec, NodeSpec

Issue = tuple[Loc, str]
BYTES_PER_PARAM = 4  # float32

# node ids become attribute names of the stage modules: keep clear of nn.Module's own attributes.
# Written out so checking a spec needs no torch; tests/spec checks it covers dir(torch.nn.Module).
NN_MODULE_ATTRIBUTES = frozenset(
    (
        "T_destination",
        "_apply",
        "_call_impl",
        "_compiled_call_impl",
        "_get_backward_hooks",
        "_get_backward_pre_hooks",
        "_get_name",
        "_load_from_state_dict",
        "_maybe_warn_non_full_backward_hook",
        "_named_members",
        "_register_load_state_dict_pre_hook",
        "_register_state_dict_hook",
        "_replicate_for_data_parallel",
        "_save_to_state_dict",
        "_slow_forward",
        "_version",
        "_wrapped_call_impl",
        "add_module",
        "apply",
        "bfloat16",
        "buffers",
        "call_super_init",
        "children",
        "compile",
        "cpu",
        "cuda",
        "double",
        "dump_patches",
        "eval",
        "extra_repr",
        "float",
        "forward",
        "get_buffer",
        "get_extra_state",
        "get_parameter",
        "get_submodule",
        "half",
        "ipu",
        "load_state_dict",
        "modules",
        "mtia",
        "named_buffers",
        "named_children",
        "named_modules",
        "named_parameters",
        "parameters",
        "register_backward_hook",
        "register_buffer",
        "register_forward_hook",
        "register_forward_pre_hook",
        "register_full_backward_hook",
        "register_full_backward_pre_hook",
        "register_load_state_dict_post_hook",
        "register_load_state_dict_pre_hook",
        "register_module",
        "register_parameter",
        "register_state_dict_post_hook",
        "register_state_dict_pre_hook",
        "requires_grad_",
        "set_extra_state",
        "set_submodule",
        "share_memory",
        "smart_apply",  # added to nn.Module by transformers
        "state_dict",
        "to",
        "to_empty",
        "train",
        "type",
        "xpu",
        "zero_grad",
    )
)
RESERVED_IDS = NN_MODULE_ATTRIBUTES | {"input_names", "output_names", "node_ids"}


@dataclass(frozen=True)
class RankPlan:
    """How the builder makes a factorizable node.

    Attributes:
        kind: "dense", "rank" (a fixed rank) or "energy" (rank chosen from the SVD at build time).
        rank: the rank for kind "rank".
        energy: the energy share for kind "energy".
        map_shape: (out, in) of the matrix W ≈ U·V (conv: out, in·k·k; embedding: vocab, dim).
        note: why a requested factorization was dropped ("" otherwise).
    """

    kind: str
    rank: int | None = None
    energy: float | None = None
    map_shape: tuple[int, int] = (0, 0)
    note: str = ""


@dataclass
class Analysis:
    """What the checks learned about a valid graph.

    Attributes:
        order: node ids in topological order (file order where free).
        infos: tensor name (graph input or node id) -> (shape without batch, dtype).
        plans: factorizable node id -> RankPlan.
        vocab: embedding node id -> vocabulary size.
        stages: node ids per stage, each in topological order.
        stage_inputs, stage_outputs: tensor names crossing each stage's cut, in a fixed order.
        notes: non-fatal remarks (factorizations kept dense).
    """

    order: list[str]
    infos: dict[str, TensorInfo]
    plans: dict[str, RankPlan]
    vocab: dict[str, int]
    stages: list[list[str]] = field(default_factory=list)
    stage_inputs: list[list[str]] = field(default_factory=list)
    stage_outputs: list[list[str]] = field(default_factory=list)
    notes: list[Issue] = field(default_factory=list)


def _topo_order(nodes: dict[str, NodeSpec], position: dict[str, int]) -> tuple[list[str], list[str]]:
    """Kahn's algorithm, smallest file position first; returns (order, nodes left on cycles)."""
    import heapq

    deps = {nid: {r for r in n.in_ if r in nodes} for nid, n in nodes.items()}
    users: dict[str, list[str]] = {nid: [] for nid in nodes}
    for nid, ds in deps.items():
        for d in ds:
            users[d].append(nid)
    heap = [(position[nid], nid) for nid, ds in deps.items() if not ds]
    heapq.heapify(heap)
    order: list[str] = []
    remaining = {nid: len(ds) for nid, ds in deps.items()}
    while heap:
        _, nid = heapq.heappop(heap)
        order.append(nid)
        for u in users[nid]:
            remaining[u] -= 1
            if remaining[u] == 0:
                heapq.heappush(heap, (position[u], u))
    left = [nid for nid in nodes if nid not in set(order)]
    return order, left


def _find_cycles(nodes: dict[str, NodeSpec], left: list[str]) -> list[list[str]]:
    """Distinct cycles among the nodes Kahn's algorithm could not order."""
    cycles: list[list[str]] = []
    seen_sets: list[set[str]] = []
    done: set[str] = set()
    left_set = set(left)
    stack: list[str] = []  # the DFS path; empty again after each visit
    on_stack: set[str] = set()

    def visit(nid: str) -> None:
        if nid in on_stack:
            cyc = [*stack[stack.index(nid) :], nid]
            if set(cyc) not in seen_sets:
                seen_sets.append(set(cyc))
                cycles.append(cyc)
            return
        if nid in done:
            return
        stack.append(nid)
        on_stack.add(nid)
        for ref in nodes[nid].in_:
            if ref in left_set:
                visit(ref)
        stack.pop()
        on_stack.discard(nid)
        done.add(nid)

    for start in left:
        visit(start)
    return cycles


def _partition_count(costs: list[int], count: int) -> list[int]:
    """Split points of a sequence into ``count`` contiguous non-empty chunks minimising the largest sum.

    The dynamic programme best[k][j] = min over i of max(best[k-1][i], sum(i..j)), taking the
    smallest such i. best[k-1] is nondecreasing in i and sum(i..j) strictly decreasing, so the
    minimum sits where the two cross, and that crossing moves right as j grows: one pointer per k
    finds it, O(count·n) instead of O(count·n²). (tests/spec checks it against the plain programme.)
    """
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c + 1)  # +1: balance node counts when costs tie (e.g. activations)
    inf = math.inf
    best: list[list[float]] = [[inf] * (n + 1) for _ in range(count + 1)]
    cut = [[0] * (n + 1) for _ in range(count + 1)]
    best[0][0] = 0
    for k in range(1, count + 1):
        prev, row, cuts = best[k - 1], best[k], cut[k]
        c = k - 1  # first i where prev[i] >= prefix[j] - prefix[i]
        for j in range(k, n + 1):
            while c < j and prev[c] < prefix[j] - prefix[c]:
                c += 1
            if c == j:  # the chunk sum dominates everywhere: the last candidate is the best
                i = j - 1
            elif c > k - 1 and prefix[j] - prefix[c - 1] <= prev[c]:
                i = c - 1
            else:
                i = c
            row[j], cuts[j] = max(prev[i], prefix[j] - prefix[i]), i
    bounds, j = [], n
    for k in range(count, 0, -1):
        bounds.append(j)
        j = cut[k][j]
    return sorted(bounds)


def check_graph(
    inputs: dict[str, InputSpec],
    nodes: list[tuple[int, NodeSpec]],
    opaque_ids: set[str],
    defaults: Factorize | None,
    outputs: list[str] | None,
    stages: list[list[str]] | AutoStages | None,
    complete: bool,
) -> tuple[Analysis, list[Issue]]:
    """Check the graph made of the parts that passed structural validation.

    Args:
        inputs: valid graph inputs.
        nodes: (index in the file, node) for every structurally valid node.
        opaque_ids: ids of nodes that failed structural validation (references to them are not dangling).
        defaults: the ``defaults.factorize`` setting, or None.
        outputs, stages: None when they failed structural validation.
        complete: True when nothing failed structural validation (stage checks need every node).

    Returns:
        The analysis (meaningful only when there are no issues) and the issues found.
    """
    issues: list[Issue] = []
    by_id: dict[str, NodeSpec] = {}
    index: dict[str, int] = {}
    for i, node in nodes:
        loc: Loc = ("nodes", i, "id")
        if node.id in inputs:
            issues.append((loc, f"id '{node.id}' is also the name of a graph input"))
        elif node.id in by_id:
            issues.append((loc, f"duplicate id '{node.id}' (first at nodes[{index[node.id]}])"))
            continue
        elif node.id in RESERVED_IDS:
            issues.append((loc, f"id '{node.id}' is reserved (an attribute of torch modules); pick another"))
        by_id[node.id] = node
        index[node.id] = i

    # op parameters, arity, references
    known = [*inputs, *by_id, *opaque_ids]
    for nid, node in by_id.items():
        i, op = index[nid], OPS[node.op]
        for key in PARAM_KEYS:
            if getattr(node, key) is not None and key not in op.params:
                takes = ", ".join(op.params) or "no parameters"
                issues.append(
                    (("nodes", i, key), f"key '{key}' does not apply to op '{node.op}' (it takes: {takes})")
                )
        for key, default in op.params.items():
            if default is REQUIRED and getattr(node, key) is None:
                issues.append((("nodes", i, key), f"op '{node.op}' needs '{key}', got none"))
        if node.factorize is not None and not op.factorizable:
            issues.append(
                (
                    ("nodes", i, "factorize"),
                    f"op '{node.op}' cannot be factorized (only linear, conv2d, embedding)",
                )
            )
        n_in = len(node.in_)
        if n_in < op.min_inputs or (op.max_inputs is not None and n_in > op.max_inputs):
            want = f"{op.min_inputs}" if op.max_inputs == op.min_inputs else f"at least {op.min_inputs}"
            issues.append((("nodes", i, "in"), f"op '{node.op}' takes {want} input(s), got {n_in}"))
        for j, ref in enumerate(node.in_):
            if ref not in known:
                issues.append(
                    (
                        ("nodes", i, "in", j),
                        f"unknown reference '{ref}'{suggest(ref, known)} (inputs: {list(inputs)}, nodes: {list(by_id)})",
                    )
                )

    order, left = _topo_order(by_id, index)
    for cyc in _find_cycles(by_id, left):
        issues.append((("nodes", index[cyc[0]], "in"), f"cycle: {' -> '.join(cyc)}"))

    # shapes and factorizations, in topological order
    infos: dict[str, TensorInfo] = {}
    for name, spec_in in inputs.items():
        too_big = limits.over("max_tensor_elements", limits.numel(spec_in.shape), f"input '{name}'")
        if too_big:
            issues.append((("inputs", name, "shape"), too_big))
        else:
            infos[name] = (tuple(spec_in.shape), spec_in.dtype)
    plans: dict[str, RankPlan] = {}
    vocab: dict[str, int] = {}
    notes: list[Issue] = []
    param_count: dict[str, int] = {}
    bad_index = {loc[1] for loc, _ in issues if loc[0] == "nodes"}
    for nid in order:
        node, i, op = by_id[nid], index[nid], OPS[by_id[nid].op]
        if i in bad_index or any(r not in infos for r in node.in_):
            continue  # its inputs or parameters are already reported
        in_infos = [infos[r] for r in node.in_]
        ints = [r for r, (_, dt) in zip(node.in_, in_infos) if dt == "int64"]
        if op.float_only and ints:
            issues.append(
                (
                    ("nodes", i, "in"),
                    f"expected float32 input, got int64 token ids from '{ints[0]}' (embed them first)",
                )
            )
            continue
        try:
            out_info = op.infer(node, in_infos)
        except OpError as exc:
            issues.append((("nodes", i, exc.key), str(exc)))
            continue
        blame = _size_key(node, in_infos[0][0])
        too_big = limits.over("max_tensor_elements", limits.numel(out_info[0]), f"the output of node '{nid}'")
        if too_big:
            issues.append((("nodes", i, blame), too_big))
            continue  # nodes downstream of it are not checked further
        infos[nid] = out_info
        in_shape = in_infos[0][0]
        plan = None
        if op.factorizable:
            voc = None
            if node.op == "embedding":
                src = inputs.get(node.in_[0])
                voc = node.vocab or (src.vocab if src is not None else None)
                if voc is None:
                    issues.append(
                        (
                            ("nodes", i, "vocab"),
                            "expected 'vocab' (the input is not a graph input with a vocab)",
                        )
                    )
                    continue
                if src is not None and src.vocab is not None and voc < src.vocab:
                    issues.append(
                        (("nodes", i, "vocab"), f"vocab {voc} is smaller than the input's vocab {src.vocab}")
                    )
                    continue
                vocab[nid] = voc
            plan = _plan(node, i, defaults, dense_map_shape(node.op, node, in_shape, voc), issues, notes)
            if plan is None:
                continue
            plans[nid] = plan
        rank = plan.rank if plan is not None and plan.kind == "rank" else None
        param_count[nid] = node_cost(node.op, node, in_shape, infos[nid][0], rank, vocab.get(nid))[0]
        too_big = limits.over("max_node_params", param_count[nid], f"node '{nid}'")
        if too_big:
            issues.append((("nodes", i, blame), too_big))
    total = sum(param_count.values())
    too_big = limits.over("max_model_params", total, "the model")
    if too_big and not any("max_node_params" in msg for _, msg in issues):
        issues.append((("nodes",), too_big))

    _causal_needs_positions(by_id, index, order, issues)

    # outputs
    if outputs is not None:
        seen: set[str] = set()
        for j, out in enumerate(outputs):
            if out in seen:
                issues.append((("outputs", j), f"output '{out}' listed twice"))
            seen.add(out)
            if out not in by_id and out not in opaque_ids:
                issues.append(
                    (("outputs", j), f"unknown output '{out}'; expected a node id{suggest(out, list(by_id))}")
                )

    analysis = Analysis(order=order, infos=infos, plans=plans, vocab=vocab, notes=notes)
    if stages is None or not complete or left:
        return analysis, issues
    stage_lists = _stage_lists(stages, by_id, order, index, param_count, issues)
    if stage_lists is not None:
        analysis.stages = stage_lists
        _crossings(analysis, by_id, outputs or [])
    return analysis, issues


def _size_key(node: NodeSpec, in_shape: Shape) -> str:
    """The field to blame for a node's size: ``out`` when the op has one and it is the largest
    factor, ``vocab`` for a large explicit vocabulary, ``shape`` for reshape, else ``in``."""
    op = OPS[node.op]
    if node.op == "reshape":
        return "shape"
    widest_in = max(in_shape, default=0)
    if node.op == "embedding" and node.vocab is not None and node.vocab >= (node.out or 0):
        return "vocab"
    if "out" in op.params and node.out is not None and node.out >= widest_in:
        return "out"
    return "in"


def _causal_needs_positions(
    by_id: dict[str, NodeSpec], index: dict[str, int], order: list[str], issues: list[Issue]
) -> None:
    """A causal attention node must see positions: some ``position_embedding`` upstream of it."""
    has_pos: dict[str, bool] = {}
    for nid in order:  # topological: every node's inputs come first
        node = by_id[nid]
        has_pos[nid] = node.op == "position_embedding" or any(has_pos.get(r, False) for r in node.in_)
        if node.op == "attention" and node.causal and not has_pos[nid]:
            issues.append(
                (
                    ("nodes", index[nid], "causal"),
                    f"causal attention '{nid}' has no position_embedding upstream; "
                    "expected positions before a causal model",
                )
            )


def _plan(
    node: NodeSpec,
    i: int,
    defaults: Factorize | None,
    map_shape: tuple[int, int],
    issues: list[Issue],
    notes: list[Issue],
) -> RankPlan | None:
    from_defaults = node.factorize is None
    fac = defaults if from_defaults else node.factorize
    loc: Loc = ("nodes", i, "factorize")
    if fac is None or fac.is_none:
        return RankPlan("dense", map_shape=map_shape)
    m, n = map_shape
    full = min(m, n)
    where = " (from defaults)" if from_defaults else ""
    if fac.rank is not None and fac.rank > full:
        what = "vocab, dim" if node.op == "embedding" else "in, out"
        issues.append(((*loc, "rank"), f"rank {fac.rank}{where} exceeds min({what}) = {full}"))
        return None
    if fac.energy is not None:
        return RankPlan("energy", energy=fac.energy, map_shape=map_shape)
    choice = choose_rank(m, n, rank=fac.rank, ratio=fac.ratio)
    if not choice.factorize:
        notes.append((loc, f"{choice.reason}{where}"))
        return RankPlan("dense", map_shape=map_shape, note=choice.reason)
    return RankPlan("rank", rank=choice.rank, map_shape=map_shape)


def _stage_lists(
    stages: list[list[str]] | AutoStages,
    by_id: dict[str, NodeSpec],
    order: list[str],
    index: dict[str, int],
    param_count: dict[str, int],
    issues: list[Issue],
) -> list[list[str]] | None:
    pos = {nid: k for k, nid in enumerate(order)}
    if isinstance(stages, list):
        where: dict[str, int] = {}
        ok = True
        for s, stage in enumerate(stages):
            if not stage:
                issues.append((("stages", s), "empty stage; expected at least one node id"))
                ok = False
            for j, nid in enumerate(stage):
                if nid not in by_id:
                    issues.append(
                        (("stages", s, j), f"unknown node '{nid}'{suggest(nid, list(by_id))} in stage {s}")
                    )
                    ok = False
                elif nid in where:
                    issues.append(
                        (
                            ("stages", s, j),
                            f"node '{nid}' is in stages {where[nid]} and {s}; expected exactly one",
                        )
                    )
                    ok = False
                else:
                    where[nid] = s
        missing = [nid for nid in order if nid not in where]
        if missing:
            issues.append(
                (("stages",), f"nodes {missing} are in no stage; every node must be in exactly one")
            )
            ok = False
        if not ok:
            return None
        for s, stage in enumerate(stages):
            for j, nid in enumerate(stage):
                for ref in by_id[nid].in_:
                    if ref in where and where[ref] > s:
                        issues.append(
                            (
                                ("stages", s, j),
                                f"stage {s} is not a valid cut: '{nid}' consumes '{ref}' from later stage {where[ref]}",
                            )
                        )
                        ok = False
        if not ok:
            return None
        return [sorted(stage, key=pos.__getitem__) for stage in stages]
    rule = stages.auto
    # units: a repeated block's instance is never cut; other nodes are units of their own
    units: list[list[str]] = []
    for nid in order:
        group = by_id[nid].group
        if group is not None and units and by_id[units[-1][-1]].group == group:
            units[-1].append(nid)
        else:
            units.append([nid])
    costs = [sum(param_count.get(nid, 0) for nid in unit) * BYTES_PER_PARAM for unit in units]
    if rule.count is not None:
        if rule.count > limits.MAX_AUTO_STAGES:
            issues.append(
                (
                    ("stages", "auto", "count"),
                    f"count {rule.count} is over the limit MAX_AUTO_STAGES = {limits.MAX_AUTO_STAGES}",
                )
            )
            return None
        if rule.count > len(units):
            what = "nodes" if len(units) == len(order) else "nodes and block repeats"
            issues.append(
                (
                    ("stages", "auto", "count"),
                    f"count {rule.count} exceeds the number of {what} ({len(units)})",
                )
            )
            return None
        bounds = _partition_count(costs, rule.count)
        starts = [0, *bounds[:-1]]
        return [[nid for unit in units[a:b] for nid in unit] for a, b in zip(starts, bounds)]
    assert rule.max_bytes is not None
    budget = int(rule.max_bytes)
    chunks: list[list[str]] = [[]]
    used = 0
    for unit, cost in zip(units, costs):
        if cost > budget:
            what = f"node '{unit[0]}'" if len(unit) == 1 else f"block repeat '{by_id[unit[0]].group}'"
            issues.append(
                (
                    ("stages", "auto", "max_bytes"),
                    f"{what} alone needs {cost} parameter bytes > max_bytes {budget}",
                )
            )
            return None
        if chunks[-1] and used + cost > budget:
            chunks.append([])
            used = 0
        chunks[-1].extend(unit)
        used += cost
    return chunks


def _crossings(analysis: Analysis, by_id: dict[str, NodeSpec], outputs: list[str]) -> None:
    """Fill stage_inputs / stage_outputs: tensors consumed from outside / needed after each stage."""
    stage_of = {nid: s for s, stage in enumerate(analysis.stages) for nid in stage}
    analysis.stage_inputs, analysis.stage_outputs = [], []
    for s, stage in enumerate(analysis.stages):
        ins: list[str] = []
        for nid in stage:
            for ref in by_id[nid].in_:
                if stage_of.get(ref) != s and ref not in ins:
                    ins.append(ref)
        analysis.stage_inputs.append(ins)
    for s, stage in enumerate(analysis.stages):
        later = {r for t in range(s + 1, len(analysis.stages)) for r in analysis.stage_inputs[t]}
        analysis.stage_outputs.append([nid for nid in stage if nid in later or nid in outputs])


def _to_problems(issues: Iterable[Issue], source: str) -> list[Problem]:
    return [Problem(source, format_path(loc), None, msg) for loc, msg in issues]


def analyze_or_raise(spec: GraphSpec, source: str) -> Analysis:
    """Run the graph checks on a structurally valid spec.

    Raises:
        SpecError: with every graph problem (no line numbers: use load_spec for those).
    """
    analysis, issues = check_graph(
        spec.inputs,
        list(enumerate(spec.nodes)),
        set(),
        spec.defaults.factorize,
        spec.outputs,
        spec.stages,
        complete=True,
    )
    if issues:
        raise SpecError(_to_problems(issues, source))
    return analysis


def shape_of(spec: GraphSpec, name: str) -> Shape:
    """Per-example shape of a graph input or node output."""
    return spec.analysis.infos[name][0]


def resolved_dict(spec: GraphSpec) -> dict[str, Any]:
    """See GraphSpec.resolved."""
    a = spec.analysis
    nodes: list[dict[str, Any]] = []
    for node in spec.nodes:
        op = OPS[node.op]
        d: dict[str, Any] = {"id": node.id, "op": node.op, "in": list(node.in_)}
        for key in op.params:
            value = node.param(key)
            if key == "vocab" and value is None:
                value = a.vocab[node.id]
            d[key] = list(value) if isinstance(value, list) else value
        if op.factorizable:
            fac = node.factorize if node.factorize is not None else spec.defaults.factorize
            d["factorize"] = "none" if fac is None else fac.model_dump()
        if node.group is not None:
            d["group"] = node.group
        nodes.append(d)
    out: dict[str, Any] = {"name": spec.name}
    if spec.description is not None:
        out["description"] = spec.description
    out["inputs"] = {k: v.model_dump(exclude_none=True) for k, v in spec.inputs.items()}
    out["nodes"] = nodes
    out["outputs"] = list(spec.outputs)
    out["stages"] = spec.stage_partition()
    out["train"] = spec.train.model_dump(mode="json")
    return out
