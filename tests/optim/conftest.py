"""Shared fixtures for the optimizer tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn


@pytest.fixture
def small_net() -> Callable[..., nn.Module]:
    """Factory of a 3-4-2 tanh network, float64 by default."""

    def make(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)

    return make


@pytest.fixture(autouse=True)
def _one_thread():
    """Run each optimizer test on one intra-op thread (tiny problems; avoids oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def trains_and_resumes(small_net) -> Callable[[dict], dict]:
    """check(settings) for HessianFree(**settings) on a learnable 64-example regression (float64).

    Seven steps must halve the loss; a run stopped after three steps and resumed from its
    ``state_dict()`` on a fresh model must give the same next four losses and the same parameters, bit
    for bit. Returns that saved state, for checks of what it holds.
    """
    import torch.nn.functional as F

    from toolkit.optim import HessianFree

    g = torch.Generator().manual_seed(6)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    y = torch.stack([torch.sin(x[:, 0]), x[:, 1] * x[:, 2]], dim=1)  # (64, 2), learnable

    def run(opt: HessianFree, steps: int) -> list[float]:
        return [opt.step((x,), y).new_loss for _ in range(steps)]

    def check(settings: dict) -> dict:
        model = small_net(0)
        start = float(F.mse_loss(model(x), y).detach())
        straight = run(HessianFree(model, F.mse_loss, **settings), 7)
        assert straight[-1] < 0.5 * start

        first_model = small_net(0)
        first = HessianFree(first_model, F.mse_loss, **settings)
        run(first, 3)
        state = first.state_dict()
        copy = small_net(1)
        copy.load_state_dict(first_model.state_dict())
        second = HessianFree(copy, F.mse_loss, **settings)
        second.load_state_dict(state)
        assert run(second, 4) == straight[3:]
        for p, q in zip(copy.parameters(), model.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
        return state

    return check
