"""Peak memory of `rlhf train --layerwise` on a 3-stage model, against one stage and the whole model.

    python benchmarks/bench_layerwise.py [--quick] [--out docs/benchmarks/layerwise.md]

The teacher is a dense 3-stage MLP on the digits data whose stages are wide inside (W x W layers)
and narrow at the cuts (64 features), so weights, not activations, dominate; the student is the same
graph factorized at rank W/16. Each configuration runs in its own process and reports its peak
resident set (``VmHWM``, reset after the imports and the data are loaded, so both start level):

- ``layerwise``: ``train_layerwise`` (a few Adam steps per stage, then the end-to-end evaluation
  and the checkpoint);
- ``whole model resident``: what a non-streaming implementation holds at least: the whole teacher
  loaded (``load_model``), the whole student built, and every cut's activations for every split.

Reference bytes are computed from the shapes: the largest teacher stage + its student stage + the
activations crossing its cuts (inputs and outputs, every split), and the whole model (teacher +
student + every cut's activations). Figures go to the markdown file and a JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def spec_doc(width: int, layers: int, stages: int, rank: int, steps: int) -> dict[str, Any]:
    """Each stage: 64 -> W, ``layers - 1`` W x W layers (factorized at ``rank`` in the student),
    W -> 64 (the last stage: W -> 10 classes), tanh between; the cuts are 64 wide."""
    nodes: list[dict[str, Any]] = []
    parts: list[list[str]] = []
    prev = "x"
    for s in range(stages):
        ids: list[str] = []
        last = s == stages - 1
        dims = [width] * layers + [10 if last else 64]
        for j, out in enumerate(dims):
            fid = f"fc{s}_{j}"
            square = 0 < j < len(dims) - 1
            nodes.append(
                {
                    "id": fid,
                    "op": "linear",
                    "in": prev,
                    "out": out,
                    "factorize": {"rank": rank} if square else "none",
                }
            )
            ids.append(fid)
            prev = fid
            if not (last and j == len(dims) - 1):
                nodes.append({"id": f"act{s}_{j}", "op": "tanh", "in": fid})
                ids.append(f"act{s}_{j}")
                prev = f"act{s}_{j}"
        parts.append(ids)
    return {
        "name": f"layerwise-bench-{width}",
        "inputs": {"x": {"shape": [64]}},
        "nodes": nodes,
        "outputs": [prev],
        "stages": parts,
        "train": {
            "data": {"builtin": "digits"},
            "loss": "cross_entropy",
            "optimizer": {"name": "adam", "lr": 1e-3},
            "max_steps": steps,
            "batch_size": 128,
            "threads": 1,
        },
    }


def _nbytes(model: Any) -> list[int]:
    return [sum(t.numel() * t.element_size() for t in st.state_dict().values()) for st in model.stages]


def worker(mode: str, work: str) -> None:
    """Subprocess body: print this configuration's figures as JSON."""
    import numpy as np
    import torch

    from toolkit.checkpoint import load_model
    from toolkit.data import load_data
    from toolkit.runtime.bench import current_rss, peak_rss, reset_peak_rss
    from toolkit.spec import parse_spec
    from toolkit.train.layerwise import _run_stage, train_layerwise

    torch.set_num_threads(1)
    doc = json.loads((Path(work) / "spec.json").read_text())
    spec = parse_spec(doc, source="bench_layerwise")
    data = load_data(spec.train.data, spec.inputs)  # both modes hold the data
    # warm-up: the same code paths on a tiny model, so lazy imports and allocator arenas are in
    # the baseline of both configurations and the peak above it is the model's
    tiny = parse_spec(json.loads((Path(work) / "tiny" / "spec.json").read_text()), source="tiny")
    train_layerwise(
        tiny, Path(work) / f"tiny-{mode}", teacher=Path(work) / "tiny" / "teacher", overwrite=True
    )
    base = current_rss()
    reset_peak_rss()
    t0 = time.perf_counter()
    if mode == "layerwise":
        train_layerwise(spec, Path(work) / "student", teacher=Path(work) / "teacher", overwrite=True)
    elif mode == "svd":  # the truncated-SVD initialisation of one W x W layer, alone
        from toolkit.layers import FactorizedLinear

        width = int(doc["nodes"][2]["out"])
        layer = torch.nn.Linear(width, width)
        base = current_rss()
        reset_peak_rss()
        FactorizedLinear.from_dense(layer, rank=width // 16, fallback=False)
    else:
        from toolkit.builder import build_model
        from toolkit.train.layerwise import _init_from_teacher

        teacher, _, _ = load_model(Path(work) / "teacher")
        student = build_model(spec, seed=0)
        acts = {p: dict(getattr(data, p).inputs) for p in ("train", "val", "test")}
        for s_stage, t_stage in zip(student.stages, teacher.stages):
            _init_from_teacher(s_stage, t_stage)
            for p in acts:
                outs = _run_stage(
                    t_stage, [acts[p][n] for n in t_stage.input_names], torch.device("cpu"), torch.float32
                )
                acts[p].update(zip(t_stage.output_names, outs))
        held = sum(a.nbytes for d in acts.values() for a in d.values())
        assert held > 0
    seconds = time.perf_counter() - t0
    print(
        json.dumps({"mode": mode, "peak_bytes": peak_rss() - base, "seconds": seconds, "np": np.__version__})
    )


def references(work: Path) -> dict[str, Any]:
    """Bytes of the largest stage (teacher + student + its cut activations) and of the whole model."""
    import torch

    from toolkit.builder import build_model
    from toolkit.data import load_data
    from toolkit.spec import parse_spec

    spec = parse_spec(json.loads((work / "spec.json").read_text()), source="bench_layerwise")
    with torch.device("meta"):
        teacher = build_model(spec, seed=0, dense=True)
        student = build_model(spec, seed=0)
        env = {n: torch.empty(1, *spec.inputs[n].shape) for n in teacher.input_names}
        for st in teacher.stages:  # features per row of every tensor crossing a cut
            env.update(zip(st.output_names, st(*[env[n] for n in st.input_names])))
    width = {n: int(t[0].numel()) for n, t in env.items()}
    t_bytes, s_bytes = _nbytes(teacher), _nbytes(student)
    data = load_data(spec.train.data, spec.inputs)
    rows = sum(len(getattr(data, p)) for p in ("train", "val", "test"))
    cut_bytes = [
        rows * 4 * sum(width[n] for n in (*st.input_names, *st.output_names)) for st in teacher.stages
    ]
    k = max(range(len(t_bytes)), key=lambda i: t_bytes[i])
    return {
        "teacher_stage_bytes": t_bytes,
        "student_stage_bytes": s_bytes,
        "cut_bytes": cut_bytes,
        "one_stage_bytes": t_bytes[k] + s_bytes[k] + cut_bytes[k],
        "whole_model_bytes": sum(t_bytes) + sum(s_bytes) + rows * 4 * sum(width.values()),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small model, for checking the script runs")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "layerwise.md")
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "WORKDIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    import torch

    from toolkit.builder import build_model
    from toolkit.checkpoint import save_checkpoint
    from toolkit.spec import parse_spec

    width, layers, steps = (256, 2, 2) if args.quick else (1024, 9, 5)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-layerwise-") as tmp:
        work = Path(tmp)
        doc = spec_doc(width, layers, 3, width // 16, steps)
        for where, d in ((work, doc), (work / "tiny", spec_doc(16, 2, 3, 4, 1))):
            where.mkdir(exist_ok=True)
            (where / "spec.json").write_text(json.dumps(d))
            teacher = build_model(parse_spec(d, source="bench_layerwise"), seed=0, dense=True)
            # weights as initialised: the memory figures do not depend on their values
            resolved = teacher.to_spec().resolved()
            save_checkpoint(
                where / "teacher" / "checkpoints", "best-00000000", teacher, resolved, {"dense": True}
            )
            del teacher
        refs = references(work)
        runs = []
        for mode in ("layerwise", "resident", "svd"):
            out = subprocess.run(
                [sys.executable, __file__, "--worker", mode, str(work)],
                capture_output=True,
                text=True,
                check=True,
                env={
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                },
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    res = {
        "model": f"3 stages x {layers} dense {width}x{width} layers between 64-wide cuts (teacher); student rank {width // 16}",
        "width": width,
        "layers": layers,
        "steps_per_stage": steps,
        "references": refs,
        "runs": runs,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_avg_at_start": load_start,
            "load_avg_at_end": os.getloadavg()[0],
            "torch_threads": 1,
            "torch": torch.__version__,
        },
        "quick": args.quick,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    args.out.write_text(render(res))
    print(args.out.read_text())


def render(res: dict[str, Any]) -> str:
    mib = 2**20
    refs = res["references"]
    by = {r["mode"]: r for r in res["runs"]}
    lw, rs, svd = by["layerwise"], by["resident"], by["svd"]
    m = res["machine"]
    one = refs["one_stage_bytes"] + svd["peak_bytes"]
    lines = [
        "# Layer-wise training: peak memory (`rlhf train --layerwise`)",
        "",
        f"Reproduce: `python benchmarks/bench_layerwise.py{' --quick' if res['quick'] else ''}` — "
        f"{m['cores']} cores, 1 torch thread, load average {m['load_avg_at_start']:.2f} at start and "
        f"{m['load_avg_at_end']:.2f} at end, torch {m['torch']}.",
        "",
        f"Model: {res['model']}; teacher {refs['teacher_params']:,} parameters, student "
        f"{refs['student_params']:,}; digits data ({refs['rows']} rows over train/val/test); "
        f"{res['steps_per_stage']} Adam steps per stage. Peak RSS (VmHWM) is measured in a fresh process "
        "per configuration, above its level once torch, the toolkit and the data are loaded and the same "
        "code has run once on a tiny model (so lazy imports and allocator arenas are in the baseline).",
        "",
        "| measured | peak RSS MiB | seconds |",
        "|---|---|---|",
        f"| `--layerwise` (train_layerwise) | {lw['peak_bytes'] / mib:.1f} | {lw['seconds']:.1f} |",
        f"| whole model resident: teacher loaded (`load_model`), student built and SVD-initialised, every cut's activations | {rs['peak_bytes'] / mib:.1f} | {rs['seconds']:.1f} |",
        f"| truncated-SVD initialisation of one {res['width']}x{res['width']} layer, alone | {svd['peak_bytes'] / mib:.1f} | {svd['seconds']:.1f} |",
        "",
        "| reference (bytes from the shapes) | MiB |",
        "|---|---|",
        f"| teacher stages | {' / '.join(f'{b / mib:.1f}' for b in refs['teacher_stage_bytes'])} |",
        f"| student stages | {' / '.join(f'{b / mib:.2f}' for b in refs['student_stage_bytes'])} |",
        f"| one stage: largest teacher stage + its student stage + its cut activations | {refs['one_stage_bytes'] / mib:.1f} |",
        f"| whole model: teacher + student + every cut's activations | {refs['whole_model_bytes'] / mib:.1f} |",
        "",
        f"- `--layerwise` peak / (one stage + the SVD initialisation of one layer, measured) = {lw['peak_bytes'] / one:.2f}",
        f"- `--layerwise` peak / whole model (bytes) = {lw['peak_bytes'] / refs['whole_model_bytes']:.2f}",
        f"- `--layerwise` peak / whole model resident (measured) = {lw['peak_bytes'] / max(rs['peak_bytes'], 1):.2f}",
        "",
        "One stage at a time: the teacher stage is read alone from the checkpoint, the student stage is "
        "materialized alone, only the activations crossing the current cut are held. What remains above "
        "the stage's own bytes is the SVD initialisation of a factorized layer (LAPACK workspace in "
        "float64, measured alone above), the optimizer state and batch activations of the stage being "
        "fitted, and at the end the assembled student (smaller than one teacher stage here).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
