"""One pipeline stage: a contiguous range of an export's stage files, run with onnxruntime.

Numpy + onnxruntime + stdlib only: this is the body of a Ray actor (``rlhf_runtime.pipeline``)
and runs on a device that has no torch. Files are loaded by path after their sha256 is checked
against the manifest, exactly as the single-process Executor loads them, and run with the same
session options, so a stage computes the same bits as the Executor.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_runtime.manifest import read_manifest
from rlhf_runtime.session import SessionConfig, open_session


class StageWorker:
    """Runs export stages ``start .. stop - 1`` on a dict of named tensors.

    Args:
        export_dir: the export directory (the same files on every device).
        start, stop: the range of export stages this pipeline stage holds.
        threads: onnxruntime intra-op threads.
        repeat: run the stages this many times per request (1 normally; the benchmark emulates a
            device ``repeat`` times slower this way; the outputs are those of the last run, the
            same bits every time).
        fused: run the export's single fused file instead (the range must cover every stage).

    Raises:
        ValueError, FileNotFoundError: an unsafe path, a missing file or a sha256 mismatch.
    """

    def __init__(
        self,
        export_dir: str,
        start: int,
        stop: int,
        threads: int = 1,
        repeat: int = 1,
        variant: str = "fp32",
        fused: bool = False,
    ) -> None:
        root = Path(export_dir)
        manifest = read_manifest(root)
        if not 0 <= start < stop <= len(manifest.stages):
            raise ValueError(
                f"stage range: expected 0 <= start < stop <= {len(manifest.stages)}, got {start}..{stop}"
            )
        if repeat < 1:
            raise ValueError(f"repeat: expected >= 1, got {repeat}")
        config = SessionConfig(intra_op_threads=threads)
        self.sessions = []
        self.io: list[tuple[list[str], list[str]]] = []
        units = [(st.files[variant], st.inputs, st.outputs) for st in manifest.stages[start:stop]]
        if fused:
            if (start, stop) != (0, len(manifest.stages)) or variant not in manifest.fused:
                raise ValueError(
                    f"fused: expected the range 0..{len(manifest.stages)} and a fused {variant} file"
                )
            units = [(manifest.fused[variant], manifest.inputs, manifest.outputs)]
        self.checks: list[Any] = []
        for entry, ins, outs in units:  # by path: a stage's data file is memory-mapped (open_session)
            sess, check = open_session(
                root, entry, ["CPUExecutionProvider"], config, strict=True, load_from="path"
            )
            self.sessions.append(sess)
            self.checks.append(check)
            self.io.append(([t.name for t in ins], [t.name for t in outs]))
        later = {t.name for st in manifest.stages[stop:] for t in st.inputs}
        self.keep = later | {t.name for t in manifest.outputs}
        self.repeat = repeat
        self.start, self.stop = start, stop

    def run(
        self, request_id: int, env: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Run the stages on ``env`` (every tensor still needed); return what later stages need.

        Returns:
            (tensors for the next stage or the graph outputs, timing record
            ``{"id", "pid", "busy_s", "cpu_s", "end"}``: wall and CPU seconds of this call (with one
            intra-op thread onnxruntime computes on the calling thread, so ``cpu_s / busy_s`` is the
            share of a core the stage got), ``end`` is ``time.time()`` when the run finished).
        """
        t0, c0 = time.perf_counter(), time.thread_time()
        local: dict[str, Any] = {}
        for _ in range(self.repeat):
            local = dict(env)
            for sess, (ins, outs) in zip(self.sessions, self.io):
                local.update(zip(outs, sess.run(outs, {n: local[n] for n in ins})))
        for check in self.checks:  # the mapped weights were read during the run: files as hashed?
            check()
        result = {k: v for k, v in local.items() if k in self.keep}
        busy, cpu = time.perf_counter() - t0, time.thread_time() - c0
        return result, {
            "id": request_id,
            "pid": os.getpid(),
            "busy_s": busy,
            "cpu_s": cpu,
            "end": time.time(),
        }

    def run_carried(
        self, request_id: int, payload: tuple[Mapping[str, np.ndarray], list[dict[str, Any]]]
    ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        """:meth:`run` with the timing records travelling along with the tensors.

        ``payload`` is ``(tensors, records of the stages before)``; the result is ``(tensors for the
        next stage, records + [this stage's])``: one object per call, so the driver fetches one
        object per request instead of one per stage plus the outputs.
        """
        env, records = payload
        result, record = self.run(request_id, env)
        return result, [*records, record]

    def cpu(self) -> float:
        """CPU seconds of the worker's whole process so far (onnxruntime and Ray's threads)."""
        return time.process_time()

    def pid(self) -> int:
        """The worker's process id (tests kill it; the pipeline reports restarts)."""
        return os.getpid()
