"""`rlhf generate`: continue a prompt with a causal-LM export and its key/value cache (no torch)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt", required=True, help="Text to continue (byte-level models: any UTF-8 text).")
@click.option("--max-tokens", type=int, default=128, show_default=True, help="Tokens to generate.")
@click.option("--greedy", is_flag=True, help="Always take the most likely token (no sampling).")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Sampling temperature (> 0).")
@click.option("--top-k", type=int, default=None, help="Sample among the K most likely tokens only.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option(
    "--threads", type=int, default=0, show_default=True, help="intra-op threads (0 = one per core)."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (tokens, text, timing).")
def generate(
    export_dir: Path,
    prompt: str,
    max_tokens: int,
    greedy: bool,
    temperature: float,
    top_k: int | None,
    seed: int,
    threads: int,
    as_json: bool,
) -> None:
    """Continue --prompt with a causal language model export (one with a "causal_lm" manifest entry).

    Each stage runs with its key/value cache: the prompt once, then one token per step. A prompt
    longer than the model's context is refused; generation past the context slides the window
    (the last context/2 tokens become a new prompt). Prints the prompt and its continuation.
    The device command ``rlhf-run generate`` (rlhf-runtime, no torch) does the very same.
    """
    from rlhf_runtime.commands import generate_lines

    lines = generate_lines(
        export_dir,
        prompt,
        max_tokens,
        greedy=greedy,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        threads=threads,
        as_json=as_json,
    )
    for line in lines:
        click.echo(line)
