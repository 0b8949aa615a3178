"""The CPython reference manual (``pydoc_data.topics``, part of the standard library) as bytes, for
next-byte prediction.

Topics are split, not windows: the sorted topic names are shuffled with the data seed and cut into
test / val / train by bytes (``test_fraction`` / ``val_fraction`` of all bytes, whole topics), so no
window of the validation or test text overlaps a training topic. Each split's topics are joined
(``\\n\\n`` between topics) into one byte stream, cut into non-overlapping windows of ``T + 1``
bytes: input ``x = w[:T]``, target ``y = w[1:]`` (the next byte at every position). The vocabulary
is the 256 byte values; no tokenizer is needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from toolkit.errors import InputError

VOCAB = 256
SEPARATOR = b"\n\n"


def pydoc_topics() -> dict[str, bytes]:
    """Topic name -> its text as UTF-8 bytes (the Python version's own manual)."""
    from pydoc_data.topics import topics

    return {name: topics[name].encode("utf-8") for name in sorted(topics)}


def topic_split(
    val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[str], list[str], list[str]]:
    """Train / val / test topic names: a seeded shuffle of the sorted names, cut by byte share."""
    texts = pydoc_topics()
    names = sorted(texts)
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    total = sum(len(texts[n]) for n in names)
    test: list[str] = []
    val: list[str] = []
    train: list[str] = []
    seen = 0
    for name in order:
        if seen < test_fraction * total:
            test.append(name)
        elif seen < (test_fraction + val_fraction) * total:
            val.append(name)
        else:
            train.append(name)
        seen += len(texts[name])
    if not train:
        raise InputError(
            f"builtin dataset 'pydoc': expected some training topics, got none with val_fraction "
            f"{val_fraction} and test_fraction {test_fraction}"
        )
    return train, val, test


def byte_stream(names: list[str]) -> np.ndarray:
    """The topics' bytes joined by a blank line, as a uint8 array."""
    texts = pydoc_topics()
    return np.frombuffer(SEPARATOR.join(texts[n] for n in names), dtype=np.uint8)


def windows(stream: np.ndarray, length: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping next-byte windows: x (N, length), y (N, length) int64, y[t] = x[t + 1]."""
    n = (len(stream) - 1) // length
    if limit is not None:
        n = min(n, limit)
    idx = np.arange(n)[:, None] * length + np.arange(length + 1)[None, :]  # (N, length + 1)
    w = stream[idx].astype(np.int64) if n else np.zeros((0, length + 1), dtype=np.int64)
    return w[:, :-1], w[:, 1:]


def unigram_bits_per_byte(train: np.ndarray, evaluate: np.ndarray) -> float:
    """Cross-entropy in bits per byte of the training text's byte frequencies (add-one smoothed) on
    ``evaluate``: the baseline a next-byte model must beat."""
    counts = np.bincount(train.ravel(), minlength=VOCAB).astype(np.float64) + 1.0
    logp = np.log2(counts / counts.sum())
    return float(-logp[evaluate.ravel()].mean())


def load_pydoc_splits(cfg: Any, input_specs: Any) -> Any:
    """Splits of next-byte windows for a spec with one int64 input of shape [T] and vocab 256.

    ``cfg.limit`` caps the number of training windows (val and test keep theirs, capped at the
    same count), so a test can train a tiny model on a few windows.
    """
    from toolkit.data.splits import Split, Splits

    names = list(input_specs)
    where = "builtin dataset 'pydoc'"
    if len(names) != 1:
        raise InputError(f"{where}: expected a spec with exactly one input (the byte ids), got {names}")
    spec = input_specs[names[0]]
    shape = list(spec.shape if hasattr(spec, "shape") else spec["shape"])
    dtype = spec.dtype if hasattr(spec, "dtype") else spec.get("dtype")
    vocab = getattr(spec, "vocab", None) if hasattr(spec, "shape") else spec.get("vocab")
    if len(shape) != 1 or dtype != "int64" or vocab != VOCAB:
        raise InputError(
            f"{where}: input {names[0]!r}: expected int64 byte ids of shape [T] with vocab {VOCAB}, "
            f"got {dtype} {shape} vocab {vocab}"
        )
    if cfg.target not in (None, "y"):
        raise InputError(
            f"{where}: data.target: expected nothing (targets are the next bytes), got {cfg.target!r}"
        )
    length = shape[0]
    train, val, test = topic_split(cfg.val_fraction, cfg.test_fraction, cfg.seed)
    out = []
    for topics in (train, val, test):
        x, y = windows(byte_stream(topics), length, cfg.limit)
        out.append(Split({names[0]: x}, y))
    return Splits(train=out[0], val=out[1], test=out[2], source=where)
