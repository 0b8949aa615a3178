"""int8 quantization of exported stages with onnxruntime.quantization, settings chosen by measurement.

Two families are tried:

- dynamic: weights stored as int8, activations quantized on the fly per batch (MatMulInteger);
- static (QDQ): weights and activations quantized with ranges calibrated (MinMax) on training
  samples pushed through the fp32 stages.

On x86 CPUs without VNNI, onnxruntime multiplies u8 activations by s8 weights with ``vpmaddubsw``,
whose int16 accumulators saturate when weights use the full 8-bit range: the default settings can
lose accuracy there. ``reduce_range`` (7-bit weights) or u8 weights avoid it. Rather than guess the
CPU, every candidate is measured on a selection split (the validation split in ``rlhf export``):
among those within ``tolerance`` (0.25 points) of the best accuracy, the one with the smallest
files wins, then the smallest error against fp32. Only the chosen candidate is then run on the
test split, whose accuracy change is what the manifest reports (``chosen_on`` / ``reported_on``),
so the figure is not the best of several tries on the data it is reported on. The manifest records
every candidate's score on the selection split, and for the chosen one the change on test when
each stage alone is quantized, so a user sees which stage costs accuracy.

Bias vectors left in float32 by dynamic quantization are stored as float16 and cast back to
float32 when the session is created (``onnx_io.biases_to_fp16``): on a small model they are
otherwise several percent of the int8 file. Every candidate is scored with them, so the measured
accuracy includes that rounding.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
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

    method: str  # "dynamic" | "static"
    weight_type: str = "qint8"  # "qint8" | "quint8"
    per_channel: bool = False
    reduce_range: bool = False

    @property
    def label(self) -> str:
        parts = [self.method, self.weight_type]
        if self.per_channel:
            parts.append("per_channel")
        if self.reduce_range:
            parts.append("reduce_range")
        return "/".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}


CANDIDATES: tuple[QuantSetting, ...] = (
    QuantSetting("dynamic", "qint8"),  # onnxruntime's defaults
    QuantSetting("dynamic", "qint8", reduce_range=True),
    QuantSetting("dynamic", "quint8"),
    QuantSetting("dynamic", "qint8", per_channel=True, reduce_range=True),
    QuantSetting("static", "qint8", per_channel=True),
    QuantSetting("static", "qint8", per_channel=True, reduce_range=True),
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
            if setting.method == "dynamic":
                src.write_bytes(gemm_to_matmul(onnx.load_from_string(pre)).SerializeToString())
                quantize_dynamic(
                    src,
                    dst,
                    weight_type=wtype,
                    per_channel=setting.per_channel,
                    reduce_range=setting.reduce_range,
                    op_types_to_quantize=["MatMul", "Gather"],
                )
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
                    f"quantization method: expected 'dynamic' or 'static', got {setting.method!r}"
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
    outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], targets: np.ndarray | None
) -> dict[str, float]:
    """Error of quantized outputs against fp32 and, for a classifier with labels, accuracy.

    Accuracy is measured when ``targets`` are integer class labels (one per sample) and the first
    output is (B, classes); otherwise (regression, autoencoders, no labels) only the errors are.
    """
    err = 0.0
    for o, r in zip(outputs, reference):
        err = max(err, float(np.max(np.abs(o.astype(np.float64) - r.astype(np.float64)))))
    first, ref = outputs[0], reference[0]
    result: dict[str, float] = {
        "max_abs_vs_fp32": err,
        "max_rel_vs_fp32": err / max(float(np.max(np.abs(ref))), 1e-30),
    }
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


def _pick(scored: list[tuple[QuantSetting, list[bytes], dict[str, float], int]], tolerance: float) -> int:
    """Index of the chosen candidate: among those within ``tolerance`` of the best accuracy, the
    smallest files, then the smallest error against fp32 (without accuracy: smallest error, then size)."""
    best = max(s.get("accuracy", 0.0) for _, _, s, _ in scored)
    near = [i for i, (_, _, s, _) in enumerate(scored) if s.get("accuracy", 0.0) >= best - tolerance - 1e-12]
    if "accuracy" not in scored[0][2]:
        return min(near, key=lambda i: (scored[i][2]["max_abs_vs_fp32"], scored[i][3]))
    return min(near, key=lambda i: (scored[i][3], scored[i][2]["max_abs_vs_fp32"]))


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
) -> tuple[QuantSetting, list[bytes], dict[str, Any]]:
    """Quantize every stage with each candidate, choose one on the selection samples, report on the
    evaluation samples.

    The choice never sees the evaluation (test) samples: every candidate is scored on ``select``
    only, and the evaluation samples are run for the chosen candidate alone, so the reported
    accuracy change is an unbiased estimate and not the best of several tries on the same data.

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

    Returns:
        (chosen setting, int8 stage bytes, report) where the report lists every candidate's score
        on the selection samples and, for the chosen one on the evaluation samples, the change end
        to end and when each stage alone is quantized.

    Raises:
        ValueError: no candidate could be quantized and run.
    """
    with tempfile.TemporaryDirectory(prefix="rlhf-quant-") as tmp:
        pre = [preprocess(b, Path(tmp)) for b in stages]
    if select is None:
        select, select_name = (run_chain, reference, targets), "the evaluation samples (no selection split)"
    run_select, select_reference, select_targets = select
    tried: list[dict[str, Any]] = []
    scored: list[tuple[QuantSetting, list[bytes], dict[str, float], int]] = []
    for setting in candidates:
        try:
            q = [quantize_model(b, setting, cal, preprocessed=True) for b, cal in zip(pre, calibration)]
            s = score(run_select(q), select_reference, select_targets)
        except Exception as exc:  # a setting onnxruntime cannot build or run here: record and go on
            tried.append({**setting.to_dict(), "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        size = sum(len(b) for b in q)
        tried.append({**setting.to_dict(), **s, "bytes": size})
        scored.append((setting, q, s, size))
    if not scored:
        raise ValueError(
            "int8 quantization failed for every setting: " + "; ".join(t.get("error", "") for t in tried)
        )
    setting, q, _s, _ = scored[_pick(scored, tolerance)]
    s = score(run_chain(q), reference, targets)  # the evaluation samples, for the chosen one only
    per_stage = []
    for k in range(len(stages)):
        mixed = [q[i] if i == k else stages[i] for i in range(len(stages))]
        sk = score(run_chain(mixed), reference, targets)
        entry: dict[str, Any] = {"index": k, **sk, "bytes_fp32": len(stages[k]), "bytes_int8": len(q[k])}
        if "accuracy" in sk:
            entry["accuracy_change"] = sk["accuracy"] - sk["fp32_accuracy"]
        per_stage.append(entry)
    end_to_end: dict[str, Any] = dict(s)
    if "accuracy" in s:
        end_to_end["accuracy_change"] = s["accuracy"] - s["fp32_accuracy"]
    end_to_end["size_ratio"] = sum(len(b) for b in q) / max(1, sum(len(b) for b in stages))
    report = {
        "chosen": setting.to_dict(),
        "metric": "accuracy vs targets" if "accuracy" in s else "max abs error vs fp32 (no class labels)",
        "rule": f"most accurate; within {tolerance:g} of it the smallest files, then the smallest error",
        "chosen_on": select_name,
        "reported_on": "the evaluation samples (test split)",
        "end_to_end": end_to_end,
        "stages": per_stage,
        "candidates": tried,
    }
    return setting, q, report
