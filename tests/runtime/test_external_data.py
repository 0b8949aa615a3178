"""Stage weights as ONNX external data (manifest format version 2): what is hashed is what runs,
locations stay inside the export, streaming maps the files and gives the resident run's bits."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolkit.errors import InputError
from toolkit.runtime import Executor
from toolkit.runtime import session as session_mod
from toolkit.runtime.executor import FAULT_BYTES, weight_bytes
from toolkit.runtime.manifest import FileEntry, parse_manifest, read_manifest
from toolkit.runtime.onnx_refs import external_locations

Fixture = tuple[Path, Any, dict[str, np.ndarray]]
VOCAB = 20000


def _manifest(export: Path) -> dict[str, Any]:
    return json.loads((export / "manifest.json").read_text())


def _write_manifest(export: Path, doc: dict[str, Any]) -> None:
    (export / "manifest.json").write_text(json.dumps(doc))


def _rehash(export: Path, entry: dict[str, Any]) -> None:
    """Make a manifest entry describe its (altered) file again: the attack a manifest hash cannot stop."""
    data = (export / entry["file"]).read_bytes()
    entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)


def _set_location(path: Path, location: str) -> None:
    proto = onnx.load(str(path), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    path.write_bytes(proto.SerializeToString())


def _streaming_budget(export: Path) -> int:
    """Holds any one stage with its activations, not all of them: the executor streams."""
    stages = read_manifest(export).stages
    return max(s.files["fp32"].total_bytes for s in stages) + 10_000


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """An embedding of 20000 x 16 floats (1.28 MB, a stage of its own) and a small head: the
    embedding stage alone is more than half the weights, like MiniLM's."""
    from toolkit.builder import build_model
    from toolkit.export import export_model
    from toolkit.spec.loader import parse_spec

    spec = parse_spec(
        {
            "name": "big-vocab",
            "inputs": {"tokens": {"shape": [16], "dtype": "int64", "vocab": VOCAB}},
            "nodes": [
                {"id": "emb", "op": "embedding", "in": "tokens", "out": 16},
                {"id": "norm", "op": "layer_norm", "in": "emb"},
                {"id": "flat", "op": "flatten", "in": "norm"},
                {"id": "fc1", "op": "linear", "in": "flat", "out": 64},
                {"id": "head", "op": "linear", "in": "fc1", "out": 10},
            ],
            "outputs": ["head"],
            "stages": {"auto": {"count": 2}},
        }
    )
    model = build_model(spec, seed=0).eval()
    sample = {"tokens": np.random.default_rng(0).integers(0, VOCAB, (6, 16)).astype(np.int64)}
    out = tmp_path_factory.mktemp("bigvocab") / "export"
    export_model(model, out, sample=sample)
    return out, sample


def test_stage_weights_are_external_data_listed_and_hashed(default_export: Fixture) -> None:
    out, model, _ = default_export
    doc = _manifest(out)
    assert doc["version"] == 2
    for i, stage in enumerate(doc["stages"]):
        entry = stage["files"]["fp32"]
        data = entry["data"]
        assert data["file"] == f"stage_{i:02d}.onnx.data"
        blob = (out / data["file"]).read_bytes()
        assert (len(blob), hashlib.sha256(blob).hexdigest()) == (data["bytes"], data["sha256"])
        onnx_bytes = (out / entry["file"]).read_bytes()
        assert external_locations(onnx_bytes) == {data["file"]}
        # the weights in the data file are the torch parameters, read back by onnx (another reader)
        proto = onnx.load(str(out / entry["file"]))
        weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        params = {n: p.detach().numpy() for n, p in model.stages[i].named_parameters()}
        for name, value in params.items():
            assert name in weights
            stored = weights[name]
            assert np.array_equal(stored, value) or np.array_equal(stored, value.T)
    assert external_locations((out / doc["fused"]["files"]["fp32"]["file"]).read_bytes()) == set()


def test_locations_match_onnx_own_reader(default_export: Fixture, tmp_path: Path) -> None:
    """The runtime's protobuf walk finds what onnx finds: initializers, a Constant's tensor
    attribute and an If branch's initializer, each with its own location."""
    out = default_export[0]
    for entry in _manifest(out)["stages"]:
        path = out / entry["files"]["fp32"]["file"]
        proto = onnx.load(str(path), load_external_data=False)
        want = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        assert external_locations(path.read_bytes()) == want

    # a hand-built model: external data in a Constant attribute and inside an If's subgraph
    def ext(name: str, location: str) -> onnx.TensorProto:
        t = numpy_helper.from_array(np.zeros(4, np.float32), name)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", "0"), ("length", "16")):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t

    branch = helper.make_graph(
        [helper.make_node("Identity", ["w_then"], ["o"])],
        "then",
        [],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, [4])],
        [ext("w_then", "sub.bin")],
    )
    g = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], value=ext("c", "const.bin")),
            helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch),
        ],
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [ext("w", "main.bin")],
    )
    blob = helper.make_model(g).SerializeToString()
    assert external_locations(blob) == {"main.bin", "const.bin", "sub.bin"}
    with pytest.raises(InputError, match=r"^m\.onnx: not a well-formed ONNX file"):
        external_locations(blob[:-3], "m.onnx")


@pytest.mark.parametrize("mode", ["resident", "streaming"])
def test_streaming_maps_and_matches_resident_bit_for_bit(
    big_vocab: tuple[Path, dict[str, np.ndarray]], mode: str
) -> None:
    out, sample = big_vocab
    m = read_manifest(out)
    emb = m.stages[0].files["fp32"]
    assert emb.data is not None and emb.gathered == emb.data.bytes  # the table alone, first in the file
    total = sum(s.files["fp32"].total_bytes for s in m.stages)
    assert emb.total_bytes > total // 2  # the embedding stage is more than half the weights
    resident = Executor(out, providers="cpu")
    budget = total // 2 if mode == "streaming" else None
    ex = Executor(out, providers="cpu", memory_budget=budget)
    assert ex.mode == mode and ex.load_from == ("path" if mode == "streaming" else "bytes")
    for rows in (slice(0, 1), slice(None)):
        batch = {k: v[rows] for k, v in sample.items()}
        assert np.array_equal(ex.run(batch)["head"], resident.run(batch)["head"])


def test_weight_bytes_rule() -> None:
    data = FileEntry("s.onnx.data", "0" * 64, 1_000_000, gathered=800_000)
    entry = FileEntry("s.onnx", "0" * 64, 2_000, data=data, gathered=800_000)
    assert weight_bytes(entry) == 1_002_000  # resident: whole
    assert weight_bytes(entry, 1) == 2_000 + 200_000 + FAULT_BYTES
    assert weight_bytes(entry, 10**6) == 1_002_000  # never more than the table
    assert weight_bytes(FileEntry("x.onnx", "0" * 64, 5_000), 3) == 5_000


def test_budget_below_the_mapped_estimate_is_refused(big_vocab: tuple[Path, dict[str, np.ndarray]]) -> None:
    out, _ = big_vocab
    with pytest.raises(InputError, match=r"memory_budget: expected at least \d+ bytes .*weight_bytes"):
        Executor(out, providers="cpu", memory_budget=50_000)


@pytest.mark.parametrize("budget", [None, "streaming"])
def test_swapped_data_file_is_refused(
    default_export: Fixture, export_copy: Path, tmp_path: Path, budget: str | None
) -> None:
    """Another export's data file of the same size and layout (other weights) in place of ours."""
    from toolkit.builder import build_model
    from toolkit.export import export_model

    _, model, sample = default_export
    other = build_model(model.to_spec(), seed=1).eval()
    export_model(other, tmp_path / "other", sample={"x": sample["x"][:4]}, external_data=True)
    shutil.copy(tmp_path / "other" / "stage_01.onnx.data", export_copy / "stage_01.onnx.data")
    size = _streaming_budget(export_copy) if budget else None
    with pytest.raises(InputError, match=r"^stage_01\.onnx\.data: sha256 mismatch"):
        Executor(export_copy, providers="cpu", memory_budget=size).run({"x": sample["x"][:2]})


def test_data_file_changed_while_running_is_refused(
    default_export: Fixture, export_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streaming reads the weights from the mapped file during the run: a write in place after the
    load (new mtime) refuses the run's result."""
    sample = default_export[2]
    real = session_mod.create_session

    def create_then_write(model: Any, *args: Any, **kwargs: Any) -> Any:
        sess = real(model, *args, **kwargs)
        path = export_copy / "stage_00.onnx.data"
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        return sess

    ex = Executor(export_copy, providers="cpu", memory_budget=_streaming_budget(export_copy))
    monkeypatch.setattr(session_mod, "create_session", create_then_write)
    with pytest.raises(InputError, match=r"stage_00\.onnx\.data changed while it was loaded or running"):
        ex.run({"x": sample["x"][:2]})


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "stage_01.onnx.data", "weights.bin"])
@pytest.mark.parametrize("budget", [None, "streaming"])
def test_onnx_location_other_than_the_listed_data_file_is_refused(
    export_copy: Path, location: str, budget: str | None
) -> None:
    """The ONNX file (re-hashed into the manifest) points its weights elsewhere: refused before
    onnxruntime sees it, whatever the load mode."""
    doc = _manifest(export_copy)
    entry = doc["stages"][0]["files"]["fp32"]
    _set_location(export_copy / entry["file"], location)
    _rehash(export_copy, entry)
    _write_manifest(export_copy, doc)
    size = _streaming_budget(export_copy) if budget else None
    with pytest.raises(InputError, match=rf"^stage_00\.onnx: stores tensors in '{location}': expected only"):
        Executor(export_copy, providers="cpu", memory_budget=size).run({"x": np.zeros((1, 64), np.float32)})


def test_entry_without_data_file_must_be_self_contained(export_copy: Path) -> None:
    doc = _manifest(export_copy)
    del doc["stages"][0]["files"]["fp32"]["data"]
    _write_manifest(export_copy, doc)
    with pytest.raises(
        InputError,
        match=r"stage_00\.onnx: stores tensors in 'stage_00\.onnx\.data': expected no external data",
    ):
        Executor(export_copy, providers="cpu")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["data"].update(file="../stage_00.onnx.data"), r"manifest path .*'\.\.'"),
        (lambda d: d["data"].update(file="/etc/passwd"), r"manifest path .*absolute"),
        (
            lambda d: d["data"].update(gathered=d["data"]["bytes"] + 1),
            r"fp32\.data\.gathered: expected an int from 0",
        ),
        (lambda d: d["data"].update(sha256="xyz"), r"fp32\.data\.sha256: expected 64 hex digits"),
    ],
)
def test_bad_data_entries_are_refused(export_copy: Path, change: Any, message: str) -> None:
    doc = _manifest(export_copy)
    change(doc["stages"][0]["files"]["fp32"])
    _write_manifest(export_copy, doc)
    with pytest.raises(InputError, match=message):
        Executor(export_copy, providers="cpu")


@pytest.mark.parametrize("budget", [None, "streaming"])
def test_data_file_not_beside_its_onnx_file_is_refused(export_copy: Path, budget: str | None) -> None:
    """onnxruntime reads a location beside the model file: a data entry elsewhere is not what it reads."""
    (export_copy / "sub").mkdir()
    shutil.copy(export_copy / "stage_00.onnx.data", export_copy / "sub" / "stage_00.onnx.data")
    doc = _manifest(export_copy)
    doc["stages"][0]["files"]["fp32"]["data"]["file"] = "sub/stage_00.onnx.data"
    _write_manifest(export_copy, doc)
    size = _streaming_budget(export_copy) if budget else None
    with pytest.raises(InputError, match=r"sub/stage_00\.onnx\.data resolves to .*not beside stage_00\.onnx"):
        Executor(export_copy, providers="cpu", memory_budget=size).run({"x": np.zeros((1, 64), np.float32)})


def test_version_1_manifest_reads_but_may_not_list_data(default_export: Fixture) -> None:
    doc = _manifest(default_export[0])
    assert parse_manifest(doc).stages[0].files["fp32"].data is not None
    doc["version"] = 1
    with pytest.raises(
        InputError, match=r"stages\[0\]\.files\.fp32\.data: expected no external data file in a version 1"
    ):
        parse_manifest(doc)
    for stage in doc["stages"]:
        for entry in stage["files"].values():
            entry.pop("data", None)
    assert parse_manifest(doc).stages[0].files["fp32"].data is None  # an old export still reads


def test_verify_export_checks_data_files(export_copy: Path) -> None:
    from toolkit.runtime.bundle import verify_export

    verify_export(export_copy, providers=False)
    path = export_copy / "stage_00.onnx.data"
    blob = bytearray(path.read_bytes())
    blob[0] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(InputError, match=r"stage_00\.onnx\.data: sha256 differs from manifest\.json"):
        verify_export(export_copy, providers=False)
