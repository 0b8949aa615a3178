"""export_model: one ONNX file per stage + fused.onnx + manifest.json, checked, written atomically."""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from toolkit.errors import InputError
from toolkit.export import quantize as quant
from toolkit.export.manifest import build_manifest, file_entry, format_version, tensor_info
from toolkit.export.onnx_io import DEFAULT_OPSET, check_model, compact, export_module, to_external_data
from toolkit.export.parity import DEFAULT_ATOL, DEFAULT_RTOL, compare, cpu_session, run_onnx
from toolkit.fsio import replace_dir, write_synced

TRACE_BATCH = 8
CALIB_BATCH = 64


def _stage_file(i: int, variant: str) -> str:
    return f"stage_{i:02d}.onnx" if variant == "fp32" else f"stage_{i:02d}.{variant}.onnx"


def _fused_file(variant: str) -> str:
    return "fused.onnx" if variant == "fp32" else f"fused.{variant}.onnx"


def _check_sample(model: Any, sample: Mapping[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    if not isinstance(sample, Mapping):
        raise TypeError(f"{what}: expected a dict input name -> numpy array, got {type(sample).__name__}")
    names = list(model.input_names)
    unknown = [k for k in sample if k not in names]
    missing = [k for k in names if k not in sample]
    if unknown or missing:
        raise InputError(f"{what}: expected arrays for inputs {names}, got {sorted(sample)}")
    out = {}
    batches = set()
    for k in names:
        v = sample[k]
        if not isinstance(v, np.ndarray) or v.ndim == 0:
            raise TypeError(
                f"{what}[{k!r}]: expected a numpy array with a batch axis, got {type(v).__name__}"
            )
        batches.add(v.shape[0])
        out[k] = np.ascontiguousarray(v)
    if len(batches) != 1 or 0 in batches:
        raise InputError(f"{what}: expected one non-zero batch size for all inputs, got {sorted(batches)}")
    return out


def _model_name(model: Any) -> str:
    spec_name = getattr(getattr(model, "spec", None), "name", None)
    return str(spec_name or getattr(model, "name", None) or type(model).__name__)


def _sequence(model: Any) -> tuple[set[str], int | None]:
    """Tensors with a dynamic sequence axis (spec-built transformer models) and the longest length."""
    spec = getattr(model, "spec", None)
    if spec is None or not hasattr(spec, "analysis"):
        return set(), None
    from toolkit.spec.sequence import sequence_tensors

    seq = sequence_tensors(spec)
    lengths = [spec.inputs[k].shape[0] for k in spec.inputs if k in seq]
    return seq, (max(lengths) if lengths else None)


def _trace_args(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, ...]:
    """At most TRACE_BATCH rows, at least 2 (torch.export specializes a batch of 1)."""
    out = []
    for a in arrays:
        t = torch.from_numpy(np.ascontiguousarray(a[:TRACE_BATCH]))
        if t.shape[0] == 1:
            t = torch.cat([t, t])
        out.append(t)
    return tuple(out)


def _to_numpy(out: Any) -> list[np.ndarray]:
    seq = out if isinstance(out, (tuple, list)) else (out,)
    return [t.detach().cpu().numpy() for t in seq]


def _torch_chain(model: Any, inputs: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Per stage, all tensors known after it runs (graph inputs + every stage output so far)."""
    env = {k: torch.from_numpy(v) for k, v in inputs.items()}
    envs = []
    with torch.no_grad():
        for stage in model.stages:
            outs = stage(*[env[n] for n in stage.input_names])
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)
            env.update(zip(stage.output_names, outs))
            envs.append({k: v.detach().numpy() for k, v in env.items()})
    return envs


def _chain_onnx(
    sessions: Sequence[Any],
    io: Sequence[tuple[list[str], list[str]]],
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str],
) -> list[np.ndarray]:
    env = dict(inputs)
    for sess, (ins, outs) in zip(sessions, io):
        env.update(zip(outs, run_onnx(sess, {n: env[n] for n in ins}, outs)))
    return [env[n] for n in outputs]


def _optimize(proto_bytes: bytes, tmp: Path, name: str) -> bytes:
    """onnxruntime offline optimization at ORT_ENABLE_BASIC: provider-independent rewrites only
    (constant folding, redundant node removal), so the file stays portable to any execution provider."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp / f".{name}.opt")
    so.log_severity_level = 3
    ort.InferenceSession(proto_bytes, sess_options=so, providers=["CPUExecutionProvider"])
    path = tmp / f".{name}.opt"
    data = path.read_bytes()
    path.unlink()
    return data


def _write(tmp: Path, name: str, data: bytes) -> dict[str, Any]:
    write_synced(tmp / name, data)
    return file_entry(name, data)


EXTERNAL_MIN_FILE_BYTES = 1 << 20
"""A stage file of at least this many bytes gets its weights in an external-data file (by default):
below it, memory-mapping saves little and each tensor's page alignment in the data file would
only grow the export (the 19k-parameter digits MLP: int8 files 0.31 of fp32 instead of 0.30)."""


def _externalize_stages(tmp: Path, manifest: dict[str, Any], external_data: bool | None) -> None:
    """Each stage file (each variant) keeps its graph; its weights move to ``<file>.data`` beside it
    (``onnx_io.to_external_data``), listed and hashed in the manifest entry's ``data`` (format
    version 2): for every file when ``external_data`` is True, none when False, and by default for
    files of at least ``EXTERNAL_MIN_FILE_BYTES``. onnxruntime memory-maps such a file when the
    runtime loads a stage by path (streaming), so a stage costs the pages its kernels read: an
    embedding table only the rows of a run's tokens. Done last, on the files as written (after the
    text layout renamed tensors in them). The fused file stays self-contained: it is what optimum
    opens (``model.onnx``)."""
    for stage in manifest["stages"]:
        for variant, entry in stage["files"].items():
            name = entry["file"]
            if external_data is False or (external_data is None and entry["bytes"] < EXTERNAL_MIN_FILE_BYTES):
                continue
            data_name = f"{name}.data"
            model, blob, gathered = to_external_data((tmp / name).read_bytes(), data_name)
            if not blob:
                continue
            write_synced(tmp / data_name, blob)
            write_synced(tmp / name, model)
            stage["files"][variant] = {
                **file_entry(name, model),
                "data": {**file_entry(data_name, blob), "gathered": gathered},
            }
    manifest["version"] = format_version(manifest["stages"])


def _finalize(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished temp directory into place; an existing export is swapped out, then removed."""
    if out.exists() and not overwrite:
        raise InputError(
            f"output directory {out} exists: expected a new path, or pass overwrite=True (--overwrite)"
        )
    replace_dir(tmp, out)


def export_model(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    sample: Mapping[str, np.ndarray],
    opset: int = DEFAULT_OPSET,
    quantize: str | None = None,
    calibration: Mapping[str, np.ndarray] | None = None,
    targets: np.ndarray | None = None,
    optimize: bool = False,
    overwrite: bool = False,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    name: str | None = None,
    quant_candidates: Sequence[quant.QuantSetting] = quant.CANDIDATES,
    source: str | None = None,
    selection: Mapping[str, np.ndarray] | None = None,
    selection_targets: np.ndarray | None = None,
    text: Mapping[str, Any] | None = None,
    quant_options: Mapping[str, Any] | None = None,
    external_data: bool | None = None,
) -> dict[str, Any]:
    """Export a staged model: one ONNX file per stage, fused.onnx (model.onnx for text), manifest.json.

    A stage file of 1 MiB or more (``external_data=None``; True: every stage file, False: none)
    keeps its weights (every initializer of 1 KiB or more) in ``stage_NN.onnx.data`` beside it, as
    ONNX external data (manifest format version 2: the data file is listed and hashed with its stage
    file); smaller files and the fused file are self-contained.

    Every file is checked (onnx.checker, strict shape inference) and run with onnxruntime on
    ``sample``; the errors against torch are recorded per stage, for the fused file and end to end
    (stages chained in onnxruntime vs the torch model). Everything is written into a temporary
    directory beside ``out_dir`` and renamed into place at the end, so a failure leaves no
    directory that looks like a valid export.

    Args:
        model: a StagedModel (``model.stages`` with ``input_names``/``output_names``; ``model.input_names``,
            ``model.output_names``); moved to a CPU float copy for export when needed.
        out_dir: target directory.
        sample: real input samples, name -> array with the batch axis first (parity is measured on them).
        opset: ONNX opset (>= 18).
        quantize: None or "int8": also write ``*.int8.onnx`` files (settings chosen by measured accuracy).
        calibration: training inputs for static quantization (defaults to ``sample``).
        targets: class labels of ``sample``; with them the int8 report gives accuracy, else only errors vs fp32.
        optimize: apply onnxruntime's offline basic graph optimization to every file.
        overwrite: replace an existing ``out_dir``.
        atol, rtol: parity tolerance, ``max|ort - torch| <= atol + rtol * max|torch|`` per output.
        name: model name for the manifest (default: ``model.name`` or the class name).
        quant_candidates: int8 settings to measure (default: toolkit.export.quantize.CANDIDATES).
        source: where the model came from (run dir or checkpoint), recorded for `rlhf bench`.
        selection: inputs the int8 setting is *chosen* on (a validation split), with
            ``selection_targets`` its labels; ``sample``/``targets`` (the test split) then only
            report the chosen setting. None: chosen on ``sample`` itself (the report says so).
        text: a text model's tokenizer metadata (a checkpoint's ``meta["text"]``, see
            toolkit.export.text): ``tokenizer.json`` is written beside the ONNX files, the
            manifest gets a ``text`` entry, and the export is also laid out for optimum /
            transformers (fused file as ``model.onnx``, ``config.json``, tokenizer files).
        quant_options: keyword arguments of ``quantize.choose_and_quantize`` (``size_limit``,
            ``min_cosine``, ``mixed``); a text model's padded positions are left out of the scores.
        external_data: stage weights in ``<file>.data`` beside each stage file: None (default)
            for files of at least ``EXTERNAL_MIN_FILE_BYTES`` (1 MiB), True for every file, False never.

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).

    Raises:
        ValueError: bad arguments, ``out_dir`` exists without ``overwrite``, or a check or parity failed.
        TypeError: ``sample`` is not a dict of numpy arrays.
    """
    staged: Any = model
    out = Path(out_dir)
    if quantize not in (None, "int8"):
        raise InputError(f"quantize: expected None or 'int8', got {quantize!r}")
    if not hasattr(staged, "stages") or not len(staged.stages):
        raise TypeError(f"model: expected a staged model with .stages, got {type(model).__name__}")
    if out.exists() and not overwrite:
        raise InputError(
            f"output directory {out} exists: expected a new path, or pass overwrite=True (--overwrite)"
        )
    sample = _check_sample(model, sample, "sample")
    calib = _check_sample(model, calibration, "calibration") if calibration is not None else sample
    select = _check_sample(model, selection, "selection") if selection is not None else None
    qopts = dict(quant_options or {})
    if text is not None and text.get("attention_mask") in sample:  # padding: not part of any result
        m = str(text["attention_mask"])
        qopts.setdefault("masks", (sample[m], select[m] if select is not None else None))
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).cpu()
    model.eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        manifest = _export_into(
            model,
            tmp,
            sample,
            calib,
            targets,
            opset,
            quantize,
            optimize,
            atol,
            rtol,
            name or _model_name(model),
            quant_candidates,
            (select, selection_targets) if select is not None else None,
            qopts,
        )
        manifest["source"] = source
        from toolkit.export.kv_cache import export_kv_cache

        names = list(staged.input_names)
        causal = export_kv_cache(model, tmp, sample[names[0]], opset, atol, rtol) if len(names) == 1 else None
        if causal is not None:  # a causal LM: key/value-cache stage files for `rlhf generate`
            manifest["causal_lm"] = causal
        if text is not None:
            from toolkit.export.text import check_text_meta, write_text_export

            check_text_meta(text, list(staged.input_names), "text")
            write_text_export(tmp, manifest, text, getattr(staged, "spec", None))
        _externalize_stages(tmp, manifest, external_data)
        data = json.dumps(manifest, indent=2, sort_keys=False).encode()
        _write(tmp, "manifest.json", data)
        _finalize(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _export_into(
    model: Any,
    tmp: Path,
    sample: dict[str, np.ndarray],
    calib: dict[str, np.ndarray],
    targets: np.ndarray | None,
    opset: int,
    quantize: str | None,
    optimize: bool,
    atol: float,
    rtol: float,
    name: str,
    quant_candidates: Sequence[quant.QuantSetting],
    selection: tuple[dict[str, np.ndarray], np.ndarray | None] | None = None,
    quant_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    in_names, out_names = list(model.input_names), list(model.output_names)
    seq, max_seq = _sequence(model)

    def info(n: str, a: np.ndarray) -> dict[str, Any]:
        return tensor_info(n, a, sequence=n in seq)

    def export(module: Any, arrays: list[np.ndarray], ins: list[str], outs: list[str]) -> onnx.ModelProto:
        flags = [n in seq for n in ins]
        return export_module(module, _trace_args(arrays), ins, outs, opset, flags, max_seq)

    envs = _torch_chain(model, sample)
    with torch.no_grad():
        torch_out = _to_numpy(model(*[torch.from_numpy(sample[n]) for n in in_names]))
    io = [(list(s.input_names), list(s.output_names)) for s in model.stages]

    from toolkit.export.fusion import attention_fusion

    fuse = attention_fusion(model)  # encoders: onnxruntime's Attention / SkipLayerNorm / BiasGelu
    unfused: list[bytes] = []  # the graphs before fusion, in order (stages, then fused): int8 source

    def finish(proto: onnx.ModelProto, ins: list[str], outs: list[str], fname: str) -> bytes:
        check_model(proto, ins, outs)
        data = compact(proto).SerializeToString()
        if optimize:
            data = _optimize(data, tmp, fname)
            check_model(onnx.load_from_string(data), ins, outs)
        unfused.append(data)
        if fuse is not None:
            data = fuse(data)  # contrib ops: checked by running it against torch below
        return data

    stage_entries: list[dict[str, Any]] = []
    stage_bytes: list[bytes] = []
    for i, (stage, (ins, outs)) in enumerate(zip(model.stages, io)):
        where = f"stage {i} ({ins} -> {outs})"
        before = envs[i - 1] if i else {k: v for k, v in sample.items()}
        try:
            proto = export(stage, [before[n] for n in ins], ins, outs)
            data = finish(proto, ins, outs, _stage_file(i, "fp32"))
        except ValueError as exc:
            raise (InputError if isinstance(exc, InputError) else ValueError)(f"{where}: {exc}") from None
        got = run_onnx(data, {n: before[n] for n in ins}, outs)
        parity = compare(got, [envs[i][n] for n in outs], atol, rtol)
        if not parity.ok:
            raise ValueError(
                f"{where}: parity check failed, max abs error {parity.max_abs:.3g} (relative {parity.max_rel:.3g}) "
                f"against torch: expected <= atol {atol} + rtol {rtol} x scale"
            )
        stage_bytes.append(data)
        stage_entries.append(
            {
                "index": i,
                "inputs": [info(n, before[n]) for n in ins],
                "outputs": [info(n, envs[i][n]) for n in outs],
                "parameters": int(sum(p.numel() for p in stage.parameters())),
                "files": {"fp32": _write(tmp, _stage_file(i, "fp32"), data)},
                "parity": parity.to_dict(),
            }
        )

    # fused: the whole model as one graph
    try:
        proto = export(model, [sample[n] for n in in_names], in_names, out_names)
        fused = finish(proto, in_names, out_names, _fused_file("fp32"))
    except ValueError as exc:
        raise (InputError if isinstance(exc, InputError) else ValueError)(f"fused model: {exc}") from None
    fused_parity = compare(run_onnx(fused, sample, out_names), torch_out, atol, rtol)
    sessions = [cpu_session(b) for b in stage_bytes]
    chained = _chain_onnx(sessions, io, sample, out_names)
    e2e = compare(chained, torch_out, atol, rtol)
    for what, p in (("fused model", fused_parity), ("stages chained end to end", e2e)):
        if not p.ok:
            raise ValueError(
                f"{what}: parity check failed, max abs error {p.max_abs:.3g} against torch: "
                f"expected <= atol {atol} + rtol {rtol} x scale"
            )
    fused_entry: dict[str, Any] = {
        "files": {"fp32": _write(tmp, _fused_file("fp32"), fused)},
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "parity": fused_parity.to_dict(),
    }

    quant_report = None
    if quantize == "int8":
        calib_envs = _torch_chain(model, calib)
        n = next(iter(calib.values())).shape[0]
        calibration = []
        for i, (ins, _) in enumerate(io):
            src = calib_envs[i - 1] if i else calib
            calibration.append(
                [{k: src[k][j : j + CALIB_BATCH] for k in ins} for j in range(0, n, CALIB_BATCH)]
            )

        def run_chain(blobs: Sequence[bytes], feeds: dict[str, np.ndarray] = sample) -> list[np.ndarray]:
            return _chain_onnx([cpu_session(b) for b in blobs], io, feeds, out_names)

        plain = unfused[: len(stage_bytes)]  # int8 from the unfused graphs
        select = None
        if selection is not None:
            sel_feeds, sel_targets = selection

            def run_select(blobs: Sequence[bytes]) -> list[np.ndarray]:
                return run_chain(blobs, sel_feeds)

            select = (run_select, run_select(plain), sel_targets)
        setting, q_stages, quant_report = quant.choose_and_quantize(
            plain,
            calibration,
            run_chain,
            chained,
            targets,
            quant_candidates,
            select=select,
            **(quant_options or {}),
        )
        for i, blob in enumerate(q_stages):
            stage_entries[i]["files"]["int8"] = _write(tmp, _stage_file(i, "int8"), blob)
        fused_q = quant.quantize_model(
            unfused[len(stage_bytes)],
            setting,
            [{k: v[j : j + CALIB_BATCH] for k, v in calib.items()} for j in range(0, n, CALIB_BATCH)],
        )
        fused_entry["files"]["int8"] = _write(tmp, _fused_file("int8"), fused_q)
        fused_mask = (quant_options or {}).get("masks", (None, None))[0]
        quant_report["fused"] = quant.score(
            run_onnx(fused_q, sample, out_names), torch_out, targets, fused_mask
        )

    return build_manifest(
        name=name,
        opset=opset,
        inputs=[info(n, sample[n]) for n in in_names],
        outputs=[info(n, a) for n, a in zip(out_names, torch_out)],
        stages=stage_entries,
        fused=fused_entry,
        parity={
            "samples": int(next(iter(sample.values())).shape[0]),
            "atol": atol,
            "rtol": rtol,
            "end_to_end": e2e.to_dict(),
            "fused": fused_parity.to_dict(),
            "stages": [e["parity"] for e in stage_entries],
        },
        quantization=quant_report,
        optimization="basic" if optimize else None,
    )
