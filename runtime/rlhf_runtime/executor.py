"""Run an export directory stage by stage with onnxruntime (numpy + onnxruntime only)."""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from rlhf_runtime.errors import InputError
from rlhf_runtime.limits import BINDING_CACHE_SIZE, MAX_BUFFER_BYTES, limit
from rlhf_runtime.manifest import FileEntry, Manifest, TensorInfo, read_manifest
from rlhf_runtime.session import (
    CUDA,
    SessionConfig,
    manifest_providers,
    open_session,
    resolve_providers,
    run_bound,
)
from rlhf_runtime.text import text_limits


@dataclass(frozen=True)
class _Unit:
    """What the executor runs: one stage file (or the fused file) with its tensor names."""

    label: str
    entry: FileEntry
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]


@functools.cache
def _libc() -> Any:
    """glibc through ctypes, loaded on first use (streaming only): importing ctypes and finding the
    library cost a cold start tens of milliseconds that a resident run never needs."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl without it)
        return None


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def pin_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Serve every allocation >= ``nbytes`` with its own mmap, returned to the system on free.

    glibc raises its mmap threshold dynamically (up to 32 MiB) after large blocks are freed, so a
    released stage's weight buffers would be recycled inside the heap, fragmented, and the next
    stage's weights land beside them: the resident set creeps up to ~1.5x the largest stage.
    Pinning the threshold keeps it at one stage plus one tensor. Process-wide; Linux/glibc only.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))


def release_free_memory() -> None:
    """Give freed heap memory back to the operating system (glibc ``malloc_trim``; no-op elsewhere).

    A released stage's weights are freed, but glibc keeps large freed blocks in its heap; without
    a trim the resident set of a streaming run grows with every stage instead of staying near
    the largest one.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
}


def _describe_arg(arg: Any) -> str:
    dims = ", ".join(str(d) if isinstance(d, int) else "*" for d in (arg.shape or []))
    return f"{_ORT_DTYPES.get(arg.type, arg.type)} ({dims})"


def check_session_io(
    label: str, file: str, manifest_io: Sequence[TensorInfo], session_io: Sequence[Any], kind: str
) -> None:
    """Compare the manifest's tensors of one file with what onnxruntime reads from the file itself.

    Names must match as sets; for each tensor the dtype must match and, axis by axis, a fixed size
    in the manifest must equal the file's fixed size (a dynamic axis in the file accepts any
    size), and a dynamic axis in the manifest (``null``) must be dynamic in the file too.

    Args:
        label: "stage 0" or "fused", for the message.
        file: the file's name, for the message.
        manifest_io: the manifest's inputs or outputs of this file.
        session_io: ``session.get_inputs()`` or ``session.get_outputs()``.
        kind: "input" or "output".

    Raises:
        InputError: one line naming the first tensor that differs, with both descriptions.
    """
    got = {a.name: a for a in session_io}
    want = {t.name: t for t in manifest_io}
    if set(got) != set(want):
        raise InputError(
            f"{label} ({file}): the manifest lists {kind}s {sorted(want)}, the ONNX file has {sorted(got)}: "
            "refusing a manifest that does not describe its file"
        )
    for name, t in want.items():
        arg = got[name]
        dims = list(arg.shape or [])
        ok = _ORT_DTYPES.get(arg.type) == t.dtype and len(dims) == len(t.shape)
        if ok:
            for m, f in zip(t.shape, dims):
                fixed = isinstance(f, int) and not isinstance(f, bool)
                if (m is None and fixed) or (m is not None and fixed and m != f):
                    ok = False
        if not ok:
            raise InputError(
                f"{label} ({file}): {kind} {name!r}: the manifest says {t.describe()}, the ONNX file has "
                f"{_describe_arg(arg)}: refusing a manifest that does not describe its file"
            )


# resident bytes one token's row lookup may bring in from a memory-mapped table evicted from the
# page cache (measured <= 58 KiB on Linux 6.18 / ext4; the fault-around window is 16 pages)
FAULT_BYTES = 64 * 1024


def weight_bytes(entry: FileEntry, tokens: int | None = None) -> int:
    """The memory one entry's weights take in a session loaded from its files by path.

    A self-contained ONNX file counts whole. With a data file (format version 2) onnxruntime maps
    the data file and its tensors point into the mapped pages: the GEMM weights are read whole by
    every run, so they count whole; a table read only through ``Gather`` (``entry.gathered``: an
    embedding) brings in only the pages of the rows a run reads, about ``FAULT_BYTES`` per distinct
    token (the kernel maps the neighbouring cached pages too), and never more than the table. So
    the estimate is the file sizes less the gathered tables, plus ``min(gathered, tokens x
    FAULT_BYTES)``. ``tokens=None`` counts the tables whole (a resident session copies them).
    """
    total = entry.total_bytes
    if entry.gathered and tokens is not None:
        total += min(entry.gathered, tokens * FAULT_BYTES) - entry.gathered
    return total


def _nbytes(infos: Sequence[TensorInfo], batch: int) -> int:
    """Bytes of these tensors at a batch size (a later dynamic axis is counted as ``batch`` long too)."""
    total = 0
    for t in infos:
        n = 1
        for d in t.shape:
            n *= batch if d is None else d
        total += n * np.dtype(t.dtype).itemsize
    return total


class Executor:
    """Chain the ONNX stages of an export directory, passing tensors by name.

    Every tensor a stage produces is kept in a name -> array environment until the end of the run,
    so a stage may read any graph input or any earlier stage's output (skip connections across
    several cuts). Before a file is handed to onnxruntime its size and sha256 are checked against
    the manifest, on the very bytes that are loaded.

    Memory: with ``memory_budget=None`` (or a budget that holds every stage's files) all sessions stay
    resident. Otherwise the executor *streams*: for each run it loads one stage, runs the whole
    batch through it, releases it and goes on, so peak memory is about the largest stage plus the
    activations crossing the cuts. A streamed stage is loaded by path and onnxruntime memory-maps its
    external-data file (manifest format version 2): a stage costs the pages its kernels read, and an
    embedding table read through ``Gather`` only the rows of the batch's tokens (``weight_bytes``:
    64 KiB per token up to the table); the budget is refused below the largest stage so estimated at
    batch 1 plus its activations. Resident CPU runs use IO binding: each tensor crossing a cut lives
    in a buffer allocated once per batch size, written by its stage and read in place by the next
    (no per-call allocation or copy between stages); so one Executor must not ``run`` from two
    threads at once. Models with a dynamic axis besides the batch (a sequence length: ``null`` past
    the first axis in the manifest) run without preallocated buffers. In streaming mode the executor
    pins glibc's mmap threshold (see ``pin_mmap_threshold``) so freed stages really leave memory,
    runs without onnxruntime's memory arena unless ``SessionConfig.memory_arena`` says otherwise,
    and copies each stage's outputs out of onnxruntime's memory so it leaves with its session.

    Args:
        export_dir: directory written by ``toolkit.export.export_model`` / ``rlhf export``.
        providers: "auto" (CUDA when this onnxruntime has it, else CPU), "cpu", "cuda" or a list of
            onnxruntime provider names. A provider named explicitly must really be active, else
            RuntimeError (onnxruntime's silent fallback to CPU becomes visible). With "auto", a
            manifest key ``"providers"`` ("cpu", "cuda" or a list) decides; one this onnxruntime
            lacks is an InputError saying what to install.
        memory_budget: bytes available for one stage's weights (as ``weight_bytes`` counts them) and
            the tensors crossing its cuts, or None for no limit. onnxruntime's working memory inside
            a stage (attention scores, intermediates) is not counted.
        session_options: a SessionConfig (threads, memory arena, optimization level) or a dict of
            its fields.
        variant: which files to run: "fp32" or another variant in the manifest (e.g. "int8").
        fused: run the single fused file instead of the stages (for comparison).
        load_from: "bytes": read the files once (the ONNX file and its data file), hash those bytes
            and hand the very same bytes to onnxruntime, so what runs is what was hashed (a file
            swapped or rewritten after the check cannot slip in); onnxruntime copies the weights,
            about twice the stage's size at load. "path": hash the files in chunks, let onnxruntime
            open them (memory-mapping the data file), and refuse the stage's result if either file
            changed (inode, size, mtime) between the hash and the end of its run: weights as they
            are read, but a writer that restores the mtime is not caught. "auto" (default): "bytes"
            when resident, "path" when streaming (whose point is the smallest peak memory). See
            ``session.open_session``.
        max_buffer_bytes: ceiling on the buffers preallocated for one batch size (the tensors
            crossing the cuts); default ``limits.MAX_BUFFER_BYTES`` (env ``RLHF_MAX_BUFFER_BYTES``).
            A run whose buffers would exceed it is refused with InputError naming the limit.

    Every session's inputs and outputs (``get_inputs()/get_outputs()``) are compared with the
    manifest's when it is loaded; a mismatch is refused before any buffer is allocated from the
    manifest's shapes. IO bindings and their buffers are cached together for the
    ``limits.BINDING_CACHE_SIZE`` most recently used batch sizes.

    Raises:
        FileNotFoundError: no export directory or manifest.
        ValueError: invalid manifest, unsafe path, unknown variant, or a budget below the largest stage.
    """

    def __init__(
        self,
        export_dir: str | os.PathLike[str],
        providers: str | Sequence[str] = "auto",
        memory_budget: int | None = None,
        session_options: SessionConfig | Mapping[str, Any] | None = None,
        *,
        variant: str = "fp32",
        fused: bool = False,
        load_from: str = "auto",
        max_buffer_bytes: int | None = None,
    ) -> None:
        self.export_dir = Path(export_dir)
        self.manifest: Manifest = read_manifest(self.export_dir)
        if isinstance(session_options, Mapping):
            session_options = SessionConfig(**session_options)
        self.config = session_options or SessionConfig()
        explicit = not (isinstance(providers, str) and providers.lower() == "auto")
        asked = (
            None
            if explicit
            else manifest_providers(self.manifest.raw, str(self.export_dir / "manifest.json"))
        )
        self.providers = asked or resolve_providers(providers)
        self._strict = explicit
        if load_from not in ("auto", "path", "bytes"):
            raise InputError(f"load_from: expected 'auto', 'path' or 'bytes', got {load_from!r}")
        if max_buffer_bytes is not None and max_buffer_bytes <= 0:
            raise InputError(f"max_buffer_bytes: expected a positive number of bytes, got {max_buffer_bytes}")
        self.max_buffer_bytes = (
            max_buffer_bytes
            if max_buffer_bytes is not None
            else limit("RLHF_MAX_BUFFER_BYTES", MAX_BUFFER_BYTES)
        )
        self.variant = variant
        self.fused = fused
        self.units = self._units(variant, fused)
        if memory_budget is not None and memory_budget <= 0:
            raise InputError(f"memory_budget: expected a positive number of bytes, got {memory_budget}")
        self.memory_budget = memory_budget
        resident_bytes = sum(u.entry.total_bytes for u in self.units)
        self.streaming = memory_budget is not None and resident_bytes > memory_budget
        self.load_from = ("path" if self.streaming else "bytes") if load_from == "auto" else load_from
        tokens = 1 if self.streaming and self.load_from == "path" else None  # mapped tables: by rows
        largest = max(
            weight_bytes(u.entry, tokens) + _nbytes(u.inputs, 1) + _nbytes(u.outputs, 1) for u in self.units
        )
        if memory_budget is not None and largest > memory_budget:
            raise InputError(
                f"memory_budget: expected at least {largest} bytes (the largest stage's weights as loaded "
                f"(Executor.weight_bytes) plus its activations at batch 1), got {memory_budget}"
            )
        self._plan = self._make_plan()
        self._expect = [(t.name, np.dtype(t.dtype), t.shape) for t in self.manifest.inputs]
        self._text_limits = text_limits(self.manifest.raw, str(self.export_dir / "manifest.json"))
        tensors = [t for u in self.units for t in (*u.inputs, *u.outputs)]
        self._fixed_shapes = all(d is not None for t in tensors for d in t.shape[1:])
        if self.streaming:
            pin_mmap_threshold()
            if self.config.memory_arena is None:  # a session per run: an arena saves nothing
                self.config = dataclasses.replace(self.config, memory_arena=False)
        # batch size -> (IO bindings, the buffers they write and read): one LRU, so both are bounded
        self._bind_cache: OrderedDict[int, tuple[list[Any], dict[str, ort.OrtValue]]] = OrderedDict()
        self._sessions: list[ort.InferenceSession] | None = None
        self._checks: list[Any] = []  # per resident session: the file check to run after each run
        if not self.streaming:
            loaded = [self._open(u) for u in self.units]
            self._sessions = [sess for sess, _ in loaded]
            self._checks = [check for _, check in loaded]

    # -- construction -----------------------------------------------------------------------------
    def _units(self, variant: str, fused: bool) -> list[_Unit]:
        m = self.manifest
        if fused:
            if variant not in m.fused:
                raise InputError(f"fused variant: expected one of {sorted(m.fused)}, got {variant!r}")
            return [_Unit("fused", m.fused[variant], m.inputs, m.outputs)]
        if variant not in m.variants():
            raise InputError(f"variant: expected one of {m.variants()}, got {variant!r}")
        return [_Unit(f"stage {s.index}", s.files[variant], s.inputs, s.outputs) for s in m.stages]

    def _open(self, unit: _Unit) -> tuple[ort.InferenceSession, Any]:
        """The unit's session and the check of its files to call after each run (``open_session``)."""
        sess, check = open_session(
            self.export_dir,
            unit.entry,
            self.providers,
            self.config,
            strict=self._strict,
            load_from=self.load_from,
        )
        check_session_io(unit.label, unit.entry.file, unit.inputs, sess.get_inputs(), "input")
        check_session_io(unit.label, unit.entry.file, unit.outputs, sess.get_outputs(), "output")
        return sess, check

    def _load(self, unit: _Unit) -> ort.InferenceSession:
        return self._open(unit)[0]

    def buffer_sets(self) -> int:
        """How many batch sizes' preallocated buffer sets are alive (at most ``BINDING_CACHE_SIZE``)."""
        return len(self._bind_cache)

    def _make_plan(self) -> list[tuple[list[str], list[str], list[str]]]:
        """Per unit: feed names, output names, and the tensors no later unit or output needs."""
        plan = []
        for i, unit in enumerate(self.units):
            needed = {t.name for u in self.units[i + 1 :] for t in u.inputs} | set(self.output_names)
            produced = {t.name for u in self.units[: i + 1] for t in u.outputs} | {
                t.name for t in self.manifest.inputs
            }
            plan.append(
                ([t.name for t in unit.inputs], [t.name for t in unit.outputs], sorted(produced - needed))
            )
        return plan

    @property
    def mode(self) -> str:
        """ "streaming" or "resident"."""
        return "streaming" if self.streaming else "resident"

    @property
    def io_binding(self) -> bool:
        """True when running on CUDA: activations stay on the GPU between stages."""
        return self.providers[0] == CUDA

    @property
    def input_infos(self) -> tuple[TensorInfo, ...]:
        return self.manifest.inputs

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.manifest.outputs]

    def active_providers(self) -> list[str]:
        """Providers of the first session (loads and releases it in streaming mode)."""
        sess = self._sessions[0] if self._sessions else self._load(self.units[0])
        return list(sess.get_providers())

    # -- input checks -----------------------------------------------------------------------------
    def check_inputs(self, inputs: Mapping[str, Any]) -> int:
        """Check names, dtypes and shapes of the graph inputs; return the batch size.

        Raises:
            TypeError: ``inputs`` is not a mapping of numpy arrays.
            ValueError: one message listing every problem and what is expected, e.g.
                ``unknown input 'y'; expected: ['x' float32 (B, 64)]``.
        """
        if not isinstance(inputs, Mapping):
            raise TypeError(f"inputs: expected a dict name -> numpy array, got {type(inputs).__name__}")
        batch = self._fast_check(inputs)
        if batch is not None:
            return batch
        expected = self.manifest.inputs
        known = {t.name for t in expected}
        problems: list[str] = []
        for name in inputs:
            if name not in known:
                problems.append(f"unknown input {name!r}")
        batches: set[int] = set()
        for t in expected:
            if t.name not in inputs:
                problems.append(f"missing input {t.name!r}")
                continue
            value = inputs[t.name]
            if not isinstance(value, np.ndarray):
                problems.append(f"input {t.name!r}: expected a numpy array, got {type(value).__name__}")
                continue
            got = f"{value.dtype} {tuple(value.shape)}"  # only formatted into messages
            if value.dtype != np.dtype(t.dtype):
                problems.append(f"input {t.name!r}: wrong dtype, expected {t.describe()}, got {got}")
            if value.ndim != len(t.shape) or any(
                d is not None and d != s for d, s in zip(t.shape, value.shape)
            ):
                problems.append(f"input {t.name!r}: wrong shape, expected {t.describe()}, got {got}")
            elif value.ndim:
                batches.add(int(value.shape[0]))
        if len(batches) > 1:
            problems.append(f"inputs disagree on the batch size: got {sorted(batches)}")
        if problems:
            listing = "[" + ", ".join(t.describe() for t in expected) + "]"
            raise InputError("; ".join(problems) + f"; expected: {listing}")
        return batches.pop() if batches else 1

    def _fast_check(self, inputs: Mapping[str, Any]) -> int | None:
        """The batch size when every input is exactly right (the common case, a few µs), else None."""
        if len(inputs) != len(self._expect):
            return None
        batch = None
        for name, dtype, shape in self._expect:
            v = inputs.get(name)
            if not isinstance(v, np.ndarray) or v.dtype != dtype or v.ndim != len(shape) or v.ndim == 0:
                return None
            for d, got in zip(shape, v.shape):
                if d is not None and d != got:
                    return None
            if batch is None:
                batch = int(v.shape[0])
            elif batch != v.shape[0]:
                return None
        return batch

    # -- running ----------------------------------------------------------------------------------
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the whole model on one batch.

        Args:
            inputs: graph input name -> array (batch axis first), dtypes and shapes as in the manifest.

        Returns:
            Graph output name -> numpy array.

        Raises:
            TypeError, ValueError: malformed inputs (see ``check_inputs``); for a text export
                (manifest ``text`` with limits), token ids outside the vocabulary or a sequence
                longer than the model's context (InputError, ``toolkit.runtime.text.TextLimits``).
        """
        batch = self.check_inputs(inputs)
        if self._text_limits is not None:  # token ids and lengths the model can index
            self._text_limits.check(inputs)
        if self._sessions is not None and not self.io_binding and self._fixed_shapes:
            return self._run_bound_cpu(inputs, batch)
        env: dict[str, Any] = dict(inputs)
        bound = self.io_binding
        for i, (feed_names, names, drop) in enumerate(self._plan):
            if self._sessions is not None:
                sess, check = self._sessions[i], self._checks[i]
            else:
                sess, check = self._open(self.units[i])
            feeds = {n: env[n] for n in feed_names}
            outs = run_bound(sess, feeds, names) if bound else sess.run(names, feeds)
            check()  # memory-mapped weights were read from the file during the run: still as hashed?
            if self._sessions is None and not bound:
                # streaming: onnxruntime's outputs are views of its memory arena and would keep the
                # released stage's whole arena alive until the next stage ran; copies free it
                outs = [np.array(o, copy=True) for o in outs]
            env.update(zip(names, outs))
            if self._sessions is None:  # streaming: release this stage before loading the next
                del sess, feeds, outs
                gc.collect()
                release_free_memory()
            for name in drop:  # activations no later unit needs
                env.pop(name, None)
        result = {}
        for name in self.output_names:
            value = env[name]
            result[name] = value.numpy() if isinstance(value, ort.OrtValue) else value
        return result

    def _bindings(self, batch: int) -> tuple[list[Any], dict[str, ort.OrtValue]]:
        """IO bindings for resident CPU runs at one batch size, and their buffers: every tensor
        crossing a cut lives in a buffer allocated once, written by its stage and read in place by
        the next ones. The least recently used batch size is dropped (bindings and buffers
        together) beyond ``BINDING_CACHE_SIZE``.

        Raises:
            InputError: the buffers would exceed ``max_buffer_bytes``.
        """
        if batch in self._bind_cache:
            self._bind_cache.move_to_end(batch)
            return self._bind_cache[batch]
        assert self._sessions is not None
        need = sum(_nbytes(u.outputs, batch) for u in self.units)
        if need > self.max_buffer_bytes:
            raise InputError(
                f"batch {batch}: the tensors crossing the cuts need {need} bytes of buffers, above the limit "
                f"max_buffer_bytes={self.max_buffer_bytes} (Executor(max_buffer_bytes=...) or RLHF_MAX_BUFFER_BYTES)"
            )
        graph_inputs = {t.name for t in self.manifest.inputs}
        buffers: dict[str, ort.OrtValue] = {}
        bindings = []
        for sess, unit in zip(self._sessions, self.units):
            b = sess.io_binding()
            for t in unit.inputs:
                if t.name not in graph_inputs:
                    b.bind_ortvalue_input(t.name, buffers[t.name])
            for t in unit.outputs:
                shape = [batch if d is None else d for d in t.shape]
                buffers[t.name] = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.dtype(t.dtype), "cpu")
                b.bind_ortvalue_output(t.name, buffers[t.name])
            bindings.append(b)
        while len(self._bind_cache) >= BINDING_CACHE_SIZE:
            self._bind_cache.popitem(last=False)  # bindings and buffers leave together
        self._bind_cache[batch] = (bindings, buffers)
        return bindings, buffers

    def _run_bound_cpu(self, inputs: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        assert self._sessions is not None
        bindings, buffers = self._bindings(batch)
        arrays = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
        for sess, b, (feed_names, _, _) in zip(self._sessions, bindings, self._plan):
            for n in feed_names:
                if n in arrays:
                    b.bind_cpu_input(n, arrays[n])
            sess.run_with_iobinding(b)
        for check in self._checks:
            check()
        return {name: np.array(buffers[name].numpy(), copy=True) for name in self.output_names}

    def close(self) -> None:
        """Release every session (a later ``run`` loads each stage again, as in streaming mode)."""
        self._sessions = None
        self._checks = []
        self._bind_cache.clear()
        gc.collect()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Executor({str(self.export_dir)!r}, units={len(self.units)}, variant={self.variant!r}, "
            f"mode={self.mode!r}, providers={self.providers})"
        )
