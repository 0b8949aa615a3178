"""Repeated blocks: declare a group of nodes once under ``blocks:``, repeat it N times in ``nodes:``.

```yaml
blocks:
  layer:
    inputs: [h, mask]        # names used inside the block; the first is carried from repeat to repeat
    output: out              # the block node whose value leaves the block (and feeds the next repeat)
    nodes:
      - {id: q, op: linear, in: h, out: 384}
      ...
nodes:
  - {id: encoder, block: layer, repeat: 6, in: [emb, attention_mask],
     overrides: {0: {q: {factorize: {rank: 64}}}}}   # per-repeat changes to block nodes
  - {id: pool, op: masked_mean, in: [encoder, attention_mask]}   # `encoder` = the last repeat's output
```

Expansion happens before validation: repeat k of ``encoder`` becomes the nodes ``encoder_<k>_<id>``
(``group: encoder.<k>``) with the block's references renamed; a reference to ``encoder`` (in nodes,
outputs or stage lists) means the last repeat's output; inside a stage list ``encoder`` stands for
all its nodes and ``encoder.3`` for the nodes of repeat 3. Problems found later in an expanded node are reported at the block's node (or at the
override that set the field), naming the repeat, so line numbers point into the file as written.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from toolkit.spec.errors import Loc, suggest

Issue = tuple[Loc, str]
Remap = Callable[[list[Issue]], list[Issue]]
MAX_REPEAT = 1024  # more repeats than any real network has layers: a typo, not a model
_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class BlockSpec(BaseModel):
    """A block declared once (``blocks: {name: ...}``): its input names, nodes and output node."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[str] = Field(min_length=1, description="names used inside; the first is carried")
    output: str = Field(description="id of the block node whose value leaves the block")
    nodes: list[dict[str, Any]] = Field(min_length=1, description="nodes as in the top-level list")


class RepeatSpec(BaseModel):
    """A node entry that repeats a block: ``{id, block, repeat, in, overrides}``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: str
    block: str
    repeat: int = Field(1, ge=1, le=MAX_REPEAT)
    in_: list[str] = Field(alias="in", description="one actual input per block input, in order")
    overrides: dict[int, dict[str, dict[str, Any]]] = Field(
        default_factory=dict, description="repeat index -> block node id -> fields replacing the block's"
    )


def json_schema_extra(schema: dict[str, Any]) -> None:
    """Add ``blocks`` and repeat entries to the GraphSpec JSON schema (they are expanded before validation)."""
    props = schema.setdefault("properties", {})
    props["blocks"] = {
        "type": "object",
        "description": "blocks declared once and repeated by nodes {id, block, repeat, in, overrides}",
        "additionalProperties": BlockSpec.model_json_schema(),
    }
    nodes = props.get("nodes", {})
    item = nodes.get("items")
    if item is not None:
        nodes["items"] = {"anyOf": [item, RepeatSpec.model_json_schema(by_alias=True)]}


def _is_repeat(raw: Any) -> bool:
    return isinstance(raw, dict) and ("block" in raw or "repeat" in raw)


def expand_blocks(data: dict[str, Any]) -> tuple[dict[str, Any], Remap, list[Issue]]:
    """Expand ``blocks`` / repeat nodes of a raw spec dict.

    Args:
        data: the spec as loaded (not modified).

    Returns:
        (expanded dict, a function mapping issue locations of the expanded dict back to the file as
        written, block problems). With problems, the expanded dict is not meaningful.
    """
    raw_nodes = data.get("nodes")
    if "blocks" not in data and not (isinstance(raw_nodes, list) and any(_is_repeat(n) for n in raw_nodes)):
        return data, lambda issues: issues, []
    issues: list[Issue] = []
    blocks: dict[str, BlockSpec] = {}
    raw_blocks = data.get("blocks", {})
    if not isinstance(raw_blocks, dict):
        return (
            data,
            lambda i: i,
            [(("blocks",), f"expected a mapping name -> block, got {type(raw_blocks).__name__}")],
        )
    for name, raw in raw_blocks.items():
        block = _validate(BlockSpec, raw, ("blocks", name), issues)
        if block is None:
            continue
        block_ids = [str(n.get("id")) for n in block.nodes if isinstance(n, dict)]
        if block.output not in block_ids:
            issues.append(
                (
                    ("blocks", name, "output"),
                    f"unknown block node '{block.output}'{suggest(block.output, block_ids)} (block nodes: {block_ids})",
                )
            )
            continue
        for j, n in enumerate(block.nodes):
            if _is_repeat(n):
                issues.append(
                    (
                        ("blocks", name, "nodes", j),
                        "blocks cannot repeat blocks (nest by repeating at the top level)",
                    )
                )
        blocks[str(name)] = block
    if not isinstance(raw_nodes, list):
        return data, lambda i: i, issues
    out_nodes: list[dict[str, Any]] = []
    origin: list[tuple[Loc, str, dict[str, Loc]]] = []  # per expanded node: (loc prefix, note, field -> loc)
    alias: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    for i, raw in enumerate(raw_nodes):
        if not _is_repeat(raw):
            out_nodes.append(raw)
            origin.append((("nodes", i), "", {}))
            continue
        rep = _validate(RepeatSpec, raw, ("nodes", i), issues)
        if rep is None:
            continue
        if not _ID.match(rep.id):
            issues.append((("nodes", i, "id"), f"expected an id matching {_ID.pattern}, got {rep.id!r}"))
            continue
        block = blocks.get(rep.block)
        if block is None:
            if rep.block not in raw_blocks:
                issues.append(
                    (
                        ("nodes", i, "block"),
                        f"unknown block '{rep.block}'{suggest(rep.block, raw_blocks)} (blocks: {list(raw_blocks)})",
                    )
                )
            continue
        if len(rep.in_) != len(block.inputs):
            issues.append(
                (
                    ("nodes", i, "in"),
                    f"block '{rep.block}' takes {len(block.inputs)} input(s) {block.inputs}, got {len(rep.in_)}",
                )
            )
            continue
        local = [str(n.get("id")) for n in block.nodes]
        bad = False
        for k, changes in rep.overrides.items():
            if not 0 <= k < rep.repeat:
                issues.append(
                    (
                        ("nodes", i, "overrides", k),
                        f"repeat index {k} out of range for repeat {rep.repeat} (0..{rep.repeat - 1})",
                    )
                )
                bad = True
            for nid, fields in changes.items():
                if nid not in local:
                    issues.append(
                        (
                            ("nodes", i, "overrides", k, nid),
                            f"unknown block node '{nid}'{suggest(nid, local)} (block nodes: {local})",
                        )
                    )
                    bad = True
                elif "id" in fields or "in" in fields:
                    issues.append((("nodes", i, "overrides", k, nid), "overrides cannot change 'id' or 'in'"))
                    bad = True
        if bad:
            continue
        carried = rep.in_[0]
        ids: list[str] = []
        for k in range(rep.repeat):
            prefix = f"{rep.id}_{k}_"
            rename = {loc_id: prefix + loc_id for loc_id in local}
            formal = dict(zip(block.inputs, [carried, *rep.in_[1:]]))
            for j, tmpl in enumerate(block.nodes):
                node = copy.deepcopy(tmpl)
                changed = rep.overrides.get(k, {}).get(str(tmpl.get("id")), {})
                node.update(copy.deepcopy(changed))
                node["id"] = rename.get(str(node.get("id")), node.get("id"))
                refs = node.get("in")
                if isinstance(refs, str):
                    refs = [refs]
                if isinstance(refs, list):
                    node["in"] = [formal.get(r, rename.get(r, r)) if isinstance(r, str) else r for r in refs]
                node["group"] = f"{rep.id}.{k}"
                out_nodes.append(node)
                members.setdefault(f"{rep.id}.{k}", []).append(node["id"])
                field_locs: dict[str, Loc] = {
                    str(key): ("nodes", i, "overrides", k, str(tmpl.get("id")), str(key)) for key in changed
                }
                where: Loc = ("blocks", rep.block, "nodes", j)
                origin.append((where, f" (in {rep.id} repeat {k})", field_locs))
                ids.append(node["id"])
            carried = rename[block.output]
        alias[rep.id] = carried
        members[rep.id] = ids
    if issues:
        return data, lambda i: i, issues
    expanded = {k: v for k, v in data.items() if k != "blocks"}
    for node in out_nodes:
        refs = node.get("in") if isinstance(node, dict) else None
        if isinstance(refs, list):
            node["in"] = [alias.get(r, r) if isinstance(r, str) else r for r in refs]
        elif isinstance(refs, str):
            node["in"] = alias.get(refs, refs)
    expanded["nodes"] = out_nodes
    outs = data.get("outputs")
    if isinstance(outs, list):
        expanded["outputs"] = [alias.get(o, o) if isinstance(o, str) else o for o in outs]
    elif isinstance(outs, str):
        expanded["outputs"] = alias.get(outs, outs)
    stages = data.get("stages")
    if isinstance(stages, list):
        expanded["stages"] = [
            [m for nid in stage for m in members.get(nid, [nid])] if isinstance(stage, list) else stage
            for stage in stages
        ]

    def remap(found: list[Issue]) -> list[Issue]:
        result: list[Issue] = []
        for loc, msg in found:
            if len(loc) >= 2 and loc[0] == "nodes" and isinstance(loc[1], int) and loc[1] < len(origin):
                prefix, note, field_locs = origin[loc[1]]
                rest = loc[2:]
                if rest and rest[0] in field_locs:
                    result.append(((*field_locs[str(rest[0])], *rest[1:]), msg + note))
                else:
                    result.append(((*prefix, *rest), msg + note))
            else:
                result.append((loc, msg))
        return result

    return expanded, remap, []


def _validate(model: type[BaseModel], raw: Any, loc: Loc, issues: list[Issue]) -> Any:
    from pydantic import ValidationError

    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors():
            where = (*loc, *err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                known = [f.alias or k for k, f in model.model_fields.items()]
                msg = f"unknown key '{err['loc'][-1]}' (known: {', '.join(known)})"
            elif err["loc"] == ("repeat",):
                msg = f"expected a repeat count between 1 and {MAX_REPEAT}, got {err.get('input')!r}"
            elif err["type"] == "missing":
                msg = f"missing required key '{err['loc'][-1]}'"
            else:
                msg = f"{msg}, got {err.get('input')!r}"
            issues.append((where, msg))
        return None
