"""Losses and accuracy against float64 references computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from toolkit.train.losses import correct_count, get_loss, has_accuracy


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1, 0])
    t = torch.rand(5, 3, generator=g, dtype=torch.float64)
    return z, labels, t


def test_cross_entropy_matches_log_softmax_by_hand() -> None:
    z, y, _ = _data()
    zn = z.numpy()
    ref = np.mean([math.log(np.exp(zn[i]).sum()) - zn[i, y[i]] for i in range(5)])
    torch.testing.assert_close(get_loss("cross_entropy")(z, y).item(), ref, rtol=1e-12, atol=1e-12)


def test_squared_errors_and_bce_by_hand() -> None:
    z, _, t = _data()
    d = (z - t).numpy()
    torch.testing.assert_close(get_loss("mse")(z, t).item(), float((d**2).mean()), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(
        get_loss("sum_squared")(z, t).item(), float((d**2).sum(1).mean()), rtol=1e-12, atol=0.0
    )
    p = 1 / (1 + np.exp(-z.numpy()))
    ref = float(-(t.numpy() * np.log(p) + (1 - t.numpy()) * np.log(1 - p)).mean())
    torch.testing.assert_close(get_loss("bce")(z, t).item(), ref, rtol=1e-10, atol=0.0)


def test_regression_targets_are_reshaped_to_the_output() -> None:
    z, _, t = _data()
    torch.testing.assert_close(get_loss("mse")(z, t.reshape(5, 3, 1)), get_loss("mse")(z, t))


def test_accuracy_counts() -> None:
    z = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    assert correct_count("cross_entropy", z, torch.tensor([0, 1, 1])) == 2
    assert (
        correct_count("bce", torch.tensor([[1.0, -1.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        == 1
    )
    assert has_accuracy("cross_entropy") and not has_accuracy("mse")
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        get_loss("hinge")
