"""``toolkit.runtime`` is the runtime distribution ``rlhf_runtime`` under its former name.

The executor, manifest checks, streaming, bench, text input and the device command ``rlhf-run``
live in ``runtime/rlhf_runtime/`` (distribution ``rlhf-runtime``: numpy + onnxruntime only), so a
device installs them without torch. Existing code keeps working: ``toolkit.runtime`` and every
``toolkit.runtime.<module>`` are the very module objects of ``rlhf_runtime`` (registered in
``sys.modules`` here, one copy of the code and of its classes), e.g.
``toolkit.runtime.executor.Executor is rlhf_runtime.executor.Executor``.

Every module of the package is aliased, found by listing it (a module added to
``runtime/rlhf_runtime/`` needs no change here); importing ``toolkit.runtime`` therefore imports
them all (onnxruntime included), which the toolkit did before as well.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import rlhf_runtime

for _info in pkgutil.iter_modules(rlhf_runtime.__path__):
    if _info.name.startswith("_"):  # __main__ runs the command line
        continue
    sys.modules[f"{__name__}.{_info.name}"] = importlib.import_module(f"rlhf_runtime.{_info.name}")
sys.modules[__name__] = rlhf_runtime
