"""`rlhf validate`, `rlhf show`, `rlhf graph`, `rlhf schema` through click's test runner."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from toolkit.cli import main
from toolkit.spec import load_spec
from toolkit.spec.summary import summarize, totals

GRAPHS = sorted(
    p for p in (Path(__file__).parents[2] / "graphs").iterdir() if p.suffix in (".yaml", ".yml", ".json")
)
DEFAULT = GRAPHS[0].parent / "default.yaml"


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def test_validate_all_graphs() -> None:
    code, out = run("validate", *map(str, GRAPHS))
    assert code == 0
    assert out.splitlines() == [f"ok {p}" for p in GRAPHS]


def test_schema_is_json_schema() -> None:
    code, out = run("schema")
    assert code == 0
    schema = json.loads(out)
    assert schema["title"] == "rlhf graph spec"
    assert set(schema["properties"]) >= {"name", "inputs", "nodes", "outputs", "stages", "train", "defaults"}


@pytest.mark.parametrize("path", GRAPHS, ids=[p.name for p in GRAPHS])
def test_show_lists_every_node_and_totals(path: Path) -> None:
    code, out = run("show", str(path))
    assert code == 0
    spec = load_spec(path)
    for node in spec.nodes:
        assert re.search(rf"│\s+{node.id}\s+│\s+{node.op}\s+│", out), node.id
    t = totals(summarize(spec))
    assert out.count("stage total") == len(spec.stage_partition())
    assert f"{t['params']:,}" in out and f"{t['dense_params']:,}" in out
    assert f"compression: {t['dense_params'] / t['params']:.2f}x fewer parameters" in out


def test_show_numbers_for_default() -> None:
    # fc1: 64 -> 256 at rank 24: 24·(64+256) + 256 parameters; dense 64·256 + 256
    _, out = run("show", str(DEFAULT))
    row = next(line for line in out.splitlines() if "│ fc1 " in line)
    assert f"{64 * 256 + 256:,}" in row and f"{24 * (64 + 256) + 256:,}" in row
    assert f"{24 * (64 + 256):,}" in row  # multiply-adds per example


@pytest.mark.parametrize("fmt", ["mermaid", "dot"])
def test_graph_draws_stages_as_clusters(fmt: str) -> None:
    path = GRAPHS[0].parent / "convnet.yaml"
    code, out = run("graph", str(path), "--format", fmt)
    assert code == 0
    spec = load_spec(path)
    n_stages = len(spec.stage_partition())
    if fmt == "mermaid":
        assert out.startswith("flowchart")
        assert len(re.findall(r"subgraph stage\d", out)) == n_stages
        edges = set(re.findall(r"(\w+) --> (\w+)", out))
    else:
        assert out.startswith('digraph "digits-resnet"')
        assert len(re.findall(r"subgraph cluster_stage\d", out)) == n_stages
        edges = set(re.findall(r'"(\w+)" -> "(\w+)"', out))
    assert {(ref, n.id) for n in spec.nodes for ref in n.in_} <= edges


def test_graph_rejects_unknown_format() -> None:
    code, out = run("graph", str(DEFAULT), "--format", "png")
    assert code == 2 and "png" in out


def test_show_uses_built_ranks_for_energy(tmp_path: Path) -> None:
    spec = tmp_path / "energy.yaml"
    spec.write_text(
        "name: e\ninputs: {x: {shape: [64]}}\n"
        "nodes:\n  - {id: fc, op: linear, in: x, out: 128, factorize: {energy: 0.5}}\n"
        "outputs: [fc]\n"
    )
    code, out = run("show", str(spec))
    assert code == 0
    from toolkit.builder import build_model

    rank = build_model(load_spec(spec), seed=0).ranks()["fc"]
    row = next(line for line in out.splitlines() if "│ fc " in line)
    assert f"│ {rank:>4} │" in row and f"{rank * (64 + 128) + 128:,}" in row and "energy 0.5" in row
