"""Global parameter budget: spend rank where the (activation-weighted) output error drops most.

For each layer l with (scaled) singular values σ_{l,1} >= σ_{l,2} >= …, keeping rank r leaves the
relative squared output error e_l(r) = Σ_{k>r} σ_{l,k}² / Σ_k σ_{l,k}² (exact for plain SVD with
whitened inputs; with ASVD the σ are those of M·S, so activation statistics weight the columns).
Component k of layer l costs c_l = out_l + n_l parameters and lowers the error by
g_{l,k} = σ_{l,k}² / Σ_k σ_{l,k}². Starting from rank 1 everywhere, the allocator repeatedly takes the
component with the largest gain per parameter g/c that still fits in the budget (a greedy knapsack,
optimal for the fractional relaxation because the gains within a layer decrease). Ranks stop at
``max_useful_rank`` — a larger rank would not be smaller than the dense layer.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from toolkit.errors import InputError
from toolkit.layers import max_useful_rank


@dataclass(frozen=True)
class BudgetItem:
    """One layer to allocate: its map shape and the (scaled) singular values."""

    out_features: int
    in_features: int
    singular_values: torch.Tensor


def allocate_budget(items: Mapping[str, BudgetItem], budget: int) -> dict[str, int]:
    """Ranks per layer whose factor parameters Σ r_l (out_l + n_l) stay within ``budget``.

    Args:
        items: layer name -> BudgetItem.
        budget: the largest total number of factor weight parameters (biases are not counted).

    Returns:
        layer name -> rank (>= 1).

    Raises:
        ValueError: when even rank 1 everywhere exceeds the budget.
    """
    cost = {n: it.out_features + it.in_features for n, it in items.items()}
    spent = sum(cost.values())
    if spent > budget:
        raise InputError(
            f"budget: expected at least {spent} parameters (rank 1 in every layer), got {budget}"
        )
    gains: dict[str, list[float]] = {}
    limit: dict[str, int] = {}
    for n, it in items.items():
        s2 = it.singular_values.double().pow(2)
        total = float(s2.sum()) or 1.0
        gains[n] = (s2 / total).tolist()
        limit[n] = max(1, min(max_useful_rank(it.out_features, it.in_features), len(gains[n])))
    ranks = dict.fromkeys(items, 1)
    heap = [(-gains[n][1] / cost[n], n) for n in items if limit[n] > 1]
    heapq.heapify(heap)
    while heap:
        _, n = heapq.heappop(heap)
        if spent + cost[n] > budget:
            continue  # this layer's next component does not fit; cheaper layers may still
        spent += cost[n]
        ranks[n] += 1
        if ranks[n] < limit[n]:
            heapq.heappush(heap, (-gains[n][ranks[n]] / cost[n], n))
    return ranks
