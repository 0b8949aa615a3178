"""Executor: hashes, path safety, input checks, streaming vs resident, providers, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from toolkit.runtime import Executor, SessionConfig

Fixture = tuple[Path, Any, dict[str, np.ndarray]]


def _float64_reference(model: Any, x: np.ndarray) -> np.ndarray:
    """The same graph evaluated by torch in float64."""
    import copy

    import torch

    with torch.no_grad():
        return copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()


def test_runtime_import_leaves_no_torch() -> None:
    code = "import toolkit.runtime, toolkit.runtime.bench, sys; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False"


def test_run_matches_float64_torch(default_export: Fixture) -> None:
    out, model, sample = default_export
    ex = Executor(out, providers="cpu")
    got = ex.run(sample)
    assert list(got) == ["head"] and got["head"].dtype == np.float32
    np.testing.assert_allclose(got["head"], _float64_reference(model, sample["x"]), rtol=1e-4, atol=1e-4)
    fused = Executor(out, providers="cpu", fused=True).run(sample)["head"]
    np.testing.assert_allclose(fused, got["head"], rtol=1e-5, atol=1e-5)
    assert ex.mode == "resident"


def _stage_bytes(entry: dict[str, Any]) -> int:
    """A stage file's bytes and its external-data file's."""
    return int(entry["bytes"]) + int(entry.get("data", {}).get("bytes", 0))


def test_streaming_and_resident_are_identical(default_export: Fixture) -> None:
    out, _, sample = default_export
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    sizes = [_stage_bytes(s["files"]["fp32"]) for s in stages]
    budget = max(sizes) + 10_000  # holds the largest stage with its batch-1 activations, not all stages
    assert budget < sum(sizes)
    streaming = Executor(out, providers="cpu", memory_budget=budget)
    resident = Executor(out, providers="cpu")
    assert streaming.mode == "streaming" and resident.mode == "resident"
    for rows in (slice(0, 1), slice(None)):
        batch = {k: v[rows] for k, v in sample.items()}
        a, b = streaming.run(batch), resident.run(batch)
        assert np.array_equal(a["head"], b["head"])


def test_budget_below_largest_stage_is_refused(default_export: Fixture) -> None:
    with pytest.raises(ValueError, match=r"memory_budget: expected at least \d+ bytes"):
        Executor(default_export[0], providers="cpu", memory_budget=1000)


def test_malformed_inputs_are_rejected(default_export: Fixture) -> None:
    out, _, sample = default_export
    ex = Executor(out, providers="cpu")
    x = sample["x"]
    expected = r"expected: \['x' float32 \(B, 64\)\]"
    with pytest.raises(ValueError, match=r"^unknown input 'y'; " + expected + "$"):
        ex.run({"x": x, "y": x})
    with pytest.raises(ValueError, match=r"^missing input 'x'; " + expected):
        ex.run({})
    with pytest.raises(
        ValueError, match=r"input 'x': wrong dtype, expected 'x' float32 \(B, 64\), got float64 \(40, 64\)"
    ):
        ex.run({"x": x.astype(np.float64)})
    with pytest.raises(
        ValueError, match=r"input 'x': wrong shape, expected 'x' float32 \(B, 64\), got float32 \(40, 63\)"
    ):
        ex.run({"x": x[:, :63]})
    with pytest.raises(ValueError, match=r"wrong shape.*got float32 \(64,\)"):
        ex.run({"x": x[0]})
    with pytest.raises(TypeError, match="expected a dict"):
        ex.run(x)  # type: ignore[arg-type]


def test_tampered_stage_file_is_refused(export_copy: Path) -> None:
    path = export_copy / "stage_01.onnx"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"stage_01.onnx: sha256 mismatch"):
        Executor(export_copy, providers="cpu")
    stages = json.loads((export_copy / "manifest.json").read_text())["stages"]
    streaming = Executor(
        export_copy,
        providers="cpu",
        memory_budget=max(_stage_bytes(s["files"]["fp32"]) for s in stages) + 10_000,
    )
    assert streaming.mode == "streaming"
    with pytest.raises(ValueError, match="sha256 mismatch"):  # checked again when a stage is streamed in
        streaming.run({"x": np.zeros((1, 64), np.float32)})


@pytest.mark.parametrize("bad", ["../stage_00.onnx", "/etc/hostname", "sub/../../stage_00.onnx", "link.onnx"])
def test_manifest_path_escaping_the_directory_is_refused(export_copy: Path, tmp_path: Path, bad: str) -> None:
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((export_copy / "stage_00.onnx").read_bytes())
    (export_copy / "link.onnx").symlink_to(outside)
    manifest = json.loads((export_copy / "manifest.json").read_text())
    manifest["stages"][0]["files"]["fp32"]["file"] = bad
    (export_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest path .*(absolute|'\.\.'|outside the export directory)"):
        Executor(export_copy, providers="cpu")


def test_invalid_manifest_and_missing_dir(export_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json"):
        Executor(tmp_path, providers="cpu")
    manifest = json.loads((export_copy / "manifest.json").read_text())
    manifest["stages"][1]["inputs"][0]["dtype"] = "complex64"
    (export_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"stages\[1\].inputs\[0\].dtype: expected one of"):
        Executor(export_copy, providers="cpu")


def test_session_options_and_providers(default_export: Fixture) -> None:
    out, _, sample = default_export
    cfg = SessionConfig(intra_op_threads=1, memory_arena=False, optimization="basic")
    ex = Executor(out, providers=["CPUExecutionProvider"], session_options=cfg)
    assert ex.active_providers() == ["CPUExecutionProvider"] and not ex.io_binding
    assert ex.run(sample)["head"].shape == (40, 10)
    with pytest.raises(ValueError, match="optimization level"):
        Executor(out, providers="cpu", session_options={"optimization": "max"})
    with pytest.raises(ValueError, match="variant: expected one of \\['fp32'\\]"):
        Executor(out, providers="cpu", variant="int8")


def test_intra_op_spinning_is_off_unless_asked(default_export: Fixture) -> None:
    """Stage sessions do not busy-wait after a run (idle pools would take the running stage's cores)."""
    key = "session.intra_op.allow_spinning"
    assert SessionConfig().to_ort().get_session_config_entry(key) == "0"
    assert SessionConfig(spinning=True).to_ort().get_session_config_entry(key) == "1"
    out, _, sample = default_export
    quiet = Executor(out, providers="cpu").run(sample)["head"]
    spinning = Executor(out, providers="cpu", session_options={"spinning": True}).run(sample)["head"]
    np.testing.assert_array_equal(quiet, spinning)  # a scheduling option: the same numbers


def test_missing_provider_is_an_error(default_export: Fixture) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ValueError, match=r"execution provider \['CUDAExecutionProvider'\] not available"):
        Executor(default_export[0], providers="cuda")


def test_silent_fallback_is_an_error(default_export: Fixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu without working CUDA libraries falls back to CPU: that must be loud."""
    import toolkit.runtime.executor as executor_mod

    monkeypatch.setattr(
        executor_mod, "resolve_providers", lambda p: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(
        "toolkit.runtime.session.ort.InferenceSession",
        _FakeCpuSession,
    )
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider is not active: onnxruntime fell back to"):
        Executor(default_export[0], providers="cuda")


class _FakeCpuSession:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def get_providers(self) -> list[str]:
        return ["CPUExecutionProvider"]


def _cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs onnxruntime with CUDA")
def test_cuda_io_binding(default_export: Fixture) -> None:
    out, _, sample = default_export
    ex = Executor(out, providers="cuda")
    assert ex.io_binding and ex.active_providers()[0] == "CUDAExecutionProvider"
    cpu = Executor(out, providers="cpu").run(sample)["head"]
    np.testing.assert_allclose(ex.run(sample)["head"], cpu, rtol=1e-3, atol=1e-4)
