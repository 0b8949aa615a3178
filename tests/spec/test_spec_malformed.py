"""Each malformed spec gives its own message, field path and line through `rlhf validate`: exit 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from toolkit.cli import main
from toolkit.spec import SpecError, load_spec

HERE = Path(__file__).parent / "malformed"

# file, expected message fragment, field path ("" = whole file), line
CASES: list[tuple[str, str, str, int | None]] = [
    ("unknown_op.yaml", "unknown op 'lineer'; did you mean 'linear'?", "nodes[0].op", 5),
    ("unknown_key.yaml", "unknown key 'ouput'; did you mean 'out'?", "nodes[1].ouput", 12),
    ("unknown_top_key.yaml", "unknown key 'stagez'; did you mean 'stages'?", "stagez", 9),
    ("dangling_ref.yaml", "unknown reference 'act2'; did you mean 'act1'?", "nodes[2].in[0]", 7),
    ("duplicate_id.yaml", "duplicate id 'fc1' (first at nodes[0])", "nodes[2].id", 7),
    ("cycle.yaml", "cycle: fc1 -> head -> act1 -> fc1", "nodes[0].in", 5),
    ("shape_mismatch.yaml", "expected inputs of one shape, got [[32], [16]]", "nodes[2].in", 7),
    ("rank_too_big.yaml", "rank 80 exceeds min(in, out) = 64", "nodes[0].factorize.rank", 10),
    ("stage_missing_node.yaml", "nodes ['head'] are in no stage", "stages", 9),
    ("stage_twice.yaml", "node 'act1' is in stages 0 and 1", "stages[1][0]", 11),
    ("stage_bad_cut.yaml", "not a valid cut: 'head' consumes 'act1' from later stage 1", "stages[0][1]", 10),
    ("wrong_type.yaml", "valid integer", "nodes[0].out", 5),
    ("rank_zero.yaml", "greater than or equal to 1, got 0", "nodes[0].factorize.rank", 5),
    (
        "factorize_int.yaml",
        "expected 'none' or one of {rank: r}, {ratio: f}, {energy: e}, got 5",
        "nodes[0].factorize",
        5,
    ),
    ("two_rules.yaml", "expected exactly one of rank, ratio, energy", "nodes[0].factorize", 5),
    ("missing_out.yaml", "op 'linear' needs 'out'", "nodes[2].out", 7),
    ("missing_nodes.yaml", "missing required key 'nodes'", "nodes", 2),
    ("ids_into_linear.yaml", "expected float32 input, got int64", "nodes[0].in", 5),
    ("conv_on_vector.yaml", "expected a [channels, height, width] input, got shape [64]", "nodes[0].in", 5),
    ("key_not_for_op.yaml", "key 'out' does not apply to op 'relu'", "nodes[1].out", 6),
    ("bad_yaml.yaml", "invalid YAML", "", 4),
    ("auto_count.yaml", "count 9 exceeds the number of nodes (3)", "stages.auto.count", 9),
    ("bad_max_bytes.yaml", "expected a size like", "stages.auto.max_bytes", 9),
    (
        "unknown_output.yaml",
        "unknown output 'haed'; expected a node id; did you mean 'head'?",
        "outputs[0]",
        8,
    ),
    ("bad_train.yaml", "Input should be 'cross_entropy'", "train.loss", 11),
    ("vocab_missing.yaml", "expected 'vocab' for an int64", "inputs.tokens", 3),
    ("factorize_relu.yaml", "op 'relu' cannot be factorized", "nodes[1].factorize", 6),
    ("duplicate_key.yaml", "duplicate key 'out'", "nodes[0].out", 5),
    ("reshape_bad.yaml", "cannot reshape [64] (64 values) to [3, 5, 5]", "nodes[0].shape", 5),
    ("top_list.yaml", "expected a mapping with name, inputs, nodes, outputs; got a list", "", 1),
    ("unknown_op.json", "unknown op 'rellu'; did you mean 'relu'?", "nodes[1].op", 6),
    ("rank_too_big.json", "rank 12 exceeds min(in, out) = 8", "nodes[0].factorize.rank", 6),
    ("syntax.json", "invalid JSON", "", 6),
    ("bad_stages.json", "expected a list of stages", "stages", 6),
]


def test_corpus_is_complete() -> None:
    on_disk = {p.name for p in HERE.iterdir()}
    listed = {c[0] for c in CASES} | {"many_problems.yaml"}
    assert on_disk == listed
    assert len(CASES) >= 20
    assert sum(name.endswith(".json") for name, *_ in CASES) >= 3


@pytest.mark.parametrize(("name", "fragment", "path", "line"), CASES, ids=[c[0] for c in CASES])
def test_malformed_spec_is_reported(name: str, fragment: str, path: str, line: int | None) -> None:
    file = HERE / name
    result = CliRunner().invoke(main, ["validate", str(file)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    where = f"{file}:{line}" if line is not None else str(file)
    prefix = f"error: {where}: {path}: " if path else f"error: {where}: "
    hits = [ln for ln in result.output.splitlines() if ln.startswith(prefix) and fragment in ln]
    assert hits, f"expected a line starting {prefix!r} containing {fragment!r}, got:\n{result.output}"
    # the library raises the same problem with its parts
    with pytest.raises(SpecError) as info:
        load_spec(file)
    assert any(p.path == path and p.line == line and fragment in p.message for p in info.value.problems)


def test_every_problem_in_one_pass() -> None:
    file = HERE / "many_problems.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(file)
    got = {(p.path, p.line) for p in info.value.problems}
    assert got == {
        ("nodes[0].factorize.rank", 5),
        ("nodes[1].op", 6),
        ("nodes[2].in[0]", 7),
        ("nodes[3].bias", 8),
    }
    assert str(info.value).count("\n") == 3  # one line per problem


def test_validate_reports_all_files_and_ok_ones(tmp_path: Path) -> None:
    good = Path(__file__).parents[2] / "graphs" / "default.yaml"
    result = CliRunner().invoke(
        main, ["validate", str(good), str(HERE / "cycle.yaml"), str(HERE / "syntax.json")]
    )
    assert result.exit_code == 2
    assert f"ok {good}" in result.output
    assert "cycle:" in result.output and "invalid JSON" in result.output
    missing = CliRunner().invoke(main, ["validate", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "not found" in missing.output and "Traceback" not in missing.output
