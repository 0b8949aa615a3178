"""`--layerwise` holds one stage at a time: one teacher stage read from the checkpoint, one student
stage materialized, only the activations later stages read; the result is what the resident
computation gives."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import toolkit.checkpoint
import toolkit.train.layerwise as lw
from toolkit.builder import Stage, build_model
from toolkit.checkpoint import save_checkpoint
from toolkit.spec import parse_spec


def _spec() -> Any:
    """Three stages; the last adds act1 (a skip across two cuts) to act2."""
    return parse_spec(
        {
            "name": "three",
            "inputs": {"x": {"shape": [64]}},
            "nodes": [
                {"id": "fc1", "op": "linear", "in": "x", "out": 32, "factorize": {"rank": 4}},
                {"id": "act1", "op": "tanh", "in": "fc1"},
                {"id": "fc2", "op": "linear", "in": "act1", "out": 32, "factorize": {"rank": 4}},
                {"id": "act2", "op": "tanh", "in": "fc2"},
                {"id": "res", "op": "add", "in": ["act1", "act2"]},
                {"id": "head", "op": "linear", "in": "res", "out": 10, "factorize": "none"},
            ],
            "outputs": ["head"],
            "stages": [["fc1", "act1"], ["fc2", "act2"], ["res", "head"]],
            "train": {
                "data": {"builtin": "digits", "limit": 300},
                "loss": "cross_entropy",
                "batch_size": 64,
                "max_steps": 3,
                "optimizer": {"name": "adam", "lr": 0.01},
            },
        },
        source="<test>",
    )


def _teacher(tmp_path: Path) -> Path:
    spec = _spec()
    model = build_model(spec, seed=3, dense=True)
    save_checkpoint(
        tmp_path / "teacher" / "checkpoints",
        "best-00000001",
        model,
        model.to_spec().resolved(),
        {"dense": True},
    )
    return tmp_path / "teacher"


def _live_stages(exclude: frozenset[int] = frozenset()) -> int:
    """Stage modules alive now that hold real (non-meta) parameters, other than ``exclude`` (ids of
    stages that other tests' fixtures keep alive)."""
    gc.collect()
    return sum(
        1
        for obj in gc.get_objects()
        if type(obj) is Stage
        and id(obj) not in exclude
        and any(p.device.type != "meta" for p in obj.parameters())
    )


def _stage_ids() -> frozenset[int]:
    gc.collect()
    return frozenset(id(obj) for obj in gc.get_objects() if type(obj) is Stage)


def test_one_stage_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = _teacher(tmp_path)
    before = _stage_ids()
    seen: list[tuple[list[str], int]] = []
    real_run = lw._run_stage

    def spy(stage: Any, inputs: list[np.ndarray], *args: Any, **kwargs: Any) -> Any:
        first = len(seen) % 3 == 0  # the train split: count once per stage (a gc scan is slow)
        seen.append((list(stage.input_names), _live_stages(before) if first else 0))
        return real_run(stage, inputs, *args, **kwargs)

    def no_whole_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the whole teacher was loaded")

    reads: list[str] = []
    real_read = lw.StreamedWeights.read

    def read(self: Any, prefix: str) -> Any:
        reads.append(prefix)
        return real_read(self, prefix)

    monkeypatch.setattr(lw, "_run_stage", spy)
    monkeypatch.setattr(toolkit.checkpoint, "load_model", no_whole_model)
    monkeypatch.setattr(lw.StreamedWeights, "read", read)
    res = lw.train_layerwise(_spec(), tmp_path / "student", teacher=teacher)
    assert reads == ["stages.0.", "stages.1.", "stages.2."]  # each teacher stage read once, in order
    # 3 splits per stage; while stage k runs, only teacher stage k and student stage k are live
    assert [s[0] for s in seen[::3]] == [["x"], ["act1"], ["act1", "act2"]]
    assert max(s[1] for s in seen) == 2
    assert res.steps == 6 and not (tmp_path / "student" / lw.SCRATCH).exists()


def test_same_result_as_the_resident_computation(tmp_path: Path) -> None:
    """Stage by stage from the checkpoint gives the student the resident recipe gives: each
    factorized layer from the SVD of the teacher's, the rest copied (here with 0 fitting steps)."""
    from toolkit.checkpoint import load_model

    teacher = _teacher(tmp_path)
    res = lw.train_layerwise(_spec(), tmp_path / "student", teacher=teacher, max_steps=0)
    got, _, _ = load_model(tmp_path / "student")
    t_model, _, _ = load_model(teacher)
    want = build_model(_spec(), seed=0)
    for s, t in zip(want.stages, t_model.stages):
        lw._init_from_teacher(s, t)
    for name, value in want.state_dict().items():
        torch.testing.assert_close(got.state_dict()[name], value, rtol=0, atol=0)
    assert res.dense_params == sum(p.numel() for p in t_model.parameters())


def test_streamed_weights_check_the_hash_and_read_one_prefix(tmp_path: Path) -> None:
    from toolkit.checkpoint_stream import StreamedWeights

    teacher = _teacher(tmp_path)
    ckpt = next((teacher / "checkpoints").iterdir())
    weights = StreamedWeights(teacher)
    model = build_model(_spec(), seed=3, dense=True)
    stage1 = weights.read("stages.1.")
    assert set(stage1) == set(model.stages[1].state_dict())
    for name, value in model.stages[1].state_dict().items():
        torch.testing.assert_close(stage1[name], value, rtol=0, atol=0)
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted or truncated: SHA-256 does not match"):
        StreamedWeights(teacher)
