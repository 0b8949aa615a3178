"""Train graphs/default.yaml on digits with the Python API, then reload the best checkpoint.

python examples/train_digits.py [RUN_DIR]
"""

from __future__ import annotations

import sys

import torch

from toolkit.checkpoint import load_model
from toolkit.data import load_data
from toolkit.spec import load_spec
from toolkit.train import train


def main(run_dir: str = "runs/example-digits") -> None:
    spec = load_spec("graphs/default.yaml")
    result = train(spec, run_dir, overwrite=True)
    print(
        f"steps {result.steps}, {result.seconds:.1f} s, parameters {result.params:,} (dense {result.dense_params:,})"
    )
    print(f"best checkpoint (step {result.best_step}): test accuracy {result.best_test['accuracy']:.4f}")

    model, spec, meta = load_model(run_dir)  # best checkpoint, rebuilt from the spec it embeds
    test = load_data(spec.train.data, spec.inputs).test
    with torch.no_grad():
        logits = model(torch.from_numpy(test.inputs["x"]))
    accuracy = (logits.argmax(1).numpy() == test.targets).mean()
    print(f"reloaded: step {meta['step']}, ranks {model.ranks()}, test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
