"""Terminal output of `rlhf train`: a rich progress bar and the end-of-run summary table (on stderr)."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from toolkit.train.loop import Progress as StepProgress

# Logs (CI, `make train | tee`) are not terminals: rich would assume 80 columns and cut the step info.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


class ProgressBar:
    """Steps done / total with loss, lambda (damping), CG iterations and throughput; silent when disabled."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            self._bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(bar_width=16),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=console,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=None, info="")
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(et, ev, tb)

    def update(self, p: StepProgress) -> None:
        """Show one step's record."""
        if self._bar is None:
            return
        r = p.record
        parts = [f"loss {r['loss']:.4g}" if r.get("loss") == r.get("loss") else "loss skipped"]
        if "damping" in r:
            parts.append(f"λ {r['damping']:.3g}")
        if "cg_iters" in r:
            parts.append(f"CG {r['cg_iters']}")
        if "val_accuracy" in r:
            parts.append(f"val acc {r['val_accuracy']:.3f}")
        elif "val_loss" in r:
            parts.append(f"val {r['val_loss']:.4g}")
        parts.append(f"{r.get('examples_per_s', 0):,.0f} ex/s")
        self._bar.update(self._task, total=p.total, completed=p.step, info="  ".join(parts))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows of the summary table from a run summary (TrainResult dict + optional "export")."""
    rows: list[tuple[str, str]] = []
    test = summary.get("best_test") or summary.get("test") or {}
    if "accuracy" in test:
        rows.append(("test accuracy (torch)", f"{test['accuracy']:.4f}"))
    if "loss" in test:
        rows.append(("test loss (torch)", f"{test['loss']:.4g}"))
    exp = summary.get("export")
    if isinstance(exp, dict) and "error" not in exp:
        if "accuracy" in exp:
            rows.append(("test accuracy (onnxruntime)", f"{exp['accuracy']:.4f}"))
        if "max_abs_diff" in exp:
            rows.append(("max |torch - onnxruntime|", f"{exp['max_abs_diff']:.2e}"))
    dense, params = summary.get("dense_params"), summary.get("params")
    if params:
        ratio = f" ({dense / params:.1f}x fewer)" if dense else ""
        rows.append(("parameters dense / factorized", f"{dense:,} / {params:,}{ratio}"))
    if summary.get("ranks"):
        rows.append(("ranks", ", ".join(f"{k}={v}" for k, v in summary["ranks"].items())))
    rows.append(
        (
            "steps",
            f"{summary['steps']} of {summary['total_steps']} in {summary['seconds']:.1f} s ({summary['skipped_steps']} skipped)",
        )
    )
    if isinstance(exp, dict):
        if "error" in exp:
            rows.append(("export", exp["error"]))
        for f in exp.get("files", []):
            rows.append((f"stage file {f['name']}", _fmt_bytes(f["bytes"])))
    rows.append(("run directory", str(summary["run_dir"])))
    return rows


def print_summary(rows: list[tuple[str, str]]) -> None:
    """Print the one summary table."""
    table = Table(title="rlhf train", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
