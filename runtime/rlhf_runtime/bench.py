"""Latency, throughput and memory measurement (numpy + onnxruntime + stdlib; torch stays optional).

Peak memory is read from /proc (Linux): ``VmHWM`` is the process's peak resident set, and writing
``5`` to ``/proc/self/clear_refs`` resets it to the current RSS, so one process can measure the
peak of several phases one after another. Elsewhere ``resource.getrusage`` gives the lifetime peak.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Latency:
    """Per-call latency percentiles (milliseconds) and throughput (samples per second)."""

    batch: int
    calls: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def measure(
    fn: Callable[[], object], batch: int, *, warmup: int = 5, min_calls: int = 20, min_seconds: float = 0.5
) -> Latency:
    """Call ``fn`` repeatedly (at least ``min_calls`` times and ``min_seconds``) and summarize.

    Throughput is ``batch / median latency``.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 100_000:
            break
    times.sort()

    def pct(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))] * 1e3

    p50 = pct(0.5)
    return Latency(
        batch, len(times), p50, pct(0.9), pct(0.99), batch / (p50 / 1e3) if p50 > 0 else float("inf")
    )


def _status_kb(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def current_rss() -> int:
    """Resident set size now, in bytes (0 where /proc is missing)."""
    kb = _status_kb("VmRSS")
    return 0 if kb is None else kb * 1024


def peak_rss() -> int:
    """Peak resident set size in bytes (since start or the last ``reset_peak_rss``)."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def random_inputs(infos: tuple, batch: int, seed: int = 0, length: int = 16) -> dict[str, np.ndarray]:
    """Inputs of the manifest's shapes and dtypes: standard normal floats, ones for integers (a
    valid index and an all-attending mask); ``length`` for dynamic axes after the batch axis."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in infos:
        shape = tuple((batch if i == 0 else length) if d is None else d for i, d in enumerate(t.shape))
        if t.dtype.startswith("float"):
            out[t.name] = rng.standard_normal(shape).astype(t.dtype)
        else:
            out[t.name] = np.ones(shape, dtype=t.dtype)
    return out


def bench_export(
    export_dir: str | Path,
    batches: tuple[int, ...] = (1, 256),
    *,
    threads: int = 1,
    providers: str = "cpu",
    inputs: dict[str, np.ndarray] | None = None,
    extra: dict[str, Callable[[dict[str, np.ndarray]], object]] | None = None,
    min_seconds: float = 0.5,
) -> list[dict[str, object]]:
    """Latency and peak memory of an export: staged and fused, every variant, at each batch size.

    Args:
        export_dir: the export directory.
        batches: batch sizes to time.
        threads: onnxruntime intra-op threads (1 is the usual choice for batch-1 latency on a device).
        providers: as for Executor.
        inputs: a batch to take rows from (tiled to the batch size), else random inputs.
        extra: more configurations to time, name -> function of the inputs (e.g. torch eager).
        min_seconds: time spent per configuration and batch size.

    Returns:
        One row per configuration and batch size: config, batch, latency figures, peak_rss_bytes
        (peak resident memory above the level before the configuration was loaded).
    """
    from rlhf_runtime.executor import Executor
    from rlhf_runtime.manifest import read_manifest
    from rlhf_runtime.session import SessionConfig

    manifest = read_manifest(export_dir)
    infos = manifest.inputs
    configs: list[tuple[str, Callable[[dict[str, np.ndarray]], object] | tuple[str, bool]]] = []
    for variant in manifest.variants():
        configs.append((f"staged {variant}", (variant, False)))
        if variant in manifest.fused:
            configs.append((f"fused {variant}", (variant, True)))
    for name, fn in (extra or {}).items():
        configs.append((name, fn))
    rows: list[dict[str, object]] = []
    for name, what in configs:
        base = current_rss()
        reset_peak_rss()
        run: Callable[[dict[str, np.ndarray]], object]
        if callable(what):
            run = what
        else:
            ex = Executor(
                export_dir,
                providers=providers,
                session_options=SessionConfig(intra_op_threads=threads),
                variant=what[0],
                fused=what[1],
            )
            run = ex.run
        for b in batches:
            if inputs is not None:
                reps = -(-b // next(iter(inputs.values())).shape[0])
                feed = {k: np.ascontiguousarray(np.concatenate([v] * reps)[:b]) for k, v in inputs.items()}
            else:
                feed = random_inputs(infos, b)
            lat = measure(partial(run, feed), b, min_seconds=min_seconds)
            rows.append({"config": name, **lat.to_dict(), "peak_rss_bytes": max(0, peak_rss() - base)})
        del run
        if not callable(what):
            del ex
    return rows
