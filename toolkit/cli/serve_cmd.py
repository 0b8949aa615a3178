"""`rlhf serve`: run an export as a pipeline of Ray actors placed by a placement file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import numpy as np

from toolkit.errors import InputError


def _table(stats: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(
        title=(
            f"{stats['requests']} requests, {stats['throughput_rps']:.1f} req/s, latency p50 "
            f"{stats['p50_ms']:.2f} / p90 {stats['p90_ms']:.2f} / p99 {stats['p99_ms']:.2f} ms, "
            f"retries {stats['retries']}"
        )
    )
    table.add_column("stage", justify="right")
    table.add_column("device")
    table.add_column("utilisation", justify="right")
    for i, (dev, util) in enumerate(zip(stats["devices"], stats["utilisation"])):
        table.add_row(str(i), dev, f"{100 * util:.0f}%")
    return table


@click.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--placement",
    "placement_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="placement.yaml from `rlhf plan`.",
)
@click.option(
    "--input", "input_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help=".npy or .npz"
)
@click.option(
    "--micro-batch", type=int, default=None, help="Rows per request (default: the placement's batch)."
)
@click.option(
    "--threads", type=int, default=1, show_default=True, help="onnxruntime intra-op threads per stage."
)
@click.option(
    "--max-in-flight", type=int, default=None, help="Requests in the pipeline at once (default 2 per stage)."
)
@click.option("--address", default=None, help="Ray cluster address (default: start a local one).")
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the measured per-stage times (JSON) here, for `rlhf plan EXPORT --measured`.",
)
def serve(
    export_dir: Path,
    placement_path: Path,
    input_path: Path,
    out: Path,
    micro_batch: int | None,
    threads: int,
    max_in_flight: int | None,
    address: str | None,
    report_path: Path | None,
) -> None:
    """Run EXPORT_DIR as a pipeline of Ray actors (one per placed stage) on an input file.

    The input is cut into micro-batches that flow through the stages concurrently; the outputs
    equal `rlhf run` on each micro-batch bit for bit. Throughput, latency percentiles and
    per-stage utilisation are shown live.
    """
    from rich.console import Console
    from rich.live import Live
    from rlhf_runtime.commands import read_input
    from rlhf_runtime.manifest import read_manifest
    from rlhf_runtime.pipeline import Pipeline
    from rlhf_runtime.placement import check_placement, load_placement

    suffix = out.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise InputError(f"-o {out}: expected a .npy or .npz path, got {suffix or 'no extension'}")
    manifest = read_manifest(export_dir)
    placement = load_placement(placement_path)
    check_placement(placement, export_dir, manifest)
    inputs = read_input(input_path, manifest.inputs)
    size = micro_batch or placement.batch
    if size < 1:
        raise InputError(f"--micro-batch: expected >= 1, got {size}")
    console = Console(stderr=True)
    with Pipeline(
        export_dir, placement, address=address, threads=threads, max_in_flight=max_in_flight
    ) as pipe:
        last = [0.0]
        with Live(console=console, refresh_per_second=4, transient=True) as live:

            def show(p: Pipeline) -> None:
                import time

                now = time.perf_counter()
                if now - last[0] > 0.25:
                    last[0] = now
                    live.update(_table(p.stats()))

            outputs = pipe.run(inputs, size, on_result=show)
        stats = pipe.stats()
        report = pipe.report() if report_path is not None else None
    console.print(_table(stats))
    if suffix == ".npz":
        np.savez(out, **outputs)  # type: ignore[arg-type]
    else:
        if len(outputs) != 1:
            raise InputError(f"-o {out}: the model has outputs {list(outputs)}: expected a .npz path")
        np.save(out, next(iter(outputs.values())))
    if report_path is not None:
        import json

        from toolkit.fsio import atomic_write_bytes

        atomic_write_bytes(report_path, (json.dumps(report, indent=1) + "\n").encode("utf-8"))
        click.echo(f"wrote {report_path} (per-stage times; `rlhf plan EXPORT --measured {report_path}`)")
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in outputs.items())
    click.echo(f"wrote {out}: {shapes} ({len(placement.stages)} stages, micro-batch {size})")
