"""Factorize a dense checkpoint of a spec-built model into a new spec + checkpoint.

The dense StagedModel is loaded with ``toolkit.checkpoint.load_model``; ``factorize_module`` replaces
its node layers in place (module names ``stages.<k>.<node id>``); ``model.to_spec()`` then writes
``factorize: {rank: r}`` on the factorized nodes and ``none`` on the others, so the saved spec rebuilds
exactly these shapes and ``load_model`` on the output gives the factorized model back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.factorize.core import factorize_module
from toolkit.factorize.report import FactorizeReport


def node_pattern(nodes: Iterable[str] | None) -> str | None:
    """Regex selecting the given node ids inside a StagedModel (None: every node)."""
    if nodes is None:
        return None
    import re

    ids = list(nodes)
    return r"^stages\.\d+\.(" + "|".join(re.escape(n) for n in ids) + r")$"


def factorize_checkpoint(
    source: str | Path,
    out_dir: str | Path,
    *,
    calibration: Iterable[Any] | None = None,
    include: str | None = None,
    tune: Callable[[nn.Module], None] | None = None,
    **options: Any,
) -> tuple[nn.Module, FactorizeReport, Path]:
    """Load a (dense) spec checkpoint, factorize it, save the new spec + checkpoint under ``out_dir``.

    Args:
        source: run directory, checkpoint directory or model.safetensors (toolkit.checkpoint.load_model).
        out_dir: run directory to write (``out_dir/checkpoints/best-00000000`` + ``spec.json`` + ``factorize.json``).
        calibration: batches for ``model(*batch)`` (tuples of tensors) or None.
        include: regex on module names ``stages.<k>.<node id>`` (see ``node_pattern``).
        tune: called on the factorized model before it is saved (e.g. distillation against the
            dense model, ``toolkit.factorize.spec_text.distill_spec``).
        options: rank rule and method options of factorize_module.

    Returns:
        (factorized model, report, checkpoint directory).
    """
    from toolkit.checkpoint import CKPT_DIR, load_model, save_checkpoint

    model, _spec, meta = load_model(source)
    report = factorize_module(model, include=include, calibration=calibration, **options)
    if tune is not None:
        tune(model)
    new_spec = model.to_spec().resolved()
    out = Path(out_dir)
    ckpt = save_checkpoint(
        out / CKPT_DIR,
        "best-00000000",
        model,
        new_spec,
        {
            **{k: v for k, v in meta.items() if k in ("seed", "loss", "data", "text")},
            "dense": False,
            "factorized_from": str(source),
        },
        {},
    )
    _atomic_text(out / "spec.json", _json(new_spec))
    _atomic_text(out / "factorize.json", report.to_json())
    return model, report, ckpt


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2)


def _atomic_text(path: Path, text: str) -> None:
    from toolkit.fsio import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode())


def data_batches(
    inputs: dict[str, Any], names: list[str], batch_size: int = 256, limit: int = 1024
) -> list[tuple[torch.Tensor, ...]]:
    """Calibration batches (tuples in the model's input order) from a split's ``inputs`` dict of arrays."""
    n = min(limit, len(next(iter(inputs.values()))))
    return [
        tuple(torch.as_tensor(inputs[k][i : i + batch_size]) for k in names) for i in range(0, n, batch_size)
    ]
