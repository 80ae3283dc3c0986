"""Posterior families: from encoder outputs to a reparameterized `tfd` distribution.

Paper section 2.4: the reparameterization z = g(eps, phi), eps ~ p(eps) exists for (1) families
with a tractable inverse CDF, (2) location-scale families, (3) compositions of these. Each family
here is one `Family` record in `FAMILIES`, chosen by name (no `if name == ...` chains):

- `param_names`: the encoder's outputs, one `[batch, latent_dim]` tensor each;
- `constrain`: maps an unconstrained dense output to a valid parameter, per parameter name;
- `build`: constrained parameters -> a batch of scalar `tfd` distributions `[batch, latent_dim]`;
- `noise(shape, dtype, seed)` and `g(eps, params)` (optional; `seed` is a stateless int32 pair): the explicit form eps ~ p(eps), z = g(eps, params) of eq. 4, used
  for sampling when present so that the gradient is the paper's pathwise one by construction.
  Families without it are sampled with TFP's own (possibly implicit) reparameterization.
"""

import dataclasses
from collections.abc import Callable

import tensorflow as tf
import tensorflow_probability as tfp
from keras import ops

tfd = tfp.distributions

# log sigma^2 of the Gaussian posterior is softly bounded to this range. exp(0.5 * 30) overflows
# nothing in float32, and the bounds sit far outside the values a trained MNIST encoder uses
# (about -12..2), so inside them the map is the identity up to ~1e-6; outside, an early blow-up of
# the encoder cannot turn sigma into inf or 0 and the KL into NaN.
Z_LOG_VAR_BOUNDS = (-30.0, 30.0)


def soft_clip(x, low, high):
    """Smooth clip of `x` to `(low, high)`: identity well inside, gradient never exactly zero.

    A hard `clip` would stop all gradient once a value is outside the range, so a unit that ran
    away could never come back.
    """
    x = low + ops.softplus(x - low)
    return high - ops.softplus(high - x)


@dataclasses.dataclass(frozen=True)
class Family:
    """A reparameterizable posterior family (see module docstring)."""

    name: str
    param_names: tuple
    support: str
    build: Callable
    constrain: dict
    noise: Callable | None = None
    g: Callable | None = None
    description: str = ""

    def distribution(self, params):
        """`tfd.Independent` over the last (latent) axis: log_prob sums over latent dims."""
        return tfd.Independent(self.build(params), reinterpreted_batch_ndims=1)


def _normal_g(eps, params):
    # Eq. 4 for the Gaussian (paper section 2.4, example in 2.3): z = mu + sigma * eps.
    return params["z_mean"] + ops.exp(0.5 * params["z_log_var"]) * eps


NORMAL = Family(
    name="normal",
    param_names=("z_mean", "z_log_var"),
    support="real",
    build=lambda p: tfd.Normal(loc=p["z_mean"], scale=ops.exp(0.5 * p["z_log_var"])),
    constrain={
        "z_mean": lambda raw: raw,
        "z_log_var": lambda raw: soft_clip(raw, *Z_LOG_VAR_BOUNDS),
    },
    noise=lambda shape, dtype, seed: tf.random.stateless_normal(shape, seed, dtype=dtype),
    g=_normal_g,
    description="diagonal Gaussian N(z_mean, exp(z_log_var)); eps ~ N(0, I), z = mu + sigma*eps",
)

FAMILIES = {family.name: family for family in (NORMAL,)}


def get_family(name):
    """Looks up a posterior family by name, with a clear error for unknown names."""
    if isinstance(name, Family):
        return name
    try:
        family = FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown posterior family {name!r}; known families: {sorted(FAMILIES)}."
        ) from None
    return family


def check_reparameterized(family):
    """Refuses a family whose samples carry no pathwise gradient (the SGVB estimator needs it)."""
    params = {
        name: family.constrain[name](tf.zeros([1, 1], tf.float32)) for name in family.param_names
    }
    dist = family.distribution(params)
    if dist.reparameterization_type != tfd.FULLY_REPARAMETERIZED:
        raise ValueError(
            f"Posterior family {family.name!r} is not fully reparameterized in TFP "
            f"({dist.reparameterization_type}): its samples carry no gradient to the encoder, "
            "so the SGVB estimator (paper eq. 6-7) cannot be used with it."
        )
    return dist
