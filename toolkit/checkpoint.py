"""Checkpoints: weights as safetensors with the model's spec in the metadata, training state beside them.

A checkpoint is a directory ``step-00000050/`` (or ``best-00000050/``) holding

- ``model.safetensors``  the weights; metadata ``spec`` (``model.to_spec()`` as JSON, so pruned ranks
  rebuild the same shapes) and ``meta`` (run metadata, JSON);
- ``state.pt``           optimizer state, RNG and data-order state, loaded with ``weights_only=True``;
- ``checkpoint.json``    the SHA-256 of both files, written last.

It is written into a temporary directory beside its final place, every file fsynced, then renamed
(atomic on POSIX): a crash leaves either the whole checkpoint or none. The last two ``step-*`` and the
latest ``best-*`` are kept. Loading checks the hashes, so a corrupted or truncated file is a clear
error while the previous checkpoint stays untouched.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from toolkit import limits
from toolkit.errors import InputError
from toolkit.fsio import fsync_dir, replace_dir, write_synced

FORMAT = "rlhf-checkpoint/1"

WEIGHTS, STATE, INDEX = "model.safetensors", "state.pt", "checkpoint.json"
CKPT_DIR = "checkpoints"


@dataclass
class Checkpoint:
    """A loaded checkpoint: weights, the model's spec (JSON dict), run metadata and training state."""

    path: Path
    weights: dict[str, torch.Tensor]
    spec: dict[str, Any]
    meta: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(
    directory: str | Path,
    name: str,
    model: torch.nn.Module,
    spec: dict[str, Any],
    meta: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory ``directory/name`` atomically (replacing one of the same name).

    Args:
        directory: where checkpoints live (created if missing).
        name: the checkpoint's directory name, e.g. ``step-00000050``.
        model: the model; its ``state_dict()`` is saved (contiguous CPU copies).
        spec: the model's spec as a JSON-able dict (``model.to_spec()`` dumped).
        meta: run metadata (JSON-able): step, metrics, seed, ...
        state: training state for resuming (tensors, numbers, strings, lists, dicts only).

    Returns:
        The checkpoint directory.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "spec": json.dumps(spec), "meta": json.dumps(meta or {})}
    w_bytes = st_save(weights, metadata=metadata)
    buf = io.BytesIO()
    torch.save(state or {}, buf)
    s_bytes = buf.getvalue()
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_synced(tmp / WEIGHTS, w_bytes)
    write_synced(tmp / STATE, s_bytes)
    index = {"format": FORMAT, "files": {WEIGHTS: _sha256(w_bytes), STATE: _sha256(s_bytes)}}
    write_synced(tmp / INDEX, json.dumps(index, indent=1).encode())
    fsync_dir(tmp)
    replace_dir(tmp, final)  # the same name again (e.g. the final step) replaces the old one
    return final


def _step_of(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def list_checkpoints(directory: str | Path, prefix: str = "step") -> list[Path]:
    """Checkpoint directories ``{prefix}-N`` under ``directory``, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix + "-") and _step_of(p) >= 0]
    return sorted(found, key=_step_of)


def prune_checkpoints(directory: str | Path, prefix: str = "step", keep: int = 2) -> None:
    """Delete all but the newest ``keep`` checkpoints ``{prefix}-N`` and any leftover temp directories."""
    root = Path(directory)
    for old in list_checkpoints(root, prefix)[:-keep] if keep else list_checkpoints(root, prefix):
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _corrupt(path: Path, what: str) -> InputError:
    return InputError(
        f"checkpoint {path} is corrupted or truncated: {what}; earlier checkpoints are untouched"
    )


def _read_weights(path: Path, data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    try:
        weights = st_load(data)
        (header_len,) = struct.unpack("<Q", data[:8])
        md = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, OSError, RuntimeError, ValueError, struct.error) as exc:
        raise _corrupt(path, f"cannot read safetensors ({exc})") from exc
    if "spec" not in md:
        raise InputError(
            f"checkpoint {path}: expected the model spec in the safetensors metadata, got keys {sorted(md)}"
        )
    try:
        return weights, json.loads(md["spec"]), json.loads(md.get("meta", "{}"))
    except json.JSONDecodeError as exc:
        raise _corrupt(path, f"metadata is not JSON ({exc})") from exc


def load_checkpoint(path: str | Path, with_state: bool = True) -> Checkpoint:
    """Read and verify a checkpoint directory (or a bare ``.safetensors`` file).

    Args:
        path: a checkpoint directory or a ``.safetensors`` file written by save_checkpoint.
        with_state: also load ``state.pt`` (weights_only=True: loading never executes code).

    Returns:
        The Checkpoint.

    Raises:
        FileNotFoundError: when nothing is there.
        ValueError: a hash mismatch, truncation or unreadable file ("corrupted or truncated").
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} not found")
    if p.is_file():
        weights, spec, meta = _read_weights(p, p.read_bytes())
        return Checkpoint(p, weights, spec, meta)
    index_path = p / INDEX
    if not index_path.is_file():
        raise FileNotFoundError(
            f"checkpoint {p}: expected {INDEX} in it, got {sorted(x.name for x in p.iterdir())}"
        )
    try:
        index = json.loads(index_path.read_text())
        hashes = index["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise _corrupt(index_path, f"unreadable index ({exc})") from exc
    blobs: dict[str, bytes] = {}
    for fname in (WEIGHTS, STATE) if with_state else (WEIGHTS,):
        fp = p / fname
        if not fp.is_file():
            raise _corrupt(p, f"{fname} is missing")
        blobs[fname] = fp.read_bytes()
        if _sha256(blobs[fname]) != hashes.get(fname):
            raise _corrupt(fp, "SHA-256 does not match checkpoint.json")
    weights, spec, meta = _read_weights(p / WEIGHTS, blobs[WEIGHTS])
    state: dict[str, Any] = {}
    if with_state:
        try:
            state = torch.load(io.BytesIO(blobs[STATE]), weights_only=True, map_location="cpu")
        except Exception as exc:  # unpickling errors of every kind: refuse, never execute
            raise _corrupt(p / STATE, f"cannot load training state ({exc})") from exc
    return Checkpoint(p, weights, spec, meta, state)


def find_checkpoint(run_dir: str | Path, prefer_best: bool = True) -> Path:
    """The checkpoint a run directory points to: the latest best one, else the latest one.

    Raises:
        FileNotFoundError: when the run directory holds no checkpoint.
    """
    root = Path(run_dir) / CKPT_DIR
    best, last = list_checkpoints(root, "best"), list_checkpoints(root, "step")
    pick = (best[-1:] + last[-1:]) if prefer_best else (last[-1:] + best[-1:])
    if not pick:
        raise FileNotFoundError(f"run directory {run_dir}: expected checkpoints under {root}, found none")
    return pick[0]


def max_model_params() -> int:
    """The parameter ceiling of ``toolkit.limits`` (``RLHF_MAX_MODEL_PARAMS``, else ``MAX_MODEL_PARAMS``).

    Raises:
        InputError: the environment variable is not a positive integer.
    """
    return limits.limit("max_model_params")


def check_weights_fit(
    path: Path, planned: dict[str, tuple[int, ...]], weights: dict[str, torch.Tensor]
) -> None:
    """Refuse a checkpoint whose spec would build more than the ceiling, or other shapes than its weights.

    Args:
        path: the checkpoint, for the message.
        planned: tensor name -> shape the embedded spec builds (from a ``meta``-device build).
        weights: the tensors in the file.

    Raises:
        InputError: one line naming the limit, or the first tensor missing, unexpected or of
            another shape ("expected (256, 24) from the embedded spec, got (256, 32)").
    """
    count = sum(math.prod(shape) for shape in planned.values())
    ceiling = max_model_params()
    if count > ceiling:
        raise InputError(
            f"checkpoint {path}: the embedded spec builds {count:,} parameters, over the limit "
            f"max_model_params = {ceiling:,} (raise it with RLHF_MAX_MODEL_PARAMS)"
        )
    missing = sorted(set(planned) - set(weights))
    extra = sorted(set(weights) - set(planned))
    if missing or extra:
        raise InputError(
            f"checkpoint {path}: weights do not fit the embedded spec: missing {missing[:3]}, "
            f"unexpected {extra[:3]}"
        )
    for name, shape in planned.items():
        got = tuple(weights[name].shape)
        if got != shape:
            raise InputError(
                f"checkpoint {path}: weights do not fit the embedded spec: {name}: expected {shape} "
                f"from the embedded spec, got {got}"
            )


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Any, Any, dict[str, Any]]:
    """Rebuild a trained model from a run directory (best checkpoint, else last) or a checkpoint.

    Args:
        path: run directory, checkpoint directory or ``model.safetensors`` file.
        device: where to put the model.

    Returns:
        (model, spec, meta): the StagedModel in eval mode, its GraphSpec (ranks as trained) and the
        checkpoint's run metadata.

    The model the embedded spec describes is first built on the ``meta`` device (shapes, no
    memory): its parameter count is checked against ``toolkit.limits.MAX_MODEL_PARAMS`` and its tensor shapes
    against the weights in the file before the real model is allocated, so a small file whose
    spec names an absurd model is refused without allocating it.

    Raises:
        FileNotFoundError: nothing to load.
        ValueError: a corrupted checkpoint.
        InputError: weights that do not fit the embedded spec, or a model over the parameter ceiling.
    """
    from toolkit.builder import build_model
    from toolkit.spec import parse_spec

    p = Path(path)
    if p.is_dir() and not (p / INDEX).exists():
        p = find_checkpoint(p)
    ckpt = load_checkpoint(p, with_state=False)
    spec = parse_spec(ckpt.spec, source=f"{p} (embedded spec)")
    dense = bool(ckpt.meta.get("dense", False))
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated until they are checked
            planned = build_model(spec, seed=0, dense=dense).state_dict()
    except (NotImplementedError, RuntimeError):  # an op whose construction needs real data
        planned = None  # the spec checks' ceilings and load_state_dict(strict=True) still apply
    if planned is not None:
        check_weights_fit(p, {k: tuple(v.shape) for k, v in planned.items()}, ckpt.weights)
        del planned
    model = build_model(spec, seed=0, dense=dense)
    dtype = next((w.dtype for w in ckpt.weights.values() if w.is_floating_point()), torch.float32)
    model.to(dtype=dtype)
    try:
        model.load_state_dict(ckpt.weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise InputError(
            f"checkpoint {p}: weights do not fit the embedded spec: {' '.join(first[:3])}"
        ) from exc
    model.to(device).eval()
    return model, spec, ckpt.meta
