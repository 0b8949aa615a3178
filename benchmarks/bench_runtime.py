"""Runtime benchmark: staged vs fused onnxruntime vs torch eager, int8 vs fp32, streaming memory.

Measured side by side in one run and written to docs/benchmarks/runtime.md (+ runtime.json):

1. graphs/default.yaml (digits MLP): latency p50/p90/p99 and throughput at batch 1 and 256 for the
   staged export, the fused export (fp32 and int8) and torch eager, calls interleaved round by
   round so that load on a shared machine hits every configuration alike. One intra-op thread
   everywhere (onnxruntime and torch.set_num_threads(1)): the edge-device setting for batch-1 latency.
2. int8 vs fp32: test accuracy on digits and file sizes. The model is runs/default when `make train`
   made one, else trained here for a few seconds with plain torch Adam on the built default graph.
3. Streaming memory: a wide MLP (3 stages of 8 dense layers) run in fresh subprocesses, resident and
   streaming; peak RSS (VmHWM) above the process's baseline after onnxruntime's environment is up,
   against the largest stage file plus the activations crossing the cut.

Usage: python benchmarks/bench_runtime.py [--quick] [--out docs/benchmarks/runtime.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------------
def rss_worker(export_dir: str, mode: str, batch: int) -> None:
    """Subprocess body: print peak RSS figures of one run as JSON (numpy + onnxruntime only)."""
    import onnxruntime as ort
    from bench_tiny_model import tiny_model  # type: ignore[import-not-found]

    from toolkit.runtime import Executor, SessionConfig
    from toolkit.runtime.bench import current_rss, peak_rss, reset_peak_rss
    from toolkit.runtime.manifest import read_manifest

    man = read_manifest(export_dir)
    width = int(man.inputs[0].shape[1] or 0)
    x = np.random.default_rng(0).standard_normal((batch, width)).astype(np.float32)
    before_env = current_rss()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    warm = ort.InferenceSession(
        tiny_model(), so, providers=["CPUExecutionProvider"]
    )  # environment + CPU EP up
    warm.run(None, {"a": np.zeros(1, np.float32)})
    base = current_rss()
    reset_peak_rss()
    largest = max(s.files["fp32"].total_bytes for s in man.stages)  # graph + external-data file
    acts = max(
        sum(int(np.prod([batch if d is None else d for d in t.shape])) * 4 for t in (*s.inputs, *s.outputs))
        for s in man.stages
    )
    budget = None if mode == "resident" else largest + acts
    t0 = time.perf_counter()
    ex = Executor(
        export_dir, providers="cpu", memory_budget=budget, session_options=SessionConfig(intra_op_threads=1)
    )
    ex.run({"x": x})
    elapsed = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "mode": ex.mode,
                "batch": batch,
                "ort_env_bytes": base - before_env,
                "peak_bytes": peak_rss() - base,
                "largest_stage_bytes": largest,
                "activation_bytes": acts,
                "total_stage_bytes": sum(s.files["fp32"].total_bytes for s in man.stages),
                "seconds": elapsed,
            }
        )
    )


# ---------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    cpu = ""
    flags: set[str] = set()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "vnni": sorted(f for f in flags if "vnni" in f) or "none",
        "avx512": any(f.startswith("avx512") for f in flags),
        "load_avg_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def trained_default(quick: bool) -> tuple[Any, Any, str]:
    """runs/default if trained, else a quick plain-Adam training of the built default graph."""
    import torch

    from toolkit.builder import build_model
    from toolkit.data import load_data
    from toolkit.spec import load_spec

    run = ROOT / "runs" / "default"
    if (run / "checkpoints").exists():
        try:
            from toolkit.checkpoint import load_model

            model, spec, _ = load_model(run)
            return model, load_data(spec.train.data, spec.inputs), f"runs/default ({run})"
        except Exception as exc:  # a half-written run: fall back to training here
            print(f"runs/default not usable ({exc}); training with Adam instead", flush=True)
    spec = load_spec(ROOT / "graphs" / "default.yaml")
    splits = load_data(spec.train.data, spec.inputs)
    model = build_model(spec, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.from_numpy(splits.train.inputs["x"])
    y = torch.from_numpy(splits.train.targets).long()
    gen = torch.Generator().manual_seed(0)
    epochs = 5 if quick else 60
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(128):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    model.eval()
    return (
        model,
        splits,
        f"graphs/default.yaml trained here: plain torch Adam (lr 3e-3, batch 128, {epochs} epochs)",
    )


def interleaved(
    fns: dict[str, Callable[[], object]],
    batch: int,
    seconds: float,
    calls: int = 20,
    warmup: int = 5,
    min_rounds: int = 5,
) -> dict[str, dict[str, float]]:
    """Time every function in alternating rounds of ``calls`` calls each (after ``warmup`` calls,
    for at least ``min_rounds`` rounds); per-call latency percentiles per function. Many calls per
    round measure steady state (the model's weights and buffers in cache, as on a device that runs
    one model); few calls, a cache shared with other work."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        for _ in range(warmup):
            fn()
    deadline = time.perf_counter() + seconds * len(fns)
    while time.perf_counter() < deadline or min(len(v) for v in times.values()) < min_rounds * calls:
        for name, fn in fns.items():
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    out = {}
    for name, ts in times.items():
        a = np.sort(np.asarray(ts)) * 1e3
        p50 = float(np.percentile(a, 50))
        out[name] = {
            "p50_ms": p50,
            "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)),
            "throughput": batch / (p50 / 1e3),
            "calls": len(a),
        }
    return out


FLOOR = "onnxruntime call floor"


def call_floor(x: np.ndarray, cfg: Any) -> Callable[[], object]:
    """One onnxruntime call that does no work: an Identity graph on ``x``'s shape, IO-bound to
    buffers allocated once (what the executor does per stage). Its latency is the least one more
    stage can cost, whatever the executor does around it."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "floor",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", x.shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", x.shape[1]])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    sess = ort.InferenceSession(model.SerializeToString(), cfg.to_ort(), providers=["CPUExecutionProvider"])
    binding = sess.io_binding()
    binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x)))
    binding.bind_ortvalue_output("y", ort.OrtValue.ortvalue_from_shape_and_type(x.shape, np.float32, "cpu"))
    return partial(sess.run_with_iobinding, binding)


def optimized_kernels(path: Path, cfg: Any) -> list[str]:
    """The operators onnxruntime runs for an ONNX file: its graph after the session's optimizations
    (dumped with ``optimized_model_filepath``), as ``domain:op`` names in execution order."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = cfg.to_ort()
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        graph = onnx.load(so.optimized_model_filepath, load_external_data=False).graph  # op names only
    return [f"{n.domain + ':' if n.domain else ''}{n.op_type}" for n in graph.node]


def compare_kernels(export_dir: Path, manifest: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """Do the stage files, optimized, run the same operators as the fused file? If so, any latency
    gap between staged and fused is the cost of the extra calls, not a fusion lost at a cut."""
    stages = [optimized_kernels(export_dir / s["files"]["fp32"]["file"], cfg) for s in manifest["stages"]]
    fused = optimized_kernels(export_dir / manifest["fused"]["files"]["fp32"]["file"], cfg)
    return {"fused": fused, "stages": stages, "identical": fused == [k for st in stages for k in st]}


def wide_spec(width: int, layers: int, stages: int) -> Any:
    from toolkit.spec import parse_spec

    nodes: list[dict[str, Any]] = []
    parts: list[list[str]] = []
    prev = "x"
    for s in range(stages):
        ids = []
        for j in range(layers):
            nodes.append({"id": f"fc{s}_{j}", "op": "linear", "in": prev, "out": width, "factorize": "none"})
            nodes.append({"id": f"act{s}_{j}", "op": "tanh", "in": f"fc{s}_{j}"})
            prev = f"act{s}_{j}"
            ids += [f"fc{s}_{j}", prev]
        parts.append(ids)
    return parse_spec(
        {
            "name": f"wide-mlp-{width}",
            "inputs": {"x": {"shape": [width]}},
            "nodes": nodes,
            "outputs": [prev],
            "stages": parts,
            "train": {"data": {"builtin": "digits"}, "loss": "sum_squared"},
        },
        source="<bench_runtime wide MLP>",
    )


# ---------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small budgets, to check the script runs")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "runtime.md"))
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the existing .json")
    parser.add_argument("--rss-worker", nargs=3, metavar=("DIR", "MODE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_worker:
        rss_worker(args.rss_worker[0], args.rss_worker[1], int(args.rss_worker[2]))
        return 0
    if args.report_only:
        data = json.loads(Path(args.out).with_suffix(".json").read_text())
        Path(args.out).write_text(report(data, quick=False))
        return 0

    import torch

    from toolkit.builder import build_model
    from toolkit.export import export_model
    from toolkit.runtime import Executor, SessionConfig

    torch.set_num_threads(1)
    info = machine()
    seconds = 0.3 if args.quick else 2.0
    work = Path(tempfile.mkdtemp(prefix="rlhf-bench-runtime-"))
    print(f"work dir {work}", flush=True)
    results: dict[str, Any] = {"machine": info, "threads": 1}

    # 1 + 2: default graph, trained ----------------------------------------------------------
    model, splits, origin = trained_default(args.quick)
    results["model"] = origin
    test, val = splits.test, splits.val
    t0 = time.perf_counter()
    manifest = export_model(
        model,
        work / "default",
        sample=val.inputs,
        targets=val.targets,
        calibration={k: v[:1024] for k, v in splits.train.inputs.items()},
        quantize="int8",
    )
    results["export_seconds"] = time.perf_counter() - t0
    cfg = SessionConfig(intra_op_threads=1, inter_op_threads=1)
    runners = {
        "staged fp32": Executor(work / "default", providers="cpu", session_options=cfg),
        "fused fp32": Executor(work / "default", providers="cpu", session_options=cfg, fused=True),
        "staged int8": Executor(work / "default", providers="cpu", session_options=cfg, variant="int8"),
        "fused int8": Executor(
            work / "default", providers="cpu", session_options=cfg, variant="int8", fused=True
        ),
    }
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(test.inputs["x"])).numpy()
    acc = {"torch eager fp32": float(np.mean(torch_logits.argmax(1) == test.targets))}
    for name, ex in runners.items():
        acc[name] = float(np.mean(ex.run(test.inputs)["head"].argmax(1) == test.targets))
    sizes = {  # each stage file with its external-data file
        v: sum(
            s["files"][v]["bytes"] + s["files"][v].get("data", {}).get("bytes", 0) for s in manifest["stages"]
        )
        for v in ("fp32", "int8")
    }
    results["accuracy"] = {"test_samples": len(test), **acc}
    results["sizes"] = {**sizes, "ratio": sizes["int8"] / sizes["fp32"]}
    results["quantization"] = manifest["quantization"]

    latency: dict[str, Any] = {}
    for batch in (1, 256):
        reps = -(-batch // len(test))
        feed = {"x": np.ascontiguousarray(np.concatenate([test.inputs["x"]] * reps)[:batch])}
        xt = torch.from_numpy(feed["x"])

        def eager(xt: torch.Tensor = xt) -> object:
            with torch.inference_mode():
                return model(xt)

        fns: dict[str, Callable[[], object]] = {n: partial(ex.run, feed) for n, ex in runners.items()}
        fns["torch eager"] = eager
        fns[FLOOR] = call_floor(feed["x"], cfg)
        latency[str(batch)] = interleaved(fns, batch, seconds)
        row = latency[str(batch)]
        print(f"batch {batch}: " + ", ".join(f"{k} {v['p50_ms']:.4f} ms" for k, v in row.items()), flush=True)
        switching = {k: fns[k] for k in ("staged fp32", "fused fp32", "torch eager")}
        latency[f"{batch}, switching"] = interleaved(switching, batch, seconds, calls=2)
    results["latency"] = latency
    results["kernels"] = compare_kernels(work / "default", manifest, cfg)

    # the same comparison on a mid-size model (1.6M parameters), where a forward is long next to a call
    mid = build_model(wide_spec(512, 2, 3), seed=0).eval()
    xm = np.random.default_rng(1).standard_normal((256, 512)).astype(np.float32)
    export_model(mid, work / "mid", sample={"x": xm[:16]})
    results["mid_model"] = {"parameters": int(sum(p.numel() for p in mid.parameters())), "stages": 3}
    del mid
    mid_runners = {
        "staged fp32": Executor(work / "mid", providers="cpu", session_options=cfg),
        "fused fp32": Executor(work / "mid", providers="cpu", session_options=cfg, fused=True),
    }
    results["mid_latency"] = {}
    for batch in (1, 256):
        feed = {"x": np.ascontiguousarray(xm[:batch])}
        fns = {n: partial(ex.run, feed) for n, ex in mid_runners.items()}
        fns[FLOOR] = call_floor(feed["x"], cfg)
        results["mid_latency"][str(batch)] = interleaved(fns, batch, seconds)
        row = results["mid_latency"][str(batch)]
        print(
            f"mid batch {batch}: " + ", ".join(f"{k} {v['p50_ms']:.4f} ms" for k, v in row.items()),
            flush=True,
        )
    del mid_runners

    # 3: streaming memory on a wide model ------------------------------------------------------
    width, layers, n_stages = (256, 4, 3) if args.quick else (1280, 8, 3)
    wide = build_model(wide_spec(width, layers, n_stages), seed=0).eval()
    xs = np.random.default_rng(0).standard_normal((16, width)).astype(np.float32)
    t0 = time.perf_counter()
    export_model(wide, work / "wide", sample={"x": xs})
    results["wide_export_seconds"] = time.perf_counter() - t0
    del wide
    tiny = work / "bench_tiny_model.py"
    tiny.write_text(
        "import onnx\nfrom onnx import TensorProto, helper\n\n\ndef tiny_model():\n"
        "    g = helper.make_graph([helper.make_node('Relu', ['a'], ['b'])], 't',\n"
        "        [helper.make_tensor_value_info('a', TensorProto.FLOAT, [1])],\n"
        "        [helper.make_tensor_value_info('b', TensorProto.FLOAT, [1])])\n"
        "    return helper.make_model(g, opset_imports=[helper.make_opsetid('', 18)]).SerializeToString()\n"
    )
    memory = []
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(work), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    for mode in ("resident", "streaming"):
        for batch in (64,):
            out = subprocess.run(
                [sys.executable, __file__, "--rss-worker", str(work / "wide"), mode, str(batch)],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            memory.append(json.loads(out.stdout.strip().splitlines()[-1]))
    results["memory"] = {
        "model": f"{n_stages} stages x {layers} dense {width}x{width} layers + tanh",
        "runs": memory,
    }

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2))
    Path(args.out).write_text(report(results, quick=args.quick))
    print(f"wrote {args.out}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def report(r: dict[str, Any], quick: bool) -> str:
    m = r["machine"]
    lines = [
        "# Runtime benchmark: staged vs fused onnxruntime vs torch eager, int8, streaming memory",
        "",
        "Reproduce: `python benchmarks/bench_runtime.py` (or `make bench`); raw figures in `runtime.json`."
        + (" **Quick run (--quick): tiny budgets, figures not meaningful.**" if quick else ""),
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, VNNI: {m['vnni']}, AVX-512: {m['avx512']}; "
        f"load average at start {m['load_avg_at_start']}; onnxruntime {m['onnxruntime']}, torch {m['torch']}, "
        f"Python {m['python']}. Threads: 1 intra-op (and 1 inter-op) thread in onnxruntime, "
        "torch.set_num_threads(1): the setting for batch-1 latency on a small device.",
        "",
        f"Model: {r['model']}.",
        "",
        "## Latency (graphs/default.yaml, digits MLP)",
        "",
        "Calls interleaved round by round, 20 calls per configuration per round: steady state, the "
        "model's weights and buffers in cache as on a device that runs one model. Rows '1, switching' and "
        "'256, switching' alternate staged, fused and torch eager every 2 calls, so each configuration "
        "finds the cache holding the others' data (the targets are read from the steady-state rows).",
        "",
        "| batch | configuration | p50 ms | p90 ms | p99 ms | samples/s |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for batch, rows in r["latency"].items():
        for name, v in rows.items():
            lines.append(
                f"| {batch} | {name} | {v['p50_ms']:.4f} | {v['p90_ms']:.4f} | {v['p99_ms']:.4f} | {v['throughput']:.0f} |"
            )
    lines += ["", "Targets:", ""]
    for batch, rows in r["latency"].items():
        if "switching" in batch:
            ratio = rows["staged fp32"]["p50_ms"] / rows["fused fp32"]["p50_ms"]
            lines.append(f"- batch {batch}: staged / fused p50 = {ratio:.3f} (for information)")
            continue
        ratio = rows["staged fp32"]["p50_ms"] / rows["fused fp32"]["p50_ms"]
        extra_us = 1e3 * (rows["staged fp32"]["p50_ms"] - rows["fused fp32"]["p50_ms"])
        ok = "met" if ratio <= 1.05 else "NOT met"
        lines.append(
            f"- batch {batch}: staged / fused p50 = {ratio:.3f} ({extra_us:+.1f} µs) — target ≤ 1.05: **{ok}**"
        )
    n_extra = max(1, len(r["quantization"]["stages"]) - 1)
    b1 = r["latency"]["1"]
    gap1 = 1e3 * (b1["staged fp32"]["p50_ms"] - b1["fused fp32"]["p50_ms"])
    if FLOOR in b1:
        floor = 1e3 * b1[FLOOR]["p50_ms"]
        bound = (b1["fused fp32"]["p50_ms"] * 1e3 + n_extra * floor) / (b1["fused fp32"]["p50_ms"] * 1e3)
        lines.append(
            f"- batch 1: staging costs {gap1 / n_extra:.1f} µs per extra stage; one onnxruntime call that does "
            f"nothing ('{FLOOR}', an IO-bound Identity graph) takes {floor:.1f} µs. So on this 19k-parameter "
            f"model no staged executor built on onnxruntime calls can get under staged / fused = {bound:.2f}; "
            f"5% needs a fused forward of at least {20 * n_extra * floor / 1e3:.2f} ms (the floor × 20)."
        )
    kern = r.get("kernels")
    if kern:
        same = "the same" if kern["identical"] else "NOT the same"
        lines.append(
            f"- After onnxruntime's graph optimization the stage files run {same} operators as the fused "
            f"file (fused: {', '.join(kern['fused'])}; stages: "
            + " | ".join(", ".join(st) for st in kern["stages"])
            + "), so the gap is the cost of the extra calls"
            + (
                ", not a fusion lost at a cut."
                if kern["identical"]
                else "; the cut also changes the kernels."
            )
        )
    if "mid_latency" in r:
        mm = r["mid_model"]
        for batch, rows in r["mid_latency"].items():
            ratio = rows["staged fp32"]["p50_ms"] / rows["fused fp32"]["p50_ms"]
            extra_us = 1e3 * (rows["staged fp32"]["p50_ms"] - rows["fused fp32"]["p50_ms"])
            lines.append(
                f"- mid-size model ({mm['parameters']:,} parameters, 512-wide tanh MLP, {mm['stages']} stages), "
                f"batch {batch}: staged {rows['staged fp32']['p50_ms']:.4f} ms / fused "
                f"{rows['fused fp32']['p50_ms']:.4f} ms = {ratio:.3f} ({extra_us:+.1f} µs; call floor "
                f"{1e3 * rows[FLOOR]['p50_ms']:.1f} µs)"
                f" — {'within' if ratio <= 1.05 else 'NOT within'} 5%"
            )
    speed = b1["torch eager"]["p50_ms"] / b1["staged fp32"]["p50_ms"]
    speed_f = b1["torch eager"]["p50_ms"] / b1["fused fp32"]["p50_ms"]
    lines.append(
        f"- batch 1: torch eager / onnxruntime p50 = {speed:.2f}x (staged), {speed_f:.2f}x (fused) — target ≥ 2x: "
        f"**{'met' if speed >= 2 else 'NOT met'}**"
    )
    acc, sz = r["accuracy"], r["sizes"]
    drop = 100 * (acc["staged fp32"] - acc["staged int8"])
    q = r["quantization"]
    lines += [
        "",
        "## int8 vs fp32 (digits test split)",
        "",
        f"Test samples: {acc['test_samples']}. Settings chosen on the validation split among "
        f"{len(q['candidates'])} candidates; calibration on 1024 training samples. Chosen: `{q['chosen']['label']}`.",
        "",
        "| configuration | test accuracy |",
        "|---|---:|",
        *[f"| {k} | {100 * v:.2f}% |" for k, v in acc.items() if k != "test_samples"],
        "",
        f"- accuracy change int8 vs fp32 (staged): {-drop:+.2f} points — target within 0.5: "
        f"**{'met' if abs(drop) <= 0.5 else 'NOT met'}**",
        f"- stage files: fp32 {sz['fp32']} bytes, int8 {sz['int8']} bytes, ratio {sz['ratio']:.3f} — target ≤ 0.30: "
        f"**{'met' if sz['ratio'] <= 0.30 else 'NOT met'}** (int8 weights are 25% of fp32 ones; biases are "
        "stored as float16 and cast to float32 at load; each file keeps its graph structure, a few percent "
        "of the file on a 19k-parameter model)",
        "",
        "Every candidate (validation split; accuracy = against labels):",
        "",
        "| setting | val accuracy | max abs vs fp32 | bytes |",
        "|---|---:|---:|---:|",
    ]
    for c in q["candidates"]:
        if "error" in c:
            lines.append(f"| {c['label']} | failed: {c['error'][:60]} | | |")
        else:
            lines.append(
                f"| {c['label']} | {100 * c.get('accuracy', float('nan')):.2f}% | {c['max_abs_vs_fp32']:.4f} | {c['bytes']} |"
            )
    lines += ["", "Per stage (only that stage int8, the others fp32; validation split):", ""]
    lines += [
        "| stage | accuracy change (points) | max abs vs fp32 | bytes fp32 → int8 |",
        "|---:|---:|---:|---|",
    ]
    for s in q["stages"]:
        lines.append(
            f"| {s['index']} | {100 * s.get('accuracy_change', float('nan')):+.2f} | {s['max_abs_vs_fp32']:.4f} | "
            f"{s['bytes_fp32']} → {s['bytes_int8']} |"
        )
    mem = r["memory"]
    lines += [
        "",
        "## Streaming under a memory budget",
        "",
        f"Model: {mem['model']}, each run in a fresh subprocess; peak RSS = VmHWM above the RSS once "
        "python, numpy and onnxruntime are loaded and onnxruntime's environment is up (a tiny warm-up session; "
        "its cost is the 'ORT env' column). Budget for streaming = largest stage + activations.",
        "",
        "| mode | batch | largest stage MiB | activations MiB | all stages MiB | peak RSS MiB | peak / (largest + act.) | ORT env MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    mib = 2**20
    for run in mem["runs"]:
        ref = run["largest_stage_bytes"] + run["activation_bytes"]
        lines.append(
            f"| {run['mode']} | {run['batch']} | {run['largest_stage_bytes'] / mib:.1f} | {run['activation_bytes'] / mib:.2f} | "
            f"{run['total_stage_bytes'] / mib:.1f} | {run['peak_bytes'] / mib:.1f} | {run['peak_bytes'] / ref:.2f} | "
            f"{run['ort_env_bytes'] / mib:.1f} |"
        )
    stream = next(x for x in mem["runs"] if x["mode"] == "streaming")
    ratio = stream["peak_bytes"] / (stream["largest_stage_bytes"] + stream["activation_bytes"])
    lines += [
        "",
        f"- streaming peak / (largest stage + activations) = {ratio:.2f} — target ≤ 1.20: "
        f"**{'met' if ratio <= 1.2 else 'NOT met'}**",
        "",
        "Notes: in streaming mode the executor loads each file by path after checking its sha256 (a stage file "
        "of 1 MiB or more keeps its weights in a `.data` file that onnxruntime memory-maps); in resident mode "
        "it hands onnxruntime the bytes it hashed (Executor(load_from=...)), which costs more memory while a "
        "session is created; onnxruntime's weight pre-packing is on in both modes (SessionConfig(prepacking=False) "
        "turns it off), so their outputs are bit-identical.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
