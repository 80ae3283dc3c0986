"""How fit/evaluate run steps (keras_aevb.execution): exact step counts and XLA blocks (issue 9).

Speed changes must not change results: XLA blocks draw the same eps, step for step, as the
step-by-step loop, so the same seed trains the same weights either way (to float32 rounding).
Tiny model, tiny data: seconds per test (each XLA block compiles once, ~1 s).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_aevb
from keras_aevb import execution, xla_blocks
from keras_aevb.families import FAMILIES

EVENT = (4, 4)
EXPLICIT = sorted(name for name, family in FAMILIES.items() if family.g is not None)
IMPLICIT = sorted(name for name, family in FAMILIES.items() if family.g is None)


def tiny_model(posterior="normal", seed=0, weight_decay=0.01, cls=keras_aevb.AEVB):
    init = keras.initializers.RandomNormal(stddev=0.3, seed=seed)
    encoder = keras_aevb.MLPEncoder(
        2, (8,), posterior=posterior, kernel_initializer=init, bias_initializer=init
    )
    decoder = keras_aevb.BernoulliDecoder(EVENT, (8,), kernel_initializer=init)
    prior = "standard_normal" if posterior == "normal" else posterior
    model = cls(encoder, decoder, posterior=posterior, prior=prior, seed=seed,
                weight_decay=weight_decay)  # fmt: skip
    model.build()
    return model


@pytest.fixture
def binary_data():
    return (np.random.default_rng(0).random((96, *EVENT)) < 0.4).astype("float32")


def count_blocks(model):
    """Counts the XLA blocks that RUN (not traced: `tf.cond` traces both branches).

    The block's noise draw (one per block, in the branch that runs the block) increments a
    variable, which changes only when that branch executes.
    """
    executed = tf.Variable(0, dtype=tf.int64, trainable=False)
    draw = model.block_noise

    def counting(steps, batch_size):
        with tf.control_dependencies([executed.assign_add(1)]):
            return draw(steps, batch_size)

    model.block_noise = counting
    return executed


def train(data, posterior="normal", epochs=2, cls=keras_aevb.AEVB, **compile_kwargs):
    model = tiny_model(posterior, cls=cls)
    model.compile(optimizer=keras_aevb.paper_optimizer(0.05), **compile_kwargs)
    history = model.fit(data, epochs=epochs, verbose=0)
    return model, history.history


def assert_same_training(a, b):
    # Tolerance: the same ops on the same data and noise; XLA fuses and reorders float32
    # arithmetic, which moved weights by ~1e-7 over 12 steps here.
    for x, y in zip(a[0].get_weights(), b[0].get_weights(), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(a[1]["loss"], b[1]["loss"], rtol=1e-5)


@pytest.mark.parametrize(
    "posterior",
    # The Gaussian in the fast run; every other family (an XLA compile each) in the slow run.
    [name if name == "normal" else pytest.param(name, marks=pytest.mark.slow) for name in EXPLICIT],
)
def test_xla_blocks_train_like_single_steps(binary_data, posterior):
    data = tf.data.Dataset.from_tensor_slices(binary_data).batch(16)  # 6 full batches
    stepwise = train(data, posterior, steps_per_execution=3, jit_compile=False)
    model = tiny_model(posterior)
    model.compile(optimizer=keras_aevb.paper_optimizer(0.05), steps_per_execution=3)
    assert model.xla_blocks and model.uses_xla_blocks()
    executed = count_blocks(model)
    history = model.fit(data, epochs=2, verbose=0)
    # 6 full batches per epoch, executions of 3 steps: two blocks per epoch ran.
    assert int(executed.numpy()) == 4
    assert int(model.optimizer.iterations.numpy()) == 12
    assert_same_training((model, history.history), stepwise)


def test_blocks_with_a_short_last_batch_and_small_block_memory(binary_data, monkeypatch):
    # 100 examples in batches of 16: six full batches and one of 4, which runs step by step.
    data = np.concatenate([binary_data, binary_data[:4]])
    dataset = tf.data.Dataset.from_tensor_slices(data).batch(16)
    stepwise = train(dataset, steps_per_execution=7, jit_compile=False)
    # Blocks of at most two batches: each 7-step execution is split into equal blocks.
    monkeypatch.setattr(xla_blocks, "MAX_BLOCK_BYTES", 2 * 16 * 16 * 4)
    blocked = train(dataset, steps_per_execution=7)
    assert int(blocked[0].optimizer.iterations.numpy()) == 14
    assert_same_training(blocked, stepwise)


@pytest.mark.parametrize("posterior", IMPLICIT[:1])
def test_implicit_families_train_without_blocks(binary_data, posterior):
    model, _ = train(tf.data.Dataset.from_tensor_slices(binary_data).batch(16), posterior,
                     steps_per_execution=4)  # fmt: skip
    assert model.xla_blocks and not model.uses_xla_blocks()
    assert int(model.optimizer.iterations.numpy()) == 12


def test_a_layer_without_jit_support_turns_blocks_off():
    model = tiny_model()
    model.decoder.supports_jit = False  # Keras's flag for layers with ops XLA cannot compile
    model.compile(optimizer=keras_aevb.paper_optimizer())
    assert model.xla_blocks and not model.uses_xla_blocks()


class _CountingStep(keras_aevb.AEVB):
    """A user's subclass with a train step of its own (here AEVB's, counted)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.own_steps = tf.Variable(0, dtype=tf.int64, trainable=False)

    def train_step(self, data):
        self.own_steps.assign_add(1)
        return super().train_step(data)


class _CountingStepWithBlocks(_CountingStep):
    """The same subclass, declaring how an XLA block runs its step."""

    def block_step(self):
        step = super().block_step() or (lambda x, eps: self._train_step(x, None, eps))
        return lambda x, eps: (self.own_steps.assign_add(1), step(x, eps))[1]


def test_a_subclass_with_its_own_train_step_runs_it_unless_it_declares_a_block_step(
    binary_data,
):
    # A subclass that overrides train_step must see its own step run on every batch: blocks run
    # `block_step`, which the subclass did not write, so they are off for it (the baselines are
    # such subclasses). A subclass that declares its block step trains in blocks.
    data = tf.data.Dataset.from_tensor_slices(binary_data).batch(16)  # 6 full batches
    model = tiny_model(cls=_CountingStep)
    model.compile(optimizer=keras_aevb.paper_optimizer(0.05), steps_per_execution=3)
    assert model.block_step() is None and not model.uses_xla_blocks()
    model.fit(data, epochs=1, verbose=0)
    assert int(model.own_steps.numpy()) == 6
    blocked = tiny_model(cls=_CountingStepWithBlocks)
    blocked.compile(optimizer=keras_aevb.paper_optimizer(0.05), steps_per_execution=3)
    assert blocked.uses_xla_blocks()
    executed = count_blocks(blocked)
    blocked.fit(data, epochs=1, verbose=0)
    assert (int(executed.numpy()), int(blocked.own_steps.numpy())) == (2, 6)
    # Monte Carlo EM's HMC chains run inside its step: it declares no block step.
    assert tiny_model(cls=keras_aevb.MonteCarloEM).block_step() is None


def test_wake_sleep_trains_in_xla_blocks_like_single_steps(binary_data):
    # Wake-sleep declares its block step: the wake eps and the dreams' draws (z ~ p(z) and the
    # noise of x ~ p(x|z)) of each step are drawn before the block from the same generators,
    # in the same order, so blocks train the weights single steps train.
    data = tf.data.Dataset.from_tensor_slices(binary_data).batch(16)  # 6 full batches
    stepwise = train(data, steps_per_execution=3, jit_compile=False, cls=keras_aevb.WakeSleep)
    model = tiny_model(cls=keras_aevb.WakeSleep)
    model.compile(optimizer=keras_aevb.paper_optimizer(0.05), steps_per_execution=3)
    assert model.uses_xla_blocks()
    executed = count_blocks(model)
    history = model.fit(data, epochs=2, verbose=0)
    assert int(executed.numpy()) == 4
    assert int(model.optimizer.iterations.numpy()) == 12
    assert_same_training((model, history.history), stepwise)


@pytest.mark.parametrize("steps_per_execution", [1, 4, 100])
@pytest.mark.parametrize("steps_per_epoch", [1, 3, 7])
def test_fit_runs_exactly_steps_per_epoch(binary_data, steps_per_execution, steps_per_epoch):
    model = tiny_model()
    model.compile(optimizer=keras_aevb.paper_optimizer(), steps_per_execution=steps_per_execution)
    data = tf.data.Dataset.from_tensor_slices(binary_data).batch(16).repeat()
    history = model.fit(data, steps_per_epoch=steps_per_epoch, epochs=3, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 3 * steps_per_epoch
    assert len(history.history["loss"]) == 3
    assert model.steps_per_execution == steps_per_execution  # restored after fit


def test_each_epoch_continues_the_stream():
    # With steps_per_epoch, Keras keeps one iterator across epochs: an execution that stopped
    # at the epoch's end must not have read (and dropped) the next epoch's first batch.
    total, count = tf.Variable(0.0), tf.Variable(0)

    class Spy(keras_aevb.AEVB):
        def train_step(self, data):
            total.assign_add(data[0, 0, 0])
            count.assign_add(1)
            return super().train_step(data)

    values = np.arange(10, dtype="float32") / 10  # batch i holds i / 10 everywhere
    batches = values[:, None, None, None] * np.ones((1, 2, *EVENT), "float32")
    model = tiny_model(cls=Spy)
    model.compile(optimizer=keras.optimizers.SGD(0.0), steps_per_execution=4)
    model.fit(tf.data.Dataset.from_tensor_slices(batches), steps_per_epoch=3, epochs=3, verbose=0)
    assert int(count.numpy()) == 9
    assert float(total.numpy()) == pytest.approx(values[:9].sum(), rel=1e-6)


def test_blocks_continue_the_stream_across_epochs(binary_data):
    data = tf.data.Dataset.from_tensor_slices(binary_data).batch(16).repeat()
    runs = []
    for jit_compile in (False, "auto"):
        model = tiny_model()
        model.compile(optimizer=keras_aevb.paper_optimizer(0.05), steps_per_execution=3,
                      jit_compile=jit_compile)  # fmt: skip
        history = model.fit(data, steps_per_epoch=5, epochs=2, verbose=0)
        runs.append((model, history.history))
    assert int(runs[1][0].optimizer.iterations.numpy()) == 10
    assert_same_training(runs[1], runs[0])


@pytest.mark.parametrize("repeat", [False, True])
def test_make_dataset_batches_are_built_inside_the_execution(monkeypatch, repeat):
    # Issue 15: tf.data building every batch (gather + Bernoulli draw) on its own thread cost
    # ~20 % of a paper-model epoch on 2 cores; fit now reads only each batch's address from
    # the dataset and builds the batch itself, next to the step. The batches, and so the
    # training, must be exactly those of the dataset: 100 examples in batches of 16 (a short
    # last batch, run step by step), blocks of 4 steps, two epochs (a new order and draw each).
    from keras_aevb import data as data_lib

    grey = np.random.default_rng(1).random((100, *EVENT)).astype("float32")
    built = []
    materialize = data_lib.AddressedBatches.materialize

    def counting(self, addresses):
        built.append(1)  # at trace time: the batches came from their addresses
        return materialize(self, addresses)

    monkeypatch.setattr(data_lib.AddressedBatches, "materialize", counting)
    # These batches are small: below the size from which fit builds them itself (measured).
    monkeypatch.setattr(keras_aevb.execution, "MIN_ADDRESSED_VALUES", 0)
    fit_kwargs = {"steps_per_epoch": 9} if repeat else {}
    runs = []
    for addressed in (False, True):
        dataset = data_lib.make_dataset(grey, 16, "dynamic", seed=3, repeat=repeat)
        if not addressed:
            dataset = dataset.map(lambda x: x)  # a dataset of batches only: tf.data builds them
        model = tiny_model()
        model.compile(optimizer=keras_aevb.paper_optimizer(0.05), steps_per_execution=4)
        history = model.fit(dataset, epochs=2, verbose=0, **fit_kwargs)
        runs.append((model, history.history))
    assert built, "fit did not build the batches from their addresses"
    assert int(runs[1][0].optimizer.iterations.numpy()) == (18 if repeat else 14)
    # Exact: the same batches through the same compiled steps.
    for a, b in zip(runs[0][0].get_weights(), runs[1][0].get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert runs[0][1]["loss"] == runs[1][1]["loss"]


def test_small_batches_stay_with_tf_data():
    from keras_aevb import data as data_lib

    model = tiny_model()
    model.compile(optimizer=keras_aevb.paper_optimizer())
    small = data_lib.make_dataset(np.zeros((64, *EVENT), "float32"), 16, "dynamic")
    assert model._addressed_batches(small) == (small, None)
    large = data_lib.make_dataset(np.zeros((64, *EVENT), "float32"), 64, "dynamic")
    large_enough = 64 * int(np.prod(EVENT)) >= keras_aevb.execution.MIN_ADDRESSED_VALUES
    assert (model._addressed_batches(large)[1] is not None) == large_enough


def test_evaluate_runs_exactly_the_steps_asked(binary_data):
    # The analytic KL depends on x only (no sampling), so it tells which batches were read.
    model = tiny_model()
    model.compile(optimizer=keras_aevb.paper_optimizer(), steps_per_execution=100)
    data = tf.data.Dataset.from_tensor_slices(binary_data).batch(16)
    two = model.evaluate(data.repeat(), steps=2, verbose=0, return_dict=True)["kl"]
    exact = model.evaluate(data.take(2), verbose=0, return_dict=True)["kl"]
    three = model.evaluate(data.take(3), verbose=0, return_dict=True)["kl"]
    assert two == pytest.approx(exact, rel=1e-6)
    assert abs(three - exact) > 1e-4  # the comparison can tell 2 batches from 3


def test_train_on_batch_and_numpy_fit_with_validation(binary_data):
    model = tiny_model()
    model.compile(optimizer=keras_aevb.paper_optimizer(0.05))
    logs = model.train_on_batch(binary_data[:16], return_dict=True)
    assert set(logs) == {"loss", "elbo", "reconstruction_log_likelihood", "kl"}
    history = model.fit(binary_data, batch_size=16, epochs=2, verbose=0,
                        validation_data=binary_data[:32])  # fmt: skip
    assert int(model.optimizer.iterations.numpy()) == 1 + 12
    assert len(history.history["val_loss"]) == 2


def test_steps_in():
    x = np.zeros((100, 2), "float32")
    assert execution.steps_in(x, 16, None) == 7
    assert execution.steps_in(x, None, None) == 4  # Keras's default batch of 32
    assert execution.steps_in(x, 16, 3) == 3
    assert execution.steps_in(tf.data.Dataset.from_tensor_slices(x).batch(10), None, None) == 10
    assert execution.steps_in(tf.data.Dataset.from_tensor_slices(x).repeat(), None, None) is None
