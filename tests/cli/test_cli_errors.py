"""Exit codes: 2 only for errors about the user's input, 1 (with the traceback kept) for bugs; and
the spec commands answer without importing torch or onnx."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import toolkit.spec.loader
from toolkit.cli import main

ROOT = Path(__file__).parents[2]
DEFAULT = ROOT / "graphs" / "default.yaml"


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    return result.exit_code, result.output


def test_bad_spec_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\ninputs: {x: {shape: [4]}}\nnodes:\n  - {id: a, op: lineer, in: x}\noutputs: [a]\n"
    )
    code, out = invoke("validate", str(bad))
    assert code == 2
    (line,) = out.splitlines()
    assert line.startswith(f"error: {bad}:4: nodes[0].op: unknown op 'lineer'; did you mean 'linear'?")
    assert "Traceback" not in out and "internal error" not in out


@pytest.mark.parametrize("args", [["show", "no/such/file.yaml"], ["graph", "no/such/file.yaml"]])
def test_missing_file_exits_2(args: list[str]) -> None:
    code, out = invoke(*args)
    assert code == 2 and out.startswith("error: ") and "no/such/file.yaml" in out


def test_click_usage_error_exits_2() -> None:
    code, out = invoke("validate", "--no-such-option")
    assert code == 2 and "No such option" in out


@pytest.mark.parametrize(
    "exc", [TypeError("unsupported operand"), KeyError("nodes"), ValueError("math domain")]
)
def test_internal_error_exits_1_and_keeps_the_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, exc: Exception
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(toolkit.spec.loader, "check_graph", broken)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # pick up TMPDIR
    code, out = invoke("validate", str(DEFAULT))
    assert code == 1, out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("internal error:")]
    assert type(exc).__name__ in line and "please report" in line
    match = re.search(r"traceback in (\S+\.txt)", line)
    assert match, line
    trace = Path(match.group(1)).read_text()
    assert trace.startswith("Traceback (most recent call last):")
    assert "def broken" not in trace and "in broken" in trace and type(exc).__name__ in trace
    assert Path(match.group(1)).parent == tmp_path


def test_internal_error_traceback_printed_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("analysis")

    monkeypatch.setattr(toolkit.spec.loader, "check_graph", broken)
    code, out = invoke("show", str(DEFAULT), env={"RLHF_TRACEBACK": "print"})
    assert code == 1
    assert "Traceback (most recent call last):" in out and "in broken" in out
    assert "internal error: KeyError: 'analysis'" in out and "traceback above" in out


def test_input_error_from_a_library_exits_2(tmp_path: Path) -> None:
    data = tmp_path / "x.npy"
    data.write_bytes(b"\x93NUMPY not really")
    from toolkit.data.files import load_npy
    from toolkit.errors import InputError

    with pytest.raises(InputError, match=r"x\.npy: expected a readable \.npy file"):
        load_npy(data)


CHECK = """
import sys
sys.argv = ["rlhf", *sys.argv[1:]]
try:
    from toolkit.cli import main
    main()
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "onnx", "onnxruntime") if m in sys.modules)
print("HEAVY:", ",".join(heavy) or "none", "EXIT:", code, file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args",
    [
        ["validate", *sorted(str(p) for p in (ROOT / "graphs").glob("*.yaml"))],
        ["schema"],
        ["show", str(DEFAULT)],
        ["show", str(ROOT / "graphs" / "tokens.yaml")],
        ["graph", str(ROOT / "graphs" / "convnet.yaml")],
        ["graph", str(ROOT / "graphs" / "autoencoder.yaml"), "--format", "dot"],
        ["validate", str(ROOT / "tests" / "spec" / "malformed" / "many_problems.yaml")],
    ],
    ids=lambda a: " ".join(Path(x).name for x in a[:2]),
)
def test_spec_commands_import_no_torch(args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, *args], capture_output=True, text=True, env=env, timeout=120
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("HEAVY: none EXIT: "), proc.stderr[-2000:]
    expected = "2" if "malformed" in args[-1] else "0"
    assert last.endswith(f"EXIT: {expected}"), proc.stderr[-2000:]
    if expected == "0":
        assert proc.stdout.strip(), "the command printed nothing"
    else:
        assert proc.stderr.count("error: ") >= 3
