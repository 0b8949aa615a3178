"""Fuzz the spec loader: thousands of mutated and generated specs, each ending in a GraphSpec or an
InputError (SpecError is one), within a time and memory bound; never another exception.

Seeds are the shipped graphs/*.yaml and the malformed corpus in tests/spec/malformed; mutations flip,
delete, duplicate and insert bytes, splice in alias bombs, self-containing aliases, deep nesting,
huge numbers and values of the wrong type. Generated specs put arbitrary JSON-like values at
arbitrary places of a valid spec and go through ``parse_spec`` and, dumped as YAML / JSON, through
``load_spec``. derandomize=True: the same examples on every run, so CI is reproducible.
"""

from __future__ import annotations

import copy
import json
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from toolkit.errors import InputError
from toolkit.spec import GraphSpec, SpecError, load_spec, parse_spec
from toolkit.spec.summary import summarize, to_dot, to_mermaid

ROOT = Path(__file__).parents[2]
SEEDS: list[tuple[str, bytes]] = sorted(
    (p.suffix, p.read_bytes())
    for p in [*(ROOT / "graphs").glob("*.yaml"), *(ROOT / "tests" / "spec" / "malformed").iterdir()]
)
SECONDS = (
    5.0  # per input: generous for a busy CI box (a typical one takes a few ms; a stall must not fail CI)
)
PEAK_BYTES = 16 << 20  # peak traced memory per input (a typical one needs well under 1 MB)
TRACE_EVERY = 4  # tracemalloc slows a call ~3x: measure memory on every 4th input (a fixed choice)

SNIPPETS = [
    b"&a [*a]",
    b"&b {k: *b}",
    b"*undefined",
    b"[" * 200 + b"]" * 200,
    b"{a: " * 100 + b"1" + b"}" * 100,
    b"1" * 5000,
    b"100000000000",
    b"-100000000000",
    b"1e400",
    b".nan",
    b"-1",
    b"0",
    b"null",
    b"~",
    b"[]",
    b"{}",
    b"''",
    b"true",
    b"2020-13-45",
    b"!!python/object/apply:os.system ['true']",
    b"!!binary AAAA",
    b"<<: *a",
    b"? [a, b]\n: c",
    b"\x00",
    b"\xff\xfe",
    b"\t",
    b"\n  - ",
    b": ",
    b'"\\ud800"',
]


def _bomb(levels: int) -> bytes:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 8)}]" for i in range(1, levels)]
    return ("\n".join(lines) + f"\nname: *a{levels - 1}\n").encode()


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    """A seed file with a few byte-level and token-level mutations."""
    suffix, seed = draw(st.sampled_from(SEEDS))
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(
            st.sampled_from(["flip", "delete", "duplicate", "snippet", "snippet", "truncate", "bomb"])
        )
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and data:
            i = min(at, len(data) - 1)
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 40))]
        elif kind == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 200))] * draw(st.integers(1, 20))
        elif kind == "snippet":
            data[at:at] = draw(st.sampled_from(SNIPPETS))
        elif kind == "truncate":
            del data[at:]
        elif kind == "bomb":
            data = bytearray(_bomb(draw(st.integers(2, 12)))) + data
    return suffix, bytes(data)


VALID: dict[str, Any] = yaml.safe_load((ROOT / "graphs" / "default.yaml").read_text())
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**15), 10**15),
    st.sampled_from([0, 1, -1, 2**31, 10**11, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["linear", "relu", "auto", "none", "x", "fc1", "2MB", "int64"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


@st.composite
def generated(draw: st.DrawFn) -> dict[str, Any]:
    """The default spec with a few values replaced (or keys added) by arbitrary data."""
    doc = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        path = draw(st.sampled_from(paths))
        parent: Any = doc
        for part in path[:-1]:
            parent = parent[part]
        if isinstance(parent, dict) and draw(st.booleans()):
            parent[draw(st.sampled_from([path[-1], "extra", "out", "factorize", "stages"]))] = draw(values)
        else:
            parent[path[-1]] = draw(values)
    return doc


OUTCOMES: Counter[str] = Counter()


def check_outcome(call: Any, source: str) -> None:
    """``call()`` returns a usable GraphSpec or raises InputError, in bounded time (every input) and
    memory (every TRACE_EVERY-th input, the same ones on every run)."""
    OUTCOMES["checked"] += 1
    trace = OUTCOMES["checked"] % TRACE_EVERY == 0
    if trace:
        tracemalloc.start()  # only around the call: hypothesis' own work is neither traced nor slowed
    t0 = time.perf_counter()
    try:
        spec = call()
    except InputError as exc:
        spec, message = None, str(exc)
        assert message.strip(), "an empty error message"
        assert all(line.startswith(source) for line in message.splitlines()), message
        if isinstance(exc, SpecError) and any(p.path for p in exc.problems):
            OUTCOMES["rejected with a field path"] += 1
    finally:
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
        if trace:
            tracemalloc.stop()
    assert seconds < SECONDS, f"{seconds:.2f} s"
    assert peak < PEAK_BYTES, f"{peak / 1e6:.1f} MB"
    if spec is not None:
        OUTCOMES["accepted"] += 1
        assert isinstance(spec, GraphSpec)
        # what `rlhf show` / `rlhf graph` / training do next must not fail on an accepted spec
        assert sum(len(s) for s in spec.stage_partition()) == len(spec.nodes)
        spec.resolved()
        summarize(spec)
        to_mermaid(spec)
        to_dot(spec)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


COMMON = {
    "deadline": None,  # timing is checked in check_outcome, with a bound that suits CI
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    # no explain phase: its line tracing would count against the memory bound
    "phases": [Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
}


@settings(max_examples=1000, **COMMON)  # type: ignore[arg-type]
@given(case=mutated())
def test_mutated_files(workdir: Path, case: tuple[str, bytes]) -> None:
    suffix, data = case
    path = workdir / f"mutated{suffix}"
    path.write_bytes(data)
    OUTCOMES["mutated"] += 1
    check_outcome(lambda: load_spec(path), str(path))


@settings(max_examples=300, **COMMON)  # type: ignore[arg-type]
@given(doc=generated(), as_json=st.booleans())
def test_generated_specs(workdir: Path, doc: dict[str, Any], as_json: bool) -> None:
    OUTCOMES["generated"] += 1
    check_outcome(lambda: parse_spec(doc, source="<fuzz>"), "<fuzz>")
    path = workdir / ("generated.json" if as_json else "generated.yaml")
    try:
        text = json.dumps(doc) if as_json else yaml.dump(doc, Dumper=DUMPER)
    except (ValueError, yaml.YAMLError):
        return  # not representable in that format
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    check_outcome(lambda: load_spec(path), str(path))


def test_fuzz_reaches_validation() -> None:
    """The fuzz is not all syntax errors: both fuzz tests (run before this one) saw accepted specs and
    errors found by the graph checks, not only by the YAML reader."""
    if OUTCOMES["mutated"] + OUTCOMES["generated"] == 0:
        pytest.skip("run with the fuzz tests above")
    assert OUTCOMES["checked"] >= 1500, OUTCOMES
    assert OUTCOMES["accepted"] >= 5, OUTCOMES
    assert OUTCOMES["rejected with a field path"] >= 500, OUTCOMES
