"""Checkpoints: exact round trip, atomic layout, corruption detected with the previous one intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from toolkit.checkpoint import (
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def test_round_trip_is_exact(tmp_path: Path) -> None:
    m = _model(0)
    state = {"step": 7, "optimizer": {"m": torch.arange(3.0)}, "rng": {"torch": torch.get_rng_state()}}
    d = save_checkpoint(tmp_path, "step-00000007", m, {"name": "s"}, {"step": 7}, state)
    ck = load_checkpoint(d)
    assert ck.spec == {"name": "s"} and ck.meta == {"step": 7} and ck.state["step"] == 7
    for k, v in m.state_dict().items():
        assert torch.equal(ck.weights[k], v)
    torch.testing.assert_close(ck.state["optimizer"]["m"], torch.arange(3.0), rtol=0, atol=0)
    assert sorted(p.name for p in d.iterdir()) == ["checkpoint.json", "model.safetensors", "state.pt"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_corrupted_or_truncated_checkpoint_is_a_clear_error_and_the_previous_stays(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        save_checkpoint(
            tmp_path, f"step-{step:08d}", _model(step), {"name": "s"}, {"step": step}, {"step": step}
        )
    prune_checkpoints(tmp_path, "step", keep=2)
    kept = list_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["step-00000002", "step-00000003"]
    weights = kept[-1] / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=r"step-00000003/model.safetensors is corrupted or truncated"):
        load_checkpoint(kept[-1])
    with pytest.raises(ValueError, match="corrupted or truncated: cannot read safetensors"):
        load_checkpoint(weights)  # the bare file, without the index
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    weights.write_bytes(bytes(flipped))  # same length, one byte changed
    with pytest.raises(ValueError, match="SHA-256 does not match"):
        load_checkpoint(kept[-1])
    (kept[-1] / "state.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupted"):
        load_checkpoint(kept[-1])
    prev = load_checkpoint(kept[0])
    assert prev.state["step"] == 2 and torch.equal(prev.weights["0.weight"], _model(2)[0].weight)


def test_state_file_is_loaded_without_executing_code(tmp_path: Path) -> None:
    d = save_checkpoint(tmp_path, "step-00000001", _model(0), {}, {}, {"step": 1})

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    import hashlib
    import io

    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    (d / "state.pt").write_bytes(buf.getvalue())
    idx = json.loads((d / "checkpoint.json").read_text())
    idx["files"]["state.pt"] = hashlib.sha256(buf.getvalue()).hexdigest()  # even with a matching hash
    (d / "checkpoint.json").write_text(json.dumps(idx))
    with pytest.raises(ValueError, match="cannot load training state"):
        load_checkpoint(d)


def test_find_checkpoint_prefers_best(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    save_checkpoint(root, "step-00000004", _model(0), {}, {})
    assert find_checkpoint(tmp_path).name == "step-00000004"
    save_checkpoint(root, "best-00000002", _model(0), {}, {})
    assert find_checkpoint(tmp_path).name == "best-00000002"
    with pytest.raises(FileNotFoundError, match="expected checkpoints"):
        find_checkpoint(tmp_path / "nothing")


def _default_checkpoint(tmp_path: Path, edit: object = None) -> Path:
    """graphs/default.yaml's model saved as a checkpoint; ``edit(spec_dict)`` changes the embedded spec."""
    from toolkit.builder import build_model
    from toolkit.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[2] / "graphs" / "default.yaml")
    model = build_model(spec, seed=0)
    doc = model.to_spec().resolved()
    if callable(edit):
        edit(doc)
    return save_checkpoint(tmp_path, "best-00000001", model, doc)


def test_embedded_spec_is_checked_against_the_weights_before_anything_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small file whose spec names a far larger model: refused from shapes alone, no real build."""
    import toolkit.builder
    from toolkit.checkpoint import load_model
    from toolkit.errors import InputError

    def widen(doc: dict) -> None:
        node = next(n for n in doc["nodes"] if n["id"] == "fc1")
        node["out"] = 40_000  # 64 x 40,000 dense: 2.6M parameters the file does not hold

    ckpt = _default_checkpoint(tmp_path, widen)
    real_build = toolkit.builder.build_model
    real_builds: list[str] = []

    def spy(*args: object, **kwargs: object) -> object:
        if torch.empty(0).device.type != "meta":
            real_builds.append("allocated")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(toolkit.builder, "build_model", spy)
    with pytest.raises(
        InputError,
        match=r"weights do not fit the embedded spec: stages\.0\.fc1\..*expected .*40000.* from the embedded spec, got",
    ):
        load_model(ckpt)
    assert real_builds == []


def test_parameter_ceiling_on_the_embedded_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from toolkit.checkpoint import load_model
    from toolkit.errors import InputError

    ckpt = _default_checkpoint(tmp_path)
    model, _, _ = load_model(ckpt)  # fits under the default ceiling
    n = sum(p.numel() for p in model.parameters())
    monkeypatch.setenv("RLHF_MAX_MODEL_PARAMS", str(n - 1))
    with pytest.raises(InputError, match=f"{n:,} parameters, over the limit max_model_params = {n - 1:,}"):
        load_model(ckpt)
    monkeypatch.setenv("RLHF_MAX_MODEL_PARAMS", str(n))
    assert sum(p.numel() for p in load_model(ckpt)[0].parameters()) == n
