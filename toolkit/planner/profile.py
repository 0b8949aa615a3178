"""ModelProfile: what the planner knows about a model, as a chain of units in topological order.

A unit is the smallest piece a stage can hold (a spec node, or a stage of a fine-grained export);
cuts are allowed only between units, where exactly the listed tensors cross. Per unit: measured
seconds on the profiling machine at ``batch``, and weight bytes; per cut: the bytes crossing it
(``cut_bytes[j]`` after ``j`` units: ``cut_bytes[0]`` is the graph inputs, ``cut_bytes[n]`` the
graph outputs). Stored as JSON (never executed).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import InputError


@dataclass(frozen=True)
class Unit:
    """One unit of the chain: its name, seconds per batch on the profiling machine, weight bytes.

    ``rank`` (0: not factorized) and ``rank_bytes`` (the bytes of its factors, which scale with
    the rank) let the planner lower a unit's rank when nothing else fits (see ``at_rank_scale``).
    """

    name: str
    seconds: float
    weight_bytes: int
    nodes: tuple[str, ...] = ()
    rank: int = 0
    rank_bytes: int = 0

    def at_rank_scale(self, scale: float) -> Unit:
        """The unit with its rank lowered to ``max(1, floor(rank * scale))``.

        The factor bytes scale exactly with the rank; the seconds are estimated by scaling the
        factors' share of the unit's time like their bytes (multiply-adds of U and V are
        proportional to the rank), not measured.
        """
        if self.rank <= 0 or scale >= 1 or self.weight_bytes == 0:
            return self
        new_rank = max(1, int(self.rank * scale))
        cut = self.rank_bytes * (1 - new_rank / self.rank)
        share = self.rank_bytes / self.weight_bytes
        seconds = self.seconds * (1 - share * (1 - new_rank / self.rank))
        return Unit(
            self.name,
            seconds,
            round(self.weight_bytes - cut),
            self.nodes,
            new_rank,
            round(self.rank_bytes - cut),
        )


@dataclass(frozen=True)
class ModelProfile:
    """Units in topological order plus the bytes crossing each of the ``n + 1`` cut positions.

    Raises:
        InputError: inconsistent lengths or negative numbers.
    """

    name: str
    batch: int
    units: tuple[Unit, ...]
    cut_bytes: tuple[int, ...]
    cut_tensors: tuple[tuple[str, ...], ...] = ()
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.units)
        if n == 0:
            raise InputError(f"profile {self.name!r}: expected at least one unit, got none")
        if len(self.cut_bytes) != n + 1:
            raise InputError(
                f"profile {self.name!r}: cut_bytes: expected {n + 1} entries (n units + 1), got {len(self.cut_bytes)}"
            )
        bad = [u.name for u in self.units if u.seconds < 0 or u.weight_bytes < 0]
        if bad or any(b < 0 for b in self.cut_bytes) or self.batch < 1:
            raise InputError(f"profile {self.name!r}: expected non-negative costs and batch >= 1, got {bad}")

    def at_rank_scale(self, scale: float) -> ModelProfile:
        """Every factorized unit at ``scale`` times its rank (see :meth:`Unit.at_rank_scale`)."""
        units = tuple(u.at_rank_scale(scale) for u in self.units)
        return ModelProfile(self.name, self.batch, units, self.cut_bytes, self.cut_tensors, self.source)

    @property
    def total_seconds(self) -> float:
        return float(sum(u.seconds for u in self.units))

    def to_json(self) -> str:
        """The profile as a JSON document."""
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ModelProfile:
        """Build from ``to_json``'s document.

        Raises:
            InputError: missing or malformed fields.
        """
        try:
            units = tuple(
                Unit(
                    str(u["name"]),
                    float(u["seconds"]),
                    int(u["weight_bytes"]),
                    tuple(u.get("nodes", ())),
                    int(u.get("rank", 0)),
                    int(u.get("rank_bytes", 0)),
                )
                for u in doc["units"]
            )
            return cls(
                name=str(doc["name"]),
                batch=int(doc["batch"]),
                units=units,
                cut_bytes=tuple(int(b) for b in doc["cut_bytes"]),
                cut_tensors=tuple(tuple(t) for t in doc.get("cut_tensors", ())),
                source=dict(doc.get("source", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(
                f"profile: expected the fields of `rlhf profile` output, got error {exc!r}"
            ) from None


def load_profile(path: str | os.PathLike[str]) -> ModelProfile:
    """Read a profile JSON file written by ``rlhf profile``.

    Raises:
        FileNotFoundError, InputError.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"profile not found: {p}")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}: not JSON ({exc})") from None
    return ModelProfile.from_dict(doc)
