"""Every test runs on one torch thread, as training does by default (``train.threads: 1``): the
models here are small, and multi-threaded kernels (SVDs above all) are far slower than one thread
on a busy 2-core machine. The thread count is restored after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
