"""Rank lowering of a trained model: best rank-k truncation against a float64 dense SVD, the
validation accuracy `rlhf plan --lower-ranks` reports against an independent numpy evaluation,
and bad inputs (exit 2, one line, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.numpy import load_file

from toolkit.cli import main
from toolkit.errors import InputError
from toolkit.layers.factorized import FactorizedConv2d, FactorizedEmbedding, FactorizedLinear
from toolkit.planner import ModelProfile, Unit, parse_devices, plan_least_lowering, plan_pipeline
from toolkit.planner.lowering import lower_model, truncate_factors, truncate_layer
from toolkit.runtime.placement import load_placement


def best_rank_k(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best rank-k approximation of w by numpy's float64 SVD of the dense matrix, and its σ."""
    p, s, qt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    return (p[:, :k] * s[:k]) @ qt[:k], s


@pytest.mark.parametrize(("out", "r", "n"), [(40, 12, 30), (9, 7, 50), (30, 10, 6)])
def test_truncate_factors_equals_dense_svd(out: int, r: int, n: int) -> None:
    rng = np.random.default_rng(out + r + n)
    u, v = rng.standard_normal((out, r)), rng.standard_normal((r, n))
    w = u @ v
    for k in range(1, r + 1):
        nu, nv, s = truncate_factors(torch.from_numpy(u), torch.from_numpy(v), k)
        assert nu.shape == (out, k) and nv.shape == (k, n) and nu.dtype == torch.float64
        ref, s_ref = best_rank_k(w, k)
        np.testing.assert_allclose((nu @ nv).numpy(), ref, atol=1e-10 * np.abs(w).max())
        np.testing.assert_allclose(s.numpy(), s_ref[: s.numel()], rtol=1e-10)
        # balanced split: U'ᵀU' = V'V'ᵀ = diag(σ_1..σ_k)
        diag = np.diag(s_ref[:k]) if k <= min(out, n) else None
        if diag is not None:
            np.testing.assert_allclose((nu.T @ nu).numpy(), diag, atol=1e-9 * s_ref[0])
            np.testing.assert_allclose((nv @ nv.T).numpy(), diag, atol=1e-9 * s_ref[0])


def test_truncate_factors_not_by_dropping_columns() -> None:
    """Components ordered by size the other way round: dropping columns would keep the small ones."""
    rng = np.random.default_rng(0)
    q1, _ = np.linalg.qr(rng.standard_normal((20, 6)))
    q2, _ = np.linalg.qr(rng.standard_normal((15, 6)))
    scales = np.array([0.01, 0.1, 1.0, 3.0, 10.0, 30.0])  # smallest first
    u, v = q1 * scales, q2.T
    nu, nv, _ = truncate_factors(torch.from_numpy(u), torch.from_numpy(v), 2)
    ref, _ = best_rank_k(u @ v, 2)
    np.testing.assert_allclose((nu @ nv).numpy(), ref, atol=1e-10)
    dropped = u[:, :2] @ v[:2]
    assert np.linalg.norm(u @ v - dropped) > 10 * np.linalg.norm(u @ v - ref)


def test_truncate_factors_rank_deficient_and_bad_rank() -> None:
    rng = np.random.default_rng(1)
    u = rng.standard_normal((8, 5))
    u[:, 3:] = u[:, :2] @ rng.standard_normal((2, 2))  # U·V has rank 3
    v = rng.standard_normal((5, 7))
    nu, nv, _ = truncate_factors(torch.from_numpy(u), torch.from_numpy(v), 4)
    assert nu.shape == (8, 4) and nv.shape == (4, 7)
    np.testing.assert_allclose((nu @ nv).numpy(), u @ v, atol=1e-10 * np.abs(u @ v).max())
    with pytest.raises(InputError, match=r"rank in \[1, 5\]"):
        truncate_factors(torch.from_numpy(u), torch.from_numpy(v), 6)
    with pytest.raises(InputError, match="expected factors"):
        truncate_factors(torch.from_numpy(u), torch.from_numpy(v.T), 2)


def _flat(layer: Any) -> np.ndarray:
    w = layer.dense_weight().detach().double().numpy()
    if isinstance(layer, FactorizedEmbedding):
        return w.T  # (d, vocab) = U·V
    return w.reshape(w.shape[0], -1)


@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
def test_truncate_layer_each_kind(kind: str) -> None:
    torch.manual_seed(0)
    layer: Any
    if kind == "linear":
        layer = FactorizedLinear(24, 18, 10).double()
        x = torch.randn(5, 24, dtype=torch.float64)
    elif kind == "conv2d":
        layer = FactorizedConv2d(3, 12, 3, 9, stride=2, padding=1).double()
        x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    else:
        layer = FactorizedEmbedding(30, 16, 8).double()
        x = torch.randint(0, 30, (4, 6))
    with torch.no_grad():  # make the components unordered, as after training
        for p in layer.parameters():
            p.mul_(torch.rand_like(p) + 0.5)
    w = _flat(layer)
    same, err0 = truncate_layer(layer, layer.rank)
    with torch.no_grad():
        np.testing.assert_allclose(same(x).numpy(), layer(x).numpy(), atol=1e-10)
    assert err0 == pytest.approx(0.0, abs=1e-7)
    k = 3
    small: Any
    small, err = truncate_layer(layer, k)
    assert type(small) is type(layer) and small.rank == k
    ref, s = best_rank_k(w, k)
    np.testing.assert_allclose(_flat(small), ref, atol=1e-10 * np.abs(w).max())
    assert err == pytest.approx(np.sqrt((s[k:] ** 2).sum() / (s**2).sum()), rel=1e-9)
    if kind != "embedding":
        np.testing.assert_array_equal(small.U.bias.detach().numpy(), layer.U.bias.detach().numpy())
    with torch.no_grad():
        small(x)  # it runs at the new shapes


def test_plan_least_lowering_prefers_higher_ranks() -> None:
    units = tuple(Unit(f"u{i}", 1.0, 101_000, (f"u{i}",), rank=16, rank_bytes=100_000) for i in range(4))
    profile = ModelProfile("big", 1, units, (0,) * 5)

    def cluster(memory: int) -> Any:
        return parse_devices(
            {
                "devices": [{"name": "a", "memory": memory}, {"name": "b", "memory": memory}],
                "links": {"default": {"bandwidth": 1e9}},
            }
        )

    # 0.25 would give the faster plan (less to compute) but 0.5 already fits: 0.5 it is
    fast = plan_pipeline(profile, cluster(120_000), rank_scales=(1.0, 0.5, 0.25))
    least = plan_least_lowering(profile, cluster(120_000), rank_scales=(1.0, 0.5, 0.25))
    assert min(s.rank_scale for s in fast.stages) == 0.25
    assert [s.rank_scale for s in least.stages] == [0.5, 0.5]
    assert all(s.memory_bytes <= 120_000 for s in least.stages)
    assert all(s.rank_scale == 1.0 for s in plan_least_lowering(profile, cluster(500_000)).stages)
    low = plan_least_lowering(profile, cluster(60_000), rank_scales=(1.0, 0.5, 0.25))
    assert min(s.rank_scale for s in low.stages) == 0.25
    with pytest.raises(InputError, match=r"no placement fits|expected a device"):
        plan_least_lowering(profile, cluster(10_000))


def test_latency_target_lowers_only_as_far_as_it_must() -> None:
    """Four units of 1 s whose factors are 100/101 of their bytes: at rank x0.5 a unit takes
    1 - (100/101) x 0.5 s, at x0.25 1 - (100/101) x 0.75 s; one device (latency = the sum)."""
    units = tuple(Unit(f"u{i}", 1.0, 101_000, (f"u{i}",), rank=16, rank_bytes=100_000) for i in range(4))
    profile = ModelProfile("big", 1, units, (0,) * 5)
    one = parse_devices({"devices": [{"name": "a", "memory": 10**9}]})
    scales = (1.0, 0.5, 0.25)

    def at(scale: float) -> float:  # four units at that rank scale, seconds
        return 4 * (1 - (100 / 101) * (1 - scale))

    def plan(target: float | None) -> Any:
        return plan_least_lowering(profile, one, rank_scales=scales, max_latency_s=target)

    assert [s.rank_scale for s in plan(None).stages] == [1.0]  # fits: no target, no lowering
    assert [s.rank_scale for s in plan(5.0).stages] == [1.0] and plan(5.0).latency_s == pytest.approx(4.0)
    assert [s.rank_scale for s in plan(3.0).stages] == [0.5] and plan(3.0).latency_s == pytest.approx(at(0.5))
    assert [s.rank_scale for s in plan(1.5).stages] == [0.25] and plan(1.5).latency_s == pytest.approx(
        at(0.25)
    )
    with pytest.raises(InputError, match=r"no plan meets 500 ms .* takes 1029\.703 ms"):
        plan(0.5)
    with pytest.raises(InputError, match="positive"):
        plan(0.0)


# --- a small trained digits model ------------------------------------------------------------

SPEC: dict[str, Any] = {
    "name": "digits-small",
    "inputs": {"x": {"shape": [64]}},
    "nodes": [
        {"id": "fc1", "op": "linear", "in": "x", "out": 64, "factorize": {"rank": 16}},
        {"id": "act1", "op": "relu", "in": "fc1"},
        {"id": "head", "op": "linear", "in": "act1", "out": 10, "factorize": "none"},
    ],
    "outputs": ["head"],
    "stages": [["fc1", "act1", "head"]],
    "train": {
        "data": {"builtin": "digits", "limit": 600},
        "loss": "cross_entropy",
        "batch_size": 64,
        "max_steps": 40,
        "optimizer": {"name": "adam", "lr": 0.01},
    },
}
# weights + the tensors in and out at batch 8: fc1 needs 12,544 bytes at rank 16, 8,448 at rank 8,
# 6,400 at rank 4; the head 4,968: only rank 4 fits
DEVICES = (
    "devices: [{name: a, memory: 7000}, {name: b, memory: 7000}]\nlinks: {default: {bandwidth: 1.0e+9}}\n"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from toolkit.train.run import train

    root = tmp_path_factory.mktemp("lowering")
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    res = train(spec, root / "run")
    assert res.status == "completed"
    devices = root / "devices.yaml"
    devices.write_text(DEVICES)
    return {"root": root, "spec": spec, "run": root / "run", "devices": devices}


def _weights(ckpt_dir: Path) -> dict[str, np.ndarray]:
    """node.param -> array, whatever stage the node sits in (``stages.<k>.`` stripped)."""
    raw = load_file(str(ckpt_dir / "model.safetensors"))
    return {k.split(".", 2)[2]: v.astype(np.float64) for k, v in raw.items()}


def _evaluate(w: dict[str, np.ndarray], fc1: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The MLP by hand in float64: relu(x·W1ᵀ + b1)·W2ᵀ + b2; (accuracy, mean cross-entropy)."""
    h = np.maximum(x.astype(np.float64) @ fc1.T + w["fc1.U.bias"], 0.0)
    z = h @ w["head.weight"].T + w["head.bias"]
    z = z - z.max(1, keepdims=True)
    loss = float((np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]).mean())
    return float((z.argmax(1) == y).mean()), loss


def _plan(trained: dict[str, Path], *extra: Any) -> Any:
    args = ["plan", "--devices", trained["devices"], "--batch", 8, "--seconds", 0.05, *extra]
    return CliRunner().invoke(main, [str(a) for a in args])


def test_lowering_reports_the_accuracy_of_the_truncated_model(trained: dict[str, Path]) -> None:
    from toolkit.checkpoint import find_checkpoint, load_model
    from toolkit.data import load_data
    from toolkit.spec import parse_spec

    root = trained["root"]
    placement, out = root / "placement.yaml", root / "lowered"
    res = _plan(trained, trained["run"], "--lower-ranks", "--placement", placement, "-o", out)
    assert res.exit_code == 0, res.output
    assert "fc1 16->4" in res.output and "validation accuracy" in res.output
    predicted = load_placement(placement).predicted
    assert predicted is not None

    # independent evaluation: numpy forward passes on the validation split the spec names
    spec = parse_spec(SPEC)
    val = load_data(spec.train.data, spec.inputs).val
    x, y = val.inputs["x"], val.targets.astype(np.int64)
    assert predicted["val_examples"] == len(y) == 60
    orig = _weights(find_checkpoint(trained["run"]))
    full = orig["fc1.U.weight"] @ orig["fc1.V.weight"]
    acc_full, loss_full = _evaluate(orig, full, x, y)
    assert predicted["val_accuracy_full_rank"] == acc_full
    assert predicted["val_loss_full_rank"] == pytest.approx(loss_full, rel=1e-5)
    reference, _ = best_rank_k(full, 4)  # the best rank-4 map, from the dense float64 SVD
    acc_low, loss_low = _evaluate(orig, reference, x, y)
    assert predicted["val_accuracy"] == acc_low
    assert predicted["val_loss"] == pytest.approx(loss_low, rel=1e-5)
    assert abs(loss_low - loss_full) > 1e-3  # the lowering costs something measurable

    # the lowered checkpoint written by -o: rank 8, the best rank-8 map, the plan's stages
    low = _weights(out / "checkpoints" / "best-00000000")
    assert low["fc1.U.weight"].shape == (64, 4) and low["fc1.V.weight"].shape == (4, 64)
    lowered_map = low["fc1.U.weight"] @ low["fc1.V.weight"]
    np.testing.assert_allclose(lowered_map, reference, atol=1e-5 * np.abs(full).max())
    assert predicted["val_accuracy"] == _evaluate(low, lowered_map, x, y)[0]
    for name in ("fc1.U.bias", "head.weight", "head.bias"):
        np.testing.assert_array_equal(low[name], orig[name])
    model, lspec, meta = load_model(out)
    assert model.ranks() == {"fc1": 4}
    report = json.loads((out / "lowering.json").read_text())
    assert lspec.stage_partition() == [st["nodes"] for st in report["stages"]]  # one per placed stage
    assert len(lspec.stage_partition()) == len(load_placement(placement).stages)
    assert report["lowered"][0]["node"] == "fc1" and report["lowered"][0]["rank_after"] == 4
    assert report["lowered_time"] == "measured"
    assert report["validation"]["lowered"]["accuracy"] == predicted["val_accuracy"]
    assert meta["lowered_from"] == str(trained["run"])


def test_run_source_equals_spec_with_run(trained: dict[str, Path]) -> None:
    """SOURCE a spec plus --run: the same model, the same lowering and validation figures."""
    root = trained["root"]
    res = _plan(
        trained, trained["spec"], "--run", trained["run"], "--lower-ranks", "--placement", root / "p2.yaml"
    )
    assert res.exit_code == 0, res.output
    pred = load_placement(root / "p2.yaml").predicted
    assert pred is not None and "fc1 16->4" in res.output
    planned = yaml.safe_load((root / "spec.planned.yaml").read_text())
    assert next(n for n in planned["nodes"] if n["id"] == "fc1")["factorize"] == {"rank": 4}


def test_no_lowering_when_everything_fits(trained: dict[str, Path], tmp_path: Path) -> None:
    devices = tmp_path / "big.yaml"
    devices.write_text("devices: [{name: a, memory: 1MB}]\n")
    args = ["plan", str(trained["run"]), "--devices", str(devices), "--seconds", "0.05"]
    res = CliRunner().invoke(main, [*args, "--lower-ranks", "--placement", str(tmp_path / "p.yaml")])
    assert res.exit_code == 0, res.output
    assert "no rank lowered" in res.output
    pred = load_placement(tmp_path / "p.yaml").predicted
    assert pred is not None and "val_accuracy" not in pred


def _bad(trained: dict[str, Path], tmp_path: Path, args: list[Any], match: str) -> None:
    placement = tmp_path / "placement.yaml"
    before = sorted(p.name for p in tmp_path.iterdir())
    res = CliRunner().invoke(
        main,
        [
            "plan",
            *[str(a) for a in args],
            "--devices",
            str(trained["devices"]),
            "--seconds",
            "0.05",
            "--placement",
            str(placement),
        ],
    )
    assert res.exit_code == 2, res.output
    assert match in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_lower_ranks_without_weights_exit_2(trained: dict[str, Path], tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(trained["spec"].read_text())
    _bad(trained, tmp_path, [spec, "--lower-ranks"], "--lower-ranks: expected trained weights")
    _bad(trained, tmp_path, [spec, "-o", tmp_path / "out"], "-o: expected trained weights")


def test_bad_run_inputs_exit_2(trained: dict[str, Path], tmp_path: Path) -> None:
    other = dict(SPEC, nodes=[dict(SPEC["nodes"][0], factorize={"rank": 12}), *SPEC["nodes"][1:]])
    spec = tmp_path / "other.yaml"
    spec.write_text(yaml.safe_dump(other, sort_keys=False))
    _bad(
        trained, tmp_path, [spec, "--run", trained["run"], "--lower-ranks"], "node 'fc1': SOURCE has rank 12"
    )
    _bad(trained, tmp_path, [trained["run"], "--run", trained["run"]], "is a run directory already")
    exists = tmp_path / "exists"
    exists.mkdir()
    _bad(trained, tmp_path, [trained["run"], "--lower-ranks", "-o", exists], "pass --overwrite")
    _bad(trained, tmp_path, [trained["run"], "-o", trained["run"], "--overwrite"], "expected a new directory")
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "run.json").write_text("{}")
    _bad(trained, tmp_path, [empty, "--lower-ranks"], "expected checkpoints")


def test_lower_model_keeps_the_original(trained: dict[str, Path]) -> None:
    from toolkit.checkpoint import load_model

    model, _, _ = load_model(trained["run"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new, records = lower_model(model, {"fc1": 5}, stages=[["fc1"], ["act1", "head"]])
    assert [r.rank_after for r in records] == [5] and new.ranks() == {"fc1": 5}
    assert len(new.stages) == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(InputError, match="node 'head': expected a factorized node"):
        lower_model(model, {"head": 2})


def test_profile_json_with_run(trained: dict[str, Path], tmp_path: Path) -> None:
    """A saved profile of the spec plus --run: planned without measuring the full model again."""
    prof = tmp_path / "profile.json"
    res = CliRunner().invoke(
        main, ["profile", str(trained["spec"]), "--batch", "8", "--seconds", "0.05", "-o", str(prof)]
    )
    assert res.exit_code == 0, res.output
    res = _plan(trained, prof, "--run", trained["run"], "--lower-ranks", "--placement", tmp_path / "p.yaml")
    assert res.exit_code == 0, res.output
    assert "fc1 16->4" in res.output
    pred = load_placement(tmp_path / "p.yaml").predicted
    assert pred is not None and pred["val_accuracy"] <= 1.0 and "val_accuracy_full_rank" in pred
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml", "profile.json"]  # no planned spec


def test_latency_target_on_the_command_line(trained: dict[str, Path]) -> None:
    root = trained["root"]
    big = root / "big.yaml"
    big.write_text("devices: [{name: a, memory: 1GB}]\n")
    args = [
        "plan",
        trained["run"],
        "--devices",
        big,
        "--batch",
        8,
        "--seconds",
        0.05,
        "--placement",
        root / "p3.yaml",
    ]
    res = CliRunner().invoke(main, [str(a) for a in [*args, "--max-latency-ms", 5]])
    assert res.exit_code == 2 and "expected --lower-ranks" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(main, [str(a) for a in [*args, "--lower-ranks", "--max-latency-ms", 1e6]])
    assert res.exit_code == 0, res.output
    assert "latency target 1e+06 ms: met" in res.output and "no rank lowered" in res.output
    assert (load_placement(root / "p3.yaml").predicted or {})["max_latency_s"] == 1e3
    res = CliRunner().invoke(main, [str(a) for a in [*args, "--lower-ranks", "--max-latency-ms", 1e-6]])
    assert res.exit_code == 2 and "no plan meets" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
