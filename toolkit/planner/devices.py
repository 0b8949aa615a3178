"""devices.yaml: the devices of a cluster (memory, speed) and the links between them.

```yaml
devices:
  - {name: pi-a, memory: 2GB, speed: 1.0}      # speed: work per second relative to the profiling machine
  - {name: pi-b, memory: 1GB, speed: 0.33}
links:
  default: {bandwidth: 125MB, latency: 0.0005} # bytes per second, seconds; every pair not listed
  pairs:
    - {a: pi-a, b: pi-b, bandwidth: 1GB, latency: 0.0001}
hop: {fixed: 4.0e-4, per_byte: 2.0e-10}       # optional: what one Ray stage adds per micro-batch
```

Links are symmetric. Without ``default`` a pair that is not listed cannot exchange tensors.

``hop`` (optional; ``rlhf plan --hop measure`` measures it on this machine, see
``toolkit.planner.hop``) is the cost of running a stage as a Ray actor: each stage's time per
micro-batch grows by ``fixed + per_byte * (bytes in + bytes out)`` seconds (dispatching the call,
reading its input from and writing its output to Ray's object store), not scaled by the device's
speed. A file with ``hop`` and no ``links`` describes devices of one machine (a local Ray
cluster): they exchange tensors through the object store, whose cost the hop already holds, so
links cost nothing. Without ``hop`` the plain model holds: stage compute and link transfers only.
Loading uses ``yaml.safe_load`` and pydantic models that forbid unknown fields; every problem
becomes an :class:`~toolkit.errors.InputError` naming the file and the field path.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from toolkit.errors import InputError
from toolkit.spec.schema import parse_bytes


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _number(value: str) -> float | None:
    """``'1.0e15'`` (a string to PyYAML, which wants ``1.0e+15``) as a float, else None."""
    try:
        return float(value)
    except ValueError:
        return None


def _size(value: Any) -> Any:
    if isinstance(value, str) and _number(value) is not None:
        value = _number(value)
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 2000000 or '2GB', got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return parse_bytes(value) if isinstance(value, (int, str)) else value


class Device(_Strict):
    """One device: a unique name, memory in bytes (or '2GB'), speed relative to the profiling machine."""

    name: str = Field(min_length=1)
    memory: int = Field(gt=0)
    speed: float = Field(1.0, gt=0, allow_inf_nan=False)

    _memory = field_validator("memory", mode="before")(classmethod(lambda cls, v: _size(v)))


class LinkSpec(_Strict):
    """Bandwidth (bytes per second, > 0) and latency (seconds, >= 0) of a link."""

    bandwidth: float = Field(gt=0, allow_inf_nan=False)
    latency: float = Field(0.0, ge=0, allow_inf_nan=False)

    @field_validator("bandwidth", mode="before")
    @classmethod
    def _bw(cls, v: Any) -> Any:
        if isinstance(v, str):
            num = _number(v)
            return num if num is not None else float(parse_bytes(v.removesuffix("/s")))
        return v


class HopSpec(_Strict):
    """Seconds a Ray stage adds per micro-batch: ``fixed + per_byte * (bytes in + bytes out)``."""

    fixed: float = Field(ge=0, allow_inf_nan=False)
    per_byte: float = Field(0.0, ge=0, allow_inf_nan=False)


class PairLink(LinkSpec):
    """A link between two named devices (symmetric)."""

    a: str
    b: str


class Links(_Strict):
    default: LinkSpec | None = None
    pairs: list[PairLink] = Field(default_factory=list)


class DevicesFile(_Strict):
    devices: list[Device] = Field(min_length=1)
    links: Links = Field(default_factory=Links)
    hop: HopSpec | None = None

    @model_validator(mode="after")
    def _names(self) -> DevicesFile:
        names = [d.name for d in self.devices]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"device names must be unique, got duplicates {dup}")
        for i, p in enumerate(self.links.pairs):
            for end in (p.a, p.b):
                if end not in names:
                    raise ValueError(f"links.pairs[{i}]: unknown device {end!r}; known: {names}")
            if p.a == p.b:
                raise ValueError(f"links.pairs[{i}]: a link joins two different devices, got {p.a!r} twice")
        return self


@dataclass(frozen=True)
class Link:
    """Seconds to send ``n`` bytes: ``latency + n / bandwidth``."""

    bandwidth: float
    latency: float

    def seconds(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth


@dataclass(frozen=True)
class Hop:
    """What running a stage as a Ray actor adds to its time per micro-batch (seconds).

    ``fixed`` per call, ``per_byte`` per byte of the tensors entering and leaving the stage;
    ``source`` says where the figures come from (the devices file, or a measurement here).
    """

    fixed: float
    per_byte: float
    source: str = ""

    def seconds(self, in_bytes: float, out_bytes: float) -> float:
        return self.fixed + self.per_byte * (in_bytes + out_bytes)


FREE = Link(math.inf, 0.0)  # devices of one machine: the hop holds the object store's cost


@dataclass(frozen=True)
class Cluster:
    """Devices and the links between them (``link(a, b)`` is None when the pair cannot talk).

    ``hop`` (None: the plain model) is added to every stage's time (see the module docstring).
    """

    devices: tuple[Device, ...]
    default: Link | None = None
    pairs: dict[frozenset[str], Link] = field(default_factory=dict)
    hop: Hop | None = None

    def with_hop(self, hop: Hop | None) -> Cluster:
        """The same devices and links with another hop cost (None: the plain model).

        A cluster without links gets free links with a hop (devices of one machine), and loses
        them again without one.
        """
        one_host = not self.pairs and (self.default is None or self.default is FREE)
        default = (FREE if hop is not None else None) if one_host else self.default
        return Cluster(self.devices, default, self.pairs, hop)

    @property
    def cost_model(self) -> str:
        """Which cost model the planner uses for this cluster, in words."""
        if self.hop is None:
            return "plain: stage compute from the profile, link transfers from the devices file"
        links = "no links (one machine)" if self.default is FREE else "links from the devices file"
        return (
            f"Ray: stage compute from the profile + {self.hop.fixed * 1e3:.3f} ms + "
            f"{self.hop.per_byte * 1e9:.3f} ms/MB of the tensors in and out per stage "
            f"({self.hop.source}); {links}"
        )

    def link(self, a: str, b: str) -> Link | None:
        """The link between two different devices, or None when there is none."""
        return self.pairs.get(frozenset((a, b)), self.default)

    def link_seconds(self, a: str, b: str, nbytes: float) -> float:
        """Transfer time of ``nbytes`` from a to b (``inf`` without a link)."""
        ln = self.link(a, b)
        return math.inf if ln is None else ln.seconds(nbytes)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.devices]


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "top level"


def parse_devices(doc: Any, source: str = "<memory>") -> Cluster:
    """Validate a devices document (a dict) and build the :class:`Cluster`.

    Raises:
        InputError: one line per problem: ``devices.yaml: devices[1].memory: ...``.
    """
    try:
        parsed = DevicesFile.model_validate(doc)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            lines.append(f"{source}: {_where(tuple(err['loc']))}: {msg}")
        raise InputError("\n".join(lines)) from None
    links = parsed.links
    default = Link(links.default.bandwidth, links.default.latency) if links.default else None
    pairs = {frozenset((p.a, p.b)): Link(p.bandwidth, p.latency) for p in links.pairs}
    hop = None if parsed.hop is None else Hop(parsed.hop.fixed, parsed.hop.per_byte, f"{source}: hop")
    return Cluster(tuple(parsed.devices), default, pairs).with_hop(hop)


def load_devices(path: str | os.PathLike[str]) -> Cluster:
    """Read and validate a devices.yaml file (safe loader).

    Raises:
        FileNotFoundError: no such file.
        InputError: not YAML, or a field is missing, unknown or out of range.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"devices file not found: {p}")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise InputError(f"{p}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return parse_devices(doc, str(p))
