"""Wake-sleep's training speed in XLA blocks (`jit_compile="auto"`) against step by step
(`jit_compile=False`): the paper's MNIST model (784-500-20), M = 100, 30,000 dynamically
binarized training images, two timed epochs after one warm-up epoch, three interleaved rounds.

    python benchmarks/wake_sleep_blocks.py

Run it with the machine to itself; BENCHMARKS.md ("Wake-sleep in XLA blocks") records a run.
"""

import time

import numpy as np

import keras_aevb
from keras_aevb import data

NUM_IMAGES = 30_000
ROUNDS = 3


def examples_per_second(images, jit_compile):
    model = keras_aevb.WakeSleep(
        keras_aevb.MLPEncoder(20, (500,)),
        keras_aevb.BernoulliDecoder((28, 28), (500,)),
        seed=0,
        weight_decay=1 / 60_000,
    )
    model.compile(optimizer=keras_aevb.paper_optimizer(0.02), jit_compile=jit_compile)
    dataset = data.make_dataset(images, 100, "dynamic", seed=0)
    model.fit(dataset, epochs=1, verbose=0)  # warm-up: traces and compiles
    start = time.perf_counter()
    model.fit(dataset, epochs=2, verbose=0)
    return 2 * len(images) / (time.perf_counter() - start)


def main():
    images = data.load_dataset("mnist", None, "train", "dynamic", seed=0)[0][:NUM_IMAGES]
    results = {"auto": [], False: []}
    for _ in range(ROUNDS):
        for jit_compile in results:
            results[jit_compile].append(examples_per_second(images, jit_compile))
    medians = {key: float(np.median(values)) for key, values in results.items()}
    for key, values in results.items():
        rounds = " / ".join(f"{v:,.0f}" for v in values)
        print(f"jit_compile={key!r}: {rounds}; median {medians[key]:,.0f} examples/s")
    print(f"blocks / step by step: {medians['auto'] / medians[False]:.2f}x")


if __name__ == "__main__":
    main()
