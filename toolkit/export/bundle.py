"""``rlhf bundle``: one archive a device without network installs and runs from.

Layout (``rlhf_runtime.bundle`` checks it on the device)::

    NAME.tar.gz
      NAME/README.txt     the commands to run on the device
      NAME/SHA256SUMS     sha256 of every other member (``sha256sum -c SHA256SUMS`` reads it too)
      NAME/export/        manifest.json, stage files with their .data files, the fused file,
                          tokenizer.json (what the manifest lists)
      NAME/wheels/        the rlhf_runtime wheel, numpy + onnxruntime (+ tokenizers for a text
                          export) and their dependencies, for the target Python and platform

A tar.gz rather than a zip: ``tar xzf`` is on every Linux board without Python or ``unzip``, and
Python's ``tarfile`` extracts it with the ``data`` filter (no absolute paths, links or devices). The
wheels inside are already compressed, so the format costs or saves little space either way.

The archive is assembled in a temporary directory and renamed into place (written atomically); its
own sha256 is returned (and printed by the command) so it can be compared after copying.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from rlhf_runtime.bundle import (
    EXPORT_DIR,
    README_NAME,
    SUMS_NAME,
    WHEELS_DIR,
    check_wheel,
    sha256_path,
    sums_text,
    verify_export,
)
from rlhf_runtime.manifest import read_manifest

from toolkit.errors import InputError
from toolkit.fsio import fsync_dir

RUNTIME_SOURCE = Path(__file__).resolve().parents[2] / "runtime"


def _pip(args: list[str], what: str, timeout: float = 600) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise InputError(
            f"{what}: pip did not finish in {timeout:.0f} s ({' '.join(cmd[3:6])} ...)"
        ) from None
    if proc.returncode != 0:
        tail = [ln.strip() for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        last = tail[-1] if tail else f"exit code {proc.returncode}"
        raise InputError(f"{what}: {last}")


def _setuptools_builds_wheels() -> bool:
    try:
        major, minor = (int(p) for p in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (70, 1)


def build_runtime_wheel(dest: Path, source: Path = RUNTIME_SOURCE) -> Path:
    """``pip wheel --no-deps`` of the runtime distribution (``runtime/`` of this repository) into ``dest``.

    Raises:
        InputError: no runtime source beside the toolkit (an installed toolkit without the
            repository: pass a wheel built with ``pip wheel --no-deps ./runtime``), or pip failed.
    """
    if not (source / "pyproject.toml").is_file():
        raise InputError(
            f"{source}: no runtime source (runtime/pyproject.toml) beside this toolkit: build the wheel "
            "in a clone with `pip wheel --no-deps ./runtime` and pass it with --runtime-wheel FILE"
        )
    with tempfile.TemporaryDirectory(prefix="rlhf-wheel-") as tmp:
        # built from a copy: setuptools leaves build/ and *.egg-info in the source tree, and a stale
        # build/lib (a module since removed) would end up in the next wheel
        src = Path(tmp) / "src"
        shutil.copytree(
            source, src, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", "*.pyc")
        )
        source = src
        # setuptools of this environment when it can build wheels alone (>= 70.1: no `wheel`
        # package needed), so no index is needed; else (venvs of Python >= 3.12 come without it)
        # pip's isolated build fetches setuptools from the index
        isolation = ["--no-build-isolation"] if _setuptools_builds_wheels() else []
        _pip(
            ["wheel", "--no-deps", *isolation, "-q", "-w", tmp, str(source)],
            "building the runtime wheel",
        )
        built = sorted(Path(tmp).glob("rlhf_runtime-*.whl"))
        if not built:
            raise InputError(f"building the runtime wheel: pip wrote no rlhf_runtime wheel in {tmp}")
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(built[-1], dest / built[-1].name))


def requirements(text: bool) -> list[str]:
    """numpy and onnxruntime (and tokenizers for a text export) at the versions installed here, the
    versions the export was checked with."""
    names = ["numpy", "onnxruntime"] + (["tokenizers"] if text else [])
    out = []
    for name in names:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def download_wheels(
    dest: Path,
    reqs: list[str],
    *,
    python_version: str | None = None,
    platform: str | None = None,
    find_links: Path | None = None,
) -> None:
    """``pip download --only-binary=:all:`` of ``reqs`` and their dependencies into ``dest``.

    Raises:
        InputError: pip could not get them (no network and no local copy, no wheel for the target).
    """
    args = ["download", "--only-binary=:all:", "-q", "-d", str(dest), *reqs]
    if python_version:
        args += ["--python-version", python_version, "--implementation", "cp"]
    if platform:
        args += ["--platform", platform]
    if find_links is not None:
        args += ["--no-index", "--find-links", str(find_links)]
    target = f"Python {python_version or '.'.join(map(str, sys.version_info[:2]))}" + (
        f" on {platform}" if platform else " on this platform"
    )
    try:
        _pip(args, f"downloading the wheels of {', '.join(reqs)} for {target}")
    except InputError as exc:
        raise InputError(
            f"{exc} (a bundle needs them as wheels: run this where the package index is reachable, or "
            "pass --find-links DIR with wheels for the target)"
        ) from None


def _readme(name: str, runtime_wheel: str, manifest_inputs: str, text: bool) -> str:
    run = (
        f"rlhf-run run {EXPORT_DIR} --text texts.txt"
        if text
        else f"rlhf-run run {EXPORT_DIR} --input x.npy -o y.npy"
    )
    return f"""{name}: an rlhf export with its runtime, for a device without network.

On the device (Python 3 with pip and venv; no torch needed):

    pip install --no-index --find-links {WHEELS_DIR} rlhf-runtime{"[text]" if text else ""}
    {run}

(inside a virtual environment: python3 -m venv .venv && . .venv/bin/activate first)

Inputs: {manifest_inputs}. x.npy holds one batch (the first axis is the batch), y.npy receives the
output (.npz for several). `rlhf-run bench {EXPORT_DIR}` times it; `rlhf-run --help` lists the options.

Check the bundle (checksums, wheels for this Python) before or after installing:

    PYTHONPATH={WHEELS_DIR}/{runtime_wheel} python3 -m rlhf_runtime verify .
    sha256sum -c {SUMS_NAME}
"""


def _copy_export(export_dir: Path, dest: Path) -> None:
    """Every file of the export directory (stages, manifest, tokenizer and model config files, all
    of which the manifest or other loaders may name); a link, or anything but a file or directory,
    is refused rather than followed."""
    for src in sorted(export_dir.rglob("*")):
        rel = src.relative_to(export_dir)
        if any(part.startswith(".") for part in rel.parts):
            continue  # temporary or hidden files (an interrupted write), not part of the export
        if src.is_symlink() or not (src.is_file() or src.is_dir()):
            raise InputError(
                f"{src}: expected plain files in the export directory, got a link or special file"
            )
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def write_bundle(
    export_dir: str | Path,
    out: str | Path,
    *,
    python_version: str | None = None,
    platform: str | None = None,
    find_links: str | Path | None = None,
    runtime_wheel: str | Path | None = None,
    overwrite: bool = False,
) -> str:
    """Write the bundle archive of ``export_dir`` to ``out`` (atomically); its sha256.

    Args:
        export_dir: an export directory (``rlhf export``); its files are checked against the manifest.
        out: the archive to write (``.tar.gz``); its stem names the directory inside.
        python_version, platform: the device's Python ("3.11") and pip platform tag
            ("manylinux2014_aarch64"); default this interpreter and machine.
        find_links: a directory of wheels to take numpy / onnxruntime from instead of the index.
        runtime_wheel: a prebuilt rlhf_runtime wheel (default: built from ``runtime/``).
        overwrite: replace an existing ``out``.

    Raises:
        InputError: a bad export (manifest, missing or altered file), an existing ``out``, an
            output name that is not .tar.gz, or wheels that cannot be had for the target.
    """
    export_dir, out = Path(export_dir), Path(out)
    if not out.name.endswith(".tar.gz"):
        raise InputError(f"-o {out}: expected a .tar.gz path")
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists: expected a new path, or pass --overwrite to replace it")
    manifest = read_manifest(export_dir)
    verify_export(export_dir, providers=False)  # sizes and sha256 of every file (the device checks providers)
    name = out.name.removesuffix(".tar.gz")
    text = manifest.raw.get("text")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-", dir=out.parent) as tmp:
        root = Path(tmp) / name
        _copy_export(export_dir, root / EXPORT_DIR)
        wheels = root / WHEELS_DIR
        wheels.mkdir(parents=True)
        if runtime_wheel is not None:
            rw = Path(runtime_wheel)
            if not rw.is_file() or not rw.name.startswith("rlhf_runtime-"):
                raise InputError(f"--runtime-wheel {rw}: expected an rlhf_runtime-*.whl file")
            wheel = Path(shutil.copy2(rw, wheels / rw.name))
        else:
            wheel = build_runtime_wheel(wheels)
        download_wheels(
            wheels,
            requirements(text is not None),
            python_version=python_version,
            platform=platform,
            find_links=Path(find_links) if find_links is not None else None,
        )
        if python_version is None and platform is None:
            for w in sorted(wheels.glob("*.whl")):
                check_wheel(w)  # what pip picked installs here (the default target)
        inputs = ", ".join(t.describe() for t in manifest.inputs)
        (root / README_NAME).write_text(_readme(name, wheel.name, inputs, text is not None), encoding="utf-8")
        (root / SUMS_NAME).write_text(sums_text(root), encoding="utf-8")
        archive = Path(tmp) / "bundle.tar.gz"  # beside ``out`` (same file system): renamed into place
        with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
            tar.add(root, arcname=name, recursive=True)
        with open(archive, "rb") as f:
            os.fsync(f.fileno())
        os.replace(archive, out)
        fsync_dir(out.parent)
    return sha256_path(out)


def unpack_bundle(archive: str | Path, dest: str | Path) -> Path:
    """Extract a bundle archive safely (tarfile's ``data`` filter) into ``dest``; the bundle directory."""
    archive, dest = Path(archive), Path(dest)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            names = {m.name.split("/")[0] for m in tar.getmembers()}
            if len(names) != 1:
                raise InputError(f"{archive}: expected one top-level directory, got {sorted(names)[:5]}")
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InputError(f"{archive}: not a readable .tar.gz bundle ({exc})") from None
    return dest / names.pop()
