"""Load a spec from YAML or JSON, validate it, and report every problem with file, field path and line.

YAML goes through PyYAML's SafeLoader only (no tags that build objects); a compose pass records the
line of every key and list item. JSON is parsed with ``json``; its lines come from composing the same
text as YAML (JSON is YAML) where that works.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from toolkit.spec.blocks import expand_blocks
from toolkit.spec.check import Issue, check_graph
from toolkit.spec.errors import Loc, Problem, SpecError, format_path, suggest
from toolkit.spec.schema import AutoStages, Defaults, GraphSpec, InputSpec, NodeSpec

LineMap = dict[Loc, int]


def _compose(text: str) -> tuple[Any, LineMap, list[Issue]]:
    """Parse YAML safely; return (data, line of each path, duplicate-key issues)."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        lines: LineMap = {}
        dups: list[Issue] = []

        def walk(node: yaml.Node, loc: Loc) -> None:
            lines.setdefault(loc, node.start_mark.line + 1)
            if isinstance(node, yaml.MappingNode):
                seen: set[Any] = set()
                for key_node, value_node in node.value:
                    key = loader.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
                    if not isinstance(key, str | int):
                        key = str(key)
                    child = (*loc, key)
                    if key in seen:
                        dups.append((child, f"duplicate key '{key}'"))
                    seen.add(key)
                    lines[child] = key_node.start_mark.line + 1
                    walk(value_node, child)
            elif isinstance(node, yaml.SequenceNode):
                for i, item in enumerate(node.value):
                    walk(item, (*loc, i))

        if root is None:
            return None, {}, []
        walk(root, ())
        data = loader.construct_document(root)  # type: ignore[no-untyped-call]
        return data, lines, dups
    finally:
        loader.dispose()  # type: ignore[no-untyped-call]


def _line(lines: LineMap, loc: Loc) -> int | None:
    for k in range(len(loc), -1, -1):
        if loc[:k] in lines:
            return lines[loc[:k]]
    return None


def _members(tp: Any) -> list[Any]:
    """Union members of a type, None removed, Annotated unwrapped."""
    if get_origin(tp) is typing.Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) in (Union, types.UnionType):
        out = []
        for a in get_args(tp):
            if a is not type(None):
                out.extend(_members(a))
        return out
    return [tp]


def _tag_of(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp.__name__
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _step(tp: Any, part: str | int) -> Any:
    """The type found at ``part`` inside a value of type ``tp`` (None when unknown)."""
    for m in _members(tp):
        origin = get_origin(m)
        if isinstance(m, type) and issubclass(m, BaseModel) and isinstance(part, str):
            for name, f in m.model_fields.items():
                if part in (name, f.alias):
                    return f.annotation
        if origin is list and isinstance(part, int):
            return get_args(m)[0]
        if origin is dict and isinstance(part, str):
            return get_args(m)[1]
    return None


def _child(value: Any, part: str | int) -> Any:
    if isinstance(value, dict):
        return value.get(part)
    if isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
        return value[part]
    return None


def _fits(tag: str, value: Any) -> bool:
    """Whether a union branch named ``tag`` is the one meant for ``value``."""
    if tag.startswith("list["):
        return isinstance(value, list)
    if tag.startswith("dict[") or tag[:1].isupper():
        return isinstance(value, dict)
    return not isinstance(value, dict | list)


def _known_keys(loc: Loc) -> list[str]:
    tp: Any = GraphSpec
    for part in loc:
        tp = _step(tp, part)
    keys: list[str] = []
    for m in _members(tp):
        if isinstance(m, type) and issubclass(m, BaseModel):
            keys += [f.alias or name for name, f in m.model_fields.items()]
    return keys


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _pydantic_issues(errors: list[Any], data: Any, root: Loc = ()) -> list[Issue]:
    """Turn pydantic errors into (path, message), dropping union-branch tags and unrelated branches."""
    issues: list[Issue] = []
    seen_union: set[Loc] = set()
    dropped: dict[Loc, Any] = {}
    for err in errors:
        tp: Any = GraphSpec
        for part in root:
            tp = _step(tp, part)
        value = data
        loc: list[str | int] = list(root)
        keep, via_union = True, False
        raw = list(err["loc"])
        k = 0
        while k < len(raw):
            members = _members(tp)
            if len(members) > 1 and isinstance(raw[k], str):
                tag = str(raw[k])
                via_union = True
                chosen = [m for m in members if _tag_of(m) == tag]
                if not _fits(tag, value):
                    keep = False
                    dropped.setdefault(tuple(loc), (err, value))
                    break
                tp = chosen[0] if chosen else None
                k += 1
                continue
            part = raw[k]
            loc.append(part)
            tp = _step(tp, part)
            value = _child(value, part)
            k += 1
        if not keep:
            continue
        key = tuple(loc)
        if via_union:
            if key in seen_union:
                continue
            seen_union.add(key)
        issues.append((key, _message(err, key)))
    for key, (_err, value) in dropped.items():
        if not any(loc[: len(key)] == key for loc, _ in issues):
            issues.append((key, f"expected {_describe_union(key)}, got {_show(value)}"))
    return issues


def _describe_union(loc: Loc) -> str:
    if loc and loc[-1] == "stages":
        return "a list of stages (lists of node ids) or {auto: {count: N}} / {auto: {max_bytes: SIZE}}"
    tp: Any = GraphSpec
    for part in loc:
        tp = _step(tp, part)
    return " or ".join(_tag_of(m) for m in _members(tp)) or "another value"


def _message(err: Any, loc: Loc) -> str:
    kind, msg = err["type"], str(err["msg"])
    if kind == "missing":
        return f"missing required key '{loc[-1]}'"
    if kind == "extra_forbidden":
        key = str(loc[-1])
        known = _known_keys(loc[:-1])
        return f"unknown key '{key}'{suggest(key, known)} (known: {', '.join(known)})"
    if msg.startswith("Value error, "):
        return msg[len("Value error, ") :]
    value = err.get("input")
    if isinstance(value, dict | list):
        return f"{msg}, got a {type(value).__name__}"
    return f"{msg}, got {_show(value)}"


def _pieces(data: dict[str, Any]) -> tuple[Any, ...]:
    """The structurally valid parts of a spec dict, for the graph checks."""
    inputs: dict[str, InputSpec] = {}
    opaque_inputs: set[str] = set()
    raw_inputs = data.get("inputs")
    if isinstance(raw_inputs, dict):
        for name, value in raw_inputs.items():
            try:
                inputs[str(name)] = InputSpec.model_validate(value)
            except ValidationError:
                opaque_inputs.add(str(name))
    nodes: list[tuple[int, NodeSpec]] = []
    opaque: set[str] = set(opaque_inputs)
    raw_nodes = data.get("nodes")
    complete = isinstance(raw_nodes, list) and len(inputs) == len(raw_inputs or {})
    for i, raw in enumerate(raw_nodes if isinstance(raw_nodes, list) else []):
        try:
            nodes.append((i, NodeSpec.model_validate(raw)))
        except ValidationError:
            complete = False
            if isinstance(raw, dict) and isinstance(raw.get("id"), str):
                opaque.add(raw["id"])
    try:
        defaults = Defaults.model_validate(data.get("defaults") or {}).factorize
    except ValidationError:
        defaults = None
    try:
        outputs = data.get("outputs")
        outputs = [outputs] if isinstance(outputs, str) else outputs
        outputs = TypeAdapter(list[str]).validate_python(outputs) if outputs is not None else None
        if not isinstance(raw_nodes, list):
            outputs = None  # no nodes to check them against (reported as missing)
    except ValidationError:
        outputs = None
    stages: Any = None
    try:
        raw_stages = data.get("stages", {"auto": {"count": 1}})
        stages = TypeAdapter(list[list[str]] | AutoStages).validate_python(raw_stages)
    except ValidationError:
        stages = None
    return inputs, nodes, opaque, defaults, outputs, stages, complete


def _parse(data: Any, source: str, lines: LineMap, extra: list[Issue]) -> GraphSpec:
    def problems(issues: list[Issue]) -> list[Problem]:
        return [Problem(source, format_path(loc), _line(lines, loc), msg) for loc, msg in issues]

    if not isinstance(data, dict):
        kind = "an empty file" if data is None else f"a {type(data).__name__}"
        raise SpecError(
            [
                Problem(
                    source,
                    "",
                    1 if lines else None,
                    f"expected a mapping with name, inputs, nodes, outputs; got {kind}",
                )
            ]
        )
    issues = list(extra)
    data, remap, block_issues = expand_blocks(data)  # repeated blocks -> plain nodes
    if block_issues:
        raise SpecError(sorted(problems(issues + block_issues), key=lambda p: p.line or 1 << 30))
    spec: GraphSpec | None = None
    try:
        spec = GraphSpec.model_validate(data)
    except ValidationError as exc:
        issues += remap(_pydantic_issues(exc.errors(), data))
    inputs, nodes, opaque, defaults, outputs, stages, complete = _pieces(data)
    analysis, graph_issues = check_graph(inputs, nodes, opaque, defaults, outputs, stages, complete)
    issues += remap(graph_issues)
    if issues or spec is None:
        found = problems(issues)
        found.sort(key=lambda p: p.line if p.line is not None else 1 << 30)
        raise SpecError(found)
    spec._analysis = analysis
    spec._source = source
    return spec


def parse_spec(data: dict[str, Any], source: str = "<memory>") -> GraphSpec:
    """Validate a spec given as plain data (what yaml.safe_load / json.load return).

    Args:
        data: the spec as a dict.
        source: the name used in problem messages.

    Returns:
        The validated GraphSpec, with its graph analysis attached.

    Raises:
        SpecError: listing every problem (path and message; no line numbers for a dict).
    """
    return _parse(data, source, {}, [])


def load_spec(path: str | Path) -> GraphSpec:
    """Load and validate a spec file (.yaml / .yml, or .json); never executes code from the file.

    Args:
        path: the spec file.

    Returns:
        The validated GraphSpec.

    Raises:
        FileNotFoundError: when the file does not exist.
        SpecError: listing every problem with file, field path and line.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"spec file not found: {p}")
    source = str(path)
    text = p.read_text(encoding="utf-8")
    lines: LineMap = {}
    dups: list[Issue] = []
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(
                [Problem(source, "", exc.lineno, f"invalid JSON: {exc.msg} (column {exc.colno})")]
            ) from None
        try:
            _, lines, dups = _compose(text)
        except yaml.YAMLError:
            lines = {}
    else:
        try:
            data, lines, dups = _compose(text)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else None
            raise SpecError(
                [Problem(source, "", line, f"invalid YAML: {exc.problem or exc.context}")]
            ) from None
        except yaml.YAMLError as exc:
            raise SpecError([Problem(source, "", None, f"invalid YAML: {exc}")]) from None
    return _parse(data, source, lines, dups)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of graph specs (what ``rlhf schema`` prints)."""
    schema = GraphSpec.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "rlhf graph spec"
    return schema
