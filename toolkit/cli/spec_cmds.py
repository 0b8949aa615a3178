"""`rlhf validate`, `rlhf schema`, `rlhf show`, `rlhf graph`: each parses, calls toolkit.spec, prints."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from toolkit.errors import InputError
from toolkit.spec import GraphSpec, SpecError, json_schema, load_spec
from toolkit.spec.errors import Problem, format_path
from toolkit.spec.summary import summarize, to_dot, to_mermaid, totals


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def validate(files: tuple[Path, ...]) -> None:
    """Check graph specs; print `ok FILE` for each valid one, every problem of the others (exit 2)."""
    bad: list[str] = []
    for f in files:
        try:
            spec = load_spec(f)
        except SpecError as exc:
            bad += [str(p) for p in exc.problems]
            continue
        except FileNotFoundError as exc:
            bad.append(str(exc))
            continue
        click.echo(f"ok {f}")
        for loc, msg in spec.analysis.notes:
            click.echo(f"warning: {Problem(str(f), format_path(loc), None, msg)}", err=True)
    if bad:
        raise InputError("\n".join(bad))


def _ratio(dense: int, actual: int) -> str:
    return f"{dense / actual:.2f}x" if actual else "-"


def render_summary(
    spec: GraphSpec, ranks: dict[str, int] | None = None, console: Console | None = None
) -> None:
    """Print one table row per node, a total per stage and overall, and the compression ratio.

    Args:
        spec: a validated spec.
        ranks: real ranks of a built model (for ``energy`` nodes), or None.
        console: where to print (default: stdout, wide enough not to wrap).
    """
    console = console or Console(width=160)
    rows = summarize(spec, ranks)
    table = Table(title=f"{spec.name}: {len(spec.nodes)} nodes, {len(spec.stage_partition())} stages")
    for col in (
        "stage",
        "node",
        "op",
        "output",
        "rank",
        "params (dense)",
        "params",
        "MACs (dense)",
        "MACs",
        "note",
    ):
        table.add_column(
            col, justify="right" if col.startswith(("params", "MACs", "rank", "stage")) else "left"
        )
    for s in range(len(spec.stage_partition())):
        stage_rows = [r for r in rows if r.stage == s]
        for r in stage_rows:
            table.add_row(
                str(r.stage),
                r.id,
                r.op,
                "x".join(map(str, r.shape)),
                "-" if r.rank is None else str(r.rank),
                f"{r.dense_params:,}",
                f"{r.params:,}",
                f"{r.dense_macs:,}",
                f"{r.macs:,}",
                r.note,
            )
        t = totals(stage_rows)
        table.add_row(
            str(s),
            "[b]stage total[/b]",
            "",
            "",
            "",
            f"{t['dense_params']:,}",
            f"{t['params']:,}",
            f"{t['dense_macs']:,}",
            f"{t['macs']:,}",
            _ratio(t["dense_params"], t["params"]),
            end_section=True,
        )
    t = totals(rows)
    table.add_row(
        "",
        "[b]total[/b]",
        "",
        "",
        "",
        f"{t['dense_params']:,}",
        f"{t['params']:,}",
        f"{t['dense_macs']:,}",
        f"{t['macs']:,}",
        "",
    )
    console.print(table)
    console.print(
        f"compression: {_ratio(t['dense_params'], t['params'])} fewer parameters, "
        f"{_ratio(t['dense_macs'], t['macs'])} fewer multiply-adds per example than the dense graph"
    )


@click.command()
def schema() -> None:
    """Print the JSON Schema of graph specs."""
    click.echo(json.dumps(json_schema(), indent=2))


@click.command()
@click.argument("file", type=click.Path(path_type=Path))
def show(file: Path) -> None:
    """Table of nodes: op, output shape, dense vs factorized parameters and multiply-adds, stage."""
    spec = load_spec(file)
    ranks = None
    if any(p.kind == "energy" for p in spec.analysis.plans.values()):
        from toolkit.builder import build_model  # energy ranks exist only once weights are drawn

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ranks = build_model(spec, seed=spec.train.seed).ranks()
    render_summary(spec, ranks)


@click.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["mermaid", "dot"]), default="mermaid", show_default=True)
def graph(file: Path, fmt: str) -> None:
    """Draw a spec as Mermaid or Graphviz dot, stages as clusters."""
    spec = load_spec(file)
    click.echo(to_mermaid(spec) if fmt == "mermaid" else to_dot(spec), nl=False)
