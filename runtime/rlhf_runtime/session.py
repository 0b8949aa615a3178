"""onnxruntime sessions: execution providers, session options, and the check that a provider really runs."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from rlhf_runtime.errors import InputError
from rlhf_runtime.manifest import FileEntry, read_verified, safe_path, same_file, verified_path
from rlhf_runtime.onnx_refs import check_locations

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class SessionConfig:
    """The session options the executor exposes.

    Attributes:
        intra_op_threads: threads inside one operator (0 = onnxruntime's default, one per core);
            1 is typical for batch-1 latency on small devices.
        inter_op_threads: threads across independent operators (0 = default).
        memory_arena: keep onnxruntime's CPU memory arena (faster repeated runs, memory is not
            returned to the system until the session is released). None (default): on, except in
            a streaming Executor, whose sessions each serve one run: there the arena saves no
            allocation and only holds more memory (its chunks grow by doubling).
        optimization: graph optimization level: "disable", "basic", "extended" or "all".
        memory_pattern: let onnxruntime pre-plan activation buffers for repeated shapes.
        prepacking: let onnxruntime pre-pack GEMM weights into its kernels' layout when a session
            is created. On by default: MiniLM in 3 stages at batch 1 runs 1.4x faster with it
            (4.4 vs 6.2 ms, 2 threads; docs/benchmarks/transformer.md), and int8 files with
            weight-only layers need it for their fused kernel. Streaming and resident runs use the
            same setting, so their outputs stay bit-identical; MiniLM streamed under half its
            weights peaks at the same RSS with it or without (36.5 vs 36.8 MiB). Off gives a
            different GEMM kernel (last-bit differences).
        spinning: let the intra-op thread pool spin (busy-wait) after a run, waiting for the next
            one. Off by default: a staged export holds one session, so one thread pool, per stage,
            and idle pools that spin take the cores from the stage that is running (on a loaded
            2-core machine, MiniLM in 3 stages ran at 2.66x the fused latency at batch 1 with
            spinning, 1.05x without; docs/benchmarks/transformer.md has the figures without it).
            Turn it on for one session on an otherwise idle machine.
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    memory_arena: bool | None = None
    optimization: str = "all"
    memory_pattern: bool = True
    prepacking: bool = True
    spinning: bool = False

    def to_ort(self) -> ort.SessionOptions:
        """Build the onnxruntime SessionOptions.

        Raises:
            InputError: unknown optimization level or negative thread count.
        """
        if self.optimization not in _OPT_LEVELS:
            raise InputError(
                f"optimization level: expected one of {list(_OPT_LEVELS)}, got {self.optimization!r}"
            )
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise InputError(
                f"thread counts: expected >= 0, got intra={self.intra_op_threads} inter={self.inter_op_threads}"
            )
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = self.inter_op_threads
        so.enable_cpu_mem_arena = self.memory_arena is not False
        so.enable_mem_pattern = self.memory_pattern
        so.graph_optimization_level = _OPT_LEVELS[self.optimization]
        so.log_severity_level = 3  # errors only
        if not self.prepacking:
            so.add_session_config_entry("session.disable_prepacking", "1")
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        return so


def resolve_providers(providers: str | Sequence[str]) -> list[str]:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"`` or an explicit list into onnxruntime provider names.

    "auto" picks CUDA (then CPU as fallback) when this onnxruntime build has it, else CPU.

    Raises:
        ValueError: a requested provider is not compiled into this onnxruntime build.
    """
    available = ort.get_available_providers()
    if isinstance(providers, str):
        key = providers.lower()
        if key == "auto":
            return [CUDA, CPU] if CUDA in available else [CPU]
        aliases = {"cpu": [CPU], "cuda": [CUDA, CPU]}
        wanted = aliases.get(key, [providers])
    else:
        wanted = list(providers)
    if not wanted:
        raise InputError("providers: expected 'auto', 'cpu', 'cuda' or a non-empty list, got []")
    missing = [p for p in wanted if p not in available]
    if missing:
        raise InputError(
            f"execution provider {missing} not available in this onnxruntime build: expected one of {available}"
        )
    return wanted


def manifest_providers(raw: dict[str, Any], where: str) -> list[str] | None:
    """The providers an export's manifest asks for (optional key ``"providers"``: "cpu", "cuda" or
    a list of onnxruntime names), checked against this onnxruntime build; None when it asks nothing.

    Raises:
        InputError: the key is malformed, or asks for a provider this build lacks (one line: which,
            and what to do on this device).
    """
    asked = raw.get("providers")
    if asked is None:
        return None
    if isinstance(asked, str) and asked.lower() in ("cpu", "cuda"):
        wanted = [CUDA, CPU] if asked.lower() == "cuda" else [CPU]
    elif isinstance(asked, list) and asked and all(isinstance(p, str) and p for p in asked):
        wanted = list(asked)
    else:
        raise InputError(
            f"invalid manifest {where}, providers: expected 'cpu', 'cuda' or a list of names, got {asked!r}"
        )
    available = ort.get_available_providers()
    if wanted[0] not in available:
        what = (
            "install onnxruntime-gpu and the CUDA libraries on this device"
            if wanted[0] == CUDA
            else f"install an onnxruntime build with {wanted[0]}"
        )
        raise InputError(
            f"{where}: the export asks for {wanted[0]}, which this onnxruntime {ort.__version__} lacks "
            f"(it has {available}): {what}, or pass --providers cpu"
        )
    return wanted


def create_session(
    model: bytes | str,
    providers: list[str],
    config: SessionConfig,
    *,
    strict: bool,
    external: dict[str, bytes] | None = None,
) -> ort.InferenceSession:
    """Create a session and check that the first requested provider is really in use.

    onnxruntime silently falls back to CPU when, for instance, the CUDA libraries fail to load;
    with ``strict`` that becomes an error instead of a slow surprise. ``external``: the contents of
    the external-data files a model given as bytes refers to (location -> bytes); onnxruntime copies
    what it needs while it builds the session and refuses a location missing from the table.

    Raises:
        RuntimeError: ``strict`` and the session is not running on ``providers[0]``.
    """
    options = config.to_ort()
    if external:
        if not hasattr(options, "add_external_initializers_from_files_in_memory"):
            raise InputError(
                f"onnxruntime {ort.__version__} cannot take a model's external-data file from memory: "
                "upgrade onnxruntime, or load by path (Executor(load_from='path'))"
            )
        names = list(external)
        options.add_external_initializers_from_files_in_memory(
            names, [external[n] for n in names], [len(external[n]) for n in names]
        )
    sess = ort.InferenceSession(model, sess_options=options, providers=providers)
    active = sess.get_providers()
    if strict and providers[0] not in active:
        raise RuntimeError(
            f"requested execution provider {providers[0]} is not active: onnxruntime fell back to {active} "
            "(check the CUDA/cuDNN libraries for onnxruntime-gpu, or pass providers='cpu')"
        )
    return sess


def run_bound(sess: ort.InferenceSession, feeds: dict[str, Any], output_names: list[str]) -> list[Any]:
    """Run a session with IO binding on CUDA; outputs stay on the device as OrtValues.

    Inputs may be numpy arrays (copied to the device once) or OrtValues already there (the
    previous stage's outputs), so activations do not go back to the host between stages.
    """
    binding = sess.io_binding()
    for name, value in feeds.items():
        if isinstance(value, ort.OrtValue):
            binding.bind_ortvalue_input(name, value)
        else:
            binding.bind_cpu_input(name, value)
    for name in output_names:
        binding.bind_output(name, "cuda")
    sess.run_with_iobinding(binding)
    return list(binding.get_outputs())


def evict_cached(path: Path, nbytes: int) -> bool:
    """Drop the first ``nbytes`` of a file from the page cache (``posix_fadvise(DONTNEED)``; Linux).

    Hashing a data file reads it whole, leaving it in the page cache, often as large folios; a
    fault on a memory-mapped page that is already cached maps its whole neighbourhood (up to a
    2 MiB folio on Linux 6.x with ext4), so an embedding lookup would bring in megabytes per token.
    Evicted, a fault reads only around the row it needs (measured: MiniLM's embedding stage at
    batch 8 x 62 tokens 7.7 MiB resident instead of 38.9 MiB). Only the leading region holding
    the Gather-only tables (``FileEntry.gathered``) is evicted: the GEMM weights, read whole by every
    run, stay cached. A page another process has mapped stays. Returns False where unsupported.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        advise(fd, 0, nbytes, os.POSIX_FADV_DONTNEED)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _check_file_locations(path: Path, entry: FileEntry) -> None:
    """``check_locations`` on a file without reading it into memory (a memory map: only the pages
    holding field headers are touched, never the weights)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            check_locations(b"", entry.data_location, entry.file)
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            mv = memoryview(view)
            try:
                check_locations(mv, entry.data_location, entry.file)
            finally:
                mv.release()


def open_session(
    root: str | os.PathLike[str],
    entry: FileEntry,
    providers: list[str],
    config: SessionConfig,
    *,
    strict: bool,
    load_from: str,
) -> tuple[ort.InferenceSession, Callable[[], None]]:
    """A session for one manifest entry, loaded only after every file it reads has been verified.

    The ONNX file may store tensors only in the data file its entry lists (``entry.data``; with
    none, it must be self-contained): any other ``location`` (another file, ``../..``) is refused
    before onnxruntime sees the model.

    - ``load_from="bytes"``: the ONNX file and its data file are read, hashed, and those very bytes
      are handed to onnxruntime (the data file through
      ``add_external_initializers_from_files_in_memory``), so what runs is what was hashed.
      onnxruntime copies the weights into its own tensors: about twice the entry's size at load,
      once after.
    - ``load_from="path"``: both files are hashed in chunks, onnxruntime opens them itself and
      memory-maps the data file (its tensors point into the mapped pages, read when a kernel
      touches them: an embedding table's ``Gather`` faults in only the rows it reads). Since the
      weights are read from the file while the session runs, the returned check (inode, size,
      mtime of both files, as hashed) must be called after every run; it is also run once here,
      after the load.

    Returns:
        (the session, a check raising InputError when a file changed since it was hashed; a no-op
        for "bytes").

    Raises:
        InputError: unsafe path, size or sha256 differ from the manifest, a location the entry
            does not list, or a file changed while it was being loaded.
        FileNotFoundError: a file is missing.
    """
    path = safe_path(root, entry.file)
    if entry.data is not None:  # onnxruntime reads a location beside the model file
        data_path = safe_path(root, entry.data.file)
        if data_path != path.parent / str(entry.data_location):
            raise InputError(
                f"{entry.data.file} resolves to {data_path}, not beside {entry.file} ({path.parent}): refusing it"
            )
    if load_from == "bytes":
        model = read_verified(root, entry)
        check_locations(model, entry.data_location, entry.file)
        external = None
        if entry.data is not None and entry.data_location is not None:
            external = {entry.data_location: read_verified(root, entry.data)}
        sess = create_session(model, providers, config, strict=strict, external=external)
        return sess, lambda: None
    path, before = verified_path(root, entry)
    _check_file_locations(path, entry)
    watched = [(entry.file, path, before)]
    if entry.data is not None:
        data_path, data_before = verified_path(root, entry.data)
        watched.append((entry.data.file, data_path, data_before))
        if entry.gathered:
            evict_cached(data_path, entry.gathered)

    def unchanged() -> None:
        for name, p, st in watched:
            if not same_file(p, st):
                raise InputError(f"{name} changed while it was loaded or running: refusing it")

    sess = create_session(str(path), providers, config, strict=strict)
    unchanged()
    return sess, unchanged
