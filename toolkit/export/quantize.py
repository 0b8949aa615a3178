"""int8 quantization of exported stages with onnxruntime.quantization, settings chosen by measurement.

Three families are tried:

- dynamic: weights stored as int8, activations quantized on the fly per batch (MatMulInteger),
  one 8-bit range for the whole activation tensor;
- static (QDQ): weights and activations quantized with ranges calibrated (MinMax) on training
  samples pushed through the fp32 stages;
- weight_only: MatMul weights stored as int8 (per output column) and dequantized in the graph
  (``weight_only``); the file's math is float. onnxruntime (1.20+, default optimizations) fuses
  ``DequantizeLinear -> MatMul`` into MatMulNBits, which with weight prepacking on (onnxruntime's
  default, the exporter's sessions) rounds each *row* of activations to 8 bits, and with it off
  (the executor's default) multiplies in float. Either way one outlier token no longer sets the
  range of every other token, which is where dynamic int8 loses a transformer's accuracy.

Mixed candidates (dynamic int8 in the least sensitive layers, weight-only in the others) are
searched when weight-only is good enough and dynamic is not (``choose_and_quantize``).

On x86 CPUs without VNNI, onnxruntime multiplies u8 activations by s8 weights with ``vpmaddubsw``,
whose int16 accumulators saturate when weights use the full 8-bit range: the default settings can
lose accuracy there. ``reduce_range`` (7-bit weights) or u8 weights avoid it. Rather than guess the
CPU, every candidate is measured on a selection split (the validation split in ``rlhf export``),
and the cheapest good-enough one within the size limit wins (``_Rule``: with labels, accuracy
within ``tolerance`` (0.25 points) of the best; without, every sample's cosine to fp32 at least
``min_cosine``; cheapest = most MatMul weights in dynamic/static int8 kernels, measured faster
than weight-only, then the smallest files, then the smallest error). Only the chosen candidate is
then run on the test split, whose figures are what the manifest reports (``chosen_on`` /
``reported_on``), so the figure is not the best of several tries on the data it is reported on.
The manifest records every candidate's score on the selection split, the layer sensitivities
when mixed candidates were searched, and for the chosen one the change on test when each stage
alone is quantized, so a user sees which stage costs accuracy.

Bias vectors left in float32 by dynamic quantization are stored as float16 and cast back to
float32 when the session is created (``onnx_io.biases_to_fp16``): on a small model they are
otherwise several percent of the int8 file. Every candidate is scored with them, so the measured
accuracy includes that rounding.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from toolkit.errors import InputError
from toolkit.export.onnx_io import biases_to_fp16, compact, gemm_to_matmul, rename_inputs

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class QuantSetting:
    """One set of onnxruntime.quantization options."""

    method: str  # "dynamic" | "static" | "weight_only"
    weight_type: str = "qint8"  # "qint8" | "quint8"
    per_channel: bool = False
    reduce_range: bool = False
    float_weights: tuple[str, ...] = ()  # dynamic: digests (weight_digest) of MatMul weights kept weight-only

    @property
    def label(self) -> str:
        parts = [self.method, self.weight_type]
        if self.per_channel:
            parts.append("per_channel")
        if self.reduce_range:
            parts.append("reduce_range")
        if self.float_weights:
            parts.append(f"{len(self.float_weights)}_weight_only")
        return "/".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = {**asdict(self), "label": self.label}
        d["float_weights"] = list(self.float_weights)
        return d


CANDIDATES: tuple[QuantSetting, ...] = (
    QuantSetting("dynamic", "qint8"),  # onnxruntime's defaults
    QuantSetting("dynamic", "qint8", reduce_range=True),
    QuantSetting("dynamic", "quint8"),
    QuantSetting("dynamic", "qint8", per_channel=True, reduce_range=True),
    QuantSetting("static", "qint8", per_channel=True),
    QuantSetting("static", "qint8", per_channel=True, reduce_range=True),
    QuantSetting("weight_only", "qint8", per_channel=True),  # int8 files, float compute
)

_QTYPE = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


class _Reader(CalibrationDataReader):  # type: ignore[misc]
    def __init__(self, feeds: Sequence[Feeds]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> Feeds | None:
        return next(self._it, None)


def preprocess(model: bytes, workdir: Path) -> bytes:
    """onnxruntime's quant_pre_process (shape inference + basic fusions), recommended before quantizing."""
    src, dst = workdir / "pre_in.onnx", workdir / "pre_out.onnx"
    src.write_bytes(model)
    # onnxruntime's symbolic shape inference gives up on a second dynamic axis (a sequence length)
    # and leaves temporary files in the working directory when it does: use ONNX's own inference there
    graph = onnx.load_from_string(model).graph
    seq_axis = any(d.dim_param for i in graph.input for d in i.type.tensor_type.shape.dim[1:])
    with _quiet():
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=seq_axis)
    return dst.read_bytes()


def matmul_weights(proto: onnx.ModelProto) -> list[tuple[onnx.NodeProto, np.ndarray]]:
    """The MatMul nodes whose second input is a 2-D float32 initializer (a linear layer's weight,
    after ``gemm_to_matmul``), with that weight, in graph order."""
    inits = {i.name: i for i in proto.graph.initializer}
    out = []
    for node in proto.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if w is not None and w.data_type == onnx.TensorProto.FLOAT and len(w.dims) == 2:
            out.append((node, numpy_helper.to_array(w)))
    return out


def weight_digest(w: np.ndarray) -> str:
    """A name-independent key of a weight (its shape and float32 bytes): the same layer has different
    node and initializer names in a stage file and in the fused file, but the same weight."""
    a = np.ascontiguousarray(w, dtype=np.float32)
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()[:16]


def weight_only(proto: onnx.ModelProto, only: set[str] | None = None) -> onnx.ModelProto:
    """Store MatMul weights as int8 with a float32 scale per output column, dequantized in the graph
    (``DequantizeLinear`` -> MatMul): int8 files, float math as written.

    Symmetric, range [-127, 127], ``scale = max|W[:, j]| / 127`` (zero point 0). The graph does not
    quantize activations; onnxruntime's MatMulNBits fusion of it rounds at most each row of
    activations to 8 bits (module docstring), where dynamic quantization rounds the whole
    activation tensor with one range, which transformer activations with outlier tokens do not
    survive everywhere.

    Args:
        proto: the model (after ``gemm_to_matmul``).
        only: digests (``weight_digest``) of the weights to convert; None converts every MatMul weight.

    Returns:
        A new model; each converted weight keeps its initializer name (now int8) beside
        ``<name>_scale``, and its MatMuls read ``<name>_dequantized``.
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    other_uses = {  # a weight also read by another op (a tied embedding) stays float32
        x for n in g.node for k, x in enumerate(n.input) if not (n.op_type == "MatMul" and k == 1)
    }
    targets = {
        node.input[1]: w
        for node, w in matmul_weights(out)
        if node.input[1] not in other_uses and (only is None or weight_digest(w) in only)
    }
    if not targets:
        return out
    inits = {i.name: i for i in g.initializer}
    dq_nodes = []
    for name, w in targets.items():
        w64 = w.astype(np.float64)
        scale = np.abs(w64).max(axis=0) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(w64 / scale), -127, 127).astype(np.int8)
        inits[name].CopyFrom(numpy_helper.from_array(q, name))
        g.initializer.append(numpy_helper.from_array(scale.astype(np.float32), name + "_scale"))
        dq_nodes.append(
            onnx.helper.make_node(
                "DequantizeLinear",
                [name, name + "_scale"],
                [name + "_dequantized"],
                name=name + "_DequantizeLinear",
                axis=1,
            )
        )
    for node in g.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in targets:
            node.input[1] = node.input[1] + "_dequantized"
    nodes = [*dq_nodes, *g.node]
    del g.node[:]
    g.node.extend(nodes)
    return out


def quantize_model(
    model: bytes, setting: QuantSetting, calibration: Sequence[Feeds] | None, *, preprocessed: bool = False
) -> bytes:
    """Quantize one serialized fp32 model with ``setting``.

    Args:
        model: fp32 ONNX bytes.
        setting: the options.
        calibration: batches of this model's inputs (required for static quantization).
        preprocessed: ``model`` already went through ``preprocess`` (skip it).

    Returns:
        The int8 ONNX bytes (one self-contained file).

    Raises:
        ValueError: static quantization without calibration batches.
    """
    with tempfile.TemporaryDirectory(prefix="rlhf-quant-") as tmp:
        work = Path(tmp)
        pre = model if preprocessed else preprocess(model, work)
        src, dst = work / "fp32.onnx", work / "int8.onnx"
        wtype = _QTYPE[setting.weight_type]
        with _quiet():
            if setting.method in ("dynamic", "weight_only"):
                proto = gemm_to_matmul(onnx.load_from_string(pre))
                keep = set(setting.float_weights)
                weights = matmul_weights(proto) if keep else []  # digests only when layers are kept
                excluded = [n.name for n, w in weights if weight_digest(w) in keep]
                if excluded and any(not n.name for n, _ in weights):
                    raise ValueError("weight-only MatMuls: every MatMul node needs a name to be excluded")
                src.write_bytes(proto.SerializeToString())
                quantize_dynamic(
                    src,
                    dst,
                    weight_type=wtype,
                    per_channel=setting.per_channel,
                    reduce_range=setting.reduce_range,
                    op_types_to_quantize=["Gather"]
                    if setting.method == "weight_only"
                    else ["MatMul", "Gather"],
                    nodes_to_exclude=excluded,
                )
                # MatMuls left float (all of them for weight_only): int8 weights, float compute
                only = None if setting.method == "weight_only" else keep
                dst.write_bytes(weight_only(onnx.load(str(dst)), only).SerializeToString())
            elif setting.method == "static":
                if not calibration:
                    raise ValueError("static quantization: expected calibration batches, got none")
                src.write_bytes(pre)
                quantize_static(
                    src,
                    dst,
                    _Reader(calibration),
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8,
                    weight_type=wtype,
                    per_channel=setting.per_channel,
                    reduce_range=setting.reduce_range,
                    calibrate_method=CalibrationMethod.MinMax,
                    op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                )
            else:
                raise InputError(
                    "quantization method: expected 'dynamic', 'static' or 'weight_only', "
                    f"got {setting.method!r}"
                )
        quantized = _parameter_names(onnx.load(str(dst)))
        return compact(biases_to_fp16(quantized)).SerializeToString()


def _parameter_names(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Give each int8 weight its parameter's name back (``fc1.V.weight``, not the quantizer's
    ``fc1.V.weight_quantized``); its ``_scale`` and ``_zero_point`` keep theirs."""
    g = proto.graph
    taken = (
        {i.name for i in g.initializer} | {i.name for i in g.input} | {o for n in g.node for o in n.output}
    )
    renamed: dict[str, str] = {}
    for init in g.initializer:
        base = init.name.removesuffix("_quantized")
        if base != init.name and base not in taken:
            renamed[init.name] = init.name = base
    rename_inputs(g, renamed)
    return proto


def score(
    outputs: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    targets: np.ndarray | None,
    mask: np.ndarray | None = None,
) -> dict[str, float]:
    """Error of quantized outputs against fp32 and, for a classifier with labels, accuracy.

    Accuracy is measured when ``targets`` are integer class labels (one per sample) and the first
    output is (B, classes); otherwise (regression, autoencoders, no labels) only the errors are.
    ``cosine_min`` / ``cosine_mean``: each sample's cosine similarity to fp32 (its output flattened;
    float outputs with a feature axis), the smallest and the mean, of the worst output.

    ``mask``: (B, T) positions that exist (a text model's attention mask); in outputs whose first
    two axes are (B, T) the padded positions are left out of every figure (their values are
    computed but belong to no sample's result, and quantization moves them far more).
    """
    if mask is not None:
        keep = np.asarray(mask) != 0
        outputs = [_unpad(o, keep) for o in outputs]
        reference = [_unpad(r, keep) for r in reference]
    err = 0.0
    for o, r in zip(outputs, reference):
        err = max(err, float(np.max(np.abs(o.astype(np.float64) - r.astype(np.float64)), initial=0.0)))
    first, ref = outputs[0], reference[0]
    result: dict[str, float] = {
        "max_abs_vs_fp32": err,
        "max_rel_vs_fp32": err / max(float(np.max(np.abs(ref))), 1e-30),
    }
    cosines = [_cosine(o, r) for o, r in zip(outputs, reference) if r.ndim >= 2 and r.dtype.kind == "f"]
    if cosines:
        result["cosine_min"] = min(float(c.min()) for c in cosines)
        result["cosine_mean"] = min(float(c.mean()) for c in cosines)
    labels = None if targets is None else np.asarray(targets)
    if (
        labels is not None
        and labels.ndim == 1
        and np.issubdtype(labels.dtype, np.integer)
        and first.ndim == 2
        and first.shape[1] > 1
        and len(labels) == len(first)
    ):
        result["accuracy"] = float(np.mean(first.argmax(1) == labels))
        result["fp32_accuracy"] = float(np.mean(ref.argmax(1) == labels))
    return result


def _unpad(a: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``a`` with the positions ``keep`` marks absent set to 0 (when its first axes are keep's)."""
    if a.ndim < keep.ndim or a.shape[: keep.ndim] != keep.shape:
        return a
    return np.where(keep.reshape(keep.shape + (1,) * (a.ndim - keep.ndim)), a, np.zeros((), a.dtype))


def _cosine(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per-sample cosine similarity (float64) of two (B, ...) arrays; 1 where both are zero."""
    a = out.reshape(len(out), -1).astype(np.float64)
    b = ref.reshape(len(ref), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = (a * b).sum(1)
    both_zero = (na == 0) & (nb == 0)
    return np.where(both_zero, 1.0, dot / np.maximum(na * nb, 1e-300))


@dataclass
class _Scored:
    setting: QuantSetting
    blobs: list[bytes]
    score: dict[str, float]
    size: int
    int8_compute: float  # share of MatMul weight elements in dynamic/static int8 kernels (0: weight-only)


def _damage(s: dict[str, float]) -> float:
    """How far outputs are from fp32, for ranking layers: 1 - mean cosine (else the max error)."""
    return 1.0 - s["cosine_mean"] if "cosine_mean" in s else s["max_abs_vs_fp32"]


class _Rule:
    """Which candidates are good enough, and which of them is cheapest.

    Candidates whose files exceed ``size_limit`` of fp32 are not eligible (unless none is within
    it: then all are, and the report says so). Good enough: with class labels, an accuracy within
    ``tolerance`` of the best eligible one; without, every sample's cosine to fp32 at least
    ``min_cosine`` (if no candidate reaches it: the best ``cosine_min``; without cosines: the
    smallest error). Cheapest: the most MatMul weight elements in dynamic / static int8 kernels
    (MatMulInteger, QDQ: on MiniLM measured faster than weight-only's MatMulNBits), then the smallest
    files, then the smallest error.
    """

    def __init__(self, tolerance: float, min_cosine: float, size_limit: float, fp32_bytes: int) -> None:
        self.tolerance, self.min_cosine, self.size_limit = tolerance, min_cosine, size_limit
        self.fp32_bytes = max(1, fp32_bytes)

    def eligible(self, scored: Sequence[_Scored]) -> list[_Scored]:
        within = [c for c in scored if c.size <= self.size_limit * self.fp32_bytes]
        return within or list(scored)

    def good(self, scored: Sequence[_Scored]) -> list[_Scored]:
        pool = self.eligible(scored)
        if "accuracy" in pool[0].score:
            best = max(c.score["accuracy"] for c in pool)
            return [c for c in pool if c.score["accuracy"] >= best - self.tolerance - 1e-12]
        if "cosine_min" in pool[0].score:
            ok = [c for c in pool if c.score["cosine_min"] >= self.min_cosine]
            best = max(c.score["cosine_min"] for c in pool)
            return ok or [c for c in pool if c.score["cosine_min"] >= best]
        least = min(c.score["max_abs_vs_fp32"] for c in pool)
        return [c for c in pool if c.score["max_abs_vs_fp32"] <= least]

    def passes(self, candidate: _Scored, scored: Sequence[_Scored]) -> bool:
        """Would ``candidate`` be good enough among ``scored`` (without changing their best)?"""
        return any(c is candidate for c in self.good([*scored, candidate]))

    def pick(self, scored: Sequence[_Scored]) -> _Scored:
        return min(self.good(scored), key=lambda c: (-c.int8_compute, c.size, c.score["max_abs_vs_fp32"]))

    def describe(self) -> str:
        return (
            f"files within {self.size_limit:g} of fp32; good enough: accuracy within {self.tolerance:g} of "
            f"the best (with labels), else every sample's cosine to fp32 >= {self.min_cosine:g}; among "
            "those the most MatMul weights in dynamic/static int8 kernels, then the smallest files, then the "
            "smallest error"
        )


def choose_and_quantize(
    stages: Sequence[bytes],
    calibration: Sequence[Sequence[Feeds]],
    run_chain: Callable[[Sequence[bytes]], list[np.ndarray]],
    reference: Sequence[np.ndarray],
    targets: np.ndarray | None,
    candidates: Sequence[QuantSetting] = CANDIDATES,
    tolerance: float = 0.0025,
    *,
    select: tuple[Callable[[Sequence[bytes]], list[np.ndarray]], Sequence[np.ndarray], np.ndarray | None]
    | None = None,
    select_name: str = "validation split",
    size_limit: float = 0.30,
    min_cosine: float = 0.99,
    mixed: bool = True,
    masks: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
) -> tuple[QuantSetting, list[bytes], dict[str, Any]]:
    """Quantize every stage with each candidate, choose one on the selection samples, report on the
    evaluation samples.

    The choice never sees the evaluation (test) samples: every candidate is scored on ``select``
    only, and the evaluation samples are run for the chosen candidate alone, so the reported
    accuracy change is an unbiased estimate and not the best of several tries on the same data.

    Mixed candidates (``mixed``): when a weight-only candidate is good enough and a dynamic one is
    not, the layers are ranked by measured sensitivity (on the selection samples: the damage when
    that layer alone multiplies in int8 and every other one is weight-only), and the largest
    number of least sensitive layers that can multiply in int8 while the result stays good enough
    is found by bisection; the others keep int8 weights with float compute. Every probe is a
    candidate in the report.

    Args:
        stages: fp32 stage bytes in order.
        calibration: per stage, the batches of its inputs (fp32 activations of training samples).
        run_chain: runs a list of stage bytes end to end on the evaluation samples, returns outputs.
        reference: the fp32 outputs on the evaluation samples.
        targets: labels of the evaluation samples, or None (agreement with fp32 is measured).
        candidates: settings to try.
        tolerance: accuracies within this of the best count as equal (then smaller files win);
            default 0.25 points, half the 0.5-point budget int8 may cost.
        select: (run_chain, fp32 reference, targets) on the selection samples (a validation
            split); None chooses on the evaluation samples themselves (then the report says so).
        select_name: what the selection samples are, for the report.
        size_limit: int8 files at most this fraction of the fp32 files (default 0.30).
        min_cosine: without class labels, the per-sample cosine to fp32 every sample must reach.
        mixed: search mixed int8 / weight-only candidates (see above).
        masks: (B, T) masks of the positions that exist (a text model's attention mask) in the
            evaluation and the selection samples; padded positions of sequence outputs are left
            out of the scores (``score``).

    Returns:
        (chosen setting, int8 stage bytes, report) where the report lists every candidate's score
        on the selection samples and, for the chosen one on the evaluation samples, the change end
        to end and when each stage alone is quantized.

    Raises:
        ValueError: no candidate could be quantized and run.
    """
    if not size_limit > 0:
        raise InputError(f"size_limit: expected a fraction of the fp32 size > 0, got {size_limit}")
    with tempfile.TemporaryDirectory(prefix="rlhf-quant-") as tmp:
        pre = [preprocess(b, Path(tmp)) for b in stages]
    eval_mask, select_mask = masks
    if select is None:
        select, select_name = (run_chain, reference, targets), "the evaluation samples (no selection split)"
        select_mask = eval_mask
    run_select, select_reference, select_targets = select
    rule = _Rule(tolerance, min_cosine, size_limit, sum(len(b) for b in stages))
    # every MatMul weight of every stage: (stage, node name, digest, elements)
    shapes: dict[tuple[int, str], list[int]] = {}
    layers = []
    for k, b in enumerate(pre):
        for node, w in matmul_weights(gemm_to_matmul(onnx.load_from_string(b))):
            layers.append((k, node.name, weight_digest(w), int(w.size)))
            shapes[(k, node.name)] = list(w.shape)
    total = sum(n for *_, n in layers) or 1
    cache: dict[tuple[int, QuantSetting], bytes] = {}

    def stage_bytes(k: int, setting: QuantSetting, keep: bool = True) -> bytes:
        mine = {d for s, _, d, _ in layers if s == k}  # the float weights of this stage only
        own = replace(setting, float_weights=tuple(sorted(mine & set(setting.float_weights))))
        if (k, own) in cache:
            return cache[(k, own)]
        data = quantize_model(pre[k], own, calibration[k], preprocessed=True)
        if keep:
            cache[(k, own)] = data
        return data

    def int8_share(setting: QuantSetting) -> float:
        if setting.method == "weight_only":
            return 0.0
        kept = set(setting.float_weights)
        return sum(n for *_, d, n in layers if d not in kept) / total

    tried: list[dict[str, Any]] = []
    scored: list[_Scored] = []

    def attempt(setting: QuantSetting, **extra: Any) -> _Scored | None:
        try:
            q = [stage_bytes(k, setting) for k in range(len(pre))]
            s = score(run_select(q), select_reference, select_targets, select_mask)
        except Exception as exc:  # a setting onnxruntime cannot build or run here: record and go on
            tried.append({**setting.to_dict(), **extra, "error": f"{type(exc).__name__}: {exc}"[:300]})
            return None
        c = _Scored(setting, q, s, sum(len(b) for b in q), int8_share(setting))
        tried.append({**setting.to_dict(), **extra, **s, "bytes": c.size, "int8_compute": c.int8_compute})
        return c

    for setting in candidates:
        c = attempt(setting)
        if c is not None:
            scored.append(c)
    if not scored:
        raise ValueError(
            "int8 quantization failed for every setting: " + "; ".join(t.get("error", "") for t in tried)
        )
    sensitivity: list[dict[str, Any]] = []
    chosen = rule.pick(scored)
    base = next((c for c in scored if c.setting.method == "dynamic" and not c.setting.float_weights), None)
    if mixed and layers and chosen.int8_compute == 0.0 and base is not None:
        sensitivity = _mixed_search(
            base.setting,
            layers,
            chosen,
            scored,
            rule,
            attempt,
            stage_bytes,
            lambda q: score(run_select(q), select_reference, select_targets, select_mask),
        )
        for t in sensitivity:
            t["shape"] = shapes[(t["stage"], t["node"])]
        chosen = rule.pick(scored)
    setting, q = chosen.setting, chosen.blobs
    s = score(run_chain(q), reference, targets, eval_mask)  # the evaluation samples, for the chosen one only
    per_stage = []
    for k in range(len(stages)):
        mixed_chain = [q[i] if i == k else stages[i] for i in range(len(stages))]
        sk = score(run_chain(mixed_chain), reference, targets, eval_mask)
        entry: dict[str, Any] = {"index": k, **sk, "bytes_fp32": len(stages[k]), "bytes_int8": len(q[k])}
        if "accuracy" in sk:
            entry["accuracy_change"] = sk["accuracy"] - sk["fp32_accuracy"]
        per_stage.append(entry)
    end_to_end: dict[str, Any] = dict(s)
    if "accuracy" in s:
        end_to_end["accuracy_change"] = s["accuracy"] - s["fp32_accuracy"]
    end_to_end["size_ratio"] = sum(len(b) for b in q) / max(1, sum(len(b) for b in stages))
    chosen_dict = setting.to_dict()
    kept = set(setting.float_weights)
    chosen_dict["weight_only_layers"] = [
        {"stage": k, "node": name} for k, name, d, _ in layers if d in kept or setting.method == "weight_only"
    ]
    report = {
        "chosen": chosen_dict,
        "metric": "accuracy vs targets"
        if "accuracy" in s
        else f"per-sample cosine to fp32 (target >= {min_cosine:g}), max abs error vs fp32 (no class labels)",
        "rule": rule.describe(),
        "size_limit": size_limit,
        "size_limit_met": end_to_end["size_ratio"] <= size_limit,
        "int8_compute": chosen.int8_compute,
        "chosen_on": select_name,
        "reported_on": "the evaluation samples (test split)",
        "end_to_end": end_to_end,
        "stages": per_stage,
        "candidates": tried,
        "sensitivity": sensitivity,
    }
    return setting, q, report


def _mixed_search(
    base: QuantSetting,
    layers: Sequence[tuple[int, str, str, int]],
    weight_only_candidate: _Scored,
    scored: list[_Scored],
    rule: _Rule,
    attempt: Callable[..., _Scored | None],
    stage_bytes: Callable[[int, QuantSetting, bool], bytes],
    score_select: Callable[[Sequence[bytes]], dict[str, float]],
) -> list[dict[str, Any]]:
    """Rank layers by sensitivity, then bisect on how many of the least sensitive multiply in int8
    (``base``'s dynamic setting) with the rest weight-only; good-enough probes join ``scored``.

    Returns the sensitivity table (stage, node, elements, damage when that layer alone is int8).
    """
    digests = [d for _, _, d, _ in layers]
    table: list[dict[str, Any]] = []
    for k, name, d, n in layers:  # this layer int8, every other weight-only: one stage re-quantized
        one = replace(base, float_weights=tuple(x for x in digests if x != d))
        q = list(weight_only_candidate.blobs)
        try:
            q[k] = stage_bytes(k, one, False)
            s = score_select(q)
        except Exception as exc:  # recorded; the layer then counts as the most sensitive
            table.append(
                {"stage": k, "node": name, "elements": n, "error": f"{type(exc).__name__}: {exc}"[:200]}
            )
            continue
        table.append({"stage": k, "node": name, "elements": n, "damage": _damage(s), **s})
    damage = [t.get("damage", float("inf")) for t in table]
    order = sorted(range(len(layers)), key=lambda i: damage[i])
    lo, hi = 0, len(layers)  # lo: known good (weight-only); hi: known not (the base dynamic setting)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        keep = tuple(sorted(digests[i] for i in order[mid:]))
        c = attempt(
            replace(base, float_weights=keep), probe=f"{mid} least sensitive of {len(layers)} layers int8"
        )
        if c is not None and rule.passes(c, scored):
            scored.append(c)
            lo = mid
        else:
            hi = mid
    return table
