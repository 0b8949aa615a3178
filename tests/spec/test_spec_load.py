"""Loading, defaults, stage partitions, resolved specs and the JSON schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from toolkit.spec import GraphSpec, SpecError, json_schema, load_spec, parse_bytes, parse_spec

GRAPHS = sorted(
    p for p in (Path(__file__).parents[2] / "graphs").iterdir() if p.suffix in (".yaml", ".yml", ".json")
)


def mlp(**extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "t",
        "inputs": {"x": {"shape": [64]}},
        "nodes": [
            {"id": "fc1", "op": "linear", "in": "x", "out": 256},
            {"id": "act1", "op": "relu", "in": "fc1"},
            {"id": "fc2", "op": "linear", "in": "act1", "out": 256},
            {"id": "act2", "op": "relu", "in": "fc2"},
            {"id": "head", "op": "linear", "in": "act2", "out": 10},
        ],
        "outputs": ["head"],
    }
    spec.update(extra)
    return spec


def test_graphs_dir_has_the_required_specs() -> None:
    names = {p.name for p in GRAPHS}
    assert {"default.yaml", "autoencoder.yaml", "convnet.yaml", "tokens.yaml"} <= names


@pytest.mark.parametrize("path", GRAPHS, ids=[p.name for p in GRAPHS])
def test_every_graph_loads_and_resolves(path: Path) -> None:
    spec = load_spec(path)
    assert isinstance(spec, GraphSpec)
    parts = spec.stage_partition()
    assert sorted(n for s in parts for n in s) == sorted(n.id for n in spec.nodes)
    resolved = spec.resolved()
    json.dumps(resolved)  # plain data
    again = parse_spec(resolved, source="resolved")
    assert again.resolved() == resolved
    assert again.stage_partition() == parts


def test_default_spec_is_what_the_issue_asks() -> None:
    spec = load_spec(GRAPHS[0].parent / "default.yaml")
    assert spec.inputs["x"].shape == [64]
    assert spec.analysis.infos["head"][0] == (10,)
    assert len(spec.stage_partition()) == 2
    assert {nid for nid, p in spec.analysis.plans.items() if p.kind == "rank"} == {"fc1", "fc2"}


def test_defaults_apply_and_nodes_override() -> None:
    spec = parse_spec(
        mlp(
            defaults={"factorize": {"ratio": 0.25}},
            nodes=[
                {"id": "fc1", "op": "linear", "in": "x", "out": 256, "factorize": {"rank": 8}},
                {"id": "fc2", "op": "linear", "in": "fc1", "out": 256},
                {"id": "head", "op": "linear", "in": "fc2", "out": 10, "factorize": "none"},
            ],
        )
    )
    plans = spec.analysis.plans
    assert (plans["fc1"].kind, plans["fc1"].rank) == ("rank", 8)
    assert (plans["fc2"].kind, plans["fc2"].rank) == ("rank", int(0.25 * 256 * 256 / 512))
    assert plans["head"].kind == "dense"
    nodes = {n["id"]: n for n in spec.resolved()["nodes"]}
    assert nodes["fc2"]["factorize"] == {"ratio": 0.25} and nodes["head"]["factorize"] == "none"
    assert nodes["fc1"]["bias"] is True


def test_factorization_without_saving_falls_back_with_a_note() -> None:
    spec = parse_spec(
        mlp(
            defaults={"factorize": {"rank": 60}},
            nodes=[
                {"id": "fc1", "op": "linear", "in": "x", "out": 64},
            ],
            outputs=["fc1"],
        )
    )
    plan = spec.analysis.plans["fc1"]
    assert plan.kind == "dense" and "kept dense" in plan.note
    assert spec.analysis.notes


def test_auto_stages_by_count_are_contiguous_topological_cuts() -> None:
    spec = parse_spec(mlp(stages={"auto": {"count": 3}}))
    parts = spec.stage_partition()
    assert len(parts) == 3 and [n for s in parts for n in s] == spec.analysis.order


def test_auto_stages_by_max_bytes_respect_the_budget() -> None:
    spec = parse_spec(mlp(stages={"auto": {"max_bytes": "300KB"}}))
    from toolkit.spec.summary import summarize

    per_stage: dict[int, int] = {}
    for row in summarize(spec):
        per_stage[row.stage] = per_stage.get(row.stage, 0) + 4 * row.params
    assert len(per_stage) >= 2 and max(per_stage.values()) <= 300_000
    with pytest.raises(SpecError, match="alone needs"):
        parse_spec(mlp(stages={"auto": {"max_bytes": 1000}}))


def test_node_order_in_file_does_not_matter() -> None:
    data = mlp()
    data["nodes"] = list(reversed(data["nodes"]))
    spec = parse_spec(data)
    assert spec.analysis.order == ["fc1", "act1", "fc2", "act2", "head"]


def test_parse_spec_reports_paths_without_lines() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(mlp(outputs=["nope"]), source="mem")
    (problem,) = info.value.problems
    assert (problem.file, problem.path, problem.line) == ("mem", "outputs[0]", None)
    assert str(problem).startswith("mem: outputs[0]: unknown output 'nope'")


def test_json_and_yaml_give_the_same_spec(tmp_path: Path) -> None:
    data = mlp(stages=[["fc1", "act1"], ["fc2", "act2", "head"]])
    (tmp_path / "a.json").write_text(json.dumps(data, indent=2))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(data))
    assert load_spec(tmp_path / "a.json").resolved() == load_spec(tmp_path / "a.yaml").resolved()


def test_yaml_tags_that_build_objects_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "evil.yaml"
    bad.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(SpecError, match="invalid YAML"):
        load_spec(bad)


def test_ops_cover_the_registry_list() -> None:
    from toolkit.spec import OPS

    wanted = {
        "linear",
        "conv2d",
        "embedding",
        "layer_norm",
        "batch_norm",
        "dropout",
        "relu",
        "gelu",
        "tanh",
        "sigmoid",
        "softplus",
        "softmax",
        "add",
        "concat",
        "flatten",
        "reshape",
        "mean",
    }
    assert wanted <= set(OPS)


@pytest.mark.parametrize(
    ("text", "size"), [(2000, 2000), ("2MB", 2_000_000), ("512 KiB", 524_288), ("1.5kb", 1500)]
)
def test_parse_bytes(text: int | str, size: int) -> None:
    assert parse_bytes(text) == size


def test_json_schema_describes_the_spec() -> None:
    schema = json_schema()
    assert schema["additionalProperties"] is False
    assert {"name", "inputs", "nodes", "outputs"} <= set(schema["required"])
    node = schema["$defs"]["NodeSpec"]
    assert "in" in node["properties"] and "linear" in node["properties"]["op"]["enum"]
    assert json.loads(json.dumps(schema)) == schema
