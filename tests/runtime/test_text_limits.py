"""Run-time limits of text exports (toolkit.runtime.text.TextLimits), without a model: token ids
outside the vocabulary and sequences past the context are refused with one line naming them."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.errors import InputError
from toolkit.runtime.text import TextLimits, text_limits, tokenizer_entry


def _manifest(**text: object) -> dict:
    base = {"tokenizer": "tokenizer.json", "max_length": 8, "input_ids": "ids", "token_type_ids": "types"}
    return {"text": {**base, **text}}


def _feeds(ids: list[list[int]], types: list[list[int]] | None = None) -> dict[str, np.ndarray]:
    a = np.array(ids, dtype=np.int64)
    return {"ids": a, "types": np.array(types, dtype=np.int64) if types else np.zeros_like(a)}


def test_limits_read_from_the_manifest() -> None:
    lim = text_limits(_manifest(vocab_size=100, type_vocab_size=2, max_positions=6), "m.json")
    assert lim == TextLimits("m.json", "ids", 100, "types", 2, 6)
    assert text_limits(_manifest(), "m.json") is None  # an export written before the limits: no checks
    assert text_limits({"name": "mlp"}) is None  # not a text export


@pytest.mark.parametrize("bad", [0, -1, "512", 2.5, True])
def test_malformed_limit_is_refused(bad: object) -> None:
    with pytest.raises(InputError, match=r"m\.json: text\.vocab_size: expected a positive integer or null"):
        text_limits(_manifest(vocab_size=bad), "m.json")


def test_ids_types_and_lengths_checked() -> None:
    lim = TextLimits("m.json", "ids", 100, "types", 2, 6)
    lim.check(_feeds([[0, 99, 5], [1, 2, 3]], [[0, 1, 1], [0, 0, 0]]))  # inside every limit
    lim.check(_feeds([[1] * 6]))  # the whole context
    with pytest.raises(InputError) as err:
        lim.check(_feeds([[0, 5, 7], [1, 100, 3]]))
    assert (
        str(err.value)
        == "input 'ids': token id 100 at position [1, 1]: expected 0..99 (m.json text.vocab_size 100)"
    )
    with pytest.raises(InputError, match=r"input 'ids': token id -1 at position \[0, 2\]: expected 0\.\.99"):
        lim.check(_feeds([[0, 5, -1]]))
    with pytest.raises(InputError, match=r"input 'types': token id 2 at position \[0, 1\]: expected 0\.\.1 "):
        lim.check(_feeds([[0, 5, 7]], [[0, 2, 0]]))
    with pytest.raises(InputError) as err:
        lim.check(_feeds([[1] * 7]))
    assert str(err.value) == (
        "input 'ids': sequence of 7 tokens (axis 1): expected at most 6, the model's context "
        "(m.json text.max_positions)"
    )
    with pytest.raises(InputError, match=r"prompt: 9 tokens: expected at most 6, the model's context"):
        lim.check_length(9)
    lim.check_length(6)


def test_one_builder_of_the_text_entry(tmp_path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    entry = tokenizer_entry(tmp_path / "tokenizer.json", 64, vocab_size=30522, max_positions=512)
    assert entry["vocab_size"] == 30522 and entry["max_positions"] == 512 and entry["type_vocab_size"] is None
    lim = text_limits({"text": entry})
    assert lim is not None and (lim.vocab_size, lim.max_positions, lim.token_type_ids) == (30522, 512, None)
