"""`factorize_module`: replace the dense layers of any nn.Module by factorized ones, in place."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from toolkit.errors import InputError
from toolkit.factorize.budget import BudgetItem, allocate_budget
from toolkit.factorize.refit import RefitOptions, refit_layer, relative_error
from toolkit.factorize.report import FactorizeReport, LayerReport
from toolkit.factorize.stats import all_channel_stats, as_batches, capture_inputs, channel_mean_abs
from toolkit.factorize.svd import (
    build_factorized,
    column_scale,
    layer_matrix,
    scaled_singular_values,
    svd_factors,
)
from toolkit.layers import FactorizedMixin, choose_rank

METHODS = ("svd", "asvd")
_KIND = {nn.Linear: "linear", nn.Conv2d: "conv2d", nn.Embedding: "embedding"}


def dense_layers(model: nn.Module, include: str | None = None) -> dict[str, nn.Module]:
    """Dense Linear/Conv2d/Embedding layers of ``model`` (in module order) whose name matches ``include``.

    Layers inside factorized layers (their U and V) are never selected, and types are matched exactly:
    subclasses such as nn.MultiheadAttention's ``out_proj`` (whose weight the attention reads directly)
    are left alone.

    Raises:
        ValueError: when ``include`` is not a valid regular expression.
    """
    try:
        pattern = re.compile(include) if include is not None else None
    except re.error as exc:
        raise InputError(f"include: expected a regular expression, got {include!r} ({exc})") from exc
    inside = {n for n, m in model.named_modules() if isinstance(m, FactorizedMixin)}
    out: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if type(mod) not in _KIND:
            continue
        if any(name.startswith(p + ".") for p in inside):
            continue
        if pattern is not None and not pattern.search(name):
            continue
        out[name] = mod
    return out


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the qualified ``name`` inside ``model``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _check_rule(rank: Any, ratio: Any, energy: Any, budget: Any) -> dict[str, Any]:
    given = {
        k: v
        for k, v in (("rank", rank), ("ratio", ratio), ("energy", energy), ("budget", budget))
        if v is not None
    }
    if len(given) != 1:
        raise InputError(
            f"expected exactly one of rank, ratio, energy, budget; got {sorted(given) or 'none'}"
        )
    if isinstance(rank, Mapping):
        bad = {k: v for k, v in rank.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0}
        if bad:
            raise InputError(f"rank: expected layer name -> integer >= 0 (0 keeps it dense), got {bad!r}")
    elif rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InputError(f"rank: expected an integer >= 1, got {rank!r}")
    if ratio is not None and not (isinstance(ratio, int | float) and 0.0 < ratio <= 1.0):
        raise InputError(f"ratio: expected a number in (0, 1], got {ratio!r}")
    if energy is not None and not (isinstance(energy, int | float) and 0.0 < energy <= 1.0):
        raise InputError(f"energy: expected a number in (0, 1], got {energy!r}")
    if budget is not None and not (
        isinstance(budget, int | float) and not isinstance(budget, bool) and budget > 0
    ):
        raise InputError(f"budget: expected a share in (0, 1] or a parameter count > 1, got {budget!r}")
    return given


def factorize_module(
    model: nn.Module,
    *,
    rank: int | Mapping[str, int] | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    budget: float | int | None = None,
    include: str | None = None,
    method: str = "svd",
    calibration: Iterable[Any] | None = None,
    alpha: float = 0.5,
    refit: bool = False,
    refit_options: RefitOptions | None = None,
    max_rows: int = 8192,
) -> FactorizeReport:
    """Factorize the dense layers of ``model`` **in place** (copy.deepcopy it first to keep the dense one).

    Layers are processed in module order; each one's calibration inputs are captured from the model as
    it is at that moment (earlier layers already factorized), so the optional refit of a layer also
    corrects the error its predecessors introduced. Only one layer's inputs are held at a time.

    Args:
        model: any nn.Module; its nn.Linear, nn.Conv2d and nn.Embedding layers are candidates.
        rank, ratio, energy: one rank rule per layer (see toolkit.layers.choose_rank; ``rank`` is
            capped at min(out, n); ``energy`` uses the σ of M·S under ASVD). ``rank`` may also map
            layer names to ranks (missing or 0: the layer stays dense), e.g. the ranks chosen by
            toolkit.factorize.sensitivity.allocate_by_sensitivity.
        budget: instead, a global budget of factor weight parameters: a share of the selected layers'
            dense weights when <= 1, else a parameter count; allocated greedily (toolkit.factorize.budget).
        include: regular expression searched in qualified module names; None selects every layer.
        method: "svd" (truncated SVD) or "asvd" (activation-aware, needs ``calibration``).
        calibration: batches passed to ``model`` (tensor, tuple of positional args or dict of kwargs);
            needed for "asvd", for ``refit`` and for the output errors of the report.
        alpha: ASVD exponent on mean |x|.
        refit: refit each factorized layer to its dense layer's outputs (toolkit.factorize.refit).
        refit_options: settings of the refit.
        max_rows: calibration rows captured per layer.

    Returns:
        A FactorizeReport (one LayerReport per selected layer).

    Raises:
        ValueError: bad rule values, unknown method, no layer selected, or ASVD/refit without calibration.
    """
    given = _check_rule(rank, ratio, energy, budget)
    if method not in METHODS:
        raise InputError(f"method: expected one of {list(METHODS)}, got {method!r}")
    batches = as_batches(calibration)
    if batches is None and (method == "asvd" or refit):
        raise InputError(
            f"{'method asvd' if method == 'asvd' else 'refit'} needs calibration batches, got none"
        )
    layers = dense_layers(model, include)
    if not layers:
        raise InputError(
            f"include: expected a pattern selecting Linear/Conv2d/Embedding layers, got {include!r} (none match)"
        )
    report = FactorizeReport(method=method, rule=given)
    was_training = model.training
    model.eval()
    try:
        ranks = _budget_ranks(model, layers, budget, method, batches, alpha) if budget is not None else None
        if isinstance(rank, Mapping):
            ranks, rank = {name: int(rank.get(name, 0)) for name in layers}, None
        for name, layer in layers.items():
            report.layers.append(
                _factorize_one(
                    model,
                    name,
                    layer,
                    rank=rank,
                    ratio=ratio,
                    energy=energy,
                    budget_rank=None if ranks is None else ranks[name],
                    method=method,
                    batches=batches,
                    alpha=alpha,
                    refit=refit,
                    refit_options=refit_options,
                    max_rows=max_rows,
                )
            )
    finally:
        model.train(was_training)
    return report


def _budget_ranks(
    model: nn.Module,
    layers: dict[str, nn.Module],
    budget: float,
    method: str,
    batches: list[Any] | None,
    alpha: float,
) -> dict[str, int]:
    stats = all_channel_stats(model, layers, batches) if method == "asvd" and batches else {}
    items = {}
    for name, layer in layers.items():
        m = layer_matrix(layer)
        scale = column_scale(layer, stats[name], alpha) if name in stats else None
        items[name] = BudgetItem(m.shape[0], m.shape[1], scaled_singular_values(m, scale))
    dense = sum(it.out_features * it.in_features for it in items.values())
    limit = int(budget * dense) if budget <= 1 else int(budget)
    return allocate_budget(items, limit)


def _factorize_one(
    model: nn.Module,
    name: str,
    layer: nn.Module,
    *,
    rank: int | None,
    ratio: float | None,
    energy: float | None,
    budget_rank: int | None,
    method: str,
    batches: list[Any] | None,
    alpha: float,
    refit: bool,
    refit_options: RefitOptions | None,
    max_rows: int,
) -> LayerReport:
    m = layer_matrix(layer)  # (out, n) float64
    out_f, n = m.shape
    kind = _KIND[type(layer)]
    inputs = capture_inputs(model, layer, batches, max_rows) if batches else None
    scale = (
        column_scale(layer, channel_mean_abs(layer, inputs), alpha) if method == "asvd" and inputs else None
    )
    if budget_rank is not None:
        r, keep, note = budget_rank, budget_rank > 0, "" if budget_rank > 0 else "kept dense (rank 0)"
    else:
        sv = scaled_singular_values(m, scale) if energy is not None else None
        choice = choose_rank(
            out_f,
            n,
            rank=None if rank is None else min(rank, min(out_f, n)),
            ratio=ratio,
            energy=energy,
            singular_values=sv,
        )
        r, keep, note = choice.rank, choice.factorize, choice.reason
    rep = LayerReport(
        name=name,
        kind=kind,
        shape=(out_f, n),
        rank=0,
        dense_params=out_f * n,
        factor_params=out_f * n,
        note=note,
    )
    if not keep:
        return rep
    u, v = svd_factors(m, r, scale)
    fact = build_factorized(layer, u, v)
    assert isinstance(fact, nn.Module)
    rep.rank, rep.factor_params = r, r * (out_f + n)
    if inputs:
        rep.error = relative_error(layer, fact, inputs)
        if scale is None:
            rep.error_svd = rep.error
        else:
            plain = build_factorized(layer, *svd_factors(m, r, None))
            assert isinstance(plain, nn.Module)
            rep.error_svd = relative_error(layer, plain, inputs)
        if refit:
            rep.error_refit = refit_layer(fact, layer, inputs, refit_options)
    replace_module(model, name, fact)
    del inputs
    return rep


def count_parameters(model: nn.Module) -> int:
    """All parameters of a model (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


__all__ = ["METHODS", "count_parameters", "dense_layers", "factorize_module", "replace_module"]
