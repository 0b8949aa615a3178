"""The `rlhf` command line.

Each command lives in a small module of this package and is imported only when it runs, so
`rlhf --help` stays fast and a command that needs torch does not slow down one that does not.
User errors (bad specs, missing files, wrong shapes) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

# command name -> (module, attribute, one-line help shown by `rlhf --help` without importing it)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "validate": (
        "toolkit.cli.spec_cmds",
        "validate",
        "Check graph specs; report every problem with file, field and line.",
    ),
    "schema": ("toolkit.cli.spec_cmds", "schema", "Print the JSON Schema of graph specs."),
    "show": (
        "toolkit.cli.spec_cmds",
        "show",
        "Table of nodes, shapes, parameters and multiply-adds, per stage.",
    ),
    "graph": (
        "toolkit.cli.spec_cmds",
        "graph",
        "Draw a spec as Mermaid or Graphviz dot, stages as clusters.",
    ),
    "train": (
        "toolkit.cli.train_cmd",
        "train",
        "Train a spec (Hessian-free by default) into a run directory.",
    ),
    "export": (
        "toolkit.cli.deploy_cmds",
        "export",
        "Export a trained model to one ONNX file per stage + manifest.",
    ),
    "run": ("toolkit.cli.deploy_cmds", "run", "Run an export directory with onnxruntime on an input file."),
    "bench": (
        "toolkit.cli.deploy_cmds",
        "bench",
        "Latency, throughput and memory of an export (staged, fused, int8).",
    ),
    "factorize": (
        "toolkit.cli.factorize_cmd",
        "factorize",
        "Factorize a dense model (checkpoint or Hugging Face) by SVD.",
    ),
    "import": (
        "toolkit.cli.import_cmd",
        "import_",
        "Import a Hugging Face BERT-family model directory as a spec + checkpoint.",
    ),
    "classify": (
        "toolkit.cli.classify_cmd",
        "classify",
        "Fine-tune a text classifier (Hessian-free) on a Hugging Face encoder from a text,label CSV.",
    ),
}

# Exceptions that mean "the user gave us something wrong": one line, exit 2, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    KeyError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
)


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command is invoked."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attr, help_text = COMMANDS[cmd_name]
        # `rlhf --help` only needs the short help: avoid importing torch for it.
        if ctx.resilient_parsing or (ctx.invoked_subcommand is None and "--help" in sys.argv[1:2]):
            return click.Command(cmd_name, help=help_text, short_help=help_text)
        command: click.Command = getattr(importlib.import_module(module), attr)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            for line in message.strip().splitlines() or [type(exc).__name__]:
                click.echo(f"error: {line}", err=True)
            ctx.exit(2)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rlhf-toolkit", prog_name="rlhf")
def main() -> None:
    """rlhf — shrink neural networks and ship them to small devices.

    RLHF here means Reduced Large-scale Hidden Factorization + Regularized Learning with
    Hessian-Free optimization (nothing to do with RL from human feedback).

    \b
    Typical path:
      rlhf validate graphs/default.yaml     check a spec
      rlhf show graphs/default.yaml         parameters and multiply-adds per node and stage
      rlhf train graphs/default.yaml        train it (Hessian-free) into runs/<name>
      rlhf export runs/<name> -o export/    one ONNX file per stage + manifest.json
      rlhf run export/ --input x.npy -o y.npy
      rlhf bench export/
    """
