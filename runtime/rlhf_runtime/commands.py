"""What ``rlhf run`` / ``rlhf bench`` and the device command ``rlhf-run`` do, once, for both.

The toolkit's click commands and ``rlhf_runtime.cli`` (argparse) parse their options and call these
functions; each returns the lines to print, and raises ``InputError`` for bad input (exit 2 in
both command lines). numpy + onnxruntime + stdlib (``tokenizers`` for ``--text``), never torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_runtime.errors import InputError
from rlhf_runtime.manifest import TensorInfo


def _np_load(path: Path, kind: str) -> Any:
    import zipfile  # only for its error type (numpy imports it for .npz anyway)

    try:
        return np.load(path, allow_pickle=False)  # never unpickles
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: expected a readable {kind} file (no pickles), got: {exc}") from None


def load_input_file(path: Path) -> dict[str, np.ndarray] | np.ndarray:
    """A .npz file as name -> array, or a .npy file as one array (never unpickles)."""
    if path.suffix.lower() == ".npz":
        z = _np_load(path, ".npz")
        if not hasattr(z, "files"):
            raise InputError(f"{path}: expected a .npz archive of named arrays, got one array")
        import zipfile

        with z:
            try:
                return {k: z[k] for k in z.files}
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                raise InputError(f"{path}: expected a readable .npz file (no pickles), got: {exc}") from None
    arr = _np_load(path, ".npy")
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{path}: expected one array (.npy), got an archive of several")
    return arr


def read_input(path: Path, infos: Sequence[TensorInfo]) -> dict[str, np.ndarray]:
    """A .npy (single-input model), .npz (names) or .csv (single input, one example per row) file."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        loaded = load_input_file(path)
        assert isinstance(loaded, dict)
        arrays = loaded
    elif suffix in (".npy", ".csv"):
        if len(infos) != 1:
            names = [t.name for t in infos]
            raise InputError(
                f"--input {path}: the model has inputs {names}: expected a .npz file with those names"
            )
        if suffix == ".npy":
            arr = load_input_file(path)
            assert isinstance(arr, np.ndarray)
        else:
            try:
                arr = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
            except ValueError as exc:
                raise InputError(f"--input {path}: expected a CSV of numbers, got: {exc}") from None
            fixed = [d for d in infos[0].shape[1:] if d is not None]
            if arr.shape[1] == int(np.prod(fixed)):
                arr = arr.reshape(arr.shape[0], *fixed)
        arrays = {infos[0].name: arr}
    else:
        raise InputError(
            f"--input {path}: expected a .npy, .npz or .csv file, got {suffix or 'no extension'}"
        )
    for t in infos:
        if t.name in arrays:
            a = arrays[t.name]
            if not np.can_cast(a.dtype, t.dtype, casting="same_kind"):
                raise InputError(
                    f"--input {path}: input {t.name!r}: expected {t.dtype} values, got {a.dtype}"
                )
            arrays[t.name] = a.astype(t.dtype, copy=False)
    return arrays


def parse_providers(providers: str) -> str | list[str]:
    """``auto``, ``cpu``, ``cuda`` as they are; anything else a comma-separated list of names."""
    return providers if providers in ("auto", "cpu", "cuda") else providers.split(",")


def run_export(
    export_dir: Path,
    *,
    input_path: Path | None = None,
    text_path: Path | None = None,
    out: Path | None = None,
    variant: str = "fp32",
    fused: bool = False,
    providers: str = "auto",
    memory_budget: int | None = None,
    threads: int = 0,
    prog: str = "run",
    warn: Callable[[str], None] | None = None,
) -> list[str]:
    """Run an export on an input file (or a text file), write the outputs; the lines to print.

    With ``text_path``, texts are tokenized with the export's tokenizer.json (manifest key
    "text") and truncated at its ``max_length``, the count of truncated texts passed to ``warn``
    (stderr: stdout stays one JSON line per text); a classifier (manifest key "labels") without
    ``out`` gives one JSON line per text with its label and scores. Token ids outside the
    vocabulary or sequences longer than the model's context are refused (InputError).
    """
    from rlhf_runtime.executor import Executor
    from rlhf_runtime.session import SessionConfig

    if (input_path is None) == (text_path is None):
        raise InputError(f"{prog}: expected exactly one of --input FILE or --text FILE")
    config = SessionConfig(intra_op_threads=threads)
    if text_path is not None:
        from rlhf_runtime import text as rt

        texts = rt.read_lines(text_path)
        ex0 = Executor(export_dir, providers="cpu", variant=variant, fused=fused, session_options=config)
        text_entry = ex0.manifest.raw.get("text")
        cap = text_entry.get("max_length") if isinstance(text_entry, dict) else None

        def report(n: int) -> None:
            if n and warn is not None:
                warn(f"{n} of {len(texts)} texts were longer than {cap} tokens and were truncated")

        if "labels" in ex0.manifest.raw and out is None:
            rows, truncated = rt.classify_texts_counted(export_dir, texts, threads, executor=ex0)
            report(truncated)
            return [rt.dumps(rows)]
        if out is None:
            raise InputError(f"{prog} --text: the export has no labels: expected -o OUT.npz for its outputs")
        outputs_t, truncated = rt.run_texts(ex0, export_dir, texts)
        report(truncated)
        np.savez(out, **outputs_t)  # type: ignore[arg-type]
        return [f"wrote {out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in outputs_t.items())]
    if out is None or input_path is None:
        raise InputError(f"{prog} --input: expected -o OUT (.npy or .npz)")
    suffix = out.suffix.lower()
    if suffix not in (".npz", ".npy"):
        raise InputError(f"-o {out}: expected a .npy or .npz path, got {suffix or 'no extension'}")
    ex = Executor(
        export_dir,
        providers=parse_providers(providers),
        memory_budget=memory_budget,
        session_options=config,
        variant=variant,
        fused=fused,
    )
    outputs = ex.run(read_input(input_path, ex.input_infos))
    if suffix == ".npz":
        np.savez(out, **outputs)  # type: ignore[arg-type]
    else:
        if len(outputs) != 1:
            raise InputError(f"-o {out}: the model has outputs {list(outputs)}: expected a .npz path")
        np.save(out, next(iter(outputs.values())))
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in outputs.items())
    return [f"wrote {out}: {shapes} ({ex.mode}, {ex.providers[0]})"]


def generate_lines(
    export_dir: Path,
    prompt: str,
    max_tokens: int,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    threads: int = 0,
    as_json: bool = False,
) -> list[str]:
    """Continue ``prompt`` with a causal-LM export (``rlhf generate`` and ``rlhf-run generate``).

    Returns the lines to print: the prompt and its continuation, or one JSON object (prompt, text,
    tokens, window slides, seconds, tokens per second) with ``as_json``.

    Raises:
        InputError: bad options, an export without a ``causal_lm`` entry, a prompt past the context.
    """
    from rlhf_runtime.generate import check_options, generate

    check_options(max_tokens, temperature, top_k, greedy)
    out = generate(
        export_dir,
        prompt,
        max_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        greedy=greedy,
        threads=threads or None,
    )
    if not as_json:
        return [prompt + out.text]
    doc = {
        "prompt": prompt,
        "text": out.text,
        "tokens": out.tokens,
        "slides": out.slides,
        "seconds": out.seconds,
        "tokens_per_second": len(out.tokens) / out.seconds if out.seconds > 0 else None,
    }
    return [json.dumps(doc)]


BENCH_COLUMNS = ("config", "batch", "p50 ms", "p90 ms", "p99 ms", "samples/s", "peak RSS MiB")


def bench_rows(
    export_dir: Path,
    batches: Sequence[int],
    threads: int,
    seconds: float,
    extra: dict[str, Callable[[dict[str, np.ndarray]], object]] | None = None,
) -> list[dict[str, object]]:
    """``bench_export`` on CPU after checking the options (what both bench commands time)."""
    from rlhf_runtime.bench import bench_export

    if any(b < 1 for b in batches):
        raise InputError(f"--batch: expected positive batch sizes, got {list(batches)}")
    if seconds <= 0:
        raise InputError(f"--seconds: expected a positive time, got {seconds}")
    return bench_export(
        export_dir, tuple(batches), threads=threads, providers="cpu", extra=extra, min_seconds=seconds
    )


def bench_cells(row: dict[str, Any]) -> list[str]:
    """One row of the bench table as strings, in ``BENCH_COLUMNS`` order."""
    return [
        str(row["config"]),
        str(row["batch"]),
        f"{row['p50_ms']:.3f}",
        f"{row['p90_ms']:.3f}",
        f"{row['p99_ms']:.3f}",
        f"{row['throughput']:.0f}",
        f"{int(row['peak_rss_bytes']) / 2**20:.1f}",
    ]


def bench_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The bench rows as a plain-text table (the device has no ``rich``)."""
    cells = [list(BENCH_COLUMNS), *[bench_cells(r) for r in rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(len(BENCH_COLUMNS))]
    lines = []
    for k, c in enumerate(cells):
        lines.append(
            "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths)))
        )
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def bench_json(rows: Sequence[dict[str, Any]], threads: int) -> str:
    return json.dumps({"threads": threads, "rows": list(rows)}, indent=2)
