"""Measured agreement between onnxruntime and torch on real samples."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnxruntime as ort

# float32 export of the same float32 graph: differences come from op order and kernel choices only.
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3


@dataclass(frozen=True)
class Parity:
    """Errors of onnxruntime's outputs against the reference, over all outputs and samples.

    ``max_abs = max |y - ref|``; ``max_rel = max_abs / max |ref|`` (relative to the output's scale,
    so values near zero do not blow it up). ``ok`` when ``max_abs <= atol + rtol * max |ref|``
    for every output.
    """

    max_abs: float
    max_rel: float
    ok: bool

    def to_dict(self) -> dict[str, float | bool]:
        return asdict(self)


def compare(
    got: Sequence[np.ndarray],
    ref: Sequence[np.ndarray],
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> Parity:
    """Compare output lists elementwise (float64 arithmetic); integer outputs must match exactly."""
    max_abs = max_rel = 0.0
    ok = True
    for g, r in zip(got, ref):
        if g.shape != r.shape:
            return Parity(float("inf"), float("inf"), False)
        if not np.issubdtype(r.dtype, np.floating):
            err = float(np.max(np.abs(g.astype(np.int64) - r.astype(np.int64)))) if r.size else 0.0
            ok = ok and err == 0.0
            max_abs = max(max_abs, err)
            continue
        g64, r64 = g.astype(np.float64), r.astype(np.float64)
        err = float(np.max(np.abs(g64 - r64))) if r.size else 0.0
        scale = float(np.max(np.abs(r64))) if r.size else 0.0
        if not np.isfinite(err):
            ok = False
        ok = ok and err <= atol + rtol * scale
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / scale if scale > 0 else (0.0 if err == 0 else float("inf")))
    return Parity(max_abs, max_rel, bool(ok))


def cpu_session(model: bytes) -> ort.InferenceSession:
    """A plain CPU session (all optimizations on, as the executor runs by default)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


def run_onnx(
    model: bytes | ort.InferenceSession, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]
) -> list[np.ndarray]:
    """Run serialized ONNX (or a session) on CPU."""
    sess = cpu_session(model) if isinstance(model, bytes) else model
    return list(sess.run(list(output_names), dict(feeds)))
