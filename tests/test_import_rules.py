"""The import rules of docs/architecture.md ("Import rules"), checked on every module's source (ast).

Each package of ``toolkit`` has a place in ``ORDER``; a module may import its own package and
the packages before it, never one after it. Lazy imports inside functions count the same. The
runtime is the foundation the device runs: besides itself it imports only ``toolkit.errors``, and
neither torch nor onnx nor transformers, nor the spec or the builder.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "toolkit"

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


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    pkg_parts = ["toolkit", *path.relative_to(ROOT).with_suffix("").parts][:-1]  # the containing package
    found = []
    for node in ast.walk(tree):
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
