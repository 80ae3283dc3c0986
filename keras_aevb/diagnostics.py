"""Variance of the SGVB estimators and of their gradients (paper sections 2.3 and 2.4).

The paper's case for the reparameterization trick is variance: the naive score-function
(REINFORCE) gradient of E_q[f(z)],

    grad_phi E_q[f(z)] = E_q[f(z) grad_phi log q_phi(z)]                        (section 2.2)

"exhibits very high variance", while the pathwise gradient through z = g(eps, phi) does not. These
functions measure both on a model and a minibatch, for notebooks and benchmarks.

Posterior collapse (below): `active_units` (Burda et al., 2016), `kl_per_dimension` and
`mutual_information` I(x; z) (Hoffman & Johnson, 2016), gathered by `latent_report`.
"""

from typing import NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from keras_aevb._cache import model_cache
from keras_aevb.estimator import scalar_factors
from keras_aevb.inputs import positive_int

__all__ = [
    "ACTIVE_UNIT_THRESHOLD",
    "ActiveUnits",
    "GRADIENT_METHODS",
    "active_units",
    "bound_and_gradient",
    "gradient_statistics",
    "kl_per_dimension",
    "latent_report",
    "mutual_information",
    "posterior_means",
]

GRADIENT_METHODS = ("reparameterization", "score_function")


def _flat(gradients):
    return tf.concat([tf.reshape(g, [-1]) for g in gradients], axis=0)


def bound_and_gradient(model, x, method="reparameterization", num_samples=1, seed=(0, 0)):
    """One estimate of the minibatch bound and of its gradient with respect to the encoder (phi).

    Args:
        model: an `AEVB`.
        x: a minibatch.
        method: "reparameterization" (the paper's SGVB gradient) or "score_function"
            (REINFORCE without a baseline: mean_l stop_gradient(f(z_l)) * log q(z_l|x) with
            f = log p(x, z) - log q(z|x), the estimator the paper calls high-variance).
        num_samples: L.
        seed: stateless int32 pair for the draw of eps.

    Returns:
        (bound, gradient): the mean bound estimate over the minibatch (estimator of the model)
        and the flattened gradient over the encoder's trainable weights, both NumPy.
    """
    step = _gradient_step(model, method, positive_int(num_samples, "num_samples"))
    bound, gradient = step(model.as_event(x), tf.constant(seed, tf.int32))
    return float(bound), gradient.numpy()


def _gradient_step(model, method, num_samples):
    """A compiled (bound, gradient) function, cached on the model per (method, L)."""
    if method not in GRADIENT_METHODS:
        raise ValueError(f"Unknown method {method!r}; use one of {GRADIENT_METHODS}.")
    cache = model_cache(model, "gradient_steps")
    if (method, num_samples) in cache:
        return cache[(method, num_samples)]
    variables = model.encoder.trainable_variables

    @tf.function
    def step(x, seed):
        with tf.GradientTape() as tape:
            if method == "reparameterization":
                terms = model.bound_terms(x, training=True, num_samples=num_samples, seed=seed)
                bound = surrogate = tf.reduce_mean(terms["elbo"])
            else:
                params = model.encoder(x, training=True)
                posterior = model.posterior_layer.distribution(params)
                z = tf.stop_gradient(model.posterior_layer.sample(params, num_samples, seed=seed))
                log_q = posterior.log_prob(z)
                log_joint = model.decoder.log_likelihood(x, model.decoder(z))
                log_joint += model.prior_distribution.log_prob(z)
                f = tf.stop_gradient(log_joint - log_q)
                bound = tf.reduce_mean(f)
                surrogate = tf.reduce_mean(f * log_q)
        return bound, _flat(tape.gradient(surrogate, variables))

    cache[(method, num_samples)] = step
    return step


def gradient_statistics(model, x, method="reparameterization", num_samples=1, num_draws=100):
    """Mean and variance over `num_draws` independent draws of the bound and its gradient.

    Returns:
        dict with `bound_mean`, `bound_std`, `gradient_mean` (vector), `gradient_variance`
        (sum over weights of the per-weight variance), `relative_variance` (that sum divided by
        the squared norm of the mean gradient: below 1, a single draw points the right way),
        `method` and `num_samples`.
    """
    bounds, gradients = [], []
    for draw in range(num_draws):
        bound, gradient = bound_and_gradient(model, x, method, num_samples, seed=(draw, 12345))
        bounds.append(bound)
        gradients.append(gradient)
    gradients = np.stack(gradients)
    mean = gradients.mean(axis=0)
    variance = float(gradients.var(axis=0, ddof=1).sum())
    return {
        "method": method,
        "num_samples": num_samples,
        "bound_mean": float(np.mean(bounds)),
        "bound_std": float(np.std(bounds, ddof=1)),
        "gradient_mean": mean,
        "gradient_variance": variance,
        "relative_variance": variance / max(float(mean @ mean), 1e-30),
        "num_draws": num_draws,
    }


# ---------------------------------------------------------------- posterior collapse
#
# A latent dimension the encoder ignores ("collapsed": q(z_j|x) = p(z_j) for every x) costs no KL
# and carries no information about x. Three standard measures, each cheap on a few thousand
# inputs; `latent_report` gathers them for `keras-aevb evaluate` and TensorBoard.

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016), section 5.2


class ActiveUnits(NamedTuple):
    """What `active_units` measured: `count` of the `mask`'s True entries, per-dimension
    `variance` of the posterior mean over the inputs, and the `threshold` used."""

    count: int
    mask: np.ndarray
    variance: np.ndarray
    threshold: float


def _batches(model, x, batch_size):
    x = model.as_event(x)
    n = int(x.shape[0])
    for start in range(0, n, batch_size):
        yield x[start : start + batch_size]


def posterior_means(model, x, batch_size=1000):
    """E_q[z|x] for every input, NumPy `[n, latent_dim]` (the model's `embed`)."""
    means = [
        np.asarray(model.posterior_layer.mean(model.encoder(batch, training=False)))
        for batch in _batches(model, x, batch_size)
    ]
    return np.concatenate(means, axis=0)


def active_units(model, x, threshold=ACTIVE_UNIT_THRESHOLD, batch_size=1000):
    """Active latent dimensions (Burda, Grosse & Salakhutdinov, 2016, eq. 14).

    Dimension j is active when A_j = Var_x( E_{q(z|x)}[z_j] ) > threshold (0.01): the posterior
    mean moves with the input. Collapsed dimensions have A_j near 0.

    Args:
        model: an `AEVB` (or a baseline).
        x: inputs `[n, *event_shape]` (n >= 2), e.g. the test set.
        threshold: the activity threshold.

    Returns:
        `ActiveUnits(count, mask, variance, threshold)`.
    """
    means = posterior_means(model, x, batch_size)
    if len(means) < 2:
        raise ValueError(
            f"active_units needs at least 2 inputs to take a variance, got {len(means)}"
        )
    variance = means.astype(np.float64).var(axis=0)
    mask = variance > threshold
    return ActiveUnits(int(mask.sum()), mask, variance, float(threshold))


def kl_per_dimension(model, x, num_samples=100, seed=0, batch_size=1000):
    """KL(q(z_j|x) || p(z_j)) for each latent dimension j, averaged over the inputs, in nats.

    Closed form where TFP has it (the Gaussian pair: paper App. B per dimension), else the
    Monte Carlo mean of log q(z_j|x) - log p(z_j) over `num_samples` draws from a fixed `seed`.
    Summed over j it is the bound's KL term. A collapsed dimension has KL 0.

    Returns:
        NumPy `[latent_dim]`.
    """
    totals, n = None, 0
    for i, batch in enumerate(_batches(model, x, batch_size)):
        params = model.encoder(batch, training=False)
        q, p = scalar_factors(model.posterior_layer.distribution(params), model.prior_distribution)
        try:
            kl = tfp.distributions.kl_divergence(q, p)
        except NotImplementedError:
            z = model.posterior_layer.sample(params, num_samples, seed=tf.constant([seed, i]))
            kl = tf.reduce_mean(q.log_prob(z) - p.log_prob(z), axis=0)
        kl = np.asarray(kl, np.float64)
        totals = kl.sum(axis=0) if totals is None else totals + kl.sum(axis=0)
        n += kl.shape[0]
    return totals / n


def mutual_information(model, x, seed=0):
    """I(x; z) under q(x, z) = q(z|x) p_data(x), in nats (Hoffman & Johnson, 2016):

        I = E_x E_{q(z|x)}[ log q(z|x) - log q(z) ],   q(z) = 1/N sum_i q(z|x_i),

    one draw z_i ~ q(z|x_i) per input and the aggregate posterior q(z_i) as the mixture over the
    N inputs given (as in He et al., 2019). It is at most log N; compute it on a sample of the
    data (1000 inputs: a 1000 x 1000 matrix of log densities). Collapsed encoders give 0.
    """
    z_x = model.as_event(x)
    n = int(z_x.shape[0])
    params = model.encoder(z_x, training=False)
    posterior = model.posterior_layer.distribution(params)
    z = model.posterior_layer.sample(params, 1, seed=tf.constant([seed, 0]))[0]  # [n, d]
    log_q_own = posterior.log_prob(z)  # [n]
    # log q(z_i | x_k) for every pair: posterior batch [n] against z [n, 1, d] -> [n(i), n(k)]
    log_q_all = posterior.log_prob(z[:, None, :])
    log_aggregate = tf.reduce_logsumexp(log_q_all, axis=1) - np.log(n)
    return float(tf.reduce_mean(log_q_own - log_aggregate))


def latent_report(model, x, max_mutual_information_examples=1000):
    """Active units, KL per dimension and I(x; z) on `x`, as plain JSON-able values."""
    active = active_units(model, x)
    report = {
        "active_units": active.count,
        "latent_dim": int(model.latent_dim),
        "posterior_mean_variance": [round(float(v), 6) for v in active.variance],
        "kl_per_dimension": [round(float(v), 6) for v in kl_per_dimension(model, x)],
    }
    subset = x[:max_mutual_information_examples]
    report["mutual_information"] = mutual_information(model, subset)
    report["mutual_information_examples"] = int(len(subset))
    return report
