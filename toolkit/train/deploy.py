"""After training (`rlhf train --export`): export the best checkpoint per stage and check it with onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.checkpoint import load_model
from toolkit.data import load_data
from toolkit.train.losses import has_accuracy


def export_and_check(run_dir: str | Path, device: str | None = None, sample_size: int = 64) -> dict[str, Any]:
    """Export RUN_DIR's model into RUN_DIR/export and evaluate the exported stages on the test split.

    Args:
        run_dir: a finished run directory.
        device: unused for export (always CPU, float32); kept for symmetry with ``train``.
        sample_size: test examples used as the export's parity sample.

    Returns:
        {"dir", "accuracy" (onnxruntime, where it applies), "torch_accuracy", "max_abs_diff",
        "files": [{"name", "bytes"}]}, or {"error": message} when toolkit.export / toolkit.runtime is
        missing from this build.
    """
    try:
        from rlhf_runtime import Executor

        from toolkit.export import export_model
    except ImportError as exc:
        return {"error": f"export skipped: toolkit.export / toolkit.runtime not available ({exc})"}
    run = Path(run_dir)
    model, spec, _ = load_model(run, device="cpu")
    model = model.float().eval()
    cfg = spec.train
    splits = load_data(cfg.data, spec.inputs)
    test = splits.test if len(splits.test) else splits.val if len(splits.val) else splits.train
    names = list(model.input_names)
    inputs = {n: np.ascontiguousarray(test.inputs[n]) for n in names}
    sample = {n: v[:sample_size] for n, v in inputs.items()}
    out_dir = run / "export"
    manifest = export_model(model, out_dir, sample=sample, overwrite=True, name=spec.name)
    ex = Executor(out_dir, providers="cpu")
    ort_out = ex.run(inputs)[model.output_names[0]]
    with torch.no_grad():
        ref = model(*(torch.from_numpy(inputs[n]) for n in names))
    ref_np = (ref[0] if isinstance(ref, tuple) else ref).numpy()
    result: dict[str, Any] = {"dir": str(out_dir), "max_abs_diff": float(np.max(np.abs(ort_out - ref_np)))}
    if has_accuracy(cfg.loss) and cfg.loss == "cross_entropy":
        y = test.targets.astype(np.int64)
        result["accuracy"] = float((ort_out.reshape(len(y), -1).argmax(1) == y).mean())
        result["torch_accuracy"] = float((ref_np.reshape(len(y), -1).argmax(1) == y).mean())
    files = []
    for entry in [*manifest.get("stages", []), manifest.get("fused") or {}]:
        for f in (entry.get("files") or {}).values():
            data = f.get("data") or {}  # the stage's weights (external data, manifest format 2)
            files.append({"name": f["file"], "bytes": int(f["bytes"]) + int(data.get("bytes", 0))})
    result["files"] = files
    return result
