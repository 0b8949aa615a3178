"""`rlhf classify SOURCE --train data.csv -o OUT`: a text classifier on a (factorized) Hugging Face encoder."""

from __future__ import annotations

import json
from pathlib import Path

import click

from toolkit.errors import InputError


@click.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "--train",
    "train_csv",
    required=True,
    type=click.Path(path_type=Path),
    help="CSV with columns text,label (the whole file is one Hessian-free batch: for small sets).",
)
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option(
    "--eval", "eval_csv", type=click.Path(path_type=Path), default=None, help="Held-out CSV text,label."
)
@click.option("--steps", type=int, default=5, show_default=True, help="Hessian-free steps.")
@click.option(
    "--head-only",
    is_flag=True,
    help="Train the head only (default: also the U factors of factorized layers).",
)
@click.option("--max-length", type=int, default=32, show_default=True, help="Token cap per text.")
@click.option(
    "--cg-max-iters", type=int, default=50, show_default=True, help="CG iterations per step at most."
)
@click.option(
    "--onnx/--no-onnx",
    "onnx_",
    default=True,
    show_default=True,
    help="Also export model.onnx (logits) + manifest.json.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (as a whole: no old file stays).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def classify(
    source: Path,
    train_csv: Path,
    out: Path,
    eval_csv: Path | None,
    steps: int,
    head_only: bool,
    max_length: int,
    cg_max_iters: int,
    onnx_: bool,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Fine-tune a classification head on SOURCE (a Hugging Face model directory, or one written by
    `rlhf factorize`) with the Hessian-free optimizer, from a CSV of text,label.

    \b
    OUT gets the encoder (model.safetensors, factorize.json), the head (classifier.safetensors,
    classifier.json with the label names) and, with --onnx, model.onnx + manifest.json whose output
    'logits' (batch, labels) `rlhf run OUT --input ids.npz` computes. OUT is built under a
    temporary name and swapped in when complete; an existing OUT is refused without --overwrite.
    """
    from rich.console import Console

    from toolkit.factorize.classify import accuracy, fine_tune_classifier, read_text_csv, save_classifier
    from toolkit.factorize.hf import export_text_model, load_factorized_hf, load_hf
    from toolkit.fsio import check_new_dir, staged_dir

    if steps < 1 or max_length < 2 or cg_max_iters < 1:
        raise InputError(
            f"--steps/--max-length/--cg-max-iters: expected >= 1, >= 2, >= 1, got {steps}, {max_length}, {cg_max_iters}"
        )
    check_new_dir(out, overwrite)  # before any training
    texts, labels = read_text_csv(train_csv)
    held = read_text_csv(eval_csv) if eval_csv is not None else None  # fail on a bad file before training
    factorized = (source / "factorize.json").is_file()
    encoder, tok = load_factorized_hf(source) if factorized else load_hf(source)
    console = Console(stderr=as_json)
    model, fit = fine_tune_classifier(
        encoder,
        tok,
        texts,
        labels,
        steps=steps,
        train_factors=not head_only,
        max_length=max_length,
        cg_max_iters=cg_max_iters,
    )
    result: dict[str, object] = {
        "labels": fit.labels,
        "train_examples": len(texts),
        "train_loss": fit.losses,
        "train_accuracy": fit.accuracy,
    }
    if held is not None:
        result["eval_examples"] = len(held[0])
        result["eval_accuracy"] = accuracy(model, tok, held[0], held[1], fit.labels, max_length)
    report = (source / "factorize.json").read_text() if factorized else json.dumps({"layers": []})
    with staged_dir(out, overwrite) as tmp:  # head, encoder and export swapped in together
        save_classifier(model, tok, fit.labels, report, tmp, max_length)
        if onnx_:
            name = out.resolve().name
            export_text_model(model, tok, texts[:8], tmp, "logits", max_length=max_length, name=name)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    console.print(f"train loss {' -> '.join(f'{x:.4f}' for x in fit.losses)}")
    console.print(f"train accuracy {fit.accuracy:.3f} ({len(texts)} texts, labels {fit.labels})")
    if held is not None:
        console.print(f"eval accuracy {result['eval_accuracy']:.3f} ({len(held[0])} texts)")
    files = "model.safetensors, classifier.safetensors, classifier.json" + (
        ", model.onnx, manifest.json" if onnx_ else ""
    )
    console.print(f"wrote {out} ({files})", highlight=False)
