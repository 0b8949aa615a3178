"""`rlhf export`, `rlhf run`, `rlhf bench`: each parses, calls one library function, prints.

`run` and `bench` call the runtime's ``rlhf_runtime.commands`` (numpy + onnxruntime), the code the
device command ``rlhf-run`` runs too; `export` imports torch, and `bench` imports it only to time
torch eager when it is installed and a model is known.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import numpy as np

from toolkit.errors import InputError


def _load_samples(
    spec: Any, n: int
) -> tuple[
    dict[str, np.ndarray],
    np.ndarray | None,
    dict[str, np.ndarray] | None,
    dict[str, np.ndarray] | None,
    np.ndarray | None,
]:
    """From the spec's data: evaluation samples (test split) with labels, calibration samples
    (train split), and selection samples (validation split, else the train rows the calibration
    does not use) with labels, on which the int8 setting is chosen."""
    from toolkit.data import load_data

    def labels(split: Any, k: int) -> np.ndarray | None:
        return split.targets[:k] if split.targets is not None and split.targets.ndim == 1 else None

    splits = load_data(spec.train.data, spec.inputs)
    test = splits.test if len(splits.test) else splits.val
    sample = {k: v[:n] for k, v in test.inputs.items()}
    n_calib = max(n, 512)
    calib = {k: v[:n_calib] for k, v in splits.train.inputs.items()}
    if len(splits.val) and test is not splits.val:
        select = {k: v[:n] for k, v in splits.val.inputs.items()}
        select_targets = labels(splits.val, n)
    elif len(splits.train) > n_calib:
        select = {k: v[n_calib : n_calib + n] for k, v in splits.train.inputs.items()}
        t = labels(splits.train, n_calib + n)
        select_targets = None if t is None else t[n_calib:]
    else:
        select, select_targets = None, None
    return sample, labels(test, n), calib, select, select_targets


def _text_quant() -> Any:
    from toolkit.export.text import quant_candidates

    return quant_candidates()


def _text_samples(text: dict[str, Any], n: int, start: int = 0) -> dict[str, np.ndarray]:
    """``n`` sentences of the Python reference manual from ``start`` through the model's tokenizer
    (at most 128 tokens)."""
    from toolkit.export.text import tokenize
    from toolkit.factorize.corpus import python_reference_sentences

    return tokenize(text, python_reference_sentences()[start : start + n], min(128, int(text["max_length"])))


@click.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Export directory to create."
)
@click.option(
    "--quantize",
    type=click.Choice(["int8"]),
    default=None,
    help="Also write int8 files (setting chosen by accuracy on the validation split, reported on test).",
)
@click.option("--optimize", is_flag=True, help="onnxruntime offline graph optimization (basic, portable).")
@click.option("--overwrite", is_flag=True, help="Replace an existing export directory.")
@click.option("--opset", type=int, default=18, show_default=True)
@click.option(
    "--samples", type=int, default=256, show_default=True, help="Test samples for the parity check."
)
@click.option(
    "--bundle",
    "bundle_path",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write an offline bundle (.tar.gz) of the export for this platform (see `rlhf bundle`).",
)
def export(
    source: Path,
    out: Path,
    quantize: str | None,
    optimize: bool,
    overwrite: bool,
    opset: int,
    samples: int,
    bundle_path: Path | None,
) -> None:
    """Export a trained run (RUN_DIR or checkpoint) to one ONNX file per stage + manifest.json."""
    from toolkit.checkpoint import load_model
    from toolkit.export import export_model

    if samples < 2:
        raise InputError(f"--samples: expected at least 2, got {samples}")
    if bundle_path is not None and not bundle_path.name.endswith(".tar.gz"):
        raise InputError(f"--bundle {bundle_path}: expected a .tar.gz path")
    model, spec, meta = load_model(source)
    text = meta.get("text")
    if text is not None:  # a text model (rlhf import): real sentences through its own tokenizer
        sample, targets, calib, select_targets = _text_samples(text, samples), None, None, None
        from toolkit.factorize.corpus import python_reference_sentences

        left = len(python_reference_sentences()) - samples  # int8 is chosen on the next 64 sentences
        select = _text_samples(text, min(64, left), samples) if quantize and left >= 2 else None
    else:
        sample, targets, calib, select, select_targets = _load_samples(spec, samples)
    manifest = export_model(
        model,
        out,
        sample=sample,
        targets=targets,
        calibration=calib,
        opset=opset,
        quantize=quantize,
        optimize=optimize,
        overwrite=overwrite,
        source=str(source.resolve()),
        selection=select if quantize else None,
        selection_targets=select_targets,
        text=text,
        **({"quant_candidates": _text_quant()} if text is not None else {}),
    )
    par = manifest["parity"]["end_to_end"]
    click.echo(
        f"exported {len(manifest['stages'])} stages of {manifest['name']} to {out} "
        f"(end-to-end max abs error vs torch {par['max_abs']:.2e} on {manifest['parity']['samples']} samples)"
    )
    if text is not None:
        click.echo(
            "text model: tokenizer.json + manifest text entry; also loads with optimum "
            f"(ORTModelForFeatureExtraction.from_pretrained('{out}'): model.onnx, config.json)"
        )
    q = manifest.get("quantization")
    if q:
        e2e = q["end_to_end"]
        acc = (
            f", accuracy change {100 * e2e['accuracy_change']:+.2f} points"
            if "accuracy_change" in e2e
            else ""
        )
        click.echo(f"int8: {q['chosen']['label']}, size ratio {e2e['size_ratio']:.2f}{acc}")
    if bundle_path is not None:
        _write_bundle(out, bundle_path, overwrite=overwrite)


def _write_bundle(export_dir: Path, out: Path, **kwargs: Any) -> None:
    from toolkit.export.bundle import write_bundle

    digest = write_bundle(export_dir, out, **kwargs)
    size = out.stat().st_size
    click.echo(f"wrote {out} ({size / 2**20:.1f} MiB, sha256 {digest})")


@click.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Bundle to write (.tar.gz).",
)
@click.option("--python-version", default=None, help="The device's Python, e.g. 3.11 (default: this one).")
@click.option(
    "--platform",
    "platform_tag",
    default=None,
    help="The device's pip platform tag, e.g. manylinux2014_aarch64 (default: this machine).",
)
@click.option(
    "--find-links",
    default=None,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Take numpy / onnxruntime wheels from this directory instead of the package index.",
)
@click.option(
    "--runtime-wheel",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A prebuilt rlhf_runtime wheel (default: built from runtime/ of this repository).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle file.")
def bundle(
    export_dir: Path,
    out: Path,
    python_version: str | None,
    platform_tag: str | None,
    find_links: Path | None,
    runtime_wheel: Path | None,
    overwrite: bool,
) -> None:
    """Write an offline bundle of an export: the export, the runtime wheel, numpy + onnxruntime wheels
    for the device, a README with the commands to run there, and SHA256SUMS of every member.

    On the device: tar xzf BUNDLE.tar.gz; cd into it; pip install --no-index --find-links wheels
    rlhf-runtime; rlhf-run run export --input x.npy -o y.npy.
    """
    _write_bundle(
        export_dir,
        out,
        python_version=python_version,
        platform=platform_tag,
        find_links=find_links,
        runtime_wheel=runtime_wheel,
        overwrite=overwrite,
    )


@click.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--input", "input_path", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--text",
    "text_path",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Text file, one text per line (exports with a tokenizer): prints labels and scores.",
)
@click.option(
    "-o",
    "--out",
    "out",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help=".npy (one output) or .npz (required unless --text on a classifier)",
)
@click.option("--variant", default="fp32", show_default=True, help="fp32 or int8 (when exported).")
@click.option(
    "--fused",
    is_flag=True,
    help="Run the fused file (fused.onnx; model.onnx in text exports) instead of the stages.",
)
@click.option(
    "--providers", default="auto", show_default=True, help="auto, cpu, cuda or comma-separated names."
)
@click.option(
    "--memory-budget",
    type=int,
    default=None,
    help="Bytes for one stage's weights (an embedding counts the rows a batch reads) plus the "
    "tensors crossing its cuts; stream stages when they do not all fit.",
)
@click.option(
    "--threads", type=int, default=0, show_default=True, help="intra-op threads (0 = one per core)."
)
def run(
    export_dir: Path,
    input_path: Path | None,
    text_path: Path | None,
    out: Path | None,
    variant: str,
    fused: bool,
    providers: str,
    memory_budget: int | None,
    threads: int,
) -> None:
    """Run an export directory with onnxruntime on an input file; write the outputs.

    With --text, texts are tokenized with the export's tokenizer.json (manifest key "text"),
    truncated at its max_length (the count of truncated texts is printed on stderr); a classifier
    (manifest key "labels") prints one JSON line per text with its label and scores. Token ids
    outside the vocabulary or sequences longer than the model's context are refused (exit 2).
    The device command ``rlhf-run run`` (rlhf-runtime, no torch) does the very same.
    """
    from rlhf_runtime.commands import run_export

    lines = run_export(
        export_dir,
        input_path=input_path,
        text_path=text_path,
        out=out,
        variant=variant,
        fused=fused,
        providers=providers,
        memory_budget=memory_budget,
        threads=threads,
        prog="rlhf run",
        warn=lambda message: click.echo(message, err=True),
    )
    for line in lines:
        click.echo(line)


def _torch_eager(model_path: str, threads: int) -> Any:
    """A function inputs -> outputs running the torch model eagerly (None when torch is missing)."""
    try:
        import torch

        from toolkit.checkpoint import load_model
    except ImportError:
        return None
    torch.set_num_threads(max(1, threads))
    model, _, _ = load_model(model_path)
    names = list(model.input_names)

    def fn(inputs: dict[str, np.ndarray]) -> Any:
        with torch.inference_mode():
            return model(*[torch.from_numpy(inputs[n]) for n in names])

    return fn


@click.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--batch", "batches", type=int, multiple=True, default=(1, 256), show_default=True)
@click.option(
    "--threads", type=int, default=1, show_default=True, help="intra-op threads (1: edge-style latency)."
)
@click.option(
    "--model",
    "model_path",
    default=None,
    help="Run dir or checkpoint for torch eager (default: the manifest's source, when it is a "
    "relative path inside the export directory).",
)
@click.option(
    "--seconds", type=float, default=0.5, show_default=True, help="Time per configuration and batch."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench(
    export_dir: Path,
    batches: tuple[int, ...],
    threads: int,
    model_path: str | None,
    seconds: float,
    as_json: bool,
) -> None:
    """Latency percentiles, throughput and peak RSS: staged vs fused vs torch eager, int8 vs fp32.

    Inputs are random, of the manifest's shapes and dtypes (integers are ones; a dynamic axis after
    the batch axis, such as a sequence length, gets 16 positions).
    """
    from rlhf_runtime.commands import BENCH_COLUMNS, bench_cells, bench_json, bench_rows
    from rlhf_runtime.manifest import read_manifest

    if any(b < 1 for b in batches):
        raise InputError(f"--batch: expected positive batch sizes, got {list(batches)}")
    manifest = read_manifest(export_dir)
    source: str | Path | None = model_path  # a path the user passes is theirs to choose
    if source is None:
        from rlhf_runtime.manifest import source_path

        try:
            source = source_path(export_dir, manifest)
        except InputError as exc:  # never follow a manifest out of its directory
            click.echo(f"torch eager skipped: {exc}; pass --model PATH to compare with it", err=True)
    extra = {}
    if source and Path(source).exists():
        fn = _torch_eager(str(source), threads)
        if fn is not None:
            extra["torch eager"] = fn
    rows = bench_rows(export_dir, batches, threads, seconds, extra)
    if as_json:
        click.echo(bench_json(rows, threads))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{manifest.name}: {export_dir} (intra-op threads {threads})")
    for col in BENCH_COLUMNS:
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in rows:
        table.add_row(*bench_cells(r))
    Console().print(table)
