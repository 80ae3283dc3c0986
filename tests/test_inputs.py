"""Every entry point that scores data checks it one way (issue 13, items 1-3, 5, 8).

- sample weights reach `fit` and `evaluate` when there are no targets (Keras drops them);
- bad values (NaN, 0-255 pixels) are refused by every public entry point with one message;
- every batch of a `tf.data.Dataset` is checked inside the compiled step: the error names the
  batch and the weights stay as they were before the failing execution;
- exactly three layouts of an example are accepted, in any order across calls;
- seeds of any integer type.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_aevb
from keras_aevb.data import DataError

EVENT = (4, 6)


def tiny_model(seed=0, estimator="analytic_kl", cls=keras_aevb.AEVB, **kwargs):
    init = keras.initializers.RandomNormal(stddev=0.3, seed=seed)
    encoder = keras_aevb.MLPEncoder(2, (8,), kernel_initializer=init, bias_initializer=init)
    decoder = keras_aevb.BernoulliDecoder(EVENT, (8,), kernel_initializer=init)
    model = cls(encoder, decoder, estimator=estimator, seed=seed, **kwargs)
    model.build()
    return model


@pytest.fixture
def binary_data():
    return (np.random.default_rng(0).random((60, *EVENT)) < 0.4).astype("float32")


def weights_of(model):
    return [v.numpy().copy() for v in model.trainable_variables]


# ---------------------------------------------------------------- 1. sample weights


def test_evaluate_with_sample_weight_is_the_weighted_mean_of_the_per_example_bound(binary_data):
    model = tiny_model(estimator="monte_carlo", num_samples=3)
    model.compile(optimizer=keras_aevb.paper_optimizer(0.05))
    weights = np.random.default_rng(1).random(len(binary_data)).astype("float32")
    weights[::4] = 0.0
    # The noise evaluate will draw: one batch of all 60 examples, eps [L, 60, latent_dim] from
    # the posterior layer's generator; draw the same eps from the same generator state.
    state = model.posterior_layer.seed_generator.state.numpy().copy()
    eps = model.posterior_layer.noise((3, len(binary_data), 2))
    model.posterior_layer.seed_generator.state.assign(state)
    per_example = model.bound_terms(binary_data, training=False, eps=eps)["elbo"].numpy()
    logs = model.evaluate(
        binary_data, sample_weight=weights, batch_size=len(binary_data), verbose=0,
        return_dict=True,
    )  # fmt: skip
    expected = np.sum(weights * per_example) / np.sum(weights)
    # float32 sums of 60 values of ~ -17 nats: rounding ~1e-5 relative.
    np.testing.assert_allclose(logs["elbo"], expected, rtol=1e-5)
    # The unweighted mean differs by far more than that tolerance: the weights were used.
    assert abs(np.mean(per_example) - expected) > 1e-2


def test_a_zero_sample_weight_leaves_the_example_out_of_the_gradient(binary_data):
    weights = np.ones(len(binary_data), "float32")
    weights[30:] = 0.0
    # The zero-weight examples replaced by other binary data: if they entered the gradient, the
    # weights after training would differ.
    other = binary_data.copy()
    other[30:] = 1.0 - other[30:]
    trained = []
    for x in (binary_data, other):
        model = tiny_model()
        model.compile(optimizer=keras_aevb.paper_optimizer(0.05))
        model.fit(x, sample_weight=weights, batch_size=20, epochs=2, shuffle=False, verbose=0)
        trained.append(weights_of(model))
    # Same seed, same eps shapes: identical arithmetic on the weighted examples.
    for a, b in zip(*trained, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)
    unweighted = tiny_model()
    unweighted.compile(optimizer=keras_aevb.paper_optimizer(0.05))
    unweighted.fit(other, batch_size=20, epochs=2, shuffle=False, verbose=0)
    pairs = zip(trained[1], weights_of(unweighted), strict=True)
    assert max(np.abs(a - b).max() for a, b in pairs) > 1e-4


# ---------------------------------------------------------------- 2. one check everywhere


def _entry_points(model):
    return {
        "elbo": model.elbo,
        "encode": model.encode,
        "reconstruct": model.reconstruct,
        "predict": lambda x: model.predict(x, verbose=0),
        "log_likelihood": lambda x: keras_aevb.log_likelihood(model, x, num_samples=4, seed=0),
        "hmc_log_likelihood": lambda x: keras_aevb.hmc_log_likelihood(
            model, x, num_samples=4, num_chains=2, num_burnin_steps=2, seed=0
        ),
        "fit": lambda x: model.fit(x, epochs=1, verbose=0),
        "evaluate": lambda x: model.evaluate(x, verbose=0),
    }


@pytest.mark.parametrize("cls", ["AEVB", "WakeSleep"])
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda x: x * 255, r"needs data in \[0, 1\], got values in \[0, 255\]"),
        (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x), "NaN"),
        (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 7, -np.inf, x), "NaN or inf"),
    ],
)
def test_every_entry_point_refuses_bad_values_with_one_message(binary_data, bad, message, cls):
    model = tiny_model(cls=getattr(keras_aevb, cls))
    model.compile(optimizer=keras_aevb.paper_optimizer(0.05))
    x = bad(binary_data[:8]).astype("float32")
    for name, entry in _entry_points(model).items():  # noqa: B007 (named in failures)
        with pytest.raises(ValueError, match=message):
            entry(x)
        with pytest.raises(ValueError, match=message):
            entry(tf.constant(x))  # tensors too, not only NumPy arrays


# ---------------------------------------------------------------- 3. every batch, in the step


def _dataset_with_bad_batch(data, batch_index, value):
    x = data.copy()
    x[batch_index * 10 + 3, 1, 2] = value
    return tf.data.Dataset.from_tensor_slices(x).batch(10)


@pytest.mark.parametrize("jit_compile", ["auto", False])
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.nan, "NaN or infinite"),
        (7.0, r"needs data in \[0, 1\], got values in \[0, 7\]"),
        (255.0, r"got values in \[0, 255\]"),
        (-1.0, r"got values in \[-1, 1\]"),
    ],
)
def test_a_bad_batch_after_the_first_stops_fit_and_keeps_the_weights(
    binary_data, value, message, jit_compile
):
    dataset = _dataset_with_bad_batch(binary_data, batch_index=2, value=value)
    model = tiny_model()
    model.compile(optimizer=keras_aevb.paper_optimizer(0.05), jit_compile=jit_compile)
    before = weights_of(model)
    iterations = int(model.optimizer.iterations.numpy())
    with pytest.raises(DataError, match=rf"batch 3 of epoch 1.*{message}"):
        model.fit(dataset, epochs=2, verbose=0)
    # The failing execution (all 6 steps: steps_per_execution is 100) is rolled back.
    for a, b in zip(before, weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(model.optimizer.iterations.numpy()) == iterations
    # The second epoch: the weights of the first, complete epoch are kept.
    model.fit(_dataset_with_bad_batch(binary_data, 0, 0.0), epochs=1, verbose=0)
    after_one = weights_of(model)
    with pytest.raises(DataError, match=r"batch 3 of epoch 1"):
        model.fit(dataset, epochs=1, verbose=0)
    for a, b in zip(after_one, weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(np.all(np.isfinite(w)) for w in weights_of(model))


def test_a_bad_batch_in_a_later_execution_names_its_batch(binary_data):
    dataset = _dataset_with_bad_batch(binary_data, batch_index=4, value=np.nan)
    model = tiny_model()
    model.compile(optimizer=keras_aevb.paper_optimizer(0.05), steps_per_execution=2)
    with pytest.raises(DataError, match=r"batch 5 of epoch 1"):
        model.fit(dataset, epochs=1, verbose=0)
    # Executions of 2 steps: batches 1-4 trained and were kept; the failing one was undone.
    assert int(model.optimizer.iterations.numpy()) == 4
    assert all(np.all(np.isfinite(w)) for w in weights_of(model))


def test_evaluate_checks_every_batch(binary_data):
    model = tiny_model()
    model.compile(optimizer=keras_aevb.paper_optimizer(0.05))
    with pytest.raises(DataError, match=r"batch 4 of evaluate.*got values in \[0, 255\]"):
        model.evaluate(_dataset_with_bad_batch(binary_data, 3, 255.0), verbose=0)


# ---------------------------------------------------------------- 5. layouts


@pytest.mark.parametrize("shape", [(5, 6, 4), (6, 4), (2, 12), (24, 1, 1), (1, 4, 6)])
def test_a_layout_other_than_the_three_accepted_ones_is_refused(binary_data, shape):
    model = tiny_model()
    model.compile(optimizer=keras_aevb.paper_optimizer(0.05))
    x = np.zeros((5, *shape), "float32")
    message = r"Expected examples of shape \(4, 6\), \(4, 6, 1\) or \(24,\), got "
    for name, entry in _entry_points(model).items():  # noqa: B007 (named in failures)
        with pytest.raises(ValueError, match=message + re_shape(shape)):
            entry(x)
    dataset = tf.data.Dataset.from_tensor_slices(np.zeros((10, *shape), "float32")).batch(5)
    with pytest.raises(ValueError, match=message):
        model.fit(dataset, verbose=0)


def re_shape(shape):
    return r"\(" + ", ".join(str(d) for d in shape) + (",)" if len(shape) == 1 else r"\)")


def test_the_three_layouts_work_in_any_order_across_calls(binary_data):
    model = tiny_model()
    model.compile(optimizer=keras_aevb.paper_optimizer(0.05))
    layouts = [EVENT, (24,), (*EVENT, 1), EVENT, (24,)]
    for shape in layouts:
        x = binary_data.reshape((-1, *shape))
        model.fit(x, batch_size=20, epochs=1, verbose=0)
        model.fit(tf.data.Dataset.from_tensor_slices(x).batch(20), epochs=1, verbose=0)
        logs = model.evaluate(x, batch_size=20, verbose=0, return_dict=True)
        assert np.isfinite(logs["elbo"])
        assert model.predict(x, verbose=0).shape == (60, *EVENT)


# ---------------------------------------------------------------- 8. integer seeds


@pytest.mark.parametrize("seed", [np.int64(3), np.int32(3), np.uint8(3), 3])
def test_seeds_of_every_integer_type(binary_data, seed):
    model = tiny_model()
    same = model.elbo(binary_data, seed=3)
    np.testing.assert_array_equal(model.elbo(binary_data, seed=seed), same)
    np.testing.assert_array_equal(model.sample(4, seed=seed), model.sample(4, seed=3))
    for bad in (3.5, "3", True):
        with pytest.raises(ValueError, match="seed must be an integer"):
            model.sample(4, seed=bad)
