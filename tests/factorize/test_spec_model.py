"""Dense spec checkpoint -> factorized spec + checkpoint; digits MLP recovery (slow)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from toolkit.builder import build_model
from toolkit.checkpoint import CKPT_DIR, load_model, save_checkpoint
from toolkit.cli import main
from toolkit.data import load_data
from toolkit.factorize import factorize_module
from toolkit.factorize.finetune import fine_tune_hessian_free
from toolkit.factorize.spec_model import factorize_checkpoint, node_pattern
from toolkit.layers import FactorizedLinear
from toolkit.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]


def _trained_dense(epochs: int) -> tuple[torch.nn.Module, object, object]:
    spec = load_spec(ROOT / "graphs" / "default.yaml")
    torch.manual_seed(0)
    model = build_model(spec, seed=0, dense=True)
    data = load_data(spec.train.data, spec.inputs)
    x, y = torch.as_tensor(data.train.inputs["x"]), torch.as_tensor(data.train.targets).long()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model, spec, data


def test_dense_checkpoint_round_trip(tmp_path: Path) -> None:
    model, _spec, data = _trained_dense(epochs=1)
    save_checkpoint(
        tmp_path / "dense" / CKPT_DIR, "best-00000001", model, model.to_spec().resolved(), {"dense": True}
    )
    x = torch.as_tensor(data.test.inputs["x"][:32])
    fact, report, _ckpt = factorize_checkpoint(
        tmp_path / "dense", tmp_path / "fact", include=node_pattern(["fc2"]), rank=8
    )
    assert [lr.name for lr in report.layers] == ["stages.1.fc2"]
    loaded, spec, _meta = load_model(tmp_path / "fact")
    assert isinstance(loaded.node_modules()["fc2"], FactorizedLinear)
    assert loaded.ranks() == {"fc2": 8}
    assert [n.factorize for n in spec.nodes if n.id == "fc2"] != [None]
    torch.testing.assert_close(loaded(x), fact(x), rtol=1e-5, atol=1e-5)
    # the CLI on the same checkpoint
    res = CliRunner().invoke(
        main, ["factorize", str(tmp_path / "dense"), "-o", str(tmp_path / "cli"), "--ratio", "0.25"]
    )
    assert res.exit_code == 0, res.output
    assert load_model(tmp_path / "cli")[0].ranks()


@pytest.mark.slow
def test_digits_mlp_4x_recovers_within_one_point() -> None:
    dense, _spec, data = _trained_dense(epochs=20)
    x, _y = torch.as_tensor(data.train.inputs["x"]), torch.as_tensor(data.train.targets).long()
    xv, yv = torch.as_tensor(data.val.inputs["x"]), torch.as_tensor(data.val.targets).long()

    def acc(m: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> float:
        with torch.no_grad():
            return float((m(a).argmax(-1) == b).double().mean())

    model = copy.deepcopy(dense)
    cal = [(x[i : i + 256],) for i in range(0, 1024, 256)]
    rep = factorize_module(
        model, ratio=0.25, include=node_pattern(["fc1", "fc2"]), method="asvd", calibration=cal, refit=True
    )
    assert rep.dense_params >= 4 * rep.factor_params * 0.99
    before = acc(model, xv, yv)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        soft = dense(x).softmax(-1)  # distillation targets: the dense model's probabilities
    losses = fine_tune_hessian_free(tuned, F.cross_entropy, (x,), soft, steps=10, batch_size=len(x))
    assert len(losses) == 10 and losses[-1] < losses[0]
    best = max(before, acc(tuned, xv, yv))
    assert best >= acc(dense, xv, yv) - 0.01


def test_cli_sensitivity_budget_on_a_spec_checkpoint(tmp_path: Path) -> None:
    """--budget 0.3 --sensitivity: the written model keeps at most 30% of the hidden-layer weights,
    counting layers left dense at full size."""
    model, _spec, _data = _trained_dense(epochs=3)
    save_checkpoint(
        tmp_path / "dense" / CKPT_DIR, "best-00000003", model, model.to_spec().resolved(), {"dense": True}
    )
    res = CliRunner().invoke(
        main,
        [
            "factorize",
            str(tmp_path / "dense"),
            "-o",
            str(tmp_path / "sens"),
            "--budget",
            "0.3",
            "--sensitivity",
            "--include",
            node_pattern(["fc1", "fc2"]) or "",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    fact = load_model(tmp_path / "sens")[0]
    nodes = model.node_modules()
    dense_weights = sum(nodes[n].weight.numel() for n in ("fc1", "fc2"))
    weights = sum(
        (m.rank * sum(m.dense_weight().shape)) if isinstance(m, FactorizedLinear) else m.weight.numel()
        for n, m in fact.node_modules().items()
        if n in ("fc1", "fc2")
    )
    assert weights <= 0.3 * dense_weights
    assert fact.ranks()  # at least one layer factorized


def test_cli_sensitivity_needs_a_budget(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        main, ["factorize", str(tmp_path), "-o", str(tmp_path / "o"), "--ratio", "0.5", "--sensitivity"]
    )
    assert res.exit_code == 2 and "--sensitivity" in res.output and "Traceback" not in res.output
