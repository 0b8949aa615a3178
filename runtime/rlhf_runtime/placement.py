"""placement.yaml: which export stages each pipeline stage runs, and on which device.

Written by ``rlhf plan``, read by ``rlhf serve`` (yaml.safe_load, checked field by field)::

    format: rlhf-placement
    version: 1
    export: {name: digits-mlp, manifest_sha256: 3f2a...}   # null when planned from a spec
    objective: throughput
    batch: 8
    predicted: {bottleneck_s: ..., throughput: ..., latency_s: ..., lower_bound_s: ...}
    stages:
      - {device: pi-a, units: [0, 3], outputs: [act2]}    # export stages 0, 1, 2
      - {device: pi-b, units: [3, 5], outputs: [head]}

A placement planned from an export names that export by the sha256 of its manifest.json (which
lists every file's sha256); serving another export is refused. A placement planned from a spec
comes with a new spec whose ``stages:`` are the plan's, one export stage per pipeline stage; it
is checked against the export by the tensors each stage hands on.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_runtime.errors import InputError
from rlhf_runtime.fsio import atomic_write_bytes
from rlhf_runtime.manifest import MANIFEST_NAME, Manifest

FORMAT = "rlhf-placement"
VERSION = 1


@dataclass(frozen=True)
class PlacedStage:
    """Export stages ``units[0] .. units[1] - 1`` on ``device``; ``outputs`` it hands on (for checks)."""

    device: str
    units: tuple[int, int]
    outputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Placement:
    stages: tuple[PlacedStage, ...]
    export_sha256: str | None = None
    export_name: str = ""
    objective: str = "throughput"
    batch: int = 1
    predicted: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "export": None
            if self.export_sha256 is None
            else {"name": self.export_name, "manifest_sha256": self.export_sha256},
            "objective": self.objective,
            "batch": self.batch,
            "predicted": self.predicted,
            "stages": [
                {"device": s.device, "units": list(s.units), "outputs": list(s.outputs)} for s in self.stages
            ],
        }


def save_placement(placement: Placement, path: str | os.PathLike[str]) -> None:
    """Write the placement as YAML, atomically."""
    yaml = _yaml()
    text = yaml.safe_dump(placement.to_dict(), sort_keys=False)
    atomic_write_bytes(path, text.encode("utf-8"))


def _yaml() -> Any:
    """pyyaml, imported when a placement is read or written (the extra ``rlhf-runtime[cluster]``)."""
    try:
        import yaml
    except ImportError:
        raise InputError(
            "placement files need pyyaml: pip install 'rlhf-runtime[cluster]' (or pip install pyyaml)"
        ) from None
    return yaml


def _fail(path: Any, where: str, expected: str, got: Any) -> InputError:
    return InputError(f"{path}: {where}: expected {expected}, got {got!r}")


def load_placement(path: str | os.PathLike[str]) -> Placement:
    """Read and check a placement file's structure.

    Raises:
        FileNotFoundError: no such file.
        InputError: not YAML, or a field is missing or malformed (the message names it).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"placement file not found: {p}")
    yaml = _yaml()
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(f"{p}: not valid YAML ({exc})".splitlines()[0]) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _fail(p, "format", repr(FORMAT), doc.get("format") if isinstance(doc, dict) else doc)
    if doc.get("version") != VERSION:
        raise _fail(p, "version", str(VERSION), doc.get("version"))
    known = {"format", "version", "export", "objective", "batch", "predicted", "stages"}
    extra = sorted(set(doc) - known)
    if extra:
        raise _fail(p, "top level", f"only the fields {sorted(known)}", extra)
    export = doc.get("export")
    sha = None
    name = ""
    if export is not None:
        if not isinstance(export, dict) or not isinstance(export.get("manifest_sha256"), str):
            raise _fail(p, "export", "null or {name, manifest_sha256}", export)
        sha, name = export["manifest_sha256"], str(export.get("name", ""))
    raw = doc.get("stages")
    if not isinstance(raw, list) or not raw:
        raise _fail(p, "stages", "a non-empty list", raw)
    stages = []
    for i, st in enumerate(raw):
        if not isinstance(st, dict) or not isinstance(st.get("device"), str):
            raise _fail(p, f"stages[{i}]", "{device, units: [start, stop]}", st)
        units = st.get("units")
        if (
            not isinstance(units, list)
            or len(units) != 2
            or not all(isinstance(u, int) for u in units)
            or not 0 <= units[0] < units[1]
        ):
            raise _fail(p, f"stages[{i}].units", "[start, stop] with 0 <= start < stop", units)
        stages.append(PlacedStage(st["device"], (units[0], units[1]), tuple(st.get("outputs") or ())))
    for i in range(1, len(stages)):
        if stages[i].units[0] != stages[i - 1].units[1]:
            raise _fail(
                p, f"stages[{i}].units", f"to start at {stages[i - 1].units[1]}", list(stages[i].units)
            )
    if stages[0].units[0] != 0:
        raise _fail(p, "stages[0].units", "to start at 0", list(stages[0].units))
    devices = [s.device for s in stages]
    if len(set(devices)) != len(devices):
        raise _fail(p, "stages[*].device", "one stage per device", devices)
    batch = doc.get("batch", 1)
    return Placement(
        tuple(stages), sha, name, str(doc.get("objective", "")), int(batch), doc.get("predicted")
    )


def check_placement(placement: Placement, export_dir: str | os.PathLike[str], manifest: Manifest) -> None:
    """Refuse a placement made for another export, before anything is started.

    Raises:
        InputError: manifest sha256 differs, the stage ranges do not cover the export's stages, or
            (spec-planned placement) a stage hands on other tensors than the export's stage does.
    """
    n = len(manifest.stages)
    if placement.export_sha256 is not None:
        got = hashlib.sha256((Path(export_dir) / MANIFEST_NAME).read_bytes()).hexdigest()
        if got != placement.export_sha256:
            raise InputError(
                f"placement is for export {placement.export_name!r} with manifest sha256 "
                f"{placement.export_sha256[:12]}..., got {export_dir} with {got[:12]}...: plan this export again"
            )
    if placement.stages[-1].units[1] != n:
        raise InputError(
            f"placement covers export stages 0..{placement.stages[-1].units[1]}, "
            f"expected 0..{n} ({export_dir} has {n} stages)"
        )
    for i, st in enumerate(placement.stages):
        if not st.outputs:
            continue
        got_out = {t.name for t in manifest.stages[st.units[1] - 1].outputs}
        if set(st.outputs) != got_out:
            raise InputError(
                f"placement stages[{i}] hands on {sorted(st.outputs)}, expected the export's "
                f"stage {st.units[1] - 1} outputs {sorted(got_out)}: the placement is for another export"
            )
