"""EKFAC (eigenvalue-corrected K-FAC) against dense float64 Gauss-Newton blocks from torch.func."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_optim_kfac import LOSSES, block_index, dense_ggn
from torch import nn

from toolkit.layers import FactorizedLinear
from toolkit.optim import HessianFree
from toolkit.optim.flat import FlatParams
from toolkit.optim.kfac import KFAC


def _net_and_batch(loss_name: str, n: int, seed: int = 0):
    """A float64 5-(factorized rank 2)-6-3 net, ``n`` inputs and a loss of ``LOSSES`` on random targets."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(FactorizedLinear(5, 6, rank=2), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    loss_fn, make_t = LOSSES[loss_name]
    t = make_t(g, n)
    return model, x, lambda z: loss_fn(z, t)


def _exact_ekfac(loss_name: str, n: int, seed: int = 0) -> tuple[KFAC, torch.Tensor]:
    """EKFAC with exact factors on ``_net_and_batch``, and the dense float64 GN matrix it is checked against."""
    model, x, loss = _net_and_batch(loss_name, n, seed)
    ref, flat = dense_ggn(model, x, loss)
    kfac = KFAC(model, flat.params, flat.offsets, samples="exact", corrected=True)
    kfac.update((x,), loss)
    return kfac, ref


def _rotation(blk) -> torch.Tensor:
    """Q = Q_G ⊗ Q_A in the row-major order of [W b] (block_index's order)."""
    return torch.kron(blk.vec_g, blk.vec_a)


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_corrected_eigenvalues_are_the_diagonal_of_the_rotated_block(loss_name: str) -> None:
    """s = diag(Qᵀ C_l Q) with C_l the dense Gauss-Newton block (jacrev / hessian), every block."""
    kfac, ref = _exact_ekfac(loss_name, n=7)
    for blk in kfac.blocks:
        idx = block_index(blk)
        q = _rotation(blk)
        want = torch.diagonal(q.T @ ref[idx][:, idx] @ q)
        assert blk.scale is not None
        torch.testing.assert_close(blk.scale.reshape(-1), want, rtol=1e-9, atol=1e-13)


def test_corrected_is_no_farther_from_the_block_than_kfac() -> None:
    """Both are diagonal in the same eigenbasis; s is the best such diagonal (Frobenius norm)."""
    kfac, ref = _exact_ekfac("cross_entropy", n=9, seed=1)
    for blk in kfac.blocks:
        idx = block_index(blk)
        q = _rotation(blk)
        block = ref[idx][:, idx]
        kron = torch.outer(blk.eig_g, blk.eig_a).reshape(-1)
        err_kfac = float((q @ torch.diag(kron) @ q.T - block).norm())
        err_ekfac = float((q @ torch.diag(blk.scale.reshape(-1)) @ q.T - block).norm())
        assert err_ekfac <= err_kfac * (1 + 1e-12), (err_ekfac, err_kfac)
    assert any(
        float((blk.scale - torch.outer(blk.eig_g, blk.eig_a)).abs().max()) > 1e-6 for blk in kfac.blocks
    )


@pytest.mark.parametrize("n_in, n", [(4, 12), (40, 6)])  # the second: A has rank ≤ 6 < 41 (low-rank path)
def test_corrected_inverse_is_the_dense_solve(n_in: int, n: int) -> None:
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n_in, 5)).double()
    x = torch.randn(n, n_in, generator=g, dtype=torch.float64)
    t = torch.randn(n, 5, generator=g, dtype=torch.float64)
    flat = FlatParams(model, list(model.parameters()))
    kfac = KFAC(model, flat.params, flat.offsets, samples="exact", corrected=True)
    loss = lambda z: (z - t).pow(2).sum(1).mean()  # noqa: E731
    kfac.update((x,), loss)
    (blk,) = kfac.blocks
    idx = block_index(blk)
    q = _rotation(blk)
    r = torch.randn(flat.numel, generator=g, dtype=torch.float64)
    for lam in (1e-4, 0.3):
        m = q @ torch.diag(blk.scale.reshape(-1) + lam) @ q.T
        want = torch.linalg.solve(m, r[idx])
        got = kfac.inverse(lam)(r)[idx]
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10 * float(want.abs().max()))
    with pytest.raises(ValueError, match="EKFAC"):
        kfac.inverse(0.1, mode="pi")


def test_monte_carlo_corrected_eigenvalues_are_unbiased() -> None:
    """With K-FAC's bases fixed, E[s] over draws of w is the exact s (cross-entropy)."""
    model, x, loss = _net_and_batch("cross_entropy", n=6, seed=2)
    flat = FlatParams(model, list(model.parameters()))
    exact = KFAC(model, flat.params, flat.offsets, samples="exact", corrected=True)
    exact.update((x,), loss)
    mc = KFAC(model, flat.params, flat.offsets, samples=20000, seed=0, corrected=True)
    rows = mc._estimate((x,), loss, keep_rows=True)
    for blk, (_, _, (a_rows, g_draws)) in zip(exact.blocks, rows):
        pa = (a_rows @ blk.vec_a).square()
        s = sum((gk @ blk.vec_g).square().T @ pa for gk in g_draws)
        assert float((s - blk.scale).norm() / blk.scale.norm()) < 0.05


def test_hessian_free_with_ekfac_trains_and_resumes_exactly(trains_and_resumes) -> None:
    state = trains_and_resumes(dict(preconditioner="ekfac", kfac_every=2, curvature_fraction=0.25))
    assert all(len(entry) == 5 for entry in state["state"]["hessian_free"]["kfac"])  # s is saved


def test_ekfac_with_pi_damping_is_refused(small_net) -> None:
    with pytest.raises(ValueError, match=r"kfac_damping: 'pi'.*'ekfac' takes 'eigen'"):
        HessianFree(small_net(), F.mse_loss, preconditioner="ekfac", kfac_damping="pi")
