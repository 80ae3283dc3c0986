"""The speed defaults of `AEVB.compile` and the speed-only changes of `train_step` (issue 9).

Each change made for speed must leave the results as they were: these tests compare against
the slower form they replaced, on a tiny model and tiny data (seconds).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_aevb
from keras_aevb.model import AEVB, DEFAULT_STEPS_PER_EXECUTION, unpack_data, weighted_mean
from keras_aevb.objective import weight_penalty

EVENT = (4, 4)


def tiny_model(cls=AEVB, weight_decay=0.0, seed=0):
    init = keras.initializers.RandomNormal(stddev=0.3, seed=seed)
    encoder = keras_aevb.MLPEncoder(2, (8,), kernel_initializer=init, bias_initializer=init)
    decoder = keras_aevb.BernoulliDecoder(EVENT, (8,), kernel_initializer=init)
    model = cls(encoder, decoder, seed=seed, weight_decay=weight_decay)
    model.build()
    return model


@pytest.fixture
def binary_data():
    return (np.random.default_rng(0).random((96, *EVENT)) < 0.4).astype("float32")


class TapePenaltyAEVB(AEVB):
    """The train_step as it was before the speed change: the weight penalty through the tape."""

    def train_step(self, data):
        x, sample_weight = unpack_data(data)
        with tf.GradientTape() as tape:
            terms = self.bound_terms(x, training=True)
            objective = -weighted_mean(terms["elbo"], sample_weight) + weight_penalty(
                self.trainable_variables, self.weight_decay
            )
            objective = objective / tf.distribute.get_strategy().num_replicas_in_sync
            scaled = self.optimizer.scale_loss(objective)
        gradients = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        return self.update_metrics(terms, sample_weight)


def _train(cls, data, optimizer, weight_decay=0.05, **fit_kwargs):
    model = tiny_model(cls, weight_decay=weight_decay)
    model.compile(optimizer=optimizer, steps_per_execution=1)
    history = model.fit(data, epochs=2, batch_size=16, shuffle=False, verbose=0, **fit_kwargs)
    return model.get_weights(), history.history


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda: keras_aevb.paper_optimizer(0.05),
        # A multiplicative loss scale goes through scale_loss into the closed-form term too.
        lambda: keras.optimizers.SGD(0.1, loss_scale_factor=8.0),
        lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)),
    ],
    ids=["adagrad", "sgd_loss_scale_factor", "loss_scale_optimizer"],
)
def test_closed_form_weight_decay_gradient_equals_the_tape_gradient(binary_data, make_optimizer):
    new_weights, new_history = _train(AEVB, binary_data, make_optimizer())
    old_weights, old_history = _train(TapePenaltyAEVB, binary_data, make_optimizer())
    # Tolerance: weight_decay * theta (closed form) and 2 * theta * (weight_decay / 2) (the
    # tape) are the same float32 products up to rounding of the loss-scale multiply; they
    # agreed to the last bit here, the tolerance allows 1 ulp-level drift over 12 steps.
    for new, old in zip(new_weights, old_weights, strict=True):
        np.testing.assert_allclose(new, old, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(new_history["loss"], old_history["loss"], rtol=1e-6)


def test_weight_decay_changes_the_trajectory(binary_data):
    # The comparison above could pass with the penalty silently dropped from both: it cannot.
    with_decay, _ = _train(AEVB, binary_data, keras.optimizers.SGD(0.1), weight_decay=0.5)
    without, _ = _train(AEVB, binary_data, keras.optimizers.SGD(0.1), weight_decay=0.0)
    assert max(np.max(np.abs(a - b)) for a, b in zip(with_decay, without, strict=True)) > 1e-3


def test_compile_defaults_and_explicit_values():
    model = tiny_model()
    model.compile(optimizer=keras_aevb.paper_optimizer())
    assert model.steps_per_execution == DEFAULT_STEPS_PER_EXECUTION == 100
    # "auto": training in XLA blocks; single steps follow Keras's rule (no XLA on a CPU, where
    # per-step XLA measured no faster than TensorFlow's kernels for this model).
    assert model.xla_blocks and model.uses_xla_blocks()
    if not tf.config.list_physical_devices("GPU"):
        assert model.jit_compile is False
    model.compile(optimizer=keras_aevb.paper_optimizer(), steps_per_execution=7, jit_compile=True)
    assert model.steps_per_execution == 7 and model.jit_compile is True and model.xla_blocks
    model.compile(optimizer=keras_aevb.paper_optimizer(), jit_compile=False)
    assert not model.xla_blocks and model.jit_compile is False
    model.compile(optimizer=keras_aevb.paper_optimizer(), run_eagerly=True)
    assert model.steps_per_execution == 1 and model.run_eagerly and not model.xla_blocks


def test_default_fit_runs_exactly_steps_per_epoch(binary_data):
    # Keras runs whole executions of `steps_per_execution` steps, so a default above 1 would
    # make fit(steps_per_epoch=k) train more than k steps whenever k is not a multiple of it.
    # The defaults must not change what a fit call trains.
    model = tiny_model()
    model.compile(optimizer=keras_aevb.paper_optimizer())
    data = tf.data.Dataset.from_tensor_slices(binary_data).batch(16).repeat()
    model.fit(data, steps_per_epoch=3, epochs=2, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 6


def test_steps_per_execution_does_not_change_training(binary_data):
    data = tf.data.Dataset.from_tensor_slices(binary_data).batch(16)  # 6 batches
    results = []
    for steps_per_execution in (1, 4):  # 4 does not divide 6: the last call runs 2 steps
        model = tiny_model(weight_decay=0.01)
        model.compile(
            optimizer=keras_aevb.paper_optimizer(0.05), steps_per_execution=steps_per_execution
        )
        history = model.fit(data, epochs=2, verbose=0)
        assert int(model.optimizer.iterations.numpy()) == 12
        results.append((model.get_weights(), history.history["loss"]))
    # Tolerance: the same ops on the same data in the same order; inside a while loop grappler
    # may fuse differently, which changes float32 rounding only.
    for a, b in zip(results[0][0], results[1][0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)


def test_saved_model_is_recompiled_with_its_settings(binary_data, tmp_path):
    model = tiny_model()
    model.compile(optimizer=keras_aevb.paper_optimizer(0.05), steps_per_execution=3)
    model.fit(binary_data, epochs=1, batch_size=16, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert loaded.compiled and loaded.steps_per_execution == 3
    assert loaded.xla_blocks and loaded.jit_compile == model.jit_compile  # "auto" resolved again
    assert isinstance(loaded.optimizer, keras_aevb.FusedAdagrad)
    assert loaded.optimizer.get_config()["initial_accumulator_value"] == 0.0
    # The optimizer's state came back: the accumulators equal the trained model's.
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
