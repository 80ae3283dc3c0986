"""Variance of the SGVB estimators and of their gradients (paper sections 2.3 and 2.4).

The paper's case for the reparameterization trick is variance: the naive score-function
(REINFORCE) gradient of E_q[f(z)],

    grad_phi E_q[f(z)] = E_q[f(z) grad_phi log q_phi(z)]                        (section 2.2)

"exhibits very high variance", while the pathwise gradient through z = g(eps, phi) does not. These
functions measure both on a model and a minibatch, for notebooks and benchmarks.
"""

import numpy as np
import tensorflow as tf

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
    step = _gradient_step(model, method, int(num_samples))
    bound, gradient = step(model._as_event(x), tf.constant(seed, tf.int32))
    return float(bound), gradient.numpy()


def _gradient_step(model, method, num_samples):
    """A compiled (bound, gradient) function, cached on the model per (method, L)."""
    if method not in GRADIENT_METHODS:
        raise ValueError(f"Unknown method {method!r}; use one of {GRADIENT_METHODS}.")
    cache = model.__dict__.setdefault("_gradient_steps", {})
    if (method, num_samples) in cache:
        return cache[(method, num_samples)]
    variables = model.encoder.trainable_variables

    @tf.function
    def step(x, seed):
        with tf.GradientTape() as tape:
            if method == "reparameterization":
                terms = model._terms(x, training=True, num_samples=num_samples, seed=seed)
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
