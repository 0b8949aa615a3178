"""factorize.json is input: ranks, shapes and names checked against the model before any allocation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from toolkit.errors import InputError

pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A tiny BERT (1 layer, hidden 32), factorized at ratio 0.5 and saved as `rlhf factorize` does."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from toolkit.factorize import factorize_module
    from toolkit.factorize.hf import minilm_dir, save_factorized_hf

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=40,
    )
    model = BertModel(cfg).eval()
    report = factorize_module(model, ratio=0.5, include=r"encoder\.layer\.")
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    out = tmp_path_factory.mktemp("tiny") / "saved"
    save_factorized_hf(model, tok, report.to_json(), out)
    return out, model


def _tampered(saved: tuple[Path, Any], tmp_path: Path, edit: Any) -> Path:
    dst = tmp_path / "saved"
    shutil.copytree(saved[0], dst)
    doc = json.loads((dst / "factorize.json").read_text())
    edit(doc)
    (dst / "factorize.json").write_text(json.dumps(doc))
    return dst


def test_round_trip(saved: tuple[Path, Any]) -> None:
    from toolkit.factorize.hf import load_factorized_hf

    again, _ = load_factorized_hf(saved[0])
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        want = saved[1](input_ids=ids).last_hidden_state
        got = again(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _set(field: str, value: Any, index: int = 0) -> Any:
    def edit(doc: dict[str, Any]) -> None:
        doc["layers"][index][field] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set("rank", 5000), r"layers\[0\]\.rank: expected an int in 0\.\.32 \(0 = kept dense\), got 5000"),
        (_set("rank", -1), r"layers\[0\]\.rank: expected an int in 0\.\.32"),
        (_set("rank", "8"), r"layers\[0\]\.rank: expected an int"),
        (
            _set("shape", [4096, 32]),
            r"layers\[0\]\.shape: expected the layer's own \(out, n\) \[32, 32\], got \[4096, 32\]",
        ),
        (
            _set("name", "encoder.layer.7.attention.self.query"),
            r"layers\[0\]\.name: expected the name of a layer",
        ),
        (
            _set("name", "encoder.layer.0.attention.output.LayerNorm"),
            r"expected an nn\.Linear, nn\.Conv2d or nn\.Embedding, got 'LayerNorm'",
        ),
        (lambda doc: doc.update(layers={"a": 1}), r"layers: expected a list"),
    ],
)
def test_tampered_report_is_refused_before_allocating(
    saved: tuple[Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: Any, message: str
) -> None:
    import toolkit.factorize.svd as svd
    from toolkit.factorize.hf import load_factorized_hf

    def no_factor(*args: object) -> None:
        raise AssertionError("a factor was allocated from an unchecked factorize.json")

    monkeypatch.setattr(svd, "build_factorized", no_factor)
    with pytest.raises(InputError, match=message):
        load_factorized_hf(_tampered(saved, tmp_path, edit))


def test_model_parameter_ceiling(saved: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from toolkit.factorize.hf import load_factorized_hf

    monkeypatch.setenv("RLHF_MAX_MODEL_PARAMS", "1000")
    with pytest.raises(
        InputError,
        match=r"config\.json: the model it describes has .* over the limit max_model_params = 1,000",
    ):
        load_factorized_hf(saved[0])


def test_report_size_ceiling(saved: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from toolkit.factorize.hf import load_factorized_hf

    monkeypatch.setenv("RLHF_MAX_REPORT_BYTES", "10")
    with pytest.raises(InputError, match="above the limit max_report_bytes=10"):
        load_factorized_hf(saved[0])
