"""Hostile specs end in one SpecError naming the limit hit, in milliseconds and a few MB.

Before the ceilings, a 300-byte alias bomb took seconds and hundreds of MB (each extra level
multiplied both by 9), a self-containing alias ended in RecursionError, and ``out: 100000000000``
validated "ok". The time bounds here are generous for a loaded 2-core CI box, and still far below
what the unbounded loader needed.
"""

from __future__ import annotations

import ast
import json
import math
import random
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit import limits
from toolkit.cli import main
from toolkit.errors import InputError
from toolkit.spec import SpecError, load_spec, parse_spec
from toolkit.spec.check import NN_MODULE_ATTRIBUTES, _partition_count

GRAPHS = Path(__file__).parents[2] / "graphs"
SECONDS = 5.0  # per hostile file, generous for a busy CI box; the unbounded loader needed 16 s for 6 levels, ×9 per level
PEAK_BYTES = 8 << 20


def bounded(call: Callable[[], Any]) -> tuple[BaseException | None, float, int]:
    """Run ``call``; return (exception raised or None, seconds, peak traced bytes)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    err: BaseException | None = None
    try:
        call()
    except BaseException as exc:  # the caller checks what it got
        err = exc
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return err, seconds, peak


def refused(path: Path, fragment: str) -> SpecError:
    err, seconds, peak = bounded(lambda: load_spec(path))
    assert isinstance(err, SpecError), repr(err)
    assert fragment in str(err), str(err)
    assert seconds < SECONDS, seconds
    assert peak < PEAK_BYTES, peak
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    return err


def alias_bomb(levels: int, width: int = 9) -> str:
    lines = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    lines.append(f"name: *a{levels - 1}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [6, 9, 12])
def test_alias_bomb_is_refused_fast(tmp_path: Path, levels: int) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(levels))
    assert path.stat().st_size < 1000
    err = refused(path, "max_spec_values")
    assert err.problems[0].line is not None and "RLHF_MAX_SPEC_VALUES" in str(err)


def test_merge_key_bomb_is_refused_fast(tmp_path: Path) -> None:
    lines = ["m0: &m0 {a: 1, b: 2}"]
    for i in range(1, 12):
        lines.append(f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 8)}], k{i}: 1}}")
    path = tmp_path / "merge.yaml"
    path.write_text("\n".join(lines) + "\nname: *m11\n")
    refused(path, "max_spec_values")


@pytest.mark.parametrize("text", ["name: &a [*a]\n", "a: &a {b: *a}\n", "x: &a [1, [2, *a]]\n"])
def test_self_containing_alias_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "self.yaml"
    path.write_text(text)
    err = refused(path, "refers to the list or mapping that contains it")
    assert err.problems[0].line == 1


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_deep_nesting_is_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"deep{suffix}"
    path.write_text('{"name": ' + "[" * 50_000 + "]" * 50_000 + "}")
    refused(path, "MAX_SPEC_DEPTH")


def test_deep_nesting_through_aliases_is_refused(tmp_path: Path) -> None:
    lines = ["a0: &a0 [[[[[[[[[[1]]]]]]]]]]"]
    for i in range(1, 8):
        lines.append(f"a{i}: &a{i} [[[[[[*a{i - 1}]]]]]]")
    path = tmp_path / "deep_alias.yaml"
    path.write_text("\n".join(lines) + "\n")
    refused(path, "MAX_SPEC_DEPTH")


def test_nesting_within_the_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    depth = limits.MAX_SPEC_DEPTH - 1
    path.write_text("name: " + "[" * depth + "]" * depth + "\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "MAX_SPEC_DEPTH" not in str(info.value) and "valid string" in str(info.value)


def test_large_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * 2000 + "\n" + (GRAPHS / "default.yaml").read_text())
    assert isinstance(load_spec(path).name, str)
    monkeypatch.setenv("RLHF_MAX_SPEC_BYTES", "1000")
    refused(path, "max_spec_bytes = 1,000")


@pytest.mark.parametrize(
    ("name", "data", "fragment"),
    [
        ("bytes.yaml", b"name: \xff\xfe\n", "expected UTF-8 text, got byte 0xff"),
        ("digits.yaml", b"name: x\nseed: " + b"7" * 5000 + b"\n", "cannot read value"),
        ("date.yaml", b"name: 2020-13-45\n", "cannot read value"),
        ("digits.json", b'{"name": ' + b"7" * 5000 + b"}", "invalid JSON"),
    ],
)
def test_unreadable_values_are_spec_errors(tmp_path: Path, name: str, data: bytes, fragment: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    refused(path, fragment)


def test_parse_spec_refuses_shared_and_recursive_data() -> None:
    leaf: list[Any] = ["x"] * 10
    for _ in range(10):
        leaf = [leaf] * 10  # 10**11 values once expanded, a few KB in memory
    err, seconds, _ = bounded(lambda: parse_spec({"name": leaf}))
    assert isinstance(err, SpecError) and "max_spec_values" in str(err) and seconds < SECONDS
    loop: dict[str, Any] = {"name": "x"}
    loop["nodes"] = [loop]
    with pytest.raises(SpecError, match="contains itself"):
        parse_spec(loop)


HUGE = """name: huge
inputs: {{x: {{shape: [64]}}}}
nodes:
  - {{id: fc1, op: linear, in: x, out: {out}}}
  - {{id: act, op: relu, in: fc1}}
  - {{id: head, op: linear, in: act, out: 10}}
outputs: [head]
"""


def test_absurd_width_is_refused_with_node_field_line_and_limit(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text(HUGE.format(out=100_000_000_000))
    err = refused(path, "max_tensor_elements")
    (problem,) = err.problems
    assert (problem.path, problem.line) == ("nodes[0].out", 4)
    assert "node 'fc1'" in problem.message and "100,000,000,000" in problem.message
    result = CliRunner().invoke(main, ["show", str(path)])
    assert result.exit_code == 2 and "100,000,000,000" not in result.output.replace(
        "needs 100,000,000,000", ""
    )


def test_parameter_ceilings_per_node_and_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "wide.yaml"
    path.write_text(HUGE.format(out=4096))  # fc1: 64·4096 + 4096 = 266,240 params; head: 40,970
    assert load_spec(path).name == "huge"
    monkeypatch.setenv("RLHF_MAX_NODE_PARAMS", "200000")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    (problem,) = info.value.problems
    assert (problem.path, problem.line) == ("nodes[0].out", 4)
    assert "node 'fc1' needs 266,240 parameters" in problem.message and "max_node_params = 200,000" in str(
        problem
    )
    monkeypatch.delenv("RLHF_MAX_NODE_PARAMS")
    monkeypatch.setenv("RLHF_MAX_MODEL_PARAMS", "300000")
    with pytest.raises(SpecError, match=r"the model needs 307,210 parameters.*max_model_params = 300,000"):
        load_spec(path)


def test_ceiling_options_on_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "wide.yaml"
    path.write_text(HUGE.format(out=4096))
    runner = CliRunner()
    ok = runner.invoke(main, ["validate", str(path)], env={"RLHF_MAX_NODE_PARAMS": None})
    assert ok.exit_code == 0, ok.output
    low = runner.invoke(main, ["--max-node-params", "1000", "validate", str(path)])
    assert low.exit_code == 2 and "max_node_params = 1,000" in low.output
    high = runner.invoke(
        main, ["--max-tensor-elements", "200000000000", "validate", str(tmp_path / "wide.yaml")]
    )
    assert high.exit_code == 0, high.output
    bad = runner.invoke(main, ["validate", str(path)], env={"RLHF_MAX_NODE_PARAMS": "lots"})
    assert (
        bad.exit_code == 2 and "RLHF_MAX_NODE_PARAMS: expected a positive integer, got 'lots'" in bad.output
    )


def test_input_shape_over_the_element_ceiling() -> None:
    spec = {
        "name": "big_input",
        "inputs": {"x": {"shape": [100_000, 100_000]}},
        "nodes": [{"id": "a", "op": "relu", "in": "x"}],
        "outputs": ["a"],
    }
    with pytest.raises(SpecError, match=r"inputs\.x\.shape: input 'x' needs 10,000,000,000 elements"):
        parse_spec(spec)


def test_limits_api() -> None:
    assert limits.numel([3, 4, 5]) == 60
    assert limits.check_shape([1000, 1000], "t") == 1_000_000
    assert limits.over("max_node_params", limits.MAX_NODE_PARAMS, "x") is None
    message = limits.over("max_node_params", limits.MAX_NODE_PARAMS + 1, "tensor 'w'")
    assert message is not None and message.startswith("tensor 'w' needs 1,000,000,001 parameters")
    with pytest.raises(InputError, match="model needs"):
        limits.check_params(limits.MAX_MODEL_PARAMS + 1, "model", scope="model")
    with pytest.raises(InputError, match="non-negative"):
        limits.check_shape([-1, 4], "t")
    assert isinstance(SpecError([]), InputError)


def test_auto_stage_count_is_bounded() -> None:
    nodes = [{"id": f"n{i}", "op": "relu", "in": "x" if i == 0 else f"n{i - 1}"} for i in range(1000)]
    spec = {"name": "t", "inputs": {"x": {"shape": [4]}}, "nodes": nodes, "outputs": ["n999"]}
    t0 = time.perf_counter()
    stages = parse_spec({**spec, "stages": {"auto": {"count": 250}}}).stage_partition()
    assert time.perf_counter() - t0 < SECONDS  # the O(count·n²) programme needed about a minute
    assert len(stages) == 250 and [nid for stage in stages for nid in stage] == [n["id"] for n in nodes]
    assert max(map(len, stages)) - min(map(len, stages)) <= 1  # equal costs: balanced node counts
    with pytest.raises(SpecError, match="MAX_AUTO_STAGES"):
        parse_spec({**spec, "stages": {"auto": {"count": 257}}})


def _partition_reference(costs: list[int], count: int) -> list[int]:
    """The plain O(count·n²) dynamic programme (smallest split index on ties)."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c + 1)
    best = [[math.inf] * (n + 1) for _ in range(count + 1)]
    cut = [[0] * (n + 1) for _ in range(count + 1)]
    best[0][0] = 0
    for k in range(1, count + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                v = max(best[k - 1][i], prefix[j] - prefix[i])
                if v < best[k][j]:
                    best[k][j], cut[k][j] = v, i
    bounds, j = [], n
    for k in range(count, 0, -1):
        bounds.append(j)
        j = cut[k][j]
    return sorted(bounds)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from([0, 0, 1, 2, 5, 40, 1000]), min_size=1, max_size=14), st.data())
def test_partition_matches_the_plain_programme(costs: list[int], data: st.DataObject) -> None:
    count = data.draw(st.integers(1, len(costs)))
    assert _partition_count(costs, count) == _partition_reference(costs, count)


def test_partition_matches_on_random_costs() -> None:
    rng = random.Random(7)
    for _ in range(200):
        costs = [rng.randint(0, 10**6) for _ in range(rng.randint(1, 30))]
        count = rng.randint(1, len(costs))
        assert _partition_count(costs, count) == _partition_reference(costs, count)


def test_reserved_ids_cover_nn_module() -> None:
    """The written-out names cover nn.Module's, as torch defines them and as libraries patch them."""
    from torch import nn

    script = "import torch; print(sorted(n for n in dir(torch.nn.Module) if not n.startswith('__')))"
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    plain = set(ast.literal_eval(fresh.stdout))
    assert len(plain) > 50 and plain <= NN_MODULE_ATTRIBUTES, plain - NN_MODULE_ATTRIBUTES
    here = {n for n in dir(nn.Module) if not n.startswith("__")}  # after transformers' additions
    assert here <= NN_MODULE_ATTRIBUTES, here - NN_MODULE_ATTRIBUTES
    assert NN_MODULE_ATTRIBUTES - plain <= {"smart_apply"}


def test_json_spec_with_limits_still_gets_lines(tmp_path: Path) -> None:
    path = tmp_path / "huge.json"
    spec = {
        "name": "h",
        "inputs": {"x": {"shape": [64]}},
        "nodes": [{"id": "fc", "op": "linear", "in": "x", "out": 10**11}],
        "outputs": ["fc"],
    }
    path.write_text(json.dumps(spec, indent=1))
    err = refused(path, "max_tensor_elements")
    assert err.problems[0].path == "nodes[0].out" and err.problems[0].line is not None
