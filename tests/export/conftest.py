"""Fixtures: every graph in graphs/ built with build_model and exported once per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from export_helpers import real_sample

from toolkit.builder import build_model
from toolkit.export import export_model
from toolkit.spec import load_spec


@pytest.fixture(scope="session")
def graph_export(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """graph path -> (model, sample, export dir, manifest), exported lazily once per session."""
    cache: dict[Path, tuple[Any, dict[str, np.ndarray], Path, dict[str, Any]]] = {}

    def get(path: Path) -> tuple[Any, dict[str, np.ndarray], Path, dict[str, Any]]:
        if path not in cache:
            spec = load_spec(path)
            model = build_model(spec, seed=0).eval()
            sample = real_sample(spec)
            out = tmp_path_factory.mktemp(path.stem) / "export"
            manifest = export_model(model, out, sample=sample, external_data=True)  # data files checked too
            cache[path] = (model, sample, out, manifest)
        return cache[path]

    return get
