"""Training throughput of the paper's MNIST model, as a fraction of the machine's matmul roofline.

The paper's settings (section 5): 784-500-20 tanh encoder and decoder, Bernoulli likelihood,
SGVB estimator B (analytic KL), L = 1, minibatch M = 100, Adagrad (`paper_optimizer()`), weight
prior 1/N (`paper_model` default). Throughput is examples/s of `model.fit` in steady state
(median epoch, after a warm-up fit that traces the step), and is divided by the roofline
`peak / 4.1 MFLOP`, where `peak` is the float32 matmul FLOP/s measured in the same process just
before and after each measurement (see `_roofline.py`). Configurations are interleaved and
repeated; medians are printed.

Configurations:
  defaults          `compile(optimizer=paper_optimizer())`, no flags; input from
                    `keras_aevb.data.make_dataset` (dynamic binarization), as the CLI does.
  defaults numpy    the same, but `fit(x, batch_size=M)` on a NumPy array (Keras's own pipeline).
  jit=J spe=S       `compile(..., jit_compile=J, steps_per_execution=S)`.
  step loop         the model's `train_step` run S times inside one `tf.function` on one batch in
                    memory: no `fit`, no input pipeline. The ceiling that `fit` can approach.
  proposed          (with --proposed) the defaults plus changes proposed for other modules
                    (defined below): Bernoulli log-likelihood in closed form and a fused Adagrad
                    kernel; measured here so the report can quote them.

    python benchmarks/train_throughput.py                # about 4 minutes on 2 cores
    python benchmarks/train_throughput.py --quick        # about 1 minute
    python benchmarks/train_throughput.py --proposed     # adds the proposed-change configs

The last lines printed are the ratios.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _roofline  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

FLOPS_PER_EXAMPLE = _roofline.train_flops_per_example(_roofline.dense_layers())


def load_images(num_examples, data_dir=None):
    """MNIST training images if found locally, else random grey images (speed is the same)."""
    from keras_aevb import data

    try:
        images, _ = data.load_mnist(data_dir or data.default_data_dir(), split="train")
        source = "MNIST training images"
    except Exception:  # noqa: BLE001 - any missing-data error: fall back to synthetic data
        images = np.random.default_rng(0).random((num_examples, 28, 28), dtype=np.float32)
        source = "random grey images (MNIST not found)"
    if len(images) < num_examples:
        images = np.concatenate([images] * (num_examples // len(images) + 1))
    return images[:num_examples], source


class EpochTimer(keras.callbacks.Callback):
    """Records the wall time of every epoch (iterator creation included, as a user sees it)."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


# ------------------------------------------------------------------------------------------
# Changes proposed for modules this benchmark's author does not own, measured here so their
# gain is a figure and not a guess. `install()` patches them in; `uninstall()` restores.
# ------------------------------------------------------------------------------------------


def bernoulli_log_likelihood_closed_form(self, x, logits):
    """log p(x|z) = sum_i x_i l_i - softplus(l_i): the Bernoulli log-density from logits.

    Equal to `tfd.Bernoulli(logits=l).log_prob(x)` summed over the event (TFP computes
    -sigmoid_cross_entropy_with_logits, the same value) in 3 element-wise ops instead of TFP's
    ~8 and their gradients; finite for logits of any size (softplus is computed stably).
    """
    axes = tuple(range(-self.event_ndims, 0))
    return ops.sum(x * logits - ops.softplus(logits), axis=axes)


class FusedAdagrad(keras.optimizers.Adagrad):
    """Adagrad as Duchi et al. and PyTorch write it, in TensorFlow's one fused kernel per weight.

        accumulator += g^2;   theta -= lr * g / (sqrt(accumulator) + epsilon)

    `ResourceApplyAdagradV2` reads theta, g and the accumulator once and writes theta and the
    accumulator once; Keras's Adagrad spends 6 element-wise ops (and their memory passes) per
    weight. Note the epsilon: Keras divides by sqrt(accumulator + epsilon), this kernel (like
    PyTorch) by sqrt(accumulator) + epsilon; the two differ only while accumulator ~ epsilon.
    """

    def __init__(self, learning_rate=0.02, initial_accumulator_value=0.0, epsilon=1e-8, **kw):
        super().__init__(
            learning_rate=learning_rate,
            initial_accumulator_value=initial_accumulator_value,
            epsilon=epsilon,
            **kw,
        )

    def update_step(self, gradient, variable, learning_rate):
        import tensorflow as tf

        accumulator = self._accumulators[self._get_variable_index(variable)]
        tf.raw_ops.ResourceApplyAdagradV2(
            var=variable.handle,
            accum=accumulator.value.handle,
            lr=tf.cast(learning_rate, variable.dtype),
            epsilon=tf.cast(self.epsilon, variable.dtype),
            grad=tf.cast(gradient, variable.dtype),
        )


_ORIGINALS = {}


def install_proposed():
    from keras_aevb.decoder import BernoulliDecoder

    _ORIGINALS.setdefault("log_likelihood", BernoulliDecoder.log_likelihood)
    BernoulliDecoder.log_likelihood = bernoulli_log_likelihood_closed_form


def uninstall_proposed():
    from keras_aevb.decoder import BernoulliDecoder

    if "log_likelihood" in _ORIGINALS:
        BernoulliDecoder.log_likelihood = _ORIGINALS["log_likelihood"]


def make_fit_config(images, batch_size, epochs, compile_kwargs, feed, proposed=False):
    """Builds, compiles and warms up one model; returns a callable measuring examples/s."""
    import keras_aevb
    from keras_aevb import data

    if proposed:
        install_proposed()
    try:
        model = keras_aevb.paper_model("mnist", latent_dim=20, seed=0)
        optimizer = FusedAdagrad(0.02) if proposed else keras_aevb.paper_optimizer()
        model.compile(optimizer=optimizer, **compile_kwargs)
        if feed == "dataset":
            inputs = data.make_dataset(images, batch_size=batch_size, binarization="dynamic")
            fit_kwargs = {}
        else:
            inputs = data.binarize(images, "static", seed=0)
            fit_kwargs = {"batch_size": batch_size}
        model.fit(inputs, epochs=1, verbose=0, **fit_kwargs)  # traces the step
    finally:
        if proposed:
            uninstall_proposed()

    def measure():
        if proposed:
            install_proposed()
        try:
            timer = EpochTimer()
            model.fit(inputs, epochs=epochs, verbose=0, callbacks=[timer], **fit_kwargs)
        finally:
            if proposed:
                uninstall_proposed()
        return len(images) / statistics.median(timer.times)

    return measure, model


def make_step_loop(images, batch_size, steps):
    """`train_step` looped inside one tf.function on one in-memory batch: no fit, no pipeline."""
    import tensorflow as tf

    import keras_aevb
    from keras_aevb import data

    model = keras_aevb.paper_model("mnist", latent_dim=20, seed=0)
    model.compile(optimizer=keras_aevb.paper_optimizer())
    model.optimizer.build(model.trainable_variables)
    batch = tf.constant(data.binarize(images[:batch_size], "static", seed=0))

    @tf.function
    def loop(n):
        loss = tf.constant(0.0)
        for _ in tf.range(n):
            loss = model.train_step(batch)["loss"]
        return loss

    loop(tf.constant(2))

    def measure():
        start = time.perf_counter()
        loop(tf.constant(steps)).numpy()
        return steps * batch_size / (time.perf_counter() - start)

    return measure


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=20_000, help="examples per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", default="100,500,1000")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quick", action="store_true", help="fewer configs and examples")
    parser.add_argument("--proposed", action="store_true", help="also measure proposed changes")
    args = parser.parse_args(argv)
    if args.quick:
        args.examples, args.repeats, args.batch_sizes = 10_000, 2, "100,1000"

    import tensorflow as tf

    import keras_aevb

    images, source = load_images(args.examples, args.data_dir)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"machine: {_roofline.describe_machine()}")
    print(
        f"tensorflow {tf.__version__}, keras {keras.__version__}, keras_aevb "
        f"{keras_aevb.__version__}; data: {source}, {args.examples} examples per epoch, "
        f"{args.epochs} timed epochs per measurement, {args.repeats} repeats"
    )
    print(f"FLOPs per training example: {FLOPS_PER_EXAMPLE / 1e6:.3f} M (784-500-20, L = 1)")

    configs, notes = {}, {}
    m = batch_sizes[0]
    configs[f"defaults M={m}"], model = make_fit_config(images, m, args.epochs, {}, "dataset")
    notes[f"defaults M={m}"] = (
        f"jit_compile={model.jit_compile}, steps_per_execution={model.steps_per_execution}"
    )
    configs[f"defaults numpy M={m}"], _ = make_fit_config(images, m, args.epochs, {}, "numpy")
    grid = [(False, 1), (True, 1), (False, 100), (True, 100)]
    if not args.quick:
        grid[2:2] = [(False, 10)]
    for jit, spe in grid:
        kwargs = {"jit_compile": jit, "steps_per_execution": spe}
        configs[f"jit={jit} spe={spe} M={m}"], _ = make_fit_config(
            images, m, args.epochs, kwargs, "dataset"
        )
    configs[f"step loop M={m}"] = make_step_loop(images, m, steps=max(20, 4000 // m))
    for b in batch_sizes[1:]:
        configs[f"defaults M={b}"], _ = make_fit_config(images, b, args.epochs, {}, "dataset")
    if args.proposed:
        for b in batch_sizes[:1] + batch_sizes[-1:]:
            configs[f"proposed M={b}"], _ = make_fit_config(
                images, b, args.epochs, {}, "dataset", proposed=True
            )

    results = _roofline.interleaved(configs, args.repeats)
    peaks = np.asarray(results["peak"]) / 1e9
    print(
        f"matmul peak (float32, 1024^3, TensorFlow): median {np.median(peaks):.0f} GFLOP/s, "
        f"range {peaks.min():.0f}-{peaks.max():.0f} over {len(peaks)} measurements"
    )
    print()
    print(f"{'config':28s} {'examples/s':>11s} {'roofline':>9s} {'fraction':>9s}  (min-max)")
    summaries = {}
    for name in configs:
        s = _roofline.ratio_summary(results[name], FLOPS_PER_EXAMPLE)
        summaries[name] = s
        note = f"  [{notes[name]}]" if name in notes else ""
        print(
            f"{name:28s} {s['rate']:11.0f} {s['roofline_rate']:9.0f} {s['fraction']:9.3f}"
            f"  ({s['fraction_min']:.2f}-{s['fraction_max']:.2f}){note}"
        )
    print()
    print("ratios (examples/s over the matmul roofline measured alongside; medians):")
    for name, s in summaries.items():
        print(f"  {name}: {s['fraction']:.3f}")
    return summaries


if __name__ == "__main__":
    main()
