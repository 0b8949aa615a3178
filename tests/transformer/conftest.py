"""Shared check for text exports: optimum / transformers load them offline with the executor's outputs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

TOL = 1e-5  # optimum (the fused model.onnx) vs the Executor, max abs over the sentences' tokens


def sentences() -> list[str]:
    from toolkit.factorize.corpus import python_reference_sentences

    return python_reference_sentences()[300:308]  # the CPython reference manual, real text


def executor_hidden(export: Path, texts: list[str], fused: bool = False) -> tuple[np.ndarray, dict]:
    from toolkit.runtime import Executor
    from toolkit.runtime.text import text_encoder_for

    ex = Executor(export, providers="cpu", fused=fused)
    feeds = text_encoder_for(export, ex.manifest.raw).encode(texts).arrays
    return ex.run(feeds)["last_hidden_state"], feeds


def check_feature_extraction(export: Path) -> dict[str, float]:
    """``ORTModelForFeatureExtraction.from_pretrained(export)`` and a feature-extraction pipeline
    against the Executor on real sentences; returns the max abs differences it measured."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    ort_mod = pytest.importorskip("optimum.onnxruntime")
    from transformers import AutoTokenizer, pipeline

    from toolkit.runtime import SessionConfig

    names = {p.name for p in export.iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "fused.onnx" not in names  # the fused file is model.onnx: no second copy of the weights
    model = ort_mod.ORTModelForFeatureExtraction.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    texts = sentences()
    staged, feeds = executor_hidden(export, texts)
    enc = tok(texts, padding=True, truncation=True, return_tensors="np")
    for name, arr in feeds.items():  # transformers' tokenizer = the runtime's, from the same files
        np.testing.assert_array_equal(enc[name], arr)
    got = np.asarray(model(**{k: enc[k] for k in feeds}).last_hidden_state)
    real = feeds["attention_mask"].astype(bool)  # the sentences' tokens (padding rows: see below)
    fused, _ = executor_hidden(export, texts, fused=True)
    figures = {
        "staged": float(np.abs(got - staged)[real].max()),
        "fused": float(np.abs(got - fused)[real].max()),
        "staged_all_positions": float(np.abs(got - staged).max()),
    }
    assert got.shape == staged.shape and figures["staged"] <= TOL and figures["fused"] <= TOL
    # optimum's default session prepacks weights (other matmul kernels) where the Executor does
    # not: with the Executor's session options the same file gives the same bits, padding included
    same = ort_mod.ORTModelForFeatureExtraction.from_pretrained(
        export, session_options=SessionConfig().to_ort()
    )
    np.testing.assert_array_equal(np.asarray(same(**{k: enc[k] for k in feeds}).last_hidden_state), fused)
    # a transformers pipeline on the optimum model, one sentence at a time (no padding)
    pipe = pipeline("feature-extraction", model=model, tokenizer=tok)
    for text, row in zip(texts[:2], pipe(texts[:2])):
        want, _ = executor_hidden(export, [text])
        figures["pipeline"] = max(
            figures.get("pipeline", 0.0), float(np.abs(np.asarray(row, dtype=np.float32) - want).max())
        )
    assert figures["pipeline"] <= TOL
    print(f"optimum vs Executor on {export.name}: {figures}")
    return figures


@pytest.fixture
def optimum_check() -> Callable[[Path], dict[str, float]]:
    return check_feature_extraction
