"""Run every benchmark side by side and write docs/benchmarks.md (the index of their reports).

Each benchmark script measures its own comparison in one process and writes
docs/benchmarks/<name>.md (and plots); this driver runs them one after another so they do not
compete for the CPU, and collects their reports into one page.

Usage: python benchmarks/run_all.py [--quick] [--only optim,runtime,factorize]

``--quick`` (tiny budgets, to check that the scripts run) writes its reports under
runs/bench-quick/, so the recorded figures in docs/ are only ever replaced by full runs.
"""

from __future__ import annotations

import argparse
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
}


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
        print(f"=== {name}: {time.perf_counter() - start:.0f} s", flush=True)

    if args.quick:
        print(f"quick reports written under {QUICK_DIR}", flush=True)
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
        lines.append(f"- [{title}](benchmarks/{name}.md){status}")
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(lines) + "\n")
    if failed:
        print(f"benchmarks that failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
