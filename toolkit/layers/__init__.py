"""Factorized layers (W ≈ U·V) and the rank rules that size them."""

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
