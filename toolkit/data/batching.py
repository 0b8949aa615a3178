"""Batch order, data-parallel shards and curvature sub-batches, all pure functions of (seed, epoch).

The order of epoch e is ``default_rng([seed, e]).permutation(n)``, so the data-order state of a run is
just (epoch, batch index): resuming recomputes it exactly.

Data parallelism: the global batch ``b`` goes to process r as ``b[r::world]`` (interleaved), and the
curvature batch is the first ``c`` positions of the global batch with ``c`` a multiple of ``world``,
i.e. the first ``c / world`` of every local batch; so 1 process and W processes see the same examples
with equal-size shards, and the mean of the local means is the global mean.
"""

from __future__ import annotations

import numpy as np

from toolkit.errors import InputError


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The full batches of one epoch (the remainder is dropped; every epoch reshuffles).

    Args:
        n: training examples.
        batch_size: global batch size (clamped to n).
        seed: run seed.
        epoch: epoch index.

    Returns:
        list of (batch_size,) index arrays.
    """
    b = max(1, min(batch_size, n))
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i : i + b] for i in range(0, n - b + 1, b)]


def shard_batch(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This process's share of a global batch: positions rank, rank + world, ..."""
    if len(batch) % world:
        raise InputError(
            f"expected the batch size to be a multiple of the {world} processes, got {len(batch)}"
        )
    return batch[rank::world]


def curvature_subset(local_size: int, global_size: int, fraction: float, world: int) -> int:
    """How many leading examples of the local batch form the local curvature batch.

    Returns ``c / world`` with ``c = round(global_size * fraction / world) * world`` (at least world).
    """
    per = max(1, round(global_size * fraction / world))
    return min(per, local_size)
