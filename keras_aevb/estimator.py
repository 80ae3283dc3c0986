"""The SGVB estimators of the variational lower bound (paper section 2.3).

For one datapoint x with L samples z_l = g(eps_l, x), eps_l ~ p(eps):

    estimator A (eq. 6):  L_A = 1/L sum_l [log p(x, z_l) - log q(z_l|x)]
                              = 1/L sum_l log p(x|z_l)  -  1/L sum_l [log q(z_l|x) - log p(z_l)]
    estimator B (eq. 7):  L_B = -KL(q(z|x) || p(z))  +  1/L sum_l log p(x|z_l)

Both are returned split into the same two terms, `reconstruction_log_likelihood` and `kl`
(estimator A's `kl` is its Monte Carlo estimate), so `elbo = reconstruction - kl` in both, one KL
counted once (DESIGN 9: the TFP-layers pattern counts it twice).
"""

import tensorflow_probability as tfp
from keras import ops

__all__ = [
    "ESTIMATORS",
    "ESTIMATOR_NAMES",
    "analytic_kl_per_dimension",
    "free_bits_kl",
    "gaussian_kl",
    "has_analytic_kl",
    "iwae_terms",
    "resolve_estimator",
    "scalar_factors",
    "sgvb_terms",
]

tfd = tfp.distributions

ESTIMATORS = ("analytic_kl", "monte_carlo", "iwae")

# Names used in configs and messages for the paper's two estimators.
ESTIMATOR_NAMES = {
    "monte_carlo": "SGVB estimator A (eq. 6)",
    "analytic_kl": "SGVB estimator B (eq. 7)",
    "iwae": "importance-weighted bound L_k (Burda et al., 2016)",
}


def has_analytic_kl(posterior, prior):
    """Whether `tfd.kl_divergence` is registered for this posterior/prior pair."""
    try:
        posterior.kl_divergence(prior)
    except NotImplementedError:
        return False
    return True


def resolve_estimator(estimator, posterior, prior, pair_name):
    """Maps "auto" to "analytic_kl" where a closed-form KL exists, else "monte_carlo".

    Raises:
        ValueError: for an unknown estimator, or "analytic_kl" on a pair without a registered KL.
    """
    if estimator == "auto":
        return "analytic_kl" if has_analytic_kl(posterior, prior) else "monte_carlo"
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"Unknown estimator {estimator!r}; use 'analytic_kl' (estimator B, eq. 7), "
            "'monte_carlo' (estimator A, eq. 6), 'iwae' (the importance-weighted bound) or "
            "'auto'."
        )
    if estimator == "analytic_kl" and not has_analytic_kl(posterior, prior):
        raise ValueError(
            f"estimator='analytic_kl' needs a closed-form KL, but tfd.kl_divergence has none "
            f"registered for {pair_name}; use estimator='monte_carlo' (paper eq. 6)."
        )
    return estimator


def gaussian_kl(z_mean, z_log_var):
    """KL(N(mu, sigma^2) || N(0, I)) in closed form, summed over the last axis (paper App. B).

    -KL = 1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)
    """
    return -0.5 * ops.sum(1.0 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var), axis=-1)


def sgvb_terms(log_px_given_z, posterior, prior, z, estimator):
    """Per-datapoint terms of the bound.

    Args:
        log_px_given_z: log p(x|z_l), shape `[L, batch]`.
        posterior: q(z|x), a distribution with batch shape `[batch]`, event `[latent_dim]`.
        prior: p(z), event shape `[latent_dim]`.
        z: the samples z_l, shape `[L, batch, latent_dim]`.
        estimator: "analytic_kl" (B, eq. 7) or "monte_carlo" (A, eq. 6).

    Returns:
        dict of `[batch]` tensors: `elbo`, `reconstruction_log_likelihood`, `kl`.
    """
    reconstruction = ops.mean(log_px_given_z, axis=0)
    if estimator == "analytic_kl":
        kl = posterior.kl_divergence(prior)
    else:
        kl = ops.mean(posterior.log_prob(z) - prior.log_prob(z), axis=0)
    return {
        "elbo": reconstruction - kl,
        "reconstruction_log_likelihood": reconstruction,
        "kl": kl,
    }


def scalar_factors(posterior, prior):
    """q(z|x) and p(z) as distributions of one latent dimension each (batch `[..., d]`).

    Raises:
        ValueError: either is not a product of scalar distributions (`tfd.Independent` or
            `tfd.Sample` over one).
    """
    q = getattr(posterior, "distribution", None)
    p = getattr(prior, "distribution", None)
    if q is None or p is None or q.event_shape.rank != 0 or p.event_shape.rank != 0:
        raise ValueError(
            "a per-dimension KL needs a posterior and a prior that are products of scalar "
            f"distributions; got {type(posterior).__name__} and {type(prior).__name__}"
        )
    return q, p


def analytic_kl_per_dimension(posterior, prior):
    """KL(q(z_j|x) || p(z_j)) per latent dimension in closed form, `[batch, latent_dim]`.

    For posteriors and priors that are products of scalar distributions (`tfd.Independent` or
    `tfd.Sample` over one): the summands of the bound's KL (App. B's sum over j).

    Raises:
        ValueError: either is not such a product, or TFP has no closed form for the pair.
    """
    q, p = scalar_factors(posterior, prior)
    try:
        return tfd.kl_divergence(q, p)
    except NotImplementedError:
        raise ValueError(
            f"TFP has no closed-form KL between {type(q).__name__} and {type(p).__name__}"
        ) from None


def iwae_terms(log_px_given_z, posterior, prior, z, params_stopped=None):
    """The importance-weighted bound of Burda et al. (2016) and, optionally, DReG's surrogate.

        log w_l = log p(x|z_l) + log p(z_l) - log q(z_l|x),     l = 1..k (k = L)
        L_k     = log 1/k sum_l w_l  =  logsumexp_l log w_l - log k

    L_1 is estimator A; L_k <= L_{k+1} <= log p(x) in expectation, with equality for every k
    when q is the exact posterior.

    Args:
        log_px_given_z: `[k, batch]`.
        posterior: q(z|x); prior: p(z); z: `[k, batch, latent_dim]`.
        params_stopped: q(z|x) built from stop-gradient parameters: then also returns the
            doubly-reparameterized surrogate of Tucker et al. (2018),
            sum_l stop_gradient(w~_l^2) log w_l with log q evaluated at the stopped parameters,
            whose gradient in the encoder's weights is DReG's estimator of grad_phi L_k
            (w~ = the normalized weights).

    Returns:
        dict of `[batch]` tensors: `iwae_bound` (and `dreg_surrogate`).
    """
    log_joint = log_px_given_z + prior.log_prob(z)
    log_w = log_joint - posterior.log_prob(z)
    k = ops.cast(ops.shape(log_w)[0], log_w.dtype)
    out = {"iwae_bound": ops.logsumexp(log_w, axis=0) - ops.log(k)}
    if params_stopped is not None:
        normalized = ops.stop_gradient(ops.softmax(log_w, axis=0))
        log_w_path = log_joint - params_stopped.log_prob(z)
        out["dreg_surrogate"] = ops.sum(ops.square(normalized) * log_w_path, axis=0)
    return out


def free_bits_kl(kl, kl_per_dimension, free_bits, sample_weight=None):
    """The KL term with free bits (Kingma et al., 2016): sum_j max(lambda, mean_batch KL_j).

    The floor applies to each latent dimension's KL averaged over the minibatch (weighted by
    `sample_weight`); every example then carries that same floored total, shape of `kl`.
    """
    if sample_weight is None:
        per_dimension = ops.mean(kl_per_dimension, axis=0)
    else:
        shape = (-1,) + (1,) * (len(kl_per_dimension.shape) - 1)
        weight = ops.cast(ops.reshape(sample_weight, shape), kl_per_dimension.dtype)
        per_dimension = ops.sum(kl_per_dimension * weight, axis=0) / ops.maximum(
            ops.sum(weight), 1e-12
        )
    return ops.zeros_like(kl) + ops.sum(ops.maximum(per_dimension, free_bits))
