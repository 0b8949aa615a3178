"""Offline bundles: check one on the device (standard library only: runs before anything is installed).

A bundle (written by ``rlhf bundle`` / ``rlhf export --bundle``) is one ``.tar.gz`` holding a
single directory::

    NAME/
      README.txt          the commands to run on the device
      SHA256SUMS          "<sha256>  <path>" for every other member (``sha256sum -c`` reads it too)
      export/             manifest.json, the stage files and their .data files, the fused file,
                          tokenizer.json if any
      wheels/             rlhf_runtime-*.whl, numpy, onnxruntime and their dependencies

``verify_bundle`` checks it: every listed file present with its checksum, nothing unlisted, every
wheel built for the running Python and platform (before pip would find out), and the export's
manifest readable by this runtime (format version) and, when onnxruntime is importable, its
requested providers present. This module imports no numpy and no onnxruntime at module level, so
``PYTHONPATH=wheels/rlhf_runtime-...whl python3 -m rlhf_runtime verify .`` runs from the bundle
itself before ``pip install``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import sys
import sysconfig
from pathlib import Path

from rlhf_runtime.errors import InputError

SUMS_NAME = "SHA256SUMS"
README_NAME = "README.txt"
EXPORT_DIR = "export"
WHEELS_DIR = "wheels"
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


def sha256_path(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sums_text(root: Path) -> str:
    """The SHA256SUMS text of every file under ``root`` (sorted, POSIX paths, SHA256SUMS excluded)."""
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != SUMS_NAME:
            lines.append(f"{sha256_path(path)}  {rel}\n")
    return "".join(lines)


def read_sums(root: Path) -> dict[str, str]:
    """path -> sha256 of a bundle's SHA256SUMS.

    Raises:
        InputError: no SHA256SUMS, a malformed line, or a path that leaves the bundle.
    """
    path = root / SUMS_NAME
    if not path.is_file():
        raise InputError(
            f"{path}: missing: expected a bundle directory written by `rlhf bundle` (tar xzf BUNDLE.tar.gz)"
        )
    sums: dict[str, str] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        m = _LINE.match(line)
        if not m:
            raise InputError(f"{path}:{i}: expected '<64 hex digits>  <path>', got {line[:80]!r}")
        rel = m.group(2)
        if rel.startswith("/") or ".." in rel.split("/") or "\\" in rel:
            raise InputError(f"{path}:{i}: path {rel!r} leaves the bundle: the bundle was altered")
        sums[rel] = m.group(1)
    return sums


# -- wheel tags -------------------------------------------------------------------------------------
def wheel_tags(filename: str) -> tuple[set[str], set[str], set[str]]:
    """(python tags, abi tags, platform tags) of a wheel file name (PEP 427; compressed sets split)."""
    parts = filename.removesuffix(".whl").split("-")
    if len(parts) not in (5, 6):
        raise InputError(f"{filename}: expected a wheel name NAME-VERSION[-BUILD]-PY-ABI-PLATFORM.whl")
    py, abi, plat = parts[-3:]
    return set(py.split(".")), set(abi.split(".")), set(plat.split("."))


def _interpreter_tags() -> set[str] | None:
    """Every tag triple this interpreter installs (``packaging.tags``), or None without packaging."""
    try:
        from packaging import tags
    except ImportError:
        return None
    return {str(t) for t in tags.sys_tags()}


def _this_python() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def _stdlib_compatible(py: set[str], abi: set[str], plat: set[str]) -> bool:
    """A small check without ``packaging``: Python version, ABI and the OS and machine of the platform."""
    major, minor = sys.version_info[:2]
    pys = {f"cp{major}{minor}", f"py{major}{minor}", f"py{major}"} | {f"cp{major}{m}" for m in range(minor)}
    if not py & pys:
        return False
    if not abi & {"none", "abi3", f"cp{major}{minor}", f"cp{major}{minor}{sys.abiflags}"}:
        return False
    if "any" in plat:
        return True
    machine = platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")
    system = sys.platform
    for p in plat:
        os_ok = (
            (system.startswith("linux") and ("linux" in p))
            or (system == "darwin" and p.startswith("macosx"))
            or (system == "win32" and p.startswith("win"))
        )
        mach_ok = machine in p or (
            system == "darwin" and ("universal2" in p or machine in p.replace("arm64", "aarch64"))
        )
        if os_ok and mach_ok:
            return True
    return False


def check_wheel(path: Path, supported: set[str] | None = None) -> None:
    """Refuse a wheel this interpreter cannot install (another Python, ABI or platform).

    Raises:
        InputError: one line naming the wheel, what it is built for and what this Python is.
    """
    py, abi, plat = wheel_tags(path.name)
    supported = _interpreter_tags() if supported is None else supported
    if supported is not None:
        ok = any(f"{p}-{a}-{pl}" in supported for p in py for a in abi for pl in plat)
    else:
        ok = _stdlib_compatible(py, abi, plat)
    if not ok:
        here = f"{_this_python()} on {sysconfig.get_platform().replace('-', '_').replace('.', '_')}"
        raise InputError(
            f"{path}: built for {'.'.join(sorted(py))}-{'.'.join(sorted(abi))}-{'.'.join(sorted(plat))}, "
            f"this Python is {here}: rebuild the bundle for this device "
            f"(rlhf bundle EXPORT --python-version {sys.version_info.major}.{sys.version_info.minor} "
            "--platform TAG), or run it with a matching Python"
        )


# -- the whole bundle -------------------------------------------------------------------------------
def verify_bundle(root: str | os.PathLike[str]) -> list[str]:
    """Check a bundle directory; the lines that describe it.

    Raises:
        InputError: the first problem found (missing, altered or unlisted file, a wheel for another
            Python or platform, an export too new for this runtime, a provider this device lacks).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"bundle directory not found: {root} (unpack it first: tar xzf BUNDLE.tar.gz)"
        )
    sums = read_sums(root)
    for rel, digest in sums.items():
        path = root / rel
        if not path.is_file():
            raise InputError(
                f"{path}: listed in {SUMS_NAME} but missing: the bundle is incomplete, copy it again"
            )
        if sha256_path(path) != digest:
            raise InputError(
                f"{path}: sha256 differs from {SUMS_NAME} (altered or corrupted): copy the bundle again"
            )
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != SUMS_NAME and rel not in sums:
            raise InputError(f"{path}: not listed in {SUMS_NAME}: remove it, or rebuild the bundle")
    wheels = sorted((root / WHEELS_DIR).glob("*.whl"))
    if not any(w.name.startswith("rlhf_runtime-") for w in wheels):
        raise InputError(
            f"{root / WHEELS_DIR}: no rlhf_runtime wheel: expected a bundle written by `rlhf bundle`"
        )
    supported = _interpreter_tags()
    for w in wheels:
        check_wheel(w, supported)
    lines = [f"{len(sums)} files match {SUMS_NAME}; {len(wheels)} wheels install on {_this_python()}"]
    lines += verify_export(root / EXPORT_DIR, hashes=False)
    return lines


def verify_export(
    export_dir: str | os.PathLike[str], *, hashes: bool = True, providers: bool = True
) -> list[str]:
    """Check an export directory: manifest (format version), every file's size and sha256
    (``hashes``; a stage's external-data file too), the tokenizer's, and the requested providers (``providers``) when onnxruntime is
    importable."""
    from rlhf_runtime.manifest import read_manifest, safe_path

    export_dir = Path(export_dir)
    m = read_manifest(export_dir)
    entries = [e for st in m.stages for e in st.files.values()] + list(m.fused.values())
    entries += [e.data for e in entries if e.data is not None]  # external-data files (format version 2)
    if hashes:
        for e in entries:
            path = safe_path(export_dir, e.file)
            if not path.is_file():
                raise InputError(f"{path}: listed in manifest.json but missing: copy the export again")
            if path.stat().st_size != e.bytes or sha256_path(path) != e.sha256:
                raise InputError(
                    f"{path}: sha256 differs from manifest.json (altered or corrupted): copy the export again"
                )
        text = m.raw.get("text")
        if isinstance(text, dict) and isinstance(text.get("tokenizer"), str):
            tok = safe_path(export_dir, text["tokenizer"])
            if not tok.is_file() or sha256_path(tok) != text.get("sha256"):
                raise InputError(
                    f"{tok}: missing or its sha256 differs from manifest.json: copy the export again"
                )
    line = f"export {m.name or export_dir.name}: {len(m.stages)} stages, variants {m.variants()}"
    if not providers:
        return [line]
    try:
        import onnxruntime  # noqa: F401  (only to know whether the provider check can run)
    except ImportError:
        return [line, "providers not checked: onnxruntime is not installed yet"]
    from rlhf_runtime.session import manifest_providers

    asked = manifest_providers(m.raw, str(export_dir / "manifest.json"))
    return [line + (f", providers {asked}" if asked else "")]
