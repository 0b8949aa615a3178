"""The exception for bad user input, shared by every layer: ``rlhf_runtime.errors.InputError``.

It is defined in the runtime distribution (``rlhf-runtime``, which the toolkit depends on) so the
device side raises the same class; this module re-exports it, so ``except toolkit.errors.InputError``
catches the runtime's errors and the ``rlhf`` command line turns them into exit code 2 as well.
Importing it loads neither numpy nor onnxruntime (``rlhf_runtime/__init__`` is lazy).
"""

from __future__ import annotations

from rlhf_runtime.errors import InputError

__all__ = ["InputError"]
