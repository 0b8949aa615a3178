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
