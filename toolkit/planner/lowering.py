"""Lower a trained model's factorization ranks to the ranks a plan chose, keeping the best approximation.

A factorized layer holds W = U·V at rank r. Lowering it to rank k < r keeps the best rank-k
approximation of the product (Eckart–Young: the top k singular triplets of U·V), not the first k
columns of U and rows of V, which are in no particular order after training. The product is never
formed: with U = Q_u R_u and Vᵀ = Q_v R_v (thin QR), U·V = Q_u (R_u R_vᵀ) Q_vᵀ, so the SVD of the
small r x r core gives the singular triplets of U·V. The result is split evenly like
``balanced_svd_factors``: U' = P_k Σ_k^½, V' = Σ_k^½ Q_kᵀ.

```python
from toolkit.planner.lowering import lower_model
lowered, records = lower_model(model, {"fc1": 12}, stages=[["fc1", "act1"], ["fc2", "act2", "head"]])
```

Uses torch and the builder (not imported by ``toolkit.planner``'s ``__init__``, which stays pure).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from toolkit.errors import InputError
from toolkit.layers.factorized import (
    FactorizedConv2d,
    FactorizedEmbedding,
    FactorizedLinear,
    FactorizedMixin,
)


@dataclass(frozen=True)
class LoweredLayer:
    """One layer's lowering: ranks before and after and the share of ‖U·V‖_F the truncation drops.

    ``relative_error`` = ‖U·V - U'·V'‖_F / ‖U·V‖_F = sqrt(Σ_{i>k} σ_i²) / sqrt(Σ_i σ_i²).
    """

    node: str
    rank_before: int
    rank_after: int
    relative_error: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def truncate_factors(
    u: torch.Tensor, v: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of the product U (out, r) · V (r, n), in float64.

    Args:
        u: (out, r) left factor.
        v: (r, n) right factor.
        rank: the new rank, 1 <= rank <= r.

    Returns:
        (U', V', s): U' (out, rank) and V' (rank, n) with U'·V' the best rank-``rank``
        approximation of U·V in the Frobenius and spectral norms, split evenly (both carry
        Σ^½), and s the singular values of U·V (all min(out, r, n) of them, descending).

    Raises:
        InputError: factors that do not chain, or a rank outside [1, r].
    """
    if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0]:
        raise InputError(f"expected factors (out, r) and (r, n), got {tuple(u.shape)} and {tuple(v.shape)}")
    r = int(u.shape[1])
    if not 1 <= rank <= r:
        raise InputError(f"expected a rank in [1, {r}], got {rank}")
    qu, ru = torch.linalg.qr(u.detach().double())  # (out, a), (a, r)
    qv, rv = torch.linalg.qr(v.detach().double().t())  # (n, b), (b, r)
    p, s, qh = torch.linalg.svd(ru @ rv.t(), full_matrices=False)  # core (a, b)
    k = min(rank, int(s.numel()))
    root = s[:k].sqrt()
    new_u = (qu @ p[:, :k]) * root  # (out, k)
    new_v = root[:, None] * (qh[:k] @ qv.t())  # (k, n)
    if k < rank:  # U·V has rank below ``rank``: pad with zero components (the product is unchanged)
        new_u = torch.cat([new_u, new_u.new_zeros(new_u.shape[0], rank - k)], dim=1)
        new_v = torch.cat([new_v, new_v.new_zeros(rank - k, new_v.shape[1])], dim=0)
    return new_u, new_v, s


def layer_factors(layer: FactorizedMixin) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's map as 2-D factors (U (out, r), V (r, n)) with ``dense_weight`` = U·V (flattened)."""
    if isinstance(layer, FactorizedLinear):
        return layer.U.weight, layer.V.weight
    if isinstance(layer, FactorizedConv2d):
        r = layer.rank
        return layer.U.weight.reshape(layer.out_channels, r), layer.V.weight.reshape(r, -1)
    if isinstance(layer, FactorizedEmbedding):
        return layer.U.weight, layer.V.weight.t()  # Eᵀ = U.weight · V.weightᵀ
    raise InputError(f"expected a factorized linear, conv2d or embedding layer, got {type(layer).__name__}")


def truncate_layer(layer: FactorizedMixin, rank: int) -> tuple[nn.Module, float]:
    """A new layer of the same kind at ``rank`` holding the best approximation of ``layer``'s map.

    Returns:
        (the new layer on the old one's device and dtype, relative Frobenius error of the map).
    """
    u, v = layer_factors(layer)
    new_u, new_v, s = truncate_factors(u, v, rank)
    total = float(s.pow(2).sum())
    err = float(s[rank:].pow(2).sum() / total) ** 0.5 if total > 0 else 0.0
    like = u.detach()
    new_u, new_v = new_u.to(like), new_v.to(like)
    bias: torch.Tensor | None = None
    if isinstance(layer, (FactorizedLinear, FactorizedConv2d)) and layer.U.bias is not None:
        bias = layer.U.bias.detach()
    if isinstance(layer, FactorizedLinear):
        return FactorizedLinear.from_factors(new_u, new_v, bias), err
    if isinstance(layer, FactorizedConv2d):
        return FactorizedConv2d.from_factors(
            new_u,
            new_v,
            bias,
            in_channels=layer.in_channels,
            kernel_size=layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
        ), err
    assert isinstance(layer, FactorizedEmbedding)
    return FactorizedEmbedding.from_factors(new_u, new_v), err


def lower_model(
    model: Any, ranks: dict[str, int], stages: list[list[str]] | None = None
) -> tuple[Any, list[LoweredLayer]]:
    """A copy of a StagedModel with the given nodes' ranks lowered (best approximation) and new stages.

    Args:
        model: a StagedModel (``toolkit.builder``), e.g. from ``toolkit.checkpoint.load_model``.
        ranks: node id -> new rank; a rank at or above the node's current rank leaves it as it is.
        stages: node ids per stage of the new model (default: the model's own stages).

    Returns:
        (new model in eval mode, on the model's device and dtype; one record per node whose rank
        was lowered, in the model's node order). The original model is not changed.

    Raises:
        InputError: a node that is not factorized in the model, or a rank below 1.
    """
    from toolkit.builder import build_model
    from toolkit.spec import parse_spec

    layers = model.factorized_layers()
    for nid, k in ranks.items():
        if nid not in layers:
            raise InputError(
                f"rank lowering: node {nid!r}: expected a factorized node of the model, "
                f"got {'a dense one' if nid in model.node_modules() else 'no such node'} "
                f"(factorized: {sorted(layers)})"
            )
        if k < 1:
            raise InputError(f"rank lowering: node {nid!r}: expected a rank >= 1, got {k}")
    lower = {nid: k for nid, k in ranks.items() if k < layers[nid].rank}
    doc = model.to_spec().resolved()
    for node in doc["nodes"]:
        if node["id"] in lower:
            node["factorize"] = {"rank": lower[node["id"]]}
    if stages is not None:
        doc["stages"] = [list(s) for s in stages]
    spec = parse_spec(doc, source=f"<{doc['name']} with lowered ranks>")
    param = next(model.parameters())
    new = build_model(spec, seed=0).to(device=param.device, dtype=param.dtype)
    old_mods, new_mods = model.node_modules(), new.node_modules()
    records = []
    with torch.no_grad():
        for nid in spec.analysis.order:
            src = old_mods[nid]
            if nid in lower:
                layer = layers[nid]
                small, err = truncate_layer(layer, lower[nid])
                new_mods[nid].load_state_dict(small.state_dict(), strict=True)
                records.append(LoweredLayer(nid, layer.rank, lower[nid], err))
            else:
                new_mods[nid].load_state_dict(src.state_dict(), strict=True)
    per_node = sum(len(m.state_dict()) for m in new_mods.values())
    if per_node != len(new.state_dict()):  # every tensor of the model lives in a node module
        raise RuntimeError(f"lower_model: {len(new.state_dict()) - per_node} tensors outside node modules")
    return new.eval(), records
