"""Text spec models (``rlhf import``) through the Hugging Face path's distillation and embedding code.

An imported BERT-family checkpoint carries its tokenizer in the checkpoint's ``text`` metadata and
computes ``(token states, pooled embedding)`` from the graph inputs in spec order. The functions of
``toolkit.factorize.hf`` (``batches``, ``augmented_batches``, ``distill``) take a tokenizer callable and
a ``hidden`` function; this module supplies both for a spec model, so the spec path and the Hugging
Face path distil with one implementation (same loss, optimizer, schedule and augmented batches).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from toolkit.errors import InputError


class SpecTokenizer:
    """The spec checkpoint's tokenizer as a transformers-style callable.

    ``tok(sentences, padding=True, truncation=True, max_length=n, return_tensors="pt")`` returns
    graph input name -> int64 tensor (batch, seq), padded to the longest sentence, as the device's
    ``TextEncoder`` tokenizes (``toolkit.export.text.tokenize``).
    """

    def __init__(self, text: Mapping[str, Any]) -> None:
        if "tokenizer_json" not in text:
            raise InputError("checkpoint text metadata: expected tokenizer_json, got none")
        self.text = dict(text)
        self.mask_name = str(text.get("attention_mask") or "")

    def __call__(
        self,
        sentences: Sequence[str],
        padding: bool = True,
        truncation: bool = True,
        max_length: int | None = None,
        return_tensors: str = "pt",
    ) -> dict[str, torch.Tensor]:
        from toolkit.export.text import tokenize

        del padding, truncation, return_tensors  # always padded to the longest, truncated, torch
        arrays = tokenize(self.text, list(sentences), max_length)
        out = {k: torch.as_tensor(v) for k, v in arrays.items()}
        if self.mask_name and self.mask_name != "attention_mask":  # distill/mean_pool read this key
            out["attention_mask"] = out[self.mask_name]
        return out


def spec_hidden(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Token states (B, T, d) of a text spec model: its first output, inputs fed in spec order."""
    names: list[str] = [str(n) for n in model.input_names]  # type: ignore[union-attr]
    missing = [n for n in names if n not in batch]
    if missing:
        raise InputError(f"text batch: expected inputs {names}, got no {missing}")
    out = model(*(batch[n] for n in names))
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def spec_embed(
    model: nn.Module, tok: SpecTokenizer, sentences: Sequence[str], batch_size: int = 64, max_length: int = 64
) -> torch.Tensor:
    """Mean-pooled sentence embeddings (N, d) of a text spec model (as ``hf.embed``)."""
    from toolkit.factorize.hf import batches, mean_pool

    model.eval()
    outs = [
        mean_pool(spec_hidden(model, b), b["attention_mask"])
        for b in batches(tok, sentences, batch_size, max_length)
    ]
    return torch.cat(outs)


def spec_distortion(
    reference: nn.Module, tok: SpecTokenizer, sentences: Sequence[str]
) -> Callable[[nn.Module], float]:
    """model ↦ 1 − mean cosine of its sentence embeddings to ``reference``'s (``hf.embedding_distortion``)."""
    from toolkit.factorize.hf import mean_cosine

    target = spec_embed(reference, tok, sentences)

    def evaluate(model: nn.Module) -> float:
        return 1.0 - mean_cosine(spec_embed(model, tok, sentences), target)

    return evaluate


def distill_spec(
    student: nn.Module,
    teacher: nn.Module,
    text: Mapping[str, Any],
    sentences: Sequence[str],
    steps: int,
    lr: float = 5e-4,
    batch_size: int = 32,
    seed: int = 0,
    max_length: int = 64,
) -> Any:
    """Distil a dense text spec model into its factorized student on augmented ``sentences``.

    ``toolkit.factorize.hf.distill`` (token-state MSE + pooled cosine, AdamW one-cycle) on
    ``hf.augmented_batches`` of the spec's own tokenizer. Returns its DistillLog.
    """
    from toolkit.factorize.hf import augmented_batches, distill

    tok = SpecTokenizer(text)
    feed = augmented_batches(tok, sentences, batch_size, seed=seed, max_length=max_length)
    return distill(student, teacher, feed, steps=steps, lr=lr, hidden=spec_hidden)
