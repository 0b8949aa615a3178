"""Run an exported model with onnxruntime on the digits test samples and print its accuracy.

Usage: python examples/run_export.py runs/default/export [--spec graphs/default.yaml] [--variant int8]

The executor needs only numpy and onnxruntime; the data loading here uses the toolkit (to get the
exact test split the run was trained against).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from toolkit.runtime import Executor, SessionConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir")
    parser.add_argument("--spec", default="graphs/default.yaml", help="the spec the run was trained from")
    parser.add_argument("--variant", default="fp32", help="fp32 or int8 (when exported with --quantize int8)")
    parser.add_argument("--memory-budget", type=int, default=None, help="bytes; streams the stages when set")
    args = parser.parse_args()

    from toolkit.data import load_data
    from toolkit.spec import load_spec

    spec = load_spec(args.spec)
    test = load_data(spec.train.data, spec.inputs).test
    ex = Executor(
        args.export_dir,
        providers="auto",
        memory_budget=args.memory_budget,
        session_options=SessionConfig(intra_op_threads=1),
        variant=args.variant,
    )
    t0 = time.perf_counter()
    outputs = ex.run(test.inputs)
    elapsed = time.perf_counter() - t0
    logits = outputs[ex.output_names[0]]
    accuracy = float(np.mean(logits.argmax(1) == test.targets))
    print(
        f"{ex.manifest.name}: {len(ex.units)} stages ({ex.variant}, {ex.mode}, {ex.providers[0]}), "
        f"{len(test)} digits test samples in {elapsed * 1e3:.1f} ms, accuracy {100 * accuracy:.2f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
