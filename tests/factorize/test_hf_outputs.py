"""`rlhf factorize` / `rlhf classify` outputs on Hugging Face models: built aside and swapped in
whole, never mixed with an older directory's files; an existing OUT needs --overwrite."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("transformers")

from toolkit.cli import main

pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dense tiny BERT saved as a Hugging Face directory (config, weights, MiniLM's tokenizer)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from toolkit.factorize.hf import minilm_dir

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    out = tmp_path_factory.mktemp("tinyhf") / "dense"
    BertModel(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _old_export(path: Path) -> dict[str, bytes]:
    """A directory as an earlier run left it, with an ONNX file and a manifest of its own."""
    path.mkdir(parents=True)
    files = {"model.onnx": b"old onnx", "manifest.json": b'{"old": true}', "notes.txt": b"keep?"}
    for name, data in files.items():
        (path / name).write_bytes(data)
    return files


def _invoke(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_factorize_existing_out_needs_overwrite_and_is_left_untouched(tiny_hf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    files = _old_export(out)
    res = _invoke("factorize", tiny_hf, "-o", out, "--ratio", "0.5", "--no-onnx", "--samples", "8")
    assert res.exit_code == 2, res.output
    assert f"output directory {out} exists" in res.output and "--overwrite" in res.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


def test_factorize_no_onnx_over_an_old_export_leaves_no_stale_model(tiny_hf: Path, tmp_path: Path) -> None:
    from toolkit.factorize.hf import load_factorized_hf

    out = tmp_path / "out"
    _old_export(out)
    args = ("factorize", tiny_hf, "-o", out, "--ratio", "0.5", "--no-onnx", "--samples", "8", "--overwrite")
    res = _invoke(*args)
    assert res.exit_code == 0, res.output
    names = {p.name for p in out.iterdir()}
    assert "model.onnx" not in names and "manifest.json" not in names and "notes.txt" not in names
    assert {"model.safetensors", "factorize.json", "config.json"} <= names
    assert not list(tmp_path.glob(".out.*"))  # no temporary directory left beside it
    report = json.loads((out / "factorize.json").read_text())
    model, _ = load_factorized_hf(out)
    assert any(layer["rank"] for layer in report["layers"])
    assert type(model.get_submodule(report["layers"][0]["name"])).__name__.startswith("Factorized")
    import numpy as np

    np.savez(
        tmp_path / "x.npz", input_ids=np.ones((1, 4), np.int64), attention_mask=np.ones((1, 4), np.int64)
    )
    res = _invoke("run", out, "--input", tmp_path / "x.npz", "-o", tmp_path / "y.npy")
    assert res.exit_code == 2 and "no manifest.json" in res.output  # nothing old left to run


def test_classify_existing_out_needs_overwrite_and_no_onnx_replaces_it(tiny_hf: Path, tmp_path: Path) -> None:
    csv = tmp_path / "train.csv"
    csv.write_text("text,label\n" + "".join(f"good film {i},pos\nbad film {i},neg\n" for i in range(4)))
    out = tmp_path / "clf"
    files = _old_export(out)
    base = ("classify", tiny_hf, "--train", csv, "-o", out, "--steps", "1", "--no-onnx")
    res = _invoke(*base)
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    res = _invoke(*base, "--overwrite")
    assert res.exit_code == 0, res.output
    names = {p.name for p in out.iterdir()}
    assert "model.onnx" not in names and "manifest.json" not in names and "notes.txt" not in names
    assert {"classifier.json", "classifier.safetensors", "model.safetensors"} <= names


def test_a_failure_inside_leaves_the_old_directory(tmp_path: Path) -> None:
    from toolkit.fsio import staged_dir

    out = tmp_path / "out"
    files = _old_export(out)
    with pytest.raises(RuntimeError, match="boom"), staged_dir(out, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("boom")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
