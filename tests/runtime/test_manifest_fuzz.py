"""Fuzz the manifest reader and the executor's checks: generated JSON and mutations of a real
manifest never end in anything but InputError (or FileNotFoundError for a file the manifest names
that is not there), each example in bounded time.

Derandomized and bounded (a few seconds in all), so it runs in the default test run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolkit.errors import InputError
from toolkit.runtime import Executor
from toolkit.runtime.bench import random_inputs
from toolkit.runtime.manifest import parse_manifest, parse_manifest_bytes

Fixture = tuple[Path, Any, dict[str, np.ndarray]]
FUZZ = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
KEYS = "format version name opset inputs outputs stages fused files fp32 int8 file sha256 bytes shape dtype"
keys = st.sampled_from([*KEYS.split(), "index", "parameters", "source", "x", "act1", "head"])


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys / indices) to a value inside ``doc``."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(doc: Any, data: st.DataObject) -> Any:
    """One to three structural mutations: replace a value, delete a key, duplicate a list item."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(doc)))
        if not path:
            return data.draw(json_values)
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        last = path[-1]
        action = data.draw(st.sampled_from(["replace", "delete", "duplicate", "number", "rename"]))
        if action == "replace":
            parent[last] = data.draw(json_values)
        elif action == "number":
            parent[last] = data.draw(st.sampled_from([0, -1, 1, 2, 3, 10**12, 2**63, None, True, 1.5, "1"]))
        elif action == "rename" and isinstance(parent, dict):
            parent[data.draw(keys)] = parent.pop(last)
        elif action == "delete":
            if isinstance(parent, dict):
                del parent[last]
            else:
                parent.pop(last)
        elif action == "duplicate" and isinstance(parent, list):
            parent.insert(int(last), copy.deepcopy(parent[last]))
    return doc


def _check_bounded(fn: Any) -> None:
    t0 = time.perf_counter()
    with contextlib.suppress(InputError, FileNotFoundError):
        fn()
    assert time.perf_counter() - t0 < 2.0


@settings(FUZZ, max_examples=300)
@given(doc=json_values)
def test_generated_documents(doc: Any) -> None:
    _check_bounded(lambda: parse_manifest(doc))
    _check_bounded(lambda: parse_manifest({"format": "rlhf-export", "version": 1, "stages": doc}))


@settings(FUZZ, max_examples=300)
@given(raw=st.binary(max_size=200))
def test_generated_bytes(raw: bytes) -> None:
    _check_bounded(lambda: parse_manifest_bytes(raw))


def test_deep_nesting_is_an_input_error() -> None:
    with pytest.raises(InputError, match=r"nested too deeply|expected"):
        parse_manifest_bytes(b"[" * 100_000 + b"]" * 100_000)


@pytest.fixture(scope="module")
def real_manifest(default_export: Fixture) -> dict[str, Any]:
    return json.loads((default_export[0] / "manifest.json").read_text())


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_mutated_real_manifest(real_manifest: dict[str, Any], data: st.DataObject) -> None:
    _check_bounded(lambda: parse_manifest(_mutate(real_manifest, data)))


@pytest.fixture(scope="module")
def fuzz_dir(default_export: Fixture, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the export whose manifest each example rewrites (the ONNX files stay intact)."""
    work = tmp_path_factory.mktemp("fuzz") / "export"
    shutil.copytree(default_export[0], work)
    return work


OUTCOMES: dict[str, int] = {}


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_mutated_manifest_through_the_executor(
    fuzz_dir: Path, real_manifest: dict[str, Any], data: st.DataObject
) -> None:
    """Mutations that keep the file hashes (the attacker rewrote the manifest only) reach the
    executor: it loads, compares with the ONNX files and runs, or refuses with InputError."""
    if data.draw(st.booleans()):
        text = json.dumps(_mutate(real_manifest, data))
    else:
        text = _byte_mutation(json.dumps(real_manifest), data)
    (fuzz_dir / "manifest.json").write_text(text)

    def run() -> None:
        ex = Executor(fuzz_dir, providers="cpu")
        result = ex.run(random_inputs(ex.input_infos, 3))
        assert set(result) == set(ex.output_names)
        OUTCOMES["ran"] = OUTCOMES.get("ran", 0) + 1

    _check_bounded(run)


def test_some_mutations_ran(fuzz_dir: Path) -> None:
    """The executor fuzz reached onnxruntime, not only the reader (runs after it, same module)."""
    assert OUTCOMES.get("ran", 0) > 0


def _byte_mutation(text: str, data: st.DataObject) -> str:
    pos = data.draw(st.integers(0, len(text) - 1))
    return text[:pos] + data.draw(st.text(max_size=3)) + text[pos + data.draw(st.integers(0, 3)) :]
