"""Golden tests of the marginal-likelihood estimators against the exact log p(x) of a
linear-Gaussian model (SciPy), and against the bound of a trained model."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from linear_gaussian import linear_gaussian_model, linear_gaussian_problem

import keras_aevb
from keras_aevb.marginal_likelihood import hmc_log_likelihood, log_likelihood

# q(z|x) shifted from the exact posterior in both mean and variance: a proposal with a real gap.
MEAN_SHIFT, LOG_VAR_SHIFT = 0.3, 0.4


def _chi2_plus_one(post_var, mean_shift, log_var_shift):
    """E_q[(p(z|x)/q(z))^2] for diagonal Gaussians, per dimension multiplied (closed form):

    int N(z; m_p, s_p^2)^2 / N(z; m_q, s_q^2) dz
        = s_q^2 / (s_p sqrt(2 s_q^2 - s_p^2)) * exp((m_p - m_q)^2 / (2 s_q^2 - s_p^2)).
    """
    q_var = post_var * np.exp(log_var_shift)
    return np.prod(
        q_var
        / (np.sqrt(post_var) * np.sqrt(2 * q_var - post_var))
        * np.exp(mean_shift**2 / (2 * q_var - post_var))
    )


def _gaussian_kl(post_var, mean_shift, log_var_shift):
    """KL(q || p(z|x)) for the shifted diagonal q, closed form (the K = 1 gap)."""
    ratio = np.exp(log_var_shift)
    return 0.5 * np.sum(ratio - 1.0 - log_var_shift + mean_shift**2 / post_var)


def test_exact_posterior_proposal_is_exact_for_every_k():
    problem = linear_gaussian_problem(seed=0, num_examples=6)
    model = linear_gaussian_model(problem)
    # Chunks that leave a partial last one (7 = 3 + 3 + 1, 1000 = 3 * 300 + 100) as well as
    # the default: an estimator that lost or double-counted a chunk would be off by
    # log(kept / K) (e.g. log(6/7) = -0.15 nats), far outside the tolerance.
    for k, chunk_size in ((1, None), (7, None), (7, 3), (1000, None), (1000, 300)):
        estimate = log_likelihood(model, problem["x"], num_samples=k, seed=k, chunk_size=chunk_size)
        # With q = p(z|x), log w = log p(x) for every draw; what is left is float32 rounding of
        # log p(x|z), log p(z), log q(z|x) (terms of ~10 nats, relative error ~1e-7 each).
        np.testing.assert_allclose(estimate, problem["log_px"], rtol=0, atol=1e-4)


def test_estimate_rises_with_k_and_reaches_exact_value():
    problem = linear_gaussian_problem(seed=1, num_examples=200)
    model = linear_gaussian_model(problem, mean_shift=MEAN_SHIFT, log_var_shift=LOG_VAR_SHIFT)
    post_var = np.diag(problem["post_cov"])
    gaps = {
        k: log_likelihood(model, problem["x"], num_samples=k, seed=k, batch_size=64)
        - problem["log_px"]
        for k in (1, 10, 100, 5000)
    }
    means = {k: g.mean() for k, g in gaps.items()}
    ses = {k: g.std(ddof=1) / np.sqrt(len(g)) for k, g in gaps.items()}
    # K = 1: E[log w] = log p(x) - KL(q || p(z|x)); 4 standard errors of the 200-example mean
    # (independent examples) leave a false alarm probability of ~6e-5.
    kl = _gaussian_kl(post_var, MEAN_SHIFT, LOG_VAR_SHIFT)
    assert abs(means[1] + kl) < 4 * ses[1], (means[1], -kl, ses[1])
    # E[estimate] rises with K (Burda et al. Thm 1); the steps 1 -> 10 -> 100 close gaps of
    # ~1 and ~0.1 nat, checked beyond 3 joint standard errors, so a flat curve fails. From 100
    # to 5000 the gap left (~rho2 / 200 ~ 0.006 nat) is below the noise of the K = 100 mean:
    # there the check is that the mean does not fall.
    for small, large in ((1, 10), (10, 100)):
        assert means[large] - means[small] > 3 * np.hypot(ses[small], ses[large]), means
    assert means[5000] > means[100] - 3 * np.hypot(ses[100], ses[5000]), means
    # K = 5000: by the delta method the estimate has bias -rho2 / (2K) and per-example standard
    # deviation sqrt(rho2 / K), with rho2 = Var_q(w) / p(x)^2 in closed form (~1.2 here). The
    # 200-example mean is within 5 standard errors plus the bias; every example within 5 SD.
    rho2 = _chi2_plus_one(post_var, MEAN_SHIFT, LOG_VAR_SHIFT) - 1.0
    sd = np.sqrt(rho2 / 5000)
    assert abs(means[5000]) < rho2 / 5000 + 5 * sd / np.sqrt(200), (means[5000], sd)
    assert np.all(np.abs(gaps[5000]) < 5 * sd + rho2 / 5000), np.abs(gaps[5000]).max()
    # Estimates stay below the truth on average at every K (Jensen).
    assert all(means[k] < 3 * ses[k] for k in means)


def test_chunking_datasets_and_seeds():
    problem = linear_gaussian_problem(seed=2, num_examples=50)
    model = linear_gaussian_model(problem, mean_shift=MEAN_SHIFT, log_var_shift=LOG_VAR_SHIFT)
    x = problem["x"]
    a = log_likelihood(model, x, num_samples=300, batch_size=20, seed=3)
    # The same seed and the same batches draw the same samples, from arrays or datasets of x
    # or of (x, label) tuples.
    np.testing.assert_array_equal(a, log_likelihood(model, x, 300, batch_size=20, seed=3))
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(20)
    np.testing.assert_allclose(a, log_likelihood(model, dataset, 300, seed=3), rtol=1e-6)
    labelled = tf.data.Dataset.from_tensor_slices((x, np.arange(50))).batch(20)
    np.testing.assert_allclose(a, log_likelihood(model, labelled, 300, seed=3), rtol=1e-6)
    assert a.shape == (50,) and a.dtype == np.float64
    # The draws depend on the seed and the batches, not on the chunks: chunks of 37 samples
    # (not a divisor of K = 300, so a partial last chunk of 4) score the same 300 draws as one
    # chunk of 300, so the estimates agree to float32 rounding of the chunks' logsumexps
    # (~1e-7 of terms of ~10 nats). A version that dropped the partial chunk would be off by
    # about log(296/300) = -0.013 nats, one that counted a chunk twice by more.
    single = log_likelihood(model, x, 300, batch_size=20, seed=4, chunk_size=300)
    for chunk_size in (37, 1, 299, None):
        chunked = log_likelihood(model, x, 300, batch_size=20, seed=4, chunk_size=chunk_size)
        np.testing.assert_allclose(chunked, single, rtol=0, atol=2e-5)
    # Another seed draws other samples: with rho2 ~ 1.2 the per-example SD at K = 300 is
    # ~0.06 nats, so two seeds differ by > 1e-3 nats on most examples.
    assert np.mean(np.abs(single - a) > 1e-3) > 0.9
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        log_likelihood(model, x, num_samples=0)


def test_hmc_estimator_matches_exact_value_in_2d():
    # Non-orthogonal W: the posterior has a full covariance, which the Gaussian fit must hold.
    problem = linear_gaussian_problem(seed=3, z_dim=2, num_examples=6, orthogonal=False)
    model = linear_gaussian_model(problem, mean_shift=0.5)  # a poor start for the chains
    estimate = hmc_log_likelihood(
        model, problem["x"], num_samples=1000, num_burnin_steps=300, seed=0
    )
    # With r(z) a Gaussian fit to 1000 draws of this Gaussian posterior, r / p(x, z) is nearly
    # constant under p(z|x): its relative variance is the fit's error, O(d^2 / 1000) ~ 1e-2,
    # so the estimate's SD is ~ sqrt(1e-2 * (autocorrelation ~ 5) / 1000) ~ 0.007 nats;
    # 0.05 nats is > 5 SD (measured errors were < 0.005).
    np.testing.assert_allclose(estimate, problem["log_px"], rtol=0, atol=0.05)
    assert estimate.dtype == np.float64


def test_hmc_estimator_warns_above_five_latent_dimensions():
    problem = linear_gaussian_problem(seed=4, x_dim=8, z_dim=6, num_examples=2)
    model = linear_gaussian_model(problem)
    # The warning comes before any work: checked on no examples, which then fail clearly.
    with pytest.warns(UserWarning, match="unreliable above 5"):
        with pytest.raises(ValueError, match="x is empty"):
            hmc_log_likelihood(model, problem["x"][:0])
    small = linear_gaussian_model(linear_gaussian_problem(seed=4, x_dim=8, z_dim=5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="x is empty"):
            hmc_log_likelihood(small, problem["x"][:0])


# ------------------------------------------------------------------------- a trained model

EVENT = (6, 6)


@pytest.fixture(scope="module")
def trained():
    """A tiny Bernoulli AEVB trained 5 epochs on noisy copies of 4 binary 6x6 prototypes."""
    rng = np.random.default_rng(0)
    prototypes = rng.random((4, *EVENT)) < 0.5
    x = prototypes[rng.integers(0, 4, 240)]
    x = (x ^ (rng.random(x.shape) < 0.05)).astype(np.float32)
    init = keras.initializers.GlorotUniform(seed=0)
    model = keras_aevb.AEVB(
        keras_aevb.MLPEncoder(2, (16,), kernel_initializer=init),
        keras_aevb.BernoulliDecoder(EVENT, (16,), kernel_initializer=init),
        seed=0,
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    model.fit(x, batch_size=24, epochs=5, verbose=0)
    return model, x


def test_importance_sampling_is_above_the_bound_on_a_trained_model(trained):
    model, x = trained
    bound = model.elbo(x, num_samples=200, seed=0).numpy()
    estimate = log_likelihood(model, x, num_samples=200, seed=0)
    gap = estimate - bound
    # Jensen: E[IS estimate] >= ELBO; the mean gap must be positive beyond 4 standard errors
    # (a trained tiny model leaves a gap of a few tenths of a nat).
    assert gap.mean() > 4 * gap.std(ddof=1) / np.sqrt(len(gap)), gap.mean()


def test_k_equal_one_is_the_bound_in_expectation(trained):
    model, x = trained
    repeated = np.tile(x, (20, 1, 1))  # 4800 independent single-sample estimates
    single = log_likelihood(model, repeated, num_samples=1, seed=1, batch_size=480)
    bound = model.elbo(x, num_samples=2000, seed=1).numpy()
    # K = 1 is SGVB estimator A; the bound (estimator B, L = 2000) has the same expectation.
    # Both means are compared within 4 standard errors of the 4800-draw mean (the bound's own
    # error is ~50x smaller).
    se = single.std(ddof=1) / np.sqrt(len(single))
    assert abs(single.mean() - bound.mean()) < 4 * se, (single.mean(), bound.mean(), se)


def test_data_the_likelihood_cannot_score_is_refused_and_grey_data_warned(trained):
    model, x = trained
    with pytest.raises(ValueError, match="BernoulliDecoder needs data in \\[0, 1\\]"):
        log_likelihood(model, x * 255.0, num_samples=2)
    with pytest.warns(UserWarning, match="Grey \\(non-binary\\) values"):
        log_likelihood(model, x * 0.5, num_samples=2)
