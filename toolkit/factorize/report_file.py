"""Reading ``factorize.json`` back: every rank and shape checked against the model before use.

``rlhf factorize`` on a Hugging Face model writes ``factorize.json`` (a FactorizeReport) beside the
weights; ``load_factorized_hf`` rebuilds the factorized layers from its ranks before it loads the
weights. The file is input like any other: each layer it names must exist in the model built from
``config.json`` and be a layer the toolkit factorizes, its ``shape`` must be that layer's own
(``out, n``) and its rank an int in ``0..min(out, n)``, so the factors allocated from it are never
larger than the layer they replace. The file itself is read under ``MAX_REPORT_BYTES``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from toolkit.errors import InputError

MAX_REPORT_BYTES = 16 * 2**20
"""Largest factorize.json read (bytes); env ``RLHF_MAX_REPORT_BYTES``."""


@dataclass(frozen=True)
class PlannedLayer:
    """One layer to rebuild factorized: qualified name, rank and (out, n) shape."""

    name: str
    rank: int
    shape: tuple[int, int]


def _ceiling() -> int:
    raw = os.environ.get("RLHF_MAX_REPORT_BYTES", "").strip()
    if not raw:
        return MAX_REPORT_BYTES
    if not raw.isdigit() or int(raw) < 1:
        raise InputError(f"RLHF_MAX_REPORT_BYTES: expected a positive integer, got {raw!r}")
    return int(raw)


def read_report(path: str | os.PathLike[str]) -> Any:
    """The JSON document in ``path`` (a factorize.json), read under the size ceiling.

    Raises:
        FileNotFoundError: no such file.
        InputError: larger than ``MAX_REPORT_BYTES`` (``RLHF_MAX_REPORT_BYTES``), not UTF-8 JSON,
            or nested too deeply.
    """
    p = Path(path)
    size = p.stat().st_size
    ceiling = _ceiling()
    if size > ceiling:
        raise InputError(
            f"{p}: {size} bytes, above the limit max_report_bytes={ceiling} (raise it with RLHF_MAX_REPORT_BYTES)"
        )
    return parse_report_bytes(p.read_bytes(), str(p))


def parse_report_bytes(data: bytes, where: str = "factorize.json") -> Any:
    """Decode a factorize.json document.

    Raises:
        InputError: not UTF-8 JSON, or nested too deeply.
    """
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{where}: not JSON ({exc})") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply") from None


def layer_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, n) of a layer as the factorizer sees it, from its weight's shape (works on ``meta``);
    None for a module the toolkit does not factorize."""
    w = getattr(module, "weight", None)
    if w is None:
        return None
    if isinstance(module, nn.Linear):
        return int(w.shape[0]), int(w.shape[1])
    if isinstance(module, nn.Conv2d):
        return int(w.shape[0]), int(w[0].numel())
    if isinstance(module, nn.Embedding):
        return int(w.shape[1]), int(w.shape[0])
    return None


def _fail(where: str, expected: str, got: Any) -> InputError:
    text = repr(got)
    return InputError(f"{where}: expected {expected}, got {text[:200] + '...' if len(text) > 200 else text}")


def planned_layers(doc: Any, model: nn.Module, where: str = "factorize.json") -> list[PlannedLayer]:
    """Check a factorize.json document against ``model`` and return the layers to factorize.

    Args:
        doc: the parsed document (``{"layers": [{"name", "rank", "shape"}, ...], ...}``).
        model: the dense model built from the saved config (may live on the ``meta`` device).
        where: the file, for messages.

    Returns:
        The layers with a rank > 0, in file order.

    Raises:
        InputError: one line naming the field (``layers[3].rank``) and what was expected.
    """
    if not isinstance(doc, dict):
        raise _fail(where, "a JSON object with 'layers'", type(doc).__name__)
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise _fail(f"{where}: layers", "a list", layers)
    modules = dict(model.named_modules())
    seen: set[str] = set()
    out: list[PlannedLayer] = []
    for i, layer in enumerate(layers):
        w = f"{where}: layers[{i}]"
        if not isinstance(layer, dict):
            raise _fail(w, "an object with name, rank, shape", layer)
        name, rank, shape = layer.get("name"), layer.get("rank"), layer.get("shape")
        if not isinstance(name, str) or not name or name not in modules:
            raise _fail(f"{w}.name", "the name of a layer of the model", name)
        if name in seen:
            raise _fail(f"{w}.name", "each layer once", name)
        seen.add(name)
        own = layer_shape(modules[name])
        if own is None:
            raise _fail(f"{w}.name", "an nn.Linear, nn.Conv2d or nn.Embedding", type(modules[name]).__name__)
        if not isinstance(shape, list) or [type(d) for d in shape] != [int, int] or tuple(shape) != own:
            raise _fail(f"{w}.shape", f"the layer's own (out, n) {list(own)}", shape)
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= min(own):
            raise _fail(f"{w}.rank", f"an int in 0..{min(own)} (0 = kept dense)", rank)
        if rank:
            out.append(PlannedLayer(name, rank, own))
    return out
