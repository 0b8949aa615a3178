"""Tiny specs for training tests (a 64-16-10 MLP on digits, one factorized layer, two stages)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def tiny_spec(train: dict[str, Any] | None = None) -> dict[str, Any]:
    """A small spec dict; ``train`` entries override the defaults below."""
    base: dict[str, Any] = {
        "data": {"builtin": "digits", "limit": 600},
        "loss": "cross_entropy",
        "batch_size": 64,
        "max_steps": 12,
        "checkpoint_every": 4,
        "optimizer": {"name": "adam", "lr": 0.01},
    }
    base.update(train or {})
    return {
        "name": "tiny",
        "inputs": {"x": {"shape": [64]}},
        "nodes": [
            {"id": "fc1", "op": "linear", "in": "x", "out": 16, "factorize": {"rank": 4}},
            {"id": "act1", "op": "relu", "in": "fc1"},
            {"id": "head", "op": "linear", "in": "act1", "out": 10, "factorize": "none"},
        ],
        "outputs": ["head"],
        "stages": [["fc1", "act1"], ["head"]],
        "train": base,
    }


@pytest.fixture
def write_spec(tmp_path: Path) -> Any:
    """write_spec(train_overrides, name) -> path of a YAML spec in tmp_path."""

    def write(train: dict[str, Any] | None = None, name: str = "spec.yaml") -> Path:
        p = tmp_path / name
        p.write_text(yaml.safe_dump(tiny_spec(train), sort_keys=False))
        return p

    return write
