"""Fuzz the factorize.json reader: generated documents and mutations of a real report, checked
against a model on the ``meta`` device; nothing but InputError, each example in bounded time.
Derandomized and bounded, so it runs in the default test run."""

from __future__ import annotations

import contextlib
import copy
import json
import time
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from toolkit.errors import InputError
from toolkit.factorize import factorize_module
from toolkit.factorize.report_file import parse_report_bytes, planned_layers

FUZZ = settings(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.fc1 = nn.Linear(12, 16)
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.LayerNorm(16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def _real_report() -> dict[str, Any]:
    torch.manual_seed(0)
    model = Tiny()
    return json.loads(factorize_module(model, rank=2).to_json())


REPORT = _real_report()
with torch.device("meta"):
    META = Tiny()

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=10),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=20,
)
names = st.sampled_from(["emb", "fc1", "conv", "norm", "block", "block.0", "block.1", "block.2", "", "x.y"])


def _mutate(doc: Any, data: st.DataObject) -> Any:
    doc = copy.deepcopy(doc)
    layers = doc["layers"]
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(layers) - 1)) if layers else 0
        action = data.draw(st.sampled_from(["rank", "shape", "name", "drop", "dup", "field", "value"]))
        if not layers:
            layers.append(data.draw(json_values))
            continue
        if not isinstance(layers[i], dict):
            layers[i] = {}
        if action == "rank":
            layers[i]["rank"] = data.draw(st.integers(-5, 10**9) | st.sampled_from([True, 2.5, "3", None]))
        elif action == "shape":
            layers[i]["shape"] = data.draw(st.lists(st.integers(-3, 10**9), max_size=3) | json_values)
        elif action == "name":
            layers[i]["name"] = data.draw(names | st.text(max_size=6))
        elif action == "drop":
            layers[i].pop(data.draw(st.sampled_from(["name", "rank", "shape"])), None)
        elif action == "dup":
            layers.append(copy.deepcopy(layers[i]))
        elif action == "field":
            doc["layers"] = data.draw(json_values)
            return doc
        else:
            layers[i] = data.draw(json_values)
    return doc


def _bounded(fn: Any) -> None:
    t0 = time.perf_counter()
    with contextlib.suppress(InputError):
        fn()
    assert time.perf_counter() - t0 < 2.0


def test_the_real_report_plans_every_layer() -> None:
    planned = planned_layers(REPORT, META)
    assert {p.name for p in planned} == {"emb", "fc1", "conv", "block.0", "block.2"}
    assert {p.name: p.shape for p in planned}["conv"] == (8, 27)


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_mutated_reports(data: st.DataObject) -> None:
    doc = _mutate(REPORT, data)

    def check() -> None:
        for layer in planned_layers(doc, META):  # whatever passes fits the model it names
            own = dict(META.named_modules())[layer.name]
            assert (
                1 <= layer.rank <= min(layer.shape) and layer.shape[0] * layer.shape[1] <= own.weight.numel()
            )

    _bounded(check)


@settings(FUZZ, max_examples=200)
@given(doc=json_values, raw=st.binary(max_size=100))
def test_generated_documents_and_bytes(doc: Any, raw: bytes) -> None:
    _bounded(lambda: planned_layers(doc, META))
    _bounded(lambda: planned_layers({"layers": [doc]}, META))
    _bounded(lambda: parse_report_bytes(raw))
