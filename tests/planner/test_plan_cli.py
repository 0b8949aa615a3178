"""`rlhf profile` and `rlhf plan` on graphs/default.yaml: measured units, written spec and placement, exit 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from toolkit.cli import main
from toolkit.runtime.placement import load_placement

DEFAULT = Path(__file__).resolve().parents[2] / "graphs" / "default.yaml"


def _invoke(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def profile_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prof") / "profile.json"
    res = _invoke("profile", DEFAULT, "--batch", 8, "--seconds", 0.2, "-o", out)
    assert res.exit_code == 0, res.output
    return out


def test_profile_units_are_nodes_with_their_bytes(profile_json: Path) -> None:
    from toolkit.builder import build_model
    from toolkit.spec import load_spec

    spec = load_spec(DEFAULT)
    doc = json.loads(profile_json.read_text())
    assert [u["nodes"] for u in doc["units"]] == [[n] for n in spec.analysis.order]
    assert all(u["seconds"] > 0 for u in doc["units"])
    model = build_model(spec, seed=0)
    params = sum(p.numel() for p in model.parameters())
    assert sum(u["weight_bytes"] for u in doc["units"]) == 4 * params  # float32 initializers
    widths = {"x": 64, "fc1": 256, "act1": 256, "fc2": 256, "act2": 256, "head": 10}
    expect = [4 * 8 * sum(widths[t] for t in cut) for cut in doc["cut_tensors"]]
    assert doc["cut_bytes"] == expect
    assert doc["cut_tensors"][0] == ["x"] and doc["cut_tensors"][-1] == ["head"]


def test_plan_writes_spec_and_placement(profile_json: Path, tmp_path: Path) -> None:
    from toolkit.spec import load_spec

    devices = tmp_path / "devices.yaml"
    # links far faster than the compute, equal devices: the planner splits the chain in two stages
    devices.write_text(
        "devices:\n  - {name: a, memory: 1GB}\n  - {name: b, memory: 1GB}\n"
        "links: {default: {bandwidth: 1.0e15, latency: 0}}\n"
    )
    spec_copy = tmp_path / "default.yaml"
    spec_copy.write_text(DEFAULT.read_text())
    placement = tmp_path / "placement.yaml"
    res = _invoke(
        "plan", spec_copy, "--devices", devices, "--batch", 8, "--seconds", 0.2, "--placement", placement
    )
    assert res.exit_code == 0, res.output
    assert "lower bound" in res.output
    planned = load_spec(tmp_path / "default.planned.yaml")
    stages = planned.stage_partition()
    assert len(stages) == 2 and [n for s in stages for n in s] == planned.analysis.order
    pl = load_placement(placement)
    assert pl.export_sha256 is None and [s.units for s in pl.stages] == [(0, 1), (1, 2)]
    assert sorted(s.device for s in pl.stages) == ["a", "b"]
    assert list(pl.stages[0].outputs) == planned.analysis.stage_outputs[0]
    # from a saved profile, the same plan without measuring again
    res2 = _invoke("plan", profile_json, "--devices", devices, "--placement", tmp_path / "p2.yaml")
    assert res2.exit_code == 0, res2.output
    assert pl.predicted is not None and np.isfinite(pl.predicted["throughput"])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("devices:\n  - {name: a, memory: 1GB, cores: 4}\n", "devices[0].cores: unknown field"),
        (
            "devices:\n  - {name: a, memory: 1GB}\nlinks: {default: {bandwidth: 0}}\n",
            "links.default.bandwidth",
        ),
        (
            "devices:\n  - {name: a, memory: 1KB}\n  - {name: b, memory: 2KB}\n",
            "expected a device with at least",
        ),
    ],
)
def test_plan_bad_devices_exit_2(profile_json: Path, tmp_path: Path, text: str, match: str) -> None:
    devices = tmp_path / "devices.yaml"
    devices.write_text(text)
    res = CliRunner().invoke(main, ["plan", str(profile_json), "--devices", str(devices)])
    assert res.exit_code == 2, res.output
    assert match in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "placement.yaml").exists()


def test_profile_cpu_clock(default_export_dir: Path) -> None:
    from toolkit.planner.measure import profile_export

    prof = profile_export(default_export_dir, 4, threads=1, seconds=0.1, clock="cpu")
    assert prof.source["clock"] == "cpu" and all(u.seconds > 0 for u in prof.units)
    res = CliRunner().invoke(main, ["profile", str(default_export_dir), "--clock", "cpu", "--threads", "2"])
    assert res.exit_code == 2 and "expected --threads 1" in res.output, res.output


@pytest.fixture(scope="module")
def default_export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from toolkit.builder import build_model
    from toolkit.export import export_model
    from toolkit.spec import load_spec

    out = tmp_path_factory.mktemp("exp") / "export"
    model = build_model(load_spec(DEFAULT), seed=0).eval()
    export_model(
        model, out, sample={"x": np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)}
    )
    return out


def test_plan_lowers_ranks_only_with_the_flag_and_weights(profile_json: Path, tmp_path: Path) -> None:
    """fc1 fits no device at rank 24; --lower-ranks needs the trained weights (tests/planner/test_lowering.py)."""
    devices = tmp_path / "devices.yaml"
    devices.write_text(
        "devices: [{name: a, memory: 40KB}, {name: b, memory: 40KB}, {name: c, memory: 40KB}]\n"
        "links: {default: {bandwidth: 1.0e+9, latency: 0}}\n"
    )
    spec_copy = tmp_path / "default.yaml"
    spec_copy.write_text(DEFAULT.read_text())
    args = ["plan", str(spec_copy), "--devices", str(devices), "--batch", "8", "--seconds", "0.1"]
    res = CliRunner().invoke(main, [*args, "--placement", str(tmp_path / "p.yaml")])
    assert res.exit_code == 2 and "fc1" in res.output, res.output  # fc1 fits no device at rank 24
    res = CliRunner().invoke(main, [*args, "--placement", str(tmp_path / "p.yaml"), "--lower-ranks"])
    assert res.exit_code == 2 and "--lower-ranks: expected trained weights" in res.output, res.output
    assert not (tmp_path / "p.yaml").exists() and not (tmp_path / "default.planned.yaml").exists()
