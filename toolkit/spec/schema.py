"""The pydantic models of a graph spec: inputs, nodes, factorization, stages, defaults.

Only the structure is checked here (types, ranges, unknown keys); the graph itself (references,
cycles, shapes, ranks, stage cuts) is checked by ``toolkit.spec.check``. ``GraphSpec`` instances
should come from ``load_spec`` / ``parse_spec``, which run both.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, PrivateAttr, WithJsonSchema, field_validator, model_serializer, model_validator

from toolkit.errors import InputError
from toolkit.spec._base import StrictModel
from toolkit.spec.blocks import json_schema_extra
from toolkit.spec.ops import OPS
from toolkit.spec.train_config import TrainConfig

if TYPE_CHECKING:
    from toolkit.spec.check import Analysis

ID_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"

_FACTORIZE_JSON_SCHEMA: dict[str, Any] = {
    "description": "'none' (dense), or exactly one of {rank: r}, {ratio: f} (share of the dense "
    "parameters), {energy: e} (share of the singular-value energy of the dense initialisation)",
    "anyOf": [
        {"const": "none"},
        {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "maxProperties": 1,
            "properties": {
                "rank": {"type": "integer", "minimum": 1},
                "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                "energy": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            },
        },
        {"type": "null"},
    ],
}


class Factorize(StrictModel):
    """How a linear / conv2d / embedding node is factorized: W (out x in) ≈ U (out x r) · V (r x in).

    ``none`` keeps the layer dense; ``rank`` gives r; ``ratio`` picks the largest r with
    r·(out + in) <= ratio·out·in; ``energy`` picks the smallest r whose singular values keep that share
    of Σσ². Energy needs dense weights: the builder draws the layer's default dense initialisation and
    truncates its SVD (so the rank depends on the seed; ``model.to_spec()`` records it).
    """

    rank: int | None = Field(None, ge=1)
    ratio: float | None = Field(None, gt=0.0, le=1.0)
    energy: float | None = Field(None, gt=0.0, le=1.0)

    @model_validator(mode="before")
    @classmethod
    def _from_none(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.strip().lower() == "none":
                return {"rank": None}
            raise ValueError(
                f"expected 'none' or one of {{rank: r}}, {{ratio: f}}, {{energy: e}}, got {value!r}"
            )
        if isinstance(value, dict) and not value:
            raise ValueError("expected one of rank, ratio, energy, got an empty mapping")
        if not isinstance(value, dict | Factorize):
            raise ValueError(
                f"expected 'none' or one of {{rank: r}}, {{ratio: f}}, {{energy: e}}, got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _at_most_one(self) -> Factorize:
        given = [k for k in ("rank", "ratio", "energy") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"expected exactly one of rank, ratio, energy, got {given}")
        return self

    @property
    def is_none(self) -> bool:
        """True when the layer stays dense."""
        return self.rank is None and self.ratio is None and self.energy is None

    @model_serializer(mode="plain")
    def _dump(self) -> str | dict[str, float | int]:
        for key in ("rank", "ratio", "energy"):
            value = getattr(self, key)
            if value is not None:
                return {key: value}
        return "none"


FactorizeField = Annotated[Factorize | None, WithJsonSchema(_FACTORIZE_JSON_SCHEMA)]


class InputSpec(StrictModel):
    """A graph input: ``shape`` without the batch axis; token ids are ``dtype: int64`` with a ``vocab``."""

    shape: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    dtype: Literal["float32", "int64"] = "float32"
    vocab: int | None = Field(None, ge=1, description="number of distinct token ids (int64 inputs)")

    @model_validator(mode="after")
    def _vocab_for_ids(self) -> InputSpec:
        if self.dtype == "int64" and self.vocab is None:
            raise ValueError("expected 'vocab' for an int64 (token id) input, got none")
        if self.dtype == "float32" and self.vocab is not None:
            raise ValueError(f"expected no 'vocab' for a float32 input, got {self.vocab}")
        return self


class NodeSpec(StrictModel):
    """One node of the graph: ``op`` from the registry, ``in`` one or several references.

    The op-specific keys (``out``, ``kernel``, ``stride``, ``padding``, ``bias``, ``p``, ``axis``,
    ``shape``, ``eps``, ``vocab``, ``heads``, ``causal``, ``max_len``, ``kind``, ``index``) are optional here; which apply to which op, and their defaults, are
    in ``toolkit.spec.ops.OPS``. Axes count over the per-example shape (no batch axis).
    """

    model_config = StrictModel.model_config | {"populate_by_name": True}

    id: str = Field(pattern=ID_PATTERN)
    op: Annotated[
        str,
        WithJsonSchema(
            {
                "enum": sorted(OPS),
                "description": "node type; " + "; ".join(f"{k}: {OPS[k].doc}" for k in sorted(OPS)),
            }
        ),
    ]
    in_: list[str] = Field(alias="in", min_length=1)
    out: int | None = Field(
        None, ge=1, description="output features (linear), channels (conv2d), dim (embedding)"
    )
    kernel: int | None = Field(None, ge=1)
    stride: int | None = Field(None, ge=1)
    padding: int | None = Field(None, ge=0)
    bias: bool | None = None
    vocab: int | None = Field(None, ge=1)
    p: float | None = Field(None, ge=0.0, lt=1.0)
    axis: int | list[int] | None = None
    shape: list[int] | None = None
    eps: float | None = Field(None, gt=0.0)
    heads: int | None = Field(None, ge=1, description="attention heads (must divide the width)")
    causal: bool | None = Field(
        None, description="attention: each position sees only itself and earlier ones"
    )
    max_len: int | None = Field(None, ge=1, description="position_embedding: the longest sequence")
    kind: Literal["learned", "sinusoidal"] | None = Field(None, description="position_embedding table")
    index: int | None = Field(
        None, description="select: the position on the sequence axis (0 = first, -1 = last)"
    )
    factorize: FactorizeField = None
    group: str | None = Field(
        None, description="the repeated block instance this node came from (set by block expansion)"
    )

    @field_validator("in_", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("op")
    @classmethod
    def _known_op(cls, value: str) -> str:
        from toolkit.spec.errors import suggest

        if value not in OPS:
            raise ValueError(f"unknown op '{value}'{suggest(value, OPS)} (known: {', '.join(sorted(OPS))})")
        return value

    def param(self, key: str) -> Any:
        """The value of an op parameter, falling back to the op's default."""
        value = getattr(self, key)
        return OPS[self.op].params.get(key) if value is None else value


class Defaults(StrictModel):
    """Settings every node takes unless it sets its own."""

    factorize: FactorizeField = None


class AutoRule(StrictModel):
    """Contiguous chunks of the topological order: ``count`` stages, or at most ``max_bytes`` each."""

    count: int | None = Field(None, ge=1)
    max_bytes: int | str | None = Field(None, description="float32 parameter bytes per stage, e.g. 2MB")

    @field_validator("max_bytes")
    @classmethod
    def _bytes(cls, value: int | str | None) -> int | None:
        return None if value is None else parse_bytes(value)

    @model_validator(mode="after")
    def _one_rule(self) -> AutoRule:
        if (self.count is None) == (self.max_bytes is None):
            raise ValueError("expected exactly one of 'count' or 'max_bytes'")
        return self


class AutoStages(StrictModel):
    """``stages: {auto: {count: N}}`` or ``stages: {auto: {max_bytes: 2MB}}``."""

    auto: AutoRule


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: int | str) -> int:
    """Parse a byte count: 2000000, "2MB", "512 KiB", "1.5GB".

    Raises:
        ValueError: for an unknown unit or a non-positive size.
    """
    if isinstance(value, int):
        size = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise InputError(f"expected a size like 2000000, '512KB' or '2MB', got {value!r}")
        size = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if size < 1:
        raise InputError(f"expected a positive size, got {value!r}")
    return int(size)


class GraphSpec(StrictModel):
    """A validated graph: inputs, nodes (a DAG by ``in`` references), outputs, stages, train section.

    Get one from ``load_spec`` / ``parse_spec``; ``stage_partition()`` and ``resolved()`` need the
    graph analysis those functions attach.
    """

    model_config = StrictModel.model_config | {"json_schema_extra": json_schema_extra}

    name: str = Field(min_length=1)
    description: str | None = None
    inputs: dict[str, InputSpec] = Field(min_length=1)
    defaults: Defaults = Field(default_factory=Defaults)
    nodes: list[NodeSpec] = Field(min_length=1)
    outputs: list[str] = Field(min_length=1)
    stages: list[list[str]] | AutoStages = Field(
        default_factory=lambda: AutoStages.model_validate({"auto": {"count": 1}})
    )
    train: TrainConfig = Field(default_factory=lambda: TrainConfig.model_validate({}))

    _analysis: Analysis | None = PrivateAttr(default=None)
    _source: str = PrivateAttr(default="<memory>")

    @field_validator("outputs", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("inputs")
    @classmethod
    def _input_names(cls, value: dict[str, InputSpec]) -> dict[str, InputSpec]:
        bad = [k for k in value if not re.fullmatch(ID_PATTERN, k)]
        if bad:
            raise ValueError(f"expected input names matching {ID_PATTERN}, got {bad}")
        return value

    @property
    def analysis(self) -> Analysis:
        """Topological order, shapes, resolved factorizations and stages (computed once)."""
        if self._analysis is None:
            from toolkit.spec.check import analyze_or_raise

            self._analysis = analyze_or_raise(self, self._source)
        return self._analysis

    def node(self, node_id: str) -> NodeSpec:
        """The node with this id.

        Raises:
            KeyError: when there is none (the message lists the known ids).
        """
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(f"unknown node '{node_id}'; known: {[n.id for n in self.nodes]}")

    def stage_partition(self) -> list[list[str]]:
        """The stages as lists of node ids in topological order (``auto`` rules resolved)."""
        return [list(s) for s in self.analysis.stages]

    def resolved(self) -> dict[str, Any]:
        """The spec with every default filled in, as plain data (JSON-able; parse_spec accepts it).

        Nodes carry every parameter of their op, factorizable nodes an explicit ``factorize``, stages
        are explicit lists and the train section has all its fields.
        """
        from toolkit.spec.check import resolved_dict

        return resolved_dict(self)
