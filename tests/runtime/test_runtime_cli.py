"""`rlhf export`, `rlhf run`, `rlhf bench`: outputs and exit codes (2 for user errors, no traceback)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from toolkit.cli import main
from toolkit.runtime import Executor

Fixture = tuple[Path, Any, dict[str, np.ndarray]]


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_run_npy_npz_csv(default_export: Fixture, tmp_path: Path) -> None:
    out, _, sample = default_export
    want = Executor(out, providers="cpu").run(sample)["head"]
    np.save(tmp_path / "x.npy", sample["x"])
    res = _invoke("run", out, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy", "--providers", "cpu")
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), want)
    np.savez(tmp_path / "x.npz", x=sample["x"])
    budget = (
        max(sum(q.stat().st_size for q in out.glob(f"{p.name}*")) for p in out.glob("stage_*.onnx")) + 10_000
    )
    res = _invoke(
        "run", out, "--input", tmp_path / "x.npz", "-o", tmp_path / "y.npz", "--memory-budget", budget
    )
    assert res.exit_code == 0, res.output
    assert "streaming" in res.output
    np.testing.assert_array_equal(np.load(tmp_path / "y.npz")["head"], want)
    np.savetxt(tmp_path / "x.csv", sample["x"].astype(np.float64), delimiter=",", fmt="%.9g")
    res = _invoke("run", out, "--input", tmp_path / "x.csv", "-o", tmp_path / "c.npy", "--threads", "1")
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(np.load(tmp_path / "c.npy"), want, rtol=1e-5, atol=1e-5)


def test_run_user_errors_exit_2(default_export: Fixture, tmp_path: Path) -> None:
    out, _, sample = default_export
    np.save(tmp_path / "bad.npy", sample["x"][:, :10])
    res = _invoke("run", out, "--input", tmp_path / "bad.npy", "-o", tmp_path / "y.npy")
    assert res.exit_code == 2
    assert "error: input 'x': wrong shape, expected 'x' float32 (B, 64), got float32 (40, 10)" in res.output
    assert "Traceback" not in res.output
    np.savez(tmp_path / "bad.npz", y=sample["x"])
    res = _invoke("run", out, "--input", tmp_path / "bad.npz", "-o", tmp_path / "y.npy")
    assert res.exit_code == 2 and "unknown input 'y'" in res.output and "missing input 'x'" in res.output
    np.save(tmp_path / "x.npy", sample["x"])
    res = _invoke("run", out, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.txt")
    assert res.exit_code == 2 and "expected a .npy or .npz path" in res.output
    res = _invoke("run", tmp_path, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert res.exit_code == 2 and "no manifest.json" in res.output


def test_bench_json(default_export: Fixture) -> None:
    res = _invoke("bench", default_export[0], "--batch", "1", "--batch", "8", "--seconds", "0.05", "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)["rows"]
    assert {(r["config"], r["batch"]) for r in rows} == {
        (c, b) for c in ("staged fp32", "fused fp32") for b in (1, 8)
    }
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["throughput"] > 0
    res = _invoke("bench", default_export[0], "--batch", "0")
    assert res.exit_code == 2


@pytest.mark.slow
def test_export_from_checkpoint(tmp_path: Path) -> None:
    from toolkit.builder import build_model
    from toolkit.checkpoint import save_checkpoint
    from toolkit.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[2] / "graphs" / "default.yaml")
    model = build_model(spec, seed=3)
    ckpt = save_checkpoint(
        tmp_path / "ckpts", "best-00000001", model, model.to_spec().resolved(), {"step": 1}
    )
    out = tmp_path / "export"
    res = _invoke("export", ckpt, "-o", out, "--samples", "64")
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["samples"] == 64 and manifest["source"] == str(ckpt.resolve())
    res = _invoke("export", ckpt, "-o", out)  # exists, no --overwrite
    assert res.exit_code == 2 and "exists" in res.output
    assert (out / "manifest.json").exists()  # the earlier export is untouched
    res = _invoke("export", ckpt, "-o", tmp_path / "e2", "--samples", "1")
    assert res.exit_code == 2


def _bench_configs(res: Any) -> set[str]:
    assert res.exit_code == 0, res.output
    return {r["config"] for r in json.loads(res.stdout)["rows"]}


def test_bench_refuses_a_manifest_source_outside_the_export(
    default_export: Fixture, export_copy: Path
) -> None:
    from toolkit.checkpoint import save_checkpoint

    _, model, _ = default_export
    ckpt = save_checkpoint(export_copy.parent, "outside", model, model.to_spec().resolved())
    manifest = json.loads((export_copy / "manifest.json").read_text())
    args = ("--batch", "2", "--seconds", "0.01", "--json")
    for source in (str(ckpt.resolve()), "../outside"):  # absolute, and climbing out
        manifest["source"] = source
        (export_copy / "manifest.json").write_text(json.dumps(manifest))
        res = CliRunner().invoke(main, ["bench", str(export_copy), *args])
        assert "torch eager" not in _bench_configs(res)
        assert "torch eager skipped: manifest source: manifest path" in res.stderr
        assert "pass --model PATH" in res.stderr
    # the same checkpoint named explicitly by the user is theirs to choose
    res = CliRunner().invoke(main, ["bench", str(export_copy), "--model", str(ckpt), *args])
    assert "torch eager" in _bench_configs(res)
    # a source inside the export directory is followed
    save_checkpoint(export_copy, "inside", model, model.to_spec().resolved())
    manifest["source"] = "inside"
    (export_copy / "manifest.json").write_text(json.dumps(manifest))
    res = CliRunner().invoke(main, ["bench", str(export_copy), *args])
    assert "torch eager" in _bench_configs(res) and "skipped" not in res.stderr
