"""Text in, token arrays out, without torch: the ``tokenizers`` package on a ``tokenizer.json``.

An export that takes text carries its Hugging Face fast-tokenizer file and, in ``manifest.json``, a
top-level ``"text"`` entry::

    "text": {"tokenizer": "tokenizer.json", "sha256": "<hex>", "max_length": 64,
             "input_ids": "input_ids", "attention_mask": "attention_mask", "token_type_ids": null,
             "vocab_size": 30522, "type_vocab_size": 2, "max_positions": 512}

(the three limits may be null or absent in exports written before they existed). ``TextLimits``
refuses token ids outside the vocabulary and sequences longer than ``max_positions`` before
onnxruntime sees them; the ``Executor`` applies it to every run of a text export.

``TextEncoder`` turns a list of strings into the model's int64 inputs (padded to the longest text,
truncated at ``max_length`` with the count of truncated texts kept); ``classify_texts`` runs an
export on texts and, when the manifest names ``"labels"``, returns the label and softmax scores.
Imports: numpy, tokenizers and the runtime only (no torch, no transformers).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_runtime.errors import InputError


@dataclass
class Encoded:
    """Token arrays of a batch of texts: name -> (B, T) int64, and how many texts were truncated."""

    arrays: dict[str, np.ndarray]
    truncated: int


class TextEncoder:
    """A ``tokenizers.Tokenizer`` with fixed truncation, feeding names and padding.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``.
        max_length: token cap per text (special tokens included), >= 2.
        input_ids, attention_mask, token_type_ids: the model's input names (None: not fed).
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        input_ids: str = "input_ids",
        attention_mask: str | None = "attention_mask",
        token_type_ids: str | None = None,
    ) -> None:
        if not isinstance(max_length, int) or max_length < 2:
            raise InputError(f"max_length: expected an integer >= 2, got {max_length!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.names = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
        }
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length)
        pad = tokenizer.token_to_id("[PAD]")
        self.pad_id = int(pad) if pad is not None else 0

    @classmethod
    def from_file(cls, path: str | Path, max_length: int, **names: Any) -> TextEncoder:
        """Load ``tokenizer.json``.

        Raises:
            FileNotFoundError: no such file.
            InputError: the file is not a tokenizer.
        """
        from tokenizers import Tokenizer

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: expected a tokenizer.json file, got no such file")
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as exc:  # the tokenizers package raises a bare Exception on a bad file
            raise InputError(
                f"{p}: expected a Hugging Face tokenizer.json, got {str(exc).splitlines()[0]}"
            ) from None
        return cls(tok, max_length, **names)

    def fingerprint(self) -> str:
        """sha256 of the tokenizer's JSON and the cap: a cache key for token arrays."""
        return hashlib.sha256(f"{self.tokenizer.to_str()}|{self.max_length}".encode()).hexdigest()

    def encode(self, texts: Sequence[str]) -> Encoded:
        """Tokenize ``texts``: int64 (B, T) arrays padded to the longest (T <= max_length)."""
        encs = self.tokenizer.encode_batch(list(texts))
        width = max((len(e.ids) for e in encs), default=1)
        ids = np.full((len(encs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encs), width), dtype=np.int64)
        types = np.zeros((len(encs), width), dtype=np.int64)
        for i, e in enumerate(encs):
            n = len(e.ids)
            ids[i, :n] = e.ids
            mask[i, :n] = 1
            types[i, :n] = e.type_ids
        out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        arrays = {name: out[k] for k, name in self.names.items() if name is not None}
        return Encoded(arrays, sum(1 for e in encs if e.overflowing))


def text_encoder_for(export_dir: str | Path, manifest: dict[str, Any]) -> TextEncoder:
    """The encoder an export's ``"text"`` manifest entry describes, its file checked by sha256.

    Raises:
        InputError: no or a malformed ``text`` entry, or a tokenizer file whose hash differs.
    """
    d = Path(export_dir)
    t = manifest.get("text")
    if (
        not isinstance(t, dict)
        or not isinstance(t.get("tokenizer"), str)
        or not isinstance(t.get("max_length"), int)
    ):
        raise InputError(
            f"{d / 'manifest.json'}: text: expected {{'tokenizer': file, 'max_length': int, ...}}, got {t!r}"
        )
    path = d / t["tokenizer"]
    if path.resolve().parent != d.resolve():
        raise InputError(
            f"{d / 'manifest.json'}: text.tokenizer: expected a file name in the export, got {t['tokenizer']!r}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected the export's tokenizer file, got no such file")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if t.get("sha256") not in (None, digest):
        raise InputError(f"{path}: expected sha256 {t['sha256']} (manifest.json), got {digest}")
    return TextEncoder.from_file(
        path,
        t["max_length"],
        input_ids=t.get("input_ids") or "input_ids",
        attention_mask=t.get("attention_mask"),
        token_type_ids=t.get("token_type_ids"),
    )


def read_lines(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file (one text per line).

    Raises:
        FileNotFoundError, InputError: missing file, undecodable bytes or no text.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: expected a text file (one text per line), got no such file")
    texts = []
    with p.open("rb") as fh:
        for i, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{p}:{i}: expected UTF-8 text, got undecodable bytes ({exc.reason})"
                ) from None
            if line:
                texts.append(line)
    if not texts:
        raise InputError(f"{p}: expected at least one non-empty line, got none")
    return texts


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (B, K) scores, float64."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def run_texts(
    executor: Any, export_dir: str | Path, texts: Sequence[str], batch_size: int = 64
) -> tuple[dict[str, np.ndarray], int]:
    """Run an export (a ``rlhf_runtime.Executor``) on texts: (outputs concatenated, truncated count)."""
    enc = text_encoder_for(export_dir, executor.manifest.raw)
    parts: list[dict[str, np.ndarray]] = []
    truncated = 0
    for i in range(0, len(texts), batch_size):
        e = enc.encode(texts[i : i + batch_size])
        truncated += e.truncated
        parts.append(executor.run(e.arrays))
    names = list(parts[0])
    if any(p[n].ndim >= 2 and p[n].shape[1:] != parts[0][n].shape[1:] for p in parts for n in names):
        # per-token outputs of different widths: pad the token axis with zeros
        width = max(p[n].shape[1] for p in parts for n in names)
        for p in parts:
            for n in names:
                a = p[n]
                if a.ndim >= 3:
                    p[n] = np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
    return {n: np.concatenate([p[n] for p in parts]) for n in names}, truncated


def classify_texts(
    export_dir: str | Path, texts: Sequence[str], threads: int = 0, executor: Any = None
) -> list[dict[str, Any]]:
    """Label and scores of each text by a classifier export (manifest with ``text`` and ``labels``).

    Returns:
        One dict per text: {"text", "label", "scores": {label: probability}}.

    Raises:
        InputError: the export has no ``labels`` or its output is not (B, len(labels)).
    """
    return classify_texts_counted(export_dir, texts, threads, executor)[0]


def classify_texts_counted(
    export_dir: str | Path, texts: Sequence[str], threads: int = 0, executor: Any = None
) -> tuple[list[dict[str, Any]], int]:
    """``classify_texts`` and the number of texts truncated at the export's ``max_length``."""
    from rlhf_runtime import Executor, SessionConfig

    ex = executor or Executor(
        export_dir, providers="cpu", session_options=SessionConfig(intra_op_threads=threads)
    )
    labels = ex.manifest.raw.get("labels")
    if not isinstance(labels, list) or not labels:
        raise InputError(
            f"{Path(export_dir) / 'manifest.json'}: labels: expected a list of label names, got {labels!r}"
        )
    outputs, truncated = run_texts(ex, export_dir, texts)
    logits = next(iter(outputs.values()))
    if logits.ndim != 2 or logits.shape[1] != len(labels):
        raise InputError(f"{export_dir}: expected outputs (batch, {len(labels)}), got {logits.shape}")
    probs = softmax(logits)
    rows = [
        {"text": t, "label": labels[int(p.argmax())], "scores": {lab: float(s) for lab, s in zip(labels, p)}}
        for t, p in zip(texts, probs)
    ]
    return rows, truncated


LIMIT_KEYS = ("vocab_size", "type_vocab_size", "max_positions")


def tokenizer_entry(
    path: str | Path,
    max_length: int,
    input_ids: str = "input_ids",
    attention_mask: str | None = "attention_mask",
    token_type_ids: str | None = None,
    *,
    vocab_size: int | None = None,
    type_vocab_size: int | None = None,
    max_positions: int | None = None,
) -> dict[str, Any]:
    """The manifest's ``"text"`` entry for a tokenizer file written into an export (the one
    builder of it: the spec exporter and the classifier export both call it).

    Args:
        path: the tokenizer.json written into the export (hashed here).
        max_length: the token cap texts are truncated to.
        input_ids, attention_mask, token_type_ids: the model's input names (None: not an input).
        vocab_size: rows of the embedding ``input_ids`` index (ids must be below it).
        type_vocab_size: rows of the token-type embedding (``token_type_ids`` below it).
        max_positions: the model's context: the longest sequence its position table covers.
    """
    p = Path(path)
    return {
        "tokenizer": p.name,
        "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
        "max_length": int(max_length),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "vocab_size": None if vocab_size is None else int(vocab_size),
        "type_vocab_size": None if type_vocab_size is None else int(type_vocab_size),
        "max_positions": None if max_positions is None else int(max_positions),
    }


@dataclass(frozen=True)
class TextLimits:
    """Run-time checks of token inputs against what the model can index, so that onnxruntime never
    sees an id past its embedding table or a sequence past its position table (it would fail with
    an opaque Gather error, or read out of range on some providers)."""

    where: str
    input_ids: str
    vocab_size: int | None
    token_type_ids: str | None
    type_vocab_size: int | None
    max_positions: int | None

    def check_length(self, length: int, what: str = "prompt") -> None:
        """Refuse ``length`` tokens (a prompt plus what generation will add) past the context.

        Raises:
            InputError: one line with the length and the limit.
        """
        if self.max_positions is not None and length > self.max_positions:
            raise InputError(
                f"{what}: {length} tokens: expected at most {self.max_positions}, the model's context "
                f"({self.where} text.max_positions)"
            )

    def check(self, inputs: Any) -> None:
        """Check ``inputs`` (name -> int array, batch first, sequence second).

        Raises:
            InputError: one line naming the input, the offending value and position, and the limit.
        """
        ids = inputs.get(self.input_ids)
        limit = self.max_positions
        if limit is not None and isinstance(ids, np.ndarray) and ids.ndim >= 2 and ids.shape[1] > limit:
            raise InputError(
                f"input {self.input_ids!r}: sequence of {ids.shape[1]} tokens (axis 1): expected at most "
                f"{limit}, the model's context ({self.where} text.max_positions)"
            )
        for name, size, key in (
            (self.input_ids, self.vocab_size, "vocab_size"),
            (self.token_type_ids, self.type_vocab_size, "type_vocab_size"),
        ):
            a = inputs.get(name) if name is not None else None
            if size is None or not isinstance(a, np.ndarray) or a.size == 0:
                continue
            lo, hi = a.min(), a.max()
            if lo >= 0 and hi < size:
                continue
            bad = lo if lo < 0 else hi
            pos = [int(i) for i in np.argwhere(a == bad)[0]]
            raise InputError(
                f"input {name!r}: token id {int(bad)} at position {pos}: expected 0..{size - 1} "
                f"({self.where} text.{key} {size})"
            )


def text_limits(manifest: Any, where: str = "manifest.json") -> TextLimits | None:
    """The ``TextLimits`` a manifest's ``"text"`` entry states (None: no text entry, or no limits).

    Raises:
        InputError: a limit that is not a positive integer or null.
    """
    t = manifest.get("text") if isinstance(manifest, dict) else None
    if not isinstance(t, dict):
        return None
    vals: dict[str, int | None] = {}
    for key in LIMIT_KEYS:
        v = t.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise InputError(f"{where}: text.{key}: expected a positive integer or null, got {v!r}")
        vals[key] = v
    if all(v is None for v in vals.values()):
        return None
    return TextLimits(
        where,
        str(t.get("input_ids") or "input_ids"),
        vals["vocab_size"],
        t.get("token_type_ids"),
        vals["type_vocab_size"],
        vals["max_positions"],
    )


def dumps(doc: Any) -> str:
    """JSON of a result list, one line per text."""
    return "\n".join(json.dumps(r) for r in doc)
