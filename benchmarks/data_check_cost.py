"""What the per-batch data check costs a training step of the paper's MNIST model.

Every batch is checked inside the compiled step (keras_aevb.inputs: sum, min and max of the
batch; keras_aevb.execution.DataGuard records the first bad one, and each execution keeps a
copy of the training state to restore if one is found). This script trains the paper's model
(784-500-20, M = 100, estimator B, `paper_optimizer`, `make_dataset` with dynamic
binarization, the library's defaults: XLA blocks, 100 steps per execution) with the check and
with it replaced by the bare reshape, in interleaved rounds, and prints the median examples/s
of each and their ratio (the check's cost as a fraction of a step).

    python benchmarks/data_check_cost.py            # about 3 minutes on 2 cores
    python benchmarks/data_check_cost.py --rounds 3 --examples 10000

Run it on a quiet machine: the two configurations share the CPU in turn, so load from other
processes moves both, but noise of a few percent needs several rounds.
"""

import argparse
import statistics
import time

import numpy as np

import keras_aevb
from keras_aevb import data, execution
from keras_aevb.model import AEVB


def _images(num_examples):
    try:
        images, _ = data.load_mnist(data.default_data_dir(), split="train")
    except Exception:  # noqa: BLE001 - no MNIST here: random grey images run at the same speed
        images = np.random.default_rng(0).random((num_examples, 28, 28), dtype=np.float32)
    return images[:num_examples]


def _examples_per_second(images, checked, epochs):
    original = AEVB.check_step_data
    if not checked:
        AEVB.check_step_data = lambda self, x: self.as_event(x)
        saved_copy = execution.training_state
        execution.training_state = lambda model: []  # no state copy per execution either
    try:
        model = keras_aevb.paper_model("mnist", latent_dim=20, seed=0)
        model.compile(optimizer=keras_aevb.paper_optimizer(0.02))
        dataset = data.make_dataset(images, 100, "dynamic", seed=0)
        model.fit(dataset, epochs=1, verbose=0)  # traces and compiles
        start, cpu = time.perf_counter(), time.process_time()
        model.fit(dataset, epochs=epochs, verbose=0)
        examples = epochs * len(images)
        return examples / (time.perf_counter() - start), examples / (time.process_time() - cpu)
    finally:
        AEVB.check_step_data = original
        if not checked:
            execution.training_state = saved_copy


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    images = _images(args.examples)
    results = {True: [], False: []}
    for round_index in range(args.rounds):
        order = (True, False) if round_index % 2 == 0 else (False, True)
        for checked in order:
            results[checked].append(_examples_per_second(images, checked, args.epochs))
        print(
            f"round {round_index + 1}: checked {results[True][-1][0]:,.0f} ex/s "
            f"({results[True][-1][1]:,.0f} per CPU-second), unchecked "
            f"{results[False][-1][0]:,.0f} ex/s ({results[False][-1][1]:,.0f} per CPU-second)"
        )
    for index, clock in enumerate(("wall", "CPU")):
        ratios = [a[index] / b[index] for a, b in zip(results[True], results[False], strict=True)]
        checked, unchecked = (
            statistics.median(r[index] for r in results[k]) for k in (True, False)
        )
        print(
            f"{clock}: median examples/s checked {checked:,.0f}, unchecked {unchecked:,.0f}; "
            f"checked / unchecked: median of paired ratios {statistics.median(ratios):.4f} "
            f"(min {min(ratios):.4f}, max {max(ratios):.4f}); "
            f"cost {100 * (1 - statistics.median(ratios)):.2f} % of a step"
        )


if __name__ == "__main__":
    main()
