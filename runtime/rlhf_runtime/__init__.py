"""rlhf-runtime: run an rlhf export directory with onnxruntime; numpy + onnxruntime + stdlib, never torch.

from rlhf_runtime import Executor          # also importable as toolkit.runtime
ex = Executor("export/", providers="auto", memory_budget=None)
outputs = ex.run({"x": x})        # dict name -> np.ndarray

The names below are imported on first use (PEP 562), so ``import rlhf_runtime.errors`` (which the
toolkit's ``toolkit.errors`` does) loads neither numpy nor onnxruntime, and ``rlhf-run`` pays for
onnxruntime only when it builds a session.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Executor": "rlhf_runtime.executor",
    "Manifest": "rlhf_runtime.manifest",
    "TensorInfo": "rlhf_runtime.manifest",
    "read_manifest": "rlhf_runtime.manifest",
    "safe_path": "rlhf_runtime.manifest",
    "sha256_file": "rlhf_runtime.manifest",
    "SessionConfig": "rlhf_runtime.session",
    "InputError": "rlhf_runtime.errors",
    "Generator": "rlhf_runtime.generate",
    "generate": "rlhf_runtime.generate",
}

__all__ = [
    "Executor",
    "Generator",
    "InputError",
    "Manifest",
    "SessionConfig",
    "TensorInfo",
    "generate",
    "read_manifest",
    "safe_path",
    "sha256_file",
]

if TYPE_CHECKING:
    from rlhf_runtime.errors import InputError
    from rlhf_runtime.executor import Executor
    from rlhf_runtime.generate import Generator, generate
    from rlhf_runtime.manifest import Manifest, TensorInfo, read_manifest, safe_path, sha256_file
    from rlhf_runtime.session import SessionConfig


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rlhf_runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
