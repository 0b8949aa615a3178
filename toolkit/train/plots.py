"""PNG plots of a run (matplotlib, Agg backend): train/val loss and the ranks of factorized layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None and r[key] == r[key]]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(records: list[dict[str, Any]], run_dir: str | Path) -> list[Path]:
    """Write loss.png (train and val loss per step) and ranks.png (rank and effective rank per layer).

    Args:
        records: the metrics records (each with "step").
        run_dir: where to write.

    Returns:
        The files written.
    """
    out: list[Path] = []
    root = Path(run_dir)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "train"), ("val_loss", "val")):
        xs, ys = _series(records, key)
        if xs:
            ax.plot(xs, ys, marker="." if key == "val_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(root / "loss.png", dpi=100)
    plt.close(fig)
    out.append(root / "loss.png")
    layers = sorted({k.split("/", 1)[1] for r in records for k in r if k.startswith("rank/")})
    if layers:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in layers:
            xs, ys = _series(records, f"rank/{name}")
            (line,) = ax.plot(xs, ys, label=f"{name} rank")
            xs, ys = _series(records, f"eff_rank/{name}")
            if xs:
                ax.plot(
                    xs,
                    ys,
                    linestyle="--",
                    marker=".",
                    color=line.get_color(),
                    label=f"{name} effective (99% energy)",
                )
        ax.set_xlabel("step")
        ax.set_ylabel("rank")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(root / "ranks.png", dpi=100)
        plt.close(fig)
        out.append(root / "ranks.png")
    return out
