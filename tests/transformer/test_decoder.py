"""Causal LM: pydoc byte data, token cross-entropy (and its GGN), key/value-cache export, generation.

References are computed another way: the GGN against a dense float64 Jacobian and the analytic
softmax Hessian, cached ONNX logits against the float64 torch model without cache, onnxruntime's
greedy tokens against torch's greedy loop that recomputes the whole window each step.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner
from torch.autograd.functional import jacobian

from toolkit.builder import build_model
from toolkit.cli import main
from toolkit.data import pydoc_text as pd
from toolkit.data.splits import load_data
from toolkit.errors import InputError
from toolkit.export import export_model
from toolkit.export.kv_cache import causal_lm_layout, reference_greedy
from toolkit.optim.curvature import curvature_operator
from toolkit.optim.flat import FlatParams
from toolkit.runtime.generate import Generator, generate
from toolkit.spec import load_spec, parse_spec
from toolkit.train.losses import token_cross_entropy

ROOT = Path(__file__).resolve().parents[2]
CHARLM = ROOT / "graphs" / "charlm.yaml"
CONTEXT = 16


def _tiny(context: int = CONTEXT, width: int = 16, repeat: int = 2, vocab: int = 256) -> dict:
    d = yaml.safe_load(CHARLM.read_text())
    d["inputs"]["tokens"] = {"shape": [context], "dtype": "int64", "vocab": vocab}
    blk = d["blocks"]["layer"]["nodes"]
    for n in blk:
        if n["op"] == "linear":
            n["out"] = width * 4 if n["id"] == "ff1" else width
            n["factorize"] = {"rank": max(2, width // 4)}
        if n["op"] == "attention":
            n["heads"] = 2
    nodes = {n["id"]: n for n in d["nodes"]}
    nodes["emb"]["out"] = width
    nodes["pos"]["max_len"] = context
    nodes["dec"]["repeat"] = repeat
    nodes["head"]["out"] = vocab
    d["train"].update({"batch_size": 16, "epochs": 1, "eval_every": 100})
    d["train"]["data"]["limit"] = 48
    return d


def test_pydoc_split_by_topic_and_next_byte_windows() -> None:
    train, val, test = pd.topic_split(0.1, 0.1, seed=0)
    assert set(train).isdisjoint(val) and set(train).isdisjoint(test) and set(val).isdisjoint(test)
    assert sorted(train + val + test) == sorted(pd.pydoc_topics())
    assert pd.topic_split(0.1, 0.1, seed=0) == (train, val, test)  # deterministic
    stream = pd.byte_stream(val)
    x, y = pd.windows(stream, 32)
    assert x.shape == y.shape == ((len(stream) - 1) // 32, 32)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one byte
    np.testing.assert_array_equal(x[1, 0], stream[32])
    base = pd.unigram_bits_per_byte(pd.byte_stream(train), y)
    assert 3.0 < base < 8.0  # English text: ~4.5-5 bits per byte under byte frequencies


def test_load_data_pydoc_and_bad_input() -> None:
    spec = load_spec(CHARLM)
    splits = load_data(spec.train.data, spec.inputs)
    assert splits.train.inputs["tokens"].shape[1] == 128 and splits.train.targets.dtype == np.int64
    assert len(splits.val) > 0 and len(splits.test) > 0
    bad = {"tokens": {"shape": [16], "dtype": "int64", "vocab": 17}}
    with pytest.raises(InputError, match="vocab 256"):
        load_data(spec.train.data, bad)


def test_token_cross_entropy_and_its_ggn_against_dense_float64() -> None:
    d = _tiny(context=4, width=8, repeat=1, vocab=7)
    model = build_model(parse_spec(d, source="tiny"), seed=0).double()
    flat = FlatParams(model, list(model.parameters()))
    theta = flat.flatten().detach()
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 7, (2, 4), generator=gen)
    t = torch.randint(0, 7, (2, 4), generator=gen)
    fn = flat.function((x,))
    z = fn(theta).detach()  # (2, 4, 7)
    # the loss: mean over the 8 positions of -log softmax
    ref = -sum(torch.log_softmax(z[b, i], -1)[t[b, i]] for b in range(2) for i in range(4)) / 8
    torch.testing.assert_close(token_cross_entropy(z, t), ref, rtol=1e-12, atol=1e-12)
    # GGN = Jᵀ H J with H block diagonal: (diag(p) - p pᵀ) / (B T) per position
    op = curvature_operator(fn, lambda zz: token_cross_entropy(zz, t), theta, kind="ggn")
    jac = jacobian(lambda th: fn(th).reshape(-1), theta)  # (B*T*V, P)
    p = torch.softmax(z, -1).reshape(-1, 7)
    h = torch.block_diag(*[(torch.diag(r) - torch.outer(r, r)) / 8 for r in p])
    v = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(op(v), jac.T @ h @ jac @ v, rtol=1e-9, atol=1e-12)
    assert F.cross_entropy(z.reshape(-1, 7), t.reshape(-1)).item() == pytest.approx(ref.item())


@pytest.mark.parametrize("preconditioner", ["kfac", "diagonal"])
def test_hessian_free_trains_the_tiny_lm(tmp_path: Path, preconditioner: str) -> None:
    from toolkit.train import train

    d = _tiny()
    # K-FAC (the default) takes one V x V output-Hessian block per position of the next-token loss
    d["train"]["optimizer"] = {"name": "hessian_free", "cg_max_iters": 10, "preconditioner": preconditioner}
    d["train"]["threads"] = 1
    res = train(parse_spec(d, source="tiny"), tmp_path / "run", max_steps=3)
    assert res.status == "completed" and res.steps == 3
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m and m.get("step")]
    assert all(math.isfinite(v) for v in losses)
    assert res.best_val_loss is not None and res.best_val_loss < math.log(256)  # below a uniform guess


@pytest.fixture(scope="module")
def lm_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    model = build_model(parse_spec(_tiny(), source="tiny"), seed=0)
    # a little training so the logits are not nearly flat (greedy ties)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = pd.windows(pd.byte_stream(pd.topic_split(0.1, 0.1, 0)[0]), CONTEXT, limit=64)
    for _ in range(20):
        opt.zero_grad()
        token_cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    model.eval()
    out = tmp_path_factory.mktemp("lm") / "export"
    export_model(model, out, sample={"tokens": x[:4]})
    return out, model


def test_kv_cache_export_matches_float64_full_sequence(lm_export) -> None:
    out, model = lm_export
    man = json.loads((out / "manifest.json").read_text())
    lm = man["causal_lm"]
    assert lm["context"] == CONTEXT and lm["vocab"] == 256 and lm["layers"] == 2
    assert [s["past"] for s in lm["stages"]] == [
        ["past_key_0", "past_value_0"],
        ["past_key_1", "past_value_1"],
    ]
    assert lm["parity"]["ok"] and lm["parity"]["max_abs"] < 1e-4  # recorded at export
    # again here, by hand: 5 prompt tokens, then one at a time, against float64 torch, no cache
    gen = Generator(out)
    ids = [int(b) for b in b"class Foo(Bar):\n "][:CONTEXT]
    ref = copy.deepcopy(model).double()(torch.tensor([ids])).detach().numpy()[0]  # (T, V)
    logits, cache = gen.step(ids[:5], gen.empty_cache())
    got = [logits]
    for t in range(5, len(ids)):
        assert cache[0][0].shape == (1, 2, t, 8)  # (batch, heads, past, head_dim)
        logits, cache = gen.step([ids[t]], cache)
        got.append(logits)
    np.testing.assert_allclose(np.stack(got), ref[4:], atol=1e-4, rtol=0)


def test_greedy_onnxruntime_equals_torch_with_window_slides(lm_export) -> None:
    out, model = lm_export
    res = generate(out, "def main(", 40, greedy=True)
    ref = reference_greedy(copy.deepcopy(model).double(), list(b"def main("), 40, CONTEXT)
    assert res.tokens == ref
    assert res.slides >= 3  # 9 + 40 tokens through a window of 16
    a = generate(out, "x = ", 20, temperature=0.7, top_k=5, seed=4)
    b = generate(out, "x = ", 20, temperature=0.7, top_k=5, seed=4)
    assert a.tokens == b.tokens and len(a.tokens) == 20


def test_causal_lm_layout_only_for_causal_lms() -> None:
    encoder = build_model(load_spec(ROOT / "graphs" / "encoder.yaml"), seed=0)
    assert causal_lm_layout(encoder) is None
    lm = build_model(parse_spec(_tiny(), source="tiny"), seed=0)
    assert causal_lm_layout(lm)["stage_layers"] == [[0], [1]]


def _cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_rlhf_generate_and_bad_input(lm_export, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = lm_export
    ok = _cli("generate", out, "--prompt", "import ", "--max-tokens", "8", "--greedy", "--json")
    assert ok.exit_code == 0, ok.output
    doc = json.loads(ok.output)
    assert len(doc["tokens"]) == 8
    # the device command (rlhf-runtime's argparse CLI) gives the same tokens
    from rlhf_runtime.cli import main as device_main

    assert (
        device_main(["generate", str(out), "--prompt", "import ", "--max-tokens", "8", "--greedy", "--json"])
        == 0
    )
    device_doc = json.loads(capsys.readouterr().out)
    assert device_doc["tokens"] == doc["tokens"] and device_doc["text"] == doc["text"]
    assert device_main(["generate", str(out), "--prompt", "a", "--top-k", "0"]) == 2
    err = capsys.readouterr().err
    assert "top_k" in err and len(err.strip().splitlines()) == 1, err
    cases = [
        (["--prompt", "x" * (CONTEXT + 1)], f"longer than the model's context of {CONTEXT}"),
        (["--prompt", ""], "empty prompt"),
        (["--prompt", "a", "--temperature", "0"], "temperature"),
        (["--prompt", "a", "--top-k", "0"], "top_k"),
        (["--prompt", "a", "--max-tokens", "0"], "max_new_tokens"),
    ]
    for args, words in cases:
        res = _cli("generate", out, *args)
        assert res.exit_code == 2, (args, res.output)
        assert words in res.output and len(res.output.strip().splitlines()) == 1, res.output
    plain = tmp_path / "plain"
    shutil.copytree(out, plain)
    man = json.loads((plain / "manifest.json").read_text())
    del man["causal_lm"]
    (plain / "manifest.json").write_text(json.dumps(man))
    res = _cli("generate", plain, "--prompt", "a")
    assert res.exit_code == 2 and "not a causal language model export" in res.output
    assert len(res.output.strip().splitlines()) == 1
