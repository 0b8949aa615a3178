"""What `factorize_module` did, per layer: rank, parameters, output error (rich table and JSON)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.table import Table


@dataclass
class LayerReport:
    """One layer of a factorization.

    Attributes:
        name: qualified module name.
        kind: "linear", "conv2d" or "embedding".
        shape: (out, n) of the layer as a 2-D map.
        rank: the rank kept (0 when the layer was kept dense).
        dense_params: weight parameters of the dense layer (out·n).
        factor_params: weight parameters after factorization (r·(out+n), or out·n if kept dense).
        error_svd: ‖Y − Ŷ‖/‖Y‖ of plain truncated SVD at this rank on calibration data (None without data).
        error: the same for the chosen method (equals error_svd for method "svd").
        error_refit: after the layer-wise refit (None when not refit).
        note: why a layer was kept dense, if it was.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    rank: int
    dense_params: int
    factor_params: int
    error_svd: float | None = None
    error: float | None = None
    error_refit: float | None = None
    note: str = ""

    @property
    def reduction(self) -> float:
        """dense_params / factor_params (2.0 = half the parameters)."""
        return self.dense_params / max(1, self.factor_params)


@dataclass
class FactorizeReport:
    """Per-layer results plus the settings; ``str()`` is not used — render with ``table()`` or ``to_json()``."""

    method: str
    rule: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def dense_params(self) -> int:
        """Weight parameters of the selected layers before factorization."""
        return sum(lr.dense_params for lr in self.layers)

    @property
    def factor_params(self) -> int:
        """Weight parameters of the same layers after factorization."""
        return sum(lr.factor_params for lr in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "method": self.method,
            "rule": self.rule,
            "dense_params": self.dense_params,
            "factor_params": self.factor_params,
            "reduction": self.dense_params / max(1, self.factor_params),
            "layers": [
                {**asdict(lr), "shape": list(lr.shape), "reduction": lr.reduction} for lr in self.layers
            ],
        }

    def to_json(self, indent: int = 2) -> str:
        """The report as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    def table(self, title: str | None = None) -> Table:
        """A rich table: one row per layer, then the totals."""
        t = Table(title=title or f"factorize ({self.method}, {self.rule})")
        for col in (
            "layer",
            "kind",
            "shape",
            "rank",
            "params",
            "reduction",
            "err svd",
            "err " + self.method,
            "err refit",
        ):
            t.add_column(col, justify="left" if col in ("layer", "kind") else "right")

        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.4f}"

        for lr in self.layers:
            t.add_row(
                lr.name,
                lr.kind,
                f"{lr.shape[0]}x{lr.shape[1]}",
                str(lr.rank) if lr.rank else "dense",
                f"{lr.dense_params:,} -> {lr.factor_params:,}",
                f"{lr.reduction:.2f}x",
                fmt(lr.error_svd),
                fmt(lr.error),
                fmt(lr.error_refit),
            )
        t.add_row(
            "total",
            "",
            "",
            "",
            f"{self.dense_params:,} -> {self.factor_params:,}",
            f"{self.dense_params / max(1, self.factor_params):.2f}x",
            "",
            "",
            "",
        )
        return t
