"""Text models in exports: the tokenizer that travels with a spec checkpoint, and samples from it.

An imported text model's checkpoint carries ``meta["text"]`` (``toolkit.hf_import``): the Hugging
Face fast-tokenizer file as a string, its SHA-256, the longest sequence and the graph input names.
An export of it holds ``tokenizer.json`` beside the ONNX files and a top-level manifest key

    "text": {"tokenizer": "tokenizer.json", "sha256": "<hex>", "max_length": <int>,
             "input_ids": "<graph input>", "attention_mask": "<graph input or null>",
             "token_type_ids": "<graph input or null>"}

Tokenizing uses the ``tokenizers`` package only (no torch, no transformers), as a device would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from toolkit.errors import InputError

TOKENIZER_FILE = "tokenizer.json"


def quant_candidates() -> tuple[Any, ...]:
    """int8 settings tried for text models: per-channel dynamic weights first (BERT-style weights
    have per-output-channel ranges; on MiniLM this keeps sentence embeddings at cosine ~0.99 to fp32
    where per-tensor weights give ~0.96), then the exporter's default dynamic setting.

    Static (QDQ) activations are left out: attention activations have outliers a calibrated
    per-tensor range clips, and they do not make the files smaller."""
    from toolkit.export.quantize import QuantSetting

    return (QuantSetting("dynamic", "qint8", per_channel=True), QuantSetting("dynamic", "qint8"))


KEYS = ("input_ids", "attention_mask", "token_type_ids")


def check_text_meta(text: Mapping[str, Any], input_names: Sequence[str], where: str) -> None:
    """Check a checkpoint's ``text`` metadata against the model's inputs.

    Raises:
        InputError: a missing tokenizer, a hash that does not match, or input names the model lacks.
    """
    tok = text.get("tokenizer_json")
    if not isinstance(tok, str):
        raise InputError(f"{where}: text.tokenizer_json: expected the tokenizer.json text, got none")
    digest = hashlib.sha256(tok.encode("utf-8")).hexdigest()
    if digest != text.get("sha256"):
        raise InputError(
            f"{where}: text.sha256: expected {digest} (of the tokenizer), got {text.get('sha256')}"
        )
    for key in KEYS:
        name = text.get(key)
        if name is not None and name not in input_names:
            raise InputError(
                f"{where}: text.{key}: expected one of the model inputs {list(input_names)}, got {name!r}"
            )
    if text.get("input_ids") is None:
        raise InputError(f"{where}: text.input_ids: expected a graph input name, got none")


def tokenize(
    text: Mapping[str, Any], sentences: Sequence[str], max_length: int | None = None
) -> dict[str, np.ndarray]:
    """Token id arrays for sentences (padded to the longest, truncated at ``max_length``).

    Args:
        text: the ``text`` metadata (``tokenizer_json`` and input names).
        sentences: the texts.
        max_length: truncation length (default ``text["max_length"]``).

    Returns:
        Graph input name -> int64 array (batch, seq) for each of input_ids / attention_mask /
        token_type_ids the model takes.
    """
    from tokenizers import Tokenizer

    from toolkit.runtime.text import TextEncoder  # the encoder the device runs: one tokenization

    encoder = TextEncoder(
        Tokenizer.from_str(text["tokenizer_json"]),
        int(max_length or text["max_length"]),
        input_ids=str(text["input_ids"]),
        attention_mask=text.get("attention_mask"),
        token_type_ids=text.get("token_type_ids"),
    )
    return encoder.encode(sentences).arrays


def manifest_text(text: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's ``text`` entry (the tokenizer file name instead of its contents)."""
    return {
        "tokenizer": TOKENIZER_FILE,
        "sha256": text["sha256"],
        "max_length": int(text["max_length"]),
        "input_ids": text["input_ids"],
        "attention_mask": text.get("attention_mask"),
        "token_type_ids": text.get("token_type_ids"),
    }
