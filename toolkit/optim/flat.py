"""A flat view of a list of parameters, for torch.func calls on one vector.

The optimizer works on one vector θ ∈ R^P (the concatenation of the flattened parameters it owns);
``FlatParams`` maps between that vector and the named tensors ``torch.func.functional_call`` needs.
Parameters of the model that the optimizer does not own keep their current values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call


class FlatParams:
    """Names, shapes and offsets of the optimized parameters inside the flat vector θ.

    Args:
        model: the module the parameters belong to.
        params: the parameters to optimize, in order (each must be a parameter of ``model``).

    Raises:
        ValueError: a parameter is not one of ``model``'s, or appears twice.
    """

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor]) -> None:
        by_id = {id(p): name for name, p in model.named_parameters()}
        self.model = model
        self.params = list(params)
        self.names: list[str] = []
        for i, p in enumerate(self.params):
            name = by_id.get(id(p))
            if name is None:
                raise ValueError(
                    f"params[{i}]: expected a parameter of the model, got a foreign tensor {tuple(p.shape)}"
                )
            self.names.append(name)
        if len(set(self.names)) != len(self.names):
            raise ValueError("expected each parameter once, got duplicates")
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.numel = self.offsets[-1]

    def flatten(self, tensors: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Concatenate tensors shaped like the parameters (default: the parameters) into (P,)."""
        ts = self.params if tensors is None else tensors
        return torch.cat([t.detach().reshape(-1) for t in ts])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` (P,) shaped like the parameters, keyed by qualified name."""
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def slice_of(self, index: int) -> slice:
        """The range of parameter ``index`` inside θ."""
        return slice(self.offsets[index], self.offsets[index + 1])

    def write(self, flat: torch.Tensor) -> None:
        """Copy ``flat`` (P,) into the parameters, in place."""
        with torch.no_grad():
            for p, t in zip(self.params, flat.split(self.sizes)):
                p.copy_(t.view_as(p))

    def function(self, inputs: tuple[Any, ...]) -> Callable[[torch.Tensor], Any]:
        """θ ↦ model(*inputs) with the optimized parameters taken from θ."""
        model = self.model

        def call(flat: torch.Tensor) -> Any:
            return functional_call(model, self.unflatten(flat), inputs)

        return call
