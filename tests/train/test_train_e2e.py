"""End to end, in real subprocesses: SIGKILL + resume, Ctrl-C, torchrun with 2 processes, default.yaml."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from toolkit.checkpoint import list_checkpoints, load_checkpoint
from toolkit.train import train

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
HF = {"name": "hessian_free", "cg_max_iters": 8, "regularizer": {"l2": 1e-4, "group_lasso": 1e-4}}
RLHF = [sys.executable, "-m", "toolkit"]


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1]).weights


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0.0, atol=atol, msg=k)


def _initial(spec: Path) -> dict[str, torch.Tensor]:
    from toolkit.builder import build_model
    from toolkit.spec import load_spec

    return build_model(load_spec(spec), seed=0).double().state_dict()


def _start(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*RLHF, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_checkpoints(proc: subprocess.Popen[bytes], run: Path, count: int, timeout: float = 120) -> None:
    end = time.time() + timeout
    while len(list_checkpoints(run / "checkpoints")) < count or not list_checkpoints(run / "checkpoints")[
        -1
    ].name.endswith(str(2 * count).zfill(8)):
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.time() < end, "no checkpoint in time"
        time.sleep(0.005)


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path: Path, write_spec: Any) -> None:
    spec = write_spec({"optimizer": HF, "max_steps": 24, "checkpoint_every": 2})
    run = tmp_path / "killed"
    proc = _start(["train", str(spec), "--run-dir", str(run), "--quiet"])
    _wait_for_checkpoints(proc, run, 2)  # step-4 just appeared: the process is mid-run
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists()  # it really died before the end
    r = subprocess.run(
        [*RLHF, "train", "--resume", str(run), "--quiet"], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    train(spec, tmp_path / "full")
    _assert_same(_final(run), _final(tmp_path / "full"))
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))


def test_ctrl_c_writes_a_checkpoint_and_exits_cleanly(tmp_path: Path, write_spec: Any) -> None:
    spec = write_spec({"optimizer": HF, "max_steps": 400, "checkpoint_every": 2})
    run = tmp_path / "run"
    proc = _start(["train", str(spec), "--run-dir", str(run), "--quiet"])
    _wait_for_checkpoints(proc, run, 1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert b"Traceback" not in err and b"--resume" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 2 <= summary["steps"] < 400
    last = list_checkpoints(run / "checkpoints")[-1]
    assert load_checkpoint(last).state["step"] == summary["steps"]


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path: Path, write_spec: Any) -> None:
    # the diagonal preconditioner: K-FAC's Monte-Carlo draws depend on how the batch is split
    hf = {**HF, "preconditioner": "diagonal"}
    cfg = {"optimizer": hf, "max_steps": 4, "checkpoint_every": 4, "dtype": "float64", "batch_size": 64}
    spec = write_spec(cfg)
    train(spec, tmp_path / "one")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "toolkit", "train", str(spec), "--run-dir", str(tmp_path / "two"), "--quiet"]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    a, b = _final(tmp_path / "one"), _final(tmp_path / "two")
    assert a["stages.0.fc1.V.weight"].dtype == torch.float64
    _assert_same(a, b, atol=1e-6)
    assert any(not torch.equal(a[k], torch.from_numpy(_initial(spec)[k].numpy())) for k in a)  # it trained


def test_default_spec_reaches_95_percent_with_3x_fewer_parameters(tmp_path: Path) -> None:
    run = tmp_path / "default"
    r = subprocess.run([*RLHF, "train", "graphs/default.yaml", "--run-dir", str(run), "--json", "--export"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["best_test"]["accuracy"] >= 0.95, s
    assert s["dense_params"] >= 3 * s["params"], s
    exp = s["export"]
    assert "error" not in exp, exp
    assert exp["accuracy"] == pytest.approx(s["best_test"]["accuracy"], abs=2 / 359)
    assert exp["max_abs_diff"] < 1e-3 and len(exp["files"]) >= 2
