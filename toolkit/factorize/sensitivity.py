"""Rank allocation by measured end-to-end sensitivity (ASVD's sensitivity-based rank search).

The output-error budget (toolkit.factorize.budget) assumes every layer's error matters alike. For
deep models it does not: a 10% error in one attention projection can cost more than 30% in an FFN
layer. Here each layer is factorized *alone* at a few parameter fractions, the whole model is
evaluated by a user metric (lower is better, e.g. 1 − cosine to the dense model's embeddings on
calibration sentences, or the validation loss), and the layer is put back. Then one option per layer
(a fraction, or staying dense) is chosen to minimise the summed metric increase within a parameter
budget: a multiple-choice knapsack, solved through its Lagrangian relaxation (each layer minimises
Δmetric + μ·parameters; μ found by bisection), which gives the best allocation on the lower convex
hull of every layer's trade-off curve.

Cost: one evaluation per layer and fraction (36 layers × 4 fractions for MiniLM).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from toolkit.errors import InputError
from toolkit.factorize.core import dense_layers, replace_module
from toolkit.factorize.stats import as_batches, call_model, capture_inputs, channel_mean_abs
from toolkit.factorize.svd import build_factorized, column_scale, layer_matrix, svd_factors
from toolkit.layers import max_useful_rank

DEFAULT_FRACTIONS = (0.25, 0.375, 0.5, 0.75)


@dataclass
class LayerSensitivity:
    """Measured metric increase of one layer factorized alone, per rank."""

    name: str
    shape: tuple[int, int]  # (out, n)
    dense_params: int
    increase: dict[int, float] = field(default_factory=dict)  # rank -> metric − baseline


@dataclass
class SensitivityReport:
    """Baseline metric, per-layer measurements, and the chosen ranks (0 = the layer stays dense)."""

    baseline: float
    layers: list[LayerSensitivity]
    ranks: dict[str, int] = field(default_factory=dict)
    predicted_increase: float = 0.0
    factor_params: int = 0


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    *,
    include: str | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    calibration: Iterable[Any] | None = None,
    alpha: float = 0.5,
    max_rows: int = 4096,
) -> SensitivityReport:
    """Factorize each selected layer alone at each parameter fraction and evaluate the model.

    Args:
        model: the dense model (left as it was: every layer is put back).
        evaluate: model -> metric, lower is better (called 1 + layers × fractions times).
        include: regular expression selecting layers (as in factorize_module).
        fractions: factor parameters r·(out + n) as fractions of the dense out·n.
        calibration: batches for ASVD scaling (plain SVD without them).
        alpha: ASVD exponent.
        max_rows: calibration rows captured per layer.

    Raises:
        ValueError: no layer selected or a fraction outside (0, 1).
    """
    if not fractions or any(not 0.0 < f < 1.0 for f in fractions):
        raise InputError(f"fractions: expected values in (0, 1), got {list(fractions)}")
    layers = dense_layers(model, include)
    if not layers:
        raise InputError(f"include: expected a pattern selecting layers, got {include!r} (none match)")
    batches = as_batches(calibration)
    was_training = model.training
    model.eval()
    baseline = float(evaluate(model))
    report = SensitivityReport(baseline=baseline, layers=[])
    try:
        for name, layer in layers.items():
            m = layer_matrix(layer)
            out_f, n = m.shape
            scale = None
            if batches:
                inputs = capture_inputs(model, layer, batches, max_rows)
                scale = column_scale(layer, channel_mean_abs(layer, inputs), alpha)
                del inputs
            entry = LayerSensitivity(name, (out_f, n), out_f * n)
            for frac in sorted(set(fractions)):
                r = max(1, min(max_useful_rank(out_f, n), round(frac * out_f * n / (out_f + n))))
                if r in entry.increase:
                    continue
                u, v = svd_factors(m, r, scale)
                replace_module(model, name, build_factorized(layer, u, v))  # type: ignore[arg-type]
                try:
                    entry.increase[r] = float(evaluate(model)) - baseline
                finally:
                    replace_module(model, name, layer)
            report.layers.append(entry)
    finally:
        model.train(was_training)
    return report


def allocate_by_sensitivity(report: SensitivityReport, budget: int) -> SensitivityReport:
    """Choose a rank (or dense, rank 0) per layer with Σ parameters ≤ ``budget``, minimising the
    summed measured increase (Lagrangian relaxation of the multiple-choice knapsack).

    Args:
        report: from measure_sensitivity.
        budget: the largest total of weight parameters over the measured layers (dense layers count
            out·n, factorized ones r·(out + n)).

    Returns:
        The report with ``ranks``, ``predicted_increase`` and ``factor_params`` filled in.

    Raises:
        ValueError: the budget is below the smallest measured option of every layer.
    """

    def options(entry: LayerSensitivity) -> list[tuple[int, int, float]]:
        out_f, n = entry.shape
        opts = [(0, entry.dense_params, 0.0)]
        opts += [(r, r * (out_f + n), max(0.0, inc)) for r, inc in entry.increase.items()]
        return opts

    table = {e.name: options(e) for e in report.layers}
    smallest = sum(min(p for _, p, _ in opts) for opts in table.values())
    if smallest > budget:
        raise InputError(
            f"budget: expected at least {smallest} parameters (smallest rank everywhere), got {budget}"
        )

    def choose(mu: float) -> dict[str, tuple[int, int, float]]:
        return {name: min(opts, key=lambda o: (o[2] + mu * o[1], o[1])) for name, opts in table.items()}

    def total(choice: Mapping[str, tuple[int, int, float]]) -> int:
        return sum(o[1] for o in choice.values())

    lo, hi = 0.0, 1.0
    while total(choose(hi)) > budget:  # μ large enough to meet the budget
        hi *= 2.0
        if hi > 1e30:
            break
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if total(choose(mid)) > budget:
            lo = mid
        else:
            hi = mid
    choice = choose(hi)
    # spend what the relaxation leaves: upgrade layers by best increase saved per parameter
    spent = total(choice)
    improved = True
    while improved:
        improved = False
        best: tuple[float, str, tuple[int, int, float]] | None = None
        for name, opts in table.items():
            cur = choice[name]
            for o in opts:
                extra = o[1] - cur[1]
                if extra > 0 and spent + extra <= budget and o[2] < cur[2]:
                    gain = (cur[2] - o[2]) / extra
                    if best is None or gain > best[0]:
                        best = (gain, name, o)
        if best is not None:
            _, name, o = best
            spent += o[1] - choice[name][1]
            choice[name] = o
            improved = True
    report.ranks = {name: o[0] for name, o in choice.items()}
    report.predicted_increase = sum(o[2] for o in choice.values())
    report.factor_params = spent
    return report


def sensitivity_ranks(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    budget: float,
    *,
    include: str | None = None,
    calibration: Iterable[Any] | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    alpha: float = 0.5,
) -> SensitivityReport:
    """measure_sensitivity, then allocate_by_sensitivity with ``budget`` as a share (<= 1) of the
    selected layers' dense weights or a parameter count; ``report.ranks`` goes to
    ``factorize_module(rank=...)``."""
    if isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0:
        raise InputError(f"budget: expected a share in (0, 1] or a parameter count > 1, got {budget!r}")
    report = measure_sensitivity(
        model, evaluate, include=include, fractions=fractions, calibration=calibration, alpha=alpha
    )
    dense = sum(e.dense_params for e in report.layers)
    return allocate_by_sensitivity(report, int(budget * dense) if budget <= 1 else int(budget))


@torch.no_grad()
def output_distortion(reference: nn.Module, batches: Sequence[Any]) -> Callable[[nn.Module], float]:
    """A metric for measure_sensitivity: ‖f(x) − f_ref(x)‖² / ‖f_ref(x)‖² summed over the batches
    (first output of each call), with ``reference``'s outputs computed once, now."""

    def first(out: Any) -> torch.Tensor:
        while isinstance(out, tuple | list):
            out = out[0]
        return out if isinstance(out, torch.Tensor) else out[0]

    targets = [first(call_model(reference, b)).double() for b in batches]
    den = sum(float(t.pow(2).sum()) for t in targets) or 1.0

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        num = sum(
            float((first(call_model(model, b)).double() - t).pow(2).sum()) for b, t in zip(batches, targets)
        )
        return num / den

    return evaluate


__all__ = [
    "DEFAULT_FRACTIONS",
    "LayerSensitivity",
    "SensitivityReport",
    "allocate_by_sensitivity",
    "measure_sensitivity",
    "output_distortion",
    "sensitivity_ranks",
]
