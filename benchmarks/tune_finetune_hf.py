"""Choose the Hessian-free step settings (and each method's iterate averaging) of the fine-tuning bench
on validation accuracy.

    python benchmarks/tune_finetune_hf.py [--trainable last:1] [--budget 60] [--l2-sp 0.01]
        [--candidates NAME,...] [--hf-steps N] [--out docs/benchmarks/finetune_hf_tuning.md]

Three candidate step settings (as many runs as AdamW's three learning rates), each one ``fit`` run
from the same start, data order and ``--budget`` seconds of training on the bench's cached features,
L2-SP fixed at ``--l2-sp``; the candidate with the best validation accuracy is the one the bench
uses (``HF_FT`` in ``benchmarks/bench_finetune.py``). Test accuracy is neither computed nor
looked at here.

Iterate averaging (``FitConfig.average``) is chosen the same way, for both methods alike:
``--candidates hf,hf-avg0.9,adamw,adamw-avg0.9`` runs the bench's Hessian-free step (HF_FT) and the
bench's AdamW recipe (lr ``--adamw-lr``, ``--adamw-epochs`` epochs) without and with an average of
decay 0.9; each method keeps the averaging only if it scores higher on validation. Validation is scored about every ``--eval-seconds`` of training for every candidate
(so each gets about the same number of evaluations), with a 200-text training subset for the train
curve (scoring is not counted in the budget).

The budget is counted on a CPU clock: the process's CPU seconds divided by ``--threads`` (with
``--cpu-clock``, the default), i.e. the wall seconds the same work takes on a quiet machine, so
that other jobs sharing the cores do not change how many steps a candidate gets. (On a shared,
loaded machine the wall clock gave the first candidate 2 steps in 60 s.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench_finetune import BUCKET, HF_FT, _configs  # noqa: E402
from profile_finetune_step import _prepared, add_report_only, rewrite_report  # noqa: E402

from toolkit.factorize.classify_train import FitConfig, fit, load_params_from, param_copy  # noqa: E402

# (name, method, FitConfig fields): "hf" runs on the tuner's Hessian-free config (L2-SP --l2-sp), "adamw"
# on the bench's AdamW recipe; --step-seconds gives each Hessian-free one's rough seconds per step
# (sets eval_every; AdamW is scored every quarter epoch, as in the bench)
CANDIDATES: list[tuple[str, str, dict[str, Any]]] = [
    (
        "kfac16-512-64-cg10",
        "hf",
        {"batch_size": 512, "curvature_batch": 64, "cg_max_iters": 10},
    ),  # the old HF_FT
    (
        "none-512-32-cg10",
        "hf",
        {"batch_size": 512, "curvature_batch": 32, "cg_max_iters": 10, "preconditioner": "none"},
    ),
    (
        "none-256-32-cg5",
        "hf",
        {"batch_size": 256, "curvature_batch": 32, "cg_max_iters": 5, "preconditioner": "none"},
    ),
    # iterate averaging, for both methods (the bench's own step settings)
    ("hf", "hf", {**{k: v for k, v in HF_FT.items() if k != "eval_every"}, "average": 0.0}),
    ("hf-avg0.9", "hf", {**{k: v for k, v in HF_FT.items() if k != "eval_every"}, "average": 0.9}),
    ("adamw", "adamw", {"average": 0.0}),
    ("adamw-avg0.9", "adamw", {"average": 0.9}),
]
DEFAULT_CANDIDATES = ("kfac16-512-64-cg10", "none-512-32-cg10", "none-256-32-cg5")


class _CpuClock:
    """Stands in for the ``time`` module inside ``classify_train``: perf_counter = CPU s / threads."""

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def perf_counter(self) -> float:
        return time.process_time() / self.threads


def _cpu_clock(threads: int) -> None:
    import toolkit.factorize.classify_train as ct

    ct.time = _CpuClock(threads)  # type: ignore[assignment]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trainable", default="last:1")
    ap.add_argument("--budget", type=float, default=60.0)
    ap.add_argument("--l2-sp", type=float, default=1e-2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--step-seconds", default="6,3,1.5",
                    help="rough seconds per step of each Hessian-free candidate run, in order (sets eval_every so "
                         "that every candidate is scored about every --eval-seconds)")  # fmt: skip
    ap.add_argument("--eval-seconds", type=float, default=8.0)
    ap.add_argument(
        "--candidates",
        default=",".join(DEFAULT_CANDIDATES),
        help=f"comma-separated candidate names to run, of {[c[0] for c in CANDIDATES]} (default: the three step "
        "settings)",
    )
    ap.add_argument(
        "--hf-steps",
        type=int,
        default=100000,
        help="Hessian-free steps at most per run (with a --budget larger than they take, the comparison does not "
        "depend on the machine's load: for choices that do not change a step's cost, such as averaging)",
    )
    ap.add_argument("--adamw-lr", type=float, default=3e-3, help="AdamW candidates' peak lr (default 3e-3)")
    ap.add_argument("--adamw-epochs", type=float, default=2.0, help="AdamW candidates' schedule (default 2)")
    ap.add_argument(
        "--cpu-clock",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="count the budget in process CPU seconds / threads (default), not wall seconds",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "finetune_hf_tuning.md")
    add_report_only(ap)
    args = ap.parse_args()
    if rewrite_report(args, _markdown):
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()
    t_all = time.perf_counter()
    tag = args.trainable.replace(":", "")
    prep = _prepared(args.trainable)
    model = prep.train_model
    start = param_copy(model)
    work = ROOT / "runs" / f"tune-finetune-hf-{tag}"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    wanted = args.candidates.split(",")
    unknown = sorted(set(wanted) - {c[0] for c in CANDIDATES})
    if unknown:
        ap.error(f"--candidates: unknown {unknown}; expected names of {[c[0] for c in CANDIDATES]}")
    per_step = iter(float(x) for x in args.step_seconds.split(","))
    n_train = int(prep.data["train"][1].shape[0])
    bench = argparse.Namespace(trainable=args.trainable, adamw_epochs=args.adamw_epochs)
    adamw = dataclasses.replace(
        _configs(bench, args.budget, n_train)[3], lr=args.adamw_lr, patience=0, train_eval=200
    )
    if args.cpu_clock:
        _cpu_clock(args.threads)
    runs: list[dict[str, Any]] = []
    for name, method, change in (c for c in CANDIDATES if c[0] in wanted):
        load_params_from(model, start)
        if method == "adamw":
            cfg = dataclasses.replace(adamw, **change)
        else:
            sec = next(per_step, None)
            if sec is None:
                ap.error("--step-seconds: expected one number per Hessian-free candidate run")
            cfg = FitConfig(optimizer="hf", max_steps=args.hf_steps, time_budget=args.budget, patience=0, seed=0,
                            bucket=BUCKET, l2_sp=args.l2_sp, train_eval=200,
                            eval_every=max(1, round(args.eval_seconds / sec)), **change)  # fmt: skip
        t0 = time.perf_counter()
        res = fit(model, prep.data["train"], prep.data["val"], cfg, work / name)
        runs.append({"name": name, "config": dataclasses.asdict(cfg), "best_val_accuracy": res.best_val_accuracy,
                     "seconds_to_best": res.best_seconds, "steps": res.steps, "seconds": res.seconds,
                     "seconds_per_step": res.seconds / max(1, res.steps), "evaluations": len(res.history),
                     "final_train_accuracy_subset": res.history[-1]["train_accuracy"] if res.history else None,
                     "wall": time.perf_counter() - t0, "loadavg": os.getloadavg(),
                     "curve": [(h["seconds"], h["val_accuracy"]) for h in res.history]})  # fmt: skip
        r = runs[-1]
        print(f"{name}: val {r['best_val_accuracy']:.4f} ({r['steps']} steps, {r['seconds_per_step']:.2f} s/step, "
              f"best at {r['seconds_to_best']:.0f} s, {r['evaluations']} evaluations, load {r['loadavg'][0]:.1f})",
              flush=True)  # fmt: skip
    chosen = {  # per method: the candidate with the best validation accuracy
        method: max((r for r in runs if r["config"]["optimizer"] == method), key=lambda r: r["best_val_accuracy"])["name"]
        for method in sorted({r["config"]["optimizer"] for r in runs})
    }  # fmt: skip
    doc = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads,
                       "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
           "trainable": args.trainable, "budget_seconds_per_run": args.budget,
           "budget_clock": "cpu seconds / threads" if args.cpu_clock else "wall", "l2_sp": args.l2_sp,
           "runs": runs, "chosen": chosen, "total_seconds": time.perf_counter() - t_all}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    args.out.write_text(_markdown(doc, args))
    print(f"chosen {chosen}; wrote {args.out} (+ .json)", flush=True)
    return 0


def _markdown(doc: dict[str, Any], args: Any) -> str:
    m, runs = doc["machine"], doc["runs"]
    # reports written before AdamW candidates existed hold one chosen name
    chosen = set(doc["chosen"].values()) if isinstance(doc["chosen"], dict) else {doc["chosen"]}
    adamw = [r for r in runs if r["config"]["optimizer"] == "adamw"]
    options = f" --candidates {args.candidates}" if args.candidates != ",".join(DEFAULT_CANDIDATES) else ""
    if adamw:
        options += f" --adamw-lr {args.adamw_lr:g} --adamw-epochs {args.adamw_epochs:g}"
    lines = [
        f"# Hessian-free step settings for fine-tuning MiniLM's {doc['trainable']} + head, chosen on validation",
        "",
        f"Written by `python benchmarks/tune_finetune_hf.py --trainable {doc['trainable']} "
        f"--budget {doc['budget_seconds_per_run']:g} --l2-sp {doc['l2_sp']:g} --step-seconds {args.step_seconds}"
        f"{'' if args.eval_seconds == 8.0 else f' --eval-seconds {args.eval_seconds:g}'}"
        f"{'' if args.hf_steps == 100000 else f' --hf-steps {args.hf_steps}'}{options}`; "
        f"{doc['total_seconds']:.0f} s in all (wall); the budget counted on "
        f"{'the CPU clock (process CPU seconds / threads)' if doc['budget_clock'] != 'wall' else 'the wall clock'}. "
        f"Machine: {m['platform']}, {m['cpus']} CPUs shared with other jobs, torch threads {m['torch_threads']}, load "
        f"average {m['loadavg_start'][0]:.1f} at the start, {m['loadavg_end'][0]:.1f} at the end. Each candidate: one "
        f"run of {doc['budget_seconds_per_run']:g} s of training"
        f"{'' if args.hf_steps == 100000 else f' or {args.hf_steps} Hessian-free steps, whichever comes first,'}"
        " from the same start and data order, "
        f"Hessian-free with L2-SP {doc['l2_sp']:g}, scored on validation every `eval_every` steps (set from a rough "
        "guess of its seconds per step; the evaluations column says how many it got: the best of more evaluations of "
        "a noisy curve is optimistic); test accuracy is not computed. "
        + (
            "AdamW candidates: the bench's recipe (batch 32, warm-up 10% then linear decay, weight decay 0.01), "
            "scored every quarter epoch. The chosen candidate of each method is marked. "
            if adamw
            else f"{len(runs)} candidate(s); AdamW gets three learning rates."
        ),
        "",
        "| candidate | method | preconditioner | minibatch | curvature batch | CG ≤ | average | best val | steps "
        "| s/step | s to best | eval_every | evaluations |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        c = r["config"]
        mark = " (chosen)" if r["name"] in chosen else ""
        hf = c["optimizer"] == "hf"
        pre = c["preconditioner"] if hf else ""
        if hf and pre == "kfac":
            pre = f"kfac ({c['kfac_samples']} draws, every {c['kfac_every']})"
        method = "Hessian-free" if hf else f"AdamW lr {c['lr']:g}"
        curv, cg = (c["curvature_batch"], c["cg_max_iters"]) if hf else ("", "")
        lines.append(f"| {r['name']}{mark} | {method} | {pre} | {c['batch_size']} | {curv} | {cg} | "
                     f"{c.get('average', 0.0):g} | {r['best_val_accuracy']:.4f} | {r['steps']} | "
                     f"{r['seconds_per_step']:.2f} | {r['seconds_to_best']:.0f} | {c['eval_every']} | "
                     f"{r['evaluations']} |")  # fmt: skip
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
