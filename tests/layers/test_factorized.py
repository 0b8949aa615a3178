"""Factorized layers against float64 dense references computed another way (numpy / F.conv2d)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from toolkit.layers import (
    FactorizedConv2d,
    FactorizedEmbedding,
    FactorizedLinear,
    choose_rank,
    factorized_modules,
    max_useful_rank,
    rank_for_energy,
    rank_for_ratio,
)

ATOL = 1e-6


def test_linear_equals_x_UVt_plus_b() -> None:
    torch.manual_seed(0)
    layer = FactorizedLinear(20, 12, rank=5).double()
    x = torch.randn(7, 3, 20, dtype=torch.float64)
    u, v, b = (t.detach().numpy() for t in (layer.U.weight, layer.V.weight, layer.U.bias))
    ref = x.numpy() @ (u @ v).T + b  # numpy float64, not torch
    np.testing.assert_allclose(layer(x).detach().numpy(), ref, rtol=0, atol=ATOL)
    np.testing.assert_allclose(layer.dense_weight().detach().numpy(), u @ v, rtol=0, atol=ATOL)
    assert layer.rank == 5
    assert sum(p.numel() for p in layer.parameters()) == 5 * (20 + 12) + 12


def test_linear_without_bias() -> None:
    layer = FactorizedLinear(6, 4, rank=2, bias=False).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    ref = x.numpy() @ (layer.U.weight @ layer.V.weight).detach().numpy().T
    np.testing.assert_allclose(layer(x).detach().numpy(), ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize(("stride", "padding"), [(1, 0), (1, 1), (2, 1)])
def test_conv2d_equals_dense_conv(stride: int, padding: int) -> None:
    torch.manual_seed(1)
    layer = FactorizedConv2d(3, 8, 3, rank=4, stride=stride, padding=padding).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    w = (layer.U.weight.reshape(8, 4) @ layer.V.weight.reshape(4, -1)).reshape(8, 3, 3, 3)
    ref = F.conv2d(x, w, layer.U.bias, stride=stride, padding=padding)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(layer.dense_weight(), w, rtol=0, atol=ATOL)


def test_embedding_equals_table_lookup() -> None:
    torch.manual_seed(2)
    layer = FactorizedEmbedding(30, 10, rank=3).double()
    ids = torch.randint(0, 30, (4, 7))
    table = layer.V.weight.detach().numpy() @ layer.U.weight.detach().numpy().T  # (vocab, d)
    np.testing.assert_allclose(layer(ids).detach().numpy(), table[ids.numpy()], rtol=0, atol=ATOL)
    np.testing.assert_allclose(layer.dense_weight().detach().numpy(), table, rtol=0, atol=ATOL)


def _dense_pairs() -> list[tuple[nn.Module, type, torch.Tensor]]:
    torch.manual_seed(3)
    return [
        (nn.Linear(16, 12).double(), FactorizedLinear, torch.randn(5, 16, dtype=torch.float64)),
        (
            nn.Conv2d(3, 6, 3, padding=1).double(),
            FactorizedConv2d,
            torch.randn(2, 3, 6, 6, dtype=torch.float64),
        ),
        (nn.Embedding(9, 5).double(), FactorizedEmbedding, torch.randint(0, 9, (3, 4))),
    ]


@pytest.mark.parametrize("case", range(3))
def test_svd_full_rank_reproduces_dense(case: int) -> None:
    dense, cls, x = _dense_pairs()[case]
    w = dense.weight.detach()
    full = min(w.shape[0], w[0].numel()) if w.dim() > 2 else min(w.shape)
    fac = cls.from_dense(dense, rank=full, fallback=False)
    assert isinstance(fac, cls) and fac.rank == full
    torch.testing.assert_close(fac(x), dense(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(fac.dense_weight(), w, rtol=0, atol=1e-5)


def test_from_dense_falls_back_when_no_saving() -> None:
    dense = nn.Linear(8, 8)
    assert FactorizedLinear.from_dense(dense, rank=8) is dense  # 8·16 >= 64: kept dense
    assert isinstance(FactorizedLinear.from_dense(dense, rank=3), FactorizedLinear)


def test_truncated_svd_is_best_rank_r() -> None:
    torch.manual_seed(4)
    dense = nn.Linear(20, 15).double()
    fac = FactorizedLinear.from_dense(dense, rank=4)
    s = np.linalg.svd(dense.weight.detach().numpy(), compute_uv=False)
    err = np.linalg.norm(dense.weight.detach().numpy() - fac.dense_weight().detach().numpy())
    np.testing.assert_allclose(err, np.sqrt((s[4:] ** 2).sum()), rtol=1e-8)  # Eckart–Young


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.95])
def test_energy_picks_the_promised_rank(energy: float) -> None:
    torch.manual_seed(5)
    dense = nn.Linear(40, 30).double()
    s = np.linalg.svd(dense.weight.detach().numpy(), compute_uv=False)
    share = np.cumsum(s**2) / np.sum(s**2)
    expected = int(np.argmax(share >= energy)) + 1  # smallest r keeping the share
    fac = FactorizedLinear.from_dense(dense, energy=energy, fallback=False)
    assert fac.rank == expected
    assert share[expected - 1] >= energy and (expected == 1 or share[expected - 2] < energy)
    assert rank_for_energy(torch.from_numpy(s), energy) == expected


@pytest.mark.parametrize(("out", "inp", "ratio"), [(256, 64, 0.25), (100, 100, 0.1), (10, 500, 0.5)])
def test_ratio_picks_the_promised_rank(out: int, inp: int, ratio: float) -> None:
    r = rank_for_ratio(out, inp, ratio)
    assert r * (out + inp) <= ratio * out * inp < (r + 1) * (out + inp)
    choice = choose_rank(out, inp, ratio=ratio)
    assert choice.rank == min(r, min(out, inp))


def test_choose_rank_rules() -> None:
    assert not choose_rank(8, 8, rank=4).factorize  # 4·16 = 64 = 8·8: no saving
    assert choose_rank(8, 8, rank=3).factorize
    assert max_useful_rank(8, 8) == 3
    with pytest.raises(ValueError, match="exactly one"):
        choose_rank(8, 8, rank=2, ratio=0.5)
    with pytest.raises(ValueError, match="rank in"):
        choose_rank(8, 8, rank=9)


@pytest.mark.parametrize("case", range(3))
def test_prune_ranks_shrinks_and_keeps_components(case: int) -> None:
    dense, cls, x = _dense_pairs()[case]
    fac = cls.from_dense(dense, rank=3, fallback=False)
    norms = fac.component_norms()
    assert norms.shape == (3,)
    before = sum(p.numel() for p in fac.parameters())
    # reference: the dense weight of the kept components only
    keep = [0, 2]
    fac_ref = cls.from_dense(dense, rank=3, fallback=False)
    for p, dim in fac_ref.rank_factors():
        with torch.no_grad():
            p.index_fill_(dim, torch.tensor([1]), 0.0)
    w_keep = fac_ref.dense_weight().detach()
    fac.prune_ranks(keep)
    assert fac.rank == 2
    assert sum(p.numel() for p in fac.parameters()) < before
    torch.testing.assert_close(fac.dense_weight().detach(), w_keep, rtol=0, atol=1e-12)
    torch.testing.assert_close(fac.component_norms(), norms[keep], rtol=0, atol=1e-12)
    fac(x)  # still runs at the new rank
    with pytest.raises(ValueError):
        fac.prune_ranks([])


def test_factorized_modules_lists_them() -> None:
    model = nn.Sequential(FactorizedLinear(4, 4, 1), nn.ReLU(), nn.Linear(4, 2))
    assert list(factorized_modules(model)) == ["0"]
