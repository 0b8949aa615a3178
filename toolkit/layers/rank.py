"""Choosing the rank of a factorization W ≈ U·V.

A dense map W (out x in) costs out·in parameters and multiply-adds per position; a rank-r
factorization costs r·(out + in). Ranks are chosen by one of three rules:

- ``rank``:   r given directly;
- ``ratio``:  r such that r·(out + in) is at most ``ratio`` · out·in (a share of the dense parameters);
- ``energy``: the smallest r whose singular values keep ``energy`` of sum(σ²) (needs the dense weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from toolkit.errors import InputError

if TYPE_CHECKING:
    import torch  # only rank_for_energy needs it: imported there, so spec checks stay torch-free


@dataclass(frozen=True)
class RankChoice:
    """The outcome of a rank rule.

    Attributes:
        rank: the chosen rank (>= 1); meaningful only when ``factorize`` is True.
        factorize: False when a rank-r factorization would not reduce multiply-adds (dense is kept).
        reason: why dense was kept, for the warning shown to the user ("" when factorized).
    """

    rank: int
    factorize: bool
    reason: str = ""


def max_useful_rank(out_features: int, in_features: int) -> int:
    """Largest rank whose factorization still costs fewer multiply-adds than the dense map."""
    return max(0, math.ceil(out_features * in_features / (out_features + in_features)) - 1)


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Rank whose factor parameters r·(out+in) are at most ``ratio`` of the dense out·in (at least 1)."""
    if not 0.0 < ratio <= 1.0:
        raise InputError(f"expected ratio in (0, 1], got {ratio}")
    return max(1, math.floor(ratio * out_features * in_features / (out_features + in_features)))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep at least ``energy`` of the total σ² energy."""
    import torch

    if not 0.0 < energy <= 1.0:
        raise InputError(f"expected energy in (0, 1], got {energy}")
    s2 = singular_values.double().pow(2)
    total = float(s2.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(s2, 0) / total
    # first index where the kept share reaches the target (tolerate float round-off at energy=1)
    hits = torch.nonzero(kept >= energy - 1e-12)
    return int(hits[0].item()) + 1 if len(hits) else len(s2)


def choose_rank(
    out_features: int,
    in_features: int,
    *,
    rank: int | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    singular_values: torch.Tensor | None = None,
) -> RankChoice:
    """Apply exactly one rank rule and decide whether factorizing pays off.

    Args:
        out_features, in_features: shape of the dense map (for conv: out_ch, in_ch·k·k).
        rank, ratio, energy: exactly one of them.
        singular_values: required with ``energy``.

    Returns:
        A RankChoice; ``factorize`` is False when r·(out+in) >= out·in.

    Raises:
        ValueError: when not exactly one rule is given, a value is out of range, or the rank exceeds
            min(out, in).
    """
    given = [name for name, v in (("rank", rank), ("ratio", ratio), ("energy", energy)) if v is not None]
    if len(given) != 1:
        raise InputError(f"expected exactly one of rank, ratio, energy; got {given or 'none'}")
    full = min(out_features, in_features)
    if rank is not None:
        if rank < 1 or rank > full:
            raise InputError(f"expected rank in [1, min(out, in) = {full}], got {rank}")
        r = rank
    elif ratio is not None:
        r = min(full, rank_for_ratio(out_features, in_features, ratio))
    else:
        if singular_values is None:
            raise ValueError("energy needs the singular values of the dense weights")
        assert energy is not None
        r = rank_for_energy(singular_values, energy)
    if r * (out_features + in_features) >= out_features * in_features:
        return RankChoice(
            r,
            False,
            f"rank {r} costs {r * (out_features + in_features)} multiply-adds >= dense "
            f"{out_features * in_features}; kept dense",
        )
    return RankChoice(r, True)
