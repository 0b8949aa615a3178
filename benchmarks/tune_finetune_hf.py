"""Choose the Hessian-free step settings of the fine-tuning bench on validation accuracy.

    python benchmarks/tune_finetune_hf.py [--trainable last:1] [--budget 60] [--l2-sp 0.01]
        [--out docs/benchmarks/finetune_hf_tuning.md]

Three candidate step settings (as many runs as AdamW's three learning rates), each one ``fit`` run
from the same start, data order and ``--budget`` seconds of training on the bench's cached features,
L2-SP fixed at ``--l2-sp``; the candidate with the best validation accuracy is the one the bench
uses (``HF_FT`` in ``benchmarks/bench_finetune.py``). Test accuracy is neither computed nor
looked at here. Validation is scored about every ``--eval-seconds`` of training for every candidate
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

from bench_finetune import BUCKET  # noqa: E402
from profile_finetune_step import _prepared, add_report_only, rewrite_report  # noqa: E402

from toolkit.factorize.classify_train import FitConfig, fit, trainable_params  # noqa: E402

# (name, FitConfig fields); --step-seconds gives each one's rough seconds per step (sets eval_every)
CANDIDATES: list[tuple[str, dict[str, Any]]] = [
    ("kfac16-512-64-cg10", {"batch_size": 512, "curvature_batch": 64, "cg_max_iters": 10}),  # the old HF_FT
    (
        "none-512-32-cg10",
        {"batch_size": 512, "curvature_batch": 32, "cg_max_iters": 10, "preconditioner": "none"},
    ),
    (
        "none-256-32-cg5",
        {"batch_size": 256, "curvature_batch": 32, "cg_max_iters": 5, "preconditioner": "none"},
    ),
]


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
                    help="rough seconds per step of each candidate (sets eval_every so that every candidate "
                         "is scored about every --eval-seconds)")  # fmt: skip
    ap.add_argument("--eval-seconds", type=float, default=8.0)
    ap.add_argument(
        "--candidates", default=None, help="comma-separated candidate names to run (default: all)"
    )
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
    start = {n: p.detach().clone() for n, p in trainable_params(model).items()}
    work = ROOT / "runs" / f"tune-finetune-hf-{tag}"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    per_step = [float(x) for x in args.step_seconds.split(",")]
    if args.cpu_clock:
        _cpu_clock(args.threads)
    runs: list[dict[str, Any]] = []
    wanted = None if args.candidates is None else set(args.candidates.split(","))
    for (name, change), sec in zip(CANDIDATES, per_step, strict=True):
        if wanted is not None and name not in wanted:
            continue
        with torch.no_grad():
            for n, p in trainable_params(model).items():
                p.copy_(start[n])
        cfg = FitConfig(optimizer="hf", max_steps=100000, time_budget=args.budget, patience=0, seed=0, bucket=BUCKET,
                        l2_sp=args.l2_sp, train_eval=200, eval_every=max(1, round(args.eval_seconds / sec)),
                        **change)  # fmt: skip
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
    chosen = max(runs, key=lambda r: r["best_val_accuracy"])
    doc = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads,
                       "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
           "trainable": args.trainable, "budget_seconds_per_run": args.budget,
           "budget_clock": "cpu seconds / threads" if args.cpu_clock else "wall", "l2_sp": args.l2_sp,
           "runs": runs, "chosen": chosen["name"], "total_seconds": time.perf_counter() - t_all}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    args.out.write_text(_markdown(doc, args))
    print(f"chosen {chosen['name']}; wrote {args.out} (+ .json)", flush=True)
    return 0


def _markdown(doc: dict[str, Any], args: Any) -> str:
    m, runs = doc["machine"], doc["runs"]
    chosen = next(r for r in runs if r["name"] == doc["chosen"])
    lines = [
        f"# Hessian-free step settings for fine-tuning MiniLM's {doc['trainable']} + head, chosen on validation",
        "",
        f"Written by `python benchmarks/tune_finetune_hf.py --trainable {doc['trainable']} "
        f"--budget {doc['budget_seconds_per_run']:g} --l2-sp {doc['l2_sp']:g} --step-seconds {args.step_seconds}"
        f"{'' if args.eval_seconds == 8.0 else f' --eval-seconds {args.eval_seconds:g}'}"
        f"{'' if args.candidates is None else f' --candidates {args.candidates}'}`; {doc['total_seconds']:.0f} s in all "
        f"(wall); the budget counted on "
        f"{'the CPU clock (process CPU seconds / threads)' if doc['budget_clock'] != 'wall' else 'the wall clock'}. "
        f"Machine: {m['platform']}, {m['cpus']} CPUs shared with other jobs, torch threads {m['torch_threads']}, load "
        f"average {m['loadavg_start'][0]:.1f} at the start, {m['loadavg_end'][0]:.1f} at the end. Each candidate: one "
        f"run of {doc['budget_seconds_per_run']:g} s of training from the same start and data order, L2-SP "
        f"{doc['l2_sp']:g}, scored on validation every `eval_every` steps (set from a rough guess of its seconds per "
        "step; the evaluations column says how many it got: the best of more evaluations of a noisy curve is "
        f"optimistic); test accuracy is not computed. {len(runs)} candidate(s); AdamW gets three learning rates.",
        "",
        "| candidate | preconditioner | minibatch | curvature batch | CG ≤ | best val | steps | s/step | s to best "
        "| eval_every | evaluations |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        c = r["config"]
        mark = " (chosen)" if r is chosen else ""
        pre = (
            f"kfac ({c['kfac_samples']} draws, every {c['kfac_every']})"
            if c["preconditioner"] == "kfac"
            else c["preconditioner"]
        )
        lines.append(f"| {r['name']}{mark} | {pre} "
                     f"| {c['batch_size']} | {c['curvature_batch']} | {c['cg_max_iters']} | {r['best_val_accuracy']:.4f} | "
                     f"{r['steps']} | {r['seconds_per_step']:.2f} | {r['seconds_to_best']:.0f} | {c['eval_every']} | "
                     f"{r['evaluations']} |")  # fmt: skip
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
