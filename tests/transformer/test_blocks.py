"""Repeated blocks: expansion, per-repeat overrides, stage cuts between repeats, bad input."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from toolkit.builder import build_model
from toolkit.cli import main
from toolkit.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
ENCODER = ROOT / "graphs" / "encoder.yaml"


def _block_spec(repeat: int = 3, **node_extra) -> dict:
    return {
        "name": "blk",
        "inputs": {"x": {"shape": [4, 8]}, "m": {"shape": [4], "dtype": "int64", "vocab": 2}},
        "blocks": {
            "layer": {
                "inputs": ["h", "mask"],
                "output": "out",
                "nodes": [
                    {"id": "q", "op": "linear", "in": "h", "out": 8, "factorize": {"rank": 3}},
                    {"id": "att", "op": "attention", "in": ["q", "h", "h", "mask"], "heads": 2},
                    {"id": "out", "op": "add", "in": ["h", "att"]},
                ],
            }
        },
        "nodes": [
            {"id": "enc", "block": "layer", "repeat": repeat, "in": ["x", "m"], **node_extra},
            {"id": "pool", "op": "masked_mean", "in": ["enc", "m"]},
        ],
        "outputs": ["pool"],
    }


def test_block_expands_chains_and_overrides() -> None:
    spec = parse_spec(_block_spec(3, overrides={2: {"q": {"factorize": {"rank": 2}}}}))
    ids = [n.id for n in spec.nodes]
    assert ids == [f"enc_{k}_{n}" for k in range(3) for n in ("q", "att", "out")] + ["pool"]
    assert spec.node("enc_0_q").in_ == ["x"] and spec.node("enc_1_q").in_ == ["enc_0_out"]
    assert spec.node("enc_2_att").in_ == ["enc_2_q", "enc_1_out", "enc_1_out", "m"]
    assert spec.node("pool").in_ == ["enc_2_out", "m"]
    assert {n.group for n in spec.nodes} == {"enc.0", "enc.1", "enc.2", None}
    model = build_model(spec, seed=0)
    assert model.ranks() == {"enc_0_q": 3, "enc_1_q": 3, "enc_2_q": 2}
    # the expanded spec is the same graph as the hand-written chain it stands for
    again = parse_spec(spec.resolved())
    assert again.resolved() == spec.resolved()


def test_blocked_model_equals_hand_written_chain() -> None:
    spec = parse_spec(_block_spec(2))
    flat = copy.deepcopy(spec.resolved())
    for node in flat["nodes"]:
        node.pop("group", None)
    plain = parse_spec(flat)
    a, b = build_model(spec, seed=0).double(), build_model(plain, seed=0).double()
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    m = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    torch.testing.assert_close(a(x, m), b(x, m), rtol=0, atol=0)
    # reference: the same two layers computed directly from the weights, float64
    h = x
    mods = a.node_modules()
    for k in range(2):
        q = mods[f"enc_{k}_q"](h)
        att = mods[f"enc_{k}_att"](q, h, h, m)
        h = h + att
    want = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)
    torch.testing.assert_close(a(x, m), want, rtol=1e-12, atol=1e-12)


def test_auto_stages_cut_between_repeats_only() -> None:
    spec = load_spec(ENCODER)
    stages = spec.stage_partition()
    groups = [{spec.node(n).group for n in stage} - {None} for stage in stages]
    assert groups == [{"enc.0"}, {"enc.1"}]
    s = _block_spec(4)
    s["stages"] = {"auto": {"count": 3}}
    parts = parse_spec(s).stage_partition()
    seen: dict[str, int] = {}
    for i, stage in enumerate(parts):
        for nid in stage:
            group = parse_spec(s).node(nid).group
            if group is not None:
                assert seen.setdefault(group, i) == i, f"{group} cut across stages"
    s["stages"] = {"auto": {"count": 6}}
    with pytest.raises(SpecError, match="exceeds the number of nodes and block repeats"):
        parse_spec(s)


def test_stage_lists_may_name_a_repeat() -> None:
    s = _block_spec(2)
    s["stages"] = [["enc"], ["pool"]]
    assert parse_spec(s).stage_partition()[1] == ["pool"]
    s["stages"] = [["enc.0"], ["enc.1", "pool"]]
    assert parse_spec(s).stage_partition() == [
        ["enc_0_q", "enc_0_att", "enc_0_out"],
        ["enc_1_q", "enc_1_att", "enc_1_out", "pool"],
    ]


def _problem(data: dict, tmp_path: Path) -> tuple[int, str]:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    result = CliRunner().invoke(main, ["validate", str(path)])
    return result.exit_code, result.output.strip()


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (
            lambda s: s["nodes"][0].update(repeat=0),
            "nodes[0].repeat: expected a repeat count between 1 and 1024, got 0",
        ),
        (
            lambda s: s["nodes"][0].update(repeat=10**6),
            "nodes[0].repeat: expected a repeat count between 1 and 1024",
        ),
        (lambda s: s["nodes"][0].update(block="lyr"), "nodes[0].block: unknown block 'lyr'"),
        (
            lambda s: s["nodes"][0].update(overrides={5: {"q": {"out": 4}}}),
            "nodes[0].overrides[5]: repeat index 5 out of range",
        ),
        (
            lambda s: s["nodes"][0].update(overrides={1: {"z": {"out": 4}}}),
            "nodes[0].overrides[1].z: unknown block node 'z'",
        ),
        (
            lambda s: s["nodes"][0].update(overrides={1: {"q": {"factorize": {"rank": 99}}}}),
            "nodes[0].overrides[1].q.factorize.rank: rank 99 exceeds min(in, out) = 8 (in enc repeat 1)",
        ),
        (
            lambda s: s["blocks"]["layer"]["nodes"][1].update(heads=3),
            "blocks.layer.nodes[1].heads: heads 3 does not divide the width 8 (in enc repeat 0)",
        ),
        (lambda s: s["nodes"][0].update(**{"in": ["x"]}), "nodes[0].in: block 'layer' takes 2 input(s)"),
    ],
)
def test_bad_blocks_one_line_exit_2(mutate, needle, tmp_path: Path) -> None:
    s = _block_spec(3)
    mutate(s)
    code, out = _problem(s, tmp_path)
    assert code == 2, out
    lines = out.splitlines()
    assert len(lines) == 1 and needle in lines[0], out
    assert f"{tmp_path / 'bad.yaml'}:" in lines[0], out
    assert lines[0].split("bad.yaml:")[1].split(":")[0].isdigit(), out  # file:line: path: message


def test_graph_draws_each_repeat_inside_its_stage() -> None:
    from toolkit.spec.summary import to_dot, to_mermaid

    spec = load_spec(ENCODER)
    mermaid = to_mermaid(spec)
    assert (
        'subgraph block_enc_0["block enc.0"]' in mermaid and 'subgraph block_enc_1["block enc.1"]' in mermaid
    )
    # repeat 0 is drawn inside stage 0, repeat 1 inside stage 1
    assert mermaid.index("subgraph stage0") < mermaid.index("block_enc_0") < mermaid.index("subgraph stage1")
    assert mermaid.index("subgraph stage1") < mermaid.index("block_enc_1")
    dot = to_dot(spec)
    assert dot.count("subgraph cluster_block_") == 2 and '"enc_1_att" [label=' in dot


def test_schema_documents_blocks_and_transformer_ops() -> None:
    from toolkit.spec import json_schema

    schema = json_schema()
    assert "blocks" in schema["properties"]
    block = schema["properties"]["blocks"]["additionalProperties"]
    assert set(block["properties"]) == {"inputs", "output", "nodes"}
    repeat = schema["properties"]["nodes"]["items"]["anyOf"][1]
    assert {"id", "block", "repeat", "in", "overrides"} <= set(repeat["properties"])
    assert repeat["properties"]["repeat"]["maximum"] == 1024
    op_doc = str(schema)
    for op in ("attention", "position_embedding", "masked_mean", "select", "mul"):
        assert f"{op}: " in op_doc
