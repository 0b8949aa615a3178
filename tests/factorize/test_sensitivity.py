"""Sensitivity-based rank allocation: measurement leaves the model intact, allocation is the
brute-force optimum on small instances, and factorize_module applies per-layer ranks."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from toolkit.factorize import factorize_module
from toolkit.factorize.sensitivity import (
    LayerSensitivity,
    SensitivityReport,
    allocate_by_sensitivity,
    measure_sensitivity,
)
from toolkit.layers import FactorizedLinear


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 8)
    ).double()
    return model, torch.randn(256, 32, dtype=torch.float64)


def test_measure_sensitivity_restores_the_model_and_orders_ranks() -> None:
    model, x = _mlp()
    with torch.no_grad():
        reference = model(x)

    def evaluate(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(x) - reference).pow(2).mean())

    before = copy.deepcopy(model.state_dict())
    rep = measure_sensitivity(model, evaluate, include=r"^[02]$", calibration=[(x,)])
    assert rep.baseline == 0.0
    assert [e.name for e in rep.layers] == ["0", "2"]
    for e in rep.layers:
        ranks = sorted(e.increase)
        assert len(ranks) >= 3
        incs = [e.increase[r] for r in ranks]
        assert all(v > 0 for v in incs) and incs == sorted(incs, reverse=True)  # more rank, less harm
    assert all(type(model[i]) is nn.Linear for i in (0, 2, 4))  # every layer put back
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def _brute_force(report: SensitivityReport, budget: int) -> float:
    options = []
    for e in report.layers:
        out_f, n = e.shape
        options.append([(e.dense_params, 0.0)] + [(r * (out_f + n), inc) for r, inc in e.increase.items()])
    best = float("inf")
    for combo in itertools.product(*options):
        if sum(p for p, _ in combo) <= budget:
            best = min(best, sum(i for _, i in combo))
    return best


@pytest.mark.parametrize("share", [0.35, 0.5, 0.65, 0.8])
def test_allocation_matches_brute_force(share: float) -> None:
    layers = [
        LayerSensitivity("a", (64, 64), 4096, {8: 0.9, 16: 0.3, 24: 0.1}),  # sensitive
        LayerSensitivity("b", (64, 64), 4096, {8: 0.05, 16: 0.02, 24: 0.01}),  # insensitive
        LayerSensitivity("c", (128, 64), 8192, {8: 0.4, 16: 0.15, 32: 0.05}),
    ]
    report = SensitivityReport(baseline=1.0, layers=layers)
    budget = int(share * sum(e.dense_params for e in layers))
    allocate_by_sensitivity(report, budget)
    assert report.factor_params <= budget
    assert report.predicted_increase == pytest.approx(_brute_force(report, budget))


def test_allocation_rejects_an_impossible_budget() -> None:
    report = SensitivityReport(1.0, [LayerSensitivity("a", (64, 64), 4096, {8: 0.9})])
    with pytest.raises(ValueError, match="budget"):
        allocate_by_sensitivity(report, 100)


def test_factorize_module_takes_per_layer_ranks() -> None:
    model, _x = _mlp()
    rep = factorize_module(model, rank={"0": 6, "2": 0}, method="svd")
    assert isinstance(model[0], FactorizedLinear) and model[0].rank == 6
    assert isinstance(model[2], nn.Linear) and isinstance(model[4], nn.Linear)  # 0 and absent: dense
    assert {lr.name: lr.rank for lr in rep.layers} == {"0": 6, "2": 0, "4": 0}
    with pytest.raises(ValueError, match="rank"):
        factorize_module(model, rank={"2": -1})
