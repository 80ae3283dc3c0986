"""Wake-sleep's training speed in XLA blocks (`jit_compile="auto"`) against step by step
(`jit_compile=False`): the paper's MNIST model (784-500-20), M = 100, 30,000 dynamically
binarized training images, two timed epochs after one warm-up epoch, three interleaved rounds.

    python benchmarks/wake_sleep_blocks.py
"""

import time

import numpy as np

import keras_aevb
from keras_aevb import data

x = data.load_dataset("mnist", None, "train", "dynamic", seed=0)[0][:30000]


def run(jit):
    m = keras_aevb.WakeSleep(
        *[keras_aevb.MLPEncoder(20, (500,)), keras_aevb.BernoulliDecoder((28, 28), (500,))],
        seed=0,
        weight_decay=1 / 60000,
    )
    m.compile(optimizer=keras_aevb.paper_optimizer(0.02), jit_compile=jit)
    ds = data.make_dataset(x, 100, "dynamic", seed=0)
    m.fit(ds, epochs=1, verbose=0)  # warm-up: traces
    t = time.perf_counter()
    h = m.fit(ds, epochs=2, verbose=0)
    dt = time.perf_counter() - t
    return 60000 / dt, h.history["elbo"][-1]


res = {"auto": [], False: []}
for r in range(3):
    for jit in ("auto", False):
        res[jit].append(run(jit))
for k, v in res.items():
    print(
        k,
        "examples/s",
        [round(a) for a, _ in v],
        "median",
        round(float(np.median([a for a, _ in v]))),
        "elbo",
        [round(b, 2) for _, b in v],
    )
