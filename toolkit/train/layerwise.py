"""Layer-wise training: fit each stage of a factorized student to a dense teacher's stage, one at a time.

For stage k, the inputs are the *teacher's* activations at the stage's cut and the target is the
teacher's stage output; the student stage minimises the squared error

    L_k = mean_b ‖concat(S_k(a_b)) - concat(T_k(a_b))‖² / d_k

(``mse`` over the concatenated, flattened stage outputs). Factorized layers start from the truncated
SVD of the teacher's dense layer at the student's rank; stages without a factorized layer take the
teacher's weights. Each stage is trained like a small run under RUN_DIR/stages/K/; the assembled
student is checkpointed in RUN_DIR/checkpoints/ and evaluated end to end.

Memory: one stage at a time. Teacher and student are built on the ``meta`` device (shapes only);
for stage k, only teacher stage k is read from the checkpoint (``StreamedWeights``: the file is
hash-checked in chunks, then just that stage's tensors are read), only student stage k is
materialized, and only the activations crossing cut k (every split) plus the stage's outputs are
held; tensors no later stage reads are dropped. A trained student stage is written to
``RUN_DIR/.layerwise-stages/stage-K.safetensors`` and released. At the end the student (factorized, so smaller than
the teacher) is assembled from those files for the end-to-end evaluation and its checkpoint, so the
peak is the larger of {one teacher stage + one student stage + one cut's activations} and {the
whole student}. ``benchmarks/bench_layerwise.py`` measures it.
"""

from __future__ import annotations

import functools
import gc
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from toolkit.checkpoint import CKPT_DIR, save_checkpoint
from toolkit.checkpoint_stream import StreamedWeights
from toolkit.data import Split, Splits, load_data
from toolkit.errors import InputError
from toolkit.train.loop import FitSetup, Progress, TrainResult, count_params, fit
from toolkit.train.losses import get_loss
from toolkit.train.metrics import evaluate
from toolkit.train.run import _prepare_dir, _write_json, pick_device

SCRATCH = ".layerwise-stages"


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
    from toolkit.spec import load_spec, parse_spec

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
    t_weights = StreamedWeights(teacher)
    with torch.device("meta"):  # shapes only; each stage is materialized when its turn comes
        t_model = build_model(
            parse_spec(t_weights.spec, source=f"{teacher} (embedded spec)"),
            seed=0,
            dense=bool(t_weights.meta.get("dense", False)),
        )
        student = build_model(spec, seed=cfg.seed)
        dense_params = count_params(build_model(spec, seed=cfg.seed, dense=True))
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
    multi = len(student.output_names) > 1
    # activations at the current cut, per split: name -> array (teacher's)
    acts = {part: dict(getattr(data, part).inputs) for part in ("train", "val", "test")}
    fit_cfg = cfg.model_copy(update={"loss": "mse", "metrics": []})
    if max_steps is not None:
        fit_cfg = fit_cfg.model_copy(update={"max_steps": max_steps})
    total_steps, seconds, skipped = 0, 0.0, 0
    scratch = run / SCRATCH  # each trained student stage, until the student is assembled
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    for k in range(len(s_stages)):
        t_stage = _materialize_teacher(t_stages[k], t_weights, k, dev, dtype)
        s_stage = _materialize_student(s_stages[k], t_stage, dev, dtype)
        targets = {
            p: _run_stage(t_stage, [acts[p][n] for n in t_stage.input_names], dev, dtype) for p in acts
        }
        has_factors = any(hasattr(m, "rank_factors") for m in s_stage.modules())
        if has_factors:
            stage_dir = run / "stages" / str(k)
            if stage_dir.exists():
                shutil.rmtree(stage_dir)
            stage_dir.mkdir(parents=True)
            parts = [
                Split(
                    {n: acts[p][n] for n in s_stage.input_names},
                    np.concatenate([o.reshape(len(o), -1) for o in targets[p]], 1),
                )
                for p in ("train", "val", "test")
            ]
            splits = Splits(parts[0], parts[1], parts[2], source=f"teacher stage {k}")
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
            del parts, splits, wrapper, stage_layers
        trained = {n: v.detach().cpu().contiguous() for n, v in s_stage.state_dict().items()}
        atomic_write_bytes(scratch / f"stage-{k}.safetensors", st_save(trained, metadata={"stage": str(k)}))
        later = {n for st in t_stages[k + 1 :] for n in st.input_names} | set(student.output_names)
        for p in acts:  # move the cut forward with the teacher's activations, keep what is still read
            acts[p].update(zip(t_stage.output_names, targets[p]))
            acts[p] = {n: a for n, a in acts[p].items() if n in later}
        t_stage.to("meta")  # release both stages' memory before the next stage is read
        s_stage.to("meta")
        del t_stage, s_stage, trained, targets
        gc.collect()
    # several outputs (an encoder's token states and pooled embedding): no one loss on the data's
    # targets applies, so the assembled student is scored against the teacher's outputs instead
    final = {p: [acts[p][n] for n in student.output_names] for p in ("val", "test")} if multi else None
    del acts, t_model
    for k, stage in enumerate(student.stages):  # the meta student takes the trained tensors as they are
        stage.load_state_dict(
            st_load((scratch / f"stage-{k}.safetensors").read_bytes()), strict=True, assign=True
        )
    _check_materialized(student, "student")
    student.to(dev, dtype)
    loss_fn = get_loss(cfg.loss)
    names = list(student.input_names)
    student.eval()
    if final is not None:
        val = _teacher_error(student, data.val, names, final["val"], dev, dtype)
        test = _teacher_error(student, data.test, names, final["test"], dev, dtype)
    else:
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
        dense_params=dense_params, checkpoint=str(ckpt),
    )  # fmt: skip
    _write_json(run / "summary.json", result.to_dict())
    shutil.rmtree(scratch, ignore_errors=True)
    return result


@torch.no_grad()
def _teacher_error(
    student: nn.Module,
    split: Split,
    names: list[str],
    teacher_out: list[np.ndarray],
    dev: torch.device,
    dtype: torch.dtype,
    batch: int = 256,
) -> dict[str, float]:
    """The student's outputs against the teacher's on a split, each output flattened and concatenated.

    Returns:
        {"loss": mean squared error, "rel_error": ‖S − T‖ / ‖T‖}; {} for an empty split.
    """
    n = len(split)
    if n == 0:
        return {}
    sq, ref = 0.0, 0.0
    for s in range(0, n, batch):
        xs = [
            torch.as_tensor(split.inputs[k][s : s + batch]).to(dev, dtype)
            if split.inputs[k].dtype.kind == "f"
            else torch.as_tensor(split.inputs[k][s : s + batch]).to(dev)
            for k in names
        ]
        out = student(*xs)
        got = torch.cat([o.flatten(1) for o in (out if isinstance(out, tuple | list) else (out,))], 1)
        want = torch.cat([torch.as_tensor(t[s : s + batch]).flatten(1) for t in teacher_out], 1).to(got)
        sq += float((got - want).double().pow(2).sum())
        ref += float(want.double().pow(2).sum())
    width = sum(int(np.prod(t.shape[1:])) for t in teacher_out)
    return {"loss": sq / (n * width), "rel_error": (sq / ref) ** 0.5 if ref > 0 else float("inf")}


def _materialize_teacher(
    meta_stage: Any, weights: StreamedWeights, k: int, dev: torch.device, dtype: torch.dtype
) -> Any:
    """Teacher stage k holding the tensors read from the checkpoint (only this stage's, one copy)."""
    try:
        meta_stage.load_state_dict(weights.read(f"stages.{k}."), strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(
            f"--teacher {weights.path}: stage {k} does not fit its embedded spec: {first}"
        ) from exc
    _check_materialized(meta_stage, f"teacher stage {k}")
    return meta_stage.to(dev, dtype).eval()


def _check_materialized(module: nn.Module, what: str) -> None:
    """Every parameter and buffer was loaded (none left on the ``meta`` device).

    Raises:
        RuntimeError: a tensor the checkpoint does not hold (e.g. a non-persistent buffer).
    """
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.device.type == "meta":
            raise RuntimeError(
                f"layer-wise: {what}: tensor {name} is not in the checkpoint, cannot stream it"
            )


def _materialize_student(meta_stage: Any, teacher_stage: Any, dev: torch.device, dtype: torch.dtype) -> Any:
    """Student stage k, every parameter and buffer taken from the teacher's stage (``_init_from_teacher``).

    Raises:
        RuntimeError: a tensor the initialisation did not write (a bug: it is filled with NaN first).
    """
    stage = meta_stage.to_empty(device=dev).to(dtype=dtype)
    with torch.no_grad():
        for t in [*stage.parameters(), *stage.buffers()]:
            if t.is_floating_point():
                t.fill_(float("nan"))
        teacher_buffers = dict(teacher_stage.named_buffers())
        for name, b in stage.named_buffers():
            if name in teacher_buffers:
                b.copy_(teacher_buffers[name])
    _init_from_teacher(stage, teacher_stage)
    for name, t in [*stage.named_parameters(), *stage.named_buffers()]:
        if t.is_floating_point() and torch.isnan(t).any():
            raise RuntimeError(f"layer-wise: student tensor {name} was not initialised from the teacher")
    return stage
