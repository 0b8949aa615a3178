"""Generation from the byte-level causal LM (graphs/charlm.yaml): key/value cache vs recomputing the prefix.

Measured side by side in one run and written to docs/benchmarks/generate.md (+ generate.json):

- tokens/s of greedy generation of 256 tokens with onnxruntime at 2 intra-op threads, (a) with the
  key/value cache (toolkit.runtime.generate: the prompt once, then one token per step through the
  ``stage_NN.kv.onnx`` files) and (b) recomputing the whole window every step through the ordinary
  stage files (the Executor); rounds interleaved, the best round of each kept; target >= 5x;
- greedy parity: the 256 tokens of (a), of (b) and of torch's greedy loop (float64, no cache, same
  window rule) must be identical;
- the trained model's validation and test loss in bits per byte against the unigram baseline
  (byte frequencies of the training topics);
- a greedy and a sampled continuation.

The model: ``--run RUN_DIR`` (a `rlhf train graphs/charlm.yaml` run), else the script trains
graphs/charlm.yaml for ``--steps`` steps into runs/bench-generate first.

Usage: python benchmarks/bench_generate.py [--quick] [--run RUN_DIR] [--out docs/benchmarks/generate.md]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from toolkit.checkpoint import load_model  # noqa: E402
from toolkit.data import pydoc_text as pd  # noqa: E402
from toolkit.data.splits import load_data  # noqa: E402
from toolkit.export import export_model  # noqa: E402
from toolkit.export.kv_cache import reference_greedy  # noqa: E402
from toolkit.fsio import atomic_write_bytes  # noqa: E402
from toolkit.runtime import Executor, SessionConfig  # noqa: E402
from toolkit.runtime.generate import Generator  # noqa: E402

PROMPT = "The import statement"
THREADS = 2


def recompute_greedy(ex: Executor, prompt: list[int], n: int, context: int) -> list[int]:
    """Greedy generation without a cache: every step runs the whole window through the stages."""
    tokens = list(prompt)
    start = 0
    new = []
    for _ in range(n):
        if len(tokens) - start > context:
            start = len(tokens) - context // 2
        logits = ex.run({"tokens": np.asarray([tokens[start:]], dtype=np.int64)})["head"]
        nxt = int(np.argmax(logits[0, -1]))
        tokens.append(nxt)
        new.append(nxt)
    return new


def bits_per_byte(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 64) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            z = model(torch.from_numpy(x[i : i + batch]))
            t = torch.from_numpy(y[i : i + batch])
            total += float(
                torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), t.reshape(-1), reduction="sum")
            )
            count += t.numel()
    return total / count / math.log(2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few tokens and rounds (checks the script runs)")
    parser.add_argument("--run", type=Path, default=None, help="a trained charlm run directory or checkpoint")
    parser.add_argument("--steps", type=int, default=300, help="training steps when no --run is given")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "generate.md")
    args = parser.parse_args()
    n_tokens, rounds = (32, 1) if args.quick else (args.tokens, args.rounds)
    torch.set_num_threads(THREADS)
    load_start = os.getloadavg()[0]

    run = args.run
    train_info: dict[str, object] = {"run": str(run) if run else None}
    if run is None:
        from toolkit.spec import load_spec
        from toolkit.train import train

        run = ROOT / "runs" / ("bench-generate-quick" if args.quick else "bench-generate")
        t0 = time.perf_counter()
        res = train(
            load_spec(ROOT / "graphs" / "charlm.yaml"),
            run,
            overwrite=True,
            max_steps=5 if args.quick else args.steps,
        )
        train_info = {"run": str(run), "steps": res.steps, "seconds": time.perf_counter() - t0}
    summary = Path(run) / "summary.json"
    if args.run is not None and summary.is_file():  # what the given run recorded about its training
        done = json.loads(summary.read_text())
        train_info.update({k: done.get(k) for k in ("steps", "seconds", "best_val_loss", "status")})
    model, spec, meta = load_model(run)
    model = model.float().eval()
    context = spec.inputs["tokens"].shape[0]
    data = load_data(spec.train.data, spec.inputs)
    base = pd.unigram_bits_per_byte(data.train.targets, data.val.targets)
    base_test = pd.unigram_bits_per_byte(data.train.targets, data.test.targets)
    val_bpb = bits_per_byte(model, data.val.inputs["tokens"], data.val.targets)
    test_bpb = bits_per_byte(model, data.test.inputs["tokens"], data.test.targets)

    with tempfile.TemporaryDirectory() as tmp:
        exp = Path(tmp) / "export"
        export_model(model, exp, sample={"tokens": data.test.inputs["tokens"][:4]})
        manifest = json.loads((exp / "manifest.json").read_text())
        gen = Generator(exp, threads=THREADS)
        ex = Executor(exp, providers="cpu", session_options=SessionConfig(intra_op_threads=THREADS))
        prompt = list(PROMPT.encode())
        gen.generate(prompt, 8, greedy=True)  # warm-up
        recompute_greedy(ex, prompt, 8, context)
        cached_s, recompute_s = [], []
        cached_tokens: list[int] = []
        recompute_tokens: list[int] = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            out = gen.generate(prompt, n_tokens, greedy=True)
            cached_s.append(time.perf_counter() - t0)
            cached_tokens = out.tokens
            t0 = time.perf_counter()
            recompute_tokens = recompute_greedy(ex, prompt, n_tokens, context)
            recompute_s.append(time.perf_counter() - t0)
        torch_tokens = reference_greedy(model.double(), prompt, n_tokens, context)
        sampled = gen.generate("def ", 200 if not args.quick else 32, temperature=0.8, top_k=20, seed=0)
        greedy_text = out.text
        slides = out.slides
        kv_parity = manifest["causal_lm"]["parity"]

    cached_tps = n_tokens / min(cached_s)
    recompute_tps = n_tokens / min(recompute_s)
    report = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads": THREADS,
            "platform": platform.platform(),
            "load_avg_at_start": load_start,
            "load_avg_at_end": os.getloadavg()[0],
            "quick": args.quick,
        },
        "model": {
            "spec": spec.name,
            "context": context,
            "params": int(sum(p.numel() for p in model.parameters())),
            "train": train_info,
            "data": meta.get("data"),
        },
        "loss": {
            "val_bits_per_byte": val_bpb,
            "test_bits_per_byte": test_bpb,
            "unigram_val_bits_per_byte": base,
            "unigram_test_bits_per_byte": base_test,
        },
        "generation": {
            "prompt": PROMPT,
            "tokens": n_tokens,
            "rounds": rounds,
            "window_slides": slides,
            "cached_seconds": cached_s,
            "recompute_seconds": recompute_s,
            "cached_tokens_per_s": cached_tps,
            "recompute_tokens_per_s": recompute_tps,
            "speedup": cached_tps / recompute_tps,
            "target_speedup": 5.0,
        },
        "parity": {
            "cached_equals_recompute": cached_tokens == recompute_tokens,
            "cached_equals_torch": cached_tokens == torch_tokens,
            "first_difference_torch": next(
                (i for i, (a, b) in enumerate(zip(cached_tokens, torch_tokens)) if a != b), None
            ),
            "export_cached_logits_vs_float64": kv_parity,
        },
        "samples": {
            "greedy": greedy_text,
            "sampled": sampled.text,
            "sampled_settings": "def , T 0.8, top-k 20, seed 0",
        },
    }
    g, lo, pa = report["generation"], report["loss"], report["parity"]
    md = [
        "# Generation with a key/value cache (byte-level causal LM)",
        "",
        f"`python benchmarks/bench_generate.py{' --quick' if args.quick else ''}` — {spec.name} ({report['model']['params']:,} "
        f"parameters, context {context}), onnxruntime CPU at {THREADS} threads, load average {load_start:.1f} at start, "
        f"{report['machine']['load_avg_at_end']:.1f} at end ({os.cpu_count()} cores).",
        "",
        f"| | tokens/s | seconds for {n_tokens} tokens (best of {rounds}) |",
        "|---|---|---|",
        f"| key/value cache (stage_NN.kv.onnx) | {cached_tps:.1f} | {min(cached_s):.3f} |",
        f"| recompute the window each step (stage_NN.onnx) | {recompute_tps:.1f} | {min(recompute_s):.3f} |",
        f"| **speedup** | **{g['speedup']:.1f}x** (target >= 5x: {'met' if g['speedup'] >= 5 else 'not met'}) | |",
        "",
        f"Greedy, prompt {PROMPT!r}, {n_tokens} new tokens, the window slid {slides} time(s) (context {context}: a full "
        f"window restarts from its last {context // 2} tokens).",
        "",
        "## Parity",
        "",
        f"- cached onnxruntime tokens = recompute onnxruntime tokens: **{pa['cached_equals_recompute']}**",
        f"- cached onnxruntime tokens = torch float64 greedy (no cache): **{pa['cached_equals_torch']}**",
        f"- export check, cached logits token by token vs float64 full sequence: max abs {kv_parity['max_abs']:.2e} "
        f"over {kv_parity['tokens']} tokens",
        "",
        "## Loss (bits per byte, lower is better)",
        "",
        "| split | model | unigram baseline |",
        "|---|---|---|",
        f"| validation topics | {lo['val_bits_per_byte']:.3f} | {lo['unigram_val_bits_per_byte']:.3f} |",
        f"| test topics | {lo['test_bits_per_byte']:.3f} | {lo['unigram_test_bits_per_byte']:.3f} |",
        "",
        f"Model: {train_info}.",
        "",
        "## Samples",
        "",
        f"Greedy after {PROMPT!r}:",
        "",
        "```",
        PROMPT + greedy_text,
        "```",
        "",
        "Sampled after 'def ' (temperature 0.8, top-k 20, seed 0):",
        "",
        "```",
        "def " + sampled.text,
        "```",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, "\n".join(md).encode())
    atomic_write_bytes(args.out.with_suffix(".json"), (json.dumps(report, indent=2) + "\n").encode())
    print("\n".join(md))
    ok = pa["cached_equals_recompute"] and pa["cached_equals_torch"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
