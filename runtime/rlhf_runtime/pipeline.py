"""Serve an export as a pipeline of Ray actors, one per placed stage.

```python
from rlhf_runtime.pipeline import Pipeline
with Pipeline("export/", "placement.yaml", threads=1, max_in_flight=4) as pipe:
    outputs = pipe.run_batches([{"x": x0}, {"x": x1}, ...])   # in order, bit-equal to Executor.run
    pipe.stats()    # throughput, latency percentiles, per-stage utilisation, retries, restarts
```

Each stage is a :class:`~rlhf_runtime.stage_worker.StageWorker` actor holding a contiguous range
of the export's stage files, pinned to its device through a Ray custom resource ``device:NAME``
(start each device's Ray node with ``--resources '{"device:NAME": 1}'``; without an address a local
cluster is started with one such resource per placed device). A request is a chain of actor calls
whose tensors travel as Ray object references, so stage k works on request i + 1 while stage k + 1
works on request i. At most ``max_in_flight`` requests are in the pipeline (each actor's queue is
bounded by that); the producer waits for a result before it admits another (back-pressure).

Each call returns one object, the tensors for the next stage with the timing records of the
stages so far (``StageWorker.run_carried``); ``carry_records=False`` returns each stage's record as
an object of its own (two returns per call, one more fetch per stage: the benchmark compares them).

Fault tolerance: actors restart (``max_restarts``) after they die; Ray does not retry their calls
(``max_task_retries=0``): the pipeline does, per request id, from the request's inputs, which it
keeps until the request is answered. A request is answered exactly once: results are keyed by id,
and an id already answered is never resubmitted nor yielded again.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_runtime.errors import InputError
from rlhf_runtime.manifest import read_manifest
from rlhf_runtime.placement import Placement, check_placement, load_placement
from rlhf_runtime.stage_worker import StageWorker
from rlhf_runtime.text import text_limits

RESOURCE_PREFIX = "device:"
REPORT_FORMAT = "rlhf-serve-report"


def device_resource(name: str) -> str:
    """The Ray custom resource that pins a stage to a device."""
    return f"{RESOURCE_PREFIX}{name}"


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Refuse an address no Ray cluster answers at, before anything is started.

    Raises:
        InputError: malformed address or nothing listening there.
    """
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--address: expected HOST:PORT, ray://HOST:PORT or 'auto', got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise InputError(f"Ray cluster at {address} is not reachable: {exc}") from None


class Pipeline:
    """An export run as a pipeline of Ray actors placed by a placement file.

    Args:
        export_dir: the export directory (``rlhf export``), the same on every device.
        placement: a :class:`Placement` or the path of placement.yaml (``rlhf plan``).
        address: a Ray cluster address; None: use the Ray already initialised in this process, else
            start a local one with one ``device:NAME`` resource per placed device.
        threads: onnxruntime intra-op threads per stage.
        max_in_flight: requests in the pipeline at once (default: 2 per stage).
        max_restarts: how often each actor may be restarted after it dies.
        max_attempts: how often one request may be submitted before the error is raised.
        slowdown: device name -> repeat factor (the benchmark's emulation of a slower device).
        fused: one stage holding every export stage runs the export's fused file instead.
        carry_records: the timing records travel with the tensors (one object per call); False:
            one more object per stage and call (the form before, kept to measure the difference).

    Raises:
        InputError: a placement for another export, an unreachable cluster, or a device the
            cluster has no ``device:NAME`` resource for; nothing is started then.
    """

    def __init__(
        self,
        export_dir: str | os.PathLike[str],
        placement: Placement | str | os.PathLike[str],
        *,
        address: str | None = None,
        threads: int = 1,
        max_in_flight: int | None = None,
        max_restarts: int = 3,
        max_attempts: int = 4,
        slowdown: Mapping[str, int] | None = None,
        variant: str = "fp32",
        fused: bool = False,
        carry_records: bool = True,
    ) -> None:
        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        self._text_limits = text_limits(self.manifest.raw, str(self.export_dir / "manifest.json"))
        self.placement = placement if isinstance(placement, Placement) else load_placement(placement)
        check_placement(self.placement, self.export_dir, self.manifest)
        if max_in_flight is not None and max_in_flight < 1:
            raise InputError(f"max_in_flight: expected >= 1, got {max_in_flight}")
        devices = [s.device for s in self.placement.stages]
        unknown = sorted(set(slowdown or {}) - set(devices))
        if unknown:
            raise InputError(f"slowdown: unknown devices {unknown}; placed devices: {devices}")
        if fused and len(self.placement.stages) != 1:
            raise InputError(f"fused: expected a placement with one stage, got {len(self.placement.stages)}")
        if address is not None:
            check_reachable(address)
        import ray

        self._ray = ray
        self._owns_ray = False
        if not ray.is_initialized():
            if address is None:
                ray.init(
                    address="local",  # a new cluster, never one `ray start` left running
                    num_cpus=max(2, len(devices)),
                    include_dashboard=False,
                    resources={device_resource(d): 1 for d in devices},
                    log_to_driver=False,
                )
            else:
                try:
                    ray.init(address=address, log_to_driver=False)
                except (ConnectionError, RuntimeError) as exc:
                    raise InputError(
                        f"Ray cluster at {address} is not reachable: {exc}".splitlines()[0]
                    ) from None
            self._owns_ray = True
        available = ray.cluster_resources()
        missing = [d for d in devices if available.get(device_resource(d), 0) < 1]
        if missing:
            if self._owns_ray:
                ray.shutdown()
            raise InputError(
                f"the Ray cluster has no resource for devices {missing}: expected nodes started with "
                f"--resources '{{\"{device_resource(missing[0])}\": 1}}'"
            )
        remote = ray.remote(StageWorker)
        self.actors: list[Any] = [
            remote.options(
                resources={device_resource(st.device): 1},
                num_cpus=0,
                max_restarts=max_restarts,
                max_task_retries=0,
            ).remote(
                str(self.export_dir.resolve()),
                st.units[0],
                st.units[1],
                threads,
                int((slowdown or {}).get(st.device, 1)),
                variant,
                fused,
            )
            for st in self.placement.stages
        ]
        self.pids = ray.get([a.pid.remote() for a in self.actors])
        self.carry_records = carry_records
        self.max_in_flight = max_in_flight or 2 * len(self.actors)
        self.max_attempts = max_attempts
        self.input_names = [t.name for t in self.manifest.inputs]
        self.output_names = [t.name for t in self.manifest.outputs]
        self._next_id = 0
        self.reset_stats()

    # -- statistics ---------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Forget the figures so far (the next stream starts a new measurement)."""
        self.latencies: list[float] = []
        self._cpu0 = self._process_cpu()
        self.busy = [0.0] * len(self.actors)
        self.cpu = [0.0] * len(self.actors)
        self.answered: set[int] = set()
        self._batch_sizes: set[int] = set()
        self.retries = 0
        self.duplicates = 0
        self.failures: list[float] = []  # time.perf_counter() of each failed attempt
        self.recoveries: list[float] = []  # seconds from a failure to the next answered request
        self._t0: float | None = None
        self._t_last = 0.0
        self._pending_failure: float | None = None

    def _process_cpu(self) -> list[float] | None:
        """CPU seconds of each actor's process so far (None when an actor is not answering)."""
        from ray.exceptions import RayError

        try:
            return [float(x) for x in self._ray.get([a.cpu.remote() for a in self.actors], timeout=30)]
        except RayError:  # a dead or restarting actor, or a timeout: no figure, not an error
            return None

    def process_cpu_per_request(self) -> list[float] | None:
        """Each actor process's CPU seconds per answered request since :meth:`reset_stats`.

        Counts what the stage pays beyond its onnxruntime calls (Ray's dispatch, reading and
        writing the object store). Call it between streams: the actors answer it after their
        queued requests. None when an actor restarted (its process's count began again) or is
        not answering.
        """
        now = self._process_cpu()
        pids = self._ray.get([a.pid.remote() for a in self.actors]) if now is not None else None
        if now is None or self._cpu0 is None or pids != self.pids or not self.answered:
            return None
        return [(b - a) / len(self.answered) for a, b in zip(self._cpu0, now)]

    def report(self) -> dict[str, Any]:
        """The serve report (``rlhf serve --report``, read by ``rlhf plan --measured``).

        Per stage: device, export-stage range, wall and CPU seconds of its onnxruntime calls per
        request (``busy_s`` / ``cpu_s``), and its process's CPU per request when known; plus the
        export it ran, the micro-batch size and :meth:`stats`.
        """
        st = self.stats()
        n = max(1, st["requests"])
        proc = self.process_cpu_per_request()
        sizes = {int(v) for v in self._batch_sizes}
        return {
            "format": REPORT_FORMAT,
            "version": 1,
            "export": {
                "name": self.manifest.name,
                "manifest_sha256": hashlib.sha256(
                    (self.export_dir / "manifest.json").read_bytes()
                ).hexdigest(),
            },
            "micro_batch": sizes.pop() if len(sizes) == 1 else None,
            "stages": [
                {
                    "device": s.device,
                    "units": list(s.units),
                    "busy_s": self.busy[i] / n,
                    "cpu_s": self.cpu[i] / n,
                    "process_cpu_s": None if proc is None else proc[i],
                }
                for i, s in enumerate(self.placement.stages)
            ],
            "stats": st,
        }

    def stats(self) -> dict[str, Any]:
        """Throughput, latency percentiles (ms), per-stage utilisation, retries, recoveries.

        ``utilisation``: the share of the wall time each stage spent running requests;
        ``cpu_share``: CPU seconds / wall seconds while running (below 1 when other processes took
        the core; on calls of tens of microseconds the thread-CPU and wall clocks of a loaded VM
        disagree by that much, so it can read above 1 there); ``busy_s_per_request``: each stage's
        wall seconds per request.
        """
        wall = (self._t_last - self._t0) if self._t0 is not None else 0.0
        lat = np.asarray(self.latencies) * 1e3
        pct = {f"p{q}_ms": float(np.percentile(lat, q)) if lat.size else float("nan") for q in (50, 90, 99)}
        return {
            "requests": len(self.answered),
            "seconds": wall,
            "throughput_rps": len(self.answered) / wall if wall > 0 else 0.0,
            **pct,
            "utilisation": [b / wall if wall > 0 else 0.0 for b in self.busy],
            "cpu_share": [c / b if b > 0 else 0.0 for b, c in zip(self.busy, self.cpu)],
            "busy_s_per_request": [b / max(1, len(self.answered)) for b in self.busy],
            "devices": [s.device for s in self.placement.stages],
            "retries": self.retries,
            "duplicates": self.duplicates,
            "recoveries_s": list(self.recoveries),
        }

    # -- running ------------------------------------------------------------------------------------
    def _check(self, inputs: Mapping[str, np.ndarray], rid: int) -> None:
        if not isinstance(inputs, Mapping) or sorted(inputs) != sorted(self.input_names):
            got = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise InputError(f"request {rid}: expected arrays for inputs {self.input_names}, got {got}")
        if self._text_limits is not None:
            try:
                self._text_limits.check(inputs)
            except InputError as exc:
                raise InputError(f"request {rid}: {exc}") from None

    def _submit(self, rid: int, inputs_ref: Any) -> tuple[Any, list[Any]]:
        ref, timings = inputs_ref, []
        for actor in self.actors:
            if self.carry_records:
                ref = actor.run_carried.remote(rid, ref)
            else:
                ref, timing = actor.run.options(num_returns=2).remote(rid, ref)
                timings.append(timing)
        return ref, timings

    def stream(
        self,
        requests: Iterable[Mapping[str, np.ndarray]],
        on_result: Callable[[Pipeline], None] | None = None,
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Run requests through the pipeline; yield ``(index, outputs)`` as they complete.

        At most ``max_in_flight`` requests are in flight; the next one is taken from ``requests``
        only when one completes. A request whose actor died is submitted again (up to
        ``max_attempts`` times) once the actor restarts.

        Raises:
            InputError: a request without exactly the export's inputs.
            ray.exceptions.RayError: a request failed ``max_attempts`` times, or a stage raised.
        """
        ray = self._ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        retryable = (RayActorError, ActorUnavailableError)
        it = iter(enumerate(requests))
        index: dict[int, int] = {}  # request id (unique over the pipeline's life) -> position here
        inputs: dict[int, Any] = {}
        started: dict[int, float] = {}
        attempts: dict[int, int] = {}
        pending: dict[Any, tuple[int, list[Any]]] = {}
        exhausted = False
        if self._t0 is None:
            self._t0 = time.perf_counter()
        while True:
            while not exhausted and len(pending) < self.max_in_flight:
                try:
                    pos, req = next(it)
                except StopIteration:
                    exhausted = True
                    break
                self._check(req, pos)
                rid = self._next_id
                self._next_id += 1
                index[rid] = pos
                inputs[rid] = ray.put((dict(req), []) if self.carry_records else dict(req))
                self._batch_sizes.update(int(np.shape(v)[0]) for v in req.values() if np.ndim(v))
                started[rid] = time.perf_counter()
                attempts[rid] = 1
                final, timings = self._submit(rid, inputs[rid])
                pending[final] = (rid, timings)
            if not pending:
                return
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                rid, timings = pending.pop(ref)
                try:
                    if self.carry_records:
                        env, records = ray.get(ref)
                    else:
                        env, records = ray.get(ref), ray.get(timings)
                except retryable:
                    now = time.perf_counter()
                    self.failures.append(now)
                    if self._pending_failure is None:
                        self._pending_failure = now
                    if attempts[rid] >= self.max_attempts:
                        raise
                    attempts[rid] += 1
                    self.retries += 1
                    final, timings = self._submit(rid, inputs[rid])
                    pending[final] = (rid, timings)
                    continue
                if rid in self.answered:  # cannot happen by construction; counted, never yielded
                    self.duplicates += 1
                    continue
                now = time.perf_counter()
                self.answered.add(rid)
                self.latencies.append(now - started.pop(rid))
                for k, rec in enumerate(records):
                    self.busy[k] += rec["busy_s"]
                    self.cpu[k] += rec["cpu_s"]
                self._t_last = now
                if self._pending_failure is not None:
                    self.recoveries.append(now - self._pending_failure)
                    self._pending_failure = None
                del inputs[rid]
                out = {n: env[n] for n in self.output_names}
                if on_result is not None:
                    on_result(self)
                yield index.pop(rid), out

    def run_batches(
        self,
        requests: Iterable[Mapping[str, np.ndarray]],
        on_result: Callable[[Pipeline], None] | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Every request's outputs, in request order (see :meth:`stream`)."""
        results = dict(self.stream(requests, on_result))
        return [results[i] for i in range(len(results))]

    def run(
        self,
        inputs: Mapping[str, np.ndarray],
        micro_batch: int,
        on_result: Callable[[Pipeline], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Split a batch into micro-batches, pipeline them, concatenate the outputs in order.

        Raises:
            InputError: micro_batch < 1, inputs with different batch sizes or the wrong names.
        """
        if micro_batch < 1:
            raise InputError(f"micro_batch: expected >= 1, got {micro_batch}")
        self._check(inputs, 0)
        sizes = {int(v.shape[0]) for v in inputs.values()}
        if len(sizes) != 1:
            raise InputError(f"inputs disagree on the batch size: got {sorted(sizes)}")
        n = sizes.pop()
        chunks = [{k: v[i : i + micro_batch] for k, v in inputs.items()} for i in range(0, n, micro_batch)]
        outs = self.run_batches(chunks, on_result)
        return {name: np.concatenate([o[name] for o in outs]) for name in self.output_names}

    def close(self) -> None:
        """Stop the actors (and the local Ray cluster when this pipeline started it)."""
        for a in getattr(self, "actors", []):
            self._ray.kill(a, no_restart=True)
        self.actors = []
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
