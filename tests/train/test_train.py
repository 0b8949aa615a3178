"""The training loop in process: run directory, exact resume, NaN batches, --stage, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from toolkit.checkpoint import list_checkpoints, load_checkpoint, load_model
from toolkit.cli import main
from toolkit.data import load_data
from toolkit.spec import load_spec
from toolkit.train import pick_device, train

HF = {"name": "hessian_free", "cg_max_iters": 8, "regularizer": {"l2": 1e-4, "group_lasso": 1e-4}}


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1]).weights


def test_run_directory_holds_everything(tmp_path: Path, write_spec: Any) -> None:
    res = train(write_spec(), tmp_path / "run")
    run = tmp_path / "run"
    names = {p.name for p in run.iterdir()}
    assert {
        "run.json",
        "spec.yaml",
        "metrics.jsonl",
        "metrics.csv",
        "loss.png",
        "ranks.png",
        "summary.json",
        "checkpoints",
    } <= names
    resolved = yaml.safe_load((run / "spec.yaml").read_text())
    assert resolved["train"]["optimizer"]["damping"] == 1.0 and resolved["train"]["keep_checkpoints"] == 2
    load_spec(run / "spec.yaml")  # the resolved spec is itself a valid spec
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert "rank/fc1" in records[0] and "eff_rank/fc1" in records[-1] and "val_loss" in records[-1]
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("step,epoch,loss")
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000008", "step-00000012"]
    assert len(list_checkpoints(run / "checkpoints", "best")) == 1
    # the best checkpoint rebuilds a model that scores what the summary says
    model, spec, meta = load_model(run)
    assert meta["step"] == res.best_step and spec.name == "tiny"
    splits = load_data(spec.train.data, spec.inputs)
    with torch.no_grad():
        pred = model(torch.from_numpy(splits.test.inputs["x"])).argmax(1).numpy()
    assert res.best_test["accuracy"] == pytest.approx(float((pred == splits.test.targets).mean()), abs=1e-12)
    assert json.loads((run / "summary.json").read_text())["params"] == res.params < res.dense_params


PRUNING_HF = {**HF, "regularizer": {"l2": 1e-4, "group_lasso": 0.1, "prune_threshold": 0.5}}


@pytest.mark.parametrize(
    ("optimizer", "cut"),
    [(HF, 5), (PRUNING_HF, 3), ({"name": "adam", "lr": 0.01}, 5), ({"name": "lbfgs"}, 5)],
    ids=["hf", "hf-pruning", "adam", "lbfgs"],
)
def test_resume_gives_the_same_parameters(
    tmp_path: Path, write_spec: Any, optimizer: dict[str, Any], cut: int
) -> None:
    spec = write_spec({"optimizer": optimizer, "max_steps": 9, "checkpoint_every": 3})
    full = train(spec, tmp_path / "full")
    train(spec, tmp_path / "cut", max_steps=cut)  # stops early, with a final checkpoint
    res = train(None, tmp_path / "cut", resume=True, max_steps=9)
    assert res.steps == 9 and res.ranks == full.ranks
    if optimizer is PRUNING_HF:  # ranks shrank after the cut: the resumed model was rebuilt and pruned again
        ranks = [
            json.loads(x)["rank/fc1"] for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
        ]
        assert ranks[cut - 1] == 4 and ranks[-1] < 4
    a, b = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "cut")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 10))


@pytest.mark.parametrize("optimizer", [HF, {"name": "sgd", "lr": 0.1}], ids=["hf", "sgd"])
def test_a_nan_batch_neither_crashes_nor_corrupts(
    tmp_path: Path, write_spec: Any, optimizer: dict[str, Any]
) -> None:
    spec = load_spec(write_spec({"optimizer": optimizer, "max_steps": 10, "batch_size": 100}))
    splits = load_data(spec.train.data, spec.inputs)
    splits.train.inputs["x"][3, 5] = np.nan  # one poisoned example: its batch gives a NaN loss
    res = train(spec, tmp_path / "run", splits=splits)
    assert res.status == "completed" and res.steps == 10
    assert 1 <= res.skipped_steps < 10
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["skipped"] for r in records)
    for w in _final_weights(tmp_path / "run").values():
        assert torch.isfinite(w).all()
    losses = [r["loss"] for r in records if not r["skipped"]]
    assert np.isfinite(res.test["loss"]) and losses[-1] < losses[0]  # still learned from the other batches


def test_stage_k_trains_only_that_stage(tmp_path: Path, write_spec: Any) -> None:
    spec = write_spec({"max_steps": 3})
    train(spec, tmp_path / "a", max_steps=0 or None, stage=1)
    from toolkit.builder import build_model

    init = build_model(load_spec(spec), seed=0).state_dict()
    after = _final_weights(tmp_path / "a")
    changed = {k for k in init if not torch.equal(init[k], after[k])}
    assert changed and all(k.startswith("stages.1.") for k in changed)
    with pytest.raises(ValueError, match=r"--stage: expected a stage index in \[0, 2\), got 5"):
        train(spec, tmp_path / "b", stage=5)


def test_cli_user_errors_are_one_line(tmp_path: Path, write_spec: Any) -> None:
    runner = CliRunner()
    r = runner.invoke(main, ["train", str(tmp_path / "nope.yaml"), "--run-dir", str(tmp_path / "r")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    spec = write_spec({"max_steps": 2})
    r = runner.invoke(main, ["train", str(spec), "--run-dir", str(tmp_path / "r"), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["status"] == "completed"
    r = runner.invoke(main, ["train", str(spec), "--run-dir", str(tmp_path / "r"), "--quiet"])
    assert r.exit_code == 2 and "already exists: pass --overwrite" in r.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    r = runner.invoke(
        main, ["train", str(spec), "--run-dir", str(tmp_path / "other"), "--overwrite", "--quiet"]
    )
    assert (
        r.exit_code == 2 and "refusing to delete" in r.output and (tmp_path / "other" / "keep.txt").exists()
    )
    bad = write_spec({"data": {"builtin": "digits"}, "loss": "cross_entropy"}, name="bad.yaml")
    text = bad.read_text().replace("out: 10", "out: 5")
    bad.write_text(text)
    r = runner.invoke(main, ["train", str(bad), "--run-dir", str(tmp_path / "r5"), "--quiet"])
    assert r.exit_code == 2 and "expected labels in [0, 5)" in r.output


def test_device_choice() -> None:
    assert pick_device("cpu").type == "cpu"
    assert pick_device(None, "auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trains_on_cuda(tmp_path: Path, write_spec: Any) -> None:
    res = train(write_spec({"optimizer": HF, "max_steps": 4}), tmp_path / "run", device="cuda")
    assert res.steps == 4 and json.loads((tmp_path / "run" / "run.json").read_text())["device"].startswith(
        "cuda"
    )


def test_layerwise_fits_each_stage_to_a_dense_teacher(tmp_path: Path, write_spec: Any) -> None:
    from toolkit.train.layerwise import train_layerwise

    spec = write_spec({"max_steps": 30, "optimizer": {"name": "adam", "lr": 0.01}})
    teacher = train(spec, tmp_path / "teacher", dense=True)
    assert teacher.params == teacher.dense_params
    res = train_layerwise(spec, tmp_path / "student", teacher=tmp_path / "teacher", max_steps=10)
    assert (
        res.params < res.dense_params and (tmp_path / "student" / "stages" / "0" / "metrics.jsonl").exists()
    )
    assert not (tmp_path / "student" / "stages" / "1").exists()  # the dense head is copied, not fitted
    # the fitted stage reproduces the teacher's stage better than its truncated-SVD start
    from toolkit.builder import build_model
    from toolkit.train.layerwise import _init_from_teacher

    model, _, _ = load_model(tmp_path / "student")
    t_model, _, _ = load_model(tmp_path / "teacher")
    svd = build_model(load_spec(spec), seed=0)
    _init_from_teacher(svd.stages[0], t_model.stages[0])
    x = torch.from_numpy(load_data(load_spec(spec).train.data, {"x": {"shape": [64]}}).test.inputs["x"])
    with torch.no_grad():
        want = t_model.stages[0](x)[0]
        fitted = (model.stages[0](x)[0] - want).pow(2).mean().item()
        start = (svd.stages[0](x)[0] - want).pow(2).mean().item()
    assert fitted < 0.9 * start
    torch.testing.assert_close(model.stages[1].head.weight, t_model.stages[1].head.weight, rtol=0, atol=0)


def test_resume_from_a_corrupted_checkpoint_is_a_clear_error(tmp_path: Path, write_spec: Any) -> None:
    spec = write_spec({"max_steps": 12, "checkpoint_every": 2})
    train(spec, tmp_path / "run", max_steps=6)
    last, prev = list_checkpoints(tmp_path / "run" / "checkpoints")[::-1]
    data = (last / "model.safetensors").read_bytes()
    (last / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(
        ValueError, match=r"corrupted or truncated.*previous checkpoint .*step-00000004 is intact"
    ):
        train(None, tmp_path / "run", resume=True)
    assert load_checkpoint(prev).state["step"] == 4
    import shutil

    shutil.rmtree(last)  # as the message says: delete the corrupted one, resume from the previous
    assert train(None, tmp_path / "run", resume=True, max_steps=12).steps == 12


def test_curves_autoencoder_trains_on_its_own_images(tmp_path: Path) -> None:
    from toolkit.spec import parse_spec

    spec = parse_spec(
        {
            "name": "curves-ae",
            "inputs": {"x": {"shape": [784]}},
            "nodes": [
                {"id": "enc", "op": "linear", "in": "x", "out": 32, "factorize": {"rank": 8}},
                {"id": "act", "op": "relu", "in": "enc"},
                {"id": "dec", "op": "linear", "in": "act", "out": 784, "factorize": {"rank": 8}},
            ],
            "outputs": ["dec"],
            "stages": [["enc", "act"], ["dec"]],
            "train": {
                "data": {"builtin": "curves", "limit": 300},
                "loss": "sum_squared",
                "batch_size": 50,
                "max_steps": 12,
                "optimizer": HF,
            },
        }
    )
    res = train(spec, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < 0.8 * records[0]["loss"] and "accuracy" not in res.test
    assert set(res.ranks) == {"enc", "dec"}
