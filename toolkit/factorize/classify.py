"""Text classification on top of a (factorized) encoder, fine-tuned with the Hessian-free optimizer.

The classifier is logits = W_h · mean_pool(encoder(ids)) + b_h. Training data is a user CSV with
columns ``text`` and ``label`` (labels are any strings; they are mapped to 0..K-1 in sorted order).
``save_classifier`` / ``load_classifier`` keep it as safetensors + JSON (no pickle); ``rlhf classify``
is the command line.
"""

from __future__ import annotations

import csv
import json
import math
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


# ------------------------------------------------------------- minibatch fine-tuning on real sets
@dataclass
class TextSplits:
    """Tokenized train / validation / (optional) test sets and the label names (sorted)."""

    train: Any
    val: Any
    test: Any | None
    names: list[str]
    truncated: int


def text_encoder_of(tok: Any, max_length: int) -> Any:
    """A torch-free ``TextEncoder`` with the same vocabulary and rules as a HF fast tokenizer."""
    from rlhf_runtime.text import TextEncoder
    from tokenizers import Tokenizer

    return TextEncoder(Tokenizer.from_str(tok.backend_tokenizer.to_str()), max_length)


def load_text_splits(
    encoder: Any,
    train: str | Path,
    val: str | Path | None = None,
    test: str | Path | None = None,
    *,
    text_col: str = "text",
    label_col: str = "label",
    cache_dir: str | Path | None = None,
    seed: int = 0,
) -> TextSplits:
    """Tokenize the data: ``train`` is a CSV/JSONL file or ``"rotten_tomatoes"`` (split 80/10/10,
    seeded); without ``val`` a seeded 10% of ``train`` is held out for validation.

    Raises:
        InputError: see ``toolkit.data.text`` (bad rows, one class, a label unseen in training).
    """
    import numpy as np

    from toolkit.data import text as T

    if str(train) == "rotten_tomatoes":
        texts, labels = T.rotten_tomatoes()
        data = T.tokenize_texts(texts, labels, encoder, "rotten_tomatoes")
        tr, va, te = T.split_indices(len(data), 0.1, 0.1, seed)
        splits: list[Any] = [data.subset(tr), data.subset(va), data.subset(te)]
    else:
        data = T.tokenize_file(train, encoder, cache_dir, text_col, label_col)
        if val is None:
            tr, va, _ = T.split_indices(len(data), 0.1, 0.0, seed)
            splits = [data.subset(np.sort(tr)), data.subset(np.sort(va)), None]
        else:
            splits = [data, T.tokenize_file(val, encoder, cache_dir, text_col, label_col), None]
        if test is not None:
            splits[2] = T.tokenize_file(test, encoder, cache_dir, text_col, label_col)
    names = T.class_names(splits[0])
    for split, name in zip(splits[1:], ("validation", "test")):
        if split is not None:
            T.label_indices(split, names, name)  # fail now on a label unseen in training
    return TextSplits(splits[0], splits[1], splits[2], names, data.truncated)


def _as_batch(data: Any, names: Sequence[str]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    from toolkit.data.text import label_indices

    y = torch.from_numpy(label_indices(data, names))
    return (torch.from_numpy(data.input_ids), torch.from_numpy(data.attention_mask)), y


@dataclass
class PreparedModel:
    """The module ``fit`` trains, the full classifier it lives in, and the data in its input form."""

    train_model: nn.Module
    classifier: SentenceClassifier
    kind: str
    k: int
    data: dict[str, Any]


def prepare_model(
    encoder: nn.Module,
    splits: TextSplits,
    trainable: str = "head",
    *,
    batch_size: int = 128,
    progress: Any = None,
) -> PreparedModel:
    """Set what is trained and compute the frozen features once.

    Args:
        encoder: a BERT-style transformers encoder (factorized or not).
        splits: the tokenized data.
        trainable: "head", "factors", "all" or "last:K" (see ``toolkit.factorize.text_features``).
        batch_size: texts per forward when computing features.
        progress: called with the number of texts done (feature computation).

    Returns:
        PreparedModel; its ``data`` maps "train" / "val" / "test" to (inputs, targets).
    """
    from toolkit.factorize.text_features import TopClassifier, blocks_of, frozen_features, parse_trainable

    blocks = blocks_of(encoder)
    kind, k = parse_trainable(trainable, len(blocks))
    if getattr(encoder, "attn_implementation", None) == "sdpa":
        encoder.attn_implementation = "eager"  # type: ignore[assignment]
    hidden = int(getattr(encoder, "config").hidden_size)  # noqa: B009
    clf = SentenceClassifier(encoder, hidden, len(splits.names))
    with torch.no_grad():  # a zero head: L2-SP on it is plain L2, and every method starts equal
        clf.head.weight.zero_()
        clf.head.bias.zero_()
    for p in clf.parameters():
        p.requires_grad_(False)
    model: nn.Module
    if kind in ("head", "last"):
        model = TopClassifier(nn.ModuleList(list(blocks)[len(blocks) - k :]), clf.head)
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = clf
        for p in clf.head.parameters():
            p.requires_grad_(True)
        if kind == "all":
            for p in clf.parameters():
                p.requires_grad_(True)
        else:
            for layer in factorized_modules(encoder).values():
                getattr(layer, "U").weight.requires_grad_(True)  # noqa: B009
    data: dict[str, Any] = {}
    for name in ("train", "val", "test"):
        split = getattr(splits, name)
        if split is None:
            continue
        (ids, mask), y = _as_batch(split, splits.names)
        if kind in ("head", "last"):
            feats = frozen_features(encoder, ids, mask, k, batch_size, progress)
            data[name] = ((feats, mask) if k else (feats, torch.ones(len(y), 1, dtype=torch.long)), y)
        else:
            data[name] = ((ids, mask), y)
    return PreparedModel(model, clf, kind, k, data)


SWEEPABLE = ("l2", "l1", "group_lasso", "l2_sp", "lr", "damping", "weight_decay")


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """``"l2=1e-5,1e-4"`` -> ("l2", [1e-5, 1e-4]).

    Raises:
        InputError: an unknown setting or a value that is not a number >= 0.
    """
    from toolkit.errors import InputError

    name, _, values = text.partition("=")
    name = name.strip().replace("-", "_")
    if name not in SWEEPABLE or not values:
        raise InputError(f"--sweep: expected NAME=V1,V2,... with NAME in {list(SWEEPABLE)}, got {text!r}")
    try:
        grid = [float(v) for v in values.split(",")]
    except ValueError:
        raise InputError(f"--sweep {text!r}: expected comma-separated numbers, got {values!r}") from None
    if not grid or any(not (v >= 0) for v in grid):
        raise InputError(f"--sweep {text!r}: expected numbers >= 0, got {grid}")
    return name, grid


def run_sweep(
    prepared: PreparedModel,
    cfg: Any,
    run_dir: str | Path,
    sweep: tuple[str, list[float]] | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Fit once per grid value (or once), from the same start; keep the best by validation.

    Writes ``sweep.json``, ``sweep.md`` and ``sweep.png`` under ``run_dir`` when sweeping. The model
    is left at the chosen run's best validation point.

    Returns:
        {"chosen": {...}, "runs": [{setting, value, best_val_accuracy, test..., steps, seconds}]}
    """
    import dataclasses

    from toolkit.factorize.classify_train import evaluate, fit, load_params, load_params_from, param_copy

    run = Path(run_dir)
    model = prepared.train_model
    start = param_copy(model)
    name, grid = sweep if sweep is not None else ("", [math.nan])
    rows = []
    for value in grid:
        sub = run / f"{name}={value:g}" if sweep is not None else run
        load_params_from(model, start)
        c = dataclasses.replace(cfg, **({name: value} if sweep is not None else {}))
        res = fit(model, prepared.data["train"], prepared.data["val"], c, sub, progress=progress)
        row: dict[str, Any] = {"setting": name, "value": value, "dir": str(sub), "best_val_accuracy": res.best_val_accuracy,
                               "best_step": res.best_step, "seconds_to_best": res.best_seconds,
                               "steps": res.steps, "seconds": res.seconds, "stopped": res.stopped}  # fmt: skip
        row["train"] = evaluate(model, prepared.data["train"])
        if "test" in prepared.data:
            row["test"] = evaluate(model, prepared.data["test"])
        rows.append(row)
    best = max(range(len(rows)), key=lambda i: rows[i]["best_val_accuracy"])
    load_params(model, Path(rows[best]["dir"]) / "best.safetensors")
    out = {"chosen": rows[best], "runs": rows}
    if sweep is not None:
        _write_sweep(run, out)
    return out


def _write_sweep(run: Path, out: dict[str, Any]) -> None:
    import io

    import matplotlib

    from toolkit.fsio import atomic_write_bytes

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["runs"]
    atomic_write_bytes(run / "sweep.json", (json.dumps(out, indent=2) + "\n").encode())
    lines = ["| setting | value | best val acc | test acc | test macro-F1 | train acc | steps | s to best | stopped |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        t = r.get("test", {})
        mark = " (chosen)" if r is out["chosen"] else ""
        lines.append(
            f"| {r['setting']} | {r['value']:g}{mark} | {r['best_val_accuracy']:.4f} | {t.get('accuracy', math.nan):.4f} | "
            f"{t.get('macro_f1', math.nan):.4f} | {r['train']['accuracy']:.4f} | {r['steps']} | {r['seconds_to_best']:.1f} | {r['stopped']} |"
        )
    atomic_write_bytes(run / "sweep.md", ("\n".join(lines) + "\n").encode())
    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = [max(r["value"], 1e-12) for r in rows]
    ax.semilogx(xs, [r["best_val_accuracy"] for r in rows], "o-", label="validation (best)")
    if all("test" in r for r in rows):
        ax.semilogx(xs, [r["test"]["accuracy"] for r in rows], "s--", label="test (at best validation)")
    ax.set_xlabel(rows[0]["setting"])
    ax.set_ylabel("accuracy")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(run / "sweep.png", buf.getvalue())


def hf_classifier_files(out: Path, names: Sequence[str], max_length: int) -> None:
    """Make a classifier export loadable by ``optimum.onnxruntime.ORTModelForSequenceClassification``
    and ``transformers.pipeline("text-classification")``: ``config.json`` gets the label names
    (``id2label`` / ``label2id``, single-label problem) and ``tokenizer_config.json`` truncates at
    the export's token cap, as the runtime does. ``model.onnx`` (inputs ``input_ids``,
    ``attention_mask``, output ``logits``) is the file optimum opens."""
    from toolkit.fsio import atomic_write_bytes

    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    cfg["id2label"] = {str(i): n for i, n in enumerate(names)}
    cfg["label2id"] = {n: i for i, n in enumerate(names)}
    cfg["problem_type"] = "single_label_classification"
    cfg["architectures"] = ["BertForSequenceClassification"]
    atomic_write_bytes(out / "config.json", (json.dumps(cfg, indent=2) + "\n").encode())
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    tc["model_max_length"] = int(max_length)
    atomic_write_bytes(tc_path, (json.dumps(tc, indent=2) + "\n").encode())


def export_classifier(
    clf: SentenceClassifier,
    tok: Any,
    names: Sequence[str],
    out: str | Path,
    report_json: str,
    max_length: int,
    sentences: Sequence[str],
    name: str | None = None,
) -> dict[str, Any]:
    """Save the classifier (``save_classifier``) and export it: model.onnx + manifest.json with the
    ``text`` entry (tokenizer.json, its sha256, max_length, input names) and ``labels``.

    Returns:
        The manifest document.
    """
    from rlhf_runtime.text import tokenizer_entry

    from toolkit.factorize.hf import export_text_model
    from toolkit.fsio import atomic_write_bytes

    out = Path(out)
    save_classifier(clf, tok, names, report_json, out, max_length)
    doc = export_text_model(clf, tok, list(sentences)[:8], out, "logits", max_length=max_length, name=name)
    cfg: Any = clf.encoder.config  # the transformers config of the encoder
    doc["text"] = tokenizer_entry(
        out / "tokenizer.json",
        max_length,
        "input_ids",
        "attention_mask",
        None,
        vocab_size=cfg.vocab_size,
        max_positions=cfg.max_position_embeddings,
    )
    doc["labels"] = list(names)
    hf_classifier_files(out, names, max_length)
    atomic_write_bytes(out / "manifest.json", (json.dumps(doc, indent=2) + "\n").encode())
    return doc
