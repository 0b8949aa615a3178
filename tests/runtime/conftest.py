"""Fixture: graphs/default.yaml built with build_model, exported once per session (read-only)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

DEFAULT = Path(__file__).resolve().parents[2] / "graphs" / "default.yaml"


@pytest.fixture(scope="session")
def default_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, dict[str, np.ndarray]]:
    """(export dir, torch model, real digits test samples) — do not modify the directory."""
    from toolkit.builder import build_model
    from toolkit.data import load_data
    from toolkit.export import export_model
    from toolkit.spec import load_spec

    spec = load_spec(DEFAULT)
    model = build_model(spec, seed=0).eval()
    splits = load_data(spec.train.data, spec.inputs)
    sample = {k: v[:40] for k, v in splits.test.inputs.items()}
    out = tmp_path_factory.mktemp("default") / "export"
    export_model(model, out, sample=sample, external_data=True)  # the data-file checks run on it
    return out, model, sample


@pytest.fixture
def export_copy(default_export: tuple[Path, Any, dict[str, np.ndarray]], tmp_path: Path) -> Path:
    """A private copy of the default export, free to tamper with."""
    dst = tmp_path / "export"
    shutil.copytree(default_export[0], dst)
    return dst
