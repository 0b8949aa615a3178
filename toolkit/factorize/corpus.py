"""An English text corpus that ships with every CPython: the Python Language Reference.

``pydoc_data.topics.topics`` holds the text of the reference manual's topics (≈ 465 k characters of
real prose: "The "if" statement is used for conditional execution ..."). It needs no download, so the
MiniLM distillation and its held-out evaluation run offline. Sentences are split on ". ", cleaned of
reStructuredText markup and code-like lines, de-duplicated and shuffled with a fixed seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from toolkit.errors import InputError

_WS = re.compile(r"\s+")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def python_reference_sentences(min_chars: int = 40, max_chars: int = 300, seed: int = 0) -> list[str]:
    """Prose sentences of the Python Language Reference, shuffled with ``seed``.

    Args:
        min_chars, max_chars: keep sentences of this length.
        seed: shuffle seed (the order fixes the train / held-out split).

    Returns:
        A list of unique sentences (several thousand).
    """
    from pydoc_data.topics import topics

    out: list[str] = []
    seen: set[str] = set()
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            lines = [ln.strip() for ln in para.splitlines()]
            if any(ln.startswith((">>>", "...", "::")) for ln in lines) or para.startswith("   "):
                continue  # code examples and grammar blocks
            text = _WS.sub(" ", " ".join(lines)).strip()
            for sent in _SPLIT.split(text):
                letters = sum(c.isalpha() or c == " " for c in sent)
                if not min_chars <= len(sent) <= max_chars or letters < 0.85 * len(sent) or sent in seen:
                    continue
                seen.add(sent)
                out.append(sent)
    random.Random(seed).shuffle(out)
    return out


def split_sentences(sentences: list[str], held_out: int) -> tuple[list[str], list[str]]:
    """(train, held-out) with the last ``held_out`` sentences held out.

    Raises:
        ValueError: when fewer than ``held_out`` + 1 sentences are given.
    """
    if not 0 < held_out < len(sentences):
        raise InputError(f"held_out: expected in [1, {len(sentences) - 1}], got {held_out}")
    return sentences[:-held_out], sentences[-held_out:]


def augment_sentence(sentence: str, pool: Sequence[str], rng: random.Random) -> str:
    """A new input sentence for distillation, made from ``sentence`` (word level).

    The teacher labels any input, so new text costs nothing but the teacher's forward. With
    probability 0.3 a random contiguous crop of at least half the words; with 0.3 a splice (a prefix of
    ``sentence`` followed by a suffix of a random ``pool`` sentence); otherwise unchanged. Then, with
    probability 0.3, each word is dropped with probability 0.1. A small offline corpus seen for many
    epochs thus keeps showing the student new inputs from the same domain.
    """
    words = sentence.split()
    r = rng.random()
    if r < 0.3 and len(words) > 6:
        keep = rng.randint(max(3, len(words) // 2), len(words))
        start = rng.randint(0, len(words) - keep)
        words = words[start : start + keep]
    elif r < 0.6 and pool and words:
        other = rng.choice(pool).split() or [""]
        words = words[: rng.randint(1, len(words))] + other[rng.randint(0, len(other) - 1) :]
    if rng.random() < 0.3:
        words = [w for w in words if rng.random() > 0.1] or words
    return " ".join(words)
