"""Measure what one Ray stage hop costs on this machine (the planner's ``hop``), not fitted to a pipeline.

A chain of no-op actors (:class:`EchoWorker`, the same calls as the pipeline's ``StageWorker``,
two by default: one takes its input from the driver, the next from an actor, as a pipeline's
stages do) is fed the way ``rlhf_runtime.pipeline.Pipeline`` feeds its stages: the driver puts a
request's tensors in Ray's object store, chains ``run_carried.remote(id, ref)`` through the actors
with several requests in flight, waits for one answer and fetches it. Each actor returns its
input, so each call reads ``s`` bytes and writes ``s`` bytes, as a stage between two cuts of
``s`` bytes does. Per size, the CPU seconds of each actor's process per call (Ray's dispatch,
deserialising the arguments, serialising the results: everything a stage pays beyond its
onnxruntime compute), averaged over the chain, are measured; a least-squares line through them
gives ``fixed + per_byte * (bytes in + bytes out)``.

The wall seconds per call and the CPU seconds the driver spends per call are recorded beside
(on a machine whose cores the driver and Ray's raylet share with the stages they also count).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from rlhf_runtime.stage_worker import StageWorker

from toolkit.errors import InputError
from toolkit.planner.devices import Hop


class EchoWorker(StageWorker):
    """A pipeline stage that computes nothing: returns its tensors and a timing record.

    A :class:`StageWorker` without stage files: ``run_carried`` and ``cpu`` are the pipeline's own,
    so what is timed is the very call path a stage pays beyond its onnxruntime compute.
    """

    def __init__(self) -> None:  # no stage files to load
        pass

    def run(
        self, request_id: int, env: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return dict(env), {"id": request_id, "busy_s": 0.0, "cpu_s": 0.0}


@dataclass(frozen=True)
class HopCalibration:
    """The fitted hop and the measurements behind it (per size: bytes, calls, seconds per call)."""

    fixed: float
    per_byte: float
    sizes: tuple[int, ...]
    actor_cpu_s: tuple[float, ...]
    wall_s: tuple[float, ...]
    driver_cpu_s: tuple[float, ...]
    calls: int
    in_flight: int
    extra: dict[str, Any] = field(default_factory=dict)

    def hop(self) -> Hop:
        return Hop(
            self.fixed, self.per_byte, "measured here: no-op Ray actors, CPU of their process per call"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fit(sizes: Sequence[int], seconds: Sequence[float]) -> tuple[float, float]:
    """``fixed, per_byte`` of the least-squares line ``seconds = fixed + per_byte * 2 * size`` (both >= 0)."""
    x = 2.0 * np.asarray(sizes, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    if len(set(x.tolist())) < 2:
        return float(max(y.mean(), 0.0)), 0.0
    per_byte, fixed = np.polyfit(x, y, 1)
    if per_byte < 0:  # no growth with size on this machine: the mean is the fixed cost
        return float(max(y.mean(), 0.0)), 0.0
    if fixed < 0:  # through the origin instead
        return 0.0, float((x @ y) / (x @ x))
    return float(fixed), float(per_byte)


def hop_sizes(cut_bytes: Sequence[int]) -> list[int]:
    """Sizes to calibrate at: the profile's distinct cut sizes, 1 KiB and twice the largest."""
    inner = sorted({int(b) for b in cut_bytes if b > 0})
    if len(inner) > 6:  # at most six of them, spread over the range
        inner = [inner[int(i)] for i in np.linspace(0, len(inner) - 1, 6).round()]
    largest = max(inner, default=1024)
    return sorted({1024, *inner, 2 * largest})


def calibrate_hop(
    sizes: Sequence[int],
    *,
    calls: int = 200,
    in_flight: int = 4,
    warmup: int = 20,
    chain: int = 2,
) -> HopCalibration:
    """Time a no-op Ray actor at each size (bytes of float32 sent in and returned), fit the hop.

    Uses the Ray already initialised in this process, else starts a local one (2 CPUs, no
    dashboard) and shuts it down afterwards.

    Raises:
        InputError: Ray is not installed, or sizes/calls out of range.
    """
    if not sizes or any(s < 4 for s in sizes):
        raise InputError(f"hop calibration: expected sizes of at least 4 bytes, got {list(sizes)}")
    if calls < 10 or in_flight < 1 or chain < 1:
        raise InputError(
            f"hop calibration: expected calls >= 10, in_flight >= 1, chain >= 1, got {calls}, {in_flight}, {chain}"
        )
    try:
        import ray
    except ImportError:
        raise InputError("--hop measure: needs Ray (pip install 'rlhf[cluster]')") from None
    owns = not ray.is_initialized()
    if owns:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actors: list[Any] = [ray.remote(EchoWorker).options(num_cpus=0).remote() for _ in range(chain)]

        def cpus() -> list[float]:
            return [float(c) for c in ray.get([a.cpu.remote() for a in actors])]

        cpus()
        actor_cpu, wall, driver_cpu, per_actor = [], [], [], []
        for size in sizes:
            x = np.ones(max(1, size // 4), dtype=np.float32)

            def stream(count: int, x: np.ndarray = x) -> None:
                """``count`` calls, ``in_flight`` of them at once, as the pipeline feeds a stage."""
                pending: dict[Any, Any] = {}
                sent = 0
                while sent < count or pending:
                    while sent < count and len(pending) < in_flight:
                        ref: Any = ray.put(({"x": x}, []))
                        for a in actors:
                            ref = a.run_carried.remote(sent, ref)
                        pending[ref] = sent
                        sent += 1
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    for ref in ready:
                        ray.get(ref)
                        pending.pop(ref)

            stream(warmup)
            c0, d0, t0 = cpus(), time.process_time(), time.perf_counter()
            stream(calls)
            t1, d1, c1 = time.perf_counter(), time.process_time(), cpus()
            mine = [(b - a) / calls for a, b in zip(c0, c1)]
            per_actor.append(mine)
            actor_cpu.append(sum(mine) / chain)
            wall.append((t1 - t0) / calls)
            driver_cpu.append((d1 - d0) / calls)
        for a in actors:
            ray.kill(a)
    finally:
        if owns:
            ray.shutdown()
    fixed, per_byte = _fit(sizes, actor_cpu)
    return HopCalibration(
        fixed,
        per_byte,
        tuple(int(s) for s in sizes),
        tuple(actor_cpu),
        tuple(wall),
        tuple(driver_cpu),
        calls,
        in_flight,
        {
            "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
            "chain": chain,
            "actor_cpu_s_per_actor": per_actor,
        },
    )
