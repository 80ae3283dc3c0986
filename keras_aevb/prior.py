"""The prior p(z) over the latent variables, built from a name, a distribution or a callable.

The paper uses the centred isotropic Gaussian p(z) = N(z; 0, I) (section 3). A prior is given as
a name in `PRIORS`, a `tfd.Distribution` instance (its event shape must be `[latent_dim]`, or its
batch shape `[latent_dim]` for scalar components), or a callable `latent_dim -> Distribution`.
"""

import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions


def _standard_normal(latent_dim):
    return tfd.Normal(loc=tf.zeros([latent_dim]), scale=tf.ones([latent_dim]))


# name -> (constructor of per-dimension scalar distributions [latent_dim], support).
PRIORS = {
    "standard_normal": (_standard_normal, "real"),
}


def make_prior(prior, latent_dim):
    """Returns p(z) as a distribution with event shape `[latent_dim]`.

    Args:
        prior: a name in `PRIORS`, a `tfd.Distribution`, or a callable taking `latent_dim`.
        latent_dim: number of latent dimensions (J in the paper).
    """
    if isinstance(prior, str):
        try:
            constructor, _ = PRIORS[prior]
        except KeyError:
            raise ValueError(f"Unknown prior {prior!r}; known priors: {sorted(PRIORS)}.") from None
        dist = constructor(latent_dim)
    elif isinstance(prior, tfd.Distribution):
        dist = prior
    elif callable(prior):
        dist = prior(latent_dim)
        if not isinstance(dist, tfd.Distribution):
            raise ValueError(
                f"A callable prior must return a tfd.Distribution, got {type(dist).__name__}."
            )
    else:
        raise ValueError(
            "prior must be a name, a tfd.Distribution or a callable latent_dim -> Distribution; "
            f"got {prior!r}."
        )
    if dist.event_shape.rank == 0:
        dist = tfd.Independent(dist, reinterpreted_batch_ndims=1)
    if dist.event_shape.as_list() != [latent_dim]:
        raise ValueError(
            f"The prior's event shape is {dist.event_shape.as_list()}, but the encoder has "
            f"latent_dim={latent_dim}: the prior must have event shape [{latent_dim}]."
        )
    return dist
