"""Benchmark of `rlhf factorize`: ASVD vs SVD, digits MLP 4x recovery, MiniLM 2x (cosine, size, latency).

    python benchmarks/bench_factorize.py [--quick] [--out docs/benchmarks/factorize.md]

Figures go to the markdown file (and a JSON beside it). Everything runs offline on CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from toolkit.factorize import RefitOptions, count_parameters, factorize_module  # noqa: E402
from toolkit.factorize.spec_model import node_pattern  # noqa: E402


def digits(quick: bool) -> dict[str, Any]:
    """Dense digits MLP (Adam), factorized 4x in fc1+fc2 by SVD/ASVD, refit, Hessian-free fine-tune."""
    from toolkit.builder import build_model
    from toolkit.data import load_data
    from toolkit.factorize.finetune import fine_tune_hessian_free
    from toolkit.spec import load_spec

    spec = load_spec(ROOT / "graphs" / "default.yaml")
    torch.manual_seed(0)
    dense = build_model(spec, seed=0, dense=True)
    data = load_data(spec.train.data, spec.inputs)
    x, y = torch.as_tensor(data.train.inputs["x"]), torch.as_tensor(data.train.targets).long()
    xv, yv = torch.as_tensor(data.val.inputs["x"]), torch.as_tensor(data.val.targets).long()
    xt, yt = torch.as_tensor(data.test.inputs["x"]), torch.as_tensor(data.test.targets).long()
    opt = torch.optim.Adam(dense.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(10 if quick else 30):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(dense(x[idx]), y[idx]).backward()
            opt.step()
    dense.eval()

    def acc(m: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> float:
        with torch.no_grad():
            return 100.0 * float((m(a).argmax(-1) == b).double().mean())

    cal = [(x[i : i + 256],) for i in range(0, 1024, 256)]
    out: dict[str, Any] = {"dense_test_acc": acc(dense, xt, yt)}
    for method in ("svd", "asvd"):
        m = copy.deepcopy(dense)
        rep = factorize_module(
            m, ratio=0.25, include=node_pattern(["fc1", "fc2"]), method=method, calibration=cal
        )
        out[f"{method}_test_acc"] = acc(m, xt, yt)
        out[f"{method}_errors"] = {lr.name: lr.error for lr in rep.layers}
        out["dense_params"], out["factor_params"] = rep.dense_params, rep.factor_params
    m = copy.deepcopy(dense)
    rep = factorize_module(
        m, ratio=0.25, include=node_pattern(["fc1", "fc2"]), method="asvd", calibration=cal, refit=True
    )
    out["refit_errors"] = {lr.name: lr.error_refit for lr in rep.layers}
    out["refit_test_acc"] = acc(m, xt, yt)
    # Hessian-free fine-tune on soft targets of the dense model (distillation); keep it if val improves
    with torch.no_grad():
        soft = dense(x).softmax(-1)
    tuned = copy.deepcopy(m)
    t0 = time.perf_counter()
    fine_tune_hessian_free(tuned, F.cross_entropy, (x,), soft, steps=10 if quick else 20, batch_size=len(x))
    out["finetune_seconds"] = time.perf_counter() - t0
    out["finetune_test_acc"] = acc(tuned, xt, yt)
    out["final_test_acc"] = (
        out["finetune_test_acc"] if acc(tuned, xv, yv) >= acc(m, xv, yv) else out["refit_test_acc"]
    )
    return out


def _latency_ms(session: Any, feed: dict[str, Any], repeats: int) -> float:
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(1000.0 * (time.perf_counter() - t0))
    return statistics.median(times)


def minilm(quick: bool, distill_steps: int | None = None, lr: float = 5e-4) -> dict[str, Any]:
    """MiniLM linear layers 2x fewer parameters: ASVD + refit + distillation; cosine, size, latency."""
    from toolkit.factorize.corpus import python_reference_sentences, split_sentences
    from toolkit.factorize.hf import (
        augmented_batches,
        batches,
        distill,
        embed,
        export_encoder_onnx,
        load_hf,
        mean_cosine,
        minilm_dir,
        onnx_embed,
        onnx_session,
        tokenize,
    )

    dense, tok = load_hf(minilm_dir())
    train, held = split_sentences(python_reference_sentences(), 100 if quick else 300)
    e_dense = embed(dense, tok, held)
    cal = batches(tok, train[: 64 if quick else 128], 32)
    include = r"encoder\.layer\."
    out: dict[str, Any] = {
        "corpus": "Python Language Reference (pydoc_data.topics)",
        "train_sentences": len(train),
        "held_out": len(held),
    }

    def factorized(**rule: Any) -> tuple[torch.nn.Module, Any]:
        """A copy of the dense model, factorized by ``rule`` with ASVD + one closed-form refit."""
        student = copy.deepcopy(dense)
        rep = factorize_module(
            student,
            include=include,
            method="asvd",
            calibration=cal,
            refit=True,
            refit_options=RefitOptions(alternations=1, steps=0),
            max_rows=4096,
            **rule,
        )
        return student, rep

    t0 = time.perf_counter()
    student, rep = factorized(ratio=0.5)
    out["factorize_seconds"] = time.perf_counter() - t0
    out["linear_dense_params"], out["linear_factor_params"] = rep.dense_params, rep.factor_params
    out["model_params_dense"], out["model_params_factorized"] = (
        count_parameters(dense),
        count_parameters(student),
    )
    errs = [(lr.error_svd, lr.error, lr.error_refit) for lr in rep.layers if lr.error is not None]
    out["mean_error_svd"] = statistics.mean(e[0] for e in errs)  # type: ignore[misc]
    out["mean_error_asvd"] = statistics.mean(e[1] for e in errs)  # type: ignore[misc]
    out["mean_error_refit"] = statistics.mean(e[2] for e in errs)  # type: ignore[misc]
    out["asvd_wins"] = sum(e[1] <= e[0] for e in errs)  # type: ignore[operator]
    out["layers"] = len(errs)
    out["cosine_uniform"] = mean_cosine(embed(student, tok, held), e_dense)
    # the same budget spent by measured sensitivity: 1 − cosine on 96 training sentences
    from toolkit.factorize.hf import embedding_distortion
    from toolkit.factorize.sensitivity import sensitivity_ranks

    probe = train[: 32 if quick else 96]
    t0 = time.perf_counter()
    sens = sensitivity_ranks(
        dense, embedding_distortion(dense, tok, probe), 0.5, include=include, calibration=cal
    )
    out["sensitivity_seconds"] = time.perf_counter() - t0
    out["sensitivity_ranks"] = sens.ranks
    out["probe_sentences"] = len(probe)
    student, rep = factorized(rank=sens.ranks)
    out["linear_factor_params"] = rep.factor_params
    out["model_params_factorized"] = count_parameters(student)
    out["cosine_after_factorize"] = mean_cosine(embed(student, tok, held), e_dense)
    steps = distill_steps if distill_steps is not None else (40 if quick else 2400)
    log = distill(student, dense, augmented_batches(tok, train[128:], 32, seed=0), steps=steps, lr=lr)
    out["distill_steps"], out["distill_seconds"] = steps, log.seconds
    out["cosine_after_distill"] = mean_cosine(embed(student, tok, held), e_dense)
    with tempfile.TemporaryDirectory() as tmp:
        pd = export_encoder_onnx(dense, Path(tmp) / "dense.onnx")
        pf = export_encoder_onnx(student, Path(tmp) / "fact.onnx")
        out["onnx_mb_dense"], out["onnx_mb_factorized"] = pd.stat().st_size / 2**20, pf.stat().st_size / 2**20
        sd, sf = onnx_session(pd, threads=1), onnx_session(pf, threads=1)
        out["onnx_cosine"] = mean_cosine(onnx_embed(sf, tok, held[:32]), e_dense[:32])
        for bs in (1, 32):
            enc = tokenize(tok, held[:bs], 64)
            feed = {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()}
            reps = 10 if quick else 30
            out[f"latency_ms_b{bs}_dense"] = _latency_ms(sd, feed, reps)
            out[f"latency_ms_b{bs}_factorized"] = _latency_ms(sf, feed, reps)
            out[f"tokens_b{bs}"] = int(enc["input_ids"].shape[1])
    return out


def _rank_rows(ranks: dict[str, int]) -> list[str]:
    parts = (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    )
    layers = sorted({int(name.split(".")[2]) for name in ranks})
    rows = []
    for i in layers:
        cells = [ranks.get(f"encoder.layer.{i}.{p}") for p in parts]
        rows.append(f"| {i} | " + " | ".join("dense" if c == 0 else str(c) for c in cells) + " |")
    return rows


def render(res: dict[str, Any], quick: bool) -> str:
    d, m = res["digits"], res.get("minilm")
    lines = [
        "# Factorization benchmark (`rlhf factorize`)",
        "",
        f"Reproduce: `python benchmarks/bench_factorize.py{' --quick' if quick else ''} --threads {torch.get_num_threads()}` — CPU "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads), "
        "figures are single runs on a shared machine.",
        "",
        "## Digits MLP (graphs/default.yaml built dense, Adam), fc1 + fc2 at 4x fewer parameters",
        "",
        f"Hidden-layer weights {d['dense_params']:,} -> {d['factor_params']:,} ({d['dense_params'] / d['factor_params']:.2f}x).",
        "",
        "| model | test accuracy (%) |",
        "|---|---|",
        f"| dense | {d['dense_test_acc']:.2f} |",
        f"| SVD | {d['svd_test_acc']:.2f} |",
        f"| ASVD | {d['asvd_test_acc']:.2f} |",
        f"| ASVD + layer-wise refit | {d['refit_test_acc']:.2f} |",
        f"| + Hessian-free fine-tune (distillation, {d['finetune_seconds']:.0f} s) | {d['finetune_test_acc']:.2f} |",
        f"| **recovered (refit or fine-tune, chosen on val)** | **{d['final_test_acc']:.2f}** (dense − {d['dense_test_acc'] - d['final_test_acc']:.2f} points) |",
        "",
        "Output error ‖Y−Ŷ‖/‖Y‖ per layer on calibration inputs, equal rank:",
        "",
        "| layer | SVD | ASVD | ASVD + refit |",
        "|---|---|---|---|",
    ]
    for name in d["svd_errors"]:
        lines.append(
            f"| {name} | {d['svd_errors'][name]:.4f} | {d['asvd_errors'][name]:.4f} | {d['refit_errors'][name]:.4f} |"
        )
    if m:
        lines += [
            "",
            "## all-MiniLM-L6-v2, the 36 encoder linear layers at 2x fewer parameters",
            "",
            f"Corpus: {m['corpus']}, {m['train_sentences']} training sentences, {m['held_out']} held out. "
            "Ranks: the budget of half the dense linear weights spent by measured sensitivity "
            "(toolkit.factorize.sensitivity: each layer factorized alone at 25/37.5/50/75% of its weights, "
            f"1 − cosine on {m['probe_sentences']} training sentences, {m['sensitivity_seconds']:.0f} s; "
            f"{sum(1 for r in m['sensitivity_ranks'].values() if r == 0)} of {len(m['sensitivity_ranks'])} "
            "layers stay dense). "
            f"ASVD (α = 0.5) + closed-form layer-wise refit, then {m['distill_steps']} distillation steps "
            f"(AdamW, token-state MSE + pooled cosine; each batch 32 random training sentences with word-level augmentation: crops, splices, word dropout; {m['distill_seconds']:.0f} s).",
            "",
            "| | dense | factorized |",
            "|---|---|---|",
            f"| linear-layer weights | {m['linear_dense_params']:,} | {m['linear_factor_params']:,} |",
            f"| all parameters | {m['model_params_dense']:,} | {m['model_params_factorized']:,} |",
            f"| ONNX file (MB) | {m['onnx_mb_dense']:.1f} | {m['onnx_mb_factorized']:.1f} |",
            f"| onnxruntime CPU latency, batch 1 × {m['tokens_b1']} tokens (ms, 1 thread, median) | {m['latency_ms_b1_dense']:.1f} | {m['latency_ms_b1_factorized']:.1f} |",
            f"| onnxruntime CPU latency, batch 32 × {m['tokens_b32']} tokens (ms) | {m['latency_ms_b32_dense']:.1f} | {m['latency_ms_b32_factorized']:.1f} |",
            "",
            "Mean cosine similarity of mean-pooled held-out sentence embeddings to the dense model's:",
            "",
            f"- every layer at half its weights (ratio 0.5), ASVD + refit: {m['cosine_uniform']:.4f}",
            f"- sensitivity-allocated ranks, ASVD + refit: {m['cosine_after_factorize']:.4f}",
            f"- after distillation: **{m['cosine_after_distill']:.4f}** (target >= 0.95: "
            f"{'met' if m['cosine_after_distill'] >= 0.95 else 'NOT met at this step count'}); "
            f"through onnxruntime: {m['onnx_cosine']:.4f}",
            "",
            "Ranks chosen by sensitivity (dense = kept unfactorized; the uniform ratio 0.5 gives 96 for the "
            "384×384 attention maps and 153 for the 384↔1536 feed-forward maps):",
            "",
            "| layer | query | key | value | attn out | ffn in | ffn out |",
            "|---|---|---|---|---|---|---|",
            *_rank_rows(m["sensitivity_ranks"]),
            "",
            f"ASVD vs SVD at equal rank (mean output error over {m['layers']} layers): SVD {m['mean_error_svd']:.4f}, "
            f"ASVD {m['mean_error_asvd']:.4f} (ASVD lower in {m['asvd_wins']}/{m['layers']} layers), "
            f"ASVD + refit {m['mean_error_refit']:.4f}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the benchmark and write the markdown + JSON report."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer steps and sentences (development)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "factorize.md")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument(
        "--distill-steps",
        type=int,
        default=None,
        help="MiniLM distillation steps (default 40 quick, 2400 full)",
    )
    ap.add_argument("--lr", type=float, default=5e-4, help="MiniLM distillation peak learning rate")
    ap.add_argument(
        "--threads", type=int, default=2, help="torch intra-op threads (default 2: the CI machine's cores)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res: dict[str, Any] = {"digits": digits(args.quick)}
    print(json.dumps(res["digits"], indent=1), flush=True)
    if not args.skip_minilm:
        res["minilm"] = minilm(args.quick, args.distill_steps, args.lr)
        print(json.dumps(res["minilm"], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(res, args.quick))
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
