"""Training throughput of the paper's MNIST model, as a fraction of the machine's matmul roofline.

The paper's settings (section 5): 784-500-20 tanh encoder and decoder, Bernoulli likelihood,
SGVB estimator B (analytic KL), L = 1, minibatch M = 100, Adagrad (`paper_optimizer()`), weight
prior 1/N (`paper_model` default). Throughput is examples/s of `model.fit` in steady state
(median epoch, after a warm-up fit that traces the step), and is divided by the roofline
`peak / 4.1 MFLOP`, where `peak` is the float32 matmul FLOP/s measured in the same process just
before and after each measurement (see `_roofline.py`). Configurations are interleaved and
repeated; medians are printed.

Configurations (M = minibatch):
  defaults          `compile(optimizer=paper_optimizer())`, no flags: 100 steps per execution,
                    XLA blocks (keras_aevb.execution); input from `keras_aevb.data.make_dataset`
                    (dynamic binarization), as the CLI does.
  defaults numpy    the same, but `fit(x, batch_size=M)` on a NumPy array (Keras's own pipeline).
  jit=False spe=S   `compile(..., jit_compile=False, steps_per_execution=S)`: the lean loop of
                    keras_aevb.execution without XLA.
  keras loop        the defaults, but Keras 3's own multi-step loop (no lean loop, no blocks).
  keras adagrad     the defaults, but `keras.optimizers.Adagrad` (accumulator 0, epsilon 1e-8)
                    instead of `FusedAdagrad`.

    python benchmarks/train_throughput.py                # about 4 minutes on 2 cores
    python benchmarks/train_throughput.py --quick        # about 1 minute
    python benchmarks/train_throughput.py --profile      # where a step's time goes (profiler)
    python benchmarks/train_throughput.py --ceilings     # fit against plain TF and matmuls alone
    python benchmarks/train_throughput.py --peers --batch-sizes 100,20,1000
                                                         # against JAX and torch.compile

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
        self.times, self.cpu_times = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter(), time.process_time()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start[0])
        self.cpu_times.append(time.process_time() - self._start[1])


def build_model(keras_loop=False):
    """The paper's MNIST model; with `keras_loop`, Keras 3's own multi-step loop runs it."""
    import keras_aevb

    model = keras_aevb.paper_model("mnist", latent_dim=20, seed=0)
    if keras_loop:
        # Instance attributes shadow AEVB's overrides: Keras's Trainer methods run instead.
        model.make_train_function = lambda force=False: keras.Model.make_train_function(
            model, force
        )
        model.make_test_function = lambda force=False: keras.Model.make_test_function(model, force)
    return model


def make_fit_config(images, batch_size, epochs, compile_kwargs, feed, keras_loop=False,
                    optimizer=None):  # fmt: skip
    """Builds, compiles and warms up one model; returns a callable measuring examples/s."""
    import keras_aevb
    from keras_aevb import data

    model = build_model(keras_loop)
    model.compile(optimizer=optimizer or keras_aevb.paper_optimizer(), **compile_kwargs)
    if feed == "dataset":
        inputs = data.make_dataset(images, batch_size=batch_size, binarization="dynamic")
        fit_kwargs = {}
    else:
        inputs = data.binarize(images, "static", seed=0)
        fit_kwargs = {"batch_size": batch_size}
    model.fit(inputs, epochs=1, verbose=0, **fit_kwargs)  # traces (and compiles) the step

    def measure():
        timer = EpochTimer()
        model.fit(inputs, epochs=epochs, verbose=0, callbacks=[timer], **fit_kwargs)
        return _roofline.Rate(
            len(images) / statistics.median(timer.times),
            len(images) / statistics.median(timer.cpu_times),
        )

    return measure, model


def make_step_loop(images, batch_size, steps, jit_compile=False):
    """`train_step` looped inside one tf.function on one in-memory batch: no fit, no pipeline.

    With `jit_compile=True` the loop is one XLA computation, its noise drawn before it (as the
    XLA blocks of `fit` do): the step itself, with nothing around it.
    """
    import tensorflow as tf

    from keras_aevb import data

    model = build_model()
    model.compile(optimizer=__import__("keras_aevb").paper_optimizer())
    model.optimizer.build(model.trainable_variables)
    batch = tf.constant(data.binarize(images[:batch_size], "static", seed=0))

    if jit_compile:
        eps = model.block_noise(steps, batch_size)
        step = model.block_step()

        @tf.function(jit_compile=True)
        def xla_loop(eps):
            _, loss = tf.while_loop(
                lambda k, loss: k < steps,
                lambda k, loss: (k + 1, step(batch, eps[k])["loss"]),
                (tf.constant(0), tf.constant(0.0)),
            )
            return loss

        def loop(n):
            return xla_loop(eps)
    else:

        @tf.function
        def loop(n):
            loss = tf.constant(0.0)
            for _ in tf.range(n):
                loss = model.train_step(batch)["loss"]
            return loss

    loop(tf.constant(steps)).numpy()  # traces, compiles and warms up (XLA's first runs are slow)

    def measure():
        def run():
            loop(tf.constant(steps)).numpy()
            return steps * batch_size

        return _roofline.timed(run)

    return measure


def make_matmul_only_loop(batch_size, steps, jit_compile=False):
    """Only the 11 matrix products of a training step (forward, weight and input gradients).

    The ceiling of any implementation on TensorFlow's kernels: everything else removed.
    """
    import tensorflow as tf

    b = batch_size
    x, h = tf.random.normal((b, 784)), tf.random.normal((b, 500))
    z, d40, d784 = tf.random.normal((b, 20)), tf.random.normal((b, 40)), tf.random.normal((b, 784))
    w1, w2 = tf.random.normal((784, 500)), tf.random.normal((500, 40))
    w3, w4 = tf.random.normal((20, 500)), tf.random.normal((500, 784))

    @tf.function(jit_compile=jit_compile)
    def loop(n):
        total = tf.constant(0.0)
        for _ in tf.range(n):
            # Operands that change every step (as activations do), so that no product is
            # loop-invariant (XLA would hoist it out of the loop); the adds cost ~1 %.
            tiny = total * 1e-30
            x_, h_, z_, d40_, d784_ = (a + tiny for a in (x, h, z, d40, d784))
            products = [
                x_ @ w1,
                h_ @ w2,
                z_ @ w3,
                h_ @ w4,
                tf.matmul(x_, h_, transpose_a=True),
                tf.matmul(h_, d40_, transpose_a=True),
                tf.matmul(z_, h_, transpose_a=True),
                tf.matmul(h_, d784_, transpose_a=True),
                tf.matmul(d40_, w2, transpose_b=True),
                tf.matmul(h_, w3, transpose_b=True),
                tf.matmul(d784_, w4, transpose_b=True),
            ]
            # A sum of each keeps every product whole (XLA would compute one element of a
            # product of which one element is used); the sums cost ~1 % of the products.
            total += tf.add_n([tf.reduce_sum(p) for p in products])
        return total

    loop(tf.constant(steps)).numpy()  # traces, compiles and warms up (XLA's first runs are slow)
    return lambda: _roofline.timed(lambda: (loop(tf.constant(steps)).numpy(), steps * b)[1])


def make_plain_tf_loop(batch_size, steps, jit_compile=False):
    """The paper's step written directly in TensorFlow: no Keras, no TFP, no input pipeline.

    Same model, same maths as `train_step` with `paper_optimizer()` and weight decay 1/N
    (Bernoulli log-density in closed form, Keras's Adagrad update written out), on one
    in-memory batch: what TensorFlow itself allows, with (`jit_compile=True`) or without XLA.
    """
    import tensorflow as tf

    shapes = [(784, 500), (500,), (500, 20), (20,), (500, 20), (20,)]
    shapes += [(20, 500), (500,), (500, 784), (784,)]
    weights = [tf.Variable(tf.random.normal(s, stddev=0.01)) for s in shapes]
    accumulators = [tf.Variable(tf.zeros(s)) for s in shapes]
    rng = np.random.default_rng(0)
    x = tf.constant((rng.random((batch_size, 784)) < 0.3).astype("float32"))

    @tf.function(jit_compile=jit_compile)
    def loop(n):
        loss = tf.constant(0.0)
        for _ in tf.range(n):
            w = weights
            with tf.GradientTape() as tape:
                h = tf.tanh(x @ w[0] + w[1])
                mu, log_var = h @ w[2] + w[3], h @ w[4] + w[5]
                z = mu + tf.exp(0.5 * log_var) * tf.random.normal(tf.shape(mu))
                logits = tf.tanh(z @ w[6] + w[7]) @ w[8] + w[9]
                reconstruction = tf.reduce_sum(x * logits - tf.nn.softplus(logits), -1)
                kl = -0.5 * tf.reduce_sum(1 + log_var - mu**2 - tf.exp(log_var), -1)
                loss = -tf.reduce_mean(reconstruction - kl)
            gradients = tape.gradient(loss, w)
            for v, a, g in zip(w, accumulators, gradients, strict=True):
                g = g + (1.0 / 60_000) * v
                a.assign_add(g * g)
                v.assign_sub(0.02 * g / tf.sqrt(a + 1e-8))
        return loss

    loop(tf.constant(steps)).numpy()  # traces, compiles and warms up (XLA's first runs are slow)
    return lambda: _roofline.timed(
        lambda: (loop(tf.constant(steps)).numpy(), steps * batch_size)[1]
    )


# Op types grouped by what they do in a paper-model training step, for --profile.
OP_GROUPS = {
    "matmul": ("MatMul", "_MklMatMul", "_MklNativeFusedMatMul", "BatchMatMulV2"),
    "optimizer": ("AssignAddVariableOp", "AssignSubVariableOp", "Rsqrt", "Sqrt", "RealDiv"),
}


def profile_step(images, batch_size, steps):
    """Self time per op type of `steps` train steps, from the TensorFlow profiler.

    Returns a list of (share of all op time, milliseconds per step, op type, example op name),
    largest first. Ops are attributed by name: those under `adagrad/` are the optimizer's, the
    weight-prior term and the Bernoulli log-density are recognised by their scope names.
    """
    import glob
    import json
    import tempfile

    import tensorflow as tf
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin

    loop = make_step_loop(images, batch_size, steps)
    loop()
    logdir = tempfile.mkdtemp(prefix="aevb_profile_")
    tf.profiler.experimental.start(logdir)
    loop()
    tf.profiler.experimental.stop()
    path = sorted(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True))[-1]
    raw, _ = _pywrap_profiler_plugin.xspace_to_tools_data([path], "framework_op_stats", {})
    table = json.loads(raw)[0]
    columns = [c["id"] for c in table["cols"]]
    groups, total = {}, 0.0
    for row in table["rows"]:
        cells = dict(zip(columns, [c.get("v") for c in row["c"]], strict=True))
        op_type, name = cells["type"], cells["operation"]
        if op_type == "IDLE":
            continue
        self_time = float(cells["total_self_time"])
        total += self_time
        if "adagrad" in name or "/optimizer" in name:
            group = "optimizer update (Adagrad)"
        elif op_type in OP_GROUPS["matmul"]:
            group = "matmul (dense layers, forward and backward)"
        elif "Bernoulli" in name or "log_likelihood" in name:
            group = "Bernoulli log-likelihood and its gradient"
        elif "weight_prior" in name:
            group = "weight prior gradient (weight_decay * theta)"
        else:
            group = "other element-wise and bookkeeping ops"
        groups[group] = groups.get(group, 0.0) + self_time
    return sorted(((t / total, t / 1e3 / steps, g) for g, t in groups.items()), reverse=True)


def ceilings(images, m, args):
    """fit at the defaults against the step with less and less around it (same run)."""
    steps = max(20, 10_000 // m)
    configs = {}
    for jit in (False, True):
        configs[f"matmuls only jit={jit}"] = make_matmul_only_loop(m, steps, jit)
    for jit in (False, True):
        configs[f"plain TF step jit={jit}"] = make_plain_tf_loop(m, steps, jit)
        configs[f"train_step loop jit={jit}"] = make_step_loop(images, m, steps, jit_compile=jit)
    configs["fit, defaults"], _ = make_fit_config(images, m, args.epochs, {}, "dataset")
    results = _roofline.interleaved(configs, args.repeats)
    _roofline.print_peaks(results)
    print()
    print(f"ratios at M = {m} (examples/s over the matmul roofline measured alongside, medians):")
    summaries = {}
    for name in configs:
        s = _roofline.ratio_summary(results[name], FLOPS_PER_EXAMPLE)
        summaries[name] = s
        print(
            f"  {name:24s} {s['rate']:8.0f} examples/s  {s['fraction']:.3f}"
            f" ({s['fraction_min']:.2f}-{s['fraction_max']:.2f})  cpu-time {s['cpu_fraction']:.3f}"
        )
    return summaries


def make_peer_config(trainer_class, images, batch_size, epochs):
    """A peer (benchmarks/peers/) on the same model and protocol; warmed up by one epoch."""
    trainer = trainer_class(images, batch_size=batch_size, seed=0)
    trainer.train_epoch()  # traces and compiles

    def measure():
        rates = []
        for _ in range(epochs):
            rates.append(_roofline.timed(lambda: (trainer.train_epoch(), len(images))[1]))
        return _roofline.Rate(
            statistics.median(r.wall for r in rates), statistics.median(r.cpu for r in rates)
        )

    return measure


def peer_classes():
    """`{name: trainer class}` of the peers whose framework is installed (`.[bench]`)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers"))
    classes, missing = {}, []
    try:
        import jax_peer

        classes["jax"] = jax_peer.Trainer
    except ImportError:
        missing.append("jax")
    try:
        import torch_peer

        classes["torch eager"] = torch_peer.EagerTrainer
        classes["torch.compile"] = torch_peer.CompiledTrainer
    except ImportError:
        missing.append("torch")
    if missing:
        print(f"peers skipped (not installed: {', '.join(missing)}; pip install -e '.[bench]')")
    return classes


def peers(images, batch_sizes, args):
    """keras_aevb's defaults against the JAX and PyTorch peers, interleaved, per batch size."""
    classes = peer_classes()
    summaries = {}
    for m in batch_sizes:
        configs = {}
        configs[f"keras_aevb M={m}"], _ = make_fit_config(images, m, args.epochs, {}, "dataset")
        configs[f"keras_aevb numpy M={m}"], _ = make_fit_config(images, m, args.epochs, {}, "numpy")
        for name, cls in classes.items():
            if name == "torch eager" and m != batch_sizes[0]:
                continue  # the slowest peer: measured at the first batch size only
            configs[f"{name} M={m}"] = make_peer_config(cls, images, m, args.epochs)
        results = _roofline.interleaved(configs, args.repeats)
        _roofline.print_peaks(results)
        reference = f"keras_aevb M={m}"
        print(
            f"{'system':28s} {'examples/s':>10s} {'fraction':>8s} {'(min-max)':>11s}"
            f" {'keras_aevb / system (paired)':>29s}"
        )
        for name in configs:
            s = _roofline.ratio_summary(results[name], FLOPS_PER_EXAMPLE)
            s["keras_aevb_over"] = _roofline.paired_speedups(results[reference], results[name])
            summaries[name] = s
            print(
                f"{name:28s} {s['rate']:10.0f} {s['fraction']:8.3f}"
                f" ({s['fraction_min']:.2f}-{s['fraction_max']:.2f}) {s['keras_aevb_over']:28.2f}x"
            )
        print()
    return summaries


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=20_000, help="examples per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", default="100,500,1000")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quick", action="store_true", help="fewer configs and examples")
    parser.add_argument(
        "--profile", action="store_true", help="only print where a step's time goes (M = first)"
    )
    parser.add_argument(
        "--ceilings",
        action="store_true",
        help="only compare fit with what TensorFlow allows: matmuls alone, the step in plain "
        "TensorFlow, the model's train_step without fit (M = first)",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="only compare keras_aevb's defaults with the JAX and PyTorch peers of "
        "benchmarks/peers/ (interleaved, each batch size of --batch-sizes)",
    )
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

    m = batch_sizes[0]
    if args.profile:
        print(f"\nwhere a training step's time goes at M = {m}, without XLA (TF profiler):")
        for share, ms, group in profile_step(images, m, 50):
            print(f"  {share:6.1%}  {ms:6.2f} ms/step  {group}")
        return None

    if args.ceilings:
        return ceilings(images, m, args)

    if args.peers:
        return peers(images, batch_sizes, args)

    configs, notes = {}, {}
    configs[f"defaults M={m}"], model = make_fit_config(images, m, args.epochs, {}, "dataset")
    notes[f"defaults M={m}"] = (
        f"xla_blocks={model.xla_blocks}, jit_compile={model.jit_compile}, "
        f"steps_per_execution={model.steps_per_execution}"
    )
    configs[f"defaults numpy M={m}"], _ = make_fit_config(images, m, args.epochs, {}, "numpy")
    spes = (1, 100) if args.quick else (1, 10, 100)
    for spe in spes:
        kwargs = {"jit_compile": False, "steps_per_execution": spe}
        configs[f"jit=False spe={spe} M={m}"], _ = make_fit_config(
            images, m, args.epochs, kwargs, "dataset"
        )
    configs[f"keras loop M={m}"], _ = make_fit_config(
        images, m, args.epochs, {}, "dataset", keras_loop=True
    )
    configs[f"keras adagrad M={m}"], _ = make_fit_config(
        images, m, args.epochs, {}, "dataset",
        optimizer=keras.optimizers.Adagrad(0.02, initial_accumulator_value=0.0, epsilon=1e-8),
    )  # fmt: skip
    for b in batch_sizes[1:]:
        configs[f"defaults M={b}"], _ = make_fit_config(images, b, args.epochs, {}, "dataset")

    results = _roofline.interleaved(configs, args.repeats)
    _roofline.print_peaks(results)
    print()
    baseline = f"jit=False spe=1 M={m}"
    print(
        f"{'config':24s} {'examples/s':>10s} {'roofline':>9s} {'fraction':>8s} {'(min-max)':>11s}"
        f" {'cpu-time':>8s} {'vs ' + baseline:>24s}"
    )
    summaries = {}
    for name in configs:
        s = _roofline.ratio_summary(results[name], FLOPS_PER_EXAMPLE)
        s["speedup"] = _roofline.paired_speedups(results[name], results[baseline])
        summaries[name] = s
        note = f"  [{notes[name]}]" if name in notes else ""
        print(
            f"{name:24s} {s['rate']:10.0f} {s['roofline_rate']:9.0f} {s['fraction']:8.3f}"
            f" ({s['fraction_min']:.2f}-{s['fraction_max']:.2f}) {s['cpu_fraction']:8.3f}"
            f" {s['speedup']:23.2f}x{note}"
        )
    print()
    print(
        "ratios (examples/s over the matmul roofline measured alongside, medians; cpu-time: the "
        "same per CPU-second of this process):"
    )
    for name, s in summaries.items():
        print(f"  {name}: {s['fraction']:.3f} (cpu-time {s['cpu_fraction']:.3f})")
    return summaries


if __name__ == "__main__":
    main()
