"""Metrics of a run: evaluation on a split, effective ranks, and the JSONL + CSV log."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.data import Split
from toolkit.fsio import atomic_write_bytes
from toolkit.train.losses import LossFn, correct_count, has_accuracy


def to_tensors(
    split: Split, idx: np.ndarray | slice, names: Sequence[str], device: torch.device, dtype: torch.dtype
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The inputs (in ``names`` order) and targets of examples ``idx`` as tensors on ``device``."""

    def conv(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

    return tuple(conv(split.inputs[n][idx]) for n in names), conv(split.targets[idx])


@torch.no_grad()
def evaluate(
    model: Callable[..., Any],
    split: Split,
    names: Sequence[str],
    loss_name: str,
    loss_fn: LossFn,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Mean loss (and accuracy for classification losses) over a whole split.

    Returns:
        {"loss": ..., "accuracy": ...} (accuracy only where it applies); {} for an empty split.
    """
    n = len(split)
    if n == 0:
        return {}
    total, correct = 0.0, 0
    for start in range(0, n, batch_size):
        sl = slice(start, min(n, start + batch_size))
        x, y = to_tensors(split, sl, names, device, dtype)
        out = model(*x)
        total += float(loss_fn(out, y)) * (sl.stop - sl.start)
        if has_accuracy(loss_name):
            correct += correct_count(loss_name, out, y)
    res = {"loss": total / n}
    if has_accuracy(loss_name):
        res["accuracy"] = correct / n
    return res


def effective_rank(weight: torch.Tensor, energy: float = 0.99) -> int:
    """Smallest k whose top-k singular values keep ``energy`` of Σσ² of ``weight`` viewed as (out, -1)."""
    s = torch.linalg.svdvals(weight.detach().double().reshape(weight.shape[0], -1))
    e = torch.cumsum(s.pow(2), 0)
    if float(e[-1]) == 0.0:
        return 0
    return int(torch.searchsorted(e / e[-1], torch.tensor([energy], dtype=e.dtype)).item()) + 1


def rank_metrics(layers: Mapping[str, Any], with_effective: bool) -> dict[str, int]:
    """``rank/<id>`` (allocated rank) and, when asked, ``eff_rank/<id>`` (99%-energy rank of U·V) per layer."""
    out: dict[str, int] = {}
    for name, layer in layers.items():
        out[f"rank/{name}"] = int(layer.rank)
        if with_effective:
            out[f"eff_rank/{name}"] = effective_rank(layer.dense_weight())
    return out


class MetricsLog:
    """Append-only JSONL log of records (one per step), mirrored to CSV on ``flush_csv``.

    ``truncate(step)`` drops records at or after ``step`` (used on resume, so the log matches the
    checkpoint exactly).
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        self.csv = Path(run_dir) / "metrics.csv"
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        if enabled and self.jsonl.exists():
            for line in self.jsonl.read_text().splitlines():
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill: drop it
                    break

    def truncate(self, step: int) -> None:
        """Keep only records with ``step`` < the given step and rewrite the file."""
        self.records = [r for r in self.records if int(r.get("step", -1)) < step]
        if self.enabled:
            atomic_write_bytes(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.records).encode())

    def append(self, record: dict[str, Any]) -> None:
        """Add a record (flushed to the JSONL file at once)."""
        self.records.append(record)
        if self.enabled:
            with self.jsonl.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def flush_csv(self) -> None:
        """Rewrite metrics.csv from all records (columns = union of keys, in first-seen order)."""
        if not self.enabled:
            return
        cols: list[str] = []
        for r in self.records:
            cols += [k for k in r if k not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        w.writerows(self.records)
        atomic_write_bytes(self.csv, buf.getvalue().encode())
