"""build_model: every graph builds and runs; stages alone and chained equal the whole model."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from toolkit.builder import StagedModel, build_model
from toolkit.layers import FactorizedConv2d, FactorizedEmbedding, FactorizedLinear
from toolkit.spec import load_spec, parse_spec

GRAPHS = sorted(
    p for p in (Path(__file__).parents[2] / "graphs").iterdir() if p.suffix in (".yaml", ".yml", ".json")
)


def sample_inputs(model: StagedModel, batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for spec in model.input_specs.values():
        if spec.dtype == "int64":
            assert spec.vocab is not None
            out.append(torch.randint(0, spec.vocab, (batch, *spec.shape), generator=g))
        else:
            out.append(torch.randn(batch, *spec.shape, generator=g))
    return tuple(out)


def chain(model: StagedModel, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Run the stages one by one by hand, passing only the named tensors across each cut."""
    env = dict(zip(model.input_names, inputs))
    for stage in model.stages:
        outs = stage(*(env[n] for n in stage.input_names))
        assert isinstance(outs, tuple) and len(outs) == len(stage.output_names)
        env.update(zip(stage.output_names, outs))
    return tuple(env[n] for n in model.output_names)


@pytest.mark.parametrize("path", GRAPHS, ids=[p.name for p in GRAPHS])
def test_graph_builds_runs_and_stages_chain(path: Path) -> None:
    spec = load_spec(path)
    model = build_model(spec, seed=0).eval()
    assert len(model.stages) == len(spec.stage_partition())
    x = sample_inputs(model)
    with torch.no_grad():
        whole = model(*x)
        whole = whole if isinstance(whole, tuple) else (whole,)
        staged = chain(model, x)
    for name, a, b in zip(model.output_names, whole, staged):
        assert a.shape == (4, *spec.analysis.infos[name][0])
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # every graph input and node output shape agrees with the spec's shape inference
    assert all(n.split(".")[0] == "stages" for n, _ in model.named_parameters())
    dense = build_model(spec, seed=0, dense=True)
    assert not dense.factorized_layers()
    assert sum(p.numel() for p in dense.parameters()) >= sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("path", GRAPHS, ids=[p.name for p in GRAPHS])
def test_each_stage_exports_to_onnx(path: Path, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    model = build_model(load_spec(path), seed=0).eval()
    env = dict(zip(model.input_names, sample_inputs(model)))
    for s, stage in enumerate(model.stages):
        args = tuple(env[n] for n in stage.input_names)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                stage,
                args,
                tmp_path / f"{s}.onnx",
                input_names=stage.input_names,
                output_names=stage.output_names,
                dynamo=False,
            )
        onnx.checker.check_model(str(tmp_path / f"{s}.onnx"))
        with torch.no_grad():
            env.update(zip(stage.output_names, stage(*args)))


def test_default_graph_is_3x_smaller_than_dense() -> None:
    spec = load_spec(GRAPHS[0].parent / "default.yaml")
    model, dense = build_model(spec, seed=0), build_model(spec, seed=0, dense=True)
    n, n_dense = (sum(p.numel() for p in m.parameters()) for m in (model, dense))
    assert n_dense >= 3 * n
    assert model.ranks() == {"fc1": 24, "fc2": 16}
    names = {n for n, _ in model.named_parameters()}
    assert {"stages.0.fc1.U.weight", "stages.0.fc1.V.weight", "stages.1.head.weight"} <= names
    from toolkit.spec.summary import summarize, totals

    t = totals(summarize(spec))
    assert (t["params"], t["dense_params"]) == (n, n_dense)  # the summary counts what the builder builds


def spec_with(nodes: list[dict[str, Any]], shape: list[int], outputs: list[str], **kw: Any) -> Any:
    return parse_spec(
        {"name": "t", "inputs": {"x": {"shape": shape, **kw}}, "nodes": nodes, "outputs": outputs}
    )


def test_factorized_layers_match_dense_reference() -> None:
    spec = spec_with(
        [
            {
                "id": "c",
                "op": "conv2d",
                "in": "x",
                "out": 8,
                "kernel": 3,
                "padding": 1,
                "stride": 2,
                "factorize": {"rank": 3},
            },
            {"id": "f", "op": "flatten", "in": "c"},
            {"id": "l", "op": "linear", "in": "f", "out": 20, "factorize": {"rank": 4}},
        ],
        [4, 6, 6],
        ["l"],
    )
    model = build_model(spec, seed=1).double()
    layers = model.factorized_layers()
    assert isinstance(layers["c"], FactorizedConv2d) and isinstance(layers["l"], FactorizedLinear)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    conv = torch.nn.functional.conv2d(x, layers["c"].dense_weight(), layers["c"].U.bias, stride=2, padding=1)
    lin = layers["l"]
    ref = (
        conv.detach().flatten(1).numpy() @ (lin.U.weight @ lin.V.weight).detach().numpy().T
        + lin.U.bias.detach().numpy()
    )
    np.testing.assert_allclose(model(x).detach().numpy(), ref, rtol=0, atol=1e-6)


def test_linear_applies_to_the_last_axis_and_takes_a_list_input() -> None:
    spec = spec_with(
        [
            {"id": "e", "op": "embedding", "in": ["x"], "out": 8, "factorize": {"rank": 2}},
            {"id": "l", "op": "linear", "in": ["e"], "out": 3},
        ],
        [5],
        ["l", "e"],
        dtype="int64",
        vocab=11,
    )
    model = build_model(spec, seed=0)
    assert isinstance(model.factorized_layers()["e"], FactorizedEmbedding)
    ids = torch.randint(0, 11, (2, 5))
    out, emb = model(ids)
    assert out.shape == (2, 5, 3) and emb.shape == (2, 5, 8)
    torch.testing.assert_close(emb, model.factorized_layers()["e"].dense_weight()[ids], rtol=0, atol=1e-6)


def test_every_op_builds_with_the_inferred_shapes() -> None:
    spec = spec_with(
        [
            {"id": "r", "op": "reshape", "in": "x", "shape": [4, -1]},  # [4, 6]
            {"id": "bn", "op": "batch_norm", "in": "r"},
            {"id": "ln", "op": "layer_norm", "in": "bn"},
            {"id": "a", "op": "tanh", "in": "ln"},
            {"id": "b", "op": "softplus", "in": "ln"},
            {"id": "g", "op": "gelu", "in": "ln"},
            {"id": "sg", "op": "sigmoid", "in": "ln"},
            {"id": "cat", "op": "concat", "in": ["a", "b", "g", "sg"], "axis": 0},  # [16, 6]
            {"id": "d", "op": "dropout", "in": "cat", "p": 0.2},
            {"id": "sm", "op": "softmax", "in": "d", "axis": 0},
            {"id": "m", "op": "mean", "in": "sm", "axis": -1},  # [16]
            {"id": "s", "op": "add", "in": ["m", "m"]},
        ],
        [24],
        ["s", "sm"],
    )
    model = build_model(spec, seed=0).eval()
    x = torch.randn(3, 24)
    s, sm = model(x)
    assert s.shape == (3, 16) and sm.shape == (3, 16, 6)
    torch.testing.assert_close(sm.sum(dim=1), torch.ones(3, 6))  # softmax over per-example axis 0
    with torch.no_grad():
        r = x.reshape(3, 4, 6)
        ln = model.stages[0].ln(model.stages[0].bn(r))
        ref = torch.cat([ln.tanh(), nn.functional.softplus(ln), nn.functional.gelu(ln), ln.sigmoid()], 1)
        torch.testing.assert_close(sm, ref.softmax(1), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s, 2 * ref.softmax(1).mean(-1), rtol=1e-6, atol=1e-6)


def test_energy_builds_from_the_default_dense_init() -> None:
    spec = spec_with(
        [{"id": "l", "op": "linear", "in": "x", "out": 40, "factorize": {"energy": 0.6}}], [50], ["l"]
    )
    model = build_model(spec, seed=3)
    torch.manual_seed(3)
    w = nn.Linear(50, 40).weight.detach().double().numpy()  # the same draw the builder made
    s = np.linalg.svd(w, compute_uv=False)
    expected = int(np.argmax(np.cumsum(s**2) / np.sum(s**2) >= 0.6)) + 1
    assert model.ranks() == {"l": expected}
    p, sv, qh = np.linalg.svd(w)
    best = (p[:, :expected] * sv[:expected]) @ qh[:expected]
    np.testing.assert_allclose(
        model.factorized_layers()["l"].dense_weight().detach().numpy(), best, atol=1e-5
    )


def test_useless_factorization_builds_dense_with_a_warning() -> None:
    spec = spec_with(
        [{"id": "l", "op": "linear", "in": "x", "out": 8, "factorize": {"energy": 1.0}}], [8], ["l"]
    )
    with pytest.warns(UserWarning, match="kept dense"):
        model = build_model(spec, seed=0)
    assert not model.factorized_layers()
    spec = spec_with([{"id": "l", "op": "linear", "in": "x", "out": 8, "factorize": {"rank": 6}}], [8], ["l"])
    with pytest.warns(UserWarning, match="kept dense"):
        assert isinstance(build_model(spec).stages[0].l, nn.Linear)


def test_to_spec_after_pruning_rebuilds_the_same_shapes() -> None:
    spec = load_spec(GRAPHS[0].parent / "default.yaml")
    model = build_model(spec, seed=0).eval()
    model.factorized_layers()["fc2"].prune_ranks([0, 3, 5])
    pinned = model.to_spec()
    assert pinned.node("fc2").factorize is not None and pinned.node("fc2").factorize.rank == 3
    assert pinned.node("head").factorize is not None and pinned.node("head").factorize.is_none
    rebuilt = build_model(pinned, seed=1).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(5, 64)
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_wrong_call_is_a_clear_error() -> None:
    model = build_model(load_spec(GRAPHS[0].parent / "default.yaml"), seed=0)
    with pytest.raises(ValueError, match=r"expected 1 inputs \['x'\], got 2"):
        model(torch.zeros(1, 64), torch.zeros(1, 64))
    with pytest.raises(TypeError, match="expected a GraphSpec"):
        build_model({"name": "x"})  # type: ignore[arg-type]


@pytest.mark.slow
def test_default_graph_reaches_95_percent_on_digits() -> None:
    """The architecture can reach >= 95% test accuracy (a quick Adam run; HF training is toolkit.train's)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(
        (x / 16).astype(np.float32), y, test_size=0.2, random_state=0, stratify=y
    )
    xtr_t, xte_t, ytr_t, yte_t = (torch.as_tensor(a) for a in (xtr, xte, ytr, yte))
    model = build_model(load_spec(GRAPHS[0].parent / "default.yaml"), seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        perm = torch.randperm(len(xtr_t), generator=g)
        for i in range(0, len(perm), 128):
            idx = perm[i : i + 128]
            loss = nn.functional.cross_entropy(model(xtr_t[idx]), ytr_t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (model.eval()(xte_t).argmax(1) == yte_t).float().mean().item()
    assert acc >= 0.95
