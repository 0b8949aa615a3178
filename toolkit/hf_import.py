"""Import a Hugging Face BERT-family model directory into a graph spec + spec checkpoint.

``import_bert(PATH, OUT)`` reads ``config.json`` and the weights (``model.safetensors``, else
``pytorch_model.bin`` through ``torch.load(weights_only=True)``) without importing ``transformers``
and without running code from the directory, and writes

- ``OUT/spec.yaml``: the model as a graph spec, the encoder layer declared once as a block and
  repeated ``num_hidden_layers`` times (word + token-type embeddings, learned positions, LayerNorm,
  post-norm layers of attention and GELU feed-forward, masked mean pooling);
- ``OUT/checkpoints/best-00000000/``: a spec checkpoint (``toolkit.checkpoint``) holding the weights,
  with the tokenizer (``tokenizer.json``, its SHA-256 and the input names) in its metadata under
  ``text``, so the tokenizer travels with the checkpoint into every factorized copy and export;
- ``OUT/tokenizer/``: the tokenizer files as found (``tokenizer.json``, ``vocab.txt``, configs).

The graph outputs are the last layer's hidden states (``encoder``) and the mean-pooled sentence
embedding (``pool``). The pooler (tanh on the CLS token) is not imported. Everything is written into
a temporary directory beside ``OUT`` and renamed into place: a failure leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from toolkit.errors import InputError

BERT_TYPES = ("bert",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
STAGE_COUNT = 3


def read_config(path: Path) -> dict[str, Any]:
    """The config.json of a BERT-family directory, checked.

    Raises:
        InputError: not a directory with a BERT config, or a variant the spec cannot express.
    """
    cfg_path = path / "config.json"
    if not path.is_dir() or not cfg_path.is_file():
        raise InputError(f"{path}: expected a Hugging Face model directory with config.json, got none")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{cfg_path}: expected JSON, got invalid text ({exc})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    kind = cfg.get("model_type")
    if kind not in BERT_TYPES:
        raise InputError(
            f"{cfg_path}: model_type: expected a BERT-family model {list(BERT_TYPES)}, got {kind!r}"
        )
    checks = {
        "hidden_act": ("gelu",),
        "position_embedding_type": ("absolute", None),
    }
    for key, allowed in checks.items():
        if cfg.get(key) not in allowed:
            raise InputError(f"{cfg_path}: {key}: expected one of {list(allowed)}, got {cfg.get(key)!r}")
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise InputError(f"{cfg_path}: {key}: expected a positive integer, got {cfg.get(key)!r}")
    return cfg


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a model directory (safetensors preferred), prefix ``bert.`` removed.

    Raises:
        InputError: no weights file, or one that cannot be read.
    """
    st, pt = path / "model.safetensors", path / "pytorch_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load_file

            weights = load_file(str(st))
        elif pt.is_file():
            weights = torch.load(pt, map_location="cpu", weights_only=True)
        else:
            raise InputError(f"{path}: expected model.safetensors or pytorch_model.bin, got neither")
    except InputError:
        raise
    except Exception as exc:  # a corrupt file: the reader's own message says what is wrong
        raise InputError(f"{path}: could not read the weights ({type(exc).__name__}: {exc})") from None
    return {k.removeprefix("bert."): v for k, v in weights.items()}


def spec_dict(cfg: dict[str, Any], name: str, max_length: int, stages: int = STAGE_COUNT) -> dict[str, Any]:
    """The graph spec (blocks form) of a BERT config.

    Args:
        cfg: the checked config.json.
        name: the spec's name.
        max_length: the sequence length of the spec's inputs (the longest a run may feed).
        stages: number of stages: the embeddings, then the layers in even runs (cuts between layers).

    Raises:
        InputError: ``max_length`` beyond the model's position table, or heads not dividing the width.
    """
    d, eps = cfg["hidden_size"], float(cfg.get("layer_norm_eps", 1e-12))
    max_pos = int(cfg.get("max_position_embeddings", 512))
    if not 1 <= max_length <= max_pos:
        raise InputError(f"max_length: expected 1..{max_pos} (max_position_embeddings), got {max_length}")
    if d % cfg["num_attention_heads"]:
        raise InputError(
            f"config.json: num_attention_heads: {cfg['num_attention_heads']} does not divide hidden_size {d}"
        )
    dense = "none"
    types = int(cfg.get("type_vocab_size", 2))
    layer = [
        {"id": "q", "op": "linear", "in": "h", "out": d, "factorize": dense},
        {"id": "k", "op": "linear", "in": "h", "out": d, "factorize": dense},
        {"id": "v", "op": "linear", "in": "h", "out": d, "factorize": dense},
        {"id": "att", "op": "attention", "in": ["q", "k", "v", "mask"], "heads": cfg["num_attention_heads"]},
        {"id": "o", "op": "linear", "in": "att", "out": d, "factorize": dense},
        {"id": "res1", "op": "add", "in": ["o", "h"]},
        {"id": "ln1", "op": "layer_norm", "in": "res1", "eps": eps},
        {"id": "ff1", "op": "linear", "in": "ln1", "out": cfg["intermediate_size"], "factorize": dense},
        {"id": "act", "op": "gelu", "in": "ff1"},
        {"id": "ff2", "op": "linear", "in": "act", "out": d, "factorize": dense},
        {"id": "res2", "op": "add", "in": ["ff2", "ln1"]},
        {"id": "ln2", "op": "layer_norm", "in": "res2", "eps": eps},
    ]
    return {
        "name": name,
        "description": f"BERT-family encoder imported from Hugging Face ({cfg['num_hidden_layers']} layers, "
        f"width {d}, {cfg['num_attention_heads']} heads); outputs: last hidden states, mean-pooled embedding",
        "inputs": {
            "input_ids": {"shape": [max_length], "dtype": "int64", "vocab": cfg["vocab_size"]},
            "attention_mask": {"shape": [max_length], "dtype": "int64", "vocab": 2},
            "token_type_ids": {"shape": [max_length], "dtype": "int64", "vocab": types},
        },
        "blocks": {"bert_layer": {"inputs": ["h", "mask"], "output": "ln2", "nodes": layer}},
        "nodes": [
            {"id": "word", "op": "embedding", "in": "input_ids", "out": d, "factorize": dense},
            {"id": "token_type", "op": "embedding", "in": "token_type_ids", "out": d, "factorize": dense},
            {"id": "emb_sum", "op": "add", "in": ["word", "token_type"]},
            {"id": "pos", "op": "position_embedding", "in": "emb_sum", "max_len": max_pos, "kind": "learned"},
            {"id": "emb_ln", "op": "layer_norm", "in": "pos", "eps": eps},
            {
                "id": "encoder",
                "block": "bert_layer",
                "repeat": cfg["num_hidden_layers"],
                "in": ["emb_ln", "attention_mask"],
            },
            {"id": "pool", "op": "masked_mean", "in": ["encoder", "attention_mask"]},
        ],
        "outputs": ["encoder", "pool"],
        "stages": _stages(cfg["num_hidden_layers"], stages),
    }


def _stages(n_layers: int, count: int) -> list[list[str]]:
    """Stage lists: the embeddings alone (they outweigh a layer several times), then the layers in
    ``count - 1`` contiguous runs as even as possible, the pooling with the last."""
    emb = ["word", "token_type", "emb_sum", "pos", "emb_ln"]
    if count <= 1:
        return [[*emb, "encoder", "pool"]]
    runs = min(count - 1, n_layers)
    bounds = [round(i * n_layers / runs) for i in range(runs + 1)]
    layers = [[f"encoder.{k}" for k in range(a, b)] for a, b in itertools.pairwise(bounds)]
    layers[-1].append("pool")
    return [emb, *layers]


def _weight_map(n_layers: int) -> dict[str, str]:
    """Hugging Face parameter name -> node id + parameter inside the node's module."""
    out = {
        "embeddings.word_embeddings.weight": "word.weight",
        "embeddings.token_type_embeddings.weight": "token_type.weight",
        "embeddings.position_embeddings.weight": "pos.table.weight",
        "embeddings.LayerNorm.weight": "emb_ln.weight",
        "embeddings.LayerNorm.bias": "emb_ln.bias",
    }
    parts = {
        "attention.self.query": "q",
        "attention.self.key": "k",
        "attention.self.value": "v",
        "attention.output.dense": "o",
        "attention.output.LayerNorm": "ln1",
        "intermediate.dense": "ff1",
        "output.dense": "ff2",
        "output.LayerNorm": "ln2",
    }
    for i in range(n_layers):
        for hf, nid in parts.items():
            for p in ("weight", "bias"):
                out[f"encoder.layer.{i}.{hf}.{p}"] = f"encoder_{i}_{nid}.{p}"
    return out


def _json_file(path: Path) -> dict[str, Any] | None:
    """A small JSON object file of the tokenizer (None when absent or not a JSON object)."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path}: expected JSON, got invalid text") from None
    return doc if isinstance(doc, dict) else None


def _text_meta(source: Path, max_length: int) -> dict[str, Any]:
    tok = source / "tokenizer.json"
    if not tok.is_file():
        raise InputError(f"{source}: expected tokenizer.json (a Hugging Face fast tokenizer), got none")
    text = tok.read_text(encoding="utf-8")
    try:
        vocab = json.loads(text)["model"]["vocab"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InputError(f"{tok}: expected a tokenizer.json with model.vocab, got another file") from None
    return {
        "tokenizer_json": text,
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "vocab_size": len(vocab),
        "max_length": max_length,
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
        "token_type_ids": "token_type_ids",
    }


def import_bert(
    source: str | Path,
    out_dir: str | Path,
    *,
    max_length: int | None = None,
    stages: int = STAGE_COUNT,
    overwrite: bool = False,
    name: str | None = None,
) -> Path:
    """Import a BERT-family model directory: spec + spec checkpoint + tokenizer under ``out_dir``.

    Args:
        source: the Hugging Face model directory (read offline; no code from it runs).
        out_dir: the directory to write (must not exist unless ``overwrite``).
        max_length: input sequence length of the spec (default: sentence-transformers'
            ``max_seq_length`` when present, else ``max_position_embeddings``).
        stages: number of stages (the embeddings alone, then even runs of layers; at most layers + 1).
        overwrite: replace an existing ``out_dir``.
        name: the spec's name (default: the directory's name, or its parent's for a generic ``model``).

    Returns:
        The checkpoint directory (``out_dir/checkpoints/best-00000000``), loadable with
        ``toolkit.checkpoint.load_model``.

    Raises:
        InputError: not a BERT-family directory, missing or mismatched weights or tokenizer,
            or ``out_dir`` exists.
    """
    from toolkit.builder import build_model
    from toolkit.checkpoint import CKPT_DIR, save_checkpoint
    from toolkit.fsio import replace_dir
    from toolkit.spec import SpecError, parse_spec

    src, out = Path(source), Path(out_dir)
    if out.exists() and not overwrite:
        raise InputError(f"{out}: already exists; pass overwrite (--overwrite) to replace it")
    cfg = read_config(src)
    if max_length is None:
        st_cfg = src / "sentence_bert_config.json"
        seq = json.loads(st_cfg.read_text()).get("max_seq_length") if st_cfg.is_file() else None
        max_length = int(seq) if isinstance(seq, int) else int(cfg.get("max_position_embeddings", 512))
    text = _text_meta(src, max_length)
    text["hf_config"] = cfg  # optimum / transformers read config.json from every export
    for fname, key in (
        ("tokenizer_config.json", "tokenizer_config"),
        ("special_tokens_map.json", "special_tokens_map"),
    ):
        doc = _json_file(src / fname)
        if doc is not None:
            text[key] = doc
    if text["vocab_size"] != cfg["vocab_size"]:
        raise InputError(
            f"{src / 'tokenizer.json'}: expected a vocabulary of {cfg['vocab_size']} (config.json vocab_size), "
            f"got {text['vocab_size']}"
        )
    weights = read_weights(src)
    data = spec_dict(cfg, name or _default_name(src), max_length, stages)
    try:
        spec = parse_spec(data, source=f"{src} (imported spec)")
    except SpecError as exc:
        raise InputError(str(exc).splitlines()[0]) from None
    model = build_model(spec, seed=0)
    modules = model.node_modules()
    mapping = _weight_map(cfg["num_hidden_layers"])
    missing = [k for k in mapping if k not in weights]
    if missing:
        raise InputError(f"{src}: weights lack {len(missing)} tensor(s) of a BERT model, e.g. {missing[:3]}")
    with torch.no_grad():
        for hf_name, target in mapping.items():
            nid, attr = target.split(".", 1)
            param = modules[nid].get_parameter(attr)
            value = weights[hf_name]
            if tuple(value.shape) != tuple(param.shape):
                raise InputError(
                    f"{src}: {hf_name}: expected shape {list(param.shape)} (config.json), got {list(value.shape)}"
                )
            param.copy_(value.to(param.dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        meta = {"dense": False, "imported_from": str(src), "text": text, "seed": 0}
        save_checkpoint(tmp / CKPT_DIR, "best-00000000", model, spec.resolved(), meta)
        (tmp / "spec.yaml").write_text(_spec_yaml(data, src), encoding="utf-8")
        tok_dir = tmp / "tokenizer"
        tok_dir.mkdir()
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tok_dir / name)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / CKPT_DIR / "best-00000000"


def _default_name(src: Path) -> str:
    parts = [p for p in src.resolve().parts if p not in ("/", "model", "models", "snapshots")]
    return (parts[-1] if parts else "bert").replace("_", "-")


def _spec_yaml(data: dict[str, Any], src: Path) -> str:
    head = (
        f"# Imported by `rlhf import` from {src}.\n"
        "# The weights are in checkpoints/best-00000000 (this spec, expanded, is embedded there too).\n"
    )
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110)
    return head + body
