"""Where the time of one Hessian-free fine-tuning step through MiniLM's top blocks goes.

    python benchmarks/profile_finetune_step.py [--trainable last:1] [--steps 10] [--threads 2]
        [--config old|new|both] [--out docs/benchmarks/finetune_profile.md]

Runs ``--steps`` steps of ``toolkit.factorize.classify_train.fit``'s Hessian-free step (the bench's
config, ``benchmarks/bench_finetune.py``; "old" = HessianFree's defaults, "new" = the bench's
current HF_FT) on length-bucketed minibatches of the Rotten Tomatoes training split, with every
part of ``toolkit.optim.HessianFree.step`` timed by wrapping the functions it calls (the optimizer
itself is not changed): the K-FAC refresh, the curvature operator's set-up, CG (its curvature
products), the backtracking over CG iterates and the Armijo line search (forwards of the minibatch
without gradient), and the rest (the gradient on the minibatch, bookkeeping). One evaluation
(validation split + the 2,000-text training subset, as ``fit`` scores) is timed too. The report
(markdown + JSON) records the load average before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench_finetune import BUCKET, HF_FT, _splits  # noqa: E402

import toolkit.optim.hessian_free as hfmod  # noqa: E402
from toolkit.factorize.classify import prepare_model  # noqa: E402
from toolkit.factorize.classify_train import FitConfig, _optimizer, _take, epoch_order, evaluate, lengths_of  # noqa: E402
from toolkit.factorize.hf import load_hf, minilm_dir  # noqa: E402
from toolkit.optim.kfac import KFAC  # noqa: E402


class Timer:
    """Seconds per named part; the innermost active part gets the time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[str] = []
        self._t_fwd = 0.0

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()
            self.seconds[name] += time.perf_counter() - t0
            self.calls[name] += 1

    def hook(self, model: torch.nn.Module) -> list[Any]:
        """No-gradient forwards directly inside step() are the backtracking over CG iterates."""

        def pre(*_: Any) -> None:
            self._t_fwd = time.perf_counter()

        def post(*_: Any) -> None:
            if self.stack == ["step"] and not torch.is_grad_enabled():
                self.seconds["backtrack"] += time.perf_counter() - self._t_fwd
                self.calls["backtrack"] += 1

        return [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]


_CURRENT: list[Timer] = []  # the timer the wrapped functions report to


def _wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*a: Any, **k: Any) -> Any:
        with _CURRENT[-1].part(name):
            return fn(*a, **k)

    return wrapped


def _instrument(timer: Timer) -> None:
    """Time HessianFree.step's parts by wrapping what hessian_free.py calls (no change to it)."""
    if not _CURRENT:
        hfmod.conjugate_gradient = _wrap("cg", hfmod.conjugate_gradient)  # type: ignore[assignment]
        hfmod.curvature_operator = _wrap("curvature_setup", hfmod.curvature_operator)  # type: ignore[assignment]
        hfmod.armijo = _wrap("line_search", hfmod.armijo)  # type: ignore[assignment]
        KFAC.update = _wrap("kfac_refresh", KFAC.update)  # type: ignore[method-assign]
    _CURRENT.append(timer)


def add_report_only(ap: argparse.ArgumentParser) -> None:
    """The --report-only option of this script and of tune_finetune_hf.py."""
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite --out from its .json (pass the run's other options, for the command line)",
    )


def rewrite_report(args: argparse.Namespace, markdown: Callable[[dict[str, Any], Any], str]) -> bool:
    """With --report-only: rewrite ``args.out`` from the .json beside it and say so (True)."""
    if not args.report_only:
        return False
    args.out.write_text(markdown(json.loads(args.out.with_suffix(".json").read_text()), args))
    print(f"wrote {args.out}")
    return True


def _prepared(trainable: str) -> Any:
    """The bench's PreparedModel for ``trainable``; the cached features are kept under runs/."""
    cache = ROOT / "runs" / "profile-cache" / f"{trainable.replace(':', '')}.pt"
    dense, tok = load_hf(minilm_dir())
    splits, _ = _splits(False, 64, tok)
    if cache.is_file():
        one = [0]  # one text per split: the model and head as prepare_model makes them, features cached
        parts = {n: getattr(splits, n).subset(one) for n in ("train", "val", "test")}
        tiny = dataclasses.replace(splits, **parts)
        prep = prepare_model(dense, tiny, trainable)
        prep.data = torch.load(cache, weights_only=True)
        return prep
    prep = prepare_model(dense, splits, trainable)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(prep.data, cache)
    return prep


def profile(prep: Any, cfg: FitConfig, steps: int) -> dict[str, Any]:
    """``steps`` Hessian-free steps as ``fit`` takes them, each part timed; one evaluation timed."""
    model = prep.train_model
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    train, val = prep.data["train"], prep.data["val"]
    timer = Timer()
    _instrument(timer)
    handles = timer.hook(model)
    opt = _optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = int(train[1].shape[0])
    order = epoch_order(n, gen, cfg.batch_size, cfg.bucket, lengths_of(train))
    infos, widths = [], []
    t_all = time.perf_counter()
    for s in range(steps):
        idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
        inputs, y = _take(train, idx)
        c_inputs, c_y = _take(train, idx[: min(cfg.curvature_batch, len(idx))])
        widths.append(int(inputs[0].shape[1]))
        model.eval()
        with timer.part("step"):
            info = opt.step(inputs, y, c_inputs, c_y)  # type: ignore[call-overload]
        infos.append(
            {
                "cg_iters": info.cg_iters,
                "step_size": info.step_size,
                "accepted": info.accepted,
                "loss": info.loss,
                "new_loss": info.new_loss,
                "rho": info.rho,
                "damping": info.damping,
            }
        )
    step_total = timer.seconds["step"]
    for h in handles:
        h.remove()
    sub = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 1))[: cfg.train_eval]
    t0 = time.perf_counter()
    v = evaluate(model, val)
    evaluate(model, _take(train, sub))
    eval_s = time.perf_counter() - t0
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(start[name])
    per = {
        "kfac_refresh": timer.seconds["kfac_refresh"],
        "curvature_setup": timer.seconds["curvature_setup"],
        "cg": timer.seconds["cg"],
        "backtrack": timer.seconds["backtrack"],
        "line_search": timer.seconds["line_search"],
    }
    # what is left of step(): the gradient on the minibatch (forward + backward), bookkeeping
    per["gradient_and_rest"] = step_total - sum(per.values())
    return {"steps": steps, "seconds_per_step": {k: x / steps for k, x in per.items()},
            "step_seconds": step_total / steps, "eval_seconds": eval_s, "val_accuracy_after": v["accuracy"],
            "kfac_refreshes": timer.calls["kfac_refresh"],
            "backtrack_forwards": timer.calls["backtrack"], "line_search_calls": timer.calls["line_search"], "mean_width": sum(widths) / len(widths),
            "infos": infos, "wall": time.perf_counter() - t_all}  # fmt: skip


def _settings(text: str) -> dict[str, Any]:
    """'kfac_samples=exact,kfac_every=10' -> FitConfig fields (ints, floats, true/false, else text)."""
    out: dict[str, Any] = {}
    for item in text.split(","):
        key, _, raw = item.partition("=")
        value: Any = raw
        if raw in ("true", "false"):
            value = raw == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(raw)
                    break
                except ValueError:
                    pass
        out[key.strip()] = value
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trainable", default="last:1")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--config",
        action="append",
        default=None,
        help="a setting to profile: 'old' (HessianFree's defaults), 'bench' (the bench's HF_FT) or "
        "FitConfig fields 'key=value,key=value' over 'old' (repeatable; default old and bench)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "finetune_profile.md")
    add_report_only(ap)
    args = ap.parse_args()
    if rewrite_report(args, _markdown):
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()
    prep = _prepared(args.trainable)
    base = FitConfig(
        optimizer="hf", batch_size=512, curvature_batch=64, cg_max_iters=10, seed=0, bucket=BUCKET
    )
    bench_fields: dict[str, Any] = {k: v for k, v in HF_FT.items() if k != "eval_every"}
    bench = dataclasses.replace(base, **bench_fields)
    names = args.config or ["old", "bench"]
    results = {}
    for name in names:
        # old: HessianFree's defaults (K-FAC every 5 steps from 16 draws, line search, warm start)
        cfg = {"old": base, "bench": bench}.get(name) or dataclasses.replace(base, **_settings(name))
        cfg.check()
        results[name] = profile(prep, cfg, args.steps)
        results[name]["config"] = dataclasses.asdict(cfg)
        r = results[name]
        print(f"{name}: {r['step_seconds']:.2f} s/step " + " ".join(f"{k} {x:.2f}" for k, x in r["seconds_per_step"].items())
              + f"; eval {r['eval_seconds']:.1f} s", flush=True)  # fmt: skip
    doc = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads,
                       "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
           "trainable": args.trainable, "results": results}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    args.out.write_text(_markdown(doc, args))
    print(f"wrote {args.out} (+ .json)")
    return 0


def _markdown(doc: dict[str, Any], args: Any) -> str:
    m = doc["machine"]
    parts = list(next(iter(doc["results"].values()))["seconds_per_step"])
    lines = [
        f"# One Hessian-free step through MiniLM's {doc['trainable']} + head: where the time goes",
        "",
        f"Written by `python benchmarks/profile_finetune_step.py --trainable {doc['trainable']} --steps {args.steps}"
        f"{''.join(f' --config {c}' for c in args.config or [])}`. Machine: {m['platform']}, {m['cpus']} CPUs "
        f"shared with other jobs, torch threads {m['torch_threads']}, load average {m['loadavg_start'][0]:.1f} at the "
        f"start, {m['loadavg_end'][0]:.1f} at the end. Minibatches length-bucketed and trimmed, the curvature "
        "sub-batch their first examples; seconds per step, averaged over the steps (a K-FAC refresh every "
        "`kfac_every` steps is spread over them).",
        "",
        "| config | minibatch | curvature batch | CG ≤ | preconditioner | kfac_every | kfac_samples | line_search | "
        + " | ".join(parts)
        + " | step | one evaluation | mean CG iters |",
        "|---|---|---|---|---|---|---|---|" + "---|" * (len(parts) + 3),
    ]
    for name, r in doc["results"].items():
        c = r["config"]
        name = name.replace("|", "/")
        cg = sum(i["cg_iters"] for i in r["infos"]) / len(r["infos"])
        lines.append(f"| {name} | {c['batch_size']} | {c['curvature_batch']} | {c['cg_max_iters']} | {c['preconditioner']} | {c['kfac_every']} | {c['kfac_samples']} | {c['line_search']} | "
                     + " | ".join(f"{r['seconds_per_step'][k]:.2f}" for k in parts)
                     + f" | {r['step_seconds']:.2f} | {r['eval_seconds']:.1f} | {cg:.1f} |")  # fmt: skip
    lines += ["", "backtrack: forwards of the minibatch at CG iterates (Martens' backtracking); line_search: the "
              "Armijo search after it (F at α = 1 is reused); gradient_and_rest: the minibatch gradient (forward + "
              "backward on the minibatch) and bookkeeping.", ""]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
