"""The prior p(z): named priors, supports, quantile sampling (paper Fig. 4), learned priors."""

import keras
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf
import tensorflow_probability as tfp

import keras_aevb
from keras_aevb.families import SUPPORTS, uniform_noise
from keras_aevb.prior import (
    PRIOR_ALIASES,
    PRIORS,
    LearnedNormalPrior,
    _prior_misses,
    check_support,
    make_prior,
    prior_names,
    prior_quantile,
    sample_prior,
)

tfd = tfp.distributions
SEED = tf.constant([3, 4])


def _tiny(prior, posterior="normal", latent_dim=2, event=(8,), seed=0):
    init = keras.initializers.GlorotUniform(seed=seed)
    encoder = keras_aevb.MLPEncoder(latent_dim, (8,), posterior=posterior, kernel_initializer=init)
    decoder = keras_aevb.BernoulliDecoder(event, (8,), kernel_initializer=init)
    return keras_aevb.AEVB(encoder, decoder, posterior=posterior, prior=prior, seed=seed)


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_named_prior_shape_recorded_support_and_probed_support_agree(name):
    dist = make_prior(name, 3)
    assert dist.event_shape == [3] and dist.batch_shape == []
    recorded = PRIORS[name].support
    # The recorded support and the one probed through the prior's event-space bijector agree
    # for every support a posterior can have: the probe is what custom priors are checked by.
    for support in SUPPORTS:
        low, high = SUPPORTS[recorded]
        inside = low <= SUPPORTS[support][0] and SUPPORTS[support][1] <= high
        assert (_prior_misses(dist, support) == []) == inside, (name, support)


@pytest.mark.parametrize("name", sorted(set(PRIORS) - set(PRIOR_ALIASES)))
def test_quantile_sampling_follows_the_prior(name):
    n = 20_000
    dist = make_prior(name, 2)
    z = sample_prior(dist, n, SEED).numpy()
    assert z.shape == (n, 2) and np.all(np.isfinite(z))
    # The same map as the manifold: z = F^{-1}(u) with the sampler's own u.
    u = uniform_noise([n, 2], tf.float32, SEED)
    np.testing.assert_array_equal(z, prior_quantile(dist, u))
    for j in range(2):
        cdf = lambda x, j=j: dist.distribution.cdf(np.asarray(x, np.float32)[:, None]).numpy()[:, j]
        # Kolmogorov-Smirnov against TFP's CDF: p > 1e-3 (fixed seed: deterministic). A quantile
        # of the wrong distribution (or the wrong dimension) gives p << 1e-10.
        assert scipy.stats.kstest(z[:, j].astype(np.float64), cdf).pvalue > 1e-3, (name, j)


def test_normal_quantile_is_the_inverse_gaussian_cdf_of_fig_4():
    # Fig. 4: a grid of u evenly spaced in (0, 1), mapped by the inverse Gaussian CDF.
    u = np.linspace(0.05, 0.95, 7)
    grid = np.stack(np.meshgrid(u, u), axis=-1).astype(np.float32)  # [7, 7, 2]
    z = prior_quantile(make_prior("standard_normal", 2), grid).numpy()
    assert z.shape == (7, 7, 2)
    # float32 ndtri against SciPy's float64: 1e-5 relative.
    np.testing.assert_allclose(z, scipy.stats.norm.ppf(grid), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        prior_quantile(make_prior("exponential", 2), grid), -np.log1p(-grid), rtol=1e-5
    )


def test_prior_without_a_quantile_is_sampled_directly_and_refused_by_prior_quantile():
    mvn = tfd.MultivariateNormalTriL(loc=tf.zeros(2), scale_tril=[[1.0, 0.0], [0.5, 1.0]])
    with pytest.raises(ValueError, match="not a product of independent scalar"):
        prior_quantile(mvn, tf.fill([4, 2], 0.5))
    model = _tiny(mvn)
    z = model.sample_z(20_000, seed=1).numpy()
    # Falls back to mvn.sample: the covariance [[1, .5], [.5, 1.25]] within 5 standard errors
    # (sqrt(2 var^2 / n) <= 0.0125 at n = 20k for the largest entry).
    np.testing.assert_allclose(np.cov(z.T), [[1.0, 0.5], [0.5, 1.25]], atol=0.07)


def test_model_sample_z_uses_the_quantile_and_is_reproducible():
    model = _tiny("laplace", posterior="laplace")
    z = model.sample_z(5, seed=9)
    u = uniform_noise([5, 2], tf.float32, tf.constant([9, 0]))
    np.testing.assert_array_equal(z, prior_quantile(model.prior_distribution, u))
    np.testing.assert_array_equal(z, model.sample_z(5, seed=9))
    assert not np.array_equal(model.sample_z(5), model.sample_z(5))


def test_custom_priors_are_checked_by_probing_their_support():
    uniform = tfd.Uniform(low=tf.zeros(2), high=tf.ones(2))
    with pytest.raises(ValueError, match=r"no mass at z = -1e\+30.*infinite"):
        _tiny(uniform)
    # A shifted Uniform(-1, 3) contains (0, 1) but not the positive half-line.
    shifted = tfd.Uniform(low=-tf.ones(2), high=3 * tf.ones(2))
    assert _tiny(shifted, posterior="beta").estimator == "monte_carlo"
    with pytest.raises(ValueError, match=r"no mass at z = 1000, 1e\+30"):
        _tiny(shifted, posterior="gamma")
    gamma = tfd.Gamma(concentration=2 * tf.ones(2), rate=tf.ones(2))
    assert _tiny(gamma, posterior="gamma").estimator == "analytic_kl"
    assert _tiny(lambda d: tfd.Laplace(tf.zeros(d), tf.ones(d))).estimator == "monte_carlo"
    with pytest.raises(ValueError, match="must return a tfd.Distribution"):
        _tiny(lambda d: np.zeros(d))
    with pytest.raises(ValueError, match="event shape is \\[3\\].*latent_dim=2"):
        _tiny(tfd.Normal(tf.zeros(3), 1.0))
    # Named priors report the family name in the message.
    with pytest.raises(ValueError, match="its support is unit_interval"):
        check_support("normal", make_prior("beta", 2), prior="beta")


def test_prior_with_untracked_variables_is_refused():
    loc = tf.Variable(tf.zeros(2))
    with pytest.raises(ValueError, match="trainable variables.*no Keras layer owns"):
        make_prior(tfd.Normal(loc=loc, scale=1.0), 2)


def test_prior_names_table_documents_the_defaults():
    names = prior_names()
    assert "standard_normal" not in names and names["normal"][1] == "real"
    assert names["student_t"][0] == "StudentT(df=5, loc=0, scale=1)"
    assert names["chi2"][0] == "Chi2(df=2)"


def test_learned_prior_trains_with_the_model_and_round_trips_through_weights(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.random((128, 8)) < np.linspace(0.1, 0.9, 8)).astype(np.float32)
    prior = LearnedNormalPrior(2)
    model = _tiny(prior)
    model.build()
    names = {v.path for v in model.trainable_variables}
    assert any("loc" in name for name in names) and any("raw_scale" in name for name in names)
    assert model.estimator == "analytic_kl"  # Normal-Normal: closed form with learned p
    model.compile(optimizer=keras.optimizers.Adam(0.05), jit_compile=False)
    model.fit(x, batch_size=32, epochs=3, verbose=0)
    # The prior's parameters moved (each Adam step moves a weight by up to ~lr = 0.05; 12 steps
    # with a non-zero gradient move it by more than 1e-3), and the distribution sees the moves.
    assert np.max(np.abs(prior.loc.numpy())) > 1e-3
    np.testing.assert_allclose(model.prior_distribution.mean(), prior.loc.numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        model.prior_distribution.stddev(), np.log1p(np.exp(prior.raw_scale.numpy())), rtol=1e-5
    )
    with pytest.raises(ValueError, match="save the weights"):
        model.get_config()
    path = tmp_path / "learned.weights.h5"
    model.save_weights(path)
    clone = _tiny(LearnedNormalPrior(2), seed=1)
    clone.build()
    clone.load_weights(path)
    np.testing.assert_allclose(clone.prior.loc.numpy(), prior.loc.numpy())
    np.testing.assert_allclose(clone.elbo(x, seed=2), model.elbo(x, seed=2), rtol=1e-5)
