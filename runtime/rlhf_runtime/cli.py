"""``rlhf-run``: the device command of rlhf-runtime (run, bench, generate, verify), no torch.

argparse (standard library), not click: the runtime's promise is "numpy + onnxruntime and nothing
else", and the command needs four subcommands with plain options, which argparse covers; one more
dependency on every device (and in every bundle) would buy nothing. The work itself is done by
``rlhf_runtime.commands`` and ``rlhf_runtime.bundle``, the same functions ``rlhf run`` / ``rlhf
bench`` call. Exit codes as ``rlhf``: 0 success; 2 bad input (one ``error:`` line per problem, no
traceback); 1 anything else (a bug: the traceback is printed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rlhf_runtime.errors import InputError

USER_ERRORS: tuple[type[BaseException], ...] = (
    InputError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def _parser() -> argparse.ArgumentParser:
    from rlhf_runtime import __version__

    p = argparse.ArgumentParser(
        prog="rlhf-run",
        description="Run rlhf exports with onnxruntime on a device (rlhf-runtime: numpy + onnxruntime, no torch).",
    )
    p.add_argument("--version", action="version", version=f"rlhf-run (rlhf-runtime) {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,bench,generate,verify}")

    r = sub.add_parser(
        "run", help="Run an export directory on an input file (or a text file); write the outputs."
    )
    r.add_argument("export_dir", type=Path, metavar="EXPORT")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", dest="input_path", type=Path, help=".npy (one input), .npz (named) or .csv")
    src.add_argument(
        "--text", dest="text_path", type=Path, help="text file, one text per line (exports with a tokenizer)"
    )
    r.add_argument(
        "-o",
        "--out",
        type=Path,
        default=None,
        help=".npy (one output) or .npz (required unless --text on a classifier)",
    )
    r.add_argument("--variant", default="fp32", help="fp32 or int8 (when exported); default fp32")
    r.add_argument("--fused", action="store_true", help="run fused.onnx instead of the stages")
    r.add_argument(
        "--providers", default="auto", help="auto, cpu, cuda or comma-separated names; default auto"
    )
    r.add_argument(
        "--memory-budget",
        type=int,
        default=None,
        help="bytes for one stage's weights (an embedding counts the rows a batch reads) plus the "
        "tensors crossing its cuts; stream stages when they do not all fit",
    )
    r.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = one per core); default 0")

    b = sub.add_parser(
        "bench", help="Latency, throughput and peak memory of an export (staged, fused, int8)."
    )
    b.add_argument("export_dir", type=Path, metavar="EXPORT")
    b.add_argument(
        "--batch", dest="batches", type=int, action="append", help="batch size (repeat); default 1 and 256"
    )
    b.add_argument("--threads", type=int, default=1, help="intra-op threads; default 1 (edge-style latency)")
    b.add_argument("--seconds", type=float, default=0.5, help="time per configuration and batch; default 0.5")
    b.add_argument("--json", dest="as_json", action="store_true", help="print JSON instead of a table")

    g = sub.add_parser(
        "generate", help="Continue a prompt with a causal language model export (key/value cache)."
    )
    g.add_argument("export_dir", type=Path, metavar="EXPORT")
    g.add_argument("--prompt", required=True, help="text to continue (byte-level models: any UTF-8 text)")
    g.add_argument("--max-tokens", type=int, default=128, help="tokens to generate; default 128")
    g.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0); default 1.0")
    g.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens only")
    g.add_argument("--seed", type=int, default=0, help="sampling seed; default 0")
    g.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = one per core); default 0")
    g.add_argument("--json", dest="as_json", action="store_true", help="print a JSON object (tokens, timing)")

    v = sub.add_parser(
        "verify", help="Check an unpacked bundle (checksums, wheels for this Python) or an export directory."
    )
    v.add_argument("path", type=Path, metavar="BUNDLE_DIR|EXPORT")
    return p


def _dispatch(args: argparse.Namespace) -> list[str]:
    if args.command == "run":
        from rlhf_runtime.commands import run_export

        return run_export(
            args.export_dir,
            input_path=args.input_path,
            text_path=args.text_path,
            out=args.out,
            variant=args.variant,
            fused=args.fused,
            providers=args.providers,
            memory_budget=args.memory_budget,
            threads=args.threads,
            prog="rlhf-run run",
            warn=lambda message: print(message, file=sys.stderr),
        )
    if args.command == "generate":
        from rlhf_runtime.commands import generate_lines

        return generate_lines(
            args.export_dir,
            args.prompt,
            args.max_tokens,
            greedy=args.greedy,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
            threads=args.threads,
            as_json=args.as_json,
        )
    if args.command == "bench":
        from rlhf_runtime.commands import bench_json, bench_rows, bench_table

        rows = bench_rows(args.export_dir, args.batches or [1, 256], args.threads, args.seconds)
        return [bench_json(rows, args.threads)] if args.as_json else bench_table(rows)
    from rlhf_runtime.bundle import SUMS_NAME, verify_bundle, verify_export

    if (args.path / SUMS_NAME).is_file():
        return [*verify_bundle(args.path), f"ok: {args.path}"]
    if (args.path / "manifest.json").is_file():
        return [*verify_export(args.path), f"ok: {args.path}"]
    raise InputError(
        f"{args.path}: expected an unpacked bundle (with {SUMS_NAME}) or an export directory (with manifest.json)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the exit code."""
    args = _parser().parse_args(argv)
    try:
        lines = _dispatch(args)
    except USER_ERRORS as exc:
        for line in str(exc).strip().splitlines() or [type(exc).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    return 0
