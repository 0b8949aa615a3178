"""The offline corpus and the word-level augmentation used for distillation."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from toolkit.factorize.corpus import augment_sentence, python_reference_sentences, split_sentences

POOL = [
    "the quick brown fox jumps over the lazy dog today",
    "a class definition defines a class object in the current scope",
    "the if statement is used for conditional execution of code",
]


def _contiguous(needle: list[str], hay: list[str]) -> bool:
    return any(hay[i : i + len(needle)] == needle for i in range(len(hay) - len(needle) + 1))


def test_reference_corpus_is_real_prose_and_split_holds_out_the_tail() -> None:
    sentences = python_reference_sentences()
    assert len(sentences) > 1000 and len(set(sentences)) == len(sentences)
    assert all(40 <= len(s) <= 300 for s in sentences)
    train, held = split_sentences(sentences, 300)
    assert held == sentences[-300:] and train == sentences[:-300]
    with pytest.raises(ValueError, match="held_out"):
        split_sentences(sentences[:5], 5)


def test_augment_is_seeded_and_only_recombines_corpus_words() -> None:
    vocab = {w for s in POOL for w in s.split()}
    a = [augment_sentence(POOL[i % 3], POOL, random.Random(7)) for i in range(3)]
    b = [augment_sentence(POOL[i % 3], POOL, random.Random(7)) for i in range(3)]
    assert a == b
    rng = random.Random(0)
    kinds: Counter[str] = Counter()
    for i in range(600):
        src = POOL[i % 3]
        out = augment_sentence(src, POOL, rng)
        words = out.split()
        assert words and set(words) <= vocab
        if out == src:
            kinds["unchanged"] += 1
        elif _contiguous(words, src.split()):
            kinds["crop"] += 1
        elif not set(words) <= set(src.split()):
            kinds["splice or dropout"] += 1
    # unchanged ≈ 0.4 · 0.7 = 0.28 of draws (a splice at the sentence's own end may also be a no-op)
    assert 0.18 < kinds["unchanged"] / 600 < 0.45
    assert kinds["crop"] > 60 and kinds["splice or dropout"] > 60
