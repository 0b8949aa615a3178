"""Layer-wise refit: closed-form steps against numpy least squares, and error reduction."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from toolkit.factorize import RefitOptions, factorize_module, lstsq_u, lstsq_v, refit_layer, relative_error
from toolkit.factorize.svd import build_factorized, layer_matrix, svd_factors


def test_lstsq_u_matches_numpy_lstsq() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64)
    y = torch.randn(200, 7, generator=g, dtype=torch.float64)
    v = torch.randn(4, 12, generator=g, dtype=torch.float64)
    u, b = lstsq_u(x, y, v, bias=True)
    z = np.hstack([(x @ v.t()).numpy(), np.ones((200, 1))])
    ref, *_ = np.linalg.lstsq(z, y.numpy(), rcond=None)  # (r+1, out)
    np.testing.assert_allclose(u.numpy(), ref[:-1].T, rtol=1e-8, atol=1e-10)
    assert b is not None
    np.testing.assert_allclose(b.numpy(), ref[-1], rtol=1e-8, atol=1e-10)


def test_lstsq_v_satisfies_normal_equations() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 10, generator=g, dtype=torch.float64)
    r = torch.randn(300, 6, generator=g, dtype=torch.float64)
    u = torch.randn(6, 3, generator=g, dtype=torch.float64)
    v = lstsq_v(x, r, u)
    # ∂/∂V ‖X Vᵀ Uᵀ − R‖² = 0  ⇔  Uᵀ (X Vᵀ Uᵀ − R)ᵀ X = 0; compare with a float64 gradient by autograd
    vv = v.clone().requires_grad_(True)
    loss = (x @ vv.t() @ u.t() - r).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, vv)
    assert float(grad.abs().max()) < 1e-8 * float(loss.detach())


def test_refit_reduces_output_error_and_reaches_closed_form_optimum_for_u() -> None:
    torch.manual_seed(2)
    dense = nn.Linear(24, 32)
    inputs = [torch.randn(128, 24) * torch.logspace(-1, 1, 24) for _ in range(2)]
    u0, v0 = svd_factors(layer_matrix(dense), 4)
    fact = build_factorized(dense, u0, v0)
    before = relative_error(dense, fact, inputs)
    # U-step only, no Adam: the result must equal the least-squares U for the SVD's V
    after = refit_layer(fact, dense, inputs, RefitOptions(alternations=1, v_step=False, steps=0, ridge=0.0))
    assert after < before
    x = torch.cat(inputs).double().numpy()
    y = x @ dense.weight.detach().double().numpy().T + dense.bias.detach().double().numpy()
    z = np.hstack([x @ v0.numpy().T, np.ones((x.shape[0], 1))])
    ref, *_ = np.linalg.lstsq(z, y, rcond=None)
    np.testing.assert_allclose(fact.U.weight.detach().double().numpy(), ref[:-1].T, rtol=1e-3, atol=1e-4)
    # alternating least squares + Adam steps lowers it further (never raises it)
    full = refit_layer(fact, dense, inputs, RefitOptions(alternations=3, steps=10))
    assert full <= after + 1e-9


def test_refit_conv_reduces_error() -> None:
    torch.manual_seed(3)
    dense = nn.Conv2d(4, 12, 3, padding=1)
    inputs = [torch.randn(4, 4, 8, 8) * torch.tensor([0.1, 1.0, 3.0, 0.3])[None, :, None, None]]
    fact = build_factorized(dense, *svd_factors(layer_matrix(dense), 3))
    before = relative_error(dense, fact, inputs)
    after = refit_layer(fact, dense, inputs, RefitOptions(steps=5))
    assert after < before
    assert after == pytest.approx(relative_error(dense, fact, inputs), rel=1e-6)


def test_factorize_module_refit_reports_lower_error() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    cal = [torch.randn(128, 32) * torch.logspace(-1, 1, 32) for _ in range(2)]
    dense = copy.deepcopy(model)
    rep = factorize_module(model, ratio=0.25, method="asvd", calibration=cal, refit=True)
    for lr in rep.layers:
        if lr.rank:
            assert lr.error_refit is not None and lr.error is not None
            assert lr.error_refit <= lr.error
    plain = copy.deepcopy(dense)
    factorize_module(plain, ratio=0.25, method="asvd", calibration=cal)
    assert relative_error(dense, model, cal) < relative_error(dense, plain, cal)
