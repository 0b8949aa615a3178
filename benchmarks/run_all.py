"""Run every benchmark side by side and write docs/benchmarks.md (the index of their reports).

Each benchmark script measures its own comparison in one process and writes
docs/benchmarks/<name>.md (and plots); this driver runs them one after another so they do not
compete for the CPU, and collects their reports into one page.

Usage: python benchmarks/run_all.py [--quick] [--only optim,runtime,factorize,layerwise,pipeline,finetune,transformer,coldstart,generate]

Each script's duration is recorded in docs/benchmarks/durations.json (runs/bench-quick/ with
``--quick``) and shown in the index.

``--quick`` (tiny budgets, to check that the scripts run) writes its reports under
runs/bench-quick/, so the recorded figures in docs/ are only ever replaced by full runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICK_DIR = ROOT / "runs" / "bench-quick"
BENCHES = {
    "optim": (
        "bench_optim.py",
        "Hessian-free vs Adam, L-BFGS and SOAP on four problems; settings sweep; K-FAC CG; curvature-product cost",
    ),
    "runtime": ("bench_runtime.py", "Per-stage onnxruntime vs fused vs torch; streaming; int8"),
    "factorize": ("bench_factorize.py", "Factorizing dense models: digits MLP, MiniLM, ASVD vs SVD"),
    "layerwise": (
        "bench_layerwise.py",
        "Layer-wise training: peak memory against one stage and the whole model",
    ),
    "pipeline": (
        "bench_pipeline.py",
        "Stages on a Ray pipeline: planner vs measured, heterogeneous devices, a killed actor",
    ),
    "finetune": (
        "bench_finetune.py",
        "Fine-tuning MiniLM on Rotten Tomatoes: Hessian-free + L2 vs AdamW vs baselines",
    ),
    "transformer": (
        "bench_transformer.py",
        "MiniLM imported as a spec: 3 stages vs fused vs torch, int8, streaming",
    ),
    "coldstart": (
        "bench_coldstart.py",
        "On the device: time to the first output (digits, MiniLM) vs one onnxruntime session; runtime venv size",
    ),
    "generate": (
        "bench_generate.py",
        "Byte-level causal LM: generation with the key/value cache vs recomputing the prefix, greedy parity",
    ),
}
DURATIONS = ROOT / "docs" / "benchmarks" / "durations.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets, for checking the scripts run")
    parser.add_argument(
        "--only", default=",".join(BENCHES), help="comma-separated subset of " + ", ".join(BENCHES)
    )
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark {unknown}; known: {list(BENCHES)}")

    failed: list[str] = []
    durations: dict[str, float] = {}
    for name in chosen:
        script, _ = BENCHES[name]
        cmd = [sys.executable, str(ROOT / "benchmarks" / script)]
        if args.quick:
            QUICK_DIR.mkdir(parents=True, exist_ok=True)
            out = QUICK_DIR if name == "optim" else QUICK_DIR / f"{name}.md"  # optim takes a directory
            cmd += ["--quick", "--out", str(out)]
        print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            failed.append(name)
        else:
            durations[name] = time.perf_counter() - start
        print(f"=== {name}: {time.perf_counter() - start:.0f} s", flush=True)

    record = QUICK_DIR / "durations.json" if args.quick else DURATIONS
    known = json.loads(record.read_text()) if record.exists() else {}
    known.update(
        {k: {"seconds": round(v), "load_avg_1min_at_end": os.getloadavg()[0]} for k, v in durations.items()}
    )
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(known, indent=2) + "\n")
    if args.quick:
        total = sum(v["seconds"] for v in known.values())
        print(
            f"quick reports written under {QUICK_DIR}; durations in {record} ({total} s in all)", flush=True
        )
        return 1 if failed else 0
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python benchmarks/run_all.py`). Each report says the machine,",
        "the settings and the command that reproduces it.",
        "",
    ]
    for name, (_, title) in BENCHES.items():
        report = ROOT / "docs" / "benchmarks" / f"{name}.md"
        status = "" if report.exists() else " (not run yet)"
        took = f" — last full run {known[name]['seconds']} s" if name in known else ""
        lines.append(f"- [{title}](benchmarks/{name}.md){status}{took}")
    if known:
        timed = [k for k in BENCHES if k in known]
        total = sum(known[k]["seconds"] for k in timed)
        lines += [
            "",
            f"Last full runs of {', '.join(timed)}, one after another: {total} s (benchmarks/durations.json).",
        ]
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(lines) + "\n")
    if failed:
        print(f"benchmarks that failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
