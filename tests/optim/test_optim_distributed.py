"""Two gloo processes on halves of a batch follow the path of one process on the whole batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from toolkit.optim import HessianFree

STEPS = 3
# the diagonal preconditioner: K-FAC's Monte-Carlo draws depend on how the batch is split
SETTINGS = {
    "curvature_fraction": 1.0,
    "l2": 1e-3,
    "cg_max_iters": 30,
    "preconditioner": "diagonal",
    "adaptive_cg": False,
    "adaptive_curvature": False,
}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    return x, torch.sin(x[:, :2]) + 0.1 * x[:, 2:]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()


def _run(x: torch.Tensor, t: torch.Tensor) -> tuple[list[torch.Tensor], list[float]]:
    net = _net()
    opt = HessianFree(net, F.mse_loss, **SETTINGS)
    losses = [opt.step((x,), t).loss for _ in range(STEPS)]
    return [p.detach().clone() for p in net.parameters()], losses


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, t = _data()
        half = x.shape[0] // world
        params, losses = _run(x[rank * half : (rank + 1) * half], t[rank * half : (rank + 1) * half])
        torch.save({"params": params, "losses": losses}, Path(out) / f"rank{rank}.pt")
        # Both ranks finish their collectives before either tears gloo down: a rank that destroys
        # the group while the other is still in its last all-reduce aborts it ("terminate called
        # without an active exception", SIGABRT), seen once in a full run on a loaded 2-core box.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_gloo_processes_equal_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ref_params, ref_losses = _run(*_data())
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["losses"] == pytest.approx(ref_losses, rel=1e-10, abs=1e-12)
        for a, b in zip(got["params"], ref_params):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
