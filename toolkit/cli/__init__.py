"""The `rlhf` command line.

Each command lives in a small module of this package and is imported only when it runs, so
`rlhf --help` stays fast and a command that needs torch does not slow down one that does not.
Exit codes: 0 success; 2 the user's input is wrong (toolkit.errors.InputError, which SpecError is,
a missing / unreadable path, a bad option): one line per problem on stderr; 1 anything else, which is
a bug in the toolkit: a short "internal error" line, the full traceback written to a file whose path
is printed (``RLHF_TRACEBACK=print`` prints it to stderr instead).
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import traceback
from typing import Any

import click

from toolkit.errors import InputError

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
    "generate": (
        "toolkit.cli.generate_cmd",
        "generate",
        "Continue a prompt with a causal language model export (key/value cache, no torch).",
    ),
    "bench": (
        "toolkit.cli.deploy_cmds",
        "bench",
        "Latency, throughput and memory of an export (staged, fused, int8).",
    ),
    "bundle": (
        "toolkit.cli.deploy_cmds",
        "bundle",
        "Write an offline bundle of an export: files, runtime wheels, README, SHA256SUMS.",
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
    "profile": (
        "toolkit.cli.plan_cmds",
        "profile",
        "Per-node latency, weight and activation bytes of a spec or export (onnxruntime).",
    ),
    "plan": (
        "toolkit.cli.plan_cmds",
        "plan",
        "Place a model's stages on a set of devices (throughput or latency), write a placement.",
    ),
    "serve": (
        "toolkit.cli.serve_cmd",
        "serve",
        "Run an export as a pipeline of Ray actors placed by a placement file.",
    ),
}

# Exceptions that mean "the user gave us something wrong": one line, exit 2, no traceback. Only
# errors raised on purpose about the input qualify; a stray ValueError / TypeError / KeyError is a bug.
USER_ERRORS: tuple[type[BaseException], ...] = (
    InputError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def report_internal_error(exc: BaseException) -> str:
    """Keep the traceback of an unexpected exception and say where it is.

    Writes the traceback to a file in the temporary directory (or, with ``RLHF_TRACEBACK=print``, to
    stderr) and returns the one-line message shown to the user.
    """
    text = "".join(traceback.format_exception(exc))
    summary = f"{type(exc).__name__}: {exc}".strip().splitlines()[0] if str(exc) else type(exc).__name__
    if os.environ.get("RLHF_TRACEBACK", "").lower() == "print":
        click.echo(text, err=True, nl=False)
        where = "traceback above"
    else:
        try:
            fd, path = tempfile.mkstemp(prefix="rlhf-traceback-", suffix=".txt")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            where = f"traceback in {path}"
        except OSError:
            click.echo(text, err=True, nl=False)
            where = "traceback above"
    return f"internal error: {summary} — please report this bug; {where}"


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
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own usage errors (exit 2) and exits
        except USER_ERRORS as exc:
            for line in str(exc).strip().splitlines() or [type(exc).__name__]:
                click.echo(f"error: {line}", err=True)
            ctx.exit(2)
        except Exception as exc:  # a bug: keep the traceback, exit 1
            click.echo(report_internal_error(exc), err=True)
            ctx.exit(1)


def _limit_options(f: Any) -> Any:
    """One option per ceiling of toolkit.spec.limits; a given value is exported to its environment
    variable, so the library (and any worker process) sees it."""
    from toolkit.limits import LIMITS

    for name, (env, default) in reversed(LIMITS.items()):
        f = click.option(
            f"--{name.replace('_', '-')}",
            name,
            type=click.IntRange(min=1),
            default=None,
            metavar="N",
            help=f"Ceiling {name} (default {default:,}; env {env}).",
        )(f)
    return f


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rlhf-toolkit", prog_name="rlhf")
@_limit_options
def main(**ceilings: int | None) -> None:
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
      rlhf bundle export/ -o export.tar.gz  offline bundle for a device (runs there with rlhf-run)
    """
    from toolkit.limits import LIMITS

    given = {LIMITS[name][0]: str(value) for name, value in ceilings.items() if value is not None}
    if given:  # for this command only: restored when it ends (tests call main() in one process)
        before = {env: os.environ.get(env) for env in given}
        os.environ.update(given)

        def restore() -> None:
            for env, old in before.items():
                if old is None:
                    os.environ.pop(env, None)
                else:
                    os.environ[env] = old

        click.get_current_context().call_on_close(restore)
