"""Importance-sampled log-likelihood throughput (K = 5000) as a fraction of the matmul roofline.

`keras_aevb.marginal_likelihood.log_likelihood(model, x, num_samples=K)` on the paper's MNIST
model (784-500-20, Bernoulli decoder). Each of the K samples of each example costs one decoder
pass, 2 * (20 * 500 + 500 * 784) = 0.804 MFLOP; the encoder runs once per example (0.82 MFLOP,
spread over K samples) and the log-densities of q and p(z) are 20-dimensional. The roofline is
`peak / FLOPs per (example, sample)` with the float32 matmul peak measured in the same process
just before and after each measurement (`_roofline.py`); configurations are interleaved and
repeated, and medians printed.

Configurations:
  default              `log_likelihood(model, x, num_samples=5000)`: chunks sized by the library.
  chunk=C              the same with `chunk_size=C` samples per compiled call.
  tfp log-density      the default, with the Bernoulli log-density through
                       `tfd.Bernoulli(logits).log_prob` instead of the decoder's closed form
                       (what `BernoulliDecoder.log_likelihood` did before; same values).

    python benchmarks/eval_throughput.py             # about 2 minutes on 2 cores

The last lines printed are the ratios.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _roofline  # noqa: E402
import numpy as np  # noqa: E402

LATENT_DIM, HIDDEN, DATA_DIM = 20, 500, 784
FLOPS_PER_SAMPLE = 2 * (LATENT_DIM * HIDDEN + HIDDEN * DATA_DIM)
ENCODER_FLOPS = 2 * (DATA_DIM * HIDDEN + HIDDEN * 2 * LATENT_DIM)


def flops_per_example_sample(num_samples):
    """Decoder pass per sample plus the encoder pass shared by the example's K samples."""
    return FLOPS_PER_SAMPLE + ENCODER_FLOPS / num_samples


def tfp_log_likelihood(self, x, logits):
    """log p(x|z) through TFP's Bernoulli, as `BernoulliDecoder` computed it before."""
    return self.distribution(logits).log_prob(x)


def make_config(x, num_samples, chunk_size=None, tfp_density=False):
    import keras_aevb
    from keras_aevb.marginal_likelihood import log_likelihood

    model = keras_aevb.paper_model("mnist", latent_dim=LATENT_DIM, seed=0)
    if tfp_density:
        # An instance attribute: this model alone uses TFP's form (its step is traced with it).
        model.decoder.log_likelihood = tfp_log_likelihood.__get__(model.decoder)

    def estimate():
        return log_likelihood(model, x, num_samples=num_samples, seed=0, chunk_size=chunk_size)

    estimate()  # traces the chunk step (and the partial last chunk)
    estimate.model = model

    def measure():
        def run():
            estimate()
            return len(x) * num_samples

        return _roofline.timed(run)

    return measure, estimate


def make_jax_config(x, num_samples, model, chunk=250):
    """The JAX peer (benchmarks/peers/jax_peer.py) on the same model's weights."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers"))
    import jax
    import jax_peer

    params = jax_peer.params_from_keras(model)
    flat = jax.numpy.asarray(x.reshape(len(x), -1))
    key = jax.random.key(0)

    def estimate():
        return np.asarray(jax_peer.log_likelihood(params, flat, num_samples, chunk, key))

    estimate()  # compiles

    def measure():
        return _roofline.timed(lambda: (estimate(), len(x) * num_samples)[1])

    return measure, estimate


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=20)
    parser.add_argument("--num-samples", type=int, default=5000, help="K")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunks", default="64,512", help="extra chunk sizes to compare")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument(
        "--peers", action="store_true", help="also the JAX peer (benchmarks/peers/jax_peer.py)"
    )
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf

    import keras_aevb
    from keras_aevb import data

    try:
        images, _ = data.load_mnist(args.data_dir or data.default_data_dir(), split="test")
        source = "MNIST test images, static binarization (seed 0)"
    except Exception:  # noqa: BLE001 - any missing-data error: synthetic data, same speed
        images = np.random.default_rng(0).random((args.examples, 28, 28), dtype=np.float32)
        source = "random images, static binarization (MNIST not found)"
    x = data.binarize(images[: args.examples], "static", seed=0)
    k = args.num_samples
    flops = flops_per_example_sample(k)
    print(f"machine: {_roofline.describe_machine()}")
    print(
        f"tensorflow {tf.__version__}, keras {keras.__version__}, keras_aevb "
        f"{keras_aevb.__version__}; data: {source}; {len(x)} examples x K = {k} samples per "
        f"measurement, {args.repeats} repeats"
    )
    print(f"FLOPs per (example, sample): {flops / 1e6:.3f} M (decoder 784-500-20 + encoder / K)")

    configs = {}
    configs["default"], estimate = make_config(x, k)
    for chunk in [int(c) for c in args.chunks.split(",") if c]:
        configs[f"chunk={chunk}"], _ = make_config(x, k, chunk_size=chunk)
    configs["tfp log-density"], tfp_estimate = make_config(x, k, tfp_density=True)
    if args.peers:
        configs["jax peer"], jax_estimate = make_jax_config(x, k, estimate.model)
        difference = np.max(np.abs(jax_estimate() - estimate()))
        print(f"jax peer vs default, same weights: max |difference| {difference:.2e} nats")
    difference = np.max(np.abs(tfp_estimate() - estimate()))
    print(f"tfp log-density vs default, same seed: max |difference| {difference:.2e} nats")

    results = _roofline.interleaved(configs, args.repeats)
    _roofline.print_peaks(results)
    print()
    print(
        f"{'config':16s} {'ex*samples/s':>13s} {'roofline':>10s} {'fraction':>9s}  (min-max)"
        f"  {'cpu-time':>8s}"
    )
    summaries = {}
    for name in configs:
        s = _roofline.ratio_summary(results[name], flops)
        summaries[name] = s
        print(
            f"{name:16s} {s['rate']:13.0f} {s['roofline_rate']:10.0f} {s['fraction']:9.3f}"
            f"  ({s['fraction_min']:.2f}-{s['fraction_max']:.2f})  {s['cpu_fraction']:8.3f}"
        )
    print()
    print(
        "ratios (examples*samples/s over the matmul roofline measured alongside, medians; "
        "cpu-time: the same per CPU-second of this process):"
    )
    for name, s in summaries.items():
        print(
            f"  IS log-likelihood K={k} {name}: {s['fraction']:.3f} "
            f"(cpu-time {s['cpu_fraction']:.3f})"
        )
    return summaries


if __name__ == "__main__":
    main()
