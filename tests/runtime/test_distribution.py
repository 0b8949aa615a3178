"""The runtime distribution (rlhf-runtime): one copy of the code under two names, the device command
``rlhf-run``, offline bundles and their checks, and the wheel in a clean venv without torch.

The clean venv is built once per session (``--without-pip``, installed by this interpreter's pip
from the bundle's wheels with ``--no-index``: no network), about 10 s on the CI machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from rlhf_runtime.bundle import SUMS_NAME, sums_text
from rlhf_runtime.cli import main as rlhf_run

from toolkit.cli import main as rlhf
from toolkit.runtime import Executor

Fixture = tuple[Path, Any, dict[str, np.ndarray]]
ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    """Subprocess environment that finds the toolkit and the runtime in this checkout."""
    path = os.pathsep.join([str(ROOT), str(ROOT / "runtime"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def test_toolkit_runtime_is_rlhf_runtime() -> None:
    import rlhf_runtime
    import rlhf_runtime.executor
    import rlhf_runtime.manifest

    import toolkit.errors
    import toolkit.fsio
    import toolkit.runtime
    import toolkit.runtime.executor
    from toolkit.runtime.manifest import read_manifest

    assert toolkit.runtime is rlhf_runtime
    assert toolkit.runtime.executor is rlhf_runtime.executor
    assert sys.modules["toolkit.runtime.manifest"] is rlhf_runtime.manifest
    assert read_manifest is rlhf_runtime.manifest.read_manifest
    assert Executor is rlhf_runtime.Executor is rlhf_runtime.executor.Executor
    assert toolkit.errors.InputError is rlhf_runtime.errors.InputError is rlhf_runtime.InputError
    assert toolkit.fsio.atomic_write_bytes is rlhf_runtime.fsio.atomic_write_bytes
    for info in __import__("pkgutil").iter_modules(rlhf_runtime.__path__):  # every module, aliased
        if not info.name.startswith("_"):
            assert sys.modules[f"toolkit.runtime.{info.name}"] is sys.modules[f"rlhf_runtime.{info.name}"]


def test_importing_the_errors_loads_no_numpy_or_onnxruntime() -> None:
    code = (
        "import sys, toolkit.errors, rlhf_runtime.bundle, rlhf_runtime.manifest\n"
        "print(sorted(m for m in ('numpy', 'onnxruntime', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def _rlhf_run(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    code = rlhf_run([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_rlhf_run_matches_the_executor(
    default_export: Fixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _, sample = default_export
    want = Executor(out, providers="cpu").run(sample)["head"]
    np.save(tmp_path / "x.npy", sample["x"])
    code, text, err = _rlhf_run(capsys, "run", out, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert code == 0, err
    assert "wrote" in text and "resident" in text
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), want)
    # the toolkit's `rlhf run` is the same function: the same bytes
    res = CliRunner().invoke(
        rlhf, ["run", str(out), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "z.npy")]
    )
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "z.npy").tobytes() == np.load(tmp_path / "y.npy").tobytes()
    code, text, err = _rlhf_run(capsys, "bench", out, "--batch", "1", "--seconds", "0.02", "--json")
    assert code == 0, err
    assert {r["config"] for r in json.loads(text)["rows"]} == {"staged fp32", "fused fp32"}
    code, text, err = _rlhf_run(capsys, "bench", out, "--batch", "2", "--seconds", "0.02")
    assert code == 0 and text.splitlines()[0].split()[:2] == ["config", "batch"], err
    code, text, err = _rlhf_run(capsys, "verify", out)
    assert code == 0 and text.strip().endswith(f"ok: {out}"), err


def test_rlhf_run_user_errors_exit_2(
    export_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 10), np.float32))
    code, _, err = _rlhf_run(
        capsys, "run", export_copy, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy"
    )
    assert code == 2 and err.startswith("error: input 'x': wrong shape") and len(err.splitlines()) == 1
    code, _, err = _rlhf_run(capsys, "run", tmp_path, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert code == 2 and "no manifest.json" in err
    code, _, err = _rlhf_run(capsys, "verify", tmp_path)
    assert code == 2 and "expected an unpacked bundle" in err
    # an export written by a newer format version: one line saying to upgrade
    doc = json.loads((export_copy / "manifest.json").read_text())
    doc["version"] = 99
    (export_copy / "manifest.json").write_text(json.dumps(doc))
    code, _, err = _rlhf_run(capsys, "verify", export_copy)
    assert code == 2 and len(err.splitlines()) == 1
    assert "format version 99 is newer than this rlhf-runtime reads (2): upgrade rlhf-runtime" in err
    # an altered stage file
    doc["version"] = 2
    (export_copy / "manifest.json").write_text(json.dumps(doc))
    with open(export_copy / "stage_01.onnx", "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"\x00\x01\x02")
    code, _, err = _rlhf_run(capsys, "verify", export_copy)
    assert code == 2 and "stage_01.onnx: sha256 differs from manifest.json" in err


def test_manifest_asking_for_cuda_on_a_device_without_it(
    export_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    doc = json.loads((export_copy / "manifest.json").read_text())
    doc["providers"] = "cuda"
    (export_copy / "manifest.json").write_text(json.dumps(doc))
    np.save(tmp_path / "x.npy", np.zeros((2, 64), np.float32))
    code, _, err = _rlhf_run(
        capsys, "run", export_copy, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy"
    )
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "asks for CUDAExecutionProvider, which this onnxruntime" in err
    assert "install onnxruntime-gpu and the CUDA libraries on this device, or pass --providers cpu" in err
    code, _, err = _rlhf_run(capsys, "verify", export_copy)
    assert code == 2 and "asks for CUDAExecutionProvider" in err
    # --providers cpu overrides the manifest's request
    code, _, err = _rlhf_run(
        capsys,
        "run",
        export_copy,
        "--input",
        tmp_path / "x.npy",
        "-o",
        tmp_path / "y.npy",
        "--providers",
        "cpu",
    )
    assert code == 0, err


# -- bundles ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(default_export: Fixture, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`rlhf bundle` of the default export (built once: the runtime wheel and pip download)."""
    out = tmp_path_factory.mktemp("bundle") / "digits.tar.gz"
    res = CliRunner().invoke(rlhf, ["bundle", str(default_export[0]), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert f"wrote {out}" in res.output
    return out


@pytest.fixture
def unpacked(bundle: Path, tmp_path: Path) -> Path:
    from toolkit.export.bundle import unpack_bundle

    return unpack_bundle(bundle, tmp_path)


def test_bundle_layout_and_verify(
    unpacked: Path, bundle: Path, default_export: Fixture, capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib

    assert unpacked.name == "digits"
    names = sorted(p.relative_to(unpacked).as_posix() for p in unpacked.rglob("*") if p.is_file())
    for expected in (
        "README.txt",
        SUMS_NAME,
        "export/manifest.json",
        "export/stage_00.onnx",
        "export/fused.onnx",
    ):
        assert expected in names
    wheels = [n for n in names if n.startswith("wheels/")]
    assert any(n.startswith("wheels/rlhf_runtime-0.1.0-py3-none-any") for n in wheels)
    assert any(n.startswith("wheels/numpy-") for n in wheels) and any(
        n.startswith("wheels/onnxruntime-") for n in wheels
    )
    assert not any("torch" in n for n in wheels)
    for f in default_export[0].iterdir():  # the export's very bytes
        assert (unpacked / "export" / f.name).read_bytes() == f.read_bytes()
    # SHA256SUMS covers every other member, with the digests of their bytes
    sums = dict(reversed(line.split("  ", 1)) for line in (unpacked / SUMS_NAME).read_text().splitlines())
    assert sorted(sums) == [n for n in names if n != SUMS_NAME]
    for rel, digest in sums.items():
        assert hashlib.sha256((unpacked / rel).read_bytes()).hexdigest() == digest
    readme = (unpacked / "README.txt").read_text()
    assert "pip install --no-index --find-links wheels rlhf-runtime" in readme
    assert "rlhf-run run export --input x.npy -o y.npy" in readme
    code, text, err = _rlhf_run(capsys, "verify", unpacked)
    assert code == 0, err
    assert text.splitlines()[-1] == f"ok: {unpacked}"


def _resum(root: Path) -> None:
    (root / SUMS_NAME).write_text(sums_text(root))


def test_bundle_bad_input_exit_2(unpacked: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def verify() -> str:
        code, _, err = _rlhf_run(capsys, "verify", unpacked)
        assert code == 2 and len(err.splitlines()) == 1, err
        return err

    stage = unpacked / "export" / "stage_00.onnx"
    data = stage.read_bytes()
    stage.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit
    assert (
        "stage_00.onnx: sha256 differs from SHA256SUMS (altered or corrupted): copy the bundle again"
        in verify()
    )
    stage.unlink()
    assert "stage_00.onnx: listed in SHA256SUMS but missing: the bundle is incomplete" in verify()
    stage.write_bytes(data)
    (unpacked / "export" / "extra.onnx").write_bytes(b"x")
    assert "extra.onnx: not listed in SHA256SUMS" in verify()
    (unpacked / "export" / "extra.onnx").unlink()
    # a wheel for another Python (the checksums rewritten too, so only its tags are wrong)
    runtime_wheel = next((unpacked / "wheels").glob("rlhf_runtime-*.whl"))
    numpy_wheel = next((unpacked / "wheels").glob("numpy-*.whl"))
    other = "cp39" if sys.version_info[:2] != (3, 9) else "cp38"
    parts = numpy_wheel.name.split("-")
    numpy_wheel.rename(numpy_wheel.with_name("-".join([parts[0], parts[1], other, other, *parts[4:]])))
    _resum(unpacked)
    err = verify()
    assert (
        f"built for {other}-{other}-" in err
        and f"this Python is cp{sys.version_info[0]}{sys.version_info[1]}" in err
    )
    assert "rebuild the bundle for this device" in err
    shutil.rmtree(unpacked / "wheels")
    (unpacked / "wheels").mkdir()
    shutil.copy2(ROOT / "pyproject.toml", unpacked / "wheels" / "pyproject.toml")
    _resum(unpacked)
    assert "no rlhf_runtime wheel" in verify()
    del runtime_wheel


@pytest.mark.parametrize("with_packaging", [True, False])
def test_wheel_tags_against_this_interpreter(with_packaging: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """packaging.tags when importable, else the small standard-library check: same verdicts."""
    import platform

    from rlhf_runtime import bundle as b
    from rlhf_runtime.errors import InputError

    if not with_packaging:
        monkeypatch.setattr(b, "_interpreter_tags", lambda: None)
    here = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    machine = platform.machine()
    for ok in (
        "rlhf_runtime-0.1.0-py3-none-any.whl",
        f"numpy-2.4.6-{here}-{here}-manylinux_2_27_{machine}.manylinux_2_28_{machine}.whl",
        f"protobuf-7.36.2-cp310-abi3-manylinux2014_{machine}.whl",
    ):
        b.check_wheel(Path(ok))
    other_machine = "aarch64" if machine != "aarch64" else "x86_64"
    for bad, why in (
        (f"numpy-2.4.6-cp39-cp39-manylinux_2_28_{machine}.whl", "built for cp39-cp39-"),
        (f"numpy-2.4.6-{here}-{here}-manylinux_2_28_{other_machine}.whl", other_machine),
        (f"numpy-2.4.6-{here}-{here}-win_amd64.whl", "win_amd64"),
    ):
        with pytest.raises(InputError, match=why):
            b.check_wheel(Path(bad))
    with pytest.raises(InputError, match="expected a wheel name"):
        b.check_wheel(Path("numpy.whl"))


def test_bundle_command_user_errors(default_export: Fixture, bundle: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(rlhf, ["bundle", str(default_export[0]), "-o", str(tmp_path / "b.zip")])
    assert res.exit_code == 2 and "expected a .tar.gz path" in res.output
    res = CliRunner().invoke(rlhf, ["bundle", str(default_export[0]), "-o", str(bundle)])
    assert res.exit_code == 2 and "exists" in res.output and "--overwrite" in res.output
    res = CliRunner().invoke(
        rlhf,
        ["bundle", str(default_export[0]), "-o", str(tmp_path / "b.tar.gz"), "--find-links", str(tmp_path)],
    )
    assert res.exit_code == 2 and "downloading the wheels of numpy" in res.output
    assert "--find-links DIR" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "b.tar.gz").exists() and not list(tmp_path.glob(".b.tar.gz*"))


@pytest.mark.slow
def test_export_with_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from toolkit.builder import build_model
    from toolkit.checkpoint import save_checkpoint
    from toolkit.export.bundle import unpack_bundle
    from toolkit.spec import load_spec

    spec = load_spec(ROOT / "graphs" / "default.yaml")
    model = build_model(spec, seed=3)
    ckpt = save_checkpoint(
        tmp_path / "ckpts", "best-00000001", model, model.to_spec().resolved(), {"step": 1}
    )
    out, archive = tmp_path / "export", tmp_path / "b.tar.gz"
    res = CliRunner().invoke(
        rlhf, ["export", str(ckpt), "-o", str(out), "--samples", "16", "--bundle", "x.zip"]
    )
    assert res.exit_code == 2 and "--bundle x.zip: expected a .tar.gz path" in res.output
    assert not out.exists()  # refused before exporting
    res = CliRunner().invoke(
        rlhf, ["export", str(ckpt), "-o", str(out), "--samples", "16", "--bundle", str(archive)]
    )
    assert res.exit_code == 0, res.output
    assert f"wrote {archive}" in res.output and "sha256" in res.output
    root = unpack_bundle(archive, tmp_path / "unpacked")
    for f in out.iterdir():
        assert (root / "export" / f.name).read_bytes() == f.read_bytes()
    code, text, err = _rlhf_run(capsys, "verify", root)
    assert code == 0 and text.strip().endswith(f"ok: {root}"), err


# -- the wheel in a clean venv ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clean_venv(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(python of a fresh venv holding only the bundle's wheels: rlhf-runtime, numpy, onnxruntime
    and their dependencies; the unpacked bundle), installed as the README says, with --no-index."""
    from toolkit.export.bundle import unpack_bundle

    work = tmp_path_factory.mktemp("venv")
    root = unpack_bundle(bundle, work)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-index", "--find-links",
         str(root / "wheels"), "rlhf-runtime"],
        check=True, timeout=300, env=env, cwd=work,
    )  # fmt: skip
    return py, root


def test_the_wheel_runs_in_a_clean_venv_bit_for_bit(
    clean_venv: tuple[Path, Path], default_export: Fixture, tmp_path: Path
) -> None:
    py, root = clean_venv
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    probe = (
        "import importlib.util as u, json; "
        "print(json.dumps({m: u.find_spec(m) is not None for m in ('torch', 'toolkit', 'onnx', 'rlhf_runtime')}))"
    )
    found = subprocess.run(
        [py, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )
    assert json.loads(found.stdout) == {"torch": False, "toolkit": False, "onnx": False, "rlhf_runtime": True}
    _, _, sample = default_export
    x = np.ascontiguousarray(sample["x"])
    np.save(tmp_path / "x.npy", x)
    rlhf_run_exe = py.parent / "rlhf-run"
    for extra, name in (([], "staged"), (["--fused"], "fused"), (["--memory-budget", "60000"], "streamed")):
        out = tmp_path / f"{name}.npy"
        res = subprocess.run(
            [rlhf_run_exe, "run", root / "export", "--input", tmp_path / "x.npy", "-o", out, *extra],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert ("streaming" in res.stdout) == (name == "streamed"), res.stdout
        want = Executor(default_export[0], providers="cpu", fused=name == "fused").run({"x": x})["head"]
        got = np.load(out)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes(), f"{name}: max abs {np.abs(got - want).max()}"
    res = subprocess.run(
        [rlhf_run_exe, "verify", root], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )
    assert res.returncode == 0 and res.stdout.strip().endswith(f"ok: {root}"), res.stderr
