"""Transformer benchmark: MiniLM imported into a spec, exported in 3 stages, run by the executor.

Measured side by side in one run and written to docs/benchmarks/transformer.md (+ transformer.json):

1. Import (``rlhf import``) of all-MiniLM-L6-v2 and the difference of its hidden states and
   mean-pooled embeddings to transformers' on real sentences (the CPython reference manual).
2. Latency p50/p90 at batch 1 and 32 (sentences of the reference manual, padded to the batch's
   longest, at most 128 tokens): the 3-stage export through toolkit.runtime.Executor, the fused
   export, and (batch 1) torch eager on the spec model and on transformers' BertModel; calls interleaved round by round, 2 intra-op
   threads everywhere (onnxruntime and torch.set_num_threads(2)); also plain onnxruntime sessions with
   intra-op thread spinning off (3 sessions' spinning pools compete on 2 cores).
   "staged, export with fused ops" runs an export made with RLHF_EXPORT_FUSION=1 (onnxruntime's fused
   Attention / SkipLayerNormalization / BiasGelu written into the files, toolkit.export.fusion).
3. Per-stage int8 (setting chosen by the exporter on a validation split of 64 sentences, files at
   most 0.30 of fp32): every candidate's score there, the layer sensitivities, then on 128 held-out
   sentences the mean-pooled embedding cosine to fp32 (executor defaults, and with weight
   prepacking off), file sizes, and int8 vs fp32 latency (staged executor).
4. Streaming: peak RSS (VmHWM above the baseline once onnxruntime's environment is up) of the resident
   and the streaming executor, the latter also with weight prepacking off (budget = half the weights; the stages' weights are external data that
   onnxruntime memory-maps, so the embedding stage costs the rows a batch reads), each in a fresh
   subprocess, and whether the outputs are bit-identical.
5. Factorized imported MiniLM at half the linear weights, on the spec path, with bench_factorize's
   recipe for the Hugging Face model: ranks by measured sensitivity (budget 0.5), ASVD + one
   closed-form refit on 128 training sentences, then ``--distill-steps`` steps of the same ``distill``
   (AdamW, peak lr 5e-4, token-state MSE + pooled cosine, 32 augmented training sentences per step);
   mean-pooled embedding cosine to the dense model on the 300 held-out sentences. ``--hf-baseline``
   also runs the Hugging Face path with the same ranks and steps in the same run.

Usage: python benchmarks/bench_transformer.py [--quick] [--out docs/benchmarks/transformer.md]
       [--distill-steps N] [--hf-baseline] [--ranks-from docs/benchmarks/factorize.json]
       [--only factorize|int8|memory|runtime]  (re-measure section 5, 3, 4, or sections 1-4; the rest
       is kept from the last report's .json)
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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
THREADS = 2
MAX_TOKENS = 128


def sentences(n: int, start: int = 0) -> list[str]:
    """``n`` sentences of the Python reference manual from ``start`` (disjoint ranges per use)."""
    from toolkit.factorize.corpus import python_reference_sentences

    out = python_reference_sentences()[start : start + n]
    if len(out) != n:
        raise ValueError(f"expected {n} sentences from {start}, got {len(out)}")
    return out


def rss_worker(export_dir: str, mode: str, batch: int) -> None:
    """Subprocess body: peak RSS of one run (numpy + onnxruntime + tokenizers only), as JSON."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from toolkit.export.text import tokenize
    from toolkit.runtime import Executor, SessionConfig
    from toolkit.runtime.bench import current_rss, peak_rss, reset_peak_rss
    from toolkit.runtime.executor import weight_bytes
    from toolkit.runtime.manifest import read_manifest

    man = read_manifest(export_dir)
    meta = json.loads((Path(export_dir) / "manifest.json").read_text())["text"]
    meta = {**meta, "tokenizer_json": (Path(export_dir) / meta["tokenizer"]).read_text()}
    feeds = tokenize(meta, sentences(batch, 1100), MAX_TOKENS)
    g = helper.make_graph(
        [helper.make_node("Relu", ["a"], ["b"])],
        "t",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])],
    )
    tiny = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    ort.InferenceSession(tiny.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"a": np.zeros(1, np.float32)}
    )
    seq = next(iter(feeds.values())).shape[1]
    entries = [s.files["fp32"] for s in man.stages]
    largest = max(e.total_bytes for e in entries)
    total = sum(e.total_bytes for e in entries)
    acts = max(
        sum(
            int(np.prod([batch if i == 0 else seq if d is None else d for i, d in enumerate(t.shape)])) * 4
            for t in (*s.inputs, *s.outputs)
        )
        for s in man.stages
    )
    # the executor's rule at this run's tokens (streaming maps the data files; resident copies them whole)
    estimate = largest if mode == "resident" else max(weight_bytes(e, batch * int(seq)) for e in entries)
    budget = None if mode == "resident" else total // 2
    base = current_rss()
    reset_peak_rss()
    prepacking = mode != "streaming-no-prepacking"
    ex = Executor(
        export_dir,
        providers="cpu",
        memory_budget=budget,
        session_options=SessionConfig(intra_op_threads=1, prepacking=prepacking),
    )
    out = ex.run(feeds)["pool"]
    print(
        json.dumps(
            {
                "mode": ex.mode,
                "prepacking": prepacking,
                "batch": batch,
                "seq": int(seq),
                "peak_bytes": peak_rss() - base,
                "budget_bytes": budget,
                "largest_stage_bytes": largest,
                "largest_stage_estimate_bytes": estimate,
                "gathered_bytes": sum(e.gathered for e in entries),
                "largest_without_tables_bytes": max(e.total_bytes - e.gathered for e in entries),
                "activation_bytes": acts,
                "total_weight_bytes": total,
                "pool_sha": __import__("hashlib").sha256(out.tobytes()).hexdigest(),
            }
        )
    )


def memory_section(exp: Path) -> list[dict[str, Any]]:
    """Section 4: the resident and the streaming run (budget: half the weights), each in a fresh
    subprocess (``rss_worker``)."""
    runs = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for mode in ("resident", "streaming", "streaming-no-prepacking"):
        out = subprocess.run(
            [sys.executable, __file__, "--rss-worker", str(exp), mode, "8"],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        runs.append({**json.loads(out.stdout.strip().splitlines()[-1]), "load_avg": os.getloadavg()[0]})
    return runs


def interleaved(
    fns: dict[str, Callable[[], object]], batch: int, seconds: float, calls: int
) -> dict[str, Any]:
    """Per-call latency of each function, timed in alternating rounds of ``calls`` calls
    (bench_runtime's loop: 3 warm-up calls, at least 3 rounds)."""
    from bench_runtime import interleaved as timed  # benchmarks/ is the script's directory

    return dict(timed(fns, batch, seconds, calls, warmup=3, min_rounds=3))


def no_spin_sessions(
    exp: Path, manifest: dict[str, Any]
) -> tuple[Callable[[Any], object], Callable[[Any], object]]:
    """Plain onnxruntime sessions (the executor's options are not reachable from here) with
    ``session.intra_op.allow_spinning = 0``: each session owns an intra-op thread pool whose threads
    spin after a run; with 3 stage sessions on 2 cores the idle pools' spinning competes with the
    running stage. Returns (run the stages in a chain, run the fused file)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    stages = []
    for st in manifest["stages"]:
        sess = ort.InferenceSession(
            str(exp / st["files"]["fp32"]["file"]), so, providers=["CPUExecutionProvider"]
        )
        stages.append((sess, [i["name"] for i in st["inputs"]], [o["name"] for o in st["outputs"]]))
    fused = ort.InferenceSession(
        str(exp / manifest["fused"]["files"]["fp32"]["file"]), so, providers=["CPUExecutionProvider"]
    )

    def chain(feeds: Any) -> object:
        env = dict(feeds)
        for sess, ins, outs in stages:
            env.update(zip(outs, sess.run(outs, {n: env[n] for n in ins})))
        return env

    return chain, lambda feeds: fused.run(None, feeds)


def factorize_section(
    import_dir: Path, steps: int, hf_baseline: bool, ranks_from: str | None, quick: bool
) -> dict[str, Any]:
    """Section 5: the imported checkpoint factorized to half its linear weights and distilled (spec path)."""
    import copy

    import torch

    from toolkit.checkpoint import load_model
    from toolkit.factorize import RefitOptions, count_parameters, factorize_module
    from toolkit.factorize.corpus import python_reference_sentences, split_sentences
    from toolkit.factorize.hf import mean_cosine
    from toolkit.factorize.spec_model import node_pattern
    from toolkit.factorize.spec_text import SpecTokenizer, distill_spec, spec_distortion, spec_embed
    from toolkit.hf_import import _weight_map

    dense, spec, meta = load_model(import_dir)
    text = meta["text"]
    tok = SpecTokenizer(text)
    train, held = split_sentences(python_reference_sentences(), 100 if quick else 300)
    e_dense = spec_embed(dense, tok, held)
    names = list(dense.input_names)

    def tuples(sents: list[str]) -> list[tuple[torch.Tensor, ...]]:
        out = []
        for i in range(0, len(sents), 32):
            b = tok(sents[i : i + 32], max_length=64)
            out.append(tuple(b[n] for n in names))
        return out

    cal = tuples(train[: 64 if quick else 128])
    include = node_pattern(n.id for n in spec.nodes if n.group is not None)
    res: dict[str, Any] = {"held_out": len(held), "train_sentences": len(train), "steps": steps}
    t0 = time.perf_counter()
    if ranks_from:  # bench_factorize's ranks for the HF model, mapped onto the spec's node ids
        hf_ranks = json.loads(Path(ranks_from).read_text())["minilm"]["sensitivity_ranks"]
        wmap = _weight_map(len([n for n in spec.nodes if n.id.endswith("_q")]))
        module_of = {
            name.rsplit(".", 1)[-1]: name for name, _m in dense.named_modules() if name.count(".") == 2
        }
        ranks = {module_of[wmap[f"{hf_name}.weight"].split(".")[0]]: r for hf_name, r in hf_ranks.items()}
        res["ranks_source"] = f"{ranks_from} (bench_factorize's sensitivity ranks of the HF model)"
    else:
        from toolkit.factorize.sensitivity import sensitivity_ranks

        probe = train[: 32 if quick else 96]
        sens = sensitivity_ranks(
            dense, spec_distortion(dense, tok, probe), 0.5, include=include, calibration=cal
        )
        ranks = sens.ranks
        res["ranks_source"] = f"measured on the spec model (1 - cosine on {len(probe)} training sentences)"
    res["ranks_seconds"] = time.perf_counter() - t0

    def factorized(model: torch.nn.Module, calibration: Any, pattern: str | None, rk: dict[str, int]) -> Any:
        student = copy.deepcopy(model)
        rep = factorize_module(
            student,
            include=pattern,
            method="asvd",
            calibration=calibration,
            refit=True,
            refit_options=RefitOptions(alternations=1, steps=0),
            max_rows=4096,
            rank=rk,
        )
        return student, rep

    t0 = time.perf_counter()
    student, rep = factorized(dense, cal, include, ranks)
    res["factorize_seconds"] = time.perf_counter() - t0
    res["linear_dense_params"], res["linear_factor_params"] = rep.dense_params, rep.factor_params
    res["model_params"] = [count_parameters(dense), count_parameters(student)]
    res["cosine_after_factorize"] = mean_cosine(spec_embed(student, tok, held), e_dense)
    log = distill_spec(student, dense, text, train[128:], steps, lr=5e-4, batch_size=32, seed=0)
    res["distill_seconds"] = log.seconds
    res["cosine_after_distill"] = mean_cosine(spec_embed(student, tok, held), e_dense)
    if hf_baseline:  # the Hugging Face path, same ranks, same recipe, same steps
        from toolkit.factorize.hf import augmented_batches, batches, distill, embed, load_hf, minilm_dir

        hf_dense, hf_tok = load_hf(minilm_dir())
        wmap = _weight_map(len([n for n in spec.nodes if n.id.endswith("_q")]))
        by_node = {key.rsplit(".", 1)[-1]: r for key, r in ranks.items()}
        inverse = {
            hf_name[: -len(".weight")]: by_node[spec_name.split(".")[0]]
            for hf_name, spec_name in wmap.items()
            if hf_name.endswith(".weight") and spec_name.split(".")[0] in by_node
        }
        hf_student, _rep = factorized(
            hf_dense, batches(hf_tok, train[: 64 if quick else 128], 32), r"encoder\.layer\.", inverse
        )
        hf_e_dense = embed(hf_dense, hf_tok, held)
        res["hf_cosine_after_factorize"] = mean_cosine(embed(hf_student, hf_tok, held), hf_e_dense)
        hlog = distill(
            hf_student, hf_dense, augmented_batches(hf_tok, train[128:], 32, seed=0), steps=steps, lr=5e-4
        )
        res["hf_distill_seconds"] = hlog.seconds
        res["hf_cosine_after_distill"] = mean_cosine(embed(hf_student, hf_tok, held), hf_e_dense)
    ref = ROOT / "docs" / "benchmarks" / "factorize.json"
    if ref.is_file():
        m = json.loads(ref.read_text()).get("minilm", {})
        res["hf_reference"] = {
            k: m.get(k) for k in ("distill_steps", "cosine_after_distill", "cosine_after_factorize")
        }
    res["load_avg_at_end"] = os.getloadavg()[0]
    return res


def int8_section(
    exp: Path, manifest: dict[str, Any], text: dict[str, Any], cfg: Any, seconds: float, quick: bool
) -> dict[str, Any]:
    """Section 3: the exporter's int8 choice, its cosine on held-out sentences, sizes, latency."""
    from toolkit.export.text import tokenize
    from toolkit.runtime import Executor

    q = manifest["quantization"]
    evalf = tokenize(text, sentences(16 if quick else 128, 700), MAX_TOKENS)
    fp32 = Executor(exp, providers="cpu", session_options=cfg)
    int8 = Executor(exp, providers="cpu", session_options=cfg, variant="int8")
    a = fp32.run(evalf)["pool"].astype(np.float64)
    cosines = {}
    for name, c in (("executor", cfg), ("prepacking off", replace(cfg, prepacking=False))):
        b = (
            Executor(exp, providers="cpu", session_options=c, variant="int8")
            .run(evalf)["pool"]
            .astype(np.float64)
        )
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        cosines[name] = {"min": float(cos.min()), "mean": float(cos.mean())}
    lat = {}
    for batch in (1, 32):
        f = tokenize(text, sentences(batch, 600), MAX_TOKENS)
        fns: dict[str, Callable[[], object]] = {
            "fp32 staged": lambda f=f: fp32.run(f),
            "int8 staged": lambda f=f: int8.run(f),
        }
        lat[str(batch)] = interleaved(fns, batch, seconds, 5 if batch == 32 else 20)
    return {
        "setting": q["chosen"]["label"],
        "weight_only_layers": len(q["chosen"].get("weight_only_layers", [])),
        "int8_compute": q.get("int8_compute"),
        "chosen_on": q["chosen_on"],
        "selection_sentences": 16 if quick else 64,
        "candidates": [
            {
                k: c.get(k)
                for k in ("label", "probe", "cosine_min", "cosine_mean", "bytes", "int8_compute", "error")
            }
            for c in q["candidates"]
        ],
        "sensitivity": q.get("sensitivity", []),
        "sentences": len(a),
        "cosine_min": cosines["executor"]["min"],
        "cosine_mean": cosines["executor"]["mean"],
        "cosine_no_prepacking": cosines["prepacking off"],
        "size_ratio": q["end_to_end"]["size_ratio"],
        "size_limit": q.get("size_limit"),
        "stage_bytes": [
            tuple(  # each stage file with its external-data file
                s["files"][v]["bytes"] + s["files"][v].get("data", {}).get("bytes", 0)
                for v in ("fp32", "int8")
            )
            for s in manifest["stages"]
        ],
        "latency": lat,
    }


def int8_report(q: dict[str, Any]) -> list[str]:
    """Section 3 of the report."""
    mib = 2**20
    fp32_total = sum(f for f, _ in q["stage_bytes"])
    lines = [
        "## Per-stage int8",
        "",
        f"Setting chosen by the exporter on {q.get('selection_sentences', '?')} validation sentences ({q.get('chosen_on')}): "
        f"{q['setting']} ({q.get('weight_only_layers', 0)} of the MatMul layers weight-only; "
        f"{100 * (q.get('int8_compute') or 0):.0f}% of the MatMul weights in dynamic int8 kernels). "
        f"Sentence-embedding cosine to fp32 over {q['sentences']} held-out sentences: min {q['cosine_min']:.4f}, "
        f"mean {q['cosine_mean']:.4f} (executor defaults)",
    ]
    if "cosine_no_prepacking" in q:
        p = q["cosine_no_prepacking"]
        lines[-1] += (
            f"; min {p['min']:.4f}, mean {p['mean']:.4f} with weight prepacking off (weight-only layers then "
            "compute in float; on, onnxruntime's MatMulNBits rounds their activations to 8 bits)"
        )
    lines[-1] += f"; files {q['size_ratio']:.3f} of fp32" + (
        f" (limit {q['size_limit']:g})." if q.get("size_limit") is not None else "."
    )
    if "export_seconds" in q:
        lines += [
            "",
            f"Re-measured alone (`--only int8`{', --quick' if q.get('quick') else ''}) on {q.get('cpu', '?')} "
            f"(AVX512-VNNI: {q.get('vnni')}): export (3 stages + fused, "
            f"fp32 + int8, candidates and layer search) {q['export_seconds']:.0f} s; load average "
            f"{q['load_avg_at_start']:.2f} at start, {q['load_avg_at_end']:.2f} at end.",
        ]
    lines += ["", "| stage | fp32 MiB | int8 MiB |", "|---|---|---|"]
    for i, (f32, i8) in enumerate(q["stage_bytes"]):
        lines.append(f"| {i} | {f32 / mib:.1f} | {i8 / mib:.1f} |")
    if q.get("candidates"):
        lines += [
            "",
            "Candidates, scored on the validation sentences (min / mean over sentences of the worst output's "
            "cosine to fp32, padded positions left out):",
            "",
            "| candidate | cosine min | cosine mean | files / fp32 | dynamic int8 share |",
            "|---|---|---|---|---|",
        ]
        for c in q["candidates"]:
            if c.get("error"):
                lines.append(f"| {c['label']} | failed: {c['error']} | | | |")
                continue
            name = c["label"] + (f" ({c['probe']})" if c.get("probe") else "")
            lines.append(
                f"| {name} | {c['cosine_min']:.4f} | {c['cosine_mean']:.4f} | {c['bytes'] / fp32_total:.3f} | "
                f"{c['int8_compute']:.2f} |"
            )
    sens = [t for t in q.get("sensitivity", []) if "damage" in t]
    if sens:
        worst = sorted(sens, key=lambda t: -t["damage"])
        wo = [
            c
            for c in q.get("candidates", [])
            if c["label"].startswith("weight_only") and c.get("cosine_mean")
        ]
        floor = f"{1 - wo[0]['cosine_mean']:.5f}" if wo else "not measured"
        lines += [
            "",
            "Layer sensitivity (1 - mean cosine on the validation sentences when that layer alone is dynamic "
            f"int8, every other weight-only; all weight-only: {floor}), most sensitive first:",
            "",
            "| stage | node | weight shape | 1 - mean cosine |",
            "|---|---|---|---|",
        ]
        for t in worst[:12]:
            lines.append(
                f"| {t['stage']} | {t['node']} | {' x '.join(map(str, t.get('shape', [])))} | {t['damage']:.5f} |"
            )
        if len(worst) > 12:
            rest = [t["damage"] for t in worst[12:]]
            lines.append(f"| | the other {len(rest)} layers | | {min(rest):.5f} to {max(rest):.5f} |")
    if q.get("latency"):
        lines += [
            "",
            f"Latency, staged executor with its defaults (weight prepacking on), {THREADS} threads, interleaved:",
            "",
            "| batch | config | p50 ms | p90 ms |",
            "|---|---|---|---|",
        ]
        for batch, res in q["latency"].items():
            for name, v in res.items():
                lines.append(f"| {batch} | {name} | {v['p50_ms']:.2f} | {v['p90_ms']:.2f} |")
    return lines


def machine() -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    cpu = ""
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "threads": THREADS,
        "load_avg_at_start": os.getloadavg()[0],
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
    }


def only_int8(out_path: Path, quick: bool) -> int:
    """``--only int8``: import, export (fp32 + int8, as section 2 does) and section 3 again; the other
    sections are kept from the last report's .json."""
    import torch

    from toolkit.checkpoint import load_model
    from toolkit.export import export_model
    from toolkit.export.text import quant_candidates, tokenize
    from toolkit.factorize.hf import minilm_dir
    from toolkit.hf_import import import_bert
    from toolkit.runtime import SessionConfig

    torch.set_num_threads(THREADS)
    prev = json.loads(out_path.with_suffix(".json").read_text())
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-transformer-") as tmp:
        work = Path(tmp)
        import_bert(minilm_dir(), work / "minilm")
        model, _spec, meta = load_model(work / "minilm")
        text = meta["text"]
        t0 = time.perf_counter()
        manifest = export_model(
            model,
            work / "export",
            sample=tokenize(text, sentences(32), MAX_TOKENS),
            calibration=tokenize(text, sentences(16 if quick else 64, 900), MAX_TOKENS),
            quantize="int8",
            text=text,
            quant_candidates=quant_candidates(),
            selection=tokenize(text, sentences(16 if quick else 64, 1000), MAX_TOKENS),
        )
        export_seconds = time.perf_counter() - t0
        cfg = SessionConfig(intra_op_threads=THREADS)
        prev["int8"] = {
            **int8_section(work / "export", manifest, text, cfg, 0.5 if quick else 4.0, quick),
            "export_seconds": export_seconds,
            "cpu": machine()["cpu"],
            "vnni": "avx512_vnni" in Path("/proc/cpuinfo").read_text()
            if Path("/proc/cpuinfo").exists()
            else None,
            "load_avg_at_start": load0,
            "load_avg_at_end": os.getloadavg()[0],
            "quick": quick,
        }
    out_path.with_suffix(".json").write_text(json.dumps(prev, indent=2))
    out_path.write_text(report(prev))
    print(f"wrote {out_path} (section 3 re-measured)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "transformer.md"))
    parser.add_argument("--rss-worker", nargs=3, metavar=("DIR", "MODE", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--distill-steps",
        type=int,
        default=None,
        help="section 5 (default 2400, bench_factorize's; quick 20)",
    )
    parser.add_argument("--hf-baseline", action="store_true", help="section 5: also the HF path, same steps")
    parser.add_argument("--ranks-from", default=None, help="section 5: bench_factorize's .json (its ranks)")
    parser.add_argument(
        "--only",
        choices=["factorize", "int8", "memory", "runtime"],
        default=None,
        help="re-measure section 5 (factorize), 3 (int8), 4 (memory) or 1-4 (runtime), keep the rest",
    )
    args = parser.parse_args()
    if args.rss_worker:
        rss_worker(args.rss_worker[0], args.rss_worker[1], int(args.rss_worker[2]))
        return 0
    steps = args.distill_steps if args.distill_steps is not None else (20 if args.quick else 2400)
    if args.only == "memory":  # section 4 on a fresh export (import + export of MiniLM, ~1 min)
        from toolkit.checkpoint import load_model
        from toolkit.export import export_model
        from toolkit.export.text import tokenize
        from toolkit.factorize.hf import minilm_dir
        from toolkit.hf_import import import_bert

        out_path = Path(args.out)
        prev = json.loads(out_path.with_suffix(".json").read_text())
        with tempfile.TemporaryDirectory(prefix="rlhf-bench-transformer-") as tmp:
            work = Path(tmp)
            import_bert(minilm_dir(), work / "minilm")
            model, _spec, meta = load_model(work / "minilm")
            feeds = tokenize(meta["text"], sentences(32), MAX_TOKENS)  # section 2's export sample
            export_model(model, work / "export", sample=feeds, text=meta["text"])
            prev["memory"] = memory_section(work / "export")
        out_path.with_suffix(".json").write_text(json.dumps(prev, indent=2))
        out_path.write_text(report(prev))
        print(f"wrote {out_path} (section 4 re-measured)")
        return 0
    if args.only == "factorize":
        import torch

        from toolkit.factorize.hf import minilm_dir
        from toolkit.hf_import import import_bert

        torch.set_num_threads(THREADS)
        out_path = Path(args.out)
        prev = json.loads(out_path.with_suffix(".json").read_text())
        with tempfile.TemporaryDirectory(prefix="rlhf-bench-transformer-") as tmp:
            import_bert(minilm_dir(), Path(tmp) / "minilm")
            prev["factorize"] = {
                "load_avg_at_start": os.getloadavg()[0],
                **factorize_section(
                    Path(tmp) / "minilm", steps, args.hf_baseline, args.ranks_from, args.quick
                ),
            }
        out_path.with_suffix(".json").write_text(json.dumps(prev, indent=2))
        out_path.write_text(report(prev))
        print(f"wrote {out_path} (section 5 re-measured)")
        return 0

    if args.only == "int8":
        return only_int8(Path(args.out), args.quick)

    import torch

    from toolkit.checkpoint import load_model
    from toolkit.export import export_model
    from toolkit.export.text import quant_candidates, tokenize
    from toolkit.factorize.hf import minilm_dir
    from toolkit.hf_import import import_bert
    from toolkit.runtime import Executor, SessionConfig

    torch.set_num_threads(THREADS)
    r: dict[str, Any] = {"machine": machine(), "quick": args.quick}
    seconds = 0.5 if args.quick else 4.0
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-transformer-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        import_bert(minilm_dir(), work / "minilm")
        r["import_seconds"] = time.perf_counter() - t0
        model, _spec, meta = load_model(work / "minilm")
        text = meta["text"]

        # 1. parity with transformers
        from transformers import AutoModel

        hf = AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True).eval()
        feeds = tokenize(text, sentences(32), MAX_TOKENS)
        tensors = [torch.as_tensor(feeds[n]) for n in model.input_names]
        with torch.no_grad():
            ref = hf(**{k: torch.as_tensor(v) for k, v in feeds.items()}).last_hidden_state
            hidden, pooled = model(*tensors)
        mask = torch.as_tensor(feeds["attention_mask"]).bool()
        m = mask[..., None].double()
        want = (ref.double() * m).sum(1) / m.sum(1)
        r["parity"] = {
            "sentences": 32,
            "hidden_max_abs_real_tokens": float((hidden - ref)[mask].abs().max()),
            "pooled_max_abs": float((pooled.double() - want).abs().max()),
        }

        # 2. export (3 stages, int8) and latency
        t0 = time.perf_counter()
        calib = tokenize(text, sentences(16 if args.quick else 64, 900), MAX_TOKENS)
        select = tokenize(text, sentences(16 if args.quick else 64, 1000), MAX_TOKENS)  # int8 chosen here
        manifest = export_model(
            model,
            work / "export",
            sample=feeds,
            calibration=calib,
            quantize="int8",
            text=text,
            quant_candidates=quant_candidates(),
            selection=select,
        )
        r["export_seconds"] = time.perf_counter() - t0
        os.environ["RLHF_EXPORT_FUSION"] = "1"  # the same model with onnxruntime's fused contrib ops
        try:
            export_model(model, work / "export-fused-ops", sample=feeds, text=text)
        finally:
            os.environ.pop("RLHF_EXPORT_FUSION")
        exp = work / "export"
        cfg = SessionConfig(intra_op_threads=THREADS)
        staged = Executor(exp, providers="cpu", session_options=cfg)
        fused = Executor(exp, providers="cpu", session_options=cfg, fused=True)
        unpacked = Executor(exp, providers="cpu", session_options=replace(cfg, prepacking=False))
        quiet = no_spin_sessions(exp, manifest)
        fusedops = Executor(work / "export-fused-ops", providers="cpu", session_options=cfg)
        lat: dict[str, Any] = {}
        for batch in (1, 32):
            f = tokenize(text, sentences(batch, 600), MAX_TOKENS)
            fns: dict[str, Callable[[], object]] = {
                "staged (3 stages)": lambda f=f: staged.run(f),
                "staged, prepacking off": lambda f=f: unpacked.run(f),
                "fused": lambda f=f: fused.run(f),
                "staged, spinning off": lambda f=f: quiet[0](f),
                "fused, spinning off": lambda f=f: quiet[1](f),
                "staged, export with fused ops": lambda f=f: fusedops.run(f),
            }
            if batch == 1:
                ts = [torch.as_tensor(f[n]) for n in model.input_names]

                def eager(ts: list[torch.Tensor] = ts) -> object:
                    with torch.no_grad():
                        return model(*ts)

                fns["torch eager"] = eager
                hf_feeds = {k: torch.as_tensor(v) for k, v in f.items()}

                def hf_eager(hf_feeds: dict[str, torch.Tensor] = hf_feeds, bert: Any = hf) -> object:
                    with torch.no_grad():
                        return bert(**hf_feeds)

                fns["transformers eager"] = hf_eager
            lat[str(batch)] = {
                "seq": int(next(iter(f.values())).shape[1]),
                "results": interleaved(fns, batch, seconds, 5 if batch == 32 else 20),
            }
        r["latency"] = lat
        del hf

        # 3. int8
        r["int8"] = int8_section(exp, manifest, text, cfg, seconds, args.quick)

        # 4. streaming memory, fresh subprocesses
        r["memory"] = memory_section(exp)

        # 5. factorized + distilled on the spec path
        if args.only == "runtime":
            r["factorize"] = json.loads(Path(args.out).with_suffix(".json").read_text())["factorize"]
        else:
            r["factorize"] = {
                "load_avg_at_start": os.getloadavg()[0],
                **factorize_section(work / "minilm", steps, args.hf_baseline, args.ranks_from, args.quick),
            }
    r["machine"]["load_avg_at_end"] = os.getloadavg()[0]
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.with_suffix(".json").write_text(json.dumps(r, indent=2))
    out_path.write_text(report(r))
    print(f"wrote {out_path}")
    return 0


def report(r: dict[str, Any]) -> str:
    mc = r["machine"]
    mib = 2**20
    lines = [
        "# Transformer benchmark: MiniLM as a spec, 3 stages",
        "",
        "Written by `python benchmarks/bench_transformer.py`"
        + (" --quick (tiny budgets: not figures to quote)" if r["quick"] else "")
        + ".",
        f"Machine: {mc['cpu']}, {mc['cores']} cores, {mc['threads']} intra-op threads (onnxruntime and torch), "
        f"load average {mc['load_avg_at_start']:.2f} at start, {mc['load_avg_at_end']:.2f} at end; "
        f"onnxruntime {mc['onnxruntime']}, torch {mc['torch']}.",
        "",
        "## Import",
        "",
        f"`rlhf import` of all-MiniLM-L6-v2: {r['import_seconds']:.1f} s. On {r['parity']['sentences']} sentences of "
        f"the Python reference manual: hidden states vs transformers max abs {r['parity']['hidden_max_abs_real_tokens']:.2e} "
        f"(real tokens), mean-pooled embeddings max abs {r['parity']['pooled_max_abs']:.2e}. Export (3 stages + fused, fp32 + int8): "
        f"{r['export_seconds']:.0f} s.",
        "",
        "## Latency (ms per call, p50 / p90)",
        "",
        "| batch | tokens | config | p50 ms | p90 ms | sentences/s |",
        "|---|---|---|---|---|---|",
    ]
    for batch, entry in r["latency"].items():
        for name, v in entry["results"].items():
            lines.append(
                f"| {batch} | {entry['seq']} | {name} | {v['p50_ms']:.2f} | {v['p90_ms']:.2f} | {v['throughput']:.1f} |"
            )
    lines.append("")
    for batch, entry in r["latency"].items():
        res = entry["results"]
        ratio = res["staged (3 stages)"]["p50_ms"] / res["fused"]["p50_ms"]
        lines.append(f"- batch {batch}: staged / fused = {ratio:.3f} (executor)")
        if "fused, spinning off" in res:
            quiet = res["staged, spinning off"]["p50_ms"] / res["fused, spinning off"]["p50_ms"]
            lines.append(
                f"- batch {batch}: staged / fused = {quiet:.3f} (plain sessions, intra-op spinning off)"
            )
        if "staged, export without fusion" in res:
            gain = res["staged, export without fusion"]["p50_ms"] / res["staged (3 stages)"]["p50_ms"]
            lines.append(
                f"- batch {batch}: export without / with onnxruntime's fused ops (staged) = {gain:.2f}x"
            )
        for peer in ("torch eager", "transformers eager"):
            if peer in res:
                lines.append(
                    f"- batch {batch}: {peer} / onnxruntime staged = {res[peer]['p50_ms'] / res['staged (3 stages)']['p50_ms']:.2f}x"
                )
                if "staged, prepacking off" in res:
                    lines.append(
                        f"- batch {batch}: {peer} / onnxruntime staged with weight prepacking off = "
                        f"{res[peer]['p50_ms'] / res['staged, prepacking off']['p50_ms']:.2f}x"
                    )
    lines += ["", *int8_report(r["int8"])]
    lines += [
        "",
        "## Streaming memory (batch 8, fresh subprocess each)",
        "",
        "Stage weights are ONNX external data (`stage_NN.onnx.data`); streaming loads each stage by path, so "
        "onnxruntime maps the data file and a kernel faults in the pages it reads; its sessions run without "
        "onnxruntime's memory arena (each serves one run). Budget of the streaming run: "
        "half the weights. Peak RSS: VmHWM above the baseline once onnxruntime's environment is up (mapped "
        "file pages count).",
        "",
        "| mode | tokens | budget MiB | largest stage file MiB | largest stage as loaded MiB | activations MiB | all weights MiB | peak RSS MiB | peak / budget | peak / (largest as loaded + act.) | peak / (largest file + act.) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in r["memory"]:
        ref = run["largest_stage_bytes"] + run["activation_bytes"]
        budget = run.get("budget_bytes")
        loaded = run.get("largest_stage_estimate_bytes", run["largest_stage_bytes"])
        lines.append(
            f"| {run['mode'] + ('' if run.get('prepacking', True) else ', prepacking off')} | {run['seq']} | {f'{budget / mib:.1f}' if budget else '-'} | "
            f"{run['largest_stage_bytes'] / mib:.1f} | {loaded / mib:.1f} | {run['activation_bytes'] / mib:.2f} | "
            f"{run['total_weight_bytes'] / mib:.1f} | {run['peak_bytes'] / mib:.1f} | "
            + (f"{run['peak_bytes'] / budget:.2f}" if budget else "-")
            + f" | {run['peak_bytes'] / (loaded + run['activation_bytes']):.2f} | {run['peak_bytes'] / ref:.2f} |"
        )
    same = len({run["pool_sha"] for run in r["memory"] if run.get("prepacking", True)}) == 1
    off = [
        run["pool_sha"] == r["memory"][0]["pool_sha"]
        for run in r["memory"]
        if not run.get("prepacking", True)
    ]
    first = r["memory"][0]
    lines += [
        "",
        f"- streaming and resident embeddings bit-identical (weight prepacking on in both, the default): {same}",
        *(
            [
                f"- streaming with prepacking off bit-identical to the resident run: {off[0]} (another GEMM kernel)"
            ]
            if off
            else []
        ),
        *(
            [
                "- load average during these runs: "
                + ", ".join(f"{run['load_avg']:.2f}" for run in r["memory"])
            ]
            if all("load_avg" in run for run in r["memory"])
            else []
        ),
        f"- largest stage as loaded: the executor's estimate (`rlhf_runtime.executor.weight_bytes`) at this run's "
        f"{first['batch']} x {first['seq']} tokens: file bytes less the tables read only through Gather "
        f"({first.get('gathered_bytes', 0) / mib:.1f} MiB), plus 64 KiB per token, at most the tables "
        "(here the embedding stage, an upper bound: the table's rows a batch reads cost far less).",
        *(
            [
                f"- largest stage without its Gather tables: {run['largest_without_tables_bytes'] / mib:.1f} MiB "
                f"(a transformer layers' stage); peak{'' if run.get('prepacking', True) else ' (prepacking off)'} "
                "/ (that + activations) = "
                f"{run['peak_bytes'] / (run['largest_without_tables_bytes'] + run['activation_bytes']):.2f} "
                "(the rest is onnxruntime's working memory inside the stage: attention scores, feed-forward "
                "intermediates, which neither figure counts)"
                for run in r["memory"]
                if run["mode"] == "streaming" and "largest_without_tables_bytes" in run
            ]
        ),
        "",
    ]
    if "factorize" in r:
        lines += factorize_report(r["factorize"])
    return "\n".join(lines)


def factorize_report(f: dict[str, Any]) -> list[str]:
    """Section 5 of the report."""
    lines = [
        "## Factorized imported MiniLM, distilled on the spec path",
        "",
        f"`rlhf import` checkpoint, the encoder's 36 linear layers at half their weights "
        f"({f['linear_factor_params']:,} of {f['linear_dense_params']:,}); ranks: {f['ranks_source']}. "
        f"ASVD + one closed-form refit (128 training sentences), then {f['steps']} steps of "
        "`toolkit.factorize.hf.distill` through `toolkit.factorize.spec_text` (AdamW, peak lr 5e-4, token-state "
        "MSE + pooled cosine, 32 augmented training sentences of the Python reference manual per step; "
        f"{f['distill_seconds']:.0f} s). Load average {f['load_avg_at_start']:.2f} at start, "
        f"{f['load_avg_at_end']:.2f} at end. Mean cosine of mean-pooled embeddings to the dense model on "
        f"{f['held_out']} held-out sentences:",
        "",
        "| path | steps | after factorize | after distillation |",
        "|---|---|---|---|",
        f"| spec (`rlhf factorize --distill-steps`) | {f['steps']} | {f['cosine_after_factorize']:.4f} | "
        f"**{f['cosine_after_distill']:.4f}** |",
    ]
    if "hf_cosine_after_distill" in f:
        lines.append(
            f"| Hugging Face, same run, same ranks | {f['steps']} | {f['hf_cosine_after_factorize']:.4f} | "
            f"{f['hf_cosine_after_distill']:.4f} |"
        )
    ref = f.get("hf_reference") or {}
    if ref.get("cosine_after_distill") is not None:
        lines.append(
            f"| Hugging Face, docs/benchmarks/factorize.md | {ref['distill_steps']} | "
            f"{ref['cosine_after_factorize']:.4f} | {ref['cosine_after_distill']:.4f} |"
        )
        met = f["steps"] >= ref["distill_steps"] and f["cosine_after_distill"] >= ref["cosine_after_distill"]
        lines += [
            "",
            f"- target: at least the Hugging Face path's {ref['cosine_after_distill']:.4f} at equal steps "
            f"({ref['distill_steps']}): "
            + (
                "met"
                if met
                else (
                    "NOT met"
                    if f["steps"] >= ref["distill_steps"]
                    else f"not measured at {ref['distill_steps']} steps in this run ({f['steps']} steps)"
                )
            ),
        ]
    lines.append("")
    return lines


if __name__ == "__main__":
    sys.exit(main())
