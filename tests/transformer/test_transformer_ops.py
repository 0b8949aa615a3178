"""Transformer ops (attention, positions, pooling, select, mul) against float64 references computed
another way, curvature products through attention, and ONNX export parity of a spec with attention."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import hessian as ag_hessian
from torch.autograd.functional import jacobian

from toolkit.builder import build_model
from toolkit.layers.attention import Attention
from toolkit.layers.sequence import MaskedMean, PositionEmbedding, Select, sinusoidal_table
from toolkit.optim.curvature import curvature_operator
from toolkit.optim.flat import FlatParams
from toolkit.spec import SpecError, parse_spec
from toolkit.spec.summary import summarize

D64 = torch.float64


def encoder_spec(causal: bool = False, heads: int = 4, kind: str = "learned", t: int = 6) -> dict:
    """A one-layer encoder / decoder: embeddings, positions, Q/K/V/out projections, pooling."""
    return {
        "name": "tiny-attention",
        "inputs": {
            "input_ids": {"shape": [t], "dtype": "int64", "vocab": 11},
            "attention_mask": {"shape": [t], "dtype": "int64", "vocab": 2},
        },
        "nodes": [
            {"id": "tok", "op": "embedding", "in": "input_ids", "out": 8},
            {"id": "pos", "op": "position_embedding", "in": "tok", "max_len": 16, "kind": kind},
            {"id": "q", "op": "linear", "in": "pos", "out": 8, "factorize": {"rank": 2}},
            {"id": "k", "op": "linear", "in": "pos", "out": 8},
            {"id": "v", "op": "linear", "in": "pos", "out": 8, "factorize": {"rank": 3}},
            {
                "id": "att",
                "op": "attention",
                "in": ["q", "k", "v", "attention_mask"],
                "heads": heads,
                "causal": causal,
            },
            {"id": "o", "op": "linear", "in": "att", "out": 8},
            {"id": "res", "op": "add", "in": ["pos", "o"]},
            {"id": "norm", "op": "layer_norm", "in": "res"},
            {"id": "pool", "op": "masked_mean", "in": ["norm", "attention_mask"]},
            {"id": "head", "op": "linear", "in": "pool", "out": 3},
        ],
        "outputs": ["head"],
    }


def _mask(b: int, t: int, lengths: list[int]) -> torch.Tensor:
    m = torch.zeros(b, t, dtype=torch.int64)
    for i, n in enumerate(lengths):
        m[i, :n] = 1
    return m


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_sdpa_float64(causal: bool) -> None:
    torch.manual_seed(0)
    b, t, d, h = 3, 5, 12, 3
    q, k, v = (torch.randn(b, t, d, dtype=D64) for _ in range(3))
    mask = _mask(b, t, [5, 3, 1])
    got = Attention(h, causal)(q, k, v, mask)
    # reference: PyTorch's scaled_dot_product_attention with a boolean keep-mask, per head
    split = lambda x: x.reshape(b, t, h, d // h).transpose(1, 2)  # noqa: E731
    keep = mask.bool()[:, None, None, :].expand(b, 1, t, t)
    if causal:
        keep = keep & torch.ones(t, t, dtype=torch.bool).tril()
    rows_alive = keep.any(-1, keepdim=True)
    ref = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=keep | ~rows_alive)
    ref = ref.transpose(1, 2).reshape(b, t, d)
    # a query row whose keys are all hidden attends uniformly in both (SDPA via the all-True fallback)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_attention_matches_hand_loop_float64() -> None:
    torch.manual_seed(1)
    b, t, d, h = 2, 4, 6, 2
    q, k, v = (torch.randn(b, t, d, dtype=D64) for _ in range(3))
    mask = _mask(b, t, [4, 2])
    got = Attention(h, causal=True)(q, k, v, mask)
    dh = d // h
    ref = torch.zeros(b, t, d, dtype=D64)
    for i in range(b):
        for head in range(h):
            sl = slice(head * dh, (head + 1) * dh)
            for a in range(t):
                keys = [j for j in range(t) if j <= a and mask[i, j] == 1]
                scores = [float(q[i, a, sl] @ k[i, j, sl]) / math.sqrt(dh) for j in keys]
                top = max(scores)
                w = [math.exp(s - top) for s in scores]
                total = sum(w)
                ref[i, a, sl] = sum(wj / total * v[i, j, sl] for wj, j in zip(w, keys))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_sinusoidal_table_and_learned_positions() -> None:
    table = sinusoidal_table(7, 4).double()
    for pos in range(7):
        for i in range(2):
            angle = pos / 10000 ** (2 * i / 4)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-7)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-7)
    learned = PositionEmbedding(9, 4, "learned").double()
    x = torch.randn(2, 5, 4, dtype=D64)
    want = x + torch.stack([learned.table.weight[p] for p in range(5)])
    torch.testing.assert_close(learned(x), want, rtol=0, atol=0)


def test_masked_mean_and_select_against_loops() -> None:
    torch.manual_seed(2)
    x = torch.randn(3, 5, 4, dtype=D64)
    mask = _mask(3, 5, [5, 2, 4])
    mean = MaskedMean()(x, mask)
    last = Select(-1)(x, mask)
    first = Select(0)(x)
    for i, n in enumerate([5, 2, 4]):
        torch.testing.assert_close(mean[i], sum(x[i, j] for j in range(n)) / n, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(last[i], x[i, n - 1], rtol=0, atol=0)
        torch.testing.assert_close(first[i], x[i, 0], rtol=0, atol=0)
    torch.testing.assert_close(MaskedMean()(x), x.sum(1) / 5, rtol=1e-12, atol=1e-12)


def test_mul_and_costs_in_show() -> None:
    spec = parse_spec(encoder_spec(t=6))
    rows = {r.id: r for r in summarize(spec)}
    assert rows["att"].macs == 2 * 6 * 6 * 8  # QKᵀ and weights·V
    assert rows["q"].macs == 2 * (8 + 8) * 6 and rows["k"].macs == 8 * 8 * 6
    assert rows["pos"].params == 16 * 8
    s = encoder_spec()
    s["nodes"][7] = {"id": "res", "op": "mul", "in": ["pos", "o"]}
    model = build_model(parse_spec(s), seed=0).double()
    mods = model.node_modules()
    x, y = torch.randn(2, 6, 8, dtype=D64), torch.randn(2, 6, 8, dtype=D64)
    torch.testing.assert_close(mods["res"](x, y), x * y, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_ggn_product_through_attention_equals_dense_jacobian(causal: bool) -> None:
    model = build_model(parse_spec(encoder_spec(causal=causal)), seed=0).double()
    flat = FlatParams(model, list(model.parameters()))
    theta = flat.flatten()
    torch.manual_seed(3)
    ids = torch.randint(0, 11, (3, 6))
    mask = _mask(3, 6, [6, 4, 2])
    targets = torch.tensor([0, 2, 1])
    fn = flat.function((ids, mask))

    def loss(z: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(z, targets)

    z = fn(theta).detach()
    jac = jacobian(lambda th: fn(th).reshape(-1), theta)  # (B*3, P)
    h_l = ag_hessian(lambda zz: loss(zz.view_as(z)), z.reshape(-1))
    dense = jac.T @ h_l @ jac
    v = torch.randn_like(theta)
    for mode in ("double_vjp", "jvp"):
        op = curvature_operator(fn, loss, theta, kind="ggn", jvp_mode=mode)
        torch.testing.assert_close(op(v), dense @ v, rtol=1e-9, atol=1e-11)


def test_export_parity_with_attention(tmp_path: Path) -> None:
    from toolkit.export import export_model
    from toolkit.runtime import Executor

    spec = encoder_spec(causal=True)
    spec["stages"] = [["tok", "pos", "q", "k", "v", "att"], ["o", "res", "norm", "pool", "head"]]
    model = build_model(parse_spec(spec), seed=0).eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 11, (5, 6)).astype(np.int64)
    mask = _mask(5, 6, [6, 5, 3, 2, 1]).numpy()
    manifest = export_model(model, tmp_path / "exp", sample={"input_ids": ids, "attention_mask": mask})
    out = Executor(tmp_path / "exp").run({"input_ids": ids, "attention_mask": mask})["head"]
    with torch.no_grad():
        ref = model(torch.as_tensor(ids), torch.as_tensor(mask)).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert len(manifest["stages"]) == 2


@pytest.mark.parametrize(
    ("change", "field", "needle"),
    [
        (lambda s: s["nodes"][5].update(heads=3), "nodes[5].heads", "heads 3 does not divide the width 8"),
        (
            lambda s: s["nodes"].__setitem__(1, {"id": "pos", "op": "relu", "in": "tok"}),
            "nodes[5].causal",
            "no position_embedding upstream",
        ),
        (lambda s: s["nodes"][1].update(max_len=4), "nodes[1].max_len", "exceeds max_len 4"),
        (lambda s: s["nodes"][9].update(**{"in": ["norm", "input_ids"]}), None, None),
    ],
)
def test_bad_transformer_specs(change, field, needle) -> None:
    s = encoder_spec(causal=True)
    change(s)
    if field is None:  # masked_mean with a same-shape int mask is fine: mask dtype is free
        parse_spec(s)
        return
    with pytest.raises(SpecError) as err:
        parse_spec(s)
    assert any(p.path == field and needle in p.message for p in err.value.problems), str(err.value)


def test_export_keeps_sequence_axis_dynamic(tmp_path: Path) -> None:
    from toolkit.export import export_model
    from toolkit.runtime import Executor
    from toolkit.spec import load_spec
    from toolkit.spec.sequence import sequence_tensors

    spec = load_spec(Path(__file__).resolve().parents[2] / "graphs" / "encoder.yaml")
    assert {"tokens", "emb", "pos", "enc_1_ln2"} <= sequence_tensors(spec)
    assert "pool" not in sequence_tensors(spec) and "head" not in sequence_tensors(spec)
    model = build_model(spec, seed=0).eval()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 17, (6, 64)).astype(np.int64)
    manifest = export_model(model, tmp_path / "exp", sample={"tokens": tokens})
    assert manifest["inputs"][0]["shape"] == [None, None]
    assert manifest["stages"][1]["inputs"][0]["shape"] == [None, None, 32]
    ex = Executor(tmp_path / "exp")
    for length in (64, 40, 3):
        short = tokens[:, :length]
        with torch.no_grad():
            ref = model(torch.as_tensor(short)).numpy()
        np.testing.assert_allclose(ex.run({"tokens": short})["head"], ref, rtol=1e-5, atol=1e-5)


def test_a_length_pinning_op_keeps_shapes_fixed() -> None:
    from toolkit.spec.sequence import sequence_tensors

    s = encoder_spec()
    s["nodes"][9] = {"id": "pool", "op": "flatten", "in": "norm"}
    s["nodes"][10] = {"id": "head", "op": "linear", "in": "pool", "out": 3}
    assert sequence_tensors(parse_spec(s)) == set()
