"""The import rules of docs/architecture.md ("Import rules"), checked on every module's source (ast).

Each package of ``toolkit`` has a place in ``ORDER``; a module may import its own package and
the packages before it, never one after it. Lazy imports inside functions count the same. The
runtime is the foundation the device runs: besides itself it imports only ``toolkit.errors``, and
neither torch nor onnx nor transformers, nor the spec or the builder.

The runtime's code is the separate distribution ``rlhf-runtime`` (``runtime/rlhf_runtime/``, which
``toolkit.runtime`` re-exports): it imports nothing from ``toolkit`` at all, only numpy, onnxruntime
and the standard library at module level, and its optional dependencies (tokenizers, pyyaml, ray)
inside the functions that need them, so ``pip install rlhf-runtime`` alone runs every export.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "toolkit"
RUNTIME_ROOT = Path(__file__).resolve().parents[1] / "runtime" / "rlhf_runtime"
RUNTIME_TOP_LEVEL = {"numpy", "onnxruntime", "rlhf_runtime"}  # third-party allowed at module level
# the extras text / yaml / cluster, and packaging (used when present): inside functions only
RUNTIME_LAZY = {"tokenizers", "yaml", "ray", "packaging"}

ORDER = [
    "errors",  # the InputError type; imports nothing
    "limits",  # named ceilings (toolkit/limits.py, where present); stdlib + toolkit.errors
    "fsio",  # atomic writes; stdlib + toolkit.errors
    "runtime",  # manifest format + onnxruntime executor; numpy + onnxruntime (+ toolkit.errors)
    "layers",
    "spec",
    "builder",
    "optim",
    "data",
    "checkpoint",
    "checkpoint_stream",
    "export",  # needs a model, not the training loop; writes the manifest format runtime defines
    "hf_import",  # rlhf import: a Hugging Face BERT directory -> spec + checkpoint
    "planner",  # placement planner: pure algorithm modules; measure.py drives builder/export/runtime
    "factorize",
    "train",  # train/deploy.py (`rlhf train --export`) drives export and runtime from above
    "cli",
    "__main__",
]

ONLY = {  # packages whose allowed toolkit imports are narrower than "everything before"
    "errors": set(),
    "limits": {"errors"},
    "fsio": {"errors"},
    "runtime": {"errors", "fsio"},
}

FORBIDDEN_THIRD_PARTY = {
    "errors": {"torch", "onnx", "onnxruntime", "numpy", "transformers"},
    "fsio": {"torch", "onnx", "onnxruntime", "numpy", "transformers"},
    "runtime": {"torch", "onnx", "transformers", "safetensors", "optimum"},
}


def _package(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py") if rel.parts[0] != "__init__.py" else "__init__"


def _imports(path: Path, root: Path | None = None, top_level: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved
    (``top_level``: only the imports run when the module is imported, not those inside functions)."""
    root = root or ROOT
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    pkg_parts = [root.name, *path.relative_to(root).with_suffix("").parts][:-1]  # the containing package
    found = []
    nodes = _module_level(tree) if top_level else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


def _module_level(tree: ast.Module) -> list[ast.AST]:
    """The statements run at import time: the module body and the bodies of its if/try blocks
    (``if TYPE_CHECKING:`` blocks excluded), not functions or classes."""
    out: list[ast.AST] = []
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "finalbody", [])
            todo += [s for h in getattr(node, "handlers", []) for s in h.body]
        out.append(node)
    return out


def runtime_violations() -> list[str]:
    """Every import of the runtime distribution that breaks its rules, as ``file:line: what``."""
    import sys

    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    problems = []
    for path in sorted(RUNTIME_ROOT.rglob("*.py")):
        where = f"runtime/{path.relative_to(RUNTIME_ROOT.parent)}"
        for line, module in _imports(path, RUNTIME_ROOT):
            top = module.split(".")[0]
            if top not in stdlib | RUNTIME_TOP_LEVEL | RUNTIME_LAZY:
                problems.append(f"{where}:{line}: rlhf_runtime imports {module}, which it must not depend on")
        for line, module in _imports(path, RUNTIME_ROOT, top_level=True):
            if module.split(".")[0] in RUNTIME_LAZY:
                problems.append(
                    f"{where}:{line}: rlhf_runtime imports the optional {module} at module level "
                    "(import it inside the function that needs it)"
                )
    return problems


def violations() -> list[str]:
    """Every import that breaks the rules, as ``file:line: what``."""
    problems = []
    for path in sorted(ROOT.rglob("*.py")):
        pkg = _package(path)
        if pkg == "__init__":
            continue  # toolkit/__init__.py: checked below to import nothing heavy
        assert pkg in ORDER, f"{path}: package {pkg!r} has no place in ORDER: add it to the rules"
        allowed = ONLY.get(pkg, set(ORDER[: ORDER.index(pkg)])) | {pkg}
        for line, module in _imports(path):
            parts = module.split(".")
            where = f"{path.relative_to(ROOT.parent)}:{line}"
            if parts[0] == "toolkit" and len(parts) > 1 and parts[1] not in allowed:
                problems.append(f"{where}: {pkg} imports {module} (allowed: {sorted(allowed)})")
            if parts[0] in FORBIDDEN_THIRD_PARTY.get(pkg, set()):
                problems.append(f"{where}: {pkg} imports {module}, which it must not depend on")
    return problems


def test_every_import_follows_the_rules() -> None:
    assert violations() == []


def test_the_runtime_distribution_imports_only_its_dependencies() -> None:
    assert runtime_violations() == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from toolkit.errors import InputError\n", "rlhf_runtime imports toolkit.errors"),
        ("import torch\n", "rlhf_runtime imports torch"),
        ("import click\n", "rlhf_runtime imports click"),
        ("import yaml\n", "the optional yaml at module level"),
        ("try:\n    import tokenizers\nexcept ImportError:\n    pass\n", "the optional tokenizers"),
    ],
)
def test_the_runtime_checker_catches_a_wrong_import(
    source: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "rlhf_runtime"
    fake.mkdir()
    (fake / "bad.py").write_text(source)
    (fake / "good.py").write_text("import json\nimport numpy as np\n\n\ndef f():\n    import yaml\n")
    monkeypatch.setitem(globals(), "RUNTIME_ROOT", fake)
    found = runtime_violations()
    assert len(found) == 1 and expected in found[0], found


def test_toolkit_init_imports_nothing_heavy() -> None:
    modules = {m.split(".")[0] for _, m in _imports(ROOT / "__init__.py")}
    assert not modules & {"torch", "onnx", "onnxruntime", "transformers"}


@pytest.mark.parametrize(
    ("pkg", "source", "expected"),
    [
        ("runtime", "import torch\n", "runtime imports torch"),
        ("runtime", "from toolkit.spec import load_spec\n", "runtime imports toolkit.spec"),
        ("runtime", "from toolkit.builder import build_model\n", "runtime imports toolkit.builder"),
        ("runtime", "from toolkit.limits import limit\n", "runtime imports toolkit.limits"),
        ("export", "from toolkit.train.deploy import export_and_check\n", "export imports toolkit.train"),
        ("builder", "from ..checkpoint import load_model\n", "builder imports toolkit.checkpoint"),
    ],
)
def test_the_checker_catches_a_wrong_import(
    pkg: str, source: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "toolkit"
    (fake / pkg).mkdir(parents=True)
    (fake / pkg / "bad.py").write_text(source)
    monkeypatch.setitem(globals(), "ROOT", fake)
    found = violations()
    assert len(found) == 1 and expected in found[0], found
