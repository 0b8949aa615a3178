"""`rlhf train`: train a spec into a run directory (progress bar, --quiet, --json, --resume, --export)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from toolkit.errors import InputError


@click.command("train")
@click.argument("spec", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="run directory (default runs/<spec name>)",
)
@click.option("--overwrite", is_flag=True, help="replace an existing run directory")
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="continue this run directory exactly",
)
@click.option(
    "--device", help="auto, cpu, cuda or cuda:N (default: the spec's train.device, auto = CUDA if present)"
)
@click.option("--stage", type=int, help="train only stage K, the others frozen")
@click.option("--dense", is_flag=True, help="train the dense counterpart (every factorization ignored)")
@click.option(
    "--layerwise", is_flag=True, help="fit each stage to a dense teacher's stage outputs, one stage at a time"
)
@click.option(
    "--teacher", type=click.Path(path_type=Path), help="teacher run directory or checkpoint for --layerwise"
)
@click.option("--max-steps", type=int, help="stop after this many steps in all")
@click.option(
    "--export",
    "do_export",
    is_flag=True,
    help="export the stages to RUN_DIR/export and check them with onnxruntime",
)
@click.option("--quiet", is_flag=True, help="no progress bar, no table")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary on stdout at the end")
def train(
    spec: Path | None,
    run_dir: Path | None,
    overwrite: bool,
    resume_dir: Path | None,
    device: str | None,
    stage: int | None,
    dense: bool,
    layerwise: bool,
    teacher: Path | None,
    max_steps: int | None,
    do_export: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Train SPEC (Hessian-free by default) into a run directory; Ctrl-C checkpoints and stops."""
    from toolkit.train.console import ProgressBar, print_summary, summary_rows
    from toolkit.train.run import train as run_train

    if resume_dir is None and spec is None:
        raise InputError("expected a SPEC file or --resume RUN_DIR, got neither")
    if layerwise and teacher is None:
        raise InputError("--layerwise: expected --teacher RUN_DIR_OR_CHECKPOINT, got none")
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 prints
    show = not quiet and not as_json and main_process
    if resume_dir is not None:
        run_dir = resume_dir
    elif run_dir is None:
        from toolkit.spec import load_spec

        run_dir = Path("runs") / load_spec(spec).name  # type: ignore[arg-type]
    with ProgressBar(enabled=show) as bar:
        if layerwise:
            from toolkit.train.layerwise import train_layerwise

            result = train_layerwise(
                spec,
                run_dir,
                teacher=teacher,  # type: ignore[arg-type]
                overwrite=overwrite,
                device=device,
                max_steps=max_steps,
                on_progress=bar.update,
            )  # type: ignore[arg-type]
        else:
            result = run_train(
                spec,
                run_dir,
                overwrite=overwrite,
                resume=resume_dir is not None,
                device=device,
                stage=stage,
                dense=dense,
                max_steps=max_steps,
                on_progress=bar.update,
            )
    summary: dict[str, Any] = result.to_dict()
    if not main_process:
        return
    if do_export and result.status == "completed":
        from toolkit.train.deploy import export_and_check

        summary["export"] = export_and_check(run_dir, device=device)
    if as_json:
        click.echo(json.dumps(summary, default=str))
    elif show:
        print_summary(summary_rows(summary))
    if result.status == "interrupted":
        click.echo(
            f"interrupted at step {result.steps}: checkpoint written; continue with `rlhf train --resume {run_dir}`",
            err=True,
        )
        click.get_current_context().exit(130)
