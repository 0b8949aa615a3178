"""Executor hardening: bounded binding cache, hashed bytes run, manifest vs ONNX files, ceilings."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from toolkit.errors import InputError
from toolkit.runtime import Executor
from toolkit.runtime import session as session_mod
from toolkit.runtime.limits import BINDING_CACHE_SIZE

Fixture = tuple[Path, Any, dict[str, np.ndarray]]


def _float64(model: Any, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()


def _edit_manifest(export_dir: Path, edit: Any) -> None:
    path = export_dir / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_many_batch_sizes_keep_buffer_sets_bounded(default_export: Fixture) -> None:
    out, model, sample = default_export
    ex = Executor(out, providers="cpu")
    assert ex.mode == "resident"
    rng = np.random.default_rng(0)
    x_all = np.concatenate([sample["x"]] * 2)  # 80 real rows
    for batch in rng.permutation(np.arange(1, 41)):
        x = np.ascontiguousarray(x_all[: int(batch)])
        got = ex.run({"x": x})["head"]
        np.testing.assert_allclose(got, _float64(model, x), rtol=1e-4, atol=1e-5)
        assert ex.buffer_sets() <= BINDING_CACHE_SIZE
    assert ex.buffer_sets() == BINDING_CACHE_SIZE
    # a cached batch size still gives the right answer after 40 others went through
    x = np.ascontiguousarray(x_all[:7])
    np.testing.assert_allclose(ex.run({"x": x})["head"], _float64(model, x), rtol=1e-4, atol=1e-5)


def test_session_runs_the_hashed_bytes_even_if_the_file_is_swapped(
    default_export: Fixture, export_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file swapped on disk between the hash and onnxruntime's load must not be what runs."""
    from toolkit.builder import build_model
    from toolkit.export import export_model

    _, model, sample = default_export
    other = build_model(model.to_spec(), seed=1).eval()  # same shapes, other weights
    export_model(other, tmp_path / "other", sample={"x": sample["x"][:4]}, external_data=True)
    real_create = session_mod.create_session

    calls: list[Any] = []

    def swap_then_create(data: Any, *args: Any, **kwargs: Any) -> Any:
        if not calls:  # stage 0 was just hashed: the attacker swaps its files before the load
            for name in ("stage_00.onnx", "stage_00.onnx.data"):
                os.replace(tmp_path / "other" / name, export_copy / name)
        calls.append(type(data))
        return real_create(data, *args, **kwargs)

    monkeypatch.setattr(session_mod, "create_session", swap_then_create)
    ex = Executor(export_copy, providers="cpu")  # default: resident, loaded from the hashed bytes
    assert ex.load_from == "bytes" and calls == [bytes, bytes]
    got = ex.run({"x": sample["x"]})["head"]
    np.testing.assert_allclose(got, _float64(model, sample["x"]), rtol=1e-4, atol=1e-5)
    assert not np.allclose(_float64(other, sample["x"]), _float64(model, sample["x"]), atol=1e-3)


def test_manifest_shapes_must_match_the_onnx_files(export_copy: Path) -> None:
    def widen(doc: dict[str, Any]) -> None:  # consistent inside the manifest, wrong for the files
        doc["stages"][0]["outputs"][0]["shape"] = [None, 10**12]
        doc["stages"][1]["inputs"][0]["shape"] = [None, 10**12]

    _edit_manifest(export_copy, widen)
    with pytest.raises(
        InputError,
        match=r"stage 0 \(stage_00.onnx\): output 'act1': the manifest says .*1000000000000.*the ONNX file has float32 \(\*, 256\)",
    ):
        Executor(export_copy, providers="cpu")


def test_manifest_names_and_dtypes_must_match_the_onnx_files(export_copy: Path) -> None:
    original = (export_copy / "manifest.json").read_text()

    def rename(doc: dict[str, Any]) -> None:
        for t in (doc["stages"][0]["outputs"][0], doc["stages"][1]["inputs"][0]):
            t["name"] = "hidden"

    _edit_manifest(export_copy, rename)
    with pytest.raises(
        InputError,
        match=r"stage 0 \(stage_00.onnx\): the manifest lists outputs \['hidden'\], the ONNX file has \['act1'\]",
    ):
        Executor(export_copy, providers="cpu")
    (export_copy / "manifest.json").write_text(original)

    def retype(doc: dict[str, Any]) -> None:
        for t in (doc["stages"][0]["outputs"][0], doc["stages"][1]["inputs"][0]):
            t["dtype"] = "float64"

    _edit_manifest(export_copy, retype)
    with pytest.raises(InputError, match="output 'act1': the manifest says 'act1' float64"):
        Executor(export_copy, providers="cpu")


def test_inconsistent_stage_flow_is_refused_by_the_reader(export_copy: Path) -> None:
    def orphan(doc: dict[str, Any]) -> None:
        doc["stages"][1]["inputs"][0]["name"] = "nowhere"

    _edit_manifest(export_copy, orphan)
    with pytest.raises(
        InputError, match=r"stages\[1\].inputs\[0\].name: expected a graph input or an earlier"
    ):
        Executor(export_copy, providers="cpu")


def test_buffer_ceiling_names_the_limit(default_export: Fixture, monkeypatch: pytest.MonkeyPatch) -> None:
    out, _, sample = default_export
    # act1 (B, 256) + head (B, 10) float32 = 1064 bytes per row
    ex = Executor(out, providers="cpu", max_buffer_bytes=1064 * 8)
    assert ex.run({"x": sample["x"][:8]})["head"].shape == (8, 10)
    with pytest.raises(
        InputError, match=r"batch 9: .* 9576 bytes of buffers, above the limit max_buffer_bytes=8512"
    ):
        ex.run({"x": sample["x"][:9]})
    monkeypatch.setenv("RLHF_MAX_BUFFER_BYTES", "1064")
    with pytest.raises(InputError, match="max_buffer_bytes=1064"):
        Executor(out, providers="cpu").run({"x": sample["x"][:2]})


def test_manifest_size_ceiling(export_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from toolkit.runtime.manifest import read_manifest

    size = (export_copy / "manifest.json").stat().st_size
    assert read_manifest(export_copy, max_bytes=size).name
    with pytest.raises(InputError, match=f"{size} bytes, above the limit max_manifest_bytes={size - 1}"):
        read_manifest(export_copy, max_bytes=size - 1)
    monkeypatch.setenv("RLHF_MAX_MANIFEST_BYTES", "100")
    with pytest.raises(InputError, match="max_manifest_bytes=100"):
        read_manifest(export_copy)
