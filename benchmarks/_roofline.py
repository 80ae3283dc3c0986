"""Shared timing helpers: the machine's float32 matmul peak and ratios measured against it.

The machines these benchmarks run on are shared and noisy, so no absolute speed is reported
alone: every throughput is divided by the matmul peak measured in the same process, in the
same minute, interleaved with it (peak, config A, config B, ..., peak, repeated), and the
medians are taken. The ratio `examples/s / roofline examples/s` is what the README quotes.

The roofline of a model is `peak FLOP/s / FLOPs per example`. For the paper's MNIST model
(784-500-J tanh encoder, J-500-784 decoder) the FLOPs per training example are counted in
`train_flops_per_example`: a dense layer `[n_in -> n_out]` costs 2 n_in n_out in the forward
pass, the same again for its weight gradient, and the same again for the gradient with respect
to its input, which the first layer does not need (x is data). Element-wise work (tanh,
softplus, the KL, the optimizer) is O(n) per weight or unit and is left out: it is not what
bounds a dense network, and counting it would flatter the ratio.
"""

import os
import statistics
import time

import numpy as np


def describe_machine():
    """One line naming the CPU, its core count and the load when the run started."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return f"{model}, {os.cpu_count()} cores, 1-min load average {load:.2f} at start"


def dense_layers(data_dim=784, hidden=500, latent_dim=20, posterior_params=2):
    """`(n_in, n_out, is_first)` of each dense layer of the paper's MLP AEVB model."""
    return [
        (data_dim, hidden, True),  # encoder hidden layer
        (hidden, posterior_params * latent_dim, False),  # mu and log sigma^2 heads
        (latent_dim, hidden, False),  # decoder hidden layer
        (hidden, data_dim, False),  # decoder logits
    ]


def forward_flops_per_example(layers):
    """2 n_in n_out per dense layer (one multiply and one add per weight)."""
    return sum(2 * n_in * n_out for n_in, n_out, _ in layers)


def train_flops_per_example(layers):
    """Forward + weight gradients + input gradients (none for the first layer).

    For 784-500-20 with L = 1: forward 1.628 MFLOP, weight gradients 1.628, input gradients
    0.844, in all 4.100 MFLOP per example.
    """
    forward = forward_flops_per_example(layers)
    input_grads = sum(2 * n_in * n_out for n_in, n_out, first in layers if not first)
    return 2 * forward + input_grads


def matmul_peak(seconds=0.6, n=1024, dtype="float32"):
    """Float32 FLOP/s of a square `n x n @ n x n` matmul in TensorFlow, best of short runs.

    TensorFlow's own kernel (oneDNN/Eigen on CPU) is what the model's dense layers run on, so
    its peak on a large square product is the fair ceiling. The best of ~6 short runs is taken
    (a peak is a maximum; noise only lowers it). The call runs inside a `tf.function` and the
    result is reduced to a scalar, so no copy to NumPy is timed.
    """
    import tensorflow as tf

    a = tf.random.normal([n, n], dtype=dtype)
    b = tf.random.normal([n, n], dtype=dtype)

    @tf.function
    def product_sum(a, b, reps):
        total = tf.constant(0.0, dtype)
        for _ in tf.range(reps):
            total += tf.reduce_sum(tf.matmul(a, b))
        return total

    flops = 2.0 * n**3
    reps = tf.constant(2)
    product_sum(a, b, reps).numpy()  # trace
    start = time.perf_counter()
    product_sum(a, b, reps).numpy()
    per_call = max((time.perf_counter() - start) / 2, 1e-6)
    reps = tf.constant(max(1, int(seconds / 6 / per_call)))
    best = 0.0
    for _ in range(6):
        start = time.perf_counter()
        product_sum(a, b, reps).numpy()
        elapsed = time.perf_counter() - start
        best = max(best, flops * int(reps) / elapsed)
    return best


def interleaved(configs, repeats, peak_seconds=0.6):
    """Measures each config's throughput between matmul-peak measurements, `repeats` times.

    Args:
        configs: dict name -> callable returning a throughput (units per second).
        repeats: rounds; each round is peak, every config, in a rotated order.
        peak_seconds: time spent per peak measurement.

    Returns:
        dict with "peak" (list of FLOP/s, one per measurement) and, per config name, a dict with
        "rates" (list) and "peaks" (the peak measured just before and after each rate, averaged),
        so a ratio can be formed per measurement and its median taken.
    """
    names = list(configs)
    results = {name: {"rates": [], "peaks": []} for name in names}
    peaks = [matmul_peak(peak_seconds)]
    for round_index in range(repeats):
        # Rotate the order so no config always runs right after the (cold) peak measurement.
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            before = peaks[-1]
            rate = configs[name]()
            after = matmul_peak(peak_seconds)
            peaks.append(after)
            results[name]["rates"].append(rate)
            results[name]["peaks"].append(0.5 * (before + after))
    results["peak"] = peaks
    return results


def ratio_summary(entry, flops_per_unit):
    """Median rate, median peak around it and median of the per-measurement roofline ratios."""
    rates = np.asarray(entry["rates"], dtype=float)
    peaks = np.asarray(entry["peaks"], dtype=float)
    ratios = rates * flops_per_unit / peaks
    return {
        "rate": statistics.median(rates),
        "peak_gflops": statistics.median(peaks) / 1e9,
        "roofline_rate": statistics.median(peaks) / flops_per_unit,
        "fraction": statistics.median(ratios),
        "fraction_min": float(ratios.min()),
        "fraction_max": float(ratios.max()),
    }
