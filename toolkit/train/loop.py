"""The training loop: batches, steps, evaluation, checkpoints, resume, Ctrl-C, progress.

Everything a step depends on is a pure function of the checkpointed state: the batch of step s is
``batch_order(n, B, seed, epoch = s // steps_per_epoch)[s % steps_per_epoch]``, the curvature batch is
its leading slice, and the weights, optimizer state and RNG come from the checkpoint. So a run killed
at any moment (SIGKILL included) and resumed from its last checkpoint ends with the same parameters as
an uninterrupted run (on CPU, same threads).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from toolkit.checkpoint import CKPT_DIR, prune_checkpoints, save_checkpoint
from toolkit.data import Splits, batch_order, curvature_subset, shard_batch
from toolkit.errors import InputError
from toolkit.train import distributed as D
from toolkit.train.losses import get_loss
from toolkit.train.metrics import MetricsLog, evaluate, rank_metrics, to_tensors
from toolkit.train.optimizers import make_stepper
from toolkit.train.plots import plot_run


@dataclass
class TrainResult:
    """What a run produced."""

    run_dir: str
    status: str  # "completed" | "interrupted"
    steps: int
    total_steps: int
    seconds: float
    skipped_steps: int
    final_train_loss: float | None
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    best_step: int | None = None  # best: highest val accuracy (where it applies), then lowest val loss
    best_val_loss: float | None = None
    best_test: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    params: int = 0
    dense_params: int | None = None
    checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)


@dataclass
class Progress:
    """Per-step information shown by the progress bar."""

    step: int
    total: int
    record: dict[str, Any]


@contextmanager
def _sigint_flag() -> Iterator[dict[str, bool]]:
    """Turn the first Ctrl-C into a flag (checkpoint and stop at the step's end); a second one aborts."""
    flag = {"stop": False}
    try:
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: Any) -> None:
            flag["stop"] = True
            signal.signal(signal.SIGINT, signal.default_int_handler)

        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no handler
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


@dataclass
class FitSetup:
    """Everything fit() needs besides the model and data."""

    cfg: Any  # TrainConfig
    run_dir: Path
    input_names: list[str]
    device: torch.device
    dtype: torch.dtype
    spec_fn: Callable[[], dict[str, Any]]  # the model's current spec (JSON-able)
    layers_fn: Callable[[], Mapping[str, Any]] = dict
    meta: dict[str, Any] = field(default_factory=dict)
    params: list[nn.Parameter] | None = None  # None: all
    world: D.World = field(default_factory=D.World)
    on_progress: Callable[[Progress], None] | None = None
    max_steps: int | None = None


def fit(
    model: nn.Module, splits: Splits, setup: FitSetup, resume_state: dict[str, Any] | None = None
) -> TrainResult:
    """Train ``model`` on ``splits.train`` as ``setup.cfg`` says, checkpointing into ``setup.run_dir``.

    Args:
        model: the model, already on the device and dtype (weights restored when resuming).
        splits: the data.
        setup: configuration, run directory, device, callbacks.
        resume_state: the ``state.pt`` content of the checkpoint to continue from, or None.

    Returns:
        The TrainResult (test metrics of the final model).

    Raises:
        ValueError: a configuration that cannot run (batch not divisible by processes, no data).
    """
    cfg, world, dev = setup.cfg, setup.world, setup.device
    loss_fn = get_loss(cfg.loss)
    n = len(splits.train)
    spe = len(batch_order(n, cfg.batch_size, cfg.seed, 0))
    batch = max(1, min(cfg.batch_size, n))
    if batch % world.size:
        raise InputError(f"train.batch_size: expected a multiple of the {world.size} processes, got {batch}")
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * spe
    if setup.max_steps is not None:
        total = min(total, setup.max_steps)
    eval_every = cfg.eval_every or spe
    all_params = setup.params is None
    params = list(model.parameters()) if setup.params is None else setup.params
    stepper = make_stepper(model, loss_fn, params, cfg.optimizer, all_params=all_params)
    ckpt_root = setup.run_dir / CKPT_DIR
    log = MetricsLog(setup.run_dir, enabled=world.is_main)

    step, skipped, elapsed = 0, 0, 0.0
    # best = highest validation accuracy where it applies, then lowest validation loss
    best_score: list[float] = [math.inf, math.inf]
    best_val, best_step = math.inf, None
    if resume_state:
        step = int(resume_state["step"])
        skipped = int(resume_state.get("skipped", 0))
        elapsed = float(resume_state.get("elapsed", 0.0))
        best_val = float(resume_state.get("best_val", math.inf))
        best_score = [float(v) for v in resume_state.get("best_score", [math.inf, math.inf])]
        best_step = resume_state.get("best_step")
        stepper.load_state_dict(resume_state["optimizer"])
        _set_rng_state(resume_state.get("rng", {}))
    if world.is_main:
        log.truncate(step + 1 if resume_state else 0)

    def state() -> dict[str, Any]:
        return {
            "step": step,
            "skipped": skipped,
            "elapsed": elapsed,
            "best_val": best_val,
            "best_score": list(best_score),
            "best_step": best_step,
            "optimizer": stepper.state_dict(),
            "rng": _rng_state(),
        }

    def save(prefix: str) -> None:
        if world.is_main:
            meta = {
                **setup.meta,
                "step": step,
                "best_step": best_step,
                "best_val_loss": best_val if best_step else None,
            }
            save_checkpoint(ckpt_root, f"{prefix}-{step:08d}", model, setup.spec_fn(), meta, state())
            prune_checkpoints(ckpt_root, prefix, keep=cfg.keep_checkpoints if prefix == "step" else 1)
        D.barrier()

    orders: dict[int, list[np.ndarray]] = {}
    last_loss: float | None = None
    status = "completed"
    model.train()
    with _sigint_flag() as flag:
        while step < total:
            t0 = time.perf_counter()
            epoch, bi = divmod(step, spe)
            if epoch not in orders:
                orders = {epoch: batch_order(n, cfg.batch_size, cfg.seed, epoch)}
            global_idx = orders[epoch][bi]
            local = shard_batch(global_idx, world.rank, world.size)
            c = curvature_subset(len(local), len(global_idx), cfg.optimizer.curvature_fraction, world.size)
            x, y = to_tensors(splits.train, local, setup.input_names, dev, setup.dtype)
            info = stepper.step(x, y, tuple(t[:c] for t in x), y[:c])
            step += 1
            skipped += int(info.get("skipped", False))
            dt = time.perf_counter() - t0
            elapsed += dt
            if not info.get("skipped"):
                last_loss = info["loss"]
            rec: dict[str, Any] = {
                "step": step,
                "epoch": epoch,
                **info,
                "examples_per_s": len(global_idx) / max(dt, 1e-9),
                "time": elapsed,
            }
            evaluating = step % eval_every == 0 or step == total or flag["stop"]
            rec.update(rank_metrics(setup.layers_fn(), with_effective=evaluating))
            if evaluating:
                model.eval()
                val = evaluate(model, splits.val, setup.input_names, cfg.loss, loss_fn, dev, setup.dtype)
                model.train()
                rec.update({f"val_{k}": v for k, v in val.items()})
                score = [-val.get("accuracy", 0.0), val["loss"]] if val else None
                if score is not None and score < best_score:
                    best_score, best_val, best_step = score, val["loss"], step
                    save("best")
            if world.is_main:
                log.append(rec)
            if setup.on_progress:
                setup.on_progress(Progress(step, total, rec))
            if step % cfg.checkpoint_every == 0 or step == total or flag["stop"]:
                save("step")
                if world.is_main:
                    log.flush_csv()
            if flag["stop"] and step < total:
                status = "interrupted"
                break
    model.eval()
    val = evaluate(model, splits.val, setup.input_names, cfg.loss, loss_fn, dev, setup.dtype)
    test = evaluate(model, splits.test, setup.input_names, cfg.loss, loss_fn, dev, setup.dtype)
    if world.is_main:
        log.flush_csv()
        plot_run(log.records, setup.run_dir)
    return TrainResult(
        run_dir=str(setup.run_dir),
        status=status,
        steps=step,
        total_steps=total,
        seconds=elapsed,
        skipped_steps=skipped,
        final_train_loss=last_loss,
        val=val,
        test=test,
        best_step=best_step,
        best_val_loss=best_val if best_step is not None else None,
        ranks={k.split("/", 1)[1]: v for k, v in rank_metrics(setup.layers_fn(), False).items()},
        params=count_params(model),
    )
