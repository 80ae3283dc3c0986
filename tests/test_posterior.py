"""The reparameterization layer (paper eq. 4): z = mu + sigma * eps, and its gradients."""

import numpy as np
import pytest
import tensorflow as tf

import keras_aevb


def _params(mean, log_var):
    return {"z_mean": tf.constant(mean, tf.float32), "z_log_var": tf.constant(log_var, tf.float32)}


def test_gradients_of_g_are_one_and_half_sigma_eps_exactly():
    layer = keras_aevb.ReparameterizedPosterior()
    mean = tf.Variable([[0.3, -1.2]])
    log_var = tf.Variable([[-0.4, 0.8]])
    eps = tf.constant([[1.5, -0.7]])
    with tf.GradientTape(persistent=True) as tape:
        z = layer.g(eps, {"z_mean": mean, "z_log_var": log_var})
    np.testing.assert_allclose(tape.gradient(z, mean), [[1.0, 1.0]], rtol=0, atol=0)
    expected = 0.5 * np.exp(0.5 * log_var.numpy()) * eps.numpy()
    # Float32 exp and product: equal to a few ulps.
    np.testing.assert_allclose(tape.gradient(z, log_var), expected, rtol=1e-6)


def test_sample_moments_match_parameters():
    layer = keras_aevb.ReparameterizedPosterior(num_samples=50_000, seed=3)
    mean = np.array([[0.5, -2.0, 0.0]], np.float32)
    log_var = np.array([[0.0, np.log(4.0), np.log(0.01)]], np.float32)
    z = layer(_params(mean, log_var)).numpy()
    assert z.shape == (50_000, 1, 3)
    std = np.exp(0.5 * log_var[0])
    # Standard error of the mean is std/sqrt(n); of the std about std/sqrt(2n): 5 of each.
    n = len(z)
    assert np.all(np.abs(z.mean(axis=0)[0] - mean[0]) < 5 * std / np.sqrt(n))
    assert np.all(np.abs(z.std(axis=0)[0] - std) < 5 * std / np.sqrt(2 * n))


def test_shapes_deterministic_mode_and_seed_reproducibility():
    params = _params(np.ones((4, 2)), np.zeros((4, 2)))
    single = keras_aevb.ReparameterizedPosterior(seed=7)
    assert tuple(single(params).shape) == (4, 2)
    assert tuple(keras_aevb.ReparameterizedPosterior(num_samples=3)(params).shape) == (3, 4, 2)
    np.testing.assert_array_equal(single(params, deterministic=True), np.ones((4, 2)))
    # Two layers with the same seed draw the same stream.
    a, b = (keras_aevb.ReparameterizedPosterior(seed=7) for _ in range(2))
    np.testing.assert_array_equal(a.sample(params), b.sample(params))
    assert not np.array_equal(a.sample(params), a.sample(params))
    # A stateless seed gives the same draw every time, whatever the layer's state.
    first = single.sample(params, seed=tf.constant([1, 2]))
    np.testing.assert_array_equal(first, single.sample(params, seed=tf.constant([1, 2])))


def test_layer_config_round_trip():
    layer = keras_aevb.ReparameterizedPosterior(num_samples=4, seed=11, deterministic=True)
    clone = keras_aevb.ReparameterizedPosterior.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    params = _params(np.zeros((2, 3)), np.zeros((2, 3)))
    np.testing.assert_array_equal(layer(params), clone(params))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="Unknown posterior family 'nope'"):
        keras_aevb.ReparameterizedPosterior("nope")
    with pytest.raises(ValueError, match="num_samples"):
        keras_aevb.ReparameterizedPosterior(num_samples=0)


def test_encoder_log_variance_bound_keeps_sigma_finite_and_identity_inside():
    from keras_aevb.families import Z_LOG_VAR_BOUNDS, soft_clip

    raw = tf.constant([-1e4, -5.0, 0.0, 5.0, 1e4])
    clipped = soft_clip(raw, *Z_LOG_VAR_BOUNDS).numpy()
    # Identity to float32 rounding where trained encoders live; inside the bounds at the extremes.
    np.testing.assert_allclose(clipped[1:4], [-5.0, 0.0, 5.0], atol=1e-5)
    assert Z_LOG_VAR_BOUNDS[0] <= clipped[0] < -29 and 29 < clipped[-1] <= Z_LOG_VAR_BOUNDS[1]
    assert np.all(np.isfinite(np.exp(0.5 * clipped)))
