"""`rlhf import PATH -o OUT`: a Hugging Face BERT-family directory -> graph spec + spec checkpoint."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(name="import")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option(
    "--max-length",
    type=int,
    default=None,
    help="Sequence length of the spec's inputs [default: sentence-transformers' max_seq_length, "
    "else max_position_embeddings].",
)
@click.option(
    "--stages",
    type=int,
    default=3,
    show_default=True,
    help="Stages: the embeddings, then even runs of layers.",
)
@click.option("--name", default=None, help="Spec name [default: from the directory].")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def import_(
    source: Path, out: Path, max_length: int | None, stages: int, name: str | None, overwrite: bool
) -> None:
    """Import a Hugging Face BERT-family model directory (offline) as a spec + checkpoint.

    Writes OUT/spec.yaml (the encoder layer as a repeated block), OUT/checkpoints/best-00000000
    (weights; the tokenizer travels in its metadata) and OUT/tokenizer/. Every downstream command
    takes OUT: rlhf show OUT/spec.yaml, rlhf export OUT, rlhf factorize OUT, ...
    """
    from toolkit.errors import InputError
    from toolkit.hf_import import import_bert

    if stages < 1:
        raise InputError(f"--stages: expected a positive count, got {stages}")
    ckpt = import_bert(source, out, max_length=max_length, stages=stages, overwrite=overwrite, name=name)
    click.echo(f"imported {source} -> {out}/spec.yaml, {ckpt}")
