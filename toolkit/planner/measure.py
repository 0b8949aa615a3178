"""Measure a ModelProfile with onnxruntime on this machine (the planner's input).

An export directory is profiled with its stages as the units; a spec is first built (random
weights: timing does not depend on values) and exported with one stage per node into a temporary
directory, so its units are the nodes. Per unit: median seconds per call at the batch size asked
for (stages timed round-robin, so a load spike on a shared machine hits all of them alike), weight
bytes summed over the ONNX initializers, and the bytes of the tensors crossing each cut (graph
inputs still needed later and outputs already made travel along, as in a pipeline).
"""

from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rlhf_runtime.bench import random_inputs
from rlhf_runtime.manifest import MANIFEST_NAME, Manifest, TensorInfo, read_manifest, verified_path
from rlhf_runtime.session import SessionConfig, create_session

from toolkit.errors import InputError
from toolkit.planner.profile import ModelProfile, Unit

SEQ_LENGTH = 16  # length of a dynamic axis after the batch axis while timing


def manifest_sha256(export_dir: str | os.PathLike[str]) -> str:
    """sha256 of an export's manifest.json: it lists every file's own sha256, so it names the export."""
    return hashlib.sha256((Path(export_dir) / MANIFEST_NAME).read_bytes()).hexdigest()


def _nbytes(t: TensorInfo, batch: int) -> int:
    shape = [(batch if i == 0 else SEQ_LENGTH) if d is None else d for i, d in enumerate(t.shape)]
    return int(np.prod(shape)) * np.dtype(t.dtype).itemsize


def crossing(manifest: Manifest) -> list[list[TensorInfo]]:
    """Tensors alive at each of the n + 1 cut positions of the stage chain.

    Position 0 holds the graph inputs, position n the graph outputs; position j in between holds
    every tensor made before it (or a graph input) that a later stage or the outputs still need.
    """
    stages = manifest.stages
    n = len(stages)
    out_names = [t.name for t in manifest.outputs]
    known: dict[str, TensorInfo] = {t.name: t for t in manifest.inputs}
    cuts = [list(manifest.inputs)]
    for j in range(1, n):
        for t in stages[j - 1].outputs:
            known[t.name] = t
        needed = {t.name for st in stages[j:] for t in st.inputs} | set(out_names)
        cuts.append([t for name, t in known.items() if name in needed])
    for t in stages[-1].outputs:
        known[t.name] = t
    cuts.append([known[n_] for n_ in out_names])
    return cuts


def initializer_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of an ONNX file's initializers (the weights), read without executing anything."""
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        total += int(np.prod(init.dims, dtype=np.int64)) * dtype.itemsize
    return total


def profile_export(
    export_dir: str | os.PathLike[str],
    batch: int = 1,
    *,
    threads: int = 1,
    seconds: float = 1.0,
    warmup: int = 3,
    nodes: list[list[str]] | None = None,
    clock: str = "wall",
) -> ModelProfile:
    """Profile an export's stages as the planner's units.

    Args:
        export_dir: an export directory (``rlhf export``).
        batch: batch size to time at (micro-batch of the pipeline).
        threads: onnxruntime intra-op threads per session (1: one core per device).
        seconds: total timing budget, shared by the stages round-robin.
        warmup: untimed calls per stage first.
        nodes: spec node ids per stage, recorded in the profile when known.
        clock: "wall" (elapsed time) or "cpu" (CPU time of the calling thread: with one intra-op
            thread onnxruntime computes there, so the figure does not grow when other processes
            share the core; what a dedicated device would take).

    Returns:
        The :class:`ModelProfile`; ``source`` holds the export path and its manifest sha256.

    Raises:
        FileNotFoundError, ValueError: not an export directory, or files that fail their sha256.
        InputError: batch < 1, an unknown clock, or clock "cpu" with more than one thread.
    """
    if batch < 1:
        raise InputError(f"--batch: expected a positive batch size, got {batch}")
    if clock not in ("wall", "cpu"):
        raise InputError(f"--clock: expected 'wall' or 'cpu', got {clock!r}")
    if clock == "cpu" and threads != 1:
        raise InputError(f"--clock cpu: expected --threads 1 (the CPU time of one thread), got {threads}")
    now = time.perf_counter if clock == "wall" else time.thread_time
    root = Path(export_dir)
    manifest = read_manifest(root)
    config = SessionConfig(intra_op_threads=threads)
    cuts = crossing(manifest)
    sessions, feeds, weights = [], [], []
    env = random_inputs(manifest.inputs, batch, length=SEQ_LENGTH)
    for st in manifest.stages:
        path, _ = verified_path(root, st.files["fp32"])
        sess = create_session(str(path), ["CPUExecutionProvider"], config, strict=True)
        feed = {t.name: env[t.name] for t in st.inputs}
        outs = sess.run([t.name for t in st.outputs], feed)
        env.update(zip([t.name for t in st.outputs], outs))
        for _ in range(max(0, warmup - 1)):
            sess.run(None, feed)
        sessions.append(sess)
        feeds.append(feed)
        weights.append(initializer_bytes(path))
    times: list[list[float]] = [[] for _ in sessions]
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times[0]) < 5:
        for i, (sess, feed) in enumerate(zip(sessions, feeds)):
            t0 = now()
            sess.run(None, feed)
            times[i].append(now() - t0)
    units = tuple(
        Unit(f"stage_{i:02d}", statistics.median(ts), w, tuple(nodes[i]) if nodes else ())
        for i, (ts, w) in enumerate(zip(times, weights))
    )
    return ModelProfile(
        name=manifest.name,
        batch=batch,
        units=units,
        cut_bytes=tuple(sum(_nbytes(t, batch) for t in cut) for cut in cuts),
        cut_tensors=tuple(tuple(t.name for t in cut) for cut in cuts),
        source={
            "kind": "export",
            "path": str(root.resolve()),
            "manifest_sha256": manifest_sha256(root),
            "threads": threads,
            "clock": clock,
            "calls_per_unit": len(times[0]),
        },
    )


def _spec_sample(spec: Any, n: int = 4) -> dict[str, np.ndarray]:
    out = {}
    rng = np.random.default_rng(0)
    for name, isp in spec.inputs.items():
        shape = (n, *isp.shape)
        out[name] = (
            np.zeros(shape, dtype=np.int64)
            if isp.dtype == "int64"
            else rng.standard_normal(shape).astype(np.float32)
        )
    return out


def per_node_spec(spec: Any) -> Any:
    """The same spec with one stage per node (every cut the chain allows)."""
    from toolkit.spec import parse_spec

    doc = spec.resolved()
    doc["stages"] = [[nid] for nid in spec.analysis.order]
    return parse_spec(doc, source=f"{spec.name} (one stage per node)")


def profile_spec(
    spec: Any,
    batch: int = 1,
    *,
    threads: int = 1,
    seconds: float = 1.0,
    work_dir: str | None = None,
    clock: str = "wall",
) -> ModelProfile:
    """Profile a spec node by node: build it (random weights), export one stage per node, time them.

    Args:
        spec: a GraphSpec.
        batch, threads, seconds, clock: as for :func:`profile_export`.
        work_dir: directory for the temporary per-node export (default: the system's temp dir).

    Raises:
        InputError: batch < 1.
    """
    from toolkit.builder import build_model
    from toolkit.export import export_model

    fine = per_node_spec(spec)
    model = build_model(fine, seed=0).eval()
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        out = Path(tmp) / "export"
        export_model(model, out, sample=_spec_sample(fine), overwrite=True)
        prof = profile_export(out, batch, threads=threads, seconds=seconds, nodes=fine.stage_partition())
    ranks = model.ranks()  # node id -> rank of each factorized layer
    plans = fine.analysis.plans
    units = []
    for u in prof.units:
        nid = u.nodes[0]
        if nid in ranks:  # float32 factors U (out, r) and V (r, in): 4 r (out + in) bytes
            out_dim, in_dim = plans[nid].map_shape
            u = Unit(
                u.name, u.seconds, u.weight_bytes, u.nodes, ranks[nid], 4 * ranks[nid] * (out_dim + in_dim)
            )
        units.append(u)
    source = {"kind": "spec", "name": spec.name, "threads": threads, "clock": clock}
    return ModelProfile(prof.name, prof.batch, tuple(units), prof.cut_bytes, prof.cut_tensors, source)
