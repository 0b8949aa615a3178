"""The manifest.json an export directory carries (format read back by rlhf_runtime.manifest)."""

from __future__ import annotations

import hashlib
import platform
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from rlhf_runtime.manifest import FORMAT, VERSION


def tensor_info(name: str, array: np.ndarray, sequence: bool = False) -> dict[str, Any]:
    """``{"name", "dtype", "shape"}`` with ``None`` for the (dynamic) batch axis, and for axis 1
    too when ``sequence`` (a dynamic sequence length)."""
    shape: list[int | None] = [None, *(int(d) for d in array.shape[1:])]
    if sequence and len(shape) > 1:
        shape[1] = None
    return {"name": name, "dtype": str(array.dtype), "shape": shape}


def file_entry(name: str, data: bytes) -> dict[str, Any]:
    """``{"file", "sha256", "bytes"}`` of a file's contents."""
    return {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def format_version(stages: list[dict[str, Any]]) -> int:
    """The oldest format that describes these stage entries: 2 (``VERSION``) when a file has an
    external-data file (``"data"``), else 1, so an export without one still loads in an older runtime."""
    has_data = any("data" in entry for stage in stages for entry in stage.get("files", {}).values())
    return VERSION if has_data else 1


def build_manifest(
    *,
    name: str,
    opset: int,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    stages: list[dict[str, Any]],
    fused: dict[str, Any],
    parity: dict[str, Any],
    quantization: dict[str, Any] | None,
    optimization: str | None,
    exporter: str = "torch.onnx.export(dynamo=True)",
) -> dict[str, Any]:
    """Assemble the manifest document (see toolkit/runtime/manifest.py for the layout)."""
    return {
        "format": FORMAT,
        "version": format_version(stages),
        "name": name,
        "opset": opset,
        "producer": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "python": platform.python_version(),
            "exporter": exporter,
        },
        "inputs": inputs,
        "outputs": outputs,
        "stages": stages,
        "fused": fused,
        "parity": parity,
        "quantization": quantization,
        "optimization": optimization,
    }
