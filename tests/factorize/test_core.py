"""factorize_module: SVD / ASVD against float64 numpy references, budget, report, input checks."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from toolkit.factorize import allocate_budget, factorize_module, relative_error
from toolkit.factorize.budget import BudgetItem
from toolkit.layers import FactorizedConv2d, FactorizedEmbedding, FactorizedLinear, max_useful_rank


def _truncated(m: np.ndarray, r: int) -> np.ndarray:
    p, s, qh = np.linalg.svd(m, full_matrices=False)
    return (p[:, :r] * s[:r]) @ qh[:r]


def _anisotropic(n_batches: int, rows: int, dim: int, seed: int = 0) -> list[torch.Tensor]:
    """Inputs whose channels have scales spread over three decades, mixed by a random rotation."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 1, dim)
    return [torch.randn(rows, dim, generator=g) * scales for _ in range(n_batches)]


def test_svd_equals_truncated_svd_reconstruction() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Conv2d(3, 16, 3, padding=1), nn.Embedding(50, 20))
    model[2] = nn.Conv2d(3, 16, 3, padding=1)
    dense = copy.deepcopy(model)
    report = factorize_module(model, rank=5, method="svd")
    assert isinstance(model[0], FactorizedLinear) and isinstance(model[2], FactorizedConv2d)
    assert isinstance(model[3], FactorizedEmbedding)
    w = dense[0].weight.detach().double().numpy()
    np.testing.assert_allclose(
        model[0].dense_weight().detach().double().numpy(), _truncated(w, 5), rtol=1e-5, atol=1e-6
    )
    k = dense[2].weight.detach().double().numpy().reshape(16, -1)
    np.testing.assert_allclose(
        model[2].dense_weight().detach().double().numpy().reshape(16, -1),
        _truncated(k, 5),
        rtol=1e-5,
        atol=1e-6,
    )
    e = dense[3].weight.detach().double().numpy()
    np.testing.assert_allclose(
        model[3].dense_weight().detach().double().numpy(), _truncated(e, 5), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(model[0].U.bias.detach().numpy(), dense[0].bias.detach().numpy())
    assert [lr.rank for lr in report.layers] == [5, 5, 5]
    assert report.layers[0].factor_params == 5 * (24 + 40)


def test_asvd_factors_match_scaled_svd_reference_and_beat_svd() -> None:
    torch.manual_seed(1)
    layer = nn.Linear(32, 48)
    cal = _anisotropic(4, 128, 32)
    a, b = nn.Sequential(copy.deepcopy(layer)), nn.Sequential(copy.deepcopy(layer))
    rep_asvd = factorize_module(a, rank=6, method="asvd", calibration=cal, alpha=0.5)
    rep_svd = factorize_module(b, rank=6, method="svd", calibration=cal)
    # reference: numpy SVD of W·diag(s), s = max(mean |x|, 0.1·mean)^0.5, truncated, then unscaled
    x = torch.cat(cal).double().numpy()
    mean_abs = np.abs(x).mean(0)
    s = np.maximum(mean_abs, 0.1 * mean_abs.mean()) ** 0.5
    w = layer.weight.detach().double().numpy()
    ref = _truncated(w * s[None, :], 6) / s[None, :]
    np.testing.assert_allclose(a[0].dense_weight().detach().double().numpy(), ref, rtol=1e-4, atol=1e-6)
    err_asvd, err_svd = rep_asvd.layers[0].error, rep_svd.layers[0].error
    assert err_asvd is not None and err_svd is not None
    assert err_asvd <= err_svd
    assert rep_asvd.layers[0].error_svd == pytest.approx(err_svd, rel=1e-6)
    # the reported error is ‖Y − Ŷ‖/‖Y‖ computed independently in float64
    y = x @ w.T + layer.bias.detach().double().numpy()
    y_hat = x @ ref.T + layer.bias.detach().double().numpy()
    assert err_asvd == pytest.approx(np.linalg.norm(y - y_hat) / np.linalg.norm(y), rel=1e-4)


def test_asvd_beats_svd_on_correlated_inputs_in_a_network() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    mix = torch.linalg.qr(torch.randn(32, 32))[0] * 0.3 + torch.eye(32)  # correlated channels
    cal = [x @ mix for x in _anisotropic(3, 128, 32, seed=3)]
    errs = {}
    for method in ("svd", "asvd"):
        m = copy.deepcopy(model)
        rep = factorize_module(m, rank=4, include=r"^0$", method=method, calibration=cal)
        errs[method] = rep.layers[0].error
        assert relative_error(model, m, cal) == pytest.approx(relative_error(model, m, cal))
    assert errs["asvd"] <= errs["svd"]


def test_allocate_budget_respects_budget_and_favours_slow_spectra() -> None:
    items = {
        "fast": BudgetItem(64, 64, torch.tensor([10.0 * 0.3**k for k in range(64)])),
        "slow": BudgetItem(64, 64, torch.linspace(2.0, 1.0, 64)),
    }
    for budget in (256, 1000, 3000, 64 * 64):
        ranks = allocate_budget(items, budget)
        assert sum(r * 128 for r in ranks.values()) <= budget
        assert all(1 <= r <= max_useful_rank(64, 64) for r in ranks.values())
    ranks = allocate_budget(items, 3000)
    assert ranks["slow"] > ranks["fast"]
    with pytest.raises(ValueError, match="budget"):
        allocate_budget(items, 100)


def test_factorize_module_budget_share() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 32))
    cal = _anisotropic(2, 64, 64)
    rep = factorize_module(model, budget=0.3, method="asvd", calibration=cal)
    assert rep.factor_params <= 0.3 * rep.dense_params
    assert rep.factor_params > 0.25 * rep.dense_params  # the budget is actually spent
    assert all(lr.rank >= 1 for lr in rep.layers)


def test_report_json_and_table() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    rep = factorize_module(model, rank=4, calibration=[torch.randn(8, 16)])
    data = json.loads(rep.to_json())
    assert data["dense_params"] == rep.dense_params and len(data["layers"]) == 2
    assert data["layers"][1]["rank"] == 0 and "kept dense" in data["layers"][1]["note"]  # 4x16: no gain
    assert rep.table().row_count == 3


def test_include_pattern_selects_layers() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    rep = factorize_module(model, rank=2, include=r"^2$")
    assert [lr.name for lr in rep.layers] == ["2"]
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], FactorizedLinear)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 2, "ratio": 0.5}, "exactly one"),
        ({}, "exactly one"),
        ({"ratio": 1.5}, "ratio"),
        ({"rank": 0}, "rank"),
        ({"ratio": 0.5, "method": "pca"}, "method"),
        ({"ratio": 0.5, "method": "asvd"}, "calibration"),
        ({"ratio": 0.5, "refit": True}, "calibration"),
        ({"ratio": 0.5, "include": "("}, "include"),
        ({"ratio": 0.5, "include": "nothing"}, "none match"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factorize_module(nn.Sequential(nn.Linear(8, 8)), **kwargs)
