"""Size, load time and latency of the exported SavedModel of the paper's MNIST model.

    python benchmarks/serving_latency.py [--model RUN_DIR/model.keras] [--repeats 300]

Exports `keras_aevb.paper_model("mnist", 20)` (or the given .keras model) with
`keras_aevb.export_saved_model`, then measures, in this process:

- the size of the version directory (saved_model.pb + variables/ + the rest);
- `tf.saved_model.load` time, first load and the median of 5 later ones, and the time to a
  first answer (load + first call);
- p50 / p99 latency of the `serving_default` signature at batch 1 and batch 1000, called
  through the loaded signature (the C++ graph runtime behind a Python call: what TF Serving
  runs, without its gRPC/REST layer and JSON decoding);
- the same batches through the Keras model (`model.reconstruct`, eager) for a ratio;
- p50 / p99 of the `score` signature at batch 1000 (L decoder passes per example).

Latency does not depend on the weights' values, so an untrained model measures the same as a
trained one of the same size. The last lines printed are the figures.
"""

import argparse
import os
import pathlib
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

import keras_aevb
from keras_aevb.export import export_saved_model


def _directory_bytes(path):
    return sum(p.stat().st_size for p in pathlib.Path(path).rglob("*") if p.is_file())


def _latencies(fn, repeats, warmup=10):
    for _ in range(warmup):
        fn()
    seconds = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        fn()
        seconds[i] = time.perf_counter() - start
    return seconds * 1e3  # milliseconds


def _percentiles(ms):
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a .keras file; default: the paper's MNIST model, J=20")
    parser.add_argument("--repeats", type=int, default=300, help="timed calls at batch 1")
    args = parser.parse_args()

    if args.model is None:
        model = keras_aevb.paper_model("mnist", 20, seed=0)
    else:
        model = keras.saving.load_model(args.model, compile=False)
    rng = np.random.default_rng(0)
    batches = {
        size: (rng.random((size, *model.event_shape)) < 0.3).astype(np.float32)
        for size in (1, 1000)
    }
    repeats = {1: args.repeats, 1000: max(args.repeats // 10, 20)}

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = export_saved_model(model, os.path.join(tmp, "mnist_vae"), version=1)
        export_seconds = time.perf_counter() - start
        size = _directory_bytes(path)
        pb_size = os.path.getsize(os.path.join(path, "saved_model.pb"))
        variables_size = _directory_bytes(os.path.join(path, "variables"))

        start = time.perf_counter()
        loaded = tf.saved_model.load(path)
        serving = loaded.signatures["serving_default"]
        first_load = time.perf_counter() - start
        serving(x=tf.constant(batches[1]))
        first_answer = time.perf_counter() - start
        later_loads = []
        for _ in range(5):
            start = time.perf_counter()
            tf.saved_model.load(path)
            later_loads.append(time.perf_counter() - start)

        results = {}
        for size_, x in batches.items():
            x_tensor = tf.constant(x)
            saved = _latencies(lambda x_tensor=x_tensor: serving(x=x_tensor), repeats[size_])
            keras_eager = _latencies(lambda x=x: model.reconstruct(x), repeats[size_])
            results[size_] = (_percentiles(saved), _percentiles(keras_eager))
        # score: L decoder passes per example (L recorded in the export).
        score = loaded.signatures["score"]
        x_tensor = tf.constant(batches[1000])
        score_ms = _percentiles(_latencies(lambda: score(x=x_tensor), repeats[1000], warmup=3))
        score_l = int(loaded.score_num_samples.numpy())

    print(f"model: {model.name}, {model.count_params():,} parameters, event {model.event_shape}")
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores visible, load average "
        f"(1, 5, 15 min) {load}: other processes on the cores inflate the tails"
    )
    print(f"export time: {export_seconds:.2f} s")
    print(
        f"exported size: {size / 1e6:.2f} MB (saved_model.pb {pb_size / 1e3:.0f} kB, "
        f"variables/ {variables_size / 1e6:.2f} MB; float32 weights alone "
        f"{model.count_params() * 4 / 1e6:.2f} MB)"
    )
    print(
        f"load time: first {first_load:.3f} s, later loads median "
        f"{float(np.median(later_loads)):.3f} s; load + first answer {first_answer:.3f} s"
    )
    print(
        f"score batch 1000 (L = {score_l}): p50 {score_ms[0]:.1f} ms, p99 {score_ms[1]:.1f} ms "
        f"({score_ms[0] * 1e3 / 1000:.0f} us per example)"
    )
    for size_, ((p50, p99), (k50, k99)) in results.items():
        print(
            f"serving_default batch {size_}: p50 {p50:.3f} ms, p99 {p99:.3f} ms "
            f"({repeats[size_]} calls; {p50 * 1e3 / size_:.1f} us per example at p50) | "
            f"Keras eager model.reconstruct p50 {k50:.3f} ms, p99 {k99:.3f} ms | "
            f"Keras eager / SavedModel at p50: {k50 / p50:.1f}x"
        )


if __name__ == "__main__":
    main()
