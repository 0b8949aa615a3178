"""Minibatch fine-tuning of a classifier: Hessian-free (or AdamW) with early stopping and resume.

``fit(model, train, val, config, run_dir)`` trains the parameters ``model`` exposes with
``requires_grad`` on ``train = (inputs tuple, targets)``:

- Hessian-free: gradient on a minibatch of ``batch_size``, curvature on its first
  ``curvature_batch`` examples (Martens & Sutskever 2012; Kiros 2013), through
  ``toolkit.optim.HessianFree`` with L2 / L1 / group lasso / L2-SP.
- AdamW: linear warm-up then linear decay to 0 over ``max_steps``, weight decay on ≥2-D weights.

Every ``eval_every`` steps the validation set and a fixed training subset are scored; the best
validation state is kept (``best.safetensors``), training stops after ``patience`` evaluations
without improvement, after ``max_steps`` or after ``time_budget`` seconds of training. Each
evaluation appends to ``metrics.jsonl`` and rewrites ``checkpoint.pt`` (model, optimizer, step,
data order, history; written atomically, loaded with ``weights_only=True``), so an interrupted run
resumes where it left off. ``curves.png`` plots train / validation accuracy.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.errors import InputError
from toolkit.fsio import atomic_write_bytes
from toolkit.optim.hessian_free import PRECONDITIONERS as HF_PRECONDITIONERS

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]


@dataclass
class FitConfig:
    """Settings of ``fit`` (see the module docstring).

    Attributes:
        optimizer: "hf" (Hessian-free) or "adamw".
        batch_size: gradient minibatch.
        curvature_batch: Hessian-free curvature sub-batch (the first examples of the minibatch).
        max_steps: optimizer steps at most.
        time_budget: seconds of training at most (evaluations not counted); None: no limit.
        eval_every: steps between evaluations.
        patience: evaluations without validation improvement before stopping (0: never stop early).
        l2, l1, group_lasso, l2_sp: penalties (Hessian-free; AdamW uses ``weight_decay``).
        damping, cg_max_iters: Hessian-free settings.
        preconditioner, kfac_every, kfac_samples, line_search, warm_start: Hessian-free settings passed
            to ``toolkit.optim.HessianFree`` (the CG preconditioner "kfac" / "ekfac" / "nystrom" / "diagonal" / "none"; steps
            between K-FAC refreshes; Monte-Carlo draws per example for K-FAC's G, or "exact": one
            backward pass per class, exact and cheaper than draws for few classes; the Armijo line
            search; the decay of the previous CG solution used as CG's start, 0 = off).
        lr, warmup, weight_decay: AdamW settings (warm-up as a fraction of max_steps).
        train_eval: training examples scored at each evaluation (the train curve, the gap).
        seed: data order.
        bucket: length-bucketed minibatches when the inputs carry a (N, T) mask: each window of
            ``bucket`` minibatches of the shuffled order is sorted by text length, cut into
            minibatches, and the minibatches of the window are shuffled (0: plain shuffled order).
            Every text is still seen once an epoch; a minibatch is then trimmed to its longest
            text, so little of it is padding.
        average: iterate averaging, the decay ξ of an exponential moving average of the trained
            parameters, ``avg ← ξ_k avg + (1 − ξ_k) θ_k`` with ξ_k = min(1 − 1/k, ξ) at step k (the K-FAC
            paper, Martens & Grosse 2015, averages its iterates so: it damps the step-to-step noise of a
            stochastic second-order method); evaluations, the best checkpoint and the returned model use the average.
            0: off (the iterate itself).
    """

    optimizer: str = "hf"
    batch_size: int = 256
    curvature_batch: int = 64
    max_steps: int = 200
    time_budget: float | None = None
    eval_every: int = 10
    patience: int = 5
    l2: float = 0.0
    l1: float = 0.0
    group_lasso: float = 0.0
    l2_sp: float = 0.0
    damping: float = 1.0
    cg_max_iters: int = 20
    preconditioner: str = "kfac"
    kfac_every: int = 5
    kfac_samples: int | str = 16
    line_search: bool = True
    warm_start: float = 0.95
    lr: float = 1e-3
    warmup: float = 0.1
    weight_decay: float = 0.01
    train_eval: int = 2000
    seed: int = 0
    bucket: int = 0
    average: float = 0.0

    def check(self) -> None:
        """Raises InputError on a setting out of range."""
        if self.optimizer not in ("hf", "adamw"):
            raise InputError(f"optimizer: expected 'hf' or 'adamw', got {self.optimizer!r}")
        for name in (
            "batch_size",
            "curvature_batch",
            "max_steps",
            "eval_every",
            "cg_max_iters",
            "kfac_every",
            "train_eval",
        ):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        for name in ("l2", "l1", "group_lasso", "l2_sp", "weight_decay", "patience", "bucket"):
            if not getattr(self, name) >= 0:
                raise InputError(f"{name}: expected a number >= 0, got {getattr(self, name)!r}")
        if self.preconditioner not in HF_PRECONDITIONERS:
            raise InputError(
                f"preconditioner: expected one of {list(HF_PRECONDITIONERS)}, got {self.preconditioner!r}"
            )
        s = self.kfac_samples
        if s != "exact" and (isinstance(s, bool) or not isinstance(s, int) or s < 1):
            raise InputError(f"kfac_samples: expected a count >= 1 or 'exact', got {s!r}")
        if not isinstance(self.line_search, bool):
            raise InputError(f"line_search: expected true or false, got {self.line_search!r}")
        if not 0 <= self.average < 1:
            raise InputError(f"average: expected a number in [0, 1), got {self.average!r}")
        if not 0 <= self.warm_start <= 1:
            raise InputError(f"warm_start: expected a number in [0, 1], got {self.warm_start!r}")
        if not (self.lr > 0 and self.damping > 0 and 0 <= self.warmup < 1):
            raise InputError(
                f"lr, damping, warmup: expected > 0, > 0, in [0, 1), got {self.lr}, {self.damping}, {self.warmup}"
            )


@dataclass
class FitResult:
    """What ``fit`` found: the best validation point and the history of evaluations."""

    best_val_accuracy: float = -1.0
    best_step: int = 0
    best_seconds: float = 0.0
    steps: int = 0
    seconds: float = 0.0
    stopped: str = ""
    history: list[dict[str, float]] = field(default_factory=list)


def trainable_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter of everything ``requires_grad``."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def lengths_of(data: Batch) -> torch.Tensor | None:
    """(N,) token counts when the inputs are (features or ids, (N, T) mask); else None."""
    inputs = data[0]
    if len(inputs) == 2 and inputs[1].dim() == 2 and inputs[1].shape[1] > 1:
        return inputs[1].sum(1)
    return None


def epoch_order(
    n: int, gen: torch.Generator, batch_size: int, bucket: int = 0, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """One epoch's order of the ``n`` examples: consecutive ``batch_size`` slices are the minibatches.

    A seeded permutation; with ``bucket`` > 0 and ``lengths``, each window of ``bucket`` minibatches
    is sorted by length (stable), cut into minibatches, and those minibatches shuffled.
    """
    order = torch.randperm(n, generator=gen)
    if bucket <= 0 or lengths is None:
        return order
    window = bucket * batch_size
    parts = []
    for i in range(0, n, window):
        w = order[i : i + window]
        w = w[torch.argsort(lengths[w], stable=True)]
        batches = list(torch.split(w, batch_size))
        full = [b for b in batches if len(b) == batch_size]  # a short last one stays last
        perm = torch.randperm(len(full), generator=gen).tolist()
        parts += [full[j] for j in perm] + [b for b in batches if len(b) != batch_size]
    return torch.cat(parts)


def _take(data: Batch, idx: torch.Tensor) -> Batch:
    inputs, y = data
    picked = tuple(x.index_select(0, idx) for x in inputs)
    if len(picked) == 2 and picked[0].dim() == 3:  # (B, T, d) features + (B, T) mask: trim padding
        width = max(1, int(picked[1].sum(1).max()))
        picked = (picked[0][:, :width].contiguous(), picked[1][:, :width].contiguous())
    elif (
        len(picked) == 2
        and picked[0].dim() == 2
        and picked[1].dim() == 2
        and not picked[0].is_floating_point()
    ):
        width = max(1, int(picked[1].sum(1).max()))  # (B, T) ids + mask
        picked = (picked[0][:, :width].contiguous(), picked[1][:, :width].contiguous())
    return picked, y.index_select(0, idx)


@torch.no_grad()
def evaluate(model: nn.Module, data: Batch, batch_size: int = 512) -> dict[str, float]:
    """Accuracy, macro-F1 and mean cross-entropy of ``model`` on ``data``."""
    model.eval()
    n = int(data[1].shape[0])
    preds, loss = [], 0.0
    for i in range(0, n, batch_size):
        inputs, y = _take(data, torch.arange(i, min(n, i + batch_size)))
        logits = model(*inputs)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        preds.append(logits.argmax(-1))
    pred, y = torch.cat(preds), data[1]
    k = int(max(int(y.max()), int(pred.max())) + 1)
    f1s = []
    for c in range(k):
        tp = int(((pred == c) & (y == c)).sum())
        fp, fn = int(((pred == c) & (y != c)).sum()), int(((pred != c) & (y == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0)
    return {"accuracy": float((pred == y).double().mean()), "macro_f1": sum(f1s) / len(f1s), "loss": loss / n}


def _state_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_params(model: nn.Module, path: Path) -> None:
    """The trainable parameters as safetensors, written atomically."""
    from safetensors.torch import save

    tensors = {n: p.detach().cpu().contiguous() for n, p in trainable_params(model).items()}
    atomic_write_bytes(path, save(tensors))


def load_params(model: nn.Module, path: Path) -> None:
    """Load what ``save_params`` wrote into the model's trainable parameters."""
    from safetensors.torch import load_file

    got = load_file(str(path))
    with torch.no_grad():
        for n, p in trainable_params(model).items():
            p.copy_(got[n])


def _optimizer(model: nn.Module, cfg: FitConfig) -> torch.optim.Optimizer:
    params = list(trainable_params(model).values())
    if not params:
        raise InputError("trainable: expected at least one trainable parameter, got none")
    if cfg.optimizer == "adamw":
        decay = [p for p in params if p.dim() >= 2]
        rest = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
    from toolkit.optim import HessianFree

    return HessianFree(
        model, F.cross_entropy, params=params, l2=cfg.l2, l1=cfg.l1, group_lasso=cfg.group_lasso,
        l2_sp=cfg.l2_sp, damping=cfg.damping, cg_max_iters=cfg.cg_max_iters, cg_min_iters=min(5, cfg.cg_max_iters),
        preconditioner=cfg.preconditioner, kfac_every=cfg.kfac_every, kfac_samples=cfg.kfac_samples,
        line_search=cfg.line_search, warm_start=cfg.warm_start, seed=cfg.seed,
    )  # fmt: skip


def _lr_factor(step: int, cfg: FitConfig) -> float:
    warm = max(1, int(cfg.warmup * cfg.max_steps))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (cfg.max_steps - step) / max(1, cfg.max_steps - warm))


def plot_curves(history: list[dict[str, float]], path: Path, title: str = "") -> None:
    """Train / validation accuracy against step (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["train_accuracy"] for h in history], label="train (subset)")
    ax.plot(steps, [h["val_accuracy"] for h in history], label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def fit(
    model: nn.Module,
    train: Batch,
    val: Batch,
    cfg: FitConfig,
    run_dir: str | Path,
    *,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    interrupt_after: int | None = None,
) -> FitResult:
    """Train ``model``'s trainable parameters (see the module docstring); the best state is loaded back.

    Args:
        model: ``model(*inputs)`` -> logits (B, K); only parameters with ``requires_grad`` are trained.
        train, val: (inputs tuple, (N,) int64 targets).
        cfg: FitConfig.
        run_dir: checkpoint.pt, best.safetensors, metrics.jsonl, curves.png go here (resumed if present).
        progress: called (step, max_steps, last evaluation) after each step.
        interrupt_after: stop (as if killed) after this many steps of this call: for tests of resume.

    Returns:
        FitResult (also written as result.json).
    """
    cfg.check()
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    n = int(train[1].shape[0])
    opt = _optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    lengths = lengths_of(train)
    order, pos, step, elapsed = epoch_order(n, gen, cfg.batch_size, cfg.bucket, lengths), 0, 0, 0.0
    res = FitResult()
    # the iterate average (FitConfig.average): None when off
    avg = param_copy(model) if cfg.average > 0 else None
    ckpt = run / "checkpoint.pt"
    settings = json.dumps({"config": asdict(cfg), "params": {k: list(p.shape) for k, p in trainable_params(model).items()},
                           "examples": n})  # fmt: skip
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        if state.get("settings") != settings:
            raise InputError(
                f"{ckpt}: expected a checkpoint of this run's settings, model and data to resume, got one of "
                "another run: pass another --run-dir or delete it"
            )
        load_params_from(model, state["params"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["rng"])
        order, pos, step, elapsed = (
            state["order"],
            int(state["pos"]),
            int(state["step"]),
            float(state["elapsed"]),
        )
        res = FitResult(**json.loads(state["result"]))
        if "average" in state:
            avg = state["average"]
    sub = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 1))[: cfg.train_eval]
    train_sub = _take(train, sub)
    bad = sum(1 for _ in _since_best(res))
    last: dict[str, float] = res.history[-1] if res.history else {}
    done_here = 0
    while True:
        if step >= cfg.max_steps:
            res.stopped = "max_steps"
            break
        if cfg.time_budget is not None and elapsed >= cfg.time_budget:
            res.stopped = "time_budget"
            break
        if cfg.patience and bad >= cfg.patience:
            res.stopped = "early_stopping"
            break
        if interrupt_after is not None and done_here >= interrupt_after:
            res.stopped = "interrupted"
            return res
        t0 = time.perf_counter()
        if pos + cfg.batch_size > n:
            order, pos = epoch_order(n, gen, cfg.batch_size, cfg.bucket, lengths), 0
        idx = order[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        inputs, y = _take(train, idx)
        model.eval()  # no dropout: the same deterministic function for every optimizer
        if cfg.optimizer == "hf":
            m = min(cfg.curvature_batch, len(idx))
            c_inputs, c_y = _take(train, idx[:m])
            opt.step(inputs, y, c_inputs, c_y)  # type: ignore[call-overload]
        else:
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _lr_factor(step, cfg)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(*inputs), y)
            loss.backward()
            opt.step()
        step += 1
        done_here += 1
        if avg is not None:
            _update_average(avg, model, min(1.0 - 1.0 / step, cfg.average))
        elapsed += time.perf_counter() - t0
        # the last step before the time budget runs out is scored too
        out_of_time = cfg.time_budget is not None and elapsed >= cfg.time_budget
        if step % cfg.eval_every == 0 or step >= cfg.max_steps or out_of_time:
            current = _swap_in(model, avg)  # score (and keep) the average when averaging
            v, t = evaluate(model, val), evaluate(model, train_sub)
            last = {"step": step, "seconds": elapsed, "train_accuracy": t["accuracy"], "train_loss": t["loss"],
                    "val_accuracy": v["accuracy"], "val_macro_f1": v["macro_f1"], "val_loss": v["loss"]}  # fmt: skip
            if not all(math.isfinite(x) for x in last.values()):
                raise FloatingPointError(f"step {step}: non-finite metrics {last}")
            res.history.append(last)
            if v["accuracy"] > res.best_val_accuracy:
                res.best_val_accuracy, res.best_step, res.best_seconds = v["accuracy"], step, elapsed
                save_params(model, run / "best.safetensors")
                bad = 0
            else:
                bad += 1
            _swap_in(model, current)
            with (run / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(last) + "\n")
            res.steps, res.seconds = step, elapsed
            state = {
                "params": param_copy(model), **({"average": avg} if avg is not None else {}),
                "optimizer": opt.state_dict(), "rng": gen.get_state(), "order": order, "pos": pos,
                "step": step, "elapsed": elapsed, "result": json.dumps(asdict(res)), "settings": settings,
            }  # fmt: skip
            atomic_write_bytes(ckpt, _state_bytes(state))
        if progress is not None:
            progress(step, cfg.max_steps, last)
    res.steps, res.seconds = step, elapsed
    _swap_in(model, avg)  # without a best checkpoint the model returned is the average
    if (run / "best.safetensors").is_file():
        load_params(model, run / "best.safetensors")
    if res.history:
        plot_curves(res.history, run / "curves.png", f"{cfg.optimizer}")
    atomic_write_bytes(run / "result.json", (json.dumps(asdict(res), indent=2) + "\n").encode())
    return res


def _since_best(res: FitResult) -> list[dict[str, float]]:
    """Evaluations after the best one (for resuming the patience counter)."""
    return [h for h in res.history if h["step"] > res.best_step]


def load_params_from(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy name -> tensor into the model's trainable parameters."""
    with torch.no_grad():
        for n, p in trainable_params(model).items():
            p.copy_(tensors[n])


def param_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the trainable parameters, name -> tensor."""
    return {n: p.detach().clone() for n, p in trainable_params(model).items()}


@torch.no_grad()
def _update_average(avg: dict[str, torch.Tensor], model: nn.Module, decay: float) -> None:
    """avg ← decay · avg + (1 − decay) · θ, in place."""
    for n, p in trainable_params(model).items():
        avg[n].mul_(decay).add_(p.detach(), alpha=1.0 - decay)


def _swap_in(model: nn.Module, tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """Load ``tensors`` into the trainable parameters and return what they held (None: no change)."""
    if tensors is None:
        return None
    held = param_copy(model)
    load_params_from(model, tensors)
    return held
