"""Per-stage ONNX export: round-trip parity against float64 torch, manifest, atomicity, failures."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_helpers import GRAPHS, ToyModel, toy_sample
from onnx import numpy_helper
from torch import nn

from toolkit.export import QuantSetting, export_model
from toolkit.runtime import Executor

ATOL, RTOL = 1e-4, 1e-4  # float32 ONNX vs float64 torch on O(1) activations


def _float64_stage_refs(model: nn.Module, sample: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Per stage: inputs and outputs computed by the same graph in float64 (another computation)."""
    m64 = copy.deepcopy(model).double().eval()
    env = {
        k: torch.from_numpy(v).double() if v.dtype.kind == "f" else torch.from_numpy(v)
        for k, v in sample.items()
    }
    refs = []
    with torch.no_grad():
        for stage in m64.stages:
            ins = {n: env[n] for n in stage.input_names}
            outs = dict(zip(stage.output_names, stage(*ins.values())))
            env.update(outs)
            refs.append(
                {"in": {k: v.numpy() for k, v in ins.items()}, "out": {k: v.numpy() for k, v in outs.items()}}
            )
    return refs


def _cast(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if a.dtype == np.float64 else a


@pytest.mark.slow
@pytest.mark.parametrize("graph", GRAPHS, ids=lambda p: p.stem)
def test_roundtrip_parity_per_stage(graph: Path, graph_export: Any) -> None:
    model, sample, out, manifest = graph_export(graph)
    assert len(manifest["stages"]) == len(model.stages)
    refs = _float64_stage_refs(model, sample)
    for i, (stage, entry, ref) in enumerate(zip(model.stages, manifest["stages"], refs)):
        path = out / entry["files"]["fp32"]["file"]
        assert path.name == f"stage_{i:02d}.onnx"
        proto = onnx.load(path)
        assert [t.name for t in proto.graph.input] == list(stage.input_names)
        assert [t.name for t in proto.graph.output] == list(stage.output_names)
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
        # parameter names kept where the exporter allows (it may fold BatchNorm or pre-transpose a weight)
        # (a linear on a sequence [T, d] exports as MatMul with a pre-transposed, renamed weight)
        on_seq = {n for n in stage.node_ids if len(model.spec.analysis.infos[n][0]) > 1}
        factors = {
            n
            for n, _ in stage.named_parameters()
            if (".U." in n or ".V." in n) and not (n.split(".")[0] in on_seq and n.endswith("weight"))
        }
        kept = factors & {t.name for t in proto.graph.initializer}
        assert len(kept) >= 0.5 * len(factors), (factors, kept)
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for rows in (slice(0, 1), slice(0, 7), slice(None)):  # batch 1, 7 and all samples
            feeds = {k: _cast(v[rows]) for k, v in ref["in"].items()}
            got = sess.run(list(stage.output_names), feeds)
            for name, g in zip(stage.output_names, got):
                np.testing.assert_allclose(
                    g, ref["out"][name][rows], rtol=RTOL, atol=ATOL, err_msg=f"{graph.stem} stage {i} {name}"
                )
        assert entry["parity"]["ok"] and entry["parity"]["max_abs"] < ATOL
        data = path.read_bytes()
        weights = (out / f"{path.name}.data").read_bytes()  # external data, beside the graph
        gathered = entry["files"]["fp32"]["data"]["gathered"]
        assert entry["files"]["fp32"] == {
            "file": path.name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "data": {
                "file": f"{path.name}.data",
                "sha256": hashlib.sha256(weights).hexdigest(),
                "bytes": len(weights),
                "gathered": gathered,
            },
        }
        # gathered: the leading region of the data file holding the tables only Gather reads
        # (embeddings), those of at least 1 KiB (smaller tensors stay in the graph file)
        uses = [(n.op_type, k, name) for n in proto.graph.node for k, name in enumerate(n.input)]
        tables = [
            t
            for t in proto.graph.initializer
            if numpy_helper.to_array(t).nbytes >= 1024
            and {(op, k) for op, k, name in uses if name == t.name} == {("Gather", 0)}
        ]
        assert (gathered > 0) == bool(tables)
        assert gathered >= sum(numpy_helper.to_array(t).nbytes for t in tables)
        assert entry["parameters"] == sum(p.numel() for p in stage.parameters())
    # end to end: the executor chaining the stages vs the float64 model
    with torch.no_grad():
        m64 = copy.deepcopy(model).double()
        ref = m64(
            *[
                torch.from_numpy(sample[n]).double()
                if sample[n].dtype.kind == "f"
                else torch.from_numpy(sample[n])
                for n in model.input_names
            ]
        )
    ref_list = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    got = Executor(out, providers="cpu").run(sample)
    for name, r in zip(model.output_names, ref_list):
        np.testing.assert_allclose(got[name], r.numpy(), rtol=RTOL, atol=ATOL)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["opset"] == 18 and on_disk["parity"]["end_to_end"]["ok"]
    kv = [f"stage_{i:02d}.kv.onnx" for i in range(len(model.stages))] if "causal_lm" in on_disk else []
    assert ("causal_lm" in on_disk) == (graph.name == "charlm.yaml")  # only the causal LM gets a cache
    stages = [f"stage_{i:02d}.onnx" for i in range(len(model.stages))]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "fused.onnx", *stages, *(f"{name}.data" for name in stages), *kv]
    )


def test_skip_connection_across_two_cuts(tmp_path: Path) -> None:
    model = ToyModel().eval()
    sample = toy_sample(model, 20)
    manifest = export_model(model, tmp_path / "toy", sample=sample)
    assert [[t["name"] for t in s["inputs"]] for s in manifest["stages"]] == [
        ["x", "bias"],
        ["act1"],
        ["act1", "act2"],
    ]
    assert manifest["inputs"] == [
        {"name": "x", "dtype": "float32", "shape": [None, 16]},
        {"name": "bias", "dtype": "float32", "shape": [None, 32]},
    ]
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(*[torch.from_numpy(sample[n]).double() for n in ("x", "bias")])
    got = Executor(tmp_path / "toy", providers="cpu").run(sample)["head"]
    np.testing.assert_allclose(got, ref.numpy(), rtol=RTOL, atol=ATOL)


class _Branchy(nn.Module):
    """Data-dependent Python control flow: torch.export cannot trace it."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x * 2,) if float(x.sum()) > 0 else (x,)


def test_export_failure_leaves_nothing(tmp_path: Path) -> None:
    model = ToyModel().eval()
    model.stages[1].fn = _Branchy()
    with pytest.raises(ValueError, match="stage 1"):
        export_model(model, tmp_path / "out", sample=toy_sample(model, 8))
    assert list(tmp_path.iterdir()) == []  # no out dir, no temp dir


def test_parity_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import toolkit.export.exporter as exporter

    real = exporter.run_onnx

    def off_by_a_bit(*args: Any, **kwargs: Any) -> list[np.ndarray]:
        return [o + np.float32(0.1) for o in real(*args, **kwargs)]

    monkeypatch.setattr(exporter, "run_onnx", off_by_a_bit)
    model = ToyModel().eval()
    with pytest.raises(ValueError, match="parity check failed"):
        export_model(model, tmp_path / "out", sample=toy_sample(model, 8))
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_needs_overwrite(tmp_path: Path) -> None:
    model = ToyModel().eval()
    sample = toy_sample(model, 8)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="exists"):
        export_model(model, out, sample=sample)
    export_model(model, out, sample=sample, overwrite=True, optimize=True)
    assert not (out / "old.txt").exists() and (out / "manifest.json").exists()
    assert json.loads((out / "manifest.json").read_text())["optimization"] == "basic"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_sample_is_rejected(tmp_path: Path) -> None:
    model = ToyModel().eval()
    sample = toy_sample(model, 8)
    with pytest.raises(ValueError, match=r"expected arrays for inputs \['x', 'bias'\]"):
        export_model(model, tmp_path / "a", sample={"x": sample["x"]})
    with pytest.raises(ValueError, match="quantize"):
        export_model(model, tmp_path / "b", sample=sample, quantize="int4")
    with pytest.raises(ValueError, match="batch size"):
        export_model(model, tmp_path / "c", sample={"x": sample["x"], "bias": sample["bias"][:3]})


def test_int8_variant(tmp_path: Path) -> None:
    model = ToyModel(d_in=64, hidden=128, rank=32).eval()
    sample = toy_sample(model, 64)
    calib = toy_sample(model, 128, seed=5)
    settings = (QuantSetting("dynamic", "qint8"), QuantSetting("static", "qint8", per_channel=True))
    manifest = export_model(
        model, tmp_path / "q", sample=sample, calibration=calib, quantize="int8", quant_candidates=settings
    )
    q = manifest["quantization"]
    assert {c["label"] for c in q["candidates"]} == {s.label for s in settings}
    assert [c.get("error") for c in q["candidates"]] == [None, None]  # both build and run
    assert len(q["stages"]) == 3 and all("max_abs_vs_fp32" in s for s in q["stages"])
    for entry in manifest["stages"]:
        files = entry["files"]  # each with its weights in a .data file beside it
        assert files["int8"]["bytes"] + files["int8"].get("data", {}).get("bytes", 0) < files["fp32"][
            "bytes"
        ] + files["fp32"].get("data", {}).get("bytes", 0)
    fp32 = Executor(tmp_path / "q", providers="cpu").run(sample)["head"]
    int8 = Executor(tmp_path / "q", providers="cpu", variant="int8").run(sample)["head"]
    err = float(np.max(np.abs(int8 - fp32)))
    assert err == pytest.approx(q["end_to_end"]["max_abs_vs_fp32"], rel=1e-5)
    assert err < 0.1 * float(np.max(np.abs(fp32)))


def test_biases_to_fp16_keeps_float32_compute(tmp_path: Path) -> None:
    """Biases stored as float16 and cast back: the graph computes x·W + fp16(b) in float32, checked
    against a float64 numpy reference; a 1-D initializer used by another op is left alone."""
    from onnx import TensorProto, helper, numpy_helper

    from toolkit.export.onnx_io import biases_to_fp16

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    s = rng.standard_normal(64).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Add", ["h", "bias"], ["y0"]),
            helper.make_node("Mul", ["y0", "scale"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(b, "bias"),
            numpy_helper.from_array(s, "scale"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    half = biases_to_fp16(model)
    onnx.checker.check_model(half, full_check=True)
    dtypes = {i.name: i.data_type for i in half.graph.initializer}
    assert dtypes == {"w": TensorProto.FLOAT, "bias": TensorProto.FLOAT16, "scale": TensorProto.FLOAT}
    assert len(half.SerializeToString()) < len(model.SerializeToString())
    x = rng.standard_normal((4, 8)).astype(np.float32)
    sess = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x})
    b16 = b.astype(np.float16).astype(np.float64)
    ref = (x.astype(np.float64) @ w.astype(np.float64) + b16) * s.astype(np.float64)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert float(np.max(np.abs(b16 - b))) <= 2.0**-11 * float(np.max(np.abs(b)))


@pytest.mark.slow
def test_int8_files_keep_parameter_names(tmp_path: Path) -> None:
    """Each int8 weight is stored under its fp32 parameter's name (no ``_quantized`` suffix)."""
    model = ToyModel(d_in=64, hidden=128, rank=32).eval()
    export_model(
        model,
        tmp_path / "q",
        sample=toy_sample(model, 64),
        quantize="int8",
        quant_candidates=(QuantSetting("dynamic", "qint8"),),
    )
    for fp32 in sorted(p for p in (tmp_path / "q").glob("stage_*.onnx") if ".int8" not in p.name):
        weights = {i.name for i in onnx.load(str(fp32)).graph.initializer if len(i.dims) == 2}
        int8 = onnx.load(str(fp32.with_name(fp32.stem + ".int8.onnx"))).graph.initializer
        quantized = {
            i.name
            for i in int8
            if len(i.dims) == 2 and i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
        }
        assert weights and quantized == weights


def test_int8_is_chosen_on_the_selection_split_and_reported_on_test(tmp_path: Path) -> None:
    """The choice depends on the validation split only: other test inputs and labels leave the
    chosen setting and every candidate's score unchanged; the reported accuracy is the test one."""
    model = ToyModel(d_in=64, hidden=128, rank=32).eval()
    calib = toy_sample(model, 128, seed=5)
    select = toy_sample(model, 64, seed=7)
    rng = np.random.default_rng(0)
    select_targets = rng.integers(0, 5, 64)
    settings = (QuantSetting("dynamic", "qint8"), QuantSetting("static", "qint8", per_channel=True))
    reports = []
    for k, seed in enumerate((1, 3)):  # two different test splits
        test = toy_sample(model, 64, seed=seed)
        targets = np.random.default_rng(10 + k).integers(0, 5, 64)
        manifest = export_model(
            model,
            tmp_path / f"q{k}",
            sample=test,
            targets=targets,
            calibration=calib,
            quantize="int8",
            quant_candidates=settings,
            selection=select,
            selection_targets=select_targets,
        )
        q = manifest["quantization"]
        assert q["chosen_on"] == "validation split"
        int8 = Executor(tmp_path / f"q{k}", providers="cpu", variant="int8").run(test)["head"]
        assert q["end_to_end"]["accuracy"] == pytest.approx(float(np.mean(int8.argmax(1) == targets)))
        reports.append(q)
    assert reports[0]["end_to_end"]["accuracy"] != reports[1]["end_to_end"]["accuracy"]  # tests differ
    assert reports[0]["chosen"] == reports[1]["chosen"]
    assert reports[0]["candidates"] == reports[1]["candidates"]  # scored on the selection split only


def test_cli_export_samples_select_on_validation() -> None:
    """`rlhf export` reads the test split for the report and the validation split for the choice."""
    from toolkit.cli.deploy_cmds import _load_samples
    from toolkit.data import load_data
    from toolkit.spec import load_spec

    spec = load_spec(GRAPHS[0].with_name("default.yaml"))
    sample, targets, _calib, select, select_targets = _load_samples(spec, 32)
    splits = load_data(spec.train.data, spec.inputs)
    np.testing.assert_array_equal(sample["x"], splits.test.inputs["x"][:32])
    np.testing.assert_array_equal(select["x"], splits.val.inputs["x"][:32])
    np.testing.assert_array_equal(select_targets, splits.val.targets[:32])
    assert targets is not None and not np.array_equal(sample["x"], select["x"])


def test_export_without_large_tensors_stays_format_1(tmp_path: Path) -> None:
    """No initializer of 1 KiB: every stage file self-contained, no data file, and the manifest keeps
    format version 1 (an older runtime still loads it); a larger model's stages get data files and 2
    when asked (``external_data=True``), and by default only stage files of 1 MiB or more do."""
    from toolkit.export.exporter import EXTERNAL_MIN_FILE_BYTES

    small = ToyModel(d_in=8, hidden=8, classes=3, rank=2).eval()
    sample = toy_sample(small, 4)
    manifest = export_model(small, tmp_path / "small", sample=sample, external_data=True)
    assert manifest["version"] == 1 and not list((tmp_path / "small").glob("*.data"))
    assert all("data" not in s["files"]["fp32"] for s in manifest["stages"])
    got = Executor(tmp_path / "small", providers="cpu").run(sample)["head"]
    with torch.no_grad():
        want = small(*[torch.from_numpy(sample[n]) for n in small.input_names])
    want = want[0] if isinstance(want, tuple) else want
    np.testing.assert_allclose(got, want.numpy(), rtol=RTOL, atol=ATOL)
    large = ToyModel(d_in=64, hidden=128, rank=32).eval()
    manifest = export_model(large, tmp_path / "large", sample=toy_sample(large, 4), external_data=True)
    assert manifest["version"] == 2 and any("data" in s["files"]["fp32"] for s in manifest["stages"])
    auto = export_model(large, tmp_path / "auto", sample=toy_sample(large, 4))  # files of a few KiB
    assert all(s["files"]["fp32"]["bytes"] < EXTERNAL_MIN_FILE_BYTES for s in auto["stages"])
    assert auto["version"] == 1 and not list((tmp_path / "auto").glob("*.data"))
    wide = ToyModel(d_in=1024, hidden=1024, rank=256).eval()  # two 2 MiB stages, a small head
    auto = export_model(wide, tmp_path / "wide", sample=toy_sample(wide, 4))
    with_data = ["data" in s["files"]["fp32"] for s in auto["stages"]]
    sizes = [
        s["files"]["fp32"]["bytes"] + s["files"]["fp32"].get("data", {}).get("bytes", 0)
        for s in auto["stages"]
    ]
    assert with_data == [n >= EXTERNAL_MIN_FILE_BYTES for n in sizes] and any(with_data)
    assert auto["version"] == 2
