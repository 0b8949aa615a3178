"""onnxruntime's transformer fusions on exported encoder stages (export time only).

An encoder's attention exports as MatMul / Reshape / Transpose / Div / Add(mask) / Softmax, its
layer norms and GELU as several elementwise nodes. onnxruntime's CPU provider runs them node by node;
``onnxruntime.transformers.optimizer.optimize_model`` (model type "bert") rewrites them into its
contrib ops ``Attention``, ``SkipLayerNormalization`` and ``BiasGelu``, which the standard CPU
provider of any onnxruntime build runs (no extra package on the device: it only loads the result).

The rewrite recognises BERT's additive padding mask, ``(1 - mask.unsqueeze(1).unsqueeze(2)) * low``,
with two Unsqueeze nodes; torch.onnx / onnxruntime's basic optimization merge them into one
Unsqueeze with two axes, so ``split_unsqueeze`` splits it again before the fusion runs. Causal
(decoder) attention is left alone: only models whose attention layers are all non-causal, with one
head count and width, are fused (``attention_fusion``). The exporter still checks every fused file
against torch (parity tolerance of the export) and writes int8 variants from the unfused graphs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
from onnx import helper, numpy_helper


def split_unsqueeze(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each Unsqueeze with two constant axes -> two Unsqueeze nodes (the form the fusion matches)."""
    inits = {i.name: i for i in model.graph.initializer}
    nodes = []
    for n in model.graph.node:
        if n.op_type == "Unsqueeze" and len(n.input) == 2 and n.input[1] in inits:
            axes = [int(a) for a in numpy_helper.to_array(inits[n.input[1]]).reshape(-1)]
            if len(axes) == 2 and all(a >= 0 for a in axes) and axes[0] < axes[1]:
                mid = f"{n.output[0]}__unsqueeze_{axes[0]}"
                first = helper.make_tensor(f"{mid}_axes", onnx.TensorProto.INT64, [1], [axes[0]])
                second = helper.make_tensor(f"{mid}_axes2", onnx.TensorProto.INT64, [1], [axes[1]])
                model.graph.initializer.extend([first, second])
                nodes.append(helper.make_node("Unsqueeze", [n.input[0], first.name], [mid], name=f"{mid}_a"))
                nodes.append(
                    helper.make_node("Unsqueeze", [mid, second.name], list(n.output), name=f"{mid}_b")
                )
                continue
        nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def fuse_encoder(data: bytes, heads: int, hidden: int) -> tuple[bytes, dict[str, int]]:
    """The serialized ONNX model with onnxruntime's BERT fusions applied, and the fused-op counts.

    Raises:
        ValueError: onnxruntime's optimizer failed on the graph.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    model = split_unsqueeze(onnx.load_from_string(data))
    with tempfile.TemporaryDirectory(prefix="rlhf-fuse-") as tmp:
        src = Path(tmp) / "in.onnx"
        src.write_bytes(model.SerializeToString())
        try:
            opt = optimize_model(
                str(src), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0, use_gpu=False
            )
        except Exception as exc:
            raise ValueError(f"onnxruntime transformer fusion failed: {exc}") from None
        stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
        out = opt.model
        out.producer_name = model.producer_name or out.producer_name
        return out.SerializeToString(), stats


def attention_fusion(model: Any) -> Callable[[bytes], bytes] | None:
    """For a staged model with non-causal attention (one head count, one width): bytes -> fused bytes.

    Opt-in: None unless ``RLHF_EXPORT_FUSION=1`` is set (measured on MiniLM at 2 threads, the
    onnxruntime session's own load-time fusions of the additive-mask graph gave the same batch-1
    latency and a lower batch-32 one; see docs/benchmarks/transformer.md). Also None when the model
    has no attention, causal attention, mixed settings, or onnxruntime's transformer tools are missing.
    """
    if os.environ.get("RLHF_EXPORT_FUSION") != "1":
        return None
    spec = getattr(model, "spec", None)
    if spec is None:
        return None
    try:
        import onnxruntime.transformers.optimizer  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the onnxruntime build
        return None
    settings = set()
    for node in spec.nodes:
        if node.op != "attention":
            continue
        if node.causal or node.heads is None:
            return None
        settings.add((int(node.heads), int(spec.analysis.infos[node.in_[0]][0][-1])))
    if len(settings) != 1:
        return None
    heads, hidden = settings.pop()

    def fuse(data: bytes) -> bytes:
        fused, _stats = fuse_encoder(data, heads, hidden)
        return fused

    return fuse
