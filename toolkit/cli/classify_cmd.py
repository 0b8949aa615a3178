"""`rlhf classify SOURCE --train data.csv -o OUT`: fine-tune a text classifier on a (factorized)
Hugging Face encoder with minibatch Hessian-free (or AdamW), early stopping, resume and a λ sweep."""

from __future__ import annotations

import json
from pathlib import Path

import click

P = click.Path(path_type=Path)


@click.command()
@click.argument("source", type=P)
@click.option("--train", "train_path", required=True, help="CSV/JSONL file, or 'rotten_tomatoes' (built in).")
@click.option(
    "--eval", "--val", "val_path", type=P, default=None, help="Validation file (default: 10% of --train)."
)
@click.option(
    "--test", "test_path", type=P, default=None, help="Test file, scored at the best validation point."
)
@click.option("--text-column", default="text", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("-o", "--out", type=P, required=True, help="Output directory (classifier + ONNX export).")
@click.option(
    "--run-dir", type=P, default=None, help="Checkpoints, metrics.jsonl, curves (default OUT.run beside OUT)."
)
@click.option(
    "--trainable",
    default="head",
    show_default=True,
    help="head | factors (head + U of factorized layers) | last:K (last K blocks + head) | all.",
)
@click.option("--optimizer", type=click.Choice(["hf", "adamw"]), default="hf", show_default=True)
@click.option("--steps", type=int, default=200, show_default=True, help="Optimizer steps at most.")
@click.option("--time-budget", type=float, default=None, help="Seconds of training at most.")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Gradient minibatch.")
@click.option(
    "--curvature-batch", type=int, default=64, show_default=True, help="Hessian-free curvature sub-batch."
)
@click.option("--eval-every", type=int, default=10, show_default=True, help="Steps between validations.")
@click.option(
    "--patience", type=int, default=5, show_default=True, help="Validations without gain before stopping."
)
@click.option("--l2", type=float, default=0.0, show_default=True)
@click.option("--l1", type=float, default=0.0, show_default=True)
@click.option("--group-lasso", type=float, default=0.0, show_default=True)
@click.option(
    "--l2-sp", type=float, default=0.0, show_default=True, help="½λ‖θ-θ₀‖² toward the pretrained weights."
)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="AdamW learning rate.")
@click.option(
    "--sweep", default=None, help="NAME=V1,V2,... (l2, l1, group_lasso, l2_sp, lr, ...): pick by validation."
)
@click.option("--max-length", type=int, default=64, show_default=True, help="Token cap per text.")
@click.option(
    "--cg-max-iters", type=int, default=20, show_default=True, help="CG iterations per step at most."
)
@click.option(
    "--preconditioner",
    default="kfac",
    show_default=True,
    help="Hessian-free CG preconditioner: kfac | ekfac | nystrom | diagonal | none.",
)
@click.option(
    "--kfac-samples",
    default="16",
    show_default=True,
    help="Draws per example for K-FAC's G, or 'exact' (one backward pass per class: cheaper for few classes).",
)
@click.option("--kfac-every", type=int, default=5, show_default=True, help="Steps between K-FAC refreshes.")
@click.option(
    "--average",
    type=float,
    default=0.0,
    show_default=True,
    help="Iterate averaging: decay of an exponential moving average of the trained weights, which is what "
    "is scored and kept (e.g. 0.9; 0: off).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Split and data order.")
@click.option(
    "--bucket",
    type=int,
    default=0,
    show_default=True,
    help="With cached hidden states (last:K): sort each window of N minibatches by text length and trim "
    "each minibatch to its longest text (0: off).",
)
@click.option(
    "--onnx/--no-onnx",
    "onnx_",
    default=True,
    show_default=True,
    help="Also export model.onnx + manifest.json.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (as a whole: no old file stays).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def classify(
    source: Path, train_path: str, val_path: Path | None, test_path: Path | None, text_column: str,
    label_column: str, out: Path, run_dir: Path | None, trainable: str, optimizer: str, steps: int,
    time_budget: float | None, batch_size: int, curvature_batch: int, eval_every: int, patience: int,
    l2: float, l1: float, group_lasso: float, l2_sp: float, lr: float, sweep: str | None, max_length: int,
    cg_max_iters: int, preconditioner: str, kfac_samples: str, kfac_every: int, average: float, seed: int,
    bucket: int,
    onnx_: bool, overwrite: bool, as_json: bool,
) -> None:  # fmt: skip
    """Fine-tune a text classifier on SOURCE (a Hugging Face model directory, or one written by
    `rlhf factorize`) from a CSV/JSONL of text,label, or the built-in Rotten Tomatoes set.

    \b
    Frozen layers below the first trained one run once (their features are cached). Training stops
    early on validation; the best validation state is kept; rerunning the same command resumes from
    RUN_DIR/checkpoint.pt (default: OUT.run beside OUT). OUT gets the encoder (model.safetensors, factorize.json), the head
    (classifier.safetensors, classifier.json) and, with --onnx, model.onnx + manifest.json (with the
    tokenizer and label names): `rlhf run OUT --text texts.txt` prints labels and scores. OUT is
    built under a temporary name and swapped in when complete; an existing OUT is refused without
    --overwrite.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from toolkit.errors import InputError
    from toolkit.factorize.classify import (
        export_classifier,
        load_text_splits,
        parse_sweep,
        prepare_model,
        run_sweep,
        text_encoder_of,
    )
    from toolkit.factorize.classify_train import FitConfig
    from toolkit.factorize.hf import load_factorized_hf, load_hf
    from toolkit.fsio import check_new_dir, staged_dir

    if max_length < 2:
        raise InputError(f"--max-length: expected >= 2, got {max_length}")
    cfg = FitConfig(
        optimizer=optimizer, batch_size=batch_size, curvature_batch=curvature_batch, max_steps=steps,
        time_budget=time_budget, eval_every=eval_every, patience=patience, l2=l2, l1=l1,
        group_lasso=group_lasso, l2_sp=l2_sp, lr=lr, cg_max_iters=cg_max_iters, seed=seed, bucket=bucket,
        preconditioner=preconditioner, kfac_every=kfac_every, average=average,
        kfac_samples=int(kfac_samples) if kfac_samples.strip().isdigit() else kfac_samples.strip(),
    )  # fmt: skip
    cfg.check()
    grid = parse_sweep(sweep) if sweep else None
    check_new_dir(out, overwrite)  # before any training
    run_dir = run_dir or out.with_name(out.name + ".run")  # outside OUT, which is swapped in whole
    factorized = (source / "factorize.json").is_file()
    encoder, tok = load_factorized_hf(source) if factorized else load_hf(source)
    text_enc = text_encoder_of(tok, max_length)
    splits = load_text_splits(
        text_enc, train_path, val_path, test_path, text_col=text_column, label_col=label_column, seed=seed
    )  # every data problem is reported here, before anything is written
    console = Console(stderr=True)
    total = len(splits.train) + len(splits.val) + (len(splits.test) if splits.test is not None else 0)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True, disable=as_json) as bar:  # fmt: skip
        task = bar.add_task("features", total=total)
        prepared = prepare_model(encoder, splits, trainable, progress=lambda n: bar.advance(task, n))
        bar.update(task, description="training", completed=0, total=steps)

        def step_progress(step: int, _total: int, last: dict[str, float]) -> None:
            acc = f" val {last['val_accuracy']:.3f}" if last else ""
            bar.update(task, completed=step, description=f"training{acc}")

        result = run_sweep(prepared, cfg, run_dir, grid, step_progress)
    chosen = result["chosen"]
    from toolkit.factorize.classify_train import evaluate

    history = json.loads((Path(chosen["dir"]) / "result.json").read_text())["history"]
    summary: dict[str, object] = {
        "labels": splits.names,
        "trainable": trainable,
        "train_examples": len(splits.train),
        "truncated_texts": splits.truncated,
        "train_loss": [h["train_loss"] for h in history],
        "train_accuracy": chosen["train"]["accuracy"],
        "eval_examples": len(splits.val),
        "eval_accuracy": evaluate(prepared.train_model, prepared.data["val"])["accuracy"],
        "best_step": chosen["best_step"],
        "stopped": chosen["stopped"],
    }
    if grid is not None:
        summary["sweep"] = [
            {"value": r["value"], "best_val_accuracy": r["best_val_accuracy"]} for r in result["runs"]
        ]
        summary["chosen"] = {grid[0]: chosen["value"]}
    if "test" in chosen:
        summary["test_accuracy"] = chosen["test"]["accuracy"]
        summary["test_macro_f1"] = chosen["test"]["macro_f1"]
    report = (source / "factorize.json").read_text() if factorized else json.dumps({"layers": []})
    sample = tok.batch_decode(splits.train.input_ids[:8].tolist(), skip_special_tokens=True)
    with staged_dir(out, overwrite) as tmp:  # head, encoder and export swapped in together
        if onnx_:
            export_classifier(
                prepared.classifier,
                tok,
                splits.names,
                tmp,
                report,
                max_length,
                sample,
                name=out.resolve().name,
            )
        else:
            from toolkit.factorize.classify import save_classifier

            save_classifier(prepared.classifier, tok, splits.names, report, tmp, max_length)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    if splits.truncated:
        console.print(f"{splits.truncated} texts longer than {max_length} tokens were truncated")
    console.print(
        f"train accuracy {summary['train_accuracy']:.4f}, validation {summary['eval_accuracy']:.4f} "
        f"(best step {chosen['best_step']}, stopped: {chosen['stopped']}; labels {splits.names})"
    )
    if "test_accuracy" in summary:
        console.print(
            f"test accuracy {summary['test_accuracy']:.4f}, macro-F1 {summary['test_macro_f1']:.4f}"
        )
    if grid is not None:
        console.print(f"sweep {grid[0]}: chose {chosen['value']:g}; table in {Path(run_dir) / 'sweep.md'}")
    console.print(f"wrote {out}", highlight=False)
