"""HessianFree end to end on problems with known solutions (float64 references)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from toolkit.layers import FactorizedLinear
from toolkit.optim import HessianFree, StepInfo


def _regression(n: int = 60, d: int = 5, seed: int = 0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(d, 1, generator=g, dtype=dtype)
    y = x @ w + 0.3 + 0.1 * torch.randn(n, 1, generator=g, dtype=dtype)
    return x, y


def _linear(d: int, bias: bool = True, dtype: torch.dtype = torch.float64) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(d, 1, bias=bias).to(dtype)


def test_linear_least_squares_in_one_step() -> None:
    x, y = _regression()
    model = _linear(5)
    opt = HessianFree(model, F.mse_loss, damping=1e-10, min_damping=1e-12, curvature_fraction=1.0,
                      cg_max_iters=50, preconditioner_alpha=0.0)  # fmt: skip
    info = opt.step((x,), y)
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    sol = torch.linalg.lstsq(x1, y).solution.flatten()
    got = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    assert info.accepted and info.step_size == 1.0
    torch.testing.assert_close(got, sol, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_ridge_reaches_closed_form(curvature: str) -> None:
    x, y = _regression()
    model = _linear(5)
    l2 = 0.5
    opt = HessianFree(model, F.mse_loss, l2=l2, curvature=curvature, curvature_fraction=1.0, damping=1e-3)
    for _ in range(8):
        opt.step((x,), y)
    # ∇: (2/n) X1ᵀ(X1 w - y) + l2·D w = 0, D = diag(1, …, 1, 0) (the bias is not penalized)
    n = len(x)
    x1 = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    d = torch.diag(torch.tensor([1.0] * 5 + [0.0], dtype=x.dtype))
    sol = torch.linalg.solve(2 / n * x1.T @ x1 + l2 * d, 2 / n * x1.T @ y).flatten()
    got = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    torch.testing.assert_close(got, sol, rtol=1e-6, atol=1e-8)


def test_l1_reaches_sklearn_lasso() -> None:
    from sklearn.linear_model import Lasso

    x, y = _regression(n=80, d=8, seed=3)
    x[:, 5:] *= 0.05  # weak features: Lasso zeros them
    alpha = 0.1
    ref = Lasso(alpha=alpha, tol=1e-12, max_iter=100000).fit(x.numpy(), y.numpy().ravel())
    model = _linear(8)
    # sklearn minimizes (1/(2n))‖y - Xw - b‖² + α‖w‖₁, i.e. ½·mse + α‖w‖₁ (bias unpenalized)
    opt = HessianFree(
        model, lambda z, t: 0.5 * F.mse_loss(z, t), l1=alpha, curvature_fraction=1.0, damping=1e-3
    )
    for _ in range(25):
        opt.step((x,), y)
    w = model.weight.detach().flatten().numpy()
    assert np.count_nonzero(ref.coef_ == 0) > 0
    np.testing.assert_allclose(w, ref.coef_, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(w == 0, ref.coef_ == 0)
    np.testing.assert_allclose(model.bias.item(), ref.intercept_, rtol=1e-5, atol=1e-7)


class _Rosenbrock(nn.Module):
    """Residuals r(x, y) = (10(y - x²), 1 - x); ‖r‖² is the Rosenbrock function."""

    def __init__(self) -> None:
        super().__init__()
        self.xy = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))

    def forward(self, dummy: torch.Tensor) -> torch.Tensor:
        x, y = self.xy
        r = torch.stack([10 * (y - x * x), 1 - x])
        return r.expand(dummy.shape[0], 2)  # (B, 2), one identical row per example


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_rosenbrock_converges(curvature: str) -> None:
    model = _Rosenbrock()
    opt = HessianFree(model, lambda r, t: r.pow(2).sum(1).mean(), curvature=curvature,
                      curvature_fraction=1.0, preconditioner_alpha=0.0, damping=1.0)  # fmt: skip
    dummy = torch.zeros(1, 1, dtype=torch.float64)
    for _ in range(200):
        info = opt.step((dummy,), dummy)
        if info.loss < 1e-20:
            break
    torch.testing.assert_close(model.xy.detach(), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_group_lasso_prunes_to_target_rank() -> None:
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(12, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 10, generator=g, dtype=torch.float64
    )
    x = torch.randn(200, 10, generator=g, dtype=torch.float64)
    y = x @ w_true.T
    torch.manual_seed(0)
    model = nn.Sequential(FactorizedLinear(10, 12, rank=8, bias=False)).double()
    layer = model[0]
    opt = HessianFree(
        model, F.mse_loss, group_lasso=1e-2, prune_threshold=1e-3, curvature_fraction=1.0, damping=1e-2
    )
    pruned: dict[str, list[int]] = {}
    for _ in range(150):  # the step that prunes the last component moves with the K-FAC draws (40-95)
        info = opt.step((x,), y)
        for k, v in info.pruned.items():
            pruned.setdefault(k, []).extend(v)
        if layer.rank == 3:
            break
    assert layer.rank == 3 and layer.U.weight.shape == (12, 3) and layer.V.weight.shape == (3, 10)
    assert len(pruned["0"]) == 5
    # the optimizer was re-bound to the new, smaller parameters and keeps working
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in model.parameters()}
    # The objective is the data loss plus the group-lasso penalty: the next step lowers their sum
    # (the data term alone may rise a little while the penalty shrinks the components).
    info = opt.step((x,), y)
    assert info.accepted and info.new_loss <= info.loss + 1e-12
    objective = F.mse_loss(model(x), y).item() + 1e-2 * layer.component_norms().sum().item()
    assert objective == pytest.approx(info.new_loss, rel=1e-9)
    rel = (layer.dense_weight() - w_true).norm() / w_true.norm()
    assert rel < 0.05


def test_non_finite_loss_rejected_without_changing_params(small_net) -> None:
    net = small_net()
    x = torch.randn(8, 3, dtype=torch.float64)
    t = torch.randn(8, 2, dtype=torch.float64)
    opt = HessianFree(net, F.mse_loss, damping=2.0)
    before = [p.detach().clone() for p in net.parameters()]
    x_bad = x.clone()
    x_bad[3, 1] = float("nan")
    info = opt.step((x_bad,), t)
    assert not info.accepted and info.step_size == 0.0
    assert info.next_damping == pytest.approx(3.0) and opt.damping == pytest.approx(3.0)
    for p, q in zip(net.parameters(), before):
        assert torch.equal(p.detach(), q)
    # a loss that turns non-finite for every candidate step is rejected too
    calls = {"n": 0}

    def flaky(z: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = F.mse_loss(z, tt)
        return loss if calls["n"] <= 1 or torch.is_grad_enabled() or z.shape[0] != 8 else loss * float("inf")

    opt2 = HessianFree(net, flaky, curvature_fraction=1.0)
    info2 = opt2.step((x,), t)
    assert not info2.accepted
    for p, q in zip(net.parameters(), before):
        assert torch.equal(p.detach(), q)


def _run(model: nn.Module, opt: HessianFree, batches, start: int, stop: int) -> list[StepInfo]:
    return [opt.step((batches[i][0],), batches[i][1]) for i in range(start, stop)]


def test_resume_equals_uninterrupted(small_net, tmp_path) -> None:
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64))
               for _ in range(6)]  # fmt: skip
    kw = {"l2": 1e-3, "curvature_sampling": "random", "cg_max_iters": 20}
    net_a = small_net(seed=1)
    opt_a = HessianFree(net_a, F.mse_loss, **kw)
    infos_a = _run(net_a, opt_a, batches, 0, 6)

    net_b = small_net(seed=1)
    opt_b = HessianFree(net_b, F.mse_loss, **kw)
    _run(net_b, opt_b, batches, 0, 3)
    torch.save({"model": net_b.state_dict(), "opt": opt_b.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    net_c = small_net(seed=7)
    net_c.load_state_dict(ck["model"])
    opt_c = HessianFree(net_c, F.mse_loss, **{**kw, "seed": 123, "damping": 9.0})
    opt_c.load_state_dict(ck["opt"])
    infos_c = _run(net_c, opt_c, batches, 3, 6)
    for pa, pc in zip(net_a.parameters(), net_c.parameters()):
        assert torch.equal(pa, pc)
    for ia, ic in zip(infos_a[3:], infos_c):
        assert (ia.loss, ia.damping, ia.cg_iters, ia.chosen_iter, ia.step_size) == (
            ic.loss,
            ic.damping,
            ic.cg_iters,
            ic.chosen_iter,
            ic.step_size,
        )


@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
def test_float32_decreases_loss(small_net, curvature: str) -> None:
    net = small_net(dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    t = torch.sin(x[:, :2])
    opt = HessianFree(net, F.mse_loss, curvature=curvature)
    first = opt.step((x,), t)
    for _ in range(5):
        last = opt.step((x,), t)
    assert last.new_loss < 0.5 * first.loss


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(small_net, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g, dtype=dtype)
    t = torch.sin(x[:, :2])
    nets = [small_net(dtype=dtype), small_net(dtype=dtype).cuda()]
    for net in nets:
        opt = HessianFree(net, F.mse_loss, l2=1e-3)
        dev = next(net.parameters()).device
        for _ in range(3):
            opt.step((x.to(dev),), t.to(dev))
    tol = 1e-3 if dtype == torch.float32 else 1e-8
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b.cpu(), rtol=tol, atol=tol)


def test_bad_settings_rejected(small_net) -> None:
    net = small_net()
    with pytest.raises(ValueError, match="damping: expected a number in"):
        HessianFree(net, F.mse_loss, damping=0.0)
    with pytest.raises(ValueError, match="curvature: expected one of"):
        HessianFree(net, F.mse_loss, curvature="kfac")
    with pytest.raises(TypeError, match=r"model: expected a torch\.nn\.Module"):
        HessianFree("net", F.mse_loss)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected a parameter of the model"):
        HessianFree(net, F.mse_loss, params=[nn.Parameter(torch.zeros(2))])
