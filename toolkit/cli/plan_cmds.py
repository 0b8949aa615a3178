"""`rlhf profile` and `rlhf plan`: measure a model's per-unit cost, place its stages on devices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from toolkit.errors import InputError


def _measure(source: Path, batch: int, threads: int, seconds: float, clock: str) -> Any:
    """Profile of an export directory (its stages) or a spec file (its nodes)."""
    from toolkit.planner.measure import profile_export, profile_spec

    if source.is_dir():
        return profile_export(source, batch, threads=threads, seconds=seconds, clock=clock)
    if source.suffix.lower() == ".json" and source.is_file():
        import json

        from toolkit.planner.profile import ModelProfile

        try:
            doc = json.loads(source.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{source}: not JSON ({exc})") from None
        if isinstance(doc, dict) and "units" in doc:  # a profile written by `rlhf profile -o`
            return ModelProfile.from_dict(doc)
    from toolkit.spec import load_spec

    return profile_spec(load_spec(source), batch, threads=threads, seconds=seconds, clock=clock)


def _lowered_ranks(prof: Any, stages: Any) -> dict[str, int]:
    """Node id -> lowered rank, for the factorized nodes of stages the plan runs below full rank."""
    out: dict[str, int] = {}
    for st in stages:
        if st.rank_scale < 1:
            for u in prof.units[st.start : st.stop]:
                low = u.at_rank_scale(st.rank_scale)
                if u.rank and low.rank != u.rank and len(u.nodes) == 1:
                    out[u.nodes[0]] = low.rank
    return out


_SOURCE = click.argument("source", type=click.Path(exists=True, path_type=Path))
_BATCH = click.option("--batch", type=int, default=1, show_default=True, help="Micro-batch size to time at.")
_THREADS = click.option(
    "--threads", type=int, default=1, show_default=True, help="onnxruntime intra-op threads while timing."
)
_SECONDS = click.option("--seconds", type=float, default=1.0, show_default=True, help="Timing budget.")
_CLOCK = click.option(
    "--clock",
    type=click.Choice(["wall", "cpu"]),
    default="wall",
    show_default=True,
    help="wall: elapsed time; cpu: CPU time of the one onnxruntime thread (not inflated by other jobs).",
)


@click.command()
@_SOURCE
@_BATCH
@_THREADS
@_SECONDS
@_CLOCK
@click.option(
    "-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write JSON."
)
def profile(source: Path, batch: int, threads: int, seconds: float, clock: str, out: Path | None) -> None:
    """Per-unit latency, weight bytes and cut bytes of SOURCE (a spec: per node; an export: per stage)."""
    from rich.console import Console
    from rich.table import Table

    from toolkit.fsio import atomic_write_bytes

    prof = _measure(source, batch, threads, seconds, clock)
    table = Table(title=f"{prof.name}: profile at batch {prof.batch} ({threads} thread(s))")
    for col in ("unit", "nodes", "ms", "weights KiB", "bytes after"):
        table.add_column(col, justify="left" if col in ("unit", "nodes") else "right")
    for i, u in enumerate(prof.units):
        table.add_row(
            u.name,
            ",".join(u.nodes),
            f"{u.seconds * 1e3:.3f}",
            f"{u.weight_bytes / 1024:.1f}",
            str(prof.cut_bytes[i + 1]),
        )
    Console().print(table)
    if out is not None:
        atomic_write_bytes(out, prof.to_json().encode("utf-8"))
        click.echo(f"wrote {out}")


@click.command()
@_SOURCE
@click.option(
    "--devices",
    "devices_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="devices.yaml",
)
@click.option(
    "--objective", type=click.Choice(["throughput", "latency"]), default="throughput", show_default=True
)
@_BATCH
@_THREADS
@_SECONDS
@_CLOCK
@click.option(
    "--placement",
    "placement_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("placement.yaml"),
    show_default=True,
    help="Placement file to write.",
)
@click.option(
    "--spec-out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="New spec with the plan's stages (SOURCE a spec; default: SOURCE with .planned.yaml).",
)
@click.option(
    "--max-exact", type=int, default=8, show_default=True, help="Devices the exact programme considers."
)
@click.option(
    "--lower-ranks",
    is_flag=True,
    help="A stage that fits no device may run its factorized nodes at 1/2 or 1/4 of their ranks "
    "(SOURCE a spec; the planned spec gets the lowered ranks). The accuracy cost is not measured: "
    "train or fine-tune the planned spec and compare.",
)
def plan(
    source: Path,
    devices_path: Path,
    objective: str,
    batch: int,
    threads: int,
    seconds: float,
    clock: str,
    placement_path: Path,
    spec_out: Path | None,
    max_exact: int,
    lower_ranks: bool,
) -> None:
    """Place the stages of SOURCE (spec, export dir or profile JSON) on the devices of devices.yaml.

    Prints the plan, its predicted throughput and latency and a lower bound on the bottleneck;
    writes the placement file (for `rlhf serve`) and, for a spec, the spec with the plan's stages.
    """
    import yaml
    from rich.console import Console
    from rich.table import Table
    from rlhf_runtime.placement import PlacedStage, Placement, save_placement

    from toolkit.fsio import atomic_write_bytes
    from toolkit.planner import load_devices, plan_pipeline

    cluster = load_devices(devices_path)  # bad devices file: fail before measuring anything
    if max_exact < 1:
        raise InputError(f"--max-exact: expected a positive count, got {max_exact}")
    prof = _measure(source, batch, threads, seconds, clock)
    scales = (1.0, 0.5, 0.25) if lower_ranks else (1.0,)
    result = plan_pipeline(prof, cluster, objective, max_exact=max_exact, rank_scales=scales)

    table = Table(title=f"{prof.name}: {objective} plan at batch {prof.batch} on {devices_path}")
    for col in ("stage", "device", "units", "compute ms", "memory MiB", "send ms", "ranks"):
        table.add_column(col, justify="left" if col in ("device", "units") else "right")
    for i, st in enumerate(result.stages):
        names = [u.name for u in prof.units[st.start : st.stop]]
        label = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)})"
        table.add_row(
            str(i),
            st.device,
            label,
            f"{st.compute_s * 1e3:.3f}",
            f"{st.memory_bytes / 2**20:.2f}",
            f"{st.send_s * 1e3:.3f}",
            "as given" if st.rank_scale == 1 else f"x{st.rank_scale:g} (time estimated)",
        )
    console = Console()
    console.print(table)
    console.print(
        f"predicted: bottleneck {result.bottleneck_s * 1e3:.3f} ms, throughput {result.throughput:.1f} samples/s, "
        f"latency {result.latency_s * 1e3:.3f} ms; lower bound on the bottleneck {result.lower_bound_s * 1e3:.3f} ms; "
        + (
            "exact over every device"
            if result.exact
            else f"{result.method} over {len(cluster.devices)} devices (the programme is exact over "
            f"{len(result.candidates)} candidates)"
        )
        + f" ({result.seconds * 1e3:.0f} ms)"
    )
    predicted = {
        "bottleneck_s": result.bottleneck_s,
        "throughput": result.throughput,
        "latency_s": result.latency_s,
        "lower_bound_s": result.lower_bound_s,
    }
    cuts = prof.cut_tensors

    def handed_on(start: int, stop: int) -> tuple[str, ...]:
        """Tensors a stage makes that are still needed after it (alive at its end, not at its start)."""
        if not cuts:
            return ()
        return tuple(t for t in cuts[stop] if t not in cuts[start])

    if prof.source.get("kind") == "export":
        placed = tuple(
            PlacedStage(st.device, (st.start, st.stop), handed_on(st.start, st.stop)) for st in result.stages
        )
        placement = Placement(
            placed, prof.source["manifest_sha256"], prof.name, objective, prof.batch, predicted
        )
    else:
        placed = tuple(
            PlacedStage(st.device, (i, i + 1), handed_on(st.start, st.stop))
            for i, st in enumerate(result.stages)
        )
        placement = Placement(placed, None, prof.name, objective, prof.batch, predicted)
        if prof.source.get("kind") == "spec" and source.suffix.lower() != ".json":
            from toolkit.spec import load_spec

            spec = load_spec(source)
            doc = spec.resolved()
            doc["stages"] = [
                [nid for u in prof.units[st.start : st.stop] for nid in u.nodes] for st in result.stages
            ]
            lowered = _lowered_ranks(prof, result.stages)
            for node in doc["nodes"]:
                if node["id"] in lowered:
                    node["factorize"] = {"rank": lowered[node["id"]]}
            if lowered:
                click.echo(
                    f"lowered ranks to fit: {lowered} (accuracy cost not measured: train or fine-tune "
                    "the planned spec and compare)"
                )
            out = spec_out or source.with_suffix(".planned.yaml")
            atomic_write_bytes(out, yaml.safe_dump(doc, sort_keys=False).encode("utf-8"))
            click.echo(
                f"wrote {out} (the spec with the plan's {len(result.stages)} stages; export it, then serve)"
            )
    save_placement(placement, placement_path)
    click.echo(f"wrote {placement_path}")
