"""Feed a pipeline's measured per-stage times back into the planner (``rlhf plan EXPORT --measured``).

``rlhf serve --report report.json`` (``Pipeline.report()``) writes, per pipeline stage, the
export-stage range it ran, its device, and the seconds its onnxruntime calls took per request
(wall ``busy_s`` and CPU ``cpu_s`` of the one thread). :func:`apply_measured` turns them into a
profile: a stage's measured seconds times its device's speed (the work at the profiling machine's
speed, as the profile counts it) replace the profiled seconds of its units, split among them in
proportion to the profile. The clock matches the profile's (``cpu_s`` for ``--clock cpu``, else
``busy_s``). What Ray adds outside those calls is the planner's ``hop`` (``--hop``), not part of
these figures. The file is JSON (never executed) and is checked field by field.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from toolkit.errors import InputError
from toolkit.planner.devices import Cluster
from toolkit.planner.profile import ModelProfile

REPORT_FORMAT = "rlhf-serve-report"


@dataclass(frozen=True)
class MeasuredStage:
    """One pipeline stage of a serve report: device, export-stage range, seconds per request."""

    device: str
    start: int
    stop: int
    busy_s: float
    cpu_s: float


@dataclass(frozen=True)
class MeasuredReport:
    export_sha256: str
    export_name: str
    micro_batch: int
    stages: tuple[MeasuredStage, ...]


def _fail(path: str, where: str, expected: str, got: Any) -> InputError:
    return InputError(f"{path}: {where}: expected {expected}, got {got!r}"[:400])


def _seconds(path: str, where: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise _fail(path, where, "a non-negative number of seconds", value)
    return float(value)


def parse_measured(doc: Any, path: str = "<memory>") -> MeasuredReport:
    """Check a serve report document field by field.

    Raises:
        InputError: one line naming the file and the field.
    """
    if not isinstance(doc, dict) or doc.get("format") != REPORT_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise _fail(path, "format", f"{REPORT_FORMAT!r} (written by `rlhf serve --report`)", got)
    if doc.get("version") != 1:
        raise _fail(path, "version", "1", doc.get("version"))
    export = doc.get("export")
    if not isinstance(export, dict) or not isinstance(export.get("manifest_sha256"), str):
        raise _fail(path, "export", "{name, manifest_sha256}", export)
    batch = doc.get("micro_batch")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise _fail(path, "micro_batch", "a positive integer (one micro-batch size for every request)", batch)
    raw = doc.get("stages")
    if not isinstance(raw, list) or not raw:
        raise _fail(path, "stages", "a non-empty list", raw)
    stages = []
    end = 0
    for i, st in enumerate(raw):
        if not isinstance(st, dict) or not isinstance(st.get("device"), str):
            raise _fail(path, f"stages[{i}]", "{device, units, busy_s, cpu_s}", st)
        units = st.get("units")
        if (
            not isinstance(units, list)
            or len(units) != 2
            or not all(isinstance(u, int) and not isinstance(u, bool) for u in units)
            or units[0] != end
            or units[1] <= units[0]
        ):
            raise _fail(path, f"stages[{i}].units", f"[{end}, stop] with stop > {end}", units)
        end = units[1]
        busy = _seconds(path, f"stages[{i}].busy_s", st.get("busy_s"))
        cpu = _seconds(path, f"stages[{i}].cpu_s", st.get("cpu_s"))
        stages.append(MeasuredStage(st["device"], units[0], units[1], busy, cpu))
    return MeasuredReport(export["manifest_sha256"], str(export.get("name", "")), batch, tuple(stages))


def load_measured(path: str | os.PathLike[str]) -> MeasuredReport:
    """Read a serve report (JSON).

    Raises:
        FileNotFoundError: no such file.
        InputError: not JSON, or a field is missing or malformed.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--measured: file not found: {p}")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: not JSON ({exc})".splitlines()[0]) from None
    return parse_measured(doc, str(p))


def apply_measured(
    profile: ModelProfile, report: MeasuredReport, cluster: Cluster, path: str = "--measured"
) -> ModelProfile:
    """The profile with each measured stage's units costed from the report.

    Raises:
        InputError: the profile is not of the export the report ran (sha256 of its manifest), is
            at another batch size, the report's stages do not cover its units, or name a device the
            cluster does not have.
    """
    if profile.source.get("kind") != "export":
        raise InputError(
            f"{path}: expected SOURCE to be the export the report ran (its stages are the units), "
            f"got a profile of kind {profile.source.get('kind')!r}"
        )
    sha = profile.source.get("manifest_sha256")
    if sha != report.export_sha256:
        raise InputError(
            f"{path}: measured on export {report.export_name!r} with manifest sha256 {report.export_sha256[:12]}..., "
            f"expected SOURCE's {str(sha)[:12]}...: serve this export with --report again"
        )
    if report.micro_batch != profile.batch:
        raise InputError(
            f"{path}: measured at micro-batch {report.micro_batch}, expected --batch {report.micro_batch} "
            f"(planning at {profile.batch})"
        )
    n = len(profile.units)
    if report.stages[-1].stop != n:
        raise InputError(f"{path}: stages cover units 0..{report.stages[-1].stop}, expected 0..{n}")
    speed = {d.name: d.speed for d in cluster.devices}
    units = list(profile.units)
    cpu = profile.source.get("clock") == "cpu"
    for i, st in enumerate(report.stages):
        if st.device not in speed:
            raise InputError(
                f"{path}: stages[{i}].device: {st.device!r} is not in the devices file ({sorted(speed)})"
            )
        work = (st.cpu_s if cpu else st.busy_s) * speed[st.device]  # seconds at the profiling machine's speed
        mine = units[st.start : st.stop]
        total = sum(u.seconds for u in mine)
        for j, u in enumerate(mine):
            share = u.seconds / total if total > 0 else 1 / len(mine)
            units[st.start + j] = replace(u, seconds=work * share)
    source = {**profile.source, "measured": path, "clock_measured": "cpu" if cpu else "wall"}
    return ModelProfile(
        profile.name, profile.batch, tuple(units), profile.cut_bytes, profile.cut_tensors, source
    )
