"""Text classification on top of a (factorized) encoder, fine-tuned with the Hessian-free optimizer.

The classifier is logits = W_h · mean_pool(encoder(ids)) + b_h. Training data is a user CSV with
columns ``text`` and ``label`` (labels are any strings; they are mapped to 0..K-1 in sorted order).
``save_classifier`` / ``load_classifier`` keep it as safetensors + JSON (no pickle); ``rlhf classify``
is the command line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from toolkit.errors import InputError
from toolkit.factorize.hf import last_hidden, mean_pool, tokenize
from toolkit.layers import FactorizedMixin, factorized_modules


def read_text_csv(path: str | Path) -> tuple[list[str], list[str]]:
    """Texts and labels of a CSV with a header containing ``text`` and ``label``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: missing columns, empty file or an empty text.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: expected a CSV file with columns text,label, got no such file")
    with p.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "text" not in cols or "label" not in cols:
            raise InputError(f"{p}: expected columns 'text' and 'label', got {cols}")
        texts, labels = [], []
        for i, row in enumerate(reader, start=2):
            if not (row["text"] or "").strip():
                raise InputError(f"{p}:{i}: expected a non-empty text, got an empty one")
            texts.append(row["text"])
            labels.append((row["label"] or "").strip())
    if not texts:
        raise InputError(f"{p}: expected at least one row, got none")
    return texts, labels


class SentenceClassifier(nn.Module):
    """logits = head(mean_pool(encoder(input_ids, attention_mask))): (B, T) ids -> (B, K)."""

    def __init__(self, encoder: nn.Module, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # the math SDPA kernel is built from differentiable ops: the Hessian-free curvature products
        # need second derivatives, which the fused CPU attention kernels do not have
        with sdpa_kernel(SDPBackend.MATH):
            h = last_hidden(
                self.encoder, {"input_ids": input_ids, "attention_mask": attention_mask}
            )  # (B, T, d)
        return self.head(mean_pool(h, attention_mask))  # (B, K)


@dataclass
class ClassifierFit:
    """Losses (full training set, before and after each step) and the label names in index order."""

    labels: list[str]
    losses: list[float] = field(default_factory=list)
    accuracy: float = 0.0


def fine_tune_classifier(
    encoder: nn.Module,
    tok: Any,
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    steps: int = 5,
    train_factors: bool = True,
    max_length: int = 32,
    seed: int = 0,
    **hf_options: Any,
) -> tuple[SentenceClassifier, ClassifierFit]:
    """Fine-tune a linear head (and the U factors of the factorized layers) with HessianFree.

    Args:
        encoder: a transformers encoder (factorized or not).
        tok: its tokenizer.
        texts, labels: the training set (one full batch: this is for small user CSVs).
        steps: Hessian-free steps.
        train_factors: also train the U weights of every factorized layer in the encoder; else the head only.
        max_length: token cap per text.
        seed: seed of the head's initialisation.
        hf_options: passed to toolkit.optim.HessianFree (damping, cg_max_iters, ...).

    Returns:
        The classifier and a ClassifierFit (loss on the training set before training and after each step).
    """
    from toolkit.optim import HessianFree

    if len(texts) != len(labels) or not texts:
        raise InputError(
            f"expected as many labels as texts (at least one), got {len(texts)} texts, {len(labels)} labels"
        )
    names = sorted(set(labels))
    if len(names) < 2:
        raise InputError(f"labels: expected at least 2 classes, got {names}")
    y = torch.tensor([names.index(lab) for lab in labels])  # (N,)
    enc = tokenize(tok, texts, max_length)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    torch.manual_seed(seed)
    hidden = int(getattr(getattr(encoder, "config", None), "hidden_size", 0)) or int(
        last_hidden(encoder, enc).shape[-1]
    )
    # BERT's SDPA mask preparation branches on the mask's values (torch.all(mask == 1)), which the
    # torch.func transforms of the curvature products cannot trace; the additive ("eager") mask is the
    # same function without that branch (attention itself still runs through SDPA)
    if getattr(encoder, "attn_implementation", None) == "sdpa":
        encoder.attn_implementation = "eager"  # type: ignore[assignment]
    model = SentenceClassifier(encoder, hidden, len(names))
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    params = list(model.head.parameters())
    if train_factors:
        for layer in factorized_modules(model.encoder).values():
            assert isinstance(layer, FactorizedMixin) and isinstance(layer, nn.Module)
            u = layer.U.weight  # type: ignore[union-attr]
            assert isinstance(u, nn.Parameter)
            u.requires_grad_(True)
            params.append(u)
    model.eval()  # no dropout: the curvature products need a deterministic forward
    opt = HessianFree(model, F.cross_entropy, params=params, **hf_options)
    fit = ClassifierFit(labels=names)
    with torch.no_grad():
        fit.losses.append(float(F.cross_entropy(model(ids, mask), y)))
    for _ in range(steps):
        opt.step((ids, mask), y)
        with torch.no_grad():
            fit.losses.append(float(F.cross_entropy(model(ids, mask), y)))
    fit.accuracy = _accuracy(model, ids, mask, y)
    return model, fit


def _accuracy(model: SentenceClassifier, ids: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(ids, mask).argmax(-1) == y).double().mean())


def accuracy(
    model: SentenceClassifier,
    tok: Any,
    texts: Sequence[str],
    labels: Sequence[str],
    names: Sequence[str],
    max_length: int = 32,
) -> float:
    """Fraction of ``texts`` whose predicted label (index into ``names``) equals ``labels``.

    Raises:
        ValueError: a label that is not one of ``names`` (the classes seen in training).
    """
    unknown = sorted(set(labels) - set(names))
    if unknown:
        raise InputError(f"labels: expected classes seen in training {list(names)}, got {unknown}")
    enc = tokenize(tok, texts, max_length)
    y = torch.tensor([list(names).index(lab) for lab in labels])
    return _accuracy(model, enc["input_ids"], enc["attention_mask"], y)


def save_classifier(
    model: SentenceClassifier,
    tok: Any,
    labels: Sequence[str],
    report_json: str,
    out_dir: str | Path,
    max_length: int = 32,
) -> Path:
    """Save the encoder as ``save_factorized_hf`` does, the head as ``classifier.safetensors`` and
    the label names and token cap as ``classifier.json`` (all written atomically)."""
    from safetensors.torch import save

    from toolkit.factorize.hf import save_factorized_hf
    from toolkit.fsio import atomic_write_bytes

    out = save_factorized_hf(model.encoder, tok, report_json, out_dir)
    head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    atomic_write_bytes(
        out / "classifier.safetensors", save(head, metadata={"format": "rlhf-classifier-head"})
    )
    meta = {"labels": list(labels), "max_length": max_length, "hidden": model.head.in_features}
    atomic_write_bytes(out / "classifier.json", (json.dumps(meta, indent=2) + "\n").encode())
    return out


def load_classifier(path: str | Path) -> tuple[SentenceClassifier, Any, list[str], int]:
    """Rebuild a classifier saved by ``save_classifier``: (model, tokenizer, label names, token cap).

    Raises:
        FileNotFoundError: a file of the classifier is missing.
        ValueError: ``classifier.json`` is malformed or the head does not fit it.
    """
    from safetensors.torch import load_file

    from toolkit.factorize.hf import load_factorized_hf

    p = Path(path)
    for f in ("classifier.json", "classifier.safetensors"):
        if not (p / f).is_file():
            raise FileNotFoundError(f"{p}: expected {f} of a classifier saved by rlhf classify, got none")
    meta = json.loads((p / "classifier.json").read_text())
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise InputError(
            f"{p / 'classifier.json'}: labels: expected a list of at least 2 strings, got {labels!r}"
        )
    encoder, tok = load_factorized_hf(p)
    model = SentenceClassifier(encoder, int(meta.get("hidden", 0)), len(labels))
    try:
        model.head.load_state_dict(load_file(str(p / "classifier.safetensors")), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise InputError(
            f"{p / 'classifier.safetensors'}: expected a head of {len(labels)} labels, got {first}"
        ) from None
    model.eval()
    return model, tok, labels, int(meta.get("max_length", 32))
