"""Factorized layers (W ≈ U·V) and the rank rules that size them.

The names are loaded on first use (PEP 562): the rank rules (``toolkit.layers.rank``) are plain
Python, and checking a spec uses them without importing torch; the layers themselves need torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from toolkit.layers.factorized import (
        FACTORIZED_TYPES,
        FactorizedConv2d,
        FactorizedEmbedding,
        FactorizedLinear,
        FactorizedMixin,
        balanced_svd_factors,
        check_conv2d,
        factorized_modules,
    )
    from toolkit.layers.rank import RankChoice, choose_rank, max_useful_rank, rank_for_energy, rank_for_ratio

_WHERE = {
    **dict.fromkeys(
        (
            "FACTORIZED_TYPES",
            "FactorizedConv2d",
            "FactorizedEmbedding",
            "FactorizedLinear",
            "FactorizedMixin",
            "balanced_svd_factors",
            "check_conv2d",
            "factorized_modules",
        ),
        "toolkit.layers.factorized",
    ),
    **dict.fromkeys(
        ("RankChoice", "choose_rank", "max_useful_rank", "rank_for_energy", "rank_for_ratio"),
        "toolkit.layers.rank",
    ),
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'toolkit.layers' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "FACTORIZED_TYPES",
    "FactorizedConv2d",
    "FactorizedEmbedding",
    "FactorizedLinear",
    "FactorizedMixin",
    "RankChoice",
    "balanced_svd_factors",
    "check_conv2d",
    "choose_rank",
    "factorized_modules",
    "max_useful_rank",
    "rank_for_energy",
    "rank_for_ratio",
]
