"""int8 candidates beyond onnxruntime's defaults: weight-only MatMuls (int8 files, float compute),
mixed candidates found by measured layer sensitivity, the size limit and padded positions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from export_helpers import ToyModel, toy_sample
from onnx import TensorProto, helper, numpy_helper

from toolkit.export import export_model
from toolkit.export.quantize import (
    QuantSetting,
    _Rule,
    _Scored,
    choose_and_quantize,
    matmul_weights,
    quantize_model,
    score,
    weight_digest,
    weight_only,
)
from toolkit.runtime import Executor, SessionConfig


def _linear_stage(w: np.ndarray, x: str, y: str) -> bytes:
    """One stage: y = x @ w (named node, opset 18)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", [x, "w"], [y], name="mm")],
        "g",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", w.shape[0]])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["n", w.shape[1]])],
        [numpy_helper.from_array(w.astype(np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def _run(blob: bytes, feeds: dict[str, np.ndarray], basic: bool = False) -> list[np.ndarray]:
    so = ort.SessionOptions()
    if basic:  # the graph as written (no DequantizeLinear -> MatMul fusion into MatMulNBits)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(blob, sess_options=so, providers=["CPUExecutionProvider"])
    return [np.asarray(a) for a in sess.run(None, feeds)]


def test_weight_only_matmul_against_float64_reference() -> None:
    """x @ W with W stored int8 per output column. As written, the graph gives x · (q · scale)
    where q, scale are computed here in float64 another way (loop over columns); the error
    against x @ W is within the rounding bound |x|₁ · scale / 2 per column. With onnxruntime's
    default optimizations (DequantizeLinear -> MatMul fused into MatMulNBits, which rounds each
    row of x to 8 bits) the extra error is within that row rounding: max|x_row| / 254 · |q·scale|₁."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 40)).astype(np.float32) * np.linspace(0.01, 3.0, 40, dtype=np.float32)
    w[:, 7] = 0.0  # an all-zero column: scale 1, no division by zero
    model = onnx.load_from_string(_linear_stage(w, "x", "y"))
    q = weight_only(model)
    onnx.checker.check_model(q, full_check=True)
    stored = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    assert stored["w"].dtype == np.int8 and stored["w"].shape == w.shape
    assert [n.op_type for n in q.graph.node] == ["DequantizeLinear", "MatMul"]
    assert len(q.SerializeToString()) < 0.4 * len(model.SerializeToString())
    deq = np.zeros(w.shape)
    for j in range(w.shape[1]):
        col = w[:, j].astype(np.float64)
        s = abs(col).max() / 127.0 or 1.0
        deq[:, j] = np.round(col / s) * s
    x = rng.standard_normal((5, 24)).astype(np.float32)
    x64 = x.astype(np.float64)
    (y,) = _run(q.SerializeToString(), {"x": x}, basic=True)
    np.testing.assert_allclose(y, x64 @ deq, rtol=1e-5, atol=1e-5)
    bound = np.abs(x64).sum(1, keepdims=True) * (np.abs(w).max(0) / 127.0 / 2.0)
    assert np.all(np.abs(y - x64 @ w.astype(np.float64)) <= bound + 1e-5)
    (fused,) = _run(q.SerializeToString(), {"x": x})
    row = np.abs(x64).max(1, keepdims=True) / 254.0 * np.abs(deq).sum(0, keepdims=True)
    assert np.all(np.abs(fused - x64 @ deq) <= row + 1e-4)


def test_mixed_setting_keeps_the_named_layers_float_compute() -> None:
    """A dynamic setting with one weight's digest kept: that MatMul multiplies in float on its
    dequantized int8 weight, the other one is MatMulInteger; both weights are stored int8."""
    rng = np.random.default_rng(1)
    w1, w2 = rng.standard_normal((32, 32)), rng.standard_normal((32, 16))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
            helper.make_node("MatMul", ["h", "w2"], ["y"], name="second"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
        [
            numpy_helper.from_array(w1.astype(np.float32), "w1"),
            numpy_helper.from_array(w2.astype(np.float32), "w2"),
        ],
    )
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
    digests = {n.name: weight_digest(w) for n, w in matmul_weights(onnx.load_from_string(data))}
    setting = QuantSetting("dynamic", "qint8", per_channel=True, float_weights=(digests["first"],))
    q = onnx.load_from_string(quantize_model(data, setting, None))
    g = q.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name: i for i in g.initializer}
    float_mm = [n for n in g.node if n.op_type == "MatMul"]
    assert len(float_mm) == 1 and [n.op_type for n in g.node].count("MatMulInteger") == 1
    dq = producer[float_mm[0].input[1]]
    assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].data_type == TensorProto.INT8
    assert float_mm[0].input[0] == "x"  # the activation is not quantized: float compute
    assert not any(i.data_type == TensorProto.FLOAT and len(i.dims) == 2 for i in g.initializer)


def test_score_leaves_padded_positions_out() -> None:
    """With a (B, T) mask, sequence outputs are compared on real positions only: the figures
    equal those computed here on the real positions alone, whatever the padded values are."""
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((3, 5, 4)).astype(np.float32)
    out = ref + 0.01 * rng.standard_normal(ref.shape).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    out[mask == 0] = 1e3  # garbage where nothing exists
    m = mask[..., None].astype(np.float32)
    pooled_ref, pooled_out = (ref * m).sum(1) / m.sum(1), (out * m).sum(1) / m.sum(1)  # (B, d): no mask
    s = score([out, pooled_out], [ref, pooled_ref], None, mask)
    cos, err = [], 0.0
    for b in range(3):
        real = mask[b] == 1
        a, r = out[b][real].astype(np.float64).ravel(), ref[b][real].astype(np.float64).ravel()
        cos.append(a @ r / np.sqrt((a @ a) * (r @ r)))
        err = max(err, float(np.abs(a - r).max()))
    p64, r64 = pooled_out.astype(np.float64), pooled_ref.astype(np.float64)
    p = [float(p64[b] @ r64[b] / np.sqrt((p64[b] @ p64[b]) * (r64[b] @ r64[b]))) for b in range(3)]
    err = max(err, float(np.abs(pooled_out.astype(np.float64) - pooled_ref).max()))
    assert s["max_abs_vs_fp32"] == pytest.approx(err)
    assert s["cosine_min"] == pytest.approx(min(min(cos), min(p)), abs=1e-12)
    assert s["cosine_mean"] == pytest.approx(min(np.mean(cos), np.mean(p)), abs=1e-12)
    assert score([out], [ref], None)["max_abs_vs_fp32"] > 900  # without the mask the padding counts


def _outlier_chain(
    rng: np.random.Generator,
) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """Two stages x -> h = LayerNorm(x @ w1) -> y = h @ w2. A few samples of x are 3000x the others
    (a transformer's outlier tokens): one 8-bit range for the whole tensor x wipes the other
    samples out, so dynamic int8 fails in the first layer only (h is layer-normalized);
    weight-only int8 (at most per-row activation rounding) does not."""
    w1 = rng.standard_normal((64, 64)) / 8
    w2 = rng.standard_normal((64, 48)) / 8
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["t"], name="mm"),
            helper.make_node("LayerNormalization", ["t", "gamma"], ["h"], axis=-1),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["n", 64])],
        [
            numpy_helper.from_array(w1.astype(np.float32), "w1"),
            numpy_helper.from_array(np.ones(64, np.float32), "gamma"),
        ],
    )
    first = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
    return [first, _linear_stage(w2, "h", "y")], w1, w2


def _inputs(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, 64)).astype(np.float32)
    x[::8] *= 3000.0
    return x


def test_mixed_search_is_chosen_on_the_selection_split_and_reported_consistently() -> None:
    """Dynamic int8 fails the cosine target, weight-only passes; the search keeps the sensitive
    first layer weight-only and multiplies the second in int8. The test samples are run for the
    chosen candidate only (end to end + each stage alone), and the report's figures are those of
    re-running its files."""
    rng = np.random.default_rng(3)
    stages, w1, w2 = _outlier_chain(rng)
    test_x, select_x = _inputs(rng, 40), _inputs(rng, 40)

    def chain(blobs: Sequence[bytes], x: np.ndarray) -> list[np.ndarray]:
        h = _run(blobs[0], {"x": x})[0]
        return _run(blobs[1], {"h": h})

    test_calls: list[int] = []

    def run_test(blobs: Sequence[bytes]) -> list[np.ndarray]:
        test_calls.append(1)
        return chain(blobs, test_x)

    candidates = (
        QuantSetting("dynamic", "qint8", per_channel=True),
        QuantSetting("weight_only", "qint8", per_channel=True),
    )
    ref_test, ref_select = chain(stages, test_x), chain(stages, select_x)
    setting, blobs, report = choose_and_quantize(
        stages,
        [[], []],
        run_test,
        ref_test,
        None,
        candidates,
        select=(lambda b: chain(b, select_x), ref_select, None),
    )
    assert len(test_calls) == 1 + len(stages)  # the chosen one only: end to end, then each stage alone
    tried = {c["label"]: c for c in report["candidates"]}
    assert (
        tried["dynamic/qint8/per_channel"]["cosine_min"]
        < 0.99
        <= tried["weight_only/qint8/per_channel"]["cosine_min"]
    )
    assert setting.method == "dynamic" and setting.float_weights == (weight_digest(w1.astype(np.float32)),)
    assert report["chosen"]["weight_only_layers"] == [{"stage": 0, "node": "mm"}]
    assert report["int8_compute"] == pytest.approx(w2.size / (w1.size + w2.size))
    sens = {t["stage"]: t["damage"] for t in report["sensitivity"]}
    assert sens[0] > 10 * sens[1]
    again = score(chain(blobs, test_x), ref_test, None)
    for key in ("cosine_min", "cosine_mean", "max_abs_vs_fp32"):
        assert report["end_to_end"][key] == pytest.approx(again[key], rel=1e-6)
    assert again["cosine_min"] >= 0.99
    ops = [{n.op_type for n in onnx.load_from_string(b).graph.node} for b in blobs]
    assert "MatMulInteger" not in ops[0] and "MatMulInteger" in ops[1]


def _fake(label: str, cos: float, size: int, int8: float, acc: float | None = None) -> _Scored:
    s = {"cosine_min": cos, "cosine_mean": cos, "max_abs_vs_fp32": 1 - cos}
    if acc is not None:
        s["accuracy"] = acc
    return _Scored(QuantSetting(label), [], s, size, int8)


def test_rule_size_limit_and_cheapest_good_enough() -> None:
    """Over the size limit a candidate is not eligible however accurate; among good-enough ones
    the most int8 compute wins, then the smallest files; none within the limit: all eligible."""
    rule = _Rule(tolerance=0.0025, min_cosine=0.99, size_limit=0.30, fp32_bytes=1000)
    big = _fake("static", 0.9999, 400, 1.0)
    wo = _fake("weight_only", 0.998, 260, 0.0)
    mixed = _fake("dynamic", 0.993, 262, 0.6)
    bad = _fake("dynamic", 0.98, 250, 1.0)
    assert rule.pick([big, wo, mixed, bad]) is mixed
    assert rule.pick([big, wo, bad]) is wo
    assert rule.pick([big, bad]) is bad  # nothing reaches 0.99 within the limit: the best of those
    assert rule.pick([big]) is big
    labelled = _Rule(0.0025, 0.99, 0.30, 1000)
    a = _fake("weight_only", 0.9, 250, 0.0, acc=0.91)
    b = _fake("dynamic", 0.5, 255, 1.0, acc=0.909)
    c = _fake("dynamic", 0.5, 240, 1.0, acc=0.90)
    assert labelled.pick([a, b, c]) is b


@pytest.mark.slow
def test_export_weight_only_cosine_matches_rerun(tmp_path: Path) -> None:
    """An export with the weight-only candidate: the manifest's end-to-end cosine is that of the
    int8 files run by the executor against the fp32 ones, with the exporter's session settings
    (onnxruntime's defaults: weight prepacking on, under which DequantizeLinear -> MatMul runs as
    MatMulNBits with 8-bit rows of activations; the executor turns prepacking off by default,
    which runs float math on the dequantized weights: a smaller error)."""
    model = ToyModel(d_in=64, hidden=128, rank=32).eval()
    sample = toy_sample(model, 32)
    manifest = export_model(
        model,
        tmp_path / "q",
        sample=sample,
        quantize="int8",
        quant_candidates=(QuantSetting("weight_only", "qint8", per_channel=True),),
        quant_options={"size_limit": 0.5},
    )
    q = manifest["quantization"]
    assert q["chosen"]["method"] == "weight_only" and q["size_limit"] == 0.5
    cfg = SessionConfig(prepacking=True)
    fp32 = (
        Executor(tmp_path / "q", providers="cpu", session_options=cfg).run(sample)["head"].astype(np.float64)
    )
    int8 = Executor(tmp_path / "q", providers="cpu", session_options=cfg, variant="int8").run(sample)["head"]
    int8 = int8.astype(np.float64)
    cos = (fp32 * int8).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(int8, axis=1)
    assert q["end_to_end"]["cosine_min"] == pytest.approx(float(cos.min()), abs=1e-6)
    assert q["end_to_end"]["cosine_mean"] == pytest.approx(float(cos.mean()), abs=1e-6)
    assert q["end_to_end"]["max_abs_vs_fp32"] == pytest.approx(float(np.abs(int8 - fp32).max()), rel=1e-5)
    default = Executor(tmp_path / "q", providers="cpu", variant="int8").run(sample)["head"].astype(np.float64)
    cos_default = (fp32 * default).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(default, axis=1)
    assert cos_default.min() >= q["end_to_end"]["cosine_min"] - 1e-6
