"""`rlhf factorize SOURCE -o OUT`: dense spec checkpoint or Hugging Face directory -> factorized model."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import click

from toolkit.errors import InputError


def _sentences(path: Path | None, limit: int) -> list[str]:
    """Calibration sentences: a .txt (one per line) or .csv with a ``text`` column; default the Python docs."""
    if path is None:
        from toolkit.factorize.corpus import python_reference_sentences

        return python_reference_sentences()[:limit]
    if not path.is_file():
        raise FileNotFoundError(f"--calibration {path}: expected a .txt or .csv file, got no such file")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if "text" not in (reader.fieldnames or []):
                raise InputError(f"--calibration {path}: expected a 'text' column, got {reader.fieldnames}")
            lines = [row["text"] for row in reader if (row["text"] or "").strip()]
    else:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise InputError(f"--calibration {path}: expected at least one sentence, got none")
    return lines[:limit]


@click.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--rank", type=int, default=None, help="Fixed rank per layer.")
@click.option(
    "--ratio", type=float, default=None, help="Factor parameters per layer as a share of dense, in (0, 1]."
)
@click.option(
    "--energy", type=float, default=None, help="Keep this share of the (scaled) singular-value energy."
)
@click.option(
    "--budget", type=float, default=None, help="Global budget: share (<= 1) or count of factor parameters."
)
@click.option(
    "--sensitivity",
    is_flag=True,
    help="Spend --budget by measured end-to-end sensitivity (each layer factorized alone at 4 sizes, the "
    "model evaluated; layers may stay dense) instead of by singular values. Metric: Hugging Face, 1 - cosine "
    "of sentence embeddings to the dense model; spec, relative output error.",
)
@click.option("--method", type=click.Choice(["svd", "asvd"]), default="svd", show_default=True)
@click.option("--include", default=None, help="Regex on module names selecting the layers to factorize.")
@click.option(
    "--calibration",
    type=click.Path(path_type=Path),
    default=None,
    help="Hugging Face and imported text models: .txt/.csv sentences (default: the Python reference manual); "
    "other spec models: ignored (their train data).",
)
@click.option("--samples", type=int, default=128, show_default=True, help="Calibration sentences / rows.")
@click.option(
    "--refit/--no-refit", default=False, help="Layer-wise least-squares refit to the dense outputs."
)
@click.option(
    "--distill-steps",
    type=int,
    default=0,
    show_default=True,
    help="Hugging Face and imported text models: distillation steps against the dense model, on the "
    "--calibration corpus (all of it, with word-level augmentation; token-state MSE + pooled cosine, AdamW).",
)
@click.option(
    "--distill-lr", type=float, default=5e-4, show_default=True, help="Distillation peak learning rate."
)
@click.option(
    "--onnx/--no-onnx",
    "onnx_",
    default=True,
    show_default=True,
    help="Hugging Face: also export model.onnx and a manifest.json for the executor.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (as a whole: no old file stays).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
def factorize(
    source: Path,
    out: Path,
    rank: int | None,
    ratio: float | None,
    energy: float | None,
    budget: float | None,
    sensitivity: bool,
    method: str,
    include: str | None,
    calibration: Path | None,
    samples: int,
    refit: bool,
    distill_steps: int,
    distill_lr: float,
    onnx_: bool,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Factorize SOURCE (a Hugging Face model directory, or a run/checkpoint of a dense spec model) into OUT.

    OUT is built under a temporary name beside it and swapped in when complete, so it never holds
    a mix of old and new files; an existing OUT is refused without --overwrite.
    """
    from rich.console import Console

    from toolkit.fsio import check_new_dir, staged_dir

    if not source.exists():
        raise FileNotFoundError(
            f"SOURCE {source}: expected a Hugging Face model directory or a checkpoint, got no such path"
        )
    if samples < 1 or distill_steps < 0 or not distill_lr > 0:
        raise InputError(
            f"--samples/--distill-steps/--distill-lr: expected >= 1, >= 0 and > 0, got {samples}, "
            f"{distill_steps} and {distill_lr}"
        )
    rule: dict[str, Any] = {"rank": rank, "ratio": ratio, "energy": energy, "budget": budget}
    from toolkit.factorize.core import _check_rule

    _check_rule(**rule)  # fail on bad values before loading anything
    check_new_dir(out, overwrite)
    if sensitivity and budget is None:
        raise InputError("--sensitivity: expected --budget (the parameter budget to allocate), got none")
    console = Console(stderr=as_json, width=None if sys.stdout.isatty() else 160)
    if (source / "config.json").is_file():
        report_obj = _hf(
            source,
            out,
            overwrite,
            rule,
            sensitivity,
            method,
            include,
            calibration,
            samples,
            refit,
            distill_steps,
            distill_lr,
            onnx_,
            console,
        )
    else:
        from toolkit.checkpoint import load_model
        from toolkit.factorize.spec_model import data_batches, factorize_checkpoint

        calib = None
        dense_model, spec, meta = load_model(source)
        text = meta.get("text")
        if text is not None and include is None:  # a text model: the repeated blocks' layers
            from toolkit.factorize.spec_model import node_pattern

            include = node_pattern(n.id for n in spec.nodes if n.group is not None)
        if method == "asvd" or refit or sensitivity:
            if text is not None:  # real sentences through the model's own tokenizer
                from toolkit.export.text import tokenize

                arrays = tokenize(text, _sentences(calibration, samples), 128)
                calib = data_batches(arrays, list(spec.inputs), batch_size=32, limit=samples)
            else:
                from toolkit.data import load_data

                data = load_data(spec.train.data, spec.inputs)
                calib = data_batches(data.train.inputs, list(spec.inputs), limit=samples * 8)
            if sensitivity:
                from toolkit.factorize.sensitivity import output_distortion

                metric = output_distortion(dense_model, calib)
                rule = _sensitivity_rule(
                    dense_model, metric, rule, include, calib if method == "asvd" else None, console
                )
        tune = None
        if distill_steps:
            if text is None:
                raise InputError(
                    f"--distill-steps: expected a Hugging Face directory or an imported text model, "
                    f"got {source} (a spec model without text inputs; use rlhf train --layerwise)"
                )
            tune = _spec_distiller(source, text, calibration, distill_steps, distill_lr, console)
        with staged_dir(out, overwrite) as tmp:
            _m, report_obj, ckpt = factorize_checkpoint(
                source, tmp, calibration=calib, include=include, method=method, refit=refit, tune=tune, **rule
            )
        ckpt = out / ckpt.relative_to(tmp)
        console.print(f"wrote {ckpt} (spec + weights), {out / 'factorize.json'}")
    if as_json:
        click.echo(report_obj.to_json())
    else:
        console.print(report_obj.table())


def _spec_distiller(
    source: Path, text: Any, calibration: Path | None, steps: int, lr: float, console: Any
) -> Any:
    """factorized model ↦ distilled in place against the dense checkpoint at ``source``."""
    from toolkit.checkpoint import load_model
    from toolkit.factorize.spec_text import distill_spec

    teacher, _spec, _meta = load_model(source)
    corpus = _sentences(calibration, 1_000_000)  # every sentence of the corpus, augmented

    def tune(model: Any) -> None:
        log = distill_spec(model, teacher, text, corpus, steps, lr=lr)
        console.print(f"distilled {steps} steps ({log.seconds:.0f} s), last loss {log.losses[-1]:.4g}")

    return tune


def _sensitivity_rule(
    model: Any, metric: Any, rule: dict[str, Any], include: str | None, calibration: Any, console: Any
) -> dict[str, Any]:
    """Spend ``rule["budget"]`` by measured sensitivity; the rule with the chosen per-layer ranks."""
    from toolkit.factorize.sensitivity import sensitivity_ranks

    sens = sensitivity_ranks(model, metric, rule["budget"], include=include, calibration=calibration)
    dense = sum(1 for r in sens.ranks.values() if r == 0)
    console.print(
        f"sensitivity: {len(sens.layers)} layers measured, {dense} kept dense, "
        f"{sens.factor_params:,} weight parameters allocated"
    )
    return {"rank": sens.ranks, "ratio": None, "energy": None, "budget": None}


def _hf(
    source: Path,
    out: Path,
    overwrite: bool,
    rule: dict[str, Any],
    sensitivity: bool,
    method: str,
    include: str | None,
    calibration: Path | None,
    samples: int,
    refit: bool,
    distill_steps: int,
    distill_lr: float,
    onnx_: bool,
    console: Any,
) -> Any:
    import copy

    from toolkit.factorize import factorize_module
    from toolkit.factorize.hf import (
        augmented_batches,
        batches,
        distill,
        export_encoder,
        load_hf,
        save_factorized_hf,
    )
    from toolkit.fsio import staged_dir

    model, tok = load_hf(source)
    sentences = _sentences(calibration, samples)
    cal = batches(tok, sentences, 32) if (method == "asvd" or refit) else None
    teacher = copy.deepcopy(model) if distill_steps else None
    include = include if include is not None else r"encoder\.layer\."
    if sensitivity:
        from toolkit.factorize.hf import embedding_distortion

        metric = embedding_distortion(model, tok, sentences[:96])
        rule = _sensitivity_rule(model, metric, rule, include, cal if method == "asvd" else None, console)
    report = factorize_module(
        model,
        include=include,
        method=method,
        calibration=cal,
        refit=refit,
        **rule,
    )
    if teacher is not None:
        corpus = _sentences(calibration, 1_000_000)  # every sentence of the corpus, augmented
        distill(model, teacher, augmented_batches(tok, corpus, 32), steps=distill_steps, lr=distill_lr)
    with staged_dir(out, overwrite) as tmp:  # weights, report and export swapped in together
        save_factorized_hf(model, tok, report.to_json(), tmp)
        if onnx_:
            export_encoder(model, tok, sentences[:8], tmp, name=out.resolve().name)
    onnx_files = ", model.onnx, manifest.json (run it with rlhf run / rlhf bench)" if onnx_ else ""
    console.print(f"wrote {out} (model.safetensors, factorize.json{onnx_files})")
    return report
