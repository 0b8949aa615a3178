"""Hessian-free vs Adam, L-BFGS and SOAP on four problems; HF settings sweep; CG preconditioners; cost.

Writes docs/benchmarks/optim.md, optim.json and optim_loss_vs_time.png (or under --out).

All in ONE process, ``torch.set_num_threads(2)`` by default, one method after another, each with the
same wall-clock training budget (evaluation excluded from its clock):

1. Problems, side by side: (a) the factorized digits autoencoder of graphs/autoencoder.yaml,
   (b) the dense Martens-style autoencoder 64-400-200-100-50-25-6 mirrored on digits, (c) the same
   architecture at 784 inputs on the synthetic CURVES images of ``toolkit.data.curves_dataset``,
   (d) a digits MLP classifier 64-256-256-10 (cross-entropy). Martens' sparse init for all.
   Autoencoders: squared error summed over pixels, averaged over examples. Splits: train /
   validation (choice of settings) / test (reported).
2. Methods: HessianFree with its code defaults and one-change variants (the settings sweep, chosen on
   validation loss; on the classifier the mean over 3 init seeds, ``--seeds``), full-batch gradient; Adam at three learning rates (minibatch 100; final and best
   test loss); torch.optim.LBFGS (full batch, strong Wolfe); heavyball SOAP (minibatch 100, eager).
3. CG preconditioners: at the end point of the default HF run, CG iterations and time to the same
   relative residual and to 99% of the quadratic-model reduction, with none / diagonal / kfac, and
   with the exact inverse of K-FAC's layer blocks (the block-Jacobi reference K-FAC approximates).
4. Cost: one Gauss-Newton product / one gradient for the MNIST-sized 784-1000-500-250-30 autoencoder
   at batch 1000 and for each benchmarked model at its curvature batch.
5. GPU: the cost ratios on CUDA, eager and torch.compile'd, when CUDA is available.

Usage: python benchmarks/bench_optim.py [--quick] [--budget SECONDS] [--threads N] [--out DIR]
       [--problems P,...] [--sweep ROW,...] [--seeds PROBLEM=K,...]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from toolkit.optim import HessianFree  # noqa: E402
from toolkit.optim.block_gn import BlockGaussNewton  # noqa: E402
from toolkit.optim.cg import CGResult, conjugate_gradient  # noqa: E402
from toolkit.optim.curvature import curvature_operator  # noqa: E402
from toolkit.optim.flat import FlatParams  # noqa: E402
from toolkit.optim.kfac import KFAC  # noqa: E402
from toolkit.optim.nystrom import Nystrom  # noqa: E402
from toolkit.optim.preconditioner import preconditioner, squared_gradient_diagonal  # noqa: E402

SEED = 0
MODES = ("double_vjp", "linearize", "jvp")
ADAM_LRS = (1e-3, 3e-3, 1e-2)
MINIBATCH = 100
# the settings sweep: each variant changes one thing of the code defaults ({} = the defaults)
SWEEP: dict[str, dict[str, Any]] = {
    "defaults": {},
    "preconditioner=none": {"preconditioner": "none"},
    "preconditioner=diagonal": {"preconditioner": "diagonal"},
    "preconditioner=ekfac": {"preconditioner": "ekfac"},
    "preconditioner=nystrom": {"preconditioner": "nystrom"},
    "fixed CG cap 50": {"adaptive_cg": False, "cg_max_iters": 50},
    "CG cap grows up to 250 (Martens; the former default)": {"cg_max_iters": 250},
    "base curvature fraction 0.1 (the former default)": {"curvature_fraction": 0.1},
    "adaptive curvature batch (grows from the base fraction)": {"adaptive_curvature": True},
    "kfac_samples=1 (one draw)": {"kfac_samples": 1},
}
QUICK_SWEEP = ("defaults", "preconditioner=none")
# initialisation seeds per problem for the sweep's scores (mean over seeds 0..k-1; default 1). The classifier
# reaches ~1e-8 train loss within the budget, and its best validation loss then varies more between init
# seeds (sd ~0.016 around 0.04) than between the sweep's rows: one seed would rank the rows by noise.
SWEEP_SEEDS = {"digits-MLP": 3}
CG_EARLY_STEP = 5  # section 4 also compares the preconditioners after this outer step
# section 4's curvature batch, a fraction of the training set: 10% (120 examples), that of every earlier report,
# where the exact layer blocks fit in memory (at HF's default 30% they need factorizations of order 23,040)
CG_FRACTION = 0.1
NYSTROM_RANKS = (50, 150)
NYSTROM_BIG = f"nyström {NYSTROM_RANKS[-1]}"
EXACT = "exact layer blocks (bound)"  # section 4's block-Jacobi column: the exact inverse of K-FAC's blocks


def hf_defaults() -> dict[str, Any]:
    """HessianFree's keyword defaults, read from its signature (what `HessianFree(model, loss)` uses)."""
    sig = inspect.signature(HessianFree.__init__)
    keys = ("preconditioner", "kfac_every", "kfac_damping", "kfac_samples", "adaptive_cg", "cg_initial_iters", "cg_max_iters",
            "curvature_fraction", "adaptive_curvature", "damping", "preconditioner_alpha")  # fmt: skip
    return {k: sig.parameters[k].default for k in keys}


# ------------------------------------------------------------------ problems
def sum_squared(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over features, averaged over the batch."""
    return (out - target).pow(2).sum(1).mean()


def sparse_init_(model: nn.Module, fan_in: int = 15, seed: int = SEED) -> None:
    """Martens' (2010) sparse init: each unit gets ``fan_in`` nonzero N(0, 1) incoming weights, biases 0.

    A factorized layer gets the balanced rank-r truncated SVD of such a sparse dense weight.
    """
    from toolkit.layers import FactorizedLinear

    gen = torch.Generator().manual_seed(seed)

    def sparse(out_f: int, in_f: int) -> torch.Tensor:
        w = torch.zeros(out_f, in_f)
        k = min(fan_in, in_f)
        for row in range(out_f):
            idx = torch.randperm(in_f, generator=gen)[:k]
            w[row, idx] = torch.randn(k, generator=gen)
        return w

    inner = {id(m) for f in model.modules() if isinstance(f, FactorizedLinear) for m in (f.U, f.V)}
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, FactorizedLinear):
                w = sparse(mod.out_features, mod.in_features)
                p, sv, qh = torch.linalg.svd(w.double(), full_matrices=False)
                root = sv[: mod.rank].sqrt()
                mod.U.weight.copy_((p[:, : mod.rank] * root).float())
                mod.V.weight.copy_((root[:, None] * qh[: mod.rank]).float())
                if mod.U.bias is not None:
                    mod.U.bias.zero_()
            elif isinstance(mod, nn.Linear) and id(mod) not in inner:
                mod.weight.copy_(sparse(mod.out_features, mod.in_features))
                if mod.bias is not None:
                    mod.bias.zero_()


def mirrored_autoencoder(dims: list[int]) -> nn.Sequential:
    """Sigmoid encoder dims[0] -> dims[-1] (linear code), mirrored decoder with a linear output."""
    layers: list[nn.Module] = []
    widths = dims + dims[-2::-1]
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i not in (len(dims) - 2, len(widths) - 2):
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


@dataclass
class Problem:
    """A model, its loss and its splits (x, y) for train / val / test."""

    name: str
    short: str
    model: nn.Module
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    note: str


def reseeded(prob: Problem, seed: int) -> Problem:
    """The problem with its model re-initialised by ``sparse_init_`` at ``seed`` (same data)."""
    model = copy.deepcopy(prob.model)
    sparse_init_(model, seed=seed)
    return replace(prob, model=model)


def _splits(x: np.ndarray, y: np.ndarray, n_val: int, n_test: int) -> tuple[tuple[torch.Tensor, ...], ...]:
    perm = np.random.default_rng(SEED).permutation(len(x))
    xt, yt = torch.from_numpy(x[perm]), torch.from_numpy(y[perm])
    n_tr = len(x) - n_val - n_test
    return (xt[:n_tr], yt[:n_tr]), (xt[n_tr : n_tr + n_val], yt[n_tr : n_tr + n_val]), (xt[n_tr + n_val :], yt[n_tr + n_val :])  # fmt: skip


def problems(quick: bool) -> list[Problem]:
    from sklearn.datasets import load_digits

    from toolkit.builder import build_model
    from toolkit.data import curves_dataset
    from toolkit.spec import load_spec

    digits = load_digits()
    px = (digits.data / 16.0).astype(np.float32)
    ae_tr, ae_va, ae_te = _splits(px, px, 300, 300)
    cls_tr, cls_va, cls_te = _splits(px, digits.target.astype(np.int64), 300, 300)
    n_curves = 1200 if quick else 1800
    cx = curves_dataset(n_curves, seed=SEED).reshape(n_curves, -1)
    cu_tr, cu_va, cu_te = _splits(cx, cx, n_curves // 6, n_curves // 6)

    torch.manual_seed(SEED)
    fact = build_model(load_spec(ROOT / "graphs" / "autoencoder.yaml"), seed=SEED)
    dense = mirrored_autoencoder([64, 400, 200, 100, 50, 25, 6])
    curves = mirrored_autoencoder([784, 400, 200, 100, 50, 25, 6])
    mlp = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    for m in (fact, dense, curves, mlp):
        sparse_init_(m)
    return [
        Problem("factorized digits AE (graphs/autoencoder.yaml)", "fact-AE", fact, sum_squared,
                ae_tr, ae_va, ae_te, "spec's low-rank layers, 64-400-200-100-50-25-6 mirrored"),
        Problem("dense digits AE 64-400-200-100-50-25-6", "dense-AE", dense, sum_squared,
                ae_tr, ae_va, ae_te, "Martens' CURVES architecture at 64 inputs"),
        Problem("CURVES AE 784-400-200-100-50-25-6", "curves-AE", curves, sum_squared,
                cu_tr, cu_va, cu_te, f"toolkit.data.curves_dataset({n_curves}), 28x28 = 784 inputs"),
        Problem("digits MLP classifier 64-256-256-10", "digits-MLP", mlp, F.cross_entropy,
                cls_tr, cls_va, cls_te, "tanh, cross-entropy"),
    ]  # fmt: skip


# ------------------------------------------------------------------ traces
@dataclass
class Trace:
    """Losses against training time for one method on one problem."""

    name: str
    times: list[float] = field(default_factory=list)
    train: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    test: list[float] = field(default_factory=list)
    steps: int = 0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def best_test(self) -> float:
        """Test loss at the evaluation with the lowest validation loss (early stopping)."""
        finite = [(v, t) for v, t in zip(self.val, self.test) if math.isfinite(v)]
        return min(finite)[1] if finite else math.nan


class Clock:
    """Training time only: paused while evaluating."""

    def __init__(self) -> None:
        self.elapsed = 0.0
        self._t = time.perf_counter()

    def pause(self) -> None:
        self.elapsed += time.perf_counter() - self._t

    def resume(self) -> None:
        self._t = time.perf_counter()

    def now(self) -> float:
        return self.elapsed + time.perf_counter() - self._t


def evaluate(model: nn.Module, loss: Callable, split: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(loss(model(split[0]), split[1]))


def run_method(name: str, prob: Problem, model: nn.Module, step: Callable[[], None], budget: float) -> Trace:
    trace = Trace(name)
    eval_every = max(budget / 30, 0.2)

    def record(t: float) -> None:
        trace.times.append(t)
        for attr, split in (("train", prob.train), ("val", prob.val), ("test", prob.test)):
            getattr(trace, attr).append(evaluate(model, prob.loss, split))

    record(0.0)
    clock = Clock()
    next_eval = eval_every
    while clock.now() < budget:
        step()
        trace.steps += 1
        t = clock.now()
        if t >= next_eval or t >= budget:
            clock.pause()
            record(t)
            next_eval = t + eval_every
            clock.resume()
            if not math.isfinite(trace.train[-1]):
                trace.note = "diverged"
                break
    return trace


def minibatches(prob: Problem, seed: int = SEED) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """Minibatches of MINIBATCH, reshuffled every epoch."""
    x, y = prob.train
    gen = torch.Generator().manual_seed(seed)
    state = {"perm": torch.randperm(len(x), generator=gen), "pos": 0}

    def nxt() -> tuple[torch.Tensor, torch.Tensor]:
        if state["pos"] + MINIBATCH > len(x):
            state["perm"], state["pos"] = torch.randperm(len(x), generator=gen), 0
        idx = state["perm"][state["pos"] : state["pos"] + MINIBATCH]
        state["pos"] += MINIBATCH
        return x[idx], y[idx]

    return nxt


def run_hf(
    prob: Problem, settings: dict[str, Any], budget: float, name: str, snapshot_after: int = 0
) -> tuple[Trace, nn.Module, HessianFree, tuple[nn.Module, float] | None]:
    """One HF run; also (a copy of the model, λ) after outer step ``snapshot_after`` (0: none)."""
    model = copy.deepcopy(prob.model)
    opt = HessianFree(model, prob.loss, **settings)
    infos = []
    x, y = prob.train
    snapshot: list[tuple[nn.Module, float]] = []

    def step() -> None:
        infos.append(opt.step((x,), y))
        if len(infos) == snapshot_after:
            snapshot.append((copy.deepcopy(model), opt.damping))

    tr = run_method(name, prob, model, step, budget)
    if infos:
        cg = [i.cg_iters for i in infos]
        g = opt.state_dict()["state"]["hessian_free"]
        tr.note = (
            f"{len(infos)} outer steps, CG iters mean {statistics.mean(cg):.0f} (max {max(cg)}, final cap "
            f"{g['cg_cap']}), final λ {opt.damping:.2g}, rejected {sum(not i.accepted for i in infos)}"
        )
        tr.extra = {"outer_steps": len(infos), "cg_mean": statistics.mean(cg), "final_damping": opt.damping,
                    "seconds_per_step": statistics.mean(i.seconds for i in infos)}  # fmt: skip
    return tr, model, opt, (snapshot[0] if snapshot else None)


def run_adam(prob: Problem, lr: float, budget: float) -> Trace:
    model = copy.deepcopy(prob.model)
    adam = torch.optim.Adam(model.parameters(), lr=lr)
    nxt = minibatches(prob)

    def step() -> None:
        xb, yb = nxt()
        adam.zero_grad(set_to_none=True)
        prob.loss(model(xb), yb).backward()
        adam.step()

    tr = run_method(f"Adam lr={lr:g}", prob, model, step, budget)
    tr.note = f"{tr.steps} minibatch steps (batch {MINIBATCH})"
    return tr


def run_lbfgs(prob: Problem, budget: float) -> Trace:
    model = copy.deepcopy(prob.model)
    opt = torch.optim.LBFGS(
        model.parameters(), lr=1.0, max_iter=5, history_size=100, line_search_fn="strong_wolfe"
    )
    x, y = prob.train

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = prob.loss(model(x), y)
        loss.backward()
        return loss

    tr = run_method("L-BFGS (strong Wolfe)", prob, model, lambda: opt.step(closure), budget)
    tr.note = f"{tr.steps} calls of step (max_iter 5, history 100, full batch)"
    return tr


def run_soap(prob: Problem, budget: float) -> Trace:
    import heavyball
    import heavyball.utils

    heavyball.utils.compile_mode = None  # eager: no torch.compile on CPU
    model = copy.deepcopy(prob.model)
    opt = heavyball.SOAP(model.parameters(), lr=3e-3, weight_decay=0.0)
    nxt = minibatches(prob)

    def step() -> None:
        xb, yb = nxt()
        opt.zero_grad(set_to_none=True)
        prob.loss(model(xb), yb).backward()
        opt.step()

    tr = run_method("SOAP (heavyball, lr 3e-3)", prob, model, step, budget)
    tr.note = f"{tr.steps} minibatch steps (batch {MINIBATCH}), eager"
    return tr


def time_to(trace: Trace, target: float) -> float | None:
    for t, loss in zip(trace.times, trace.train):
        if loss <= target:
            return t
    return None


# ------------------------------------------------------------- CG section
def cg_comparison(
    prob: Problem, model: nn.Module, opt: HessianFree, damping: float, max_iters: int
) -> dict[str, Any]:
    """CG with none / diagonal / kfac on the GN system at ``model``'s point of an HF run, λ = ``damping``.

    Also with the exact inverse of K-FAC's layer blocks (``BlockGaussNewton``, "exact layer blocks
    (bound)"), the block-Jacobi preconditioner K-FAC approximates: the reference for what better
    blocks could give; skipped (with the reason) where its factorizations would exceed its ``max_rows``.
    """
    x, y = prob.train
    params = list(model.parameters())
    flat = FlatParams(model, params)
    theta = flat.flatten()
    m = max(1, math.ceil(CG_FRACTION * len(x)))
    cx, cy = x[:m], y[:m]
    lam = max(damping, 1e-4)
    with torch.enable_grad():
        th = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(prob.loss(flat.function((x,))(th), y), th)
        op = curvature_operator(flat.function((cx,)), lambda z: prob.loss(z, cy), theta, "ggn")

    def damped(v: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            return op(v) + lam * v

    builds: dict[str, Callable[[], Any]] = {"none": lambda: None}

    def diag() -> torch.Tensor:
        with torch.enable_grad():
            d = squared_gradient_diagonal(lambda t, xx: flat.function(xx)(t), prob.loss, theta, (cx,), cy)
        return preconditioner(d, lam, 0.75)

    def kfac(
        mode: str, samples: int | str = opt.defaults["kfac_samples"], corrected: bool = False
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        k = KFAC(model, params, flat.offsets, samples=samples, corrected=corrected)
        with torch.enable_grad():
            k.update((cx,), lambda z: prob.loss(z, cy))
        return k.inverse(lam, mode=mode)

    builds["diagonal"] = diag
    builds["kfac"] = lambda: kfac("eigen")
    builds["kfac, 1 sample"] = lambda: kfac("eigen", 1)
    builds["kfac (π-damping)"] = lambda: kfac("pi")
    builds["ekfac"] = lambda: kfac("eigen", corrected=True)

    def nystrom(rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        sketch = Nystrom(rank)
        with torch.enable_grad():
            sketch.update(op, theta)
        return sketch.inverse(lam)

    for rank in NYSTROM_RANKS:
        builds[f"nyström {rank}"] = lambda rank=rank: nystrom(rank)

    def exact_blocks() -> Callable[[torch.Tensor], torch.Tensor]:
        blocks = BlockGaussNewton(model, params, flat.offsets)
        with torch.enable_grad():
            blocks.update((cx,), lambda z: prob.loss(z, cy))
        out["exact_block_sizes"] = blocks.sizes()
        return blocks.inverse(lam)

    builds[EXACT] = exact_blocks
    out: dict[str, Any] = {"damping": lam, "curvature_batch": m, "kfac_samples": opt.defaults["kfac_samples"],
                           "max_iters": max_iters}  # fmt: skip
    runs = {}
    b_norm = float(g.norm())
    for name, build in builds.items():
        t0 = time.perf_counter()
        try:
            pre = build()
        except ValueError as err:  # only the exact blocks refuse (too large to factorize)
            if name != EXACT:
                raise
            out[name] = {"skipped": str(err)}
            continue
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        if (
            name == EXACT
        ):  # an apply costs 10-25 GN products: run only as far as both targets (q* of the others)
            q_others = min(min(r.q_history) for r, *_ in runs.values())
            res = _cg_to_targets(damped, -g, pre, max_iters, 1e-2, 0.99 * q_others)
        else:
            res = conjugate_gradient(
                damped, -g, preconditioner=pre, max_iters=max_iters, tol=0, residual_tol=0
            )
        t_cg = time.perf_counter() - t0
        runs[name] = (res, t_build, t_cg)
    # q*: the lowest quadratic-model value any of them reached within the cap (all but the exact blocks run to
    # the cap; the exact blocks, which stop at the targets, are left out so that the other columns do not move)
    q_best = min(min(r.q_history) for n, (r, *_) in runs.items() if n != EXACT)
    for name, (res, t_build, t_cg) in runs.items():
        q99 = next((i for i, q in enumerate(res.q_history) if q <= 0.99 * q_best), None)
        q90 = next((i for i, q in enumerate(res.q_history) if q <= 0.9 * q_best), None)
        resid = next((i for i, r in enumerate(res.residual_history) if r <= 1e-2 * b_norm), None)
        out[name] = {"iters_to_residual": resid, "reason": res.reason, "iters_to_q90": q90, "iters_to_q99": q99,
                     "final_q_over_best": min(res.q_history) / q_best, "build_s": t_build, "cg_s": t_cg,
                     "s_per_iter": t_cg / max(res.iters, 1), "iters_run": res.iters}  # fmt: skip
    return out


def _cg_to_targets(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    pre: Callable[[torch.Tensor], torch.Tensor],
    max_iters: int,
    residual_tol: float,
    q_target: float,
) -> CGResult:
    """Preconditioned CG until ‖r‖ has reached ``residual_tol``·‖b‖ and q ≤ ``q_target`` (or ``max_iters``)."""
    r_stop = residual_tol * float(b.norm())
    reached = [False]  # the residual is not monotone in CG: remember that it got there

    def both(i: int, q: float, r_norm: float) -> bool:
        reached[0] = reached[0] or r_norm <= r_stop
        return reached[0] and q <= q_target

    res = conjugate_gradient(
        matvec, b, preconditioner=pre, max_iters=max_iters, tol=0, residual_tol=0, stop=both
    )
    return res


# ----------------------------------------------------------- cost section
def _median_time(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_cost(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: Callable,
    reps: int,
    compile_product: bool = False,
) -> dict[str, float]:
    """Median seconds of one gradient and of one curvature product (three jvp modes), interleaved."""
    params = list(model.parameters())
    flat = FlatParams(model, params)
    theta = flat.flatten()

    def gradient() -> None:
        for p in params:
            p.grad = None
        loss(model(x), y).backward()

    ops = {}
    build = {}
    for mode in MODES:
        t = time.perf_counter()
        ops[mode] = curvature_operator(flat.function((x,)), lambda z: loss(z, y), theta, "ggn", mode)
        build[mode] = time.perf_counter() - t
    if compile_product:
        ops = {mode: torch.compile(op) for mode, op in ops.items()}
    v = torch.randn_like(theta)
    out: dict[str, list[float]] = {"grad": [], **{mode: [] for mode in MODES}}
    for _ in range(3):  # interleave to share the noise
        out["grad"].append(_median_time(gradient, reps))
        for mode in MODES:
            out[mode].append(_median_time(lambda mode=mode: ops[mode](v), reps))
    res = {k: min(vals) for k, vals in out.items()}
    res.update({f"build_{mode}": build[mode] for mode in MODES})
    return res


# ------------------------------------------------------------------ report
def plot(results: dict[str, list[Trace]], path: Path, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(4.2 * len(results), 7.5), squeeze=False)
    for col, (pname, traces) in enumerate(results.items()):
        for tr in traces:
            if tr.name.startswith("HF ") and tr.name not in ("HF defaults", "HF preconditioner=none"):
                continue
            axes[0, col].plot(tr.times, tr.train, label=tr.name)
            axes[1, col].plot(tr.times, tr.test, label=tr.name)
        for row, what in enumerate(("train", "test")):
            ax = axes[row, col]
            ax.set_yscale("log")
            ax.set_title(f"{pname}: {what}", fontsize=9)
            ax.set_xlabel("training time (s)")
            ax.grid(alpha=0.3)
    axes[1, -1].legend(fontsize=7)
    fig.suptitle(f"equal wall-clock budget {budget:g} s per method, {torch.get_num_threads()} CPU threads")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    plt.close(fig)


def fmt(v: float | None, spec: str = ".4g") -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def fmt_time(t: float | None) -> str:
    return "not reached" if t is None else f"{t:.1f} s"


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def thread_check(seconds: float) -> dict[int, float]:
    """Adam steps per second on the dense digits AE at 1 and 2 intra-op threads, side by side."""
    before = torch.get_num_threads()
    out = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        torch.manual_seed(SEED)
        m = mirrored_autoencoder([64, 400, 200, 100, 50, 25, 6])
        opt = torch.optim.Adam(m.parameters())
        x = torch.rand(MINIBATCH, 64)
        t0, steps = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            opt.zero_grad(set_to_none=True)
            sum_squared(m(x), x).backward()
            opt.step()
            steps += 1
        out[n] = steps / (time.perf_counter() - t0)
    torch.set_num_threads(before)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets and a 2-row sweep (~2 minutes)")
    parser.add_argument("--budget", type=float, default=None, help="seconds per method (default 25, quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks", help="output directory")
    parser.add_argument(
        "--problems",
        default=None,
        help="comma-separated problem names to run (default all: fact-AE,dense-AE,curves-AE,digits-MLP)",
    )
    parser.add_argument(
        "--sweep",
        default=None,
        help="comma-separated sweep rows to run (default all; 'defaults' and 'preconditioner=none' always run)",
    )
    parser.add_argument(
        "--seeds",
        default=",".join(f"{k}={v}" for k, v in SWEEP_SEEDS.items()),
        help="PROBLEM=K,...: score the sweep on PROBLEM by the mean over init seeds 0..K-1 (default %(default)s; "
        "other problems 1)",
    )
    args = parser.parse_args()
    try:
        seeds = {k.strip(): int(v) for k, v in (kv.split("=") for kv in args.seeds.split(",") if kv.strip())}
    except ValueError:
        parser.error(f"--seeds: expected PROBLEM=K,..., got {args.seeds!r}")
    if any(k < 1 for k in seeds.values()):
        parser.error(f"--seeds: K must be ≥ 1, got {args.seeds!r}")
    budget = args.budget if args.budget is not None else (1.0 if args.quick else 25.0)
    reps = 2 if args.quick else 10
    sweep = {k: SWEEP[k] for k in QUICK_SWEEP} if args.quick else SWEEP
    if args.sweep is not None:
        always = ["defaults", "preconditioner=none"]  # sections 3 and 4 read these two
        wanted = [*always, *(k.strip() for k in args.sweep.split(",") if k.strip() not in always)]
        unknown = [k for k in wanted if k not in SWEEP]
        if unknown:
            parser.error(f"--sweep: unknown rows {unknown}; expected some of {list(SWEEP)}")
        sweep = {k: SWEEP[k] for k in wanted}
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    defaults = hf_defaults()
    threads_check = thread_check(1.0 if args.quick else 3.0)
    print(f"thread check (Adam steps/s): {threads_check}", flush=True)

    probs = problems(args.quick)
    if args.problems is not None:
        names = [n.strip() for n in args.problems.split(",")]
        unknown = [n for n in names if n not in {p.short for p in probs}]
        if unknown:
            parser.error(f"--problems: unknown {unknown}; expected some of {[p.short for p in probs]}")
        probs = [p for p in probs if p.short in names]
    unknown = [n for n in seeds if n not in {p.short for p in probs}]
    if unknown:
        parser.error(f"--seeds: unknown problems {unknown}; expected some of {[p.short for p in probs]}")
    results: dict[str, list[Trace]] = {}
    more_seeds: dict[str, dict[str, list[Trace]]] = {}  # problem -> sweep row -> traces of seeds 1..K-1
    cg_rows: dict[str, dict[str, Any]] = {}
    for prob in probs:
        print(f"[1/4] {prob.short}: {len(sweep)} HF settings + 5 peers, {budget:g} s each", flush=True)
        traces = []
        for name, settings in sweep.items():
            torch.manual_seed(SEED)  # every run starts from a known RNG state (K-FAC's Monte-Carlo draws)
            tr, model, opt, early = run_hf(prob, settings, budget, f"HF {name}", snapshot_after=CG_EARLY_STEP)
            traces.append(tr)
            print(f"  {tr.name:34s} train {tr.train[-1]:.4g} val {tr.val[-1]:.4g}  {tr.note}", flush=True)
            for seed in range(1, seeds.get(prob.short, 1)):
                torch.manual_seed(seed)
                extra = run_hf(reseeded(prob, seed), settings, budget, f"HF {name} (seed {seed})")[0]
                more_seeds.setdefault(prob.short, {}).setdefault(name, []).append(extra)
                print(f"  {extra.name:34s} train {extra.train[-1]:.4g} val {extra.val[-1]:.4g}", flush=True)
            if name == "defaults":
                cap = 60 if args.quick else 1000
                cg_rows[f"{prob.short} @ end"] = cg_comparison(prob, model, opt, opt.damping, cap)
                if early is not None:
                    cg_rows[f"{prob.short} @ step {CG_EARLY_STEP}"] = cg_comparison(
                        prob, early[0], opt, early[1], cap
                    )
        for lr in ADAM_LRS:
            traces.append(run_adam(prob, lr, budget))
        traces.append(run_lbfgs(prob, budget))
        traces.append(run_soap(prob, budget))
        for tr in traces[len(sweep) :]:
            print(f"  {tr.name:34s} train {tr.train[-1]:.4g} val {tr.val[-1]:.4g}  {tr.note}", flush=True)
        results[prob.short] = traces
    plot(results, args.out / "optim_loss_vs_time.png", budget)

    print("[2/4] curvature-product cost on CPU", flush=True)
    cost_rows = []
    torch.manual_seed(SEED)
    mnist = mirrored_autoencoder([784, 1000, 500, 250, 30])
    x_mnist = torch.rand(1000, 784)
    cost_rows.append(("784-1000-500-250-30 AE (dense), batch 1000", mnist, x_mnist, x_mnist, sum_squared))
    for prob in probs:
        m = max(1, math.ceil(defaults["curvature_fraction"] * len(prob.train[0])))
        cost_rows.append(
            (
                f"{prob.short}, curvature batch {m}",
                prob.model,
                prob.train[0][:m],
                prob.train[1][:m],
                prob.loss,
            )
        )
    costs = []
    for label, model, xb, yb, loss in cost_rows:
        r = bench_cost(model, xb, yb, loss, reps)
        costs.append((label, r))
        print(
            f"  {label}: grad {r['grad'] * 1e3:.1f} ms; double_vjp {r['double_vjp'] / r['grad']:.2f}x",
            flush=True,
        )

    print("[3/4] GPU", flush=True)
    gpu_lines: list[str] = []
    gpu: list[dict[str, Any]] = []
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        gpu_lines += [f"Device: {torch.cuda.get_device_name(0)}.", "",
                      "| model, batch | gradient | GN product (double_vjp) | ratio | torch.compile'd product | ratio |",
                      "|---|---|---|---|---|---|"]  # fmt: skip
        for label, model, xb, yb, loss in cost_rows:
            mg = copy.deepcopy(model).to(dev)
            plain = bench_cost(mg, xb.to(dev), yb.to(dev), loss, reps)
            row = {"model": label, "grad_s": plain["grad"], "product_s": plain["double_vjp"]}
            try:
                comp = bench_cost(mg, xb.to(dev), yb.to(dev), loss, reps, compile_product=True)
                row["compiled_product_s"] = comp["double_vjp"]
                cstr = f"{comp['double_vjp'] * 1e3:.2f} ms | {comp['double_vjp'] / comp['grad']:.2f}x"
            except Exception as err:  # torch.compile may not handle the traced graph
                cstr = f"failed: {type(err).__name__} | —"
            gpu.append(row)
            gpu_lines.append(f"| {label} | {plain['grad'] * 1e3:.2f} ms | {plain['double_vjp'] * 1e3:.2f} ms | "
                             f"{plain['double_vjp'] / plain['grad']:.2f}x | {cstr} |")  # fmt: skip
    else:
        gpu_lines.append("No CUDA device in this run: the GPU section was skipped.")

    print("[4/4] report", flush=True)
    load_end = os.getloadavg()
    write_report(args, budget, started, load_start, load_end, time.perf_counter() - t_start, defaults, sweep,
                 probs, results, more_seeds, cg_rows, costs, gpu_lines, gpu, reps, threads_check)  # fmt: skip
    return 0


def cg_report(cg_rows: dict[str, dict[str, Any]]) -> list[str]:
    """Section 4 of the report (markdown lines) from ``cg_comparison``'s rows."""
    names4 = (
        "none",
        "diagonal",
        "kfac",
        "kfac, 1 sample",
        "kfac (π-damping)",
        "ekfac",
        *(f"nyström {k}" for k in NYSTROM_RANKS),
        EXACT,
    )
    first = next(iter(cg_rows.values()))
    lines = ["", "## 4. CG iterations per outer step, with and without the preconditioner", "",
              f"At two points of each default HF run, after outer step {CG_EARLY_STEP} and at the end: the "
              f"Gauss-Newton system on a curvature batch of {CG_FRACTION:.0%} of the training set (that of every earlier "
              "report; HF's default is now 30%, at which the exact layer blocks below would need factorizations of "
              "order 23,040 on the digits autoencoders), right-hand side -∇L on the full train set, λ = "
              "the run's λ at that point (at least 1e-4). CG from 0 with the progress rule off, every "
              "preconditioner run to the same cap; iterations to the relative residual ‖r‖/‖b‖ ≤ 1e-2 and to 99% "
              "of q*, the lowest quadratic-model value any of them reached (— = not within the cap). q is what "
              "HF's backtracking and ρ use; the residual also counts directions outside the curvature batch's "
              "Gauss-Newton range, where the system is λ I and the gradient has almost no weight. kfac: the "
              f"default, eigen damping and {first['kfac_samples']} Monte-Carlo draws per example, applied in "
              "A's nonzero eigenbasis (A has rank ≤ the curvature batch); kfac, 1 sample: one draw (G has rank ≤ "
              "the curvature batch, 120, below the 400- and 784-wide layers). Time per iteration includes applying "
              "M⁻¹; the build (per-example gradients / K-FAC factors + eigh) is once per refresh (every "
              "`kfac_every` outer steps). A system that plain CG solves in ≤ 2 iterations (λ I dominates it) "
              "has nothing to precondition and is left out of the target. "
              f"{EXACT}: the exact (B + λI)⁻¹ with B the block-diagonal of the same Gauss-Newton matrix, one "
              "block per linear (sub)layer as in K-FAC (`toolkit.optim.block_gn`, float64 Cholesky of each "
              "block or of its Woodbury kernel; λ alone outside the blocks): the block-Jacobi preconditioner that "
              "K-FAC's Kronecker factors approximate, so its count is what any better approximation of the layer "
              "blocks can hope for (a reference, not a strict bound: CG's count is not monotone in the "
              "approximation's quality); n/a where a block's factorization would exceed its size limit. Its apply "
              "costs many GN products (ms / iter), so it runs only until it has reached both targets, and q* is "
              "taken over the other columns (which it therefore leaves unchanged). ekfac: K-FAC's eigenbases with the "
              "blocks' own second moments as eigenvalues (George et al. 2018), the same draws. nyström k: not "
              "layer-wise: a rank-k randomized Nyström sketch of the whole undamped Gauss-Newton matrix (k products; "
              "`toolkit.optim.nystrom`, Frangella, Tropp & Udell 2023), which presses its top k eigenvalues down to "
              "about the k-th; its apply costs 2·P·k flops, more than a Gauss-Newton product on these small "
              "networks, and its build k products (section 1's `preconditioner=nystrom` row shows what that does to "
              "the loss at equal time).", "",
              "| problem, point | λ | cap | " + " | ".join(f"{n}: iters to residual / to 99% q*" if n == "none" else n for n in names4)
              + f" | ms / iter (none, diag, kfac, {NYSTROM_BIG}, exact) | build s (diag, kfac, {NYSTROM_BIG}, exact) "
                "| fewer iterations, kfac vs none: to residual / to 99% q* |",
              "|---|---|---|" + "---|" * len(names4) + "---|---|---|"]  # fmt: skip

    def ran(c: dict[str, Any], name: str) -> bool:
        return "skipped" not in c.get(name, {"skipped": "not run"})

    def iters(c: dict[str, Any], key: str) -> str:
        return fmt(c[key], "d") if c[key] is not None else "—"

    def cell(c: dict[str, Any], name: str) -> str:
        if not ran(c, name):
            return "n/a"
        return f"{iters(c[name], 'iters_to_residual')} / {iters(c[name], 'iters_to_q99')}"

    def per(c: dict[str, Any], key: str, names: tuple[str, ...], scale: float, spec: str) -> str:
        return " / ".join(format(c[n][key] * scale, spec) if ran(c, n) else "n/a" for n in names)

    def fewer(c: dict[str, Any], key: str, name: str = "kfac") -> tuple[float, str]:
        """none's iterations / ``name``'s, with a lower bound (cap / theirs) when none did not get there."""
        if not ran(c, name):
            return math.nan, "n/a"
        a, b = c["none"][key], c[name][key]
        if b is None:
            return math.nan, "—"
        if a is None:
            return c["max_iters"] / b, f"> {c['max_iters'] / b:.2f}"
        return a / b, f"{a / b:.2f}"

    def trivial(c: dict[str, Any]) -> bool:
        """Plain CG solves it in ≤ 2 iterations: nothing to precondition, left out of the targets."""
        return c["none"]["iters_to_residual"] is not None and c["none"]["iters_to_residual"] <= 2

    def ratios(name: str) -> list[float]:
        """none's iterations to the residual / ``name``'s on every non-trivial system (nan: not reached)."""
        return [fewer(c, "iters_to_residual", name)[0] for c in cg_rows.values() if not trivial(c)]

    cg_ratios = ratios("kfac")
    bound_lines: list[str] = []
    exact_ratios: list[float] = []  # exact blocks vs none, to the residual
    kfac_vs_exact: list[float] = []  # K-FAC's iterations / the exact blocks', to the residual
    skipped: dict[str, str] = {}
    for label, c in cg_rows.items():
        _, s_res = fewer(c, "iters_to_residual")
        _, s_q = fewer(c, "iters_to_q99")
        if not trivial(c):
            if ran(c, EXACT):
                r_exact, s_exact = fewer(c, "iters_to_residual", EXACT)
                exact_ratios.append(r_exact)
                k_it, e_it = c["kfac"]["iters_to_residual"], c[EXACT]["iters_to_residual"]
                kfac_vs_exact.append(k_it / e_it if k_it is not None and e_it else math.inf)
                bound_lines.append(f"{label} {iters(c[EXACT], 'iters_to_residual')} vs "
                                   f"{iters(c['none'], 'iters_to_residual')} ({s_exact}x; kfac {s_res}x)")  # fmt: skip
            else:
                skipped[label] = c[EXACT]["skipped"]
        lines.append(f"| {label} | {c['damping']:.2g} | {c['max_iters']} | " + " | ".join(cell(c, n) for n in names4)
                     + f" | {per(c, 's_per_iter', ('none', 'diagonal', 'kfac', NYSTROM_BIG, EXACT), 1e3, '.1f')} | "
                       f"{per(c, 'build_s', ('diagonal', 'kfac', NYSTROM_BIG, EXACT), 1, '.2f')} | "
                       f"{s_res}x / {s_q}x{' (trivial)' if trivial(c) else ''} |")  # fmt: skip
    ok = bool(cg_ratios) and all(r >= 3 for r in cg_ratios)
    lines += ["", f"Target ≥ 3x fewer CG iterations at equal residual with the new preconditioner, on every "
              f"non-trivial system: K-FAC (the default) {verdict(ok)} (to the residual: "
              f"{', '.join(fmt(r, '.2f') for r in cg_ratios)}; a lower bound where plain CG did not reach it "
              "within the cap)."]  # fmt: skip
    for name in ("ekfac", *(f"nyström {k}" for k in NYSTROM_RANKS)):
        these = ratios(name)
        met = bool(these) and all(r >= 3 for r in these)  # nan (not reached / not run) fails
        lines.append(f"- {name}: {verdict(met)} ({', '.join(fmt(r, '.2f') for r in these)})")  # fmt: skip
    lines.append("")
    lines += ["With the exact layer blocks (the block-Jacobi bound), iterations to the residual vs none on each non-trivial "
              "system (the ratio; K-FAC's beside it): " + ("; ".join(bound_lines) if bound_lines else "none run")
              + ". Where this ratio is below 3x, no layer-wise (block-diagonal) preconditioner of these blocks "
              "should be expected to reach the target there; where it is above and K-FAC's is not, the loss is in "
              "K-FAC's Kronecker approximation."
              + ("".join(f" {label}: n/a, {reason}." for label, reason in skipped.items())), ""]  # fmt: skip
    if exact_ratios:
        below = sum(not r >= 3 for r in exact_ratios)  # nan: the exact blocks did not reach the residual
        lines += [f"The exact layer blocks themselves reach 3x on {len(exact_ratios) - below} of the {len(exact_ratios)} "
                  "systems where they ran"
                  + (f": on {'every one' if below == len(exact_ratios) else f'{below}'} of them the 3x target is beyond "
                     "layer-wise preconditioning, so there it cannot measure K-FAC. " if below else ". ")
                  + "**Replacement target**: K-FAC within 1.5x of the exact layer blocks' iterations to the residual "
                  "(it keeps most of what layer-wise preconditioning can give) on every non-trivial system where they "
                  f"ran: K-FAC / exact = {', '.join(fmt(r, '.2f') for r in kfac_vs_exact)} — "
                  f"{verdict(all(r <= 1.5 for r in kfac_vs_exact))}.", ""]  # fmt: skip
    return lines


def write_report(args, budget, started, load_start, load_end, wall, defaults, sweep, probs, results, more_seeds,
                 cg_rows, costs, gpu_lines, gpu, reps, threads_check) -> None:  # fmt: skip
    """Markdown + JSON; every figure comes from the measurements above."""
    cmd = " ".join(["python benchmarks/bench_optim.py", *sys.argv[1:]])
    lines = [
        "# Hessian-free optimizer benchmark",
        "",
        f"Generated by `{cmd}` on {started} in {wall / 60:.1f} min; torch {torch.__version__}, "
        f"{platform.machine()}, `torch.set_num_threads({args.threads})`, one process, methods one after "
        f"another with the same wall-clock training budget of {budget:g} s each (evaluation excluded). "
        f"Load average (1, 5, 15 min) at start {tuple(round(v, 2) for v in load_start)}, at end "
        f"{tuple(round(v, 2) for v in load_end)}: the machine's 2 cores were shared with other jobs, so "
        "every time below is noisy, and noise hits the methods unequally.",
        "",
        f"Thread check at the start (Adam on the dense digits AE, batch {MINIBATCH}, side by side): "
        f"{threads_check[1]:.0f} steps/s on 1 thread, {threads_check[2]:.0f} steps/s on 2 threads. "
        + (
            ""
            if args.threads == 2
            else f"**This run used `--threads {args.threads}` instead of the specified 2**, "
            "because with the cores oversubscribed by other jobs 2 intra-op threads were that much slower; "
            "rerun with the default on an idle machine for the specified setting."
        ),
        "",
        "Problems (Martens' sparse init: 15 nonzero N(0, 1) incoming weights per unit, zero biases; a "
        "factorized layer gets the balanced rank-r SVD of such a weight):",
        "",
    ]
    for p in probs:
        lines.append(f"- **{p.short}**: {p.name}; {p.note}; {sum(q.numel() for q in p.model.parameters())} "
                     f"parameters; train / val / test = {len(p.train[0])} / {len(p.val[0])} / {len(p.test[0])}.")  # fmt: skip
    lines += [
        "",
        f"HessianFree code defaults (read from its signature): `{defaults}`; full-batch gradient, the "
        "curvature batch a cycled slice of it. Adam and SOAP: minibatches of "
        f"{MINIBATCH}, reshuffled every epoch. L-BFGS: full batch, `max_iter=5` per call, history 100, strong Wolfe. "
        "SOAP: `heavyball.SOAP(lr=3e-3, weight_decay=0)`, eager (heavyball's torch.compile switched off).",
        "",
        "## 1. Results at equal time",
        "",
    ]
    summary: dict[str, Any] = {}
    for p in probs:
        traces = results[p.short]
        hf = traces[0]
        adam = [t for t in traces if t.name.startswith("Adam")]
        lbfgs = next(t for t in traces if t.name.startswith("L-BFGS"))
        adam_best_train = min(min(t.train) for t in adam)
        best_adam = min(adam, key=lambda t: t.best_test())
        lines += [f"### {p.short}: {p.name}", "",
                  "| method | final train | final val | final test | best test (early stop on val) | notes |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for t in traces:
            lines.append(f"| {t.name} | {fmt(t.train[-1])} | {fmt(t.val[-1])} | {fmt(t.test[-1])} | "
                         f"{fmt(t.best_test())} | {t.note} |")  # fmt: skip
        summary[p.short] = {
            "hf_train": hf.train[-1], "lbfgs_train": lbfgs.train[-1], "hf_test": hf.test[-1],
            "hf_best_test": hf.best_test(), "best_adam": best_adam.name, "best_adam_best_test": best_adam.best_test(),
            "adam_best_train": adam_best_train, "hf_time_to_adam_best_train": time_to(hf, adam_best_train),
        }  # fmt: skip
        lines += ["", f"Time for HF (defaults) to reach Adam's best train loss ({fmt(adam_best_train)}, "
                      f"lowest over its 3 learning rates and its whole run): "
                      f"{fmt_time(time_to(hf, adam_best_train))}.", ""]  # fmt: skip

    # settings sweep: scored two ways, the final validation loss and the best one over the run
    lines += ["## 2. Settings sweep (validation loss; chooses the defaults)", "",
              "Each row changes one thing of the code defaults. Two scores per problem: the validation loss at the "
              "end of the budget, and the best validation loss over the run (what a user who stops early on "
              "validation gets). Ratio = the score / the problem's best score over the sweep. **The defaults are "
              "chosen on the best validation loss over the run**: on the classifier the train loss reaches ~1e-8 "
              "within the budget and the final validation loss after that only measures how far overfitting has "
              "drifted (noise of the stopping time); for the autoencoders, which are still improving at the end, "
              "the two scores nearly agree."]  # fmt: skip
    seeded = {short: 1 + len(next(iter(rows.values()))) for short, rows in more_seeds.items()}
    if seeded:
        lines[-1] += (" On " + ", ".join(f"{k} ({n} init seeds: 0..{n - 1})" for k, n in seeded.items())
                      + " every cell is the mean over the seeds (the model re-initialised, the data the same); "
                      "the per-seed values follow the tables.")  # fmt: skip
    lines.append("")

    def scores(t: Trace) -> tuple[float, float]:
        """(final, best) validation loss of one run."""
        finite = [v for v in t.val if math.isfinite(v)]
        return t.val[-1], (min(finite) if finite else math.nan)

    sweep_table: dict[str, dict[str, float]] = {}
    sweep_best: dict[str, dict[str, float]] = {}
    per_seed: dict[str, dict[str, list[float]]] = {}  # problem -> row -> best validation loss per seed
    for p in probs:
        for t in results[p.short][: len(sweep)]:
            name = t.name[3:]
            runs = [t, *more_seeds.get(p.short, {}).get(name, [])]
            final, best = zip(*(scores(r) for r in runs))
            sweep_table.setdefault(name, {})[p.short] = statistics.mean(final)
            sweep_best.setdefault(name, {})[p.short] = statistics.mean(best)
            if p.short in seeded:
                per_seed.setdefault(p.short, {})[name] = list(best)
    worst_by: dict[str, dict[str, float]] = {}
    for label, table in (("best validation loss over the run (chooses)", sweep_best),
                         ("validation loss at the end of the budget", sweep_table)):  # fmt: skip
        best_val = {p.short: min(row[p.short] for row in table.values() if math.isfinite(row[p.short]))
                    for p in probs}  # fmt: skip
        lines += [f"### By {label}", "", "| setting | " + " | ".join(p.short for p in probs) + " | worst ratio |",
                  "|---|" + "---|" * (len(probs) + 1)]  # fmt: skip
        worst: dict[str, float] = {}
        for name, row in table.items():
            ratios = [row[p.short] / best_val[p.short] if math.isfinite(row[p.short]) else math.inf
                      for p in probs]  # fmt: skip
            worst[name] = max(ratios)
            cells = " | ".join(f"{fmt(row[p.short])} ({r:.2f}x)" for p, r in zip(probs, ratios))
            lines.append(f"| {name} | {cells} | {worst[name]:.2f}x |")
        minimax = min(worst, key=lambda k: worst[k])
        lines += ["", f"Setting with the smallest worst-case ratio: **{minimax}** ({worst[minimax]:.2f}x). "
                  f"Defaults within 10% of the per-problem best on every problem: worst ratio "
                  f"{worst['defaults']:.2f}x — {verdict(worst['defaults'] <= 1.10)}.", ""]  # fmt: skip
        worst_by[label] = worst
    for short, rows in per_seed.items():
        n = seeded[short]
        lines += [f"### {short}: best validation loss per init seed", "",
                  "| setting | " + " | ".join(f"seed {i}" for i in range(n)) + " | mean | sd |",
                  "|---|" + "---|" * (n + 2)]  # fmt: skip
        for name, vals in rows.items():
            lines.append(f"| {name} | " + " | ".join(fmt(v) for v in vals)
                         + f" | {fmt(statistics.mean(vals))} | {fmt(statistics.stdev(vals))} |")  # fmt: skip
        lines.append("")
    worst = next(iter(worst_by.values()))
    minimax = min(worst, key=lambda k: worst[k])

    # targets
    lines += ["## 3. Targets", ""]
    for p in probs[:3]:
        s = summary[p.short]
        if p.short in ("fact-AE", "dense-AE"):
            ratio = s["lbfgs_train"] / s["hf_train"]
            lines.append(f"- {p.short}: final train loss HF {fmt(s['hf_train'])} vs L-BFGS {fmt(s['lbfgs_train'])} "
                         f"({ratio:.2f}x lower; target ≥ 2x) — {verdict(ratio >= 2)}.")  # fmt: skip
    beats = [
        p.short for p in probs if summary[p.short]["hf_best_test"] < summary[p.short]["best_adam_best_test"]
    ]
    for p in probs:
        s = summary[p.short]
        lines.append(f"- {p.short}: best test loss (early stopping on val) HF {fmt(s['hf_best_test'])} vs best Adam "
                     f"({s['best_adam']}) {fmt(s['best_adam_best_test'])}.")  # fmt: skip
    lines.append(f"- HF below the best Adam's best test loss on at least one problem: {beats or 'none'} — "
                 f"{verdict(bool(beats))}.")  # fmt: skip
    eq_time = []
    for p in probs:
        d = results[p.short][0].val[-1]
        n = next(t for t in results[p.short] if t.name == "HF preconditioner=none").val[-1]
        eq_time.append((p.short, d, n))
    lower = [s for s, d, n in eq_time if d < n]
    lines.append("- Loss at equal time, default (K-FAC) vs no preconditioner (validation): "
                 + ", ".join(f"{s} {fmt(d)} vs {fmt(n)}" for s, d, n in eq_time)
                 + f"; lower on {len(lower)} of {len(eq_time)} (target ≥ 2) — {verdict(len(lower) >= 2)}.")  # fmt: skip

    lines += cg_report(cg_rows)

    # cost section
    lines += ["## 5. Cost of one curvature-vector product relative to one gradient (CPU)", "",
              "Gradient = forward + backward of the batch loss (`loss.backward()`). GN product = one Jᵀ H_L J v "
              "as called inside CG: `double_vjp` (default), `linearize`, `jvp` (see `toolkit.optim.curvature`). "
              f"Minimum over 3 interleaved rounds of the median of {reps} repeats. **The one-off build per outer "
              "step (last column) is outside the ratio.** The MNIST-sized model runs on uniform random inputs "
              "(MNIST does not ship offline; the timing does not depend on the values); the benchmarked models "
              "run at their default curvature batch.", "",
              "| model, batch | gradient | double_vjp | linearize | jvp | build per outer step (double_vjp / linearize) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for label, r in costs:
        cells = " | ".join(f"{r[m] * 1e3:.1f} ms ({r[m] / r['grad']:.2f}x)" for m in MODES)
        lines.append(f"| {label} | {r['grad'] * 1e3:.1f} ms | {cells} | "
                     f"{r['build_double_vjp'] * 1e3:.0f} ms / {r['build_linearize'] * 1e3:.0f} ms |")  # fmt: skip
    lines += ["", "## 6. GPU", "", *gpu_lines, "", "![loss vs time](optim_loss_vs_time.png)", ""]

    md = args.out / "optim.md"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, md)
    data = {
        "command": cmd, "started": started, "wall_s": wall, "threads": args.threads, "budget_s": budget,
        "loadavg_start": load_start, "loadavg_end": load_end, "thread_check_steps_per_s": threads_check, "torch": torch.__version__, "hf_defaults": defaults,
        "sweep": sweep, "sweep_val": sweep_table, "sweep_best_val": sweep_best, "sweep_worst_ratio": worst_by,
        "sweep_seeds": seeded, "sweep_best_val_per_seed": per_seed,
        "sweep_seed_traces": {k: {r: [asdict(t) for t in ts] for r, ts in v.items()} for k, v in more_seeds.items()},
        "minimax_setting": minimax,
        "summary": summary, "cg": cg_rows,
        "cost": [{"model": label, **r} for label, r in costs], "gpu": gpu,
        "traces": {k: [asdict(t) for t in v] for k, v in results.items()},
    }  # fmt: skip
    js = args.out / "optim.json"
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, js)
    print(f"wrote {md}, {js} and {args.out / 'optim_loss_vs_time.png'}")


if __name__ == "__main__":
    raise SystemExit(main())
