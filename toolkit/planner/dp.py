"""The PipeEdge dynamic programme: partition a chain of units into stages, one device per stage.

Cost model (all times in seconds, per micro-batch of ``profile.batch`` samples):

- stage ``[j, k)`` on device ``d``: compute ``(C[k] - C[j]) / speed_d`` where ``C`` is the prefix sum
  of the units' measured seconds; memory ``W[k] - W[j] + A[j] + A[k]`` (weights plus the tensors
  entering and leaving it, ``A`` = ``profile.cut_bytes``) must not exceed ``memory_d``;
- between consecutive stages on ``d`` then ``e`` at cut ``j``: ``latency(d, e) + A[j] / bandwidth(d, e)``;
- with a hop cost (``cluster.hop``: a stage run as a Ray actor, see ``toolkit.planner.devices``) each
  stage's time grows by ``hop.fixed + hop.per_byte * (A[j] + A[k])``, not scaled by the speed: the
  stage's busy time is its compute plus its hop.

Objectives: ``throughput`` minimises the bottleneck (the largest stage busy time or link transfer;
throughput = batch / bottleneck); ``latency`` minimises the sum of every stage compute and link
transfer (one request end to end). The objective is optimised exactly; among states with equal
objective the other figure breaks ties, which is best effort (the lexicographic pair does not
decompose over prefixes, so a plan with equal objective and a lower tie-breaker may exist).

The state is PipeEdge's ``h(prefix, set of devices used, last device)``, solved bottom-up over the
sets with numpy (one vectorised step per (set, last device, next device)). Interchangeable devices
(same memory, speed and links) are only taken in file order, which removes symmetric states. The
programme is exponential in the number of devices it considers: above ``max_exact`` devices it
runs on the ``max_exact`` candidates with the highest speed (two of them chosen for the largest
memory instead), and the plan says so (``exact=False``). For the throughput objective on such a
cluster a threshold search over every device is tried too: bisect the bottleneck ``B`` between
the lower bound and the candidates' plan, and for each ``B`` walk the chain giving the fastest
unused device the longest stage it can run within ``B`` (and its memory), skipping a device whose
link from the previous one would exceed ``B``; the better plan wins (``plan.method``).
:func:`lower_bound` bounds the gap either way.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from toolkit.errors import InputError
from toolkit.planner.devices import Cluster, Device
from toolkit.planner.profile import ModelProfile

OBJECTIVES = ("throughput", "latency")
MAX_EXACT = 8


@dataclass(frozen=True)
class Stage:
    """Units ``[start, stop)`` on ``device``; ``send_s`` is the transfer to the next stage (0 for the last).

    ``compute_s`` is the units' profiled time on the device, ``hop_s`` what running the stage as a
    Ray actor adds (0 in the plain model); ``busy_s`` their sum.
    """

    start: int
    stop: int
    device: str
    compute_s: float
    memory_bytes: int
    send_s: float
    rank_scale: float = 1.0
    hop_s: float = 0.0

    @property
    def busy_s(self) -> float:
        return self.compute_s + self.hop_s


@dataclass(frozen=True)
class Plan:
    """A placement and its predicted figures.

    Attributes:
        bottleneck_s: the largest stage busy time or link transfer (seconds per micro-batch).
        throughput: samples per second in steady state, ``batch / bottleneck_s``.
        latency_s: one micro-batch end to end (sum of every compute and transfer).
        lower_bound_s: a bottleneck no plan can beat (see :func:`lower_bound`).
        exact: the programme considered every device (else the ``candidates``).
        method: "exact", "candidates" (the programme over ``candidates``) or "threshold search".
    """

    stages: tuple[Stage, ...]
    objective: str
    batch: int
    bottleneck_s: float
    latency_s: float
    lower_bound_s: float
    exact: bool
    candidates: tuple[str, ...]
    seconds: float
    method: str = "exact"

    @property
    def throughput(self) -> float:
        return self.batch / self.bottleneck_s if self.bottleneck_s > 0 else math.inf

    def partition(self) -> list[tuple[int, int]]:
        return [(s.start, s.stop) for s in self.stages]


def lower_bound(profile: ModelProfile, devices: Sequence[Device], cluster: Cluster | None = None) -> float:
    """A bottleneck no placement can beat.

    The largest of: total compute / total speed (each stage's time times its device's speed sums to
    the total); the longest unit on the fastest device (it runs whole somewhere); and, with a
    cluster, the smaller of one stage on the fastest device and the cheapest transfer at any cut
    over any link (two stages or more send at least once). With a hop cost every stage pays at
    least ``hop(min A, min A)`` on top of its compute, so the stage terms grow by that.
    """
    speeds = [d.speed for d in devices]
    largest = max(u.seconds for u in profile.units)
    n = len(profile.units)
    hop = cluster.hop if cluster is not None else None
    least_hop = 0.0 if hop is None else hop.seconds(min(profile.cut_bytes), min(profile.cut_bytes))
    # each used device i: compute_i * speed_i <= (B - least_hop) * speed_i; summed over the devices
    bound = max(profile.total_seconds / sum(speeds), largest / max(speeds)) + least_hop
    if cluster is not None and n > 1:
        links = [*cluster.pairs.values(), *([cluster.default] if cluster.default else [])]
        cheapest = min((ln.seconds(min(profile.cut_bytes[1:n])) for ln in links), default=math.inf)
        one_stage = profile.total_seconds / max(speeds) + (
            0.0 if hop is None else hop.seconds(profile.cut_bytes[0], profile.cut_bytes[n])
        )
        bound = max(bound, min(one_stage, cheapest))
    return bound


def _prefix(profile: ModelProfile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = np.concatenate([[0.0], np.cumsum([u.seconds for u in profile.units], dtype=np.float64)])
    w = np.concatenate([[0], np.cumsum([u.weight_bytes for u in profile.units], dtype=np.int64)])
    a = np.asarray(profile.cut_bytes, dtype=np.int64)
    return c, w, a


def stage_memory(profile: ModelProfile, start: int, stop: int) -> int:
    """Bytes a stage ``[start, stop)`` needs: its weights plus the tensors entering and leaving it."""
    w = sum(u.weight_bytes for u in profile.units[start:stop])
    return int(w + profile.cut_bytes[start] + profile.cut_bytes[stop])


def evaluate(
    profile: ModelProfile,
    cluster: Cluster,
    partition: Sequence[tuple[int, int]],
    devices: Sequence[str],
    rank_scales: Sequence[float] | None = None,
) -> tuple[float, float, list[Stage]]:
    """Bottleneck, latency and stages of a given placement (memory is not checked here).

    Args:
        partition: contiguous ``(start, stop)`` ranges covering every unit in order.
        devices: one device name per range, all different.
        rank_scales: per range, the scale of its factorized units' ranks (default all 1).

    Raises:
        InputError: ranges that do not cover the chain, unknown or repeated devices.
    """
    by_name = {d.name: d for d in cluster.devices}
    n = len(profile.units)
    if [p[0] for p in partition][:1] != [0] or partition[-1][1] != n:
        raise InputError(f"placement: expected ranges covering units 0..{n}, got {list(partition)}")
    for (_, b), (c, _) in itertools.pairwise(partition):
        if b != c:
            raise InputError(f"placement: ranges must be contiguous, got {list(partition)}")
    unknown = [d for d in devices if d not in by_name]
    if unknown or len(set(devices)) != len(devices) or len(devices) != len(partition):
        raise InputError(f"placement: expected one distinct known device per stage, got {list(devices)}")
    stages = []
    scales = list(rank_scales) if rank_scales is not None else [1.0] * len(partition)
    for i, ((s, e), name) in enumerate(zip(partition, devices)):
        prof = profile.at_rank_scale(scales[i]) if scales[i] < 1 else profile
        comp = sum(u.seconds for u in prof.units[s:e]) / by_name[name].speed
        hop = 0.0 if cluster.hop is None else cluster.hop.seconds(profile.cut_bytes[s], profile.cut_bytes[e])
        send = (
            cluster.link_seconds(name, devices[i + 1], profile.cut_bytes[e]) if i + 1 < len(devices) else 0.0
        )
        stages.append(Stage(s, e, name, comp, stage_memory(prof, s, e), send, scales[i], hop))
    bottleneck = max(max(st.busy_s for st in stages), max(st.send_s for st in stages))
    latency = sum(st.busy_s + st.send_s for st in stages)
    return bottleneck, latency, stages


def _candidates(devices: Sequence[Device], limit: int) -> list[int]:
    if len(devices) <= limit:
        return list(range(len(devices)))
    by_memory = sorted(range(len(devices)), key=lambda i: (-devices[i].memory, -devices[i].speed))
    chosen = by_memory[: min(2, limit)]
    by_speed = sorted(range(len(devices)), key=lambda i: (-devices[i].speed, -devices[i].memory))
    for i in by_speed:
        if len(chosen) >= limit:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen)


def _twins(devices: Sequence[Device], cluster: Cluster) -> list[int]:
    """For each device, the index of an earlier interchangeable device (or -1)."""
    names = [d.name for d in devices]
    out = []
    for i, d in enumerate(devices):
        twin = -1
        for j in range(i - 1, -1, -1):
            o = devices[j]
            if (o.memory, o.speed) != (d.memory, d.speed):
                continue
            if all(
                cluster.link(o.name, x) == cluster.link(d.name, x) for x in names if x not in (o.name, d.name)
            ):
                twin = j
                break
        out.append(twin)
    return out


def _threshold_search(
    profile: ModelProfile, cluster: Cluster, low: float, high: float, iterations: int = 40
) -> tuple[list[tuple[int, int]], list[str]] | None:
    """Smallest bottleneck (by bisection in [low, high]) for which the greedy walk covers the chain."""
    c, w, a = _prefix(profile)
    n = len(profile.units)
    order = sorted(cluster.devices, key=lambda d: (-d.speed, -d.memory))
    default = cluster.default
    hop = cluster.hop

    def walk(bound: float) -> tuple[list[tuple[int, int]], list[str]] | None:
        j, prev = 0, None
        ranges: list[tuple[int, int]] = []
        names: list[str] = []
        for d in order:
            if j == n:
                break
            if prev is not None and cluster.link_seconds(prev, d.name, float(a[j])) > bound:
                continue
            best = None
            for k in range(j + 1, n + 1):
                if (c[k] - c[j]) / d.speed > bound:  # compute grows with k; the hop need not
                    break
                if hop is not None and (c[k] - c[j]) / d.speed + hop.seconds(a[j], a[k]) > bound:
                    continue
                if w[k] - w[j] + a[j] + a[k] > d.memory:
                    continue
                if k < n and default is not None and default.seconds(float(a[k])) > bound:
                    continue
                best = k
            if best is None:
                continue
            ranges.append((j, best))
            names.append(d.name)
            prev, j = d.name, best
        return (ranges, names) if j == n else None

    found = walk(high)
    if found is None:
        return None
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        attempt = walk(mid)
        if attempt is None:
            low = mid
        else:
            high, found = mid, attempt
        if high - low <= 1e-6 * high:
            break
    return found


def plan_pipeline(
    profile: ModelProfile,
    cluster: Cluster,
    objective: str = "throughput",
    *,
    max_exact: int = MAX_EXACT,
    max_stages: int | None = None,
    rank_scales: Sequence[float] = (1.0,),
    least_lowered: bool = False,
    lower_for_speed: bool = False,
) -> Plan:
    """Best partition of the profile's units into stages and the device of each stage.

    Args:
        profile: the model's units, their measured seconds and the bytes at each cut.
        cluster: devices and links.
        objective: "throughput" (smallest bottleneck) or "latency" (smallest end-to-end time).
        max_exact: consider at most this many devices (every one when the cluster is that small).
        max_stages: at most this many stages (default: no limit beyond the devices and units).
        rank_scales: rank scales a stage may use, e.g. ``(1.0, 0.5, 0.25)``: a stage whose units
            do not fit a device at full rank takes the largest scale at which they fit (its
            factorized units' ranks times that scale, at least 1). Default: ranks stay as they are.
        least_lowered: with rank scales, first minimise the factor bytes the lowering drops (summed
            over the stages), then the objective: ranks are lowered only as far as a fitting plan
            needs, never for speed alone (False: the objective alone, lowering whatever runs faster).
        lower_for_speed: each stage runs at the allowed scale that makes it fastest on its device
            (among those that fit), not the largest that fits (ignored with ``least_lowered``).

    Returns:
        The :class:`Plan`.

    Raises:
        InputError: unknown objective; a unit that fits on no device; no placement fits in memory
            (or links are missing between every usable pair).
    """
    t0 = time.perf_counter()
    if objective not in OBJECTIVES:
        raise InputError(f"objective: expected one of {list(OBJECTIVES)}, got {objective!r}")
    n = len(profile.units)
    devs_all = list(cluster.devices)
    scales = sorted({float(x) for x in rank_scales} | {1.0}, reverse=True)
    if any(not 0 < x <= 1 for x in scales):
        raise InputError(f"rank_scales: expected values in (0, 1], got {list(rank_scales)}")
    scaled = [profile.at_rank_scale(x) for x in scales]
    for j, u in enumerate(profile.units):
        need = stage_memory(scaled[-1], j, j + 1)
        if not any(d.memory >= need for d in devs_all):
            biggest = max(devs_all, key=lambda d: d.memory)
            raise InputError(
                f"devices: unit {u.name!r}{' (' + ', '.join(u.nodes) + ')' if u.nodes else ''} needs {need} bytes (weights + activations at batch {profile.batch}), "
                f"expected a device with at least that much memory, got at most {biggest.memory} ({biggest.name})"
            )
    cand = _candidates(devs_all, max_exact)
    devs = [devs_all[i] for i in cand]
    k_dev = len(devs)
    limit_stages = min(n, k_dev, max_stages or n)
    _c, w, a = _prefix(profile)
    inf = math.inf
    jj, kk = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    valid = kk > jj
    hop = cluster.hop
    hop_s = 0.0 if hop is None else hop.fixed + hop.per_byte * (a[jj] + a[kk]).astype(np.float64)
    comp = [np.full((n + 1, n + 1), inf) for _ in devs]
    scale_of = [np.zeros((n + 1, n + 1), np.int64) for _ in devs]  # index into ``scales``
    dropped = [np.zeros((n + 1, n + 1), np.int64) for _ in devs]  # factor bytes the stage's scale drops
    for si, prof_s in enumerate(scaled):  # largest scale first: a stage is lowered only if it must be
        cs, ws, _ = _prefix(prof_s)
        mem_need = np.where(valid, ws[kk] - ws[jj] + a[jj] + a[kk], np.iinfo(np.int64).max)
        for di, dev in enumerate(devs):
            busy = (cs[kk] - cs[jj]) / dev.speed + hop_s
            later = (busy < comp[di]) if lower_for_speed and not least_lowered else np.isinf(comp[di])
            take = valid & (mem_need <= dev.memory) & later
            comp[di] = np.where(take, busy, comp[di])
            scale_of[di] = np.where(take, si, scale_of[di])
            if least_lowered:
                dropped[di] = np.where(take, (w[kk] - w[jj]) - (ws[kk] - ws[jj]), dropped[di])
    links = np.full((k_dev, k_dev, n + 1), inf)
    for x, dx in enumerate(devs):
        for y, dy in enumerate(devs):
            ln = cluster.link(dx.name, dy.name) if x != y else None
            if ln is not None:
                links[x, y, 1:n] = ln.latency + a[1:n] / ln.bandwidth
    twins = _twins(devs, cluster)
    primary_is_max = objective == "throughput"

    # best[(mask, d)] = (P, L, back_j, back_d, C): P bottleneck, L latency over prefixes k; back[k] =
    # (j, prev device); C the factor bytes dropped by lowering (NONE where the prefix has no plan).
    # States compare by (C, objective, the other figure): C adds up over stages and both figures
    # are monotone in a prefix's, so the lexicographic programme stays exact.
    none = np.int64(2**62)
    best: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    for d in range(k_dev):
        if twins[d] >= 0:
            continue
        p = comp[d][0].copy()
        c0 = np.where(np.isfinite(p), dropped[d][0], none)
        best[(1 << d, d)] = (p, p.copy(), np.zeros(n + 1, np.int64), np.full(n + 1, -1, np.int64), c0)
    cols = np.arange(n + 1)
    for mask in range(1, 1 << k_dev):
        if bin(mask).count("1") >= limit_stages:
            continue
        for d in range(k_dev):
            state = best.get((mask, d))
            if state is None:
                continue
            p_md, l_md, c_md = state[0], state[1], state[4]
            if not np.isfinite(p_md[1:n]).any():
                continue
            for e in range(k_dev):
                if mask >> e & 1 or (twins[e] >= 0 and not mask >> twins[e] & 1):
                    continue
                link = links[d, e]
                pa = np.maximum(p_md, link)  # (n+1,) bottleneck up to and including the transfer
                la = l_md + link
                cand_p = np.maximum(pa[:, None], comp[e])  # (j, k)
                cand_l = la[:, None] + comp[e]
                first, second = (cand_p, cand_l) if primary_is_max else (cand_l, cand_p)
                cand_c = np.where(np.isfinite(first), np.minimum(c_md, none)[:, None] + dropped[e], none)
                least = cand_c <= cand_c.min(axis=0)  # the least lowering first
                first = np.where(least, first, inf)
                lo = first.min(axis=0)
                tie = np.where(least & (first <= lo * (1 + 1e-12)), second, inf)
                arg = tie.argmin(axis=0)
                new_p, new_l, new_c = cand_p[arg, cols], cand_l[arg, cols], cand_c[arg, cols]
                key = (mask | 1 << e, e)
                old = best.get(key)
                if old is None:
                    best[key] = (new_p, new_l, arg, np.full(n + 1, d, np.int64), new_c)
                    continue
                of, os_ = (old[0], old[1]) if primary_is_max else (old[1], old[0])
                nf, ns = (new_p, new_l) if primary_is_max else (new_l, new_p)
                better = (new_c < old[4]) | (
                    (new_c == old[4]) & ((nf < of * (1 - 1e-12)) | ((nf <= of * (1 + 1e-12)) & (ns < os_)))
                )
                if better.any():
                    best[key] = (
                        np.where(better, new_p, old[0]),
                        np.where(better, new_l, old[1]),
                        np.where(better, arg, old[2]),
                        np.where(better, d, old[3]),
                        np.where(better, new_c, old[4]),
                    )
    final = None
    for (mask, d), (p, lat, _, _, cost) in best.items():
        f, s = (p[n], lat[n]) if primary_is_max else (lat[n], p[n])
        c = int(cost[n])
        if not math.isfinite(f):
            continue
        if (
            final is None
            or c < final[0]
            or (
                c == final[0]
                and (f < final[1] * (1 - 1e-12) or (f <= final[1] * (1 + 1e-12) and s < final[2]))
            )
        ):
            final = (c, f, s, mask, d)
    exact = len(devs) == len(devs_all)
    bound = lower_bound(profile, devs_all, cluster)
    ranges: list[tuple[int, int]] = []
    names: list[str] = []
    stage_scales: list[float] = []
    if final is not None:
        _, _, _, mask, d = final
        k = n
        while True:
            _, _, back_j, back_d, _ = best[(mask, d)]
            j = int(back_j[k])
            ranges.append((j, k))
            names.append(devs[d].name)
            stage_scales.append(scales[int(scale_of[d][j, k])])
            prev = int(back_d[k])
            if prev < 0:
                break
            mask &= ~(1 << d)
            d, k = prev, j
        ranges.reverse()
        names.reverse()
        stage_scales.reverse()
    method = "exact" if exact else "candidates"
    bottleneck = latency = math.inf
    stages: list[Stage] = []
    if ranges:
        bottleneck, latency, stages = evaluate(profile, cluster, ranges, names, stage_scales)
    if not exact and primary_is_max and bottleneck > bound:
        all_links = [*cluster.pairs.values(), *([cluster.default] if cluster.default else [])]
        worst_link = max((ln.seconds(float(a.max())) for ln in all_links), default=0.0)
        worst_hop = 0.0 if hop is None else hop.seconds(float(a.max()), float(a.max()))
        high = min(
            bottleneck, profile.total_seconds / min(d.speed for d in devs_all) + worst_link + worst_hop
        )
        found = _threshold_search(profile, cluster, bound, high)
        if found is not None:
            b2, l2, st2 = evaluate(profile, cluster, found[0], found[1])
            if b2 < bottleneck:
                bottleneck, latency, stages, method = b2, l2, st2, "threshold search"
    if not stages:
        total_w = int(w[n])
        raise InputError(
            f"devices: no placement fits: the model needs {total_w} bytes of weights at batch {profile.batch} "
            f"across {n} units, the devices considered ({[d.name for d in devs]}) cannot hold it in distinct "
            "stages (or lack links between them)"
        )
    return Plan(
        stages=tuple(stages),
        objective=objective,
        batch=profile.batch,
        bottleneck_s=bottleneck,
        latency_s=latency,
        lower_bound_s=bound,
        exact=exact,
        candidates=tuple(d.name for d in devs),
        seconds=time.perf_counter() - t0,
        method=method,
    )


def plan_least_lowering(
    profile: ModelProfile,
    cluster: Cluster,
    objective: str = "throughput",
    *,
    rank_scales: Sequence[float] = (1.0, 0.5, 0.25),
    max_exact: int = MAX_EXACT,
    max_stages: int | None = None,
    max_latency_s: float | None = None,
) -> Plan:
    """The best plan that lowers ranks as little as it must.

    Tries :func:`plan_pipeline` with the scale ``1`` alone, then with the next scale down allowed,
    and so on, and returns the first plan that fits, so no stage goes below the largest scale some
    fitting plan needs. Within the allowed scales the programme runs with ``least_lowered``: the
    plan drops the fewest factor bytes of any fitting plan, and among those it is the best for
    the objective (a stage that fits at full rank is never lowered to make it faster).

    With ``max_latency_s`` a plan must also take at most that long for one micro-batch end to end
    (its predicted ``latency_s``, the stage times of lowered units estimated as
    :meth:`Unit.at_rank_scale` does). Per set of allowed scales: the least-lowered plan if it meets
    the target, else the fastest plan for one request with those scales (objective "latency",
    lowering whatever runs faster); the first set that meets the target wins, so ranks go no
    lower than the largest scale at which some plan meets it.

    Raises:
        InputError: as :func:`plan_pipeline` with every scale allowed; no plan meets
            ``max_latency_s`` even with every scale allowed (the message gives the fastest).
    """
    if max_latency_s is not None and not max_latency_s > 0:
        raise InputError(f"--max-latency-ms: expected a positive time, got {max_latency_s * 1e3:g} ms")
    scales = sorted({float(x) for x in rank_scales} | {1.0}, reverse=True)
    fastest: Plan | None = None
    for i in range(1, len(scales) + 1):
        try:
            plan = plan_pipeline(
                profile,
                cluster,
                objective,
                max_exact=max_exact,
                max_stages=max_stages,
                rank_scales=scales[:i],
                least_lowered=True,
            )
        except InputError:
            if i == len(scales):  # no plan even with every scale allowed: its error is the answer
                raise
            continue
        if max_latency_s is None or plan.latency_s <= max_latency_s:
            return plan
        fast = plan_pipeline(
            profile,
            cluster,
            "latency",
            max_exact=max_exact,
            max_stages=max_stages,
            rank_scales=scales[:i],
            lower_for_speed=True,
        )
        if fast.latency_s <= max_latency_s:
            return fast
        fastest = fast
    assert fastest is not None and max_latency_s is not None  # every scale fitted, none was fast enough
    raise InputError(
        f"--max-latency-ms: no plan meets {max_latency_s * 1e3:g} ms for one micro-batch: the fastest, with "
        f"ranks down to x{scales[-1]:g}, takes {fastest.latency_s * 1e3:.3f} ms (estimated)"
    )
