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


def _is_run(path: Path) -> bool:
    """A run directory (``rlhf train``/``import``/``factorize`` output) or a checkpoint directory."""
    return path.is_dir() and any(
        (path / name).exists() for name in ("run.json", "checkpoints", "checkpoint.json")
    )


def _check_same_model(prof: Any, model: Any, run: Path) -> None:
    """Refuse a profile (of SOURCE) that does not describe the checkpoint's model node for node."""
    if prof.source.get("kind") != "spec":
        raise InputError(
            f"--run {run}: expected SOURCE to be a spec or a profile of one (units = nodes), "
            f"got a profile of kind {prof.source.get('kind')!r}"
        )
    nodes = [n for u in prof.units for n in u.nodes]
    order = list(model.spec.analysis.order)
    if nodes != order:
        raise InputError(f"--run {run}: expected the nodes of SOURCE {nodes[:6]}, got {order[:6]}")
    ranks = model.ranks()
    for u in prof.units:
        nid = u.nodes[0]
        if ranks.get(nid, 0) != u.rank:
            raise InputError(
                f"--run {run}: node {nid!r}: SOURCE has rank {u.rank or 'dense'}, the checkpoint "
                f"{ranks.get(nid) or 'dense'} (trained ranks differ): plan the run itself, `rlhf plan {run} ...`"
            )


def _val_metrics(
    models: dict[str, Any], spec: Any, meta: dict[str, Any], run: Path
) -> dict[str, dict[str, float]]:
    """Loss (and accuracy for classifiers) of each model on the run's validation split, on the CPU.

    Raises:
        InputError: the run was trained on other data than its spec's ``train.data`` gives (data
            passed in memory), or the split is empty.
    """
    import torch

    from toolkit.data import check_targets, load_data
    from toolkit.train.losses import get_loss
    from toolkit.train.metrics import evaluate

    cfg = spec.train
    splits = load_data(cfg.data, spec.inputs)
    trained_on = meta.get("data")
    if trained_on is not None and trained_on != splits.source:
        raise InputError(
            f"--run {run}: trained on data from {trained_on!r}, expected the spec's train.data "
            f"({splits.source!r}) to give its validation split back"
        )
    val = splits.val
    if len(val) == 0:
        raise InputError(
            f"--run {run}: expected a validation split to measure the accuracy cost on, got none "
            f"(train.data.val_fraction is {cfg.data.val_fraction})"
        )
    first = next(iter(models.values()))
    param = next(first.parameters())
    with torch.no_grad():
        x = tuple(torch.from_numpy(val.inputs[n][:1]) for n in first.input_names)
        out = first(*(t.to(param.dtype) if t.is_floating_point() else t for t in x))
    out = out[0] if isinstance(out, tuple) else out
    val.targets = check_targets(splits.source, val.targets, cfg.loss, int(out.shape[-1]))
    results = {}
    for name, model in models.items():
        p = next(model.parameters())
        res = evaluate(model, val, list(model.input_names), cfg.loss, get_loss(cfg.loss), p.device, p.dtype)
        results[name] = {**res, "examples": float(len(val))}
    return results


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
    help="New spec with the plan's stages (default: SOURCE with .planned.yaml for a spec file; "
    "none for a run unless given).",
)
@click.option(
    "--max-exact", type=int, default=8, show_default=True, help="Devices the exact programme considers."
)
@click.option(
    "--lower-ranks",
    is_flag=True,
    help="When no plan fits at the trained ranks, a stage may run its factorized nodes at 1/2 (else "
    "1/4) of them, lowered only as far as a fitting plan needs (fewest factor bytes dropped); each "
    "lowered U·V is truncated to its best rank-k approximation (SVD). Needs the trained weights "
    "(SOURCE a run directory, or --run): the validation loss/accuracy at the trained and the lowered "
    "ranks is measured and shown, the lowered nodes are timed with onnxruntime, and both go into "
    "the placement file.",
)
@click.option(
    "--max-latency-ms",
    type=float,
    default=None,
    help="With --lower-ranks: one micro-batch end to end must take at most this long; ranks are lowered "
    "(1/2, else 1/4) when that is what meets it (the least-lowered plan if it does, else the fastest at "
    "those ranks), and the accuracy cost is measured as for memory.",
)
@click.option(
    "--run",
    "run",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Run directory or checkpoint whose weights SOURCE (a spec or its profile) describes "
    "(same nodes and ranks); implied when SOURCE is a run directory.",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write the run's model with the plan's stages and lowered ranks here (spec.yaml, "
    "checkpoints/best-00000000, lowering.json), atomically; `rlhf export OUT` gives the export to serve.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing -o directory.")
@click.option(
    "--hop",
    type=click.Choice(["file", "measure", "none"]),
    default="file",
    show_default=True,
    help="What running a stage as a Ray actor costs: file: the devices file's `hop:` (fixed + per byte "
    "in and out, per stage) if it has one, else the plain model (stage compute and link transfers); "
    "measure: time a no-op Ray actor here with tensors of each cut's size (starts a local Ray) and use "
    "that, also printed as a `hop:` line for devices.yaml; none: the plain model.",
)
@click.option(
    "--measured",
    "measured_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A report of `rlhf serve --report` for SOURCE (an export): its measured per-stage busy times "
    "replace the profiled costs of the units each stage ran (split in proportion to the profile), "
    "the plan is made again, and the stages whose cut or device changed are shown.",
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
    max_latency_ms: float | None,
    run: Path | None,
    out: Path | None,
    overwrite: bool,
    hop: str,
    measured_path: Path | None,
) -> None:
    """Place the stages of SOURCE (spec, run directory, export dir or profile JSON) on the devices of devices.yaml.

    Prints the plan, its predicted throughput and latency and a lower bound on the bottleneck;
    writes the placement file (for `rlhf serve`) and, for a spec, the spec with the plan's stages.
    A run directory (or --run) is planned as its trained model (ranks as trained); with
    --lower-ranks the accuracy cost of any lowered rank is measured on the run's validation split.
    """
    import yaml
    from rich.console import Console
    from rich.table import Table
    from rlhf_runtime.placement import PlacedStage, Placement, save_placement

    from toolkit.fsio import atomic_write_bytes, check_new_dir
    from toolkit.planner import ModelProfile, evaluate, load_devices, plan_least_lowering, plan_pipeline

    cluster = load_devices(devices_path)  # bad devices file: fail before measuring anything
    if measured_path is not None:  # and a bad report too
        from toolkit.planner.feedback import load_measured

        report_doc = load_measured(measured_path)
        if lower_ranks:
            raise InputError("--measured: expected a plan at the measured ranks, got --lower-ranks as well")
    if max_latency_ms is not None and not lower_ranks:
        raise InputError(
            "--max-latency-ms: expected --lower-ranks with it (the target decides how far to lower)"
        )
    if max_exact < 1:
        raise InputError(f"--max-exact: expected a positive count, got {max_exact}")
    source_is_run = _is_run(source)
    if source_is_run and run is not None:
        raise InputError(f"--run: SOURCE {source} is a run directory already; expected one or the other")
    run_dir = source if source_is_run else run
    if run_dir is None:
        for flag, on in (("--lower-ranks", lower_ranks), ("-o", out is not None)):
            if on:
                raise InputError(
                    f"{flag}: expected trained weights to measure the accuracy cost on (SOURCE a run "
                    f"directory, or --run RUN_DIR), got {source} alone"
                )
    if out is not None:
        check_new_dir(out, overwrite, "--overwrite")
        assert run_dir is not None
        if out.resolve() == run_dir.resolve() or run_dir.resolve().is_relative_to(out.resolve()):
            raise InputError(
                f"-o {out}: expected a new directory, got the run directory {run_dir} (or above it)"
            )
    model: Any = None
    tspec: Any = None
    meta: dict[str, Any] = {}
    if run_dir is not None:
        from toolkit.checkpoint import load_model

        model, tspec, meta = load_model(run_dir)
    if source_is_run:
        from toolkit.planner.measure import profile_spec

        prof = profile_spec(tspec, batch, threads=threads, seconds=seconds, clock=clock)
    else:
        prof = _measure(source, batch, threads, seconds, clock)
        if model is not None:
            assert run_dir is not None
            _check_same_model(prof, model, run_dir)
    calibration: Any = None
    if hop == "none":
        cluster = cluster.with_hop(None)
    elif hop == "measure":
        from toolkit.planner.hop import calibrate_hop, hop_sizes

        calibration = calibrate_hop(hop_sizes(prof.cut_bytes))
        cluster = cluster.with_hop(calibration.hop())
    before: Any = None
    if measured_path is not None:
        from toolkit.planner.feedback import apply_measured

        speed_of = {d.name: d.speed for d in cluster.devices}
        before = plan_pipeline(prof, cluster, objective, max_exact=max_exact)
        profiled = prof
        prof = apply_measured(prof, report_doc, cluster, str(measured_path))
        clock_name = "CPU" if prof.source.get("clock") == "cpu" else "wall"
        click.echo(
            f"measured ({clock_name} time of each stage's onnxruntime calls per micro-batch, {measured_path}) "
            "vs profiled, at the device's speed: "
            + "; ".join(
                f"[{st.start}, {st.stop}) on {st.device}: "
                f"{1e3 * sum(u.seconds for u in prof.units[st.start : st.stop]) / speed_of[st.device]:.3f} vs "
                f"{1e3 * sum(u.seconds for u in profiled.units[st.start : st.stop]) / speed_of[st.device]:.3f} ms"
                for st in report_doc.stages
            )
        )
    if lower_ranks:  # full ranks if they fit, else 1/2 where needed, else 1/4
        result = plan_least_lowering(
            prof,
            cluster,
            objective,
            rank_scales=(1.0, 0.5, 0.25),
            max_exact=max_exact,
            max_latency_s=None if max_latency_ms is None else max_latency_ms / 1e3,
        )
    else:
        result = plan_pipeline(prof, cluster, objective, max_exact=max_exact)
    lowered = _lowered_ranks(prof, result.stages)
    stage_nodes = [[nid for u in prof.units[st.start : st.stop] for nid in u.nodes] for st in result.stages]
    shown = list(result.stages)
    bottleneck, latency = result.bottleneck_s, result.latency_s
    low_model: Any = None
    records: list[Any] = []
    metrics: dict[str, dict[str, float]] = {}
    measured = False
    if model is not None and (lowered or out is not None or (source_is_run and spec_out is not None)):
        from toolkit.planner.lowering import lower_model

        low_model, records = lower_model(model, lowered, stage_nodes)
    if lowered and model is not None:
        from toolkit.planner.measure import profile_spec

        assert run_dir is not None
        metrics = _val_metrics({"full_rank": model, "lowered": low_model}, tspec, meta, run_dir)
        low_prof = profile_spec(low_model.to_spec(), batch, threads=threads, seconds=seconds, clock=clock)
        by_node = {u.nodes[0]: u for u in low_prof.units if u.nodes}
        units = tuple(by_node[u.nodes[0]] if u.nodes and u.nodes[0] in lowered else u for u in prof.units)
        timed = ModelProfile(prof.name, prof.batch, units, prof.cut_bytes, prof.cut_tensors, prof.source)
        bottleneck, latency, shown = evaluate(
            timed, cluster, result.partition(), [st.device for st in result.stages]
        )
        measured = True

    table = Table(title=f"{prof.name}: {objective} plan at batch {prof.batch} on {devices_path}")
    cols = ["stage", "device", "units", "compute ms", *(["hop ms"] if cluster.hop else []), "memory MiB"]
    for col in (*cols, "send ms", "ranks"):
        table.add_column(col, justify="left" if col in ("device", "units", "ranks") else "right")
    for i, (st, planned_st) in enumerate(zip(shown, result.stages)):
        names = [u.nodes[0] if len(u.nodes) == 1 else u.name for u in prof.units[st.start : st.stop]]
        label = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)})"
        mine = [r for r in records if r.node in stage_nodes[i]]
        if planned_st.rank_scale == 1:
            ranks = "as trained" if model is not None else "as given"
        else:
            ranks = ", ".join(f"{r.node} {r.rank_before}->{r.rank_after}" for r in mine) or (
                f"x{planned_st.rank_scale:g} (time estimated)"
            )
        table.add_row(
            str(i),
            st.device,
            label,
            f"{st.compute_s * 1e3:.3f}",
            *([f"{st.hop_s * 1e3:.3f}"] if cluster.hop else []),
            f"{st.memory_bytes / 2**20:.2f}",
            f"{st.send_s * 1e3:.3f}",
            ranks,
        )
    if metrics:
        full, low = metrics["full_rank"], metrics["lowered"]
        key = "accuracy" if "accuracy" in full else "loss"
        table.caption = (
            f"validation {key} ({int(full['examples'])} examples): {full[key]:.4f} at the trained ranks, "
            f"{low[key]:.4f} lowered ({low[key] - full[key]:+.4f})"
            + (f"; loss {full['loss']:.4f} -> {low['loss']:.4f}" if key == "accuracy" else "")
            + "; lowered nodes timed with onnxruntime"
        )
    console = Console()
    console.print(table)
    console.print(
        f"predicted: bottleneck {bottleneck * 1e3:.3f} ms, throughput {prof.batch / bottleneck:.1f} samples/s, "
        f"latency {latency * 1e3:.3f} ms; lower bound on the bottleneck {result.lower_bound_s * 1e3:.3f} ms; "
        + (
            "exact over every device"
            if result.exact
            else f"{result.method} over {len(cluster.devices)} devices (the programme is exact over "
            f"{len(result.candidates)} candidates)"
        )
        + f" ({result.seconds * 1e3:.0f} ms)"
    )
    console.print(f"cost model: {cluster.cost_model}")
    if calibration is not None:
        sizes = ", ".join(
            f"{s / 1024:.0f} KiB {c * 1e3:.3f} ms" for s, c in zip(calibration.sizes, calibration.actor_cpu_s)
        )
        click.echo(
            f"hop measured (actor CPU per call, in and out each of): {sizes}; for devices.yaml: "
            f"hop: {{fixed: {calibration.fixed:.4g}, per_byte: {calibration.per_byte:.4g}}}"
        )
    if before is not None:
        _show_changes(console, before, result)
    if max_latency_ms is not None:
        click.echo(
            f"latency target {max_latency_ms:g} ms: {'met' if latency * 1e3 <= max_latency_ms else 'NOT met'} "
            f"({latency * 1e3:.3f} ms{', lowered nodes timed with onnxruntime' if measured else ''}; "
            f"{result.latency_s * 1e3:.3f} ms estimated when planned)"
        )
    if lower_ranks and not lowered:
        click.echo(
            "no rank lowered: every stage fits a device at its trained ranks"
            + ("" if max_latency_ms is None else " and the plan meets the latency target")
        )
    predicted: dict[str, float] = {
        "bottleneck_s": bottleneck,
        "throughput": prof.batch / bottleneck,
        "latency_s": latency,
        "lower_bound_s": result.lower_bound_s,
    }
    if max_latency_ms is not None:
        predicted["max_latency_s"] = max_latency_ms / 1e3
    if cluster.hop is not None:
        predicted["hop_fixed_s"] = cluster.hop.fixed
        predicted["hop_per_byte_s"] = cluster.hop.per_byte
    for which, suffix in (("lowered", ""), ("full_rank", "_full_rank")):
        for k, v in metrics.get(which, {}).items():
            predicted[f"val_{k}{suffix}"] = v
    cuts = prof.cut_tensors

    def handed_on(start: int, stop: int) -> tuple[str, ...]:
        """Tensors a stage makes that are still needed after it (alive at its end, not at its start)."""
        if not cuts:
            return ()
        return tuple(t for t in cuts[stop] if t not in cuts[start])

    new_spec_doc: dict[str, Any] | None = None
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
        if low_model is not None:
            new_spec_doc = low_model.to_spec().resolved()
        elif prof.source.get("kind") == "spec" and source.suffix.lower() != ".json" and not source_is_run:
            from toolkit.spec import load_spec

            new_spec_doc = load_spec(source).resolved()
            new_spec_doc["stages"] = stage_nodes
        if new_spec_doc is not None and lowered:
            for node in new_spec_doc["nodes"]:
                if node["id"] in lowered:
                    node["factorize"] = {"rank": lowered[node["id"]]}
    _, _, full_rank = evaluate(prof, cluster, result.partition(), [st.device for st in result.stages])
    report: dict[str, Any] = {
        "source": str(source),
        "run": None if run_dir is None else str(run_dir),
        "devices": str(devices_path),
        "objective": objective,
        "batch": prof.batch,
        "stages": [
            {
                "device": st.device,
                "nodes": stage_nodes[i],
                "rank_scale": result.stages[i].rank_scale,
                "compute_s": st.compute_s,
                "compute_s_estimated": result.stages[i].compute_s,
                "compute_s_full_rank": full_rank[i].compute_s,
                "memory_bytes": st.memory_bytes,
            }
            for i, st in enumerate(shown)
        ],
        "estimated": {"bottleneck_s": result.bottleneck_s, "latency_s": result.latency_s},
        "clock": clock,
        "lowered": [r.to_dict() for r in records],
        "lowered_time": "measured" if measured else None,
        "validation": metrics,
        "predicted": predicted,
    }
    if lowered:
        click.echo(
            "lowered ranks to fit: "
            + ", ".join(
                f"{r.node} {r.rank_before}->{r.rank_after} (drops {r.relative_error:.1%} of ‖U·V‖)"
                for r in records
            )
        )
    if out is not None:
        _write_lowered(out, overwrite, low_model, meta, run_dir, report)
        click.echo(f"wrote {out} (export it with `rlhf export {out}`, then serve it with the placement)")
    spec_file = not source_is_run and source.suffix.lower() != ".json"
    if new_spec_doc is not None and (spec_out is not None or spec_file):
        spec_path = spec_out or source.with_suffix(".planned.yaml")
        atomic_write_bytes(spec_path, yaml.safe_dump(new_spec_doc, sort_keys=False).encode("utf-8"))
        click.echo(
            f"wrote {spec_path} (the spec with the plan's {len(result.stages)} stages; export it, then serve)"
        )
    save_placement(placement, placement_path)
    click.echo(f"wrote {placement_path}")


def _show_changes(console: Any, before: Any, after: Any) -> None:
    """Print the plan from the profile beside the plan from the measured times, stage by stage."""
    old = [(s.start, s.stop, s.device) for s in before.stages]
    new = [(s.start, s.stop, s.device) for s in after.stages]
    if old == new:
        console.print(
            f"re-planned with the measured times: the same {len(new)} stages "
            f"(bottleneck {before.bottleneck_s * 1e3:.3f} ms from the profile, {after.bottleneck_s * 1e3:.3f} ms measured)"
        )
        return
    changed = [i for i, st in enumerate(new) if i >= len(old) or old[i] != st]
    console.print(
        "re-planned with the measured times: stages "
        + ", ".join(f"{i} [{new[i][0]}, {new[i][1]}) on {new[i][2]}" for i in changed)
        + " changed; from the profile: "
        + ", ".join(f"[{a}, {b}) on {d}" for a, b, d in old)
        + f" (bottleneck {before.bottleneck_s * 1e3:.3f} ms predicted from the profile, "
        f"{after.bottleneck_s * 1e3:.3f} ms with the measured times)"
    )


def _write_lowered(
    out: Path, overwrite: bool, model: Any, meta: dict[str, Any], run_dir: Any, report: dict[str, Any]
) -> None:
    """OUT/spec.yaml, OUT/checkpoints/best-00000000 and OUT/lowering.json, swapped in as a whole."""
    import json
    import shutil

    import yaml

    from toolkit.checkpoint import CKPT_DIR, save_checkpoint
    from toolkit.fsio import staged_dir

    spec_doc = model.to_spec().resolved()
    keep = {k: v for k, v in meta.items() if k in ("seed", "loss", "data", "text")}
    new_meta = {**keep, "dense": False, "lowered_from": str(run_dir)}
    with staged_dir(out, overwrite) as tmp:
        save_checkpoint(tmp / CKPT_DIR, "best-00000000", model, spec_doc, new_meta, {})
        (tmp / "spec.yaml").write_text(yaml.safe_dump(spec_doc, sort_keys=False), encoding="utf-8")
        (tmp / "lowering.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        tokenizer = Path(run_dir) / "tokenizer"
        if tokenizer.is_dir():
            shutil.copytree(tokenizer, tmp / "tokenizer")
