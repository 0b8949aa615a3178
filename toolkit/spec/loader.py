"""Load a spec from YAML or JSON, validate it, and report every problem with file, field path and line.

YAML goes through PyYAML's safe constructor only (no tags that build objects); a compose pass records
the line of every key and list item. JSON is parsed with ``json``; its lines come from composing the
same text as YAML (JSON is YAML) where that works.

Every file is read within the ceilings of :mod:`toolkit.limits`: its size, the nesting depth (checked
while composing, before any recursion can go deep), and the number of values once aliases and merge
keys expand (each list / mapping is sized once, before anything is constructed), so an alias bomb or
a self-containing alias fails in milliseconds with one line naming the ceiling.
"""

from __future__ import annotations

import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from toolkit import limits
from toolkit.spec.blocks import expand_blocks
from toolkit.spec.check import Issue, check_graph
from toolkit.spec.errors import Loc, Problem, SpecError, format_path, suggest
from toolkit.spec.schema import AutoStages, Defaults, GraphSpec, InputSpec, NodeSpec

LineMap = dict[Loc, int]
_TOO_DEEP = f"nesting deeper than {limits.MAX_SPEC_DEPTH} lists / mappings (limit MAX_SPEC_DEPTH = {limits.MAX_SPEC_DEPTH})"


if getattr(yaml, "__with_libyaml__", False):
    _CParser: Any = yaml.cyaml.CParser  # type: ignore[attr-defined]

    class _SafeLoaderBase(
        yaml.composer.Composer, _CParser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver
    ):
        """libyaml's parser (C, about 5x faster) under PyYAML's composer, which the ceilings hook into."""

        def __init__(self, stream: str) -> None:
            _CParser.__init__(self, stream)
            yaml.composer.Composer.__init__(self)  # type: ignore[no-untyped-call]
            yaml.constructor.SafeConstructor.__init__(self)  # type: ignore[no-untyped-call]
            yaml.resolver.Resolver.__init__(self)  # type: ignore[no-untyped-call]

else:  # pragma: no cover - PyYAML built without libyaml
    _SafeLoaderBase = yaml.SafeLoader  # type: ignore[misc,assignment]


class _BoundedLoader(_SafeLoaderBase):
    """A safe YAML loader with ceilings: nesting depth while composing, no self-containing alias,
    and values refused while constructing scalars (``int`` of 5000 digits, a date of month 13)
    reported as YAML errors with their line."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0
        self._open_anchors: list[str | None] = []

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"alias *{event.anchor} refers to the list or mapping that contains it "
                    "(a recursive spec cannot be expanded)",
                    event.start_mark,  # type: ignore[arg-type]
                )
            return super().compose_node(parent, index)  # type: ignore[no-untyped-call]
        collection = isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent)
        if collection:
            self._depth += 1
            if self._depth > limits.MAX_SPEC_DEPTH:
                raise yaml.composer.ComposerError(None, None, _TOO_DEEP, event.start_mark)  # type: ignore[arg-type]
            self._open_anchors.append(event.anchor)
        try:
            return super().compose_node(parent, index)  # type: ignore[no-untyped-call]
        finally:
            if collection:
                self._depth -= 1
                self._open_anchors.pop()

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)  # type: ignore[no-untyped-call]
        except yaml.YAMLError:
            raise
        except (ValueError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read value {_show(node.value)}: {exc}", node.start_mark
            ) from None


def _expanded_size(root: Any, children: Any, mark: Any, source: str) -> None:
    """Refuse data whose aliases expand past ``max_spec_values`` values or ``MAX_SPEC_DEPTH`` levels.

    Each distinct list / mapping is visited once (sizes are memoised by identity), so an alias bomb
    costs time and memory linear in the file, not in its expansion.

    Args:
        root: a YAML node or plain data.
        children: item -> list of its children (keys and values), [] for a scalar.
        mark: item -> 1-based line or None.
        source: the file name for the message.

    Raises:
        SpecError: naming the limit hit (and the line of the smallest list / mapping over it).
    """
    budget = limits.limit("max_spec_values")
    size: dict[int, tuple[int, int]] = {}  # id -> (expanded values, depth)
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        item, done = stack.pop()
        kids = children(item)
        if not kids:
            continue
        key = id(item)
        if done:
            on_path.discard(key)
            total, depth = 1, 1
            for kid in kids:
                kid_size, kid_depth = size.get(id(kid), (1, 0))
                total += kid_size
                depth = max(depth, kid_depth + 1)
            size[key] = (total, depth)
            message = None
            if total > budget:
                message = (
                    f"the spec expands (through aliases) to more than {budget:,} values; "
                    f"over the limit {limits.describe('max_spec_values')}"
                )
            elif depth > limits.MAX_SPEC_DEPTH:
                message = (
                    f"nesting deeper than {limits.MAX_SPEC_DEPTH} lists / mappings once aliases expand "
                    f"(limit MAX_SPEC_DEPTH = {limits.MAX_SPEC_DEPTH})"
                )
            if message is not None:
                raise SpecError([Problem(source, "", mark(item), message)])
            continue
        if key in size:
            continue
        if key in on_path:
            raise SpecError(
                [Problem(source, "", mark(item), "a list or mapping contains itself (a recursive spec)")]
            )
        on_path.add(key)
        stack.append((item, True))
        stack.extend((kid, False) for kid in kids if id(kid) not in size)


def _node_children(node: Any) -> list[Any]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _data_children(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [part for pair in value.items() for part in pair]
    if isinstance(value, list | tuple):
        return list(value)
    return []


def _compose(text: str, source: str = "<memory>") -> tuple[Any, LineMap, list[Issue]]:
    """Parse YAML safely within the limits; return (data, line of each path, duplicate-key issues).

    Raises:
        SpecError: when a ceiling of toolkit.limits is hit.
        yaml.YAMLError: for text that is not YAML.
    """
    loader = _BoundedLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, {}, []
        _expanded_size(root, _node_children, lambda n: n.start_mark.line + 1, source)
        lines: LineMap = {}
        dups: list[Issue] = []

        def walk(node: yaml.Node, loc: Loc) -> None:
            lines.setdefault(loc, node.start_mark.line + 1)
            if isinstance(node, yaml.MappingNode):
                seen: set[Any] = set()
                for key_node, value_node in node.value:
                    key = loader.construct_object(key_node, deep=True)
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
    complete = isinstance(raw_nodes, list) and len(inputs) == len(
        raw_inputs if isinstance(raw_inputs, dict) else {}
    )
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
        SpecError: listing every problem (path and message; no line numbers for a dict), or naming
            the limit of toolkit.spec.limits that the data exceeds (values, nesting, recursion).
    """
    _expanded_size(data, _data_children, lambda _: None, source)
    return _parse(data, source, {}, [])


def _json_too_deep(text: str) -> bool:
    """Whether [ ] / { } nest deeper than MAX_SPEC_DEPTH outside strings (checked before json.loads
    can recurse; stops at the first bracket past the limit)."""
    depth = 0
    for match in _BRACKETS.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > limits.MAX_SPEC_DEPTH:
            return True
    return False


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


def _read_text(p: Path, source: str) -> str:
    """The file's text, refusing a file over ``max_spec_bytes`` or not UTF-8."""
    ceiling = limits.limit("max_spec_bytes")
    with p.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(min(size, ceiling) + 1)  # +1: a file that grew since stat is still caught
    if len(raw) > ceiling:
        raise SpecError(
            [
                Problem(
                    source,
                    "",
                    None,
                    f"file larger than {ceiling:,} bytes; over the limit {limits.describe('max_spec_bytes')}",
                )
            ]
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SpecError(
            [Problem(source, "", line, f"expected UTF-8 text, got byte 0x{raw[exc.start]:02x}")]
        ) from None


def load_spec(path: str | Path) -> GraphSpec:
    """Load and validate a spec file (.yaml / .yml, or .json); never executes code from the file.

    The file is read within the ceilings of toolkit.spec.limits (file size, values once aliases
    expand, nesting depth), so a hostile file fails in milliseconds with one line naming the limit.

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
    text = _read_text(p, source)
    lines: LineMap = {}
    dups: list[Issue] = []
    if p.suffix.lower() == ".json":
        if _json_too_deep(text):
            raise SpecError([Problem(source, "", None, _TOO_DEEP)])
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(
                [Problem(source, "", exc.lineno, f"invalid JSON: {exc.msg} (column {exc.colno})")]
            ) from None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise SpecError([Problem(source, "", None, f"invalid JSON: {exc}")]) from None
        _expanded_size(data, _data_children, lambda _: None, source)
        try:
            _, lines, dups = _compose(text, source)
        except (yaml.YAMLError, SpecError):
            lines = {}
    else:
        try:
            data, lines, dups = _compose(text, source)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else None
            problem = f"invalid YAML: {exc.problem or exc.context}"
            if "nesting depth" in problem:  # libyaml's own, higher, ceiling: say which one counts
                problem = _TOO_DEEP
            raise SpecError([Problem(source, "", line, problem)]) from None
        except yaml.reader.ReaderError as exc:  # a character YAML does not allow
            line = text[: exc.position].count("\n") + 1
            what = f"character #x{exc.character:04x}" if isinstance(exc.character, int) else "character"
            raise SpecError([Problem(source, "", line, f"invalid YAML: {what} is not allowed")]) from None
        except yaml.YAMLError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SpecError([Problem(source, "", None, f"invalid YAML: {first}")]) from None
    return _parse(data, source, lines, dups)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of graph specs (what ``rlhf schema`` prints)."""
    schema = GraphSpec.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "rlhf graph spec"
    return schema
