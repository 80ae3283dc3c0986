"""The bound against an independent NumPy implementation, given eps (issue 13; DESIGN 6).

The strongest guard against a silent change in the maths: the model's weights are read out and
the paper's computation is written again in float64 NumPy, from the equations alone:

    encoder (App. C.2):  h = tanh(W x + b),  mu = W_mu h + b_mu,  log sigma^2 = W_s h + b_s
    posterior (eq. 10):  z_l = mu + sigma * eps_l,  eps_l ~ N(0, I)
    decoder (App. C.1):  y = sigmoid(W' tanh(W z + b) + b'),
                         log p(x|z) = sum_i x_i log y_i + (1 - x_i) log(1 - y_i)
    decoder (App. C.2):  log p(x|z) = sum_i log N(x_i; mu_x, sigma_x^2), mu_x = sigmoid(...)
    estimator A (eq. 6): 1/L sum_l [log p(x|z_l) + log p(z_l) - log q(z_l|x)]
    estimator B (eq. 7 + App. B): 1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)
                                   + 1/L sum_l log p(x|z_l)

Tolerance 1e-5 (relative): the model computes in float32 (~1e-7 relative per op) over sums of
tens of terms; 1e-5 is far below any change of the maths (a dropped constant, a KL counted
twice, a wrong sign all move the bound by > 1e-2 relative).
"""

import keras
import numpy as np
import pytest

import keras_aevb
from keras_aevb.decoder import X_LOG_VAR_BOUNDS
from keras_aevb.families import Z_LOG_VAR_BOUNDS

EVENT = (3, 5)
LATENT = 2
L = 3


def softplus(x):
    return np.logaddexp(0.0, x)


def soft_clip(x, low, high):
    # The models' smooth clip of log-variances (identity well inside the bounds).
    x = low + softplus(x - low)
    return high - softplus(high - x)


def dense(layer, h):
    kernel, bias = (np.asarray(w, np.float64) for w in layer.get_weights())
    return h @ kernel + bias


def numpy_bound(model, x, eps, estimator):
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    h = x
    for layer in model.encoder.hidden_layers:
        h = np.tanh(dense(layer, h))
    mu = dense(model.encoder.heads["z_mean"], h)
    log_var = soft_clip(dense(model.encoder.heads["z_log_var"], h), *Z_LOG_VAR_BOUNDS)
    sigma = np.exp(0.5 * log_var)
    z = mu + sigma * np.asarray(eps, np.float64)  # [L, n, J]
    g = z
    for layer in model.decoder.hidden_layers:
        g = np.tanh(dense(layer, g))
    if isinstance(model.decoder, keras_aevb.BernoulliDecoder):
        logits = dense(model.decoder.heads["logits"], g)
        # log y = -softplus(-l), log(1 - y) = -softplus(l)
        log_px_z = np.sum(x * -softplus(-logits) + (1 - x) * -softplus(logits), axis=-1)
    else:
        x_mean = 1.0 / (1.0 + np.exp(-dense(model.decoder.heads["x_mean"], g)))
        x_log_var = soft_clip(dense(model.decoder.heads["x_log_var"], g), *X_LOG_VAR_BOUNDS)
        log_px_z = np.sum(
            -0.5 * (np.log(2 * np.pi) + x_log_var + (x - x_mean) ** 2 / np.exp(x_log_var)),
            axis=-1,
        )
    reconstruction = log_px_z.mean(axis=0)
    if estimator == "analytic_kl":
        kl = -0.5 * np.sum(1 + log_var - mu**2 - np.exp(log_var), axis=-1)
    else:
        log_q = np.sum(-0.5 * (np.log(2 * np.pi) + log_var + eps**2), axis=-1)
        log_p = np.sum(-0.5 * (np.log(2 * np.pi) + z**2), axis=-1)
        kl = np.mean(log_q - log_p, axis=0)
    return reconstruction - kl


def make_model(decoder, estimator, seed=0):
    init = keras.initializers.RandomNormal(stddev=0.5, seed=seed)
    encoder = keras_aevb.MLPEncoder(LATENT, (7,), kernel_initializer=init, bias_initializer=init)
    cls = keras_aevb.BernoulliDecoder if decoder == "bernoulli" else keras_aevb.GaussianDecoder
    decoder = cls(EVENT, (6,), kernel_initializer=init, bias_initializer=init)
    model = keras_aevb.AEVB(encoder, decoder, estimator=estimator, num_samples=L, seed=seed)
    model.compile(optimizer=keras_aevb.paper_optimizer(0.05))
    model.build()
    return model


def make_data(decoder, n=11):
    rng = np.random.default_rng(3)
    if decoder == "bernoulli":
        return (rng.random((n, *EVENT)) < 0.4).astype(np.float32)
    return rng.uniform(0.05, 0.95, size=(n, *EVENT)).astype(np.float32)


@pytest.mark.parametrize("estimator", ["analytic_kl", "monte_carlo"])
@pytest.mark.parametrize("decoder", ["bernoulli", "gaussian"])
def test_elbo_and_evaluate_equal_an_independent_numpy_bound(decoder, estimator):
    model = make_model(decoder, estimator)
    # One step of training first: the weights are not the initializer's.
    x = make_data(decoder)
    model.fit(x, batch_size=len(x), epochs=1, verbose=0)

    # model.elbo with a stateless seed: eps is the posterior's noise for that seed.
    seed = np.array([5, 7], np.int32)
    eps = model.posterior_layer.noise((L, len(x), LATENT), seed=seed).numpy()
    expected = numpy_bound(model, x, eps, estimator)
    np.testing.assert_allclose(model.elbo(x, num_samples=L, seed=seed), expected, rtol=1e-5)

    # model.evaluate: one batch of all examples, eps drawn from the layer's generator.
    generator = model.posterior_layer.seed_generator
    state = generator.state.numpy().copy()
    eps = model.posterior_layer.noise((L, len(x), LATENT)).numpy()
    generator.state.assign(state)
    logs = model.evaluate(x, batch_size=len(x), verbose=0, return_dict=True)
    expected = numpy_bound(model, x, eps, estimator)
    np.testing.assert_allclose(logs["elbo"], expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(logs["loss"], -expected.mean(), rtol=1e-5)
