"""Key/value-cache exports of causal language models, for generation in the torch-free runtime.

A spec is a causal LM when it has one int64 input with a vocabulary, learned or sinusoidal
``position_embedding``, only causal ``attention`` nodes without a padding mask, no pooling
(``masked_mean`` / ``select``) and one output of shape [T, vocab] (next-token logits). For such a
model `rlhf export` writes, besides the usual stage files, one ``stage_NN.kv.onnx`` per stage:

- inputs: the stage's usual inputs (token ids (B, T) for the first stage, hidden states (B, T, d)
  after it), then ``past_key_i`` / ``past_value_i`` (B, heads, P, head_dim) for each attention
  layer ``i`` of the stage (layers numbered over the whole model);
- outputs: the stage's usual outputs, then ``present_key_i`` / ``present_value_i``
  (B, heads, P + T, head_dim): the past with this call's keys / values appended.

T and P are dynamic; P = 0 for the prompt. Positions are offset by P (position P + t for the t-th
new token) and each new token attends to all P cached ones and to the new ones up to itself. The
manifest's ``causal_lm`` entry lists the files, the cache tensor names per stage, the context
length and the vocabulary; toolkit.runtime.generate reads it.

The export is checked: the cached stages run in onnxruntime on a prompt chunk and then token by
token up to the full context must give the float64 torch model's full-sequence logits (no cache,
the usual causal mask) within ``atol + rtol * max|logits|``; the errors go into the manifest.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from toolkit.export.manifest import file_entry
from toolkit.export.onnx_io import _cached_torchlib_registry, _quiet, check_model, compact
from toolkit.export.parity import compare, cpu_session, run_onnx
from toolkit.fsio import write_synced
from toolkit.layers.attention import Attention
from toolkit.layers.sequence import PositionEmbedding

#: tokens given at once before the token-by-token part of the export's parity check
PARITY_PROMPT = 16


def kv_file(i: int) -> str:
    return f"stage_{i:02d}.kv.onnx"


def causal_lm_layout(model: Any) -> dict[str, Any] | None:
    """What a KV-cache export needs to know about ``model``, or None when it is no causal LM.

    Returns:
        {"input", "logits", "vocab", "context", "heads", "head_dim", "layers": [attention node ids
        in order], "stage_layers": [[layer indices] per stage]}.
    """
    spec = getattr(model, "spec", None)
    if spec is None or not hasattr(spec, "analysis") or not hasattr(model, "stages"):
        return None
    nodes = {n.id: n for n in spec.nodes}
    order = list(spec.analysis.order)
    attn = [nid for nid in order if nodes[nid].op == "attention"]
    ops = {nodes[nid].op for nid in order}
    if not attn or "position_embedding" not in ops or ops & {"masked_mean", "select"}:
        return None
    if any(not nodes[a].param("causal") or len(nodes[a].in_) != 3 for a in attn):
        return None
    if len(spec.inputs) != 1 or len(spec.outputs) != 1:
        return None
    (name, inp), logits = next(iter(spec.inputs.items())), spec.outputs[0]
    if inp.dtype != "int64" or inp.vocab is None or len(inp.shape) != 1:
        return None
    out_shape = list(spec.analysis.infos[logits][0])
    if len(out_shape) != 2 or out_shape[0] != inp.shape[0]:
        return None
    stage_layers: list[list[int]] = []
    for stage in model.stage_list():
        layers = [attn.index(nid) for nid in stage.node_ids if nid in attn]
        has_pos = any(nodes[nid].op == "position_embedding" for nid in stage.node_ids)
        if has_pos and not layers:
            # the position offset is read from the stage's own cache length
            return None
        stage_layers.append(layers)
    widths = {spec.analysis.infos[a][0][-1] for a in attn}
    heads = {int(nodes[a].param("heads")) for a in attn}
    if len(widths) != 1 or len(heads) != 1:
        return None
    width, n_heads = widths.pop(), heads.pop()
    return {
        "input": name,
        "logits": logits,
        "vocab": int(inp.vocab),
        "output_vocab": int(out_shape[1]),
        "context": int(inp.shape[0]),
        "heads": n_heads,
        "head_dim": width // n_heads,
        "layers": attn,
        "stage_layers": stage_layers,
    }


def cached_attention(
    att: Attention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention of T new queries over P cached and T new keys / values.

    Args:
        q, k, v: (B, T, d) projections of the new tokens.
        past_k, past_v: (B, h, P, d/h) of the earlier tokens.

    Returns:
        (out (B, T, d), present_k (B, h, P + T, d/h), present_v).
    """
    b, t, d = q.shape
    h = att.heads
    dh = d // h
    qh = q.reshape(b, t, h, dh).transpose(1, 2)  # (B, h, T, dh)
    kh = torch.cat([past_k, k.reshape(b, t, h, dh).transpose(1, 2)], dim=2)  # (B, h, P+T, dh)
    vh = torch.cat([past_v, v.reshape(b, t, h, dh).transpose(1, 2)], dim=2)
    past = past_k.shape[2]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) / (dh**0.5)  # (B, h, T, P+T)
    q_pos = torch.arange(t, device=q.device) + past  # (T,)
    k_pos = torch.arange(kh.shape[2], device=q.device)  # (P+T,)
    hide = k_pos[None, :] > q_pos[:, None]  # (T, P+T): keys after the query
    scores = scores.masked_fill(hide, torch.finfo(scores.dtype).min)
    out = torch.matmul(torch.softmax(scores, dim=-1), vh)  # (B, h, T, dh)
    return out.transpose(1, 2).reshape(b, t, d), kh, vh


class CachedStage(nn.Module):
    """A stage run with a key/value cache: ``forward(*stage_inputs, *pasts)`` ->
    ``(*stage_outputs, *presents)``, pasts / presents as (key, value) pairs per attention layer."""

    def __init__(self, stage: Any, layers: list[str]) -> None:
        super().__init__()
        self.stage = stage
        self.layers = [nid for nid in stage.node_ids if nid in layers]

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        stage = self.stage
        n = len(stage.input_names)
        xs, pasts = args[:n], args[n:]
        env = dict(zip(stage.input_names, xs))
        past_len = pasts[0].shape[2]
        presents: list[torch.Tensor] = []
        for nid in stage.node_ids:
            module = stage.get_submodule(nid)
            ins = [env[r] for r in stage._inputs_of[nid]]
            if nid in self.layers:
                j = self.layers.index(nid)
                out, pk, pv = cached_attention(module, ins[0], ins[1], ins[2], pasts[2 * j], pasts[2 * j + 1])
                presents += [pk, pv]
            elif isinstance(module, PositionEmbedding):
                x = ins[0]
                pos = torch.arange(x.shape[1], device=x.device) + past_len  # (T,)
                out = x + module.positions().to(x.dtype)[pos]
            else:
                out = module(*ins)
            env[nid] = out
        return (*(env[name] for name in stage.output_names), *presents)


def cache_names(layers: list[int]) -> tuple[list[str], list[str]]:
    """Past and present tensor names of these layers, (key, value) per layer."""
    past = [f"past_{kind}_{i}" for i in layers for kind in ("key", "value")]
    present = [f"present_{kind}_{i}" for i in layers for kind in ("key", "value")]
    return past, present


def _export_cached(
    module: CachedStage,
    args: tuple[torch.Tensor, ...],
    ins: list[str],
    outs: list[str],
    n_x: int,
    opset: int,
    context: int,
) -> onnx.ModelProto:
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("sequence", max=context)
    past = torch.export.Dim("past", max=context)
    dyn = tuple({0: batch, 1: seq} if i < n_x else {0: batch, 2: past} for i in range(len(args)))
    with _quiet(), _cached_torchlib_registry(), torch.no_grad():
        try:
            program = torch.onnx.export(
                module.eval(),
                args,
                None,
                input_names=ins,
                output_names=outs,
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=(dyn,),
                optimize=True,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many internal types
            root = exc.__cause__ or exc
            first = (str(root).strip().splitlines() or [type(root).__name__])[0]
            raise ValueError(f"torch.onnx.export failed for the cached stage: {first}") from exc
    assert program is not None
    return program.model_proto


def _empty_cache(layout: dict[str, Any], layers: list[int], batch: int, past: int = 0) -> list[np.ndarray]:
    shape = (batch, layout["heads"], past, layout["head_dim"])
    return [np.zeros(shape, dtype=np.float32) for _ in range(2 * len(layers))]


def run_cached(
    sessions: list[Any], entry: dict[str, Any], ids: np.ndarray, cache: list[list[np.ndarray]] | None
) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """One step of the cached stages: ids (B, T) after ``cache`` (None: the prompt) ->
    (logits (B, T, V), the new cache). Used by the export's own parity check."""
    env: dict[str, np.ndarray] = {entry["input"]: ids}
    new_cache = []
    for s, (sess, st) in enumerate(zip(sessions, entry["stages"])):
        past = cache[s] if cache is not None else _empty_cache(entry, st["layers"], ids.shape[0])
        feeds = {n: env[n] for n in st["inputs"]}
        feeds.update(zip(st["past"], past))
        got = run_onnx(sess, feeds, st["outputs"] + st["present"])
        env.update(zip(st["outputs"], got[: len(st["outputs"])]))
        new_cache.append(got[len(st["outputs"]) :])
    return env[entry["logits"]], new_cache


def export_kv_cache(
    model: Any, tmp: Path, sample_ids: np.ndarray, opset: int, atol: float, rtol: float
) -> dict[str, Any] | None:
    """Write one ``stage_NN.kv.onnx`` per stage into ``tmp`` and return the manifest's ``causal_lm``
    entry; None (nothing written) when ``model`` is no causal LM (see causal_lm_layout).

    Raises:
        ValueError: the export failed or the cached logits differ from the float64 reference.
    """
    layout = causal_lm_layout(model)
    if layout is None:
        return None
    context = layout["context"]
    stages_out = []
    blobs = []
    tokens = torch.from_numpy(np.ascontiguousarray(sample_ids[:2]))
    if tokens.shape[0] == 1:
        tokens = torch.cat([tokens, tokens])
    # trace args: 3 new tokens after 4 cached ones (distinct sizes so torch.export keeps them apart)
    env: dict[str, torch.Tensor] = {layout["input"]: tokens[:, 4:7]}
    with torch.no_grad():
        for i, stage in enumerate(model.stage_list()):
            layers = layout["stage_layers"][i]
            ids = [layout["layers"][j] for j in layers]
            cached = CachedStage(stage, ids)
            past, present = cache_names(layers)
            ins, outs = list(stage.input_names), list(stage.output_names)
            pasts = []
            for _ in layers:
                full = torch.randn(2, layout["heads"], 4, layout["head_dim"])
                pasts += [full, full.clone()]
            args = tuple(env[n] for n in ins) + tuple(pasts)
            where = f"stage {i} with key/value cache"
            try:
                proto = _export_cached(cached, args, ins + past, outs + present, len(ins), opset, context)
                check_model(proto, ins + past, outs + present)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            outs_t = cached(*args)
            env.update(zip(outs, outs_t[: len(outs)]))
            data = compact(proto).SerializeToString()
            blobs.append(data)
            write_synced(tmp / kv_file(i), data)
            stages_out.append(
                {
                    "index": i,
                    "file": file_entry(kv_file(i), data),
                    "inputs": ins,
                    "outputs": outs,
                    "layers": layers,
                    "past": past,
                    "present": present,
                }
            )
    entry: dict[str, Any] = {
        "input": layout["input"],
        "logits": layout["logits"],
        "vocab": layout["vocab"],
        "context": context,
        "layers": len(layout["layers"]),
        "heads": layout["heads"],
        "head_dim": layout["head_dim"],
        "cache_shape": ["batch", "heads", "past", "head_dim"],
        "dtype": "float32",
        "tokenizer": "bytes" if layout["vocab"] == 256 else None,
        "stages": stages_out,
    }
    entry["parity"] = cached_parity(model, blobs, entry, sample_ids, atol, rtol)
    return entry


def cached_parity(
    model: Any, blobs: list[bytes], entry: dict[str, Any], sample_ids: np.ndarray, atol: float, rtol: float
) -> dict[str, Any]:
    """Logits of the cached ONNX stages (a prompt chunk, then one token at a time to the full
    context) against the float64 torch model's full-sequence logits (no cache)."""
    ids = np.ascontiguousarray(sample_ids[:2, : entry["context"]])
    ref_model = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(ids))
    ref_np = (ref[0] if isinstance(ref, tuple) else ref).numpy()  # (B, T, V) float64
    sessions = [cpu_session(b) for b in blobs]
    first = min(PARITY_PROMPT, ids.shape[1])
    logits, cache = run_cached(sessions, entry, ids[:, :first], None)
    got = [logits]
    for t in range(first, ids.shape[1]):
        logits, cache = run_cached(sessions, entry, ids[:, t : t + 1], cache)
        got.append(logits)
    cached = np.concatenate(got, axis=1)
    p = compare([cached], [ref_np], atol, rtol)
    if not p.ok:
        raise ValueError(
            f"key/value-cache export: parity check failed, max abs error {p.max_abs:.3g} of the cached "
            f"stages against the float64 full-sequence logits: expected <= atol {atol} + rtol {rtol} x scale"
        )
    out: dict[str, Any] = dict(p.to_dict())
    out.update({"tokens": int(ids.shape[1]), "prompt": first, "reference": "torch float64, full sequence"})
    return out


def reference_greedy(model: Any, prompt: list[int], max_new_tokens: int, context: int) -> list[int]:
    """Greedy continuation by the torch model without a cache: every step recomputes the whole window
    (the same window rule as toolkit.runtime.generate: a full window slides to its last
    ``context // 2`` tokens). The reference the runtime's cached generation must reproduce."""
    tokens = list(prompt)
    start = 0
    new: list[int] = []
    model = model.eval()
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if len(tokens) - start > context:
                start = len(tokens) - context // 2
            out = model(torch.tensor([tokens[start:]], dtype=torch.int64))
            logits = out[0] if isinstance(out, tuple) else out  # (1, T, V)
            nxt = int(torch.argmax(logits[0, -1]))
            tokens.append(nxt)
            new.append(nxt)
    return new


__all__ = [
    "CachedStage",
    "cache_names",
    "causal_lm_layout",
    "export_kv_cache",
    "kv_file",
    "reference_greedy",
    "run_cached",
]
