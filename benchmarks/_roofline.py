"""Shared timing helpers: the machine's float32 matmul peak and ratios measured against it.

The machines these benchmarks run on are shared and noisy, so no absolute speed is reported
alone: every throughput is divided by the matmul peak measured in the same process, in the
same minute, interleaved with it (peak, config A, config B, ..., peak, repeated), and the
medians are taken. The ratio `examples/s / roofline examples/s` is what docs/speed.md quotes.

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
from typing import NamedTuple

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


class Rate(NamedTuple):
    """Units per second of wall time and per second of this process's CPU time (all threads)."""

    wall: float
    cpu: float


def timed(fn):
    """Runs `fn()` (which returns the units it processed) and returns its `Rate`."""
    wall, cpu = time.perf_counter(), time.process_time()
    units = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return Rate(units / max(wall, 1e-9), units / max(cpu, 1e-9))


def matmul_peak(seconds=0.6, n=1024, dtype="float32"):
    """Float32 FLOP/s of square `n x n @ n x n` matmuls in TensorFlow over about `seconds`.

    TensorFlow's own kernel (oneDNN/Eigen on CPU) is what the model's dense layers run on, so
    its speed on a large square product is the fair ceiling. The machine is shared, so the
    rate is the average over the whole window (not the best moment of it): the model measured
    next to it runs under the same kind of contention, and their ratio is what is reported.
    The loop runs inside one `tf.function` and the result is reduced to a scalar, so no copy to
    NumPy is timed. Returns a `Rate` in FLOP/s.
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
    product_sum(a, b, tf.constant(1)).numpy()  # trace
    start = time.perf_counter()
    product_sum(a, b, tf.constant(2)).numpy()
    per_call = max((time.perf_counter() - start) / 2, 1e-6)
    reps = max(1, int(seconds / per_call))

    def run():
        product_sum(a, b, tf.constant(reps)).numpy()
        return flops * reps

    return timed(run)


def interleaved(configs, repeats, peak_seconds=0.6):
    """Measures each config's throughput between matmul-peak measurements, `repeats` times.

    Args:
        configs: dict name -> callable returning a `Rate` (units per second).
        repeats: rounds; each round is peak, every config, in a rotated order.
        peak_seconds: time spent per peak measurement.

    Returns:
        dict with "peak" (list of `Rate` in FLOP/s, one per measurement), "load" (the 1-minute
        load average at each peak) and, per config name, a dict with "rates" (list of `Rate`)
        and "peaks" (the mean of the peaks measured just before and after each rate), so a
        ratio can be formed per measurement and its median taken.
    """
    names = list(configs)
    results = {name: {"rates": [], "peaks": []} for name in names}
    peaks, load = [matmul_peak(peak_seconds)], [os.getloadavg()[0]]
    for round_index in range(repeats):
        # Rotate the order so no config always runs right after the (cold) peak measurement.
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            before = peaks[-1]
            rate = configs[name]()
            after = matmul_peak(peak_seconds)
            peaks.append(after)
            load.append(os.getloadavg()[0])
            results[name]["rates"].append(rate)
            results[name]["peaks"].append(
                Rate(0.5 * (before.wall + after.wall), 0.5 * (before.cpu + after.cpu))
            )
    results["peak"] = peaks
    results["load"] = load
    return results


def ratio_summary(entry, flops_per_unit):
    """Medians of a config's rates and of its per-measurement roofline ratios.

    `fraction` is the wall-clock ratio (examples/s over the roofline examples/s, the figure the
    targets are stated in); `cpu_fraction` is the same ratio per CPU-second of this process,
    which a shared machine disturbs less (it is not a roofline fraction when the model leaves a
    core idle: idle time costs no CPU time).
    """
    wall = np.asarray([r.wall for r in entry["rates"]], dtype=float)
    cpu = np.asarray([r.cpu for r in entry["rates"]], dtype=float)
    peak_wall = np.asarray([p.wall for p in entry["peaks"]], dtype=float)
    peak_cpu = np.asarray([p.cpu for p in entry["peaks"]], dtype=float)
    ratios = wall * flops_per_unit / peak_wall
    cpu_ratios = cpu * flops_per_unit / peak_cpu
    return {
        "rate": statistics.median(wall),
        "peak_gflops": statistics.median(peak_wall) / 1e9,
        "roofline_rate": statistics.median(peak_wall) / flops_per_unit,
        "fraction": statistics.median(ratios),
        "fraction_min": float(ratios.min()),
        "fraction_max": float(ratios.max()),
        "cpu_fraction": statistics.median(cpu_ratios),
    }


def paired_speedups(entry, baseline):
    """Median over rounds of rate / baseline rate measured in the same round (wall clock)."""
    return statistics.median(
        a.wall / b.wall for a, b in zip(entry["rates"], baseline["rates"], strict=True)
    )


def print_peaks(results):
    peaks = np.asarray([p.wall for p in results["peak"]]) / 1e9
    load = np.asarray(results["load"])
    print(
        f"matmul peak (float32, 1024^3, TensorFlow): median {np.median(peaks):.0f} GFLOP/s, "
        f"range {peaks.min():.0f}-{peaks.max():.0f} over {len(peaks)} measurements; "
        f"1-min load average {load.min():.1f}-{load.max():.1f} (2 = both cores busy)"
    )
