"""`rlhf factorize`: user errors exit 2 with one line; a spec checkpoint round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from toolkit.cli import main


def _run(args: list[str]) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["factorize", *args])
    return res.exit_code, res.output + (res.stderr if hasattr(res, "stderr") else "")


def test_missing_source_exits_2(tmp_path: Path) -> None:
    code, out = _run([str(tmp_path / "nope"), "-o", str(tmp_path / "out"), "--ratio", "0.5"])
    assert code == 2
    assert "no such path" in out and "Traceback" not in out


@pytest.mark.parametrize("ratio", ["1.5", "0", "-0.2"])
def test_bad_ratio_exits_2(tmp_path: Path, ratio: str) -> None:
    code, out = _run([str(tmp_path), "-o", str(tmp_path / "out"), "--ratio", ratio])
    assert code == 2
    assert "ratio" in out and "Traceback" not in out


def test_two_rules_exit_2(tmp_path: Path) -> None:
    code, out = _run([str(tmp_path), "-o", str(tmp_path / "out"), "--ratio", "0.5", "--rank", "4"])
    assert code == 2 and "exactly one" in out


def test_directory_without_checkpoint_exits_2(tmp_path: Path) -> None:
    code, out = _run([str(tmp_path), "-o", str(tmp_path / "out"), "--ratio", "0.5"])
    assert code == 2 and "Traceback" not in out


@pytest.mark.hf
def test_hugging_face_directory_without_weights_exits_2(tmp_path: Path) -> None:
    """A config.json with no weights beside it is the user's directory, not a bug: one line, exit 2."""
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "bert"}')
    texts = tmp_path / "train.csv"
    texts.write_text("text,label\ngood film,pos\nbad film,neg\n")
    res = CliRunner().invoke(main, ["classify", str(src), "--train", str(texts), "-o", str(tmp_path / "out")])
    err = res.stderr if hasattr(res, "stderr") else res.output
    assert res.exit_code == 2, res.output
    assert err.count("\n") == 1 and str(src) in err and "expected a Hugging Face model directory" in err
    assert not (tmp_path / "out").exists()
