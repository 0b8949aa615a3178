"""`train()`: spec -> model -> data -> fit, with the run directory, resume, `--stage` and data parallelism.

Run directory::

    RUN_DIR/
      run.json            how the run was started (options; also marks the directory as a run)
      spec.yaml           the resolved spec (every default filled in)
      metrics.jsonl/.csv  one record per step (loss, lambda, CG iterations, ranks, val metrics)
      loss.png ranks.png  plots
      checkpoints/        step-N (last and previous), best-N (highest validation accuracy, then lowest validation loss)
      summary.json        the TrainResult
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from toolkit.checkpoint import CKPT_DIR, list_checkpoints, load_checkpoint, load_model
from toolkit.data import Splits, load_data
from toolkit.errors import InputError
from toolkit.fsio import atomic_write_bytes
from toolkit.train import distributed as D
from toolkit.train.loop import FitSetup, Progress, TrainResult, count_params, fit
from toolkit.train.metrics import evaluate, to_tensors


def pick_device(requested: str | None, cfg_device: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU; ``requested`` (``--device``) overrides the spec.

    Raises:
        ValueError: cuda asked for but not available, or an unknown device name.
    """
    name = requested or cfg_device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device: expected an available device, got {name!r} but CUDA is not available")
    return dev


def _prepare_dir(run_dir: Path, overwrite: bool, world: D.World) -> None:
    if world.is_main and run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise InputError(
                f"run directory {run_dir} already exists: pass --overwrite to replace it or --resume to continue it"
            )
        if not (run_dir / "run.json").is_file():
            raise InputError(
                f"run directory {run_dir}: refusing to delete a directory without run.json (not a run directory)"
            )
        shutil.rmtree(run_dir)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    D.barrier()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def _output_size(model: Any, splits: Splits, names: list[str], dev: torch.device, dtype: torch.dtype) -> int:
    x, _ = to_tensors(splits.train, slice(0, 1), names, dev, dtype)
    with torch.no_grad():
        out = model(*x)
    if isinstance(out, tuple):
        if len(out) != 1:
            raise InputError(f"training needs a spec with one output, got {len(out)}")
        out = out[0]
    return int(out.shape[-1])


def train(
    spec: Any = None,
    run_dir: str | Path = "runs/default",
    *,
    overwrite: bool = False,
    resume: bool = False,
    device: str | None = None,
    stage: int | None = None,
    dense: bool = False,
    max_steps: int | None = None,
    splits: Splits | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> TrainResult:
    """Train a spec into a run directory, or continue one.

    Args:
        spec: a GraphSpec or a path to a spec file (ignored when resuming: the run's spec.yaml is used).
        run_dir: the run directory.
        overwrite: replace an existing run directory (only one holding run.json).
        resume: continue ``run_dir`` from its last checkpoint (exactly: same final parameters).
        device: "auto" | "cpu" | "cuda" | "cuda:N"; overrides the spec's ``train.device``.
        stage: train only stage K (the others frozen).
        dense: train the dense counterpart (every factorization ignored), e.g. as a layer-wise teacher.
        max_steps: stop after this many steps in all (for tests and quick looks).
        splits: data to use instead of the spec's ``train.data`` (Python API, tests).
        on_progress: called after every step.

    Returns:
        The TrainResult, also written to RUN_DIR/summary.json.

    Raises:
        FileNotFoundError: a missing spec, data file or run directory.
        ValueError: a bad spec, data or option; a corrupted checkpoint.
    """
    from toolkit.builder import build_model
    from toolkit.spec import load_spec, parse_spec

    run_dir = Path(run_dir)
    resume_state: dict[str, Any] | None = None
    ckpt = None
    if resume:
        if not (run_dir / "run.json").is_file():
            raise FileNotFoundError(f"--resume {run_dir}: expected a run directory with run.json, found none")
        run_info = json.loads((run_dir / "run.json").read_text())
        stage, dense = run_info.get("stage"), bool(run_info.get("dense", False))
        max_steps = max_steps if max_steps is not None else run_info.get("max_steps")
        spec = parse_spec(
            yaml.safe_load((run_dir / "spec.yaml").read_text()), source=str(run_dir / "spec.yaml")
        )
        last = list_checkpoints(run_dir / CKPT_DIR, "step")
        if last:
            try:
                ckpt = load_checkpoint(last[-1])
            except InputError as exc:
                prev = (
                    f"; the previous checkpoint {last[-2]} is intact: delete the corrupted one to resume from it"
                    if len(last) > 1
                    else ""
                )
                raise InputError(f"{exc}{prev}") from exc
            resume_state = ckpt.state
    elif not hasattr(spec, "train"):
        spec = load_spec(spec)
    cfg = spec.train
    dev = pick_device(device, cfg.device)
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    if dev.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = D.setup(dev)
    if world.size > 1 and dev.type == "cuda":
        dev = torch.device("cuda", world.rank % torch.cuda.device_count())
    if not resume:
        _prepare_dir(run_dir, overwrite, world)
    torch.manual_seed(cfg.seed)
    model = build_model(
        parse_spec(ckpt.spec, source=str(ckpt.path)) if ckpt else spec, seed=cfg.seed, dense=dense
    )
    if ckpt is not None:
        model.load_state_dict(ckpt.weights)
    model.to(device=dev, dtype=dtype)
    input_names = list(model.input_names)
    if splits is None:
        splits = load_data(cfg.data, spec.inputs)
    from toolkit.data.checks import check_targets

    out_size = _output_size(model, splits, input_names, dev, dtype)
    for part in (splits.train, splits.val, splits.test):
        part.targets = check_targets(splits.source, part.targets, cfg.loss, out_size)
    params = None
    if stage is not None:
        n_stages = len(model.stages)
        if not 0 <= stage < n_stages:
            raise InputError(f"--stage: expected a stage index in [0, {n_stages}), got {stage}")
        for i, st in enumerate(model.stages):
            st.requires_grad_(i == stage)
        params = list(model.stages[stage].parameters())
    if not resume and world.is_main:
        _write_json(
            run_dir / "run.json",
            {
                "stage": stage,
                "dense": dense,
                "max_steps": max_steps,
                "world_size": world.size,
                "device": str(dev),
            },
        )
        atomic_write_bytes(run_dir / "spec.yaml", yaml.safe_dump(spec.resolved(), sort_keys=False).encode())
    dense_params = count_params(build_model(spec, seed=cfg.seed, dense=True))
    setup = FitSetup(
        cfg=cfg,
        run_dir=run_dir,
        input_names=input_names,
        device=dev,
        dtype=dtype,
        spec_fn=lambda: model.to_spec().resolved(),
        layers_fn=lambda: dict(model.factorized_layers()),
        meta={"dense": dense, "stage": stage, "seed": cfg.seed, "loss": cfg.loss, "data": splits.source},
        params=params,
        world=world,
        on_progress=on_progress,
        max_steps=max_steps,
    )
    result = fit(model, splits, setup, resume_state)
    result.dense_params = dense_params
    if world.is_main and result.best_step is not None:
        best, _, _ = load_model(run_dir, device=dev)
        best.to(dtype=dtype)
        from toolkit.train.losses import get_loss

        result.best_test = evaluate(best, splits.test, input_names, cfg.loss, get_loss(cfg.loss), dev, dtype)
        result.checkpoint = str(list_checkpoints(run_dir / CKPT_DIR, "best")[-1])
    elif world.is_main:
        result.checkpoint = str(list_checkpoints(run_dir / CKPT_DIR, "step")[-1])
    if world.is_main:
        _write_json(run_dir / "summary.json", result.to_dict())
    D.teardown()
    return result
