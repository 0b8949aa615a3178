"""GraphSpec -> a torch model with one submodule per stage (no I/O).

Each stage is callable on its own with the tensors that cross its cut, in ``stage.input_names``
order, and returns ``stage.output_names`` in order; the whole model chains the stages. Forward passes
are plain tensor ops with no data-dependent Python control flow, so each stage exports with
``torch.onnx.export``. Parameters are named ``stages.<s>.<node id>.<...>`` (e.g. ``stages.0.fc1.U.weight``).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, cast

import torch
from torch import nn

from toolkit.errors import InputError
from toolkit.layers import FactorizedConv2d, FactorizedEmbedding, FactorizedLinear, FactorizedMixin
from toolkit.layers.attention import Attention
from toolkit.layers.sequence import MaskedMean, Mul, PositionEmbedding, Select
from toolkit.spec import GraphSpec, InputSpec, NodeSpec, parse_spec
from toolkit.spec.check import RankPlan


def _batch_axes(axes: int | list[int]) -> list[int]:
    """Per-example axes (no batch axis) -> tensor axes (batch first); negative axes stay as they are."""
    return [a + 1 if a >= 0 else a for a in ([axes] if isinstance(axes, int) else axes)]


class Add(nn.Module):
    """y = x₁ + x₂ + … (inputs of one shape)."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class Concat(nn.Module):
    """Concatenation along one axis (a tensor axis, batch first)."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=self.axis)


class Reshape(nn.Module):
    """Reshape each example to a fixed shape (batch axis kept)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, *self.shape)  # (B, *shape)


class Mean(nn.Module):
    """Mean over fixed axes (tensor axes, batch first), e.g. (2, 3) = global average pool of (B, C, H, W)."""

    def __init__(self, axes: list[int]) -> None:
        super().__init__()
        self.axes = axes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=self.axes)


def _dense_or_factorized(
    dense: nn.Module, plan: RankPlan, make: Any, node_id: str, force_dense: bool
) -> nn.Module:
    """Build the layer for a factorizable node following its plan."""
    if force_dense or plan.kind == "dense":
        return dense
    if plan.kind == "energy":
        layer: nn.Module = make.from_dense(dense, energy=plan.energy)
        if layer is dense:
            warnings.warn(
                f"{node_id}: energy {plan.energy} keeps a rank that would not reduce multiply-adds; kept dense",
                stacklevel=3,
            )
        return layer
    return make(plan.rank)


def _node_module(node: NodeSpec, spec: GraphSpec, dense: bool) -> nn.Module:
    a = spec.analysis
    in_shape = a.infos[node.in_[0]][0]
    p = node.param
    op = node.op
    if op == "linear":
        n_in, out, bias = in_shape[-1], p("out"), p("bias")
        return _dense_or_factorized(
            nn.Linear(n_in, out, bias=bias),
            a.plans[node.id],
            _Maker(FactorizedLinear, n_in, out, bias=bias),
            node.id,
            dense,
        )
    if op == "conv2d":
        c_in, out, k, s, pad, bias = in_shape[0], p("out"), p("kernel"), p("stride"), p("padding"), p("bias")
        return _dense_or_factorized(
            nn.Conv2d(c_in, out, k, stride=s, padding=pad, bias=bias),
            a.plans[node.id],
            _Maker(FactorizedConv2d, c_in, out, k, stride=s, padding=pad, bias=bias, rank_pos=3),
            node.id,
            dense,
        )
    if op == "embedding":
        vocab, dim = a.vocab[node.id], p("out")
        return _dense_or_factorized(
            nn.Embedding(vocab, dim),
            a.plans[node.id],
            _Maker(FactorizedEmbedding, vocab, dim),
            node.id,
            dense,
        )
    if op == "layer_norm":
        return nn.LayerNorm(in_shape[-1], eps=p("eps"))
    if op == "batch_norm":
        return (nn.BatchNorm2d if len(in_shape) == 3 else nn.BatchNorm1d)(in_shape[0], eps=p("eps"))
    if op == "dropout":
        return nn.Dropout(p("p"))
    simple: dict[str, type[nn.Module]] = {
        "relu": nn.ReLU,
        "gelu": nn.GELU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "softplus": nn.Softplus,
    }
    if op in simple:
        return simple[op]()
    if op == "softmax":
        return nn.Softmax(dim=_batch_axes(p("axis"))[0])
    if op == "add":
        return Add()
    if op == "mul":
        return Mul()
    if op == "attention":
        return Attention(p("heads"), bool(p("causal")))
    if op == "position_embedding":
        return PositionEmbedding(p("max_len"), in_shape[-1], p("kind"))
    if op == "masked_mean":
        return MaskedMean()
    if op == "select":
        return Select(p("index"))
    if op == "concat":
        return Concat(_batch_axes(p("axis"))[0])
    if op == "flatten":
        return nn.Flatten(1)
    if op == "reshape":
        return Reshape(a.infos[node.id][0])
    if op == "mean":
        return Mean(_batch_axes(p("axis")))
    raise ValueError(f"no builder for op '{op}'")  # pragma: no cover - the registry and this list agree


class _Maker:
    """Builds a factorized layer of a given rank (``make(rank)``) or from a dense one (``from_dense``)."""

    def __init__(self, cls: Any, *args: Any, rank_pos: int = 2, **kwargs: Any) -> None:
        self.cls, self.args, self.kwargs, self.rank_pos = cls, args, kwargs, rank_pos

    def __call__(self, rank: int | None) -> nn.Module:
        args = list(self.args)
        args.insert(self.rank_pos, rank)
        module: nn.Module = self.cls(*args, **self.kwargs)
        return module

    def from_dense(self, dense: nn.Module, energy: float | None) -> nn.Module:
        module: nn.Module = self.cls.from_dense(dense, energy=energy)
        return module


class Stage(nn.Module):
    """One stage: its nodes in topological order, registered as submodules named by node id.

    ``forward(*tensors)`` takes the tensors named ``input_names`` and returns those named
    ``output_names`` (the tensors later stages or the graph outputs need).
    """

    def __init__(
        self,
        nodes: list[NodeSpec],
        modules: dict[str, nn.Module],
        input_names: list[str],
        output_names: list[str],
    ) -> None:
        super().__init__()
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.node_ids = [n.id for n in nodes]
        self._inputs_of = {n.id: list(n.in_) for n in nodes}
        for nid in self.node_ids:
            self.add_module(nid, modules[nid])

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(tensors) != len(self.input_names):
            raise InputError(
                f"expected {len(self.input_names)} tensors {self.input_names}, got {len(tensors)}"
            )
        env = dict(zip(self.input_names, tensors))
        for nid in self.node_ids:
            env[nid] = self.get_submodule(nid)(*(env[r] for r in self._inputs_of[nid]))
        return tuple(env[name] for name in self.output_names)


class StagedModel(nn.Module):
    """A graph as a chain of stages; ``model(*inputs)`` runs them in order.

    Attributes:
        input_names, output_names: graph inputs (call order) and outputs.
        input_specs: input name -> InputSpec (shape without batch, dtype).
        stages: nn.ModuleList of Stage.
    """

    def __init__(self, spec: GraphSpec, stages: list[Stage], dense: bool) -> None:
        super().__init__()
        self.spec = spec
        self.dense = dense
        self.input_names = list(spec.inputs)
        self.output_names = list(spec.outputs)
        self.input_specs: dict[str, InputSpec] = dict(spec.inputs)
        self.stages = nn.ModuleList(stages)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise InputError(f"expected {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        env = dict(zip(self.input_names, inputs))
        for stage in self.stage_list():
            outs = stage(*(env[name] for name in stage.input_names))
            env.update(zip(stage.output_names, outs))
        result = tuple(env[name] for name in self.output_names)
        return result[0] if len(result) == 1 else result

    def stage_list(self) -> list[Stage]:
        """The stages, typed (``self.stages`` is the nn.ModuleList holding them)."""
        return [cast(Stage, stage) for stage in self.stages]

    def node_modules(self) -> dict[str, nn.Module]:
        """Node id -> its module, over all stages."""
        return {nid: stage.get_submodule(nid) for stage in self.stage_list() for nid in stage.node_ids}

    def factorized_layers(self) -> dict[str, FactorizedMixin]:
        """Node id -> factorized layer, for every node that is currently factorized."""
        return {nid: m for nid, m in self.node_modules().items() if isinstance(m, FactorizedMixin)}

    def ranks(self) -> dict[str, int]:
        """Node id -> current rank of each factorized layer."""
        return {nid: m.rank for nid, m in self.factorized_layers().items()}

    def to_spec(self) -> GraphSpec:
        """The spec of the model as it is now: every factorizable node pinned to its current layer.

        Factorized nodes get ``factorize: {rank: r}`` (after pruning, the pruned rank); dense ones
        ``factorize: none``. Building from it gives the same parameter shapes, so
        ``load_state_dict(strict=True)`` works.
        """
        data = copy.deepcopy(self.spec.resolved())
        layers = self.node_modules()
        for node in data["nodes"]:
            if "factorize" in node:
                m = layers[node["id"]]
                node["factorize"] = {"rank": m.rank} if isinstance(m, FactorizedMixin) else "none"
        return parse_spec(data, source=f"<{self.spec.name} as built>")


def build_model(spec: GraphSpec, seed: int | None = None, dense: bool = False) -> StagedModel:
    """Build the torch model of a validated spec.

    Args:
        spec: from load_spec / parse_spec.
        seed: seeds torch's generator before initialising (None: leave the global RNG alone).
        dense: True ignores every factorization (the dense counterpart, same graph).

    Returns:
        A StagedModel with one Stage per spec stage.

    Raises:
        TypeError: when ``spec`` is not a GraphSpec.
        SpecError: when the spec's graph is invalid (a spec built by hand, not via parse_spec).

    A factorization that would not reduce multiply-adds is built dense with a warning. ``energy``
    draws the layer's default dense initialisation and keeps that share of its singular-value energy.
    """
    if not isinstance(spec, GraphSpec):
        raise TypeError(f"expected a GraphSpec (from toolkit.spec.load_spec), got {type(spec).__name__}")
    a = spec.analysis
    for nid, plan in a.plans.items():
        if plan.note and not dense:
            warnings.warn(f"{nid}: {plan.note}", stacklevel=2)
    if seed is not None:
        torch.manual_seed(seed)
    by_id = {n.id: n for n in spec.nodes}
    modules = {nid: _node_module(by_id[nid], spec, dense) for nid in a.order}
    stages = [
        Stage([by_id[nid] for nid in ids], modules, a.stage_inputs[s], a.stage_outputs[s])
        for s, ids in enumerate(a.stages)
    ]
    return StagedModel(spec, stages, dense)


__all__ = ["Stage", "StagedModel", "build_model"]
