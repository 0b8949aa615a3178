"""The placement planner against brute force, at scale, and on bad devices files."""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from toolkit.errors import InputError
from toolkit.planner import ModelProfile, Unit, load_devices, lower_bound, parse_devices, plan_pipeline
from toolkit.planner.dp import Plan, stage_memory


def random_profile(rng: np.random.Generator, n: int, batch: int = 4) -> ModelProfile:
    units = tuple(
        Unit(f"u{i}", float(rng.uniform(0.1, 3.0)), int(rng.integers(1, 100)) * 1000) for i in range(n)
    )
    cuts = tuple(int(rng.integers(1, 50)) * 1000 for _ in range(n + 1))
    return ModelProfile("rand", batch, units, cuts)


def random_devices(rng: np.random.Generator, k: int, *, pairs: bool = True) -> dict:
    devices = [
        {"name": f"d{i}", "memory": int(rng.integers(150, 400)) * 1000, "speed": float(rng.uniform(0.3, 3))}
        for i in range(k)
    ]
    links: dict = {
        "default": {"bandwidth": float(rng.uniform(2e4, 2e5)), "latency": float(rng.uniform(0, 0.2))}
    }
    if pairs:
        links["pairs"] = [
            {
                "a": f"d{i}",
                "b": f"d{j}",
                "bandwidth": float(rng.uniform(1e4, 1e6)),
                "latency": float(rng.uniform(0, 0.5)),
            }
            for i, j in itertools.combinations(range(k), 2)
            if rng.random() < 0.5
        ]
    return {"devices": devices, "links": links}


def brute_force(profile: ModelProfile, doc: dict, objective: str) -> tuple[float, float]:
    """Every partition x every injective device sequence, costs computed from the raw numbers."""
    n = len(profile.units)
    devs = doc["devices"]
    free = {"latency": 0.0, "bandwidth": math.inf}  # a hop without links: one machine
    default = doc.get("links", {}).get("default", free if "hop" in doc else None)
    pair = {frozenset((p["a"], p["b"])): p for p in doc.get("links", {}).get("pairs", [])}
    hop = doc.get("hop", {"fixed": 0.0, "per_byte": 0.0})
    secs = [u.seconds for u in profile.units]
    wts = [u.weight_bytes for u in profile.units]
    cuts = profile.cut_bytes
    best = (math.inf, math.inf)
    for k in range(1, min(n, len(devs)) + 1):
        for inner in itertools.combinations(range(1, n), k - 1):
            bounds = [0, *inner, n]
            ranges = list(itertools.pairwise(bounds))
            for seq in itertools.permutations(range(len(devs)), k):
                times, ok = [], True
                for (s, e), d in zip(ranges, seq):
                    if sum(wts[s:e]) + cuts[s] + cuts[e] > devs[d]["memory"]:
                        ok = False
                        break
                    times.append(
                        sum(secs[s:e]) / devs[d]["speed"]
                        + hop["fixed"]
                        + hop["per_byte"] * (cuts[s] + cuts[e])
                    )
                if not ok:
                    continue
                for (_, e), d1, d2 in zip(ranges, seq, seq[1:]):
                    ln = pair.get(frozenset((devs[d1]["name"], devs[d2]["name"])), default)
                    times.append(math.inf if ln is None else ln["latency"] + cuts[e] / ln["bandwidth"])
                value = (max(times), sum(times)) if objective == "throughput" else (sum(times), max(times))
                if value[0] < best[0] - 1e-12 or (
                    abs(value[0] - best[0]) <= 1e-12 * best[0] and value[1] < best[1]
                ):
                    best = value
    return best


def _plan_equals_brute_force(
    profile: ModelProfile, doc: dict[str, Any], cluster: Any, objective: str
) -> Plan | None:
    """The plan for ``objective``, checked against brute force: the same optimum, a tie-break never
    better than optimal (it is best effort), a bottleneck at or above the lower bound. ``None`` when
    brute force finds no feasible plan and the planner says so with an InputError."""
    expected = brute_force(profile, doc, objective)
    if not math.isfinite(expected[0]):
        with pytest.raises(InputError):
            plan_pipeline(profile, cluster, objective)
        return None
    plan = plan_pipeline(profile, cluster, objective)
    got = (
        (plan.bottleneck_s, plan.latency_s)
        if objective == "throughput"
        else (plan.latency_s, plan.bottleneck_s)
    )
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-9)
    assert got[1] >= expected[1] * (1 - 1e-9)  # the tie-break is best effort, never better than optimal
    assert plan.bottleneck_s >= plan.lower_bound_s * (1 - 1e-12)
    return plan


@pytest.mark.parametrize("objective", ["throughput", "latency"])
@pytest.mark.parametrize("seed", range(12))
def test_equals_brute_force(seed: int, objective: str) -> None:
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(2, 7)), int(rng.integers(1, 5))
    profile = random_profile(rng, n)
    doc = random_devices(rng, k, pairs=seed % 2 == 0)
    cluster = parse_devices(doc)
    plan = _plan_equals_brute_force(profile, doc, cluster, objective)
    if plan is None:
        return
    assert plan.exact
    for st in plan.stages:  # the plan respects every device's memory
        mem = next(d["memory"] for d in doc["devices"] if d["name"] == st.device)
        assert st.memory_bytes <= mem


@pytest.mark.parametrize("objective", ["throughput", "latency"])
@pytest.mark.parametrize("seed", range(10))
def test_hop_cost_equals_brute_force(seed: int, objective: str) -> None:
    """A Ray hop per stage (fixed + per byte in and out), with the file's links or none (one machine)."""
    rng = np.random.default_rng(1000 + seed)
    n, k = int(rng.integers(2, 7)), int(rng.integers(1, 5))
    profile = random_profile(rng, n)
    doc = random_devices(rng, k, pairs=seed % 2 == 0)
    if seed % 3 == 0:
        del doc["links"]
    # a fixed cost of the order of a unit, a per-byte cost making the cut sizes matter
    doc["hop"] = {"fixed": float(rng.uniform(0, 1.0)), "per_byte": float(rng.uniform(0, 2e-5))}
    cluster = parse_devices(doc)
    assert cluster.hop is not None and cluster.cost_model.startswith("Ray")
    plan = _plan_equals_brute_force(profile, doc, cluster, objective)
    if plan is None:
        return
    for st in plan.stages:  # each stage's hop from the raw numbers: fixed + per byte in and out
        want = doc["hop"]["fixed"] + doc["hop"]["per_byte"] * (
            profile.cut_bytes[st.start] + profile.cut_bytes[st.stop]
        )
        np.testing.assert_allclose(st.hop_s, want, rtol=1e-12)
        np.testing.assert_allclose(st.busy_s, st.compute_s + want, rtol=1e-12)


def test_hop_changes_the_plan() -> None:
    """Two equal units on two equal devices: split without a hop; one stage once a hop costs more
    than the half of the compute a split saves (a hop per stage is paid by each stage anyway, so it is
    the per-byte share of the cut that decides)."""
    units = (Unit("u0", 1.0, 10), Unit("u1", 1.0, 10))
    prof = ModelProfile("two", 1, units, (0, 1_000_000, 0))
    doc: dict[str, Any] = {"devices": [{"name": "a", "memory": 1e7}, {"name": "b", "memory": 1e7}]}
    plain = plan_pipeline(prof, parse_devices({**doc, "links": {"default": {"bandwidth": 1e15}}}))
    assert plain.partition() == [(0, 1), (1, 2)] and plain.bottleneck_s == pytest.approx(1.0)
    # split: each stage 1 s + 0.5 s (fixed) + 1e6 B x 1.5e-6 s/B = 3.0 s; one stage: 2 + 0.5 = 2.5 s
    heavy = parse_devices({**doc, "hop": {"fixed": 0.5, "per_byte": 1.5e-6}})
    plan = plan_pipeline(prof, heavy)
    assert plan.partition() == [(0, 2)]
    assert plan.bottleneck_s == pytest.approx(2.5) and plan.stages[0].hop_s == pytest.approx(0.5)
    light = parse_devices({**doc, "hop": {"fixed": 0.5, "per_byte": 1e-7}})
    assert plan_pipeline(prof, light).bottleneck_s == pytest.approx(1.6)  # 1 + 0.5 + 0.1
    assert light.with_hop(None).link("a", "b") is None  # without the hop: no links again


def test_identical_devices_equal_brute_force() -> None:
    """Interchangeable devices are pruned by symmetry; the optimum must not change."""
    rng = np.random.default_rng(99)
    profile = random_profile(rng, 6)
    doc = {
        "devices": [{"name": f"d{i}", "memory": 400_000, "speed": 1.0 + (i >= 3)} for i in range(5)],
        "links": {"default": {"bandwidth": 1e5, "latency": 0.01}},
    }
    plan = plan_pipeline(profile, parse_devices(doc))
    np.testing.assert_allclose(plan.bottleneck_s, brute_force(profile, doc, "throughput")[0], rtol=1e-9)


def test_balanced_split_on_known_case() -> None:
    """Four equal units, a device three times faster than the other, free links: 3 units vs 1."""
    profile = ModelProfile("eq", 1, tuple(Unit(f"u{i}", 1.0, 10) for i in range(4)), (1,) * 5)
    cluster = parse_devices(
        {
            "devices": [
                {"name": "slow", "memory": 10**6, "speed": 1 / 3},
                {"name": "fast", "memory": 10**6, "speed": 1},
            ],
            "links": {"default": {"bandwidth": 1e12, "latency": 0}},
        }
    )
    plan = plan_pipeline(profile, cluster)
    assert sorted((s.stop - s.start, s.device) for s in plan.stages) == [(1, "slow"), (3, "fast")]
    np.testing.assert_allclose(plan.bottleneck_s, 3.0, rtol=1e-9)
    np.testing.assert_allclose(plan.throughput, 1 / 3.0, rtol=1e-9)
    np.testing.assert_allclose(plan.lower_bound_s, 4 / (4 / 3), rtol=1e-12)
    lat = plan_pipeline(profile, cluster, "latency")  # one stage on the fast device: 4 s, no transfer
    assert [(s.start, s.stop, s.device) for s in lat.stages] == [(0, 4, "fast")]


def simulated_cluster(rng: np.random.Generator, k: int) -> dict:
    kinds = [(512e6, 0.5), (1e9, 1.0), (2e9, 2.0), (4e9, 3.0), (8e9, 4.0)]
    devices = []
    for i in range(k):
        mem, speed = kinds[int(rng.integers(len(kinds)))]
        devices.append(
            {
                "name": f"dev{i:03d}",
                "memory": int(mem * rng.uniform(0.8, 1.2)),
                "speed": speed * rng.uniform(0.9, 1.1),
            }
        )
    return {"devices": devices, "links": {"default": {"bandwidth": 1.25e9, "latency": 5e-5}}}


def block_profile(rng: np.random.Generator, blocks: int) -> ModelProfile:
    units = tuple(
        Unit(f"block{i}", float(rng.uniform(2e-3, 4e-3)), int(rng.uniform(20e6, 40e6))) for i in range(blocks)
    )
    return ModelProfile("48-block", 8, units, tuple([8 * 128 * 768 * 4] * (blocks + 1)))


def test_hundred_devices_forty_eight_blocks_fast() -> None:
    profile = block_profile(np.random.default_rng(1), 48)
    cluster = parse_devices(simulated_cluster(np.random.default_rng(0), 100))
    t0 = time.perf_counter()
    plan = plan_pipeline(profile, cluster)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0  # generous (shared 2-core machine); the benchmark records the figure, target 1 s
    assert not plan.exact and len(plan.candidates) == 8
    # the programme over the 8 candidates alone; the threshold search over all 100 improves on it
    doc = simulated_cluster(np.random.default_rng(0), 100)
    doc["devices"] = [d for d in doc["devices"] if d["name"] in plan.candidates]
    sub = plan_pipeline(profile, parse_devices(doc))
    assert sub.exact and plan.bottleneck_s <= sub.bottleneck_s
    assert plan.method == "threshold search" and plan.bottleneck_s < 0.7 * sub.bottleneck_s
    covered = [i for s in plan.stages for i in range(s.start, s.stop)]
    assert covered == list(range(48))
    by = {d.name: d for d in cluster.devices}
    assert all(s.memory_bytes <= by[s.device].memory for s in plan.stages)
    assert plan.bottleneck_s >= lower_bound(profile, cluster.devices, cluster) == plan.lower_bound_s
    # the plan spreads the work: far below running everything on the fastest single device, and
    # here it reaches the lower bound (the transfer of one cut over the network), so it is optimal
    assert plan.bottleneck_s < profile.total_seconds / max(d.speed for d in cluster.devices) / 4
    np.testing.assert_allclose(plan.bottleneck_s, plan.lower_bound_s, rtol=1e-6)


def test_infeasible_memory_is_input_error() -> None:
    profile = ModelProfile("m", 1, tuple(Unit(f"u{i}", 1.0, 100) for i in range(4)), (0,) * 5)
    tight = {
        "devices": [{"name": "a", "memory": 150}, {"name": "b", "memory": 150}],
        "links": {"default": {"bandwidth": 1}},
    }
    with pytest.raises(InputError, match="no placement fits"):
        plan_pipeline(profile, parse_devices(tight))
    tiny = {"devices": [{"name": "a", "memory": 50}], "links": {}}
    with pytest.raises(InputError, match="needs 100 bytes"):
        plan_pipeline(profile, parse_devices(tiny))
    nolink = {"devices": [{"name": "a", "memory": 250}, {"name": "b", "memory": 250}]}
    with pytest.raises(InputError, match="no placement fits"):
        plan_pipeline(profile, parse_devices(nolink))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("devices:\n  - {name: a, memory: 1GB, colour: red}\n", r"devices\[0\]\.colour: unknown field"),
        (
            "devices:\n  - {name: a, memory: 1GB}\nlinks: {default: {bandwidth: 0}}\n",
            r"links\.default\.bandwidth",
        ),
        ("devices:\n  - {name: a, memory: 1GB}\nlinks: {default: {bandwidth: -5}}\n", r"greater than 0"),
        ("devices:\n  - {name: a, memory: -1}\n", r"devices\[0\]\.memory"),
        ("devices:\n  - {name: a, memory: 1GB, speed: 0}\n", r"devices\[0\]\.speed"),
        ("devices: [{name: a, memory: 1GB}, {name: a, memory: 2GB}]\n", "unique"),
        (
            "devices: [{name: a, memory: 1GB}]\nlinks: {pairs: [{a: a, b: z, bandwidth: 1}]}\n",
            "unknown device 'z'",
        ),
        ("devices: [\n", r":\d+: not valid YAML"),
    ],
)
def test_bad_devices_file(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "devices.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=match) as info:
        load_devices(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("seed", range(8))
def test_beyond_max_exact_is_feasible_and_never_beats_brute_force(seed: int) -> None:
    """Above max_exact devices (candidates + threshold search): a valid plan, never below the optimum."""
    rng = np.random.default_rng(100 + seed)
    profile = random_profile(rng, 6)
    doc = random_devices(rng, 5, pairs=seed % 2 == 0)
    best = brute_force(profile, doc, "throughput")[0]
    if not math.isfinite(best):
        return
    try:
        plan = plan_pipeline(profile, parse_devices(doc), max_exact=2)
    except InputError:  # the candidates and the walk may both miss a tight fit; never a wrong plan
        return
    assert not plan.exact and plan.method in ("candidates", "threshold search")
    assert plan.bottleneck_s >= best * (1 - 1e-9) and plan.bottleneck_s >= plan.lower_bound_s * (1 - 1e-12)
    mem = {d["name"]: d["memory"] for d in doc["devices"]}
    assert all(s.memory_bytes <= mem[s.device] for s in plan.stages)
    assert len({s.device for s in plan.stages}) == len(plan.stages)


def test_unit_at_rank_scale_exact_bytes() -> None:
    in_f, out_f, r = 64, 256, 24
    factor_bytes = 4 * r * (in_f + out_f)
    u = Unit("fc1", 2.0, factor_bytes + 4 * out_f, ("fc1",), rank=r, rank_bytes=factor_bytes)
    half = u.at_rank_scale(0.5)
    assert half.rank == 12 and half.rank_bytes == 4 * 12 * (in_f + out_f)
    assert half.weight_bytes == 4 * 12 * (in_f + out_f) + 4 * out_f
    np.testing.assert_allclose(half.seconds, 2.0 * (1 - (factor_bytes / u.weight_bytes) * 0.5), rtol=1e-12)
    assert u.at_rank_scale(0.01).rank == 1  # never below rank 1
    dense = Unit("relu", 1.0, 0)
    assert dense.at_rank_scale(0.25) == dense


def _random_devices(rng: np.random.Generator, k: int, max_kb: int) -> dict[str, Any]:
    """A devices document: ``k`` devices of 80 to ``max_kb`` KB and speed 0.5 to 2, one default link."""
    return {
        "devices": [
            {
                "name": f"d{i}",
                "memory": int(rng.integers(80, max_kb)) * 1000,
                "speed": float(rng.uniform(0.5, 2)),
            }
            for i in range(k)
        ],
        "links": {"default": {"bandwidth": 1e6, "latency": 0.01}},
    }


def test_rank_lowering_only_where_needed_equals_brute_force() -> None:
    """Stages that do not fit at full rank take the largest scale that fits; the rest keep their ranks."""
    rng = np.random.default_rng(5)
    scales = (1.0, 0.5, 0.25)
    for _ in range(6):
        n, k = 5, 3
        units = []
        for i in range(n):
            rb = int(rng.integers(50, 150)) * 1000
            units.append(
                Unit(f"u{i}", float(rng.uniform(0.5, 2)), rb + 1000, (f"u{i}",), rank=32, rank_bytes=rb)
            )
        profile = ModelProfile("r", 1, tuple(units), tuple([1000] * (n + 1)))
        doc = _random_devices(rng, k, max_kb=200)
        cluster = parse_devices(doc)
        best = math.inf
        for kk in range(1, k + 1):  # brute force with the same rule: largest scale that fits
            for inner in itertools.combinations(range(1, n), kk - 1):
                bounds = [0, *inner, n]
                for seq in itertools.permutations(range(k), kk):
                    times, ok = [], True
                    for (s, e), d in zip(itertools.pairwise(bounds), seq):
                        fit = None
                        for sc in scales:
                            us = [u.at_rank_scale(sc) for u in units[s:e]]
                            if sum(u.weight_bytes for u in us) + 2000 <= doc["devices"][d]["memory"]:
                                fit = us
                                break
                        if fit is None:
                            ok = False
                            break
                        times.append(sum(u.seconds for u in fit) / doc["devices"][d]["speed"])
                    if ok:
                        times += [0.01 + 1000 / 1e6] * (kk - 1)
                        best = min(best, max(times))
        if not math.isfinite(best):
            with pytest.raises(InputError):
                plan_pipeline(profile, cluster, rank_scales=scales)
            continue
        plan = plan_pipeline(profile, cluster, rank_scales=scales)
        np.testing.assert_allclose(plan.bottleneck_s, best, rtol=1e-9)
        mem = {d["name"]: d["memory"] for d in doc["devices"]}
        for st in plan.stages:
            assert st.memory_bytes <= mem[st.device]
            if st.rank_scale < 1:  # lowered only because the full-rank stage would not fit
                assert stage_memory(profile, st.start, st.stop) > mem[st.device]


def test_rank_lowering_makes_a_plan_fit() -> None:
    units = tuple(Unit(f"u{i}", 1.0, 101_000, (f"u{i}",), rank=16, rank_bytes=100_000) for i in range(4))
    profile = ModelProfile("big", 1, units, (0,) * 5)
    cluster = parse_devices(
        {
            "devices": [{"name": "a", "memory": 120_000}, {"name": "b", "memory": 120_000}],
            "links": {"default": {"bandwidth": 1e9}},
        }
    )
    with pytest.raises(InputError, match="no placement fits"):
        plan_pipeline(profile, cluster)
    plan = plan_pipeline(profile, cluster, rank_scales=(1.0, 0.5))
    assert [s.rank_scale for s in plan.stages] == [0.5, 0.5]
    assert all(s.memory_bytes <= 120_000 for s in plan.stages)


def test_least_lowered_equals_brute_force() -> None:
    """least_lowered: the fewest factor bytes dropped over all fitting plans, then the smallest bottleneck."""
    rng = np.random.default_rng(11)
    scales = (1.0, 0.5, 0.25)
    checked = 0
    for _ in range(8):
        n, k = 5, 3
        units = []
        for i in range(n):
            rb = int(rng.integers(50, 150)) * 1000
            rank = int(rng.choice([0, 32]))  # some units are not factorized
            units.append(
                Unit(
                    f"u{i}",
                    float(rng.uniform(0.5, 2)),
                    rb + 1000,
                    (f"u{i}",),
                    rank=rank,
                    rank_bytes=rb * (rank > 0),
                )
            )
        profile = ModelProfile("r", 1, tuple(units), tuple([1000] * (n + 1)))
        doc = _random_devices(rng, k, max_kb=250)
        cluster = parse_devices(doc)
        best = (math.inf, math.inf)
        for kk in range(1, k + 1):
            for inner in itertools.combinations(range(1, n), kk - 1):
                bounds = [0, *inner, n]
                for seq in itertools.permutations(range(k), kk):
                    times, lost, ok = [], 0, True
                    for (s, e), d in zip(itertools.pairwise(bounds), seq):
                        for sc in scales:  # the stage's largest scale that fits
                            us = [u.at_rank_scale(sc) for u in units[s:e]]
                            if sum(u.weight_bytes for u in us) + 2000 <= doc["devices"][d]["memory"]:
                                break
                        else:
                            ok = False
                            break
                        times.append(sum(u.seconds for u in us) / doc["devices"][d]["speed"])
                        lost += sum(a.weight_bytes - b.weight_bytes for a, b in zip(units[s:e], us))
                    if ok:
                        times += [0.01 + 1000 / 1e6] * (kk - 1)
                        cand = (lost, max(times))
                        if cand[0] < best[0] or (cand[0] == best[0] and cand[1] < best[1]):
                            best = cand
        if not math.isfinite(best[1]):
            continue
        plan = plan_pipeline(profile, cluster, rank_scales=scales, least_lowered=True)
        lost = sum(stage_memory(profile, st.start, st.stop) - st.memory_bytes for st in plan.stages)
        assert lost == best[0]
        np.testing.assert_allclose(plan.bottleneck_s, best[1], rtol=1e-9)
        checked += 1
    assert checked >= 4
