"""Layer-wise training: fit each stage of a factorized student to a dense teacher's stage, one at a time.

For stage k, the inputs are the *teacher's* activations at the stage's cut (computed stage by stage, so
only one stage's activations and weights are live at a time) and the target is the teacher's stage
output; the student stage minimises the squared error

    L_k = mean_b ‖concat(S_k(a_b)) - concat(T_k(a_b))‖² / d_k

(``mse`` over the concatenated, flattened stage outputs). Factorized layers start from the truncated
SVD of the teacher's dense layer at the student's rank; stages without a factorized layer take the
teacher's weights. Each stage is trained like a small run under RUN_DIR/stages/K/; the assembled
student is checkpointed in RUN_DIR/checkpoints/ and evaluated end to end.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from toolkit.checkpoint import CKPT_DIR, load_model, save_checkpoint
from toolkit.data import Split, Splits, load_data
from toolkit.errors import InputError
from toolkit.train.loop import FitSetup, Progress, TrainResult, count_params, fit
from toolkit.train.losses import get_loss
from toolkit.train.metrics import evaluate
from toolkit.train.run import _prepare_dir, _write_json, pick_device


class StageOutputs(nn.Module):
    """A stage seen as one tensor: the concatenation of its flattened outputs, (B, Σ d_i)."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat([o.flatten(1) for o in self.stage(*xs)], dim=1)


@torch.no_grad()
def _run_stage(
    stage: nn.Module, inputs: list[np.ndarray], dev: torch.device, dtype: torch.dtype, batch: int = 1024
) -> list[np.ndarray]:
    outs: list[list[np.ndarray]] = []
    n = len(inputs[0]) if inputs else 0
    for s in range(0, n, batch):
        xs = [
            torch.from_numpy(a[s : s + batch]).to(dev, dtype)
            if a.dtype.kind == "f"
            else torch.from_numpy(a[s : s + batch]).to(dev)
            for a in inputs
        ]
        res = stage(*xs)
        for i, r in enumerate(res):
            if len(outs) <= i:
                outs.append([])
            outs[i].append(r.float().cpu().numpy())
    return [np.concatenate(o) for o in outs]


def _init_from_teacher(student_stage: Any, teacher_stage: Any) -> None:
    """Copy dense layers; initialise factorized ones by truncated SVD of the teacher's layer."""
    from toolkit.layers import FactorizedMixin

    for nid in student_stage.node_ids:
        s, t = student_stage.get_submodule(nid), teacher_stage.get_submodule(nid)
        if isinstance(s, FactorizedMixin):
            fresh = type(s).from_dense(t, rank=s.rank, fallback=False)  # type: ignore[attr-defined]
            with torch.no_grad():
                for (p, _), (q, _) in zip(s.rank_factors(), fresh.rank_factors()):  # type: ignore[attr-defined]
                    p.copy_(q)
                for name, p in s.named_parameters():  # type: ignore[attr-defined]
                    if "bias" in name:
                        p.copy_(dict(fresh.named_parameters())[name])
        elif any(True for _ in s.parameters()):
            s.load_state_dict(t.state_dict())


def train_layerwise(
    spec: Any,
    run_dir: str | Path,
    *,
    teacher: str | Path,
    overwrite: bool = False,
    device: str | None = None,
    max_steps: int | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> TrainResult:
    """Fit a factorized spec stage by stage to a dense teacher (a run directory or checkpoint).

    Args:
        spec: GraphSpec or spec path of the student (same graph and stages as the teacher).
        run_dir: the run directory.
        teacher: the teacher's run directory or checkpoint (e.g. ``rlhf train SPEC --dense``).
        overwrite: replace an existing run directory.
        device: device override.
        max_steps: steps per stage (default the spec's schedule).
        on_progress: progress callback.

    Returns:
        TrainResult of the assembled student (end-to-end metrics).

    Raises:
        ValueError: the teacher's stages do not match the student's.
    """
    from toolkit.builder import build_model
    from toolkit.spec import load_spec

    if not hasattr(spec, "train"):
        spec = load_spec(spec)
    cfg = spec.train
    dev = pick_device(device, cfg.device)
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    if dev.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Path(run_dir)
    from toolkit.train.distributed import World

    _prepare_dir(run, overwrite, World())
    t_model, _, _ = load_model(teacher, device=dev)
    t_model.to(dtype=dtype)
    student = build_model(spec, seed=cfg.seed).to(dev, dtype)
    if len(t_model.stages) != len(student.stages):
        raise InputError(
            f"--teacher {teacher}: expected {len(student.stages)} stages like the spec, got {len(t_model.stages)}"
        )
    s_stages: list[Any] = list(student.stages)
    t_stages: list[Any] = list(t_model.stages)
    for k, (s, t) in enumerate(zip(s_stages, t_stages)):
        if (s.input_names, s.output_names, s.node_ids) != (t.input_names, t.output_names, t.node_ids):
            raise InputError(f"--teacher {teacher}: stage {k}: expected nodes {s.node_ids}, got {t.node_ids}")
    _write_json(run / "run.json", {"layerwise": True, "teacher": str(teacher), "device": str(dev)})
    import yaml

    from toolkit.fsio import atomic_write_bytes

    atomic_write_bytes(run / "spec.yaml", yaml.safe_dump(spec.resolved(), sort_keys=False).encode())
    data = load_data(cfg.data, spec.inputs)
    # activations at the current cut, per split: name -> array (teacher's)
    acts = {part: dict(getattr(data, part).inputs) for part in ("train", "val", "test")}
    fit_cfg = cfg.model_copy(update={"loss": "mse", "metrics": []})
    if max_steps is not None:
        fit_cfg = fit_cfg.model_copy(update={"max_steps": max_steps})
    total_steps, seconds, skipped = 0, 0.0, 0
    for k, (s_stage, t_stage) in enumerate(zip(s_stages, t_stages)):
        _init_from_teacher(s_stage, t_stage)
        targets = {
            p: _run_stage(t_stage, [acts[p][n] for n in t_stage.input_names], dev, dtype) for p in acts
        }
        has_factors = any(hasattr(m, "rank_factors") for m in s_stage.modules())
        if has_factors:
            parts = [
                Split(
                    {n: acts[p][n] for n in s_stage.input_names},
                    np.concatenate([o.reshape(len(o), -1) for o in targets[p]], 1),
                )
                for p in ("train", "val", "test")
            ]
            splits = Splits(parts[0], parts[1], parts[2], source=f"teacher stage {k}")
            stage_dir = run / "stages" / str(k)
            if stage_dir.exists():
                shutil.rmtree(stage_dir)
            stage_dir.mkdir(parents=True)
            wrapper = StageOutputs(s_stage)
            stage_layers = {n: m for n, m in s_stage.named_children() if hasattr(m, "rank_factors")}
            res = fit(
                wrapper,
                splits,
                FitSetup(
                    cfg=fit_cfg, run_dir=stage_dir, input_names=list(s_stage.input_names), device=dev, dtype=dtype,
                    spec_fn=functools.partial(dict, stage=k), layers_fn=functools.partial(dict, stage_layers),
                    meta={"layerwise_stage": k}, on_progress=on_progress,
                ),
            )  # fmt: skip
            total_steps, seconds, skipped = (
                total_steps + res.steps,
                seconds + res.seconds,
                skipped + res.skipped_steps,
            )
        for p in acts:  # move the cut forward with the teacher's activations
            acts[p].update(zip(t_stage.output_names, targets[p]))
    loss_fn = get_loss(cfg.loss)
    names = list(student.input_names)
    student.eval()
    val = evaluate(student, data.val, names, cfg.loss, loss_fn, dev, dtype)
    test = evaluate(student, data.test, names, cfg.loss, loss_fn, dev, dtype)
    meta = {"layerwise": True, "teacher": str(teacher), "step": total_steps, "dense": False}
    ckpt = save_checkpoint(
        run / CKPT_DIR, f"step-{total_steps:08d}", student, student.to_spec().resolved(), meta, {}
    )
    result = TrainResult(
        run_dir=str(run), status="completed", steps=total_steps, total_steps=total_steps, seconds=seconds,
        skipped_steps=skipped, final_train_loss=None, val=val, test=test, best_test=test,
        ranks=dict(student.ranks()), params=count_params(student),
        dense_params=count_params(build_model(spec, seed=cfg.seed, dense=True)), checkpoint=str(ckpt),
    )  # fmt: skip
    _write_json(run / "summary.json", result.to_dict())
    return result
