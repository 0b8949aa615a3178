"""Text models in exports: the tokenizer that travels with a spec checkpoint, and samples from it.

An imported text model's checkpoint carries ``meta["text"]`` (``toolkit.hf_import``): the Hugging
Face fast-tokenizer file as a string, its SHA-256, the longest sequence and the graph input names.
An export of it holds ``tokenizer.json`` beside the ONNX files and a top-level manifest key
``"text"`` (written by ``toolkit.runtime.text.tokenizer_entry``, the one builder of that entry):

    "text": {"tokenizer": "tokenizer.json", "sha256": "<hex>", "max_length": <int>,
             "input_ids": "<graph input>", "attention_mask": "<graph input or null>",
             "token_type_ids": "<graph input or null>",
             "vocab_size": <int or null>, "type_vocab_size": <int or null>,
             "max_positions": <int or null>}

and the files ``optimum.onnxruntime`` / ``transformers.pipeline`` load (``optimum_layout``): the
fused graph as ``model.onnx``, ``config.json``, ``tokenizer_config.json``, ``special_tokens_map.json``.

Tokenizing uses the ``tokenizers`` package only (no torch, no transformers), as a device would.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import InputError

TOKENIZER_FILE = "tokenizer.json"


def quant_candidates() -> tuple[Any, ...]:
    """int8 settings tried for text models: per-channel dynamic weights (BERT-style weights have
    per-output-channel ranges; per-tensor weights lose far more), weight-only int8 (int8 files,
    float compute: no activation rounding) and the exporter's default dynamic setting. When only
    weight-only is good enough, ``choose_and_quantize`` also searches mixed candidates (the least
    sensitive layers multiply in int8, the others stay weight-only).

    Measured on all-MiniLM-L6-v2 (docs/benchmarks/transformer.md): dynamic per-channel int8 loses
    most of its accuracy in the per-tensor 8-bit rounding of activations, not of weights; weight
    rounding alone keeps every sentence's embedding at cosine > 0.998 to fp32.

    Static (QDQ) activations are left out: attention activations have outliers a calibrated
    per-tensor range clips, and they do not make the files smaller."""
    from toolkit.export.quantize import QuantSetting

    return (
        QuantSetting("dynamic", "qint8", per_channel=True),
        QuantSetting("weight_only", "qint8", per_channel=True),
        QuantSetting("dynamic", "qint8"),
    )


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


HF_HIDDEN = "last_hidden_state"  # the per-token output name optimum's feature extraction reads
HF_MODEL_FILE = "model.onnx"  # the one file optimum's ORTModel opens (optimum.onnxruntime.constants)
BERT_SPECIAL = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}


def spec_limits(spec: Any, text: Mapping[str, Any]) -> dict[str, int | None]:
    """What the runtime checks token inputs against, read from the spec the model was built from:
    the vocabulary of the embedding that reads ``input_ids`` (and ``token_type_ids``) and the
    shortest ``position_embedding`` table (the model's context)."""
    vocab: dict[str, int] = {}
    for n in spec.nodes:
        if n.op == "embedding" and n.in_ and n.in_[0] in spec.inputs:
            size = n.vocab or spec.inputs[n.in_[0]].vocab
            if size is not None:
                vocab[n.in_[0]] = min(int(size), vocab.get(n.in_[0], int(size)))
    positions = [int(n.param("max_len")) for n in spec.nodes if n.op == "position_embedding"]
    types = text.get("token_type_ids")
    return {
        "vocab_size": vocab.get(str(text["input_ids"])),
        "type_vocab_size": vocab.get(str(types)) if types else None,
        "max_positions": min(positions) if positions else None,
    }


def write_text_export(tmp: Path, manifest: dict[str, Any], text: Mapping[str, Any], spec: Any = None) -> None:
    """Finish a text model's export in its (temporary) directory: ``tokenizer.json``, the
    manifest's ``text`` entry (``toolkit.runtime.text.tokenizer_entry``, with the limits the runtime
    checks) and the layout optimum / transformers load (``optimum_layout``).

    Args:
        tmp: the export directory being built (the stage files and the fused file are written).
        manifest: the manifest document, completed in place (not yet written).
        text: the checkpoint's ``meta["text"]`` (checked with ``check_text_meta``).
        spec: the model's spec (``model.spec``): vocabulary sizes and context read from it.
    """
    from toolkit.fsio import atomic_write_bytes
    from toolkit.runtime.text import tokenizer_entry

    path = tmp / TOKENIZER_FILE
    atomic_write_bytes(path, str(text["tokenizer_json"]).encode("utf-8"))
    limits = (
        spec_limits(spec, text)
        if spec is not None
        else {k: text.get(k) for k in ("vocab_size", "type_vocab_size", "max_positions")}
    )
    manifest["text"] = tokenizer_entry(
        path,
        int(text["max_length"]),
        str(text["input_ids"]),
        text.get("attention_mask"),
        text.get("token_type_ids"),
        **limits,
    )
    optimum_layout(tmp, manifest, text, spec)


def rename_tensor(data: bytes, old: str, new: str) -> bytes:
    """An ONNX file with every use of the tensor name ``old`` (graph inputs/outputs, node inputs
    and outputs, value infos) renamed to ``new``."""
    import onnx

    proto = onnx.load_from_string(data)
    g = proto.graph
    if any(new in (*n.input, *n.output) for n in g.node) or new in {v.name for v in g.input}:
        raise ValueError(f"ONNX graph: cannot rename {old!r} to {new!r}: the name is taken")
    for node in g.node:
        node.input[:] = [new if x == old else x for x in node.input]
        node.output[:] = [new if x == old else x for x in node.output]
    for info in (*g.input, *g.output, *g.value_info):
        if info.name == old:
            info.name = new
    return proto.SerializeToString()


def _rename_in_doc(doc: Any, old: str, new: str) -> None:
    """Rename tensor ``old`` in every ``{"name": ...}`` tensor entry of the manifest (in place)."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in ("inputs", "outputs") and isinstance(value, list):
                for t in value:
                    if isinstance(t, dict) and t.get("name") == old:
                        t["name"] = new
            else:
                _rename_in_doc(value, old, new)
    elif isinstance(doc, list):
        for item in doc:
            _rename_in_doc(item, old, new)


def optimum_layout(tmp: Path, manifest: dict[str, Any], text: Mapping[str, Any], spec: Any = None) -> None:
    """Make a text export loadable by ``optimum.onnxruntime.ORTModelForFeatureExtraction`` (and
    ``transformers.pipeline``) as well as by the executor, without a second copy of the weights.

    - The per-token output (B, T, d) is named ``last_hidden_state`` in every file and the manifest
      (the name optimum reads); other outputs (``pool``) keep theirs.
    - The fused fp32 file, which every export holds anyway, is ``model.onnx`` (the one file optimum
      opens) instead of ``fused.onnx``; the manifest's ``fused`` entry names it, so
      ``rlhf run --fused`` runs the same file.
    - ``config.json`` (``model_type`` bert, sizes), ``tokenizer_config.json`` (``model_max_length``
      = the export's ``max_length``) and ``special_tokens_map.json`` beside ``tokenizer.json``.
    """
    from toolkit.export.manifest import file_entry
    from toolkit.fsio import atomic_write_bytes

    outs = manifest["outputs"]
    per_token = [t for t in outs if len(t["shape"]) == 3 and t["dtype"] == "float32"]
    if per_token and all(t["name"] != HF_HIDDEN for t in outs):
        old = per_token[0]["name"]
        units = [*manifest["stages"], manifest["fused"]]
        for unit in units:
            for variant, entry in unit["files"].items():
                tensors = [*unit.get("inputs", []), *unit.get("outputs", outs)]
                if not any(t["name"] == old for t in tensors):
                    continue
                data = rename_tensor((tmp / entry["file"]).read_bytes(), old, HF_HIDDEN)
                atomic_write_bytes(tmp / entry["file"], data)
                unit["files"][variant] = file_entry(entry["file"], data)
        _rename_in_doc(manifest, old, HF_HIDDEN)
    fused = manifest["fused"]["files"]["fp32"]
    if fused["file"] != HF_MODEL_FILE:
        os.replace(tmp / fused["file"], tmp / HF_MODEL_FILE)
        fused["file"] = HF_MODEL_FILE
    d = (per_token or outs)[0]["shape"][-1]  # the model width (None only for a dynamic last axis)
    limits = manifest["text"]
    config = dict(text.get("hf_config") or {})
    if not config:  # a checkpoint imported before the config travelled with it: sizes from the spec
        att = [n for n in spec.nodes if n.op == "attention"] if spec is not None else []
        config = {"model_type": "bert", "num_hidden_layers": len(att)}
        if isinstance(d, int):
            config["hidden_size"] = d
        if att:
            config["num_attention_heads"] = int(att[0].param("heads"))
    config.update(
        {
            "architectures": ["BertModel"],
            **{k: v for k, v in (
                ("vocab_size", limits.get("vocab_size")),
                ("max_position_embeddings", limits.get("max_positions")),
                ("type_vocab_size", limits.get("type_vocab_size")),
            ) if v is not None},
        }
    )  # fmt: skip
    atomic_write_bytes(tmp / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    tok_cfg = dict(text.get("tokenizer_config") or {})
    if not tok_cfg:
        normalizer = json.loads(str(text["tokenizer_json"])).get("normalizer") or {}
        tok_cfg = {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": bool(normalizer.get("lowercase", True)),
        }
        tok_cfg.update(BERT_SPECIAL)
    tok_cfg["model_max_length"] = int(text["max_length"])  # truncate where the runtime does
    specials = dict(text.get("special_tokens_map") or BERT_SPECIAL)
    atomic_write_bytes(tmp / "tokenizer_config.json", (json.dumps(tok_cfg, indent=2) + "\n").encode())
    atomic_write_bytes(tmp / "special_tokens_map.json", (json.dumps(specials, indent=2) + "\n").encode())
