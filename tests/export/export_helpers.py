"""A small hand-written staged model following the StagedModel contract (docs/architecture.md).

Used where a graph built from a spec would hide what is being tested: a skip connection that
crosses two cuts, two graph inputs, and a stage that fails to export on purpose.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from toolkit.layers import FactorizedLinear


class ToyStage(nn.Module):
    def __init__(self, fn: nn.Module, input_names: list[str], output_names: list[str]) -> None:
        super().__init__()
        self.fn = fn
        self.input_names, self.output_names = input_names, output_names

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.fn(*xs)
        return out if isinstance(out, tuple) else (out,)


class _First(nn.Module):
    def __init__(self, d_in: int, hidden: int, rank: int) -> None:
        super().__init__()
        self.fc1 = FactorizedLinear(d_in, hidden, rank)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc1(x) + bias)  # (B, h)


class _Second(nn.Module):
    def __init__(self, hidden: int, rank: int) -> None:
        super().__init__()
        self.fc2 = FactorizedLinear(hidden, hidden, rank)

    def forward(self, act1: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc2(act1))  # (B, h)


class _Third(nn.Module):
    def __init__(self, hidden: int, classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(hidden, classes)

    def forward(self, act1: torch.Tensor, act2: torch.Tensor) -> torch.Tensor:
        return self.head(act1 + act2)  # skip connection across two cuts, (B, classes)


class ToyModel(nn.Module):
    """x (B, d_in), bias (B, h) -> act1 -> act2 -> head = W(act1 + act2); three stages."""

    def __init__(
        self, d_in: int = 16, hidden: int = 32, classes: int = 5, rank: int = 4, seed: int = 0
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.name = "toy"
        self.input_names, self.output_names = ["x", "bias"], ["head"]
        self.stages = nn.ModuleList(
            [
                ToyStage(_First(d_in, hidden, rank), ["x", "bias"], ["act1"]),
                ToyStage(_Second(hidden, rank), ["act1"], ["act2"]),
                ToyStage(_Third(hidden, classes), ["act1", "act2"], ["head"]),
            ]
        )
        self.d_in, self.hidden = d_in, hidden

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        env = {"x": x, "bias": bias}
        for st in self.stages:
            env.update(zip(st.output_names, st(*[env[n] for n in st.input_names])))
        return env["head"]


def toy_sample(model: ToyModel, n: int = 32, seed: int = 1) -> dict[str, np.ndarray]:
    """Random inputs for the toy model."""
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((n, model.d_in)).astype(np.float32),
        "bias": (0.1 * rng.standard_normal((n, model.hidden))).astype(np.float32),
    }


GRAPHS = sorted(Path(__file__).resolve().parents[2].joinpath("graphs").glob("*.yaml"))


def real_sample(spec: Any, n: int = 48) -> dict[str, np.ndarray]:
    """The first ``n`` test samples of the spec's own data set (what a user exports with).

    Where the data set cannot be loaded for the spec's inputs, inputs drawn at random in the
    spec's shapes (integers below ``vocab`` for int64 inputs) stand in.
    """
    from toolkit.data import load_data

    try:
        splits = load_data(spec.train.data, spec.inputs)
        return {k: v[:n] for k, v in splits.test.inputs.items()}
    except ValueError:
        rng = np.random.default_rng(0)
        out = {}
        for name, isp in spec.inputs.items():
            shape = (n, *isp.shape)
            if isp.dtype == "int64":
                out[name] = rng.integers(0, getattr(isp, "vocab", None) or 2, shape).astype(np.int64)
            else:
                out[name] = rng.standard_normal(shape).astype(isp.dtype)
        return out
