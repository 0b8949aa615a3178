"""Measured stage times fed back into the planner, the hop cost in `rlhf plan`, and their bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from toolkit.cli import main
from toolkit.errors import InputError
from toolkit.planner import ModelProfile, Unit, parse_devices, plan_pipeline
from toolkit.planner.feedback import apply_measured, parse_measured
from toolkit.planner.hop import _fit, hop_sizes
from toolkit.runtime.placement import load_placement

SHA = "ab" * 32


def _profile(clock: str = "cpu") -> ModelProfile:
    units = tuple(Unit(f"stage_{i:02d}", s, 1000) for i, s in enumerate((1.0, 1.0, 2.0, 2.0)))
    source = {"kind": "export", "manifest_sha256": SHA, "clock": clock}
    return ModelProfile("m", 8, units, (100, 100, 100, 100, 10), source=source)


def _report(stages: list[dict[str, Any]], batch: int = 8, sha: str = SHA) -> dict[str, Any]:
    return {
        "format": "rlhf-serve-report",
        "version": 1,
        "export": {"name": "m", "manifest_sha256": sha},
        "micro_batch": batch,
        "stages": stages,
    }


DEVICES = {
    "devices": [{"name": "a", "memory": "1GB"}, {"name": "b", "memory": "1GB", "speed": 0.5}],
    "links": {"default": {"bandwidth": 1e15}},
}


def test_measured_times_replace_the_profile() -> None:
    """Stage [0, 2) on a measured 3 s (profile 2 s), [2, 4) on b (speed 0.5) 4 s of CPU: the work at
    reference speed is 3 and 2 s, split like the profile: units 1.5, 1.5, 1, 1."""
    cluster = parse_devices(DEVICES)
    rep = parse_measured(
        _report(
            [
                {"device": "a", "units": [0, 2], "busy_s": 9.0, "cpu_s": 3.0},
                {"device": "b", "units": [2, 4], "busy_s": 9.0, "cpu_s": 4.0},
            ]
        )
    )
    prof = apply_measured(_profile(), rep, cluster)
    np.testing.assert_allclose([u.seconds for u in prof.units], [1.5, 1.5, 1.0, 1.0])
    assert prof.cut_bytes == _profile().cut_bytes and prof.source["clock_measured"] == "cpu"
    # a wall-clock profile takes busy_s instead
    wall = apply_measured(_profile("wall"), rep, cluster)
    np.testing.assert_allclose([u.seconds for u in wall.units], [4.5, 4.5, 2.25, 2.25])
    # the plan moves: from the profile units 0..2 on the fast device a; measured, a is slower
    before = plan_pipeline(_profile(), cluster)
    after = plan_pipeline(prof, cluster)
    assert before.partition() != after.partition() or [s.device for s in before.stages] != [
        s.device for s in after.stages
    ]


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"format": "other"}, "format: expected 'rlhf-serve-report'"),
        ([1, 2], "format: expected"),
        ({**_report([]), "version": 2}, "version"),
        ({**_report([]), "export": None}, "export"),
        (_report([], batch=0), "micro_batch"),
        (_report([]), "stages: expected a non-empty list"),
        (_report([{"device": "a", "units": [1, 4], "busy_s": 1, "cpu_s": 1}]), r"stages\[0\]\.units"),
        (_report([{"device": "a", "units": [0, 4], "busy_s": -1, "cpu_s": 1}]), r"stages\[0\]\.busy_s"),
        (_report([{"device": "a", "units": [0, 4], "busy_s": 1, "cpu_s": "x"}]), r"stages\[0\]\.cpu_s"),
        (_report([{"units": [0, 4], "busy_s": 1, "cpu_s": 1}]), r"stages\[0\]"),
    ],
)
def test_bad_report_is_one_line(doc: Any, match: str) -> None:
    with pytest.raises(InputError, match=match) as err:
        parse_measured(doc, "r.json")
    assert "\n" not in str(err.value) and str(err.value).startswith("r.json: ")


def test_report_for_another_export_or_batch_refused() -> None:
    cluster = parse_devices(DEVICES)
    ok = [{"device": "a", "units": [0, 4], "busy_s": 1, "cpu_s": 1}]
    with pytest.raises(InputError, match="manifest sha256"):
        apply_measured(_profile(), parse_measured(_report(ok, sha="cd" * 32)), cluster)
    with pytest.raises(InputError, match="micro-batch 16"):
        apply_measured(_profile(), parse_measured(_report(ok, batch=16)), cluster)
    with pytest.raises(InputError, match=r"expected 0\.\.4"):
        apply_measured(_profile(), parse_measured(_report([{**ok[0], "units": [0, 3]}])), cluster)
    with pytest.raises(InputError, match="not in the devices file"):
        apply_measured(_profile(), parse_measured(_report([{**ok[0], "device": "z"}])), cluster)


def test_fit_recovers_a_line() -> None:
    sizes = [1024, 65536, 262144, 524288]
    fixed, per_byte = 4e-4, 3e-10
    got = _fit(sizes, [fixed + per_byte * 2 * s for s in sizes])
    np.testing.assert_allclose(got, (fixed, per_byte), rtol=1e-6)
    assert _fit([1024, 2048], [1e-3, 5e-4]) == (pytest.approx(7.5e-4), 0.0)  # falling: the mean, no slope
    assert hop_sizes([0, 262144, 262144, 40]) == [40, 1024, 262144, 524288]


def test_plan_cli_with_a_hop_and_bad_report(tmp_path: Path) -> None:
    """A devices file with `hop:` and no links plans one machine's Ray stages; --hop none the plain model."""
    prof = _profile()
    path = tmp_path / "profile.json"
    path.write_text(prof.to_json())
    devices = tmp_path / "devices.yaml"
    devices.write_text(
        "devices: [{name: a, memory: 1GB}, {name: b, memory: 1GB}]\nhop: {fixed: 0.25, per_byte: 0.001}\n"
    )
    placement = tmp_path / "placement.yaml"
    args = ["plan", str(path), "--devices", str(devices), "--placement", str(placement)]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "hop ms" in res.output and "cost model: Ray" in res.output
    pred = load_placement(placement).predicted or {}
    # stages [0, 2) and [2, 4): 2 s + 0.25 + 0.001 x 200 = 2.45; 4 s + 0.25 + 0.001 x 110 = 4.36;
    # [0, 3) and [3, 4): 4 + 0.45 = 4.45, 2 + 0.36 = 2.36: the first split wins with 4.36
    assert pred["bottleneck_s"] == pytest.approx(4.36) and pred["hop_fixed_s"] == 0.25
    res = CliRunner().invoke(main, [*args, "--hop", "none"], catch_exceptions=False)
    assert res.exit_code == 0 and "cost model: plain" in res.output, res.output
    pred = load_placement(placement).predicted or {}
    assert pred["bottleneck_s"] == pytest.approx(6.0) and "hop_fixed_s" not in pred  # no links: one stage
    bad = tmp_path / "bad.json"
    for text, match in (
        ("{", "not JSON"),
        (json.dumps({"format": "x"}), "format"),
        (
            json.dumps(_report([{"device": "a", "units": [0, 4], "busy_s": 1, "cpu_s": 1}], sha="cd" * 32)),
            "sha256",
        ),
    ):
        bad.write_text(text)
        res = CliRunner().invoke(main, [*args, "--measured", str(bad)])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and match in res.output, (
            res.output
        )
    good = tmp_path / "good.json"
    good.write_text(
        json.dumps(
            _report(
                [
                    {"device": "a", "units": [0, 2], "busy_s": 1, "cpu_s": 2.0},
                    {"device": "b", "units": [2, 4], "busy_s": 1, "cpu_s": 8.0},
                ]
            )
        )
    )
    res = CliRunner().invoke(main, [*args, "--measured", str(good)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "re-planned with the measured times" in res.output and "changed" in res.output, res.output
    # units measured 1, 1, 4, 4: [0, 3) and [3, 4) (6 + 0.45, 4 + 0.36) beat the profile's split at 2
    pl = load_placement(placement)
    assert [s.units for s in pl.stages] == [(0, 3), (3, 4)]
    assert (pl.predicted or {})["bottleneck_s"] == pytest.approx(6.45)
