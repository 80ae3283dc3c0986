"""Decoders (paper App. C): Bernoulli from logits, Gaussian with bounded learned variance."""

import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

import keras_aevb


def test_bernoulli_log_likelihood_matches_numpy_and_is_finite_at_extreme_logits():
    decoder = keras_aevb.BernoulliDecoder((4,), (3,))
    logits = np.array([[-100.0, 100.0, 0.3, -2.0], [100.0, -100.0, 1.0, 0.0]], np.float32)
    x = np.array([[0, 1, 1, 0], [0, 1, 0, 1]], np.float32)
    got = decoder.log_likelihood(x, tf.constant(logits)).numpy()
    # NumPy reference in float64 with log(sigmoid(l)) = -logaddexp(0, -l) (stable form).
    l64 = logits.astype(np.float64)
    log_y, log_1my = -np.logaddexp(0, -l64), -np.logaddexp(0, l64)
    expected = (x * log_y + (1 - x) * log_1my).sum(axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Row 0 is nearly certain (-log term ~ e^-100), row 1 pays 200 nats for two wrong pixels.
    assert np.all(np.isfinite(got)) and got[1] < -199.0


def test_gaussian_log_likelihood_matches_scipy():
    decoder = keras_aevb.GaussianDecoder((2, 3), (4,))
    rng = np.random.default_rng(0)
    outputs = {
        "x_mean": tf.constant(rng.uniform(0.1, 0.9, (5, 2, 3)), tf.float32),
        "x_log_var": tf.constant(rng.uniform(-4, 0, (5, 2, 3)), tf.float32),
    }
    x = rng.uniform(0, 1, (5, 2, 3)).astype(np.float32)
    got = decoder.log_likelihood(x, outputs).numpy()
    ref = scipy.stats.norm(
        outputs["x_mean"].numpy(), np.exp(0.5 * outputs["x_log_var"].numpy())
    ).logpdf(x)
    # Summed over the (2, 3) event: one float per example; float32 rounding.
    np.testing.assert_allclose(got, ref.sum(axis=(1, 2)), rtol=1e-5)


def test_gaussian_decoder_bounds_log_variance_and_keeps_mean_in_unit_interval():
    from keras_aevb.decoder import X_LOG_VAR_BOUNDS

    decoder = keras_aevb.GaussianDecoder((3,), (2,), kernel_initializer="ones")
    out = decoder(tf.constant([[1e4, 1e4], [-1e4, -1e4]]))
    low, high = X_LOG_VAR_BOUNDS
    assert np.all(out["x_log_var"] >= low) and np.all(out["x_log_var"] <= high)
    assert np.all(out["x_mean"] >= 0) and np.all(out["x_mean"] <= 1)


def test_decoder_keeps_leading_sample_dims():
    decoder = keras_aevb.BernoulliDecoder((28, 28), (8,))
    assert tuple(decoder(tf.zeros((3, 5, 2))).shape) == (3, 5, 28, 28)


@pytest.mark.parametrize("cls", [keras_aevb.BernoulliDecoder, keras_aevb.GaussianDecoder])
def test_decoder_config_round_trip(cls):
    decoder = cls((4, 5), (6,), kernel_initializer=keras_aevb.paper_initializer(seed=1))
    z = tf.random.stateless_normal((2, 3), seed=(1, 1))
    before = decoder(z)
    clone = cls.from_config(decoder.get_config())
    clone.build((None, 3))
    clone.set_weights(decoder.get_weights())
    tf.nest.map_structure(np.testing.assert_array_equal, before, clone(z))
    assert clone.get_config() == decoder.get_config()


def test_bernoulli_check_data():
    decoder = keras_aevb.BernoulliDecoder((2,), (2,))
    with pytest.raises(ValueError, match=r"needs data in \[0, 1\].*divide 8-bit pixels by 255"):
        decoder.check_data(np.array([[0.0, 255.0]]))
    assert "binariz" in decoder.check_data(np.array([[0.0, 0.5]]))
    assert decoder.check_data(np.array([[0.0, 1.0]])) is None


def test_bernoulli_closed_form_equals_tfp_log_prob_and_its_gradient():
    # log_likelihood is written out for speed; it must be TFP's Bernoulli log-density, value and
    # gradient, with leading sample dimensions [L, batch, *event].
    decoder = keras_aevb.BernoulliDecoder((3, 4), (3,))
    rng = np.random.default_rng(0)
    logits = tf.constant(rng.normal(0, 5, (2, 5, 3, 4)).astype(np.float32))
    x = (rng.random((5, 3, 4)) < 0.5).astype(np.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits)
        ours = decoder.log_likelihood(x, logits)
        theirs = decoder.distribution(logits).log_prob(x)
    assert ours.shape == theirs.shape == (2, 5)
    # Tolerance: the same float32 expression up to TFP's operation order.
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        tape.gradient(ours, logits).numpy(), tape.gradient(theirs, logits).numpy(), atol=1e-6
    )


def test_max_log_likelihood_is_the_largest_value_log_p_x_given_z_takes():
    # Bernoulli: a log probability, 0 exactly at certain and right logits (e^-100 below it).
    bernoulli = keras_aevb.BernoulliDecoder((2, 3), (4,))
    assert bernoulli.max_log_likelihood == 0.0
    x = np.array([[[0, 1, 1], [1, 0, 0]]], np.float32)
    best = bernoulli.log_likelihood(x, tf.constant(200.0 * x - 100.0)).numpy()
    assert best[0] <= 0.0 and best[0] > -1e-30
    # Grey data: each pixel at most x log x + (1 - x) log(1 - x) < 0, reached at l = logit(x).
    grey = np.full((1, 2, 3), 0.3, np.float32)
    at_logit = bernoulli.log_likelihood(grey, tf.constant(np.log(0.3 / 0.7), shape=(1, 2, 3)))
    np.testing.assert_allclose(at_logit, 6 * (0.3 * np.log(0.3) + 0.7 * np.log(0.7)), rtol=1e-6)
    # Gaussian: x at the mean with the variance at its floor, for a 28 x 20 frame:
    # 560 * (-log(2 pi) / 2 - floor / 2), floor = -9 - log1p(e^-12) (soft clip's infimum).
    gaussian = keras_aevb.GaussianDecoder((28, 20), (4,))
    floor = -9.0 - np.log1p(np.exp(-12.0))
    expected = 560 * (-0.5 * np.log(2 * np.pi) - 0.5 * floor)
    np.testing.assert_allclose(gaussian.max_log_likelihood, expected, rtol=1e-12)
    np.testing.assert_allclose(gaussian.max_log_likelihood, 2005.3961, atol=1e-4)
    outputs = gaussian(np.zeros((1, 2), np.float32))
    # The decoder's own clip at a raw log-variance of -1e4 reaches the floor: float32
    # rounding of 560 terms of ~3.6 nats (rtol 1e-5) leaves it within the stated maximum.
    raw_floor = keras_aevb.families.soft_clip(tf.constant(-1e4), -9.0, 3.0)
    peak = gaussian.log_likelihood(
        outputs["x_mean"].numpy(),
        {"x_mean": outputs["x_mean"], "x_log_var": tf.fill((1, 28, 20), raw_floor)},
    ).numpy()[0]
    np.testing.assert_allclose(peak, gaussian.max_log_likelihood, rtol=1e-5)
