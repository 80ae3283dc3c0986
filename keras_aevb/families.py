"""Posterior families: from encoder outputs to a reparameterized `tfd` distribution.

Paper section 2.4: the reparameterization z = g(eps, phi), eps ~ p(eps) exists for (1) families
with a tractable inverse CDF, (2) location-scale families, (3) compositions of these. Each family
here is one `Family` record in `FAMILIES`, chosen by name (no `if name == ...` chains):

- `param_names`: the encoder's outputs, one `[batch, latent_dim]` tensor each;
- `constrain`: maps an unconstrained dense output to a valid parameter, per parameter name (the
  encoder applies it: every bound and floor on a parameter lives here, nowhere else);
- `tfd_class` and `tfd_params`: constrained parameters -> the keyword arguments of the `tfd`
  class (e.g. scale = exp(z_log_scale)); `build(params)` is `tfd_class(**tfd_params(params))`,
  a batch of scalar distributions `[batch, latent_dim]`;
- `noise(shape, dtype, seed)` and `draw(eps, tfd_kwargs)` (optional; `seed` is a stateless
  int32 pair): the explicit form eps ~ p(eps), z = g(eps, params) of eq. 4, with
  `g(eps, params) = draw(eps, tfd_params(params))`, used for sampling when present so that the
  gradient is the paper's pathwise one by construction. Families without it (Gamma,
  Chi-squared, Beta, Student's t) are sampled with TFP's implicit reparameterization (Figurnov et
  al., 2018): dz/dphi = -(dF(z; phi)/dphi) / q(z; phi), exact, with no explicit g.

`g` and the distribution whose log q the bound uses read the same keyword arguments, computed in
one place, and `draw` is the inverse CDF (or location-scale map) of exactly that distribution: z
is a sample of q, so E[log q(z) - log p(z)] is the KL. A clip of z that q did not know about made
a LogNormal posterior report bounds of +1e20 nats on binary data (issue 13); where z must stay
inside a range, the parameters are bounded (in `constrain`) and the noise's support is bounded
(the inverse-CDF noise below lies in [F^-1(2^-24), F^-1(1 - 2^-24)]), not the sample.

The families by support (see `keras_aevb.posterior_families()` for the full table, computed
from TFP, in `keras_aevb.prior`):

    real line        normal, laplace, logistic, student_t, cauchy, gumbel
    positive         exponential, gamma, chi2, log_normal, weibull
    unit interval    uniform, beta, kumaraswamy

Positive parameters are `softplus(raw) + floor`: softplus rather than exp because it grows
linearly, so one large encoder output cannot overflow a rate or concentration; the floor of each
parameter says below why it is needed. Scales of location-scale families are `exp(log_scale)`
with the log softly bounded, the same as the Gaussian's log-variance.
"""

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from keras import ops

__all__ = [
    "BETA",
    "CAUCHY",
    "CHI2",
    "CONCENTRATION_FLOOR",
    "EXPECTATIONS",
    "EXPONENTIAL",
    "FAMILIES",
    "Family",
    "GAMMA",
    "GUMBEL",
    "GUMBEL_LOC_FLOOR",
    "GUMBEL_LOG_SCALE_BOUNDS",
    "KUMARASWAMY",
    "LAPLACE",
    "LOGISTIC",
    "LOG_NORMAL",
    "LOG_NORMAL_LOC_BOUNDS",
    "LOG_NORMAL_LOG_SCALE_BOUNDS",
    "LOG_NORMAL_LOG_Z_LIMIT",
    "LOG_NORMAL_NOISE_LIMIT",
    "NORMAL",
    "RATE_FLOOR",
    "STUDENT_T",
    "STUDENT_T_DF_FLOOR",
    "STUDENT_T_DF_SHIFT",
    "SUPPORTS",
    "UNIFORM",
    "UNIFORM_WIDTH_FLOOR",
    "UNIT_CONCENTRATION_FLOOR",
    "WEIBULL",
    "Z_LOG_SCALE_BOUNDS",
    "Z_LOG_VAR_BOUNDS",
    "check_reparameterized",
    "get_family",
    "reference_params",
    "soft_clip",
    "support_contains",
    "uniform_noise",
]

tfd = tfp.distributions

# log sigma^2 of the Gaussian posterior is softly bounded to this range. exp(0.5 * 30) overflows
# nothing in float32, and the bounds sit far outside the values a trained MNIST encoder uses
# (about -12..2), so inside them the map is the identity up to ~1e-6; outside, an early blow-up of
# the encoder cannot turn sigma into inf or 0 and the KL into NaN.
Z_LOG_VAR_BOUNDS = (-30.0, 30.0)

# log scale of the other location-scale families: the same range for the scale as the Gaussian's
# sigma (exp(0.5 * +-30)), for the same reason.
Z_LOG_SCALE_BOUNDS = (-15.0, 15.0)

# Floor of rates and scales of the positive families: a rate (or 1/scale) near 0 would put z at
# float32 infinity; with the floor the mean is at most 1e3 times the standard noise's.
RATE_FLOOR = 1e-3

# Floor of the shape parameters of Gamma, Chi-squared (df/2) and Weibull. Below 1 the density is
# infinite at 0, and a sample that underflows to 0.0 in float32 has log q = +inf (Monte Carlo KL
# infinite) and an undefined implicit gradient. At concentration a, P(z < 1e-38) ~ 1e-38**a:
# ~1e-19 at 0.5, but ~2e-4 at 0.1: about 200 draws per MNIST epoch (60k examples x Nz = 20).
CONCENTRATION_FLOOR = 0.5

# Floor of Beta and Kumaraswamy concentrations. Near 1, float32 resolves 1 - z only to 6e-8, so a
# concentration b < 1 ends a sample at exactly 1.0 with probability ~(6e-8)**b (2e-4 at b = 0.5),
# where log q = +inf. With both concentrations >= 1 the density is bounded on [0, 1]: the
# posterior is unimodal (no U shapes), and the Uniform prior Beta(1, 1) is still reachable.
UNIT_CONCENTRATION_FLOOR = 1.0

# Smallest width of the Uniform posterior: KL(q || U(0, 1)) = -log(width) stays below 14 nats
# per dimension, and low + width stays resolvable in float32 (spacing 6e-8 below 1).
UNIFORM_WIDTH_FLOOR = 1e-6

# Student's t posterior: the degrees of freedom are learned per dimension, df = 2 + softplus(raw +
# shift). df > 2 keeps the posterior's variance finite (it is scale**2 * df / (df - 2)), so the
# decoder never sees draws whose spread has no bound; the shift puts an untrained encoder
# (raw ~ 0) at df = 5, the default Student's t prior's df.
STUDENT_T_DF_FLOOR = 2.0
STUDENT_T_DF_SHIFT = math.log(math.expm1(3.0))

# Gumbel posterior: KL(Gumbel(l, s) || Gumbel(0, 1)) holds exp(-l) * Gamma(1 + s), which
# overflows float32 at s ~ 34 or l ~ -88. In a measured MNIST run (paper model, Adagrad 0.02) one
# early step took log s from 1 to 9.4: KL = inf, NaN at step 3. With log s <= 2 and l >= -15
# (soft bounds) the KL stays below ~4e10; a posterior there would cost > 1e4 nats of KL, far from
# any useful one. The soft upper bound bends the map near it: raw 0 gives log s = -0.13, not 0.
GUMBEL_LOG_SCALE_BOUNDS = (-15.0, 2.0)
GUMBEL_LOC_FLOOR = -15.0

# The supports a family or prior can have, as (low, high) intervals.
SUPPORTS = {
    "real": (-math.inf, math.inf),
    "positive": (0.0, math.inf),
    "unit_interval": (0.0, 1.0),
}


# Expectations E_q[f(z)] on which the finiteness of KL(q || p) = E_q[log q(z) - log p(z)]
# hangs, given p: -log p(z) grows like log|z| for Student's t and Cauchy priors ("log"), |z| for
# Laplace, Logistic and the positive priors ("abs"), z^2 for the Normal ("square"), exp(-z) in
# the left tail of the Gumbel ("exp_neg"), (log z)^2 at 0 and infinity for the LogNormal
# ("log_square"). A family lists those that are finite for every valid parameter value; a prior
# whose need is missing gives an infinite KL whatever the encoder does (e.g. a Cauchy posterior
# under a Normal prior: E_q[z^2] = inf), so `AEVB` refuses the pair.
EXPECTATIONS = ("log", "abs", "square", "exp_neg", "log_square")


def support_contains(outer, inner):
    """Whether the support named `outer` contains the support named `inner`."""
    (outer_low, outer_high), (inner_low, inner_high) = SUPPORTS[outer], SUPPORTS[inner]
    return outer_low <= inner_low and inner_high <= outer_high


def soft_clip(x, low, high):
    """Smooth clip of `x` to `(low, high)`: identity well inside, gradient never exactly zero.

    A hard `clip` would stop all gradient once a value is outside the range, so a unit that ran
    away could never come back.
    """
    x = low + ops.softplus(x - low)
    return high - ops.softplus(high - x)


def uniform_noise(shape, dtype, seed):
    """u ~ U(0, 1), stateless, strictly inside (0, 1): at least 2**-24 (float32) from both ends.

    `tf.random.stateless_uniform` draws multiples of 2**-23 in [0, 1 - 2**-23]; adding half a
    step centres the grid, so log(u), log(1 - u) and tan(pi * (u - 1/2)) are all finite: every
    inverse CDF below maps u to a finite z.
    """
    dtype = tf.as_dtype(dtype)
    half_step = float(np.finfo(dtype.as_numpy_dtype).epsneg)
    u = tf.random.stateless_uniform(shape, seed, dtype=dtype) + half_step
    return ops.clip(u, half_step, 1.0 - half_step)


def _normal_noise(shape, dtype, seed):
    return tf.random.stateless_normal(shape, seed, dtype=dtype)


def _positive(floor, shift=0.0):
    """softplus(raw + shift) + floor: a positive parameter bounded away from 0 (see floors)."""
    return lambda raw: ops.softplus(raw + shift) + floor


def _log_scale(raw):
    return soft_clip(raw, *Z_LOG_SCALE_BOUNDS)


def _identity(raw):
    return raw


@dataclasses.dataclass(frozen=True)
class Family:
    """A reparameterizable posterior family (see module docstring)."""

    name: str
    param_names: tuple
    support: str
    tfd_class: type
    tfd_params: Callable
    constrain: dict
    noise: Callable | None = None
    draw: Callable | None = None
    description: str = ""
    finite_expectations: tuple = EXPECTATIONS

    @property
    def reparameterization(self):
        """'explicit' where the family defines eq. 4's g, else 'implicit' (TFP's sampler)."""
        return "explicit" if self.draw is not None else "implicit"

    def build(self, params):
        """q's scalar distributions `[batch, latent_dim]` from the constrained parameters."""
        return self.tfd_class(**self.tfd_params(params))

    @property
    def g(self):
        """Eq. 4's g(eps, params) = draw(eps, tfd_params(params)); None for implicit families."""
        return None if self.draw is None else self._g

    def _g(self, eps, params):
        return self.draw(eps, self.tfd_params(params))

    def distribution(self, params):
        """`tfd.Independent` over the last (latent) axis: log_prob sums over latent dims."""
        return tfd.Independent(self.build(params), reinterpreted_batch_ndims=1)

    def sample(self, params, num_samples, seed, eps=None):
        """z ~ q(z|x), `[num_samples, batch, latent_dim]`: the one sampling path of a family.

        Where the family has an explicit g (eq. 4), z = g(eps, params) with eps ~ p(eps) drawn
        from the stateless `seed` (or the given `eps`, which fixes num_samples and the shape);
        otherwise TFP's implicitly reparameterized sample from `seed`. `num_samples` may be a
        tensor (no retrace per count).
        """
        if eps is not None:
            return self._g(eps, params)
        if self.g is None:
            return self.distribution(params).sample(num_samples, seed=seed)
        reference = params[self.param_names[0]]
        if isinstance(num_samples, int):
            shape = (num_samples, *ops.shape(reference))
        else:
            shape = tf.concat([[num_samples], tf.shape(reference)], axis=0)
        return self._g(self.noise(shape, reference.dtype, seed), params)


# ---------------------------------------------------------------- real line


def _location_scale_draw(eps, kwargs):
    # Section 2.4, case (2): z = location + scale * eps, eps from the standard member. For the
    # Gaussian (example in 2.3): z = mu + sigma * eps.
    return kwargs["loc"] + kwargs["scale"] * eps


NORMAL = Family(
    name="normal",
    param_names=("z_mean", "z_log_var"),
    support="real",
    tfd_class=tfd.Normal,
    tfd_params=lambda p: {"loc": p["z_mean"], "scale": ops.exp(0.5 * p["z_log_var"])},
    constrain={
        "z_mean": lambda raw: raw,
        "z_log_var": lambda raw: soft_clip(raw, *Z_LOG_VAR_BOUNDS),
    },
    noise=_normal_noise,
    draw=_location_scale_draw,
    description="diagonal Gaussian N(z_mean, exp(z_log_var)); eps ~ N(0, I), z = mu + sigma*eps",
)


def _location_scale_params(p):
    return {"loc": p["z_loc"], "scale": ops.exp(p["z_log_scale"])}


_LOCATION_SCALE_CONSTRAIN = {"z_loc": _identity, "z_log_scale": _log_scale}


def _laplace_noise(shape, dtype, seed):
    # Inverse CDF of Laplace(0, 1): eps = -sign(v) log(1 - 2|v|), v = u - 1/2.
    v = uniform_noise(shape, dtype, seed) - 0.5
    return -ops.sign(v) * ops.log1p(-2.0 * ops.abs(v))


def _logistic_noise(shape, dtype, seed):
    # Inverse CDF of Logistic(0, 1): eps = log(u / (1 - u)).
    u = uniform_noise(shape, dtype, seed)
    return ops.log(u) - ops.log1p(-u)


def _cauchy_noise(shape, dtype, seed):
    # Inverse CDF of Cauchy(0, 1): eps = tan(pi (u - 1/2)).
    return ops.tan(math.pi * (uniform_noise(shape, dtype, seed) - 0.5))


def _gumbel_noise(shape, dtype, seed):
    # Inverse CDF of Gumbel(0, 1): eps = -log(-log u).
    return -ops.log(-ops.log(uniform_noise(shape, dtype, seed)))


def _location_scale_family(
    name, tfd_class, noise, description, finite_expectations, constrain=None
):
    return Family(
        name=name,
        param_names=("z_loc", "z_log_scale"),
        support="real",
        tfd_class=tfd_class,
        tfd_params=_location_scale_params,
        constrain=constrain or _LOCATION_SCALE_CONSTRAIN,
        noise=noise,
        draw=_location_scale_draw,
        description=description,
        finite_expectations=finite_expectations,
    )


# Exponential tails: every power of |z| has a finite mean, but E exp(-z) only for scale < 1, and
# an untrained encoder starts at scale 1.
_EXPONENTIAL_TAILS = ("log", "abs", "square", "log_square")


LAPLACE = _location_scale_family(
    "laplace",
    tfd.Laplace,
    _laplace_noise,
    "Laplace(z_loc, exp(z_log_scale)); eps ~ Laplace(0, 1) by inverse CDF, z = loc + scale*eps",
    _EXPONENTIAL_TAILS,
)
LOGISTIC = _location_scale_family(
    "logistic",
    tfd.Logistic,
    _logistic_noise,
    "Logistic(z_loc, exp(z_log_scale)); eps = log(u/(1-u)), z = loc + scale*eps",
    _EXPONENTIAL_TAILS,
)


class _CauchyPosterior(tfd.Cauchy):
    """tfd.Cauchy whose `mean()` raises NotImplementedError instead of returning NaN.

    The Cauchy distribution has no mean; the posterior layer's deterministic mode catches
    NotImplementedError and uses the mode (= z_loc) instead. Everything else, including the
    registered Cauchy-Cauchy KL (looked up along the class hierarchy), is tfd.Cauchy's.
    """

    def _mean(self):
        raise NotImplementedError("The Cauchy distribution has no mean; use its mode, z_loc.")


CAUCHY = _location_scale_family(
    "cauchy",
    _CauchyPosterior,
    _cauchy_noise,
    "Cauchy(z_loc, exp(z_log_scale)); eps = tan(pi(u - 1/2)), z = loc + scale*eps",
    ("log",),  # no mean: only logarithmic moments
)
GUMBEL = _location_scale_family(
    "gumbel",
    tfd.Gumbel,
    _gumbel_noise,
    "Gumbel(z_loc, exp(z_log_scale)); eps = -log(-log u), z = loc + scale*eps",
    # Right tail exponential, left tail doubly exponential: E exp(-z) = exp(-loc) Gamma(1 + scale).
    EXPECTATIONS,
    {
        "z_loc": lambda raw: GUMBEL_LOC_FLOOR + ops.softplus(raw - GUMBEL_LOC_FLOOR),
        "z_log_scale": lambda raw: soft_clip(raw, *GUMBEL_LOG_SCALE_BOUNDS),
    },
)

STUDENT_T = Family(
    name="student_t",
    param_names=("z_loc", "z_log_scale", "z_df"),
    support="real",
    tfd_class=tfd.StudentT,
    tfd_params=lambda p: {"df": p["z_df"], **_location_scale_params(p)},
    constrain={
        "z_loc": _identity,
        "z_log_scale": _log_scale,
        "z_df": _positive(STUDENT_T_DF_FLOOR, STUDENT_T_DF_SHIFT),
    },
    description=(
        "StudentT(z_df, z_loc, exp(z_log_scale)), df learned (> 2); implicit: TFP draws "
        "loc + scale * N / sqrt(G / df), G ~ Gamma(df/2, 1/2) with implicit gradient in df"
    ),
    # df > 2: moments below df are finite, so up to z^2; exponential moments never.
    finite_expectations=("log", "abs", "square", "log_square"),
)

# ---------------------------------------------------------------- positive half-line


def _exponential_noise(shape, dtype, seed):
    # Inverse CDF of Exponential(1): eps = -log(u) (u and 1 - u have the same law).
    return -ops.log(uniform_noise(shape, dtype, seed))


EXPONENTIAL = Family(
    name="exponential",
    param_names=("z_rate",),
    support="positive",
    tfd_class=tfd.Exponential,
    tfd_params=lambda p: {"rate": p["z_rate"]},
    constrain={"z_rate": _positive(RATE_FLOOR)},
    noise=_exponential_noise,
    # Inverse CDF (case 1) and scale (case 2): z = eps / rate.
    draw=lambda eps, kwargs: eps / kwargs["rate"],
    description="Exponential(z_rate); eps = -log u ~ Exp(1), z = eps / rate",
)

GAMMA = Family(
    name="gamma",
    param_names=("z_concentration", "z_rate"),
    support="positive",
    tfd_class=tfd.Gamma,
    tfd_params=lambda p: {"concentration": p["z_concentration"], "rate": p["z_rate"]},
    constrain={
        "z_concentration": _positive(CONCENTRATION_FLOOR),
        "z_rate": _positive(RATE_FLOOR),
    },
    description="Gamma(z_concentration, z_rate); implicit reparameterization (no closed-form g)",
)

CHI2 = Family(
    name="chi2",
    param_names=("z_df",),
    support="positive",
    tfd_class=tfd.Chi2,
    tfd_params=lambda p: {"df": p["z_df"]},
    # df / 2 is a Gamma concentration: the same floor, doubled.
    constrain={"z_df": _positive(2.0 * CONCENTRATION_FLOOR)},
    description="Chi2(z_df) = Gamma(df/2, 1/2); implicit reparameterization. One parameter: "
    "mean df, variance 2 df",
)


# The LogNormal posterior's log z = loc + scale * eps must stay inside +-LOG_NORMAL_LOG_Z_LIMIT,
# so that z is a finite, non-zero float32 and so is every accepted prior's log density at it
# (z^2 under a Normal or Cauchy prior overflows float32 from z ~ 2e19, log z ~ 44: a measured
# MNIST run under the Normal prior hit it at step 99 with bounds of +-80). That is done with
# bounded parameters and bounded noise, never by clipping z: z clipped while log q was evaluated
# at the unclipped parameters gave bounds of +1e20 nats on binary data (issue 13). The noise is
# eps = Phi^-1(u) with u on the centred float32 grid, so |eps| <= Phi^-1(1 - 2^-24) = 5.29
# (a standard normal truncated at probability 1.2e-7); the location is softly bounded to
# +-10 (z from 4.5e-5 to 2.2e4 at eps = 0) and the scale to 20 / 5.29 = 3.78, so
# |log z| < 10 + 3.78 * 5.29 = 30: z in (9e-14, 1.1e13), z^2 < 1.2e26. The soft upper bound of
# log scale (1.33) bends the map near 0: raw 0 gives log scale -0.25 (scale 0.78), not 0.
LOG_NORMAL_LOG_Z_LIMIT = 30.0
LOG_NORMAL_LOC_BOUNDS = (-10.0, 10.0)
LOG_NORMAL_NOISE_LIMIT = 5.2948  # -Phi^-1(2^-24) = 5.294704 in float32, rounded up
LOG_NORMAL_LOG_SCALE_BOUNDS = (
    Z_LOG_SCALE_BOUNDS[0],
    math.log((LOG_NORMAL_LOG_Z_LIMIT - LOG_NORMAL_LOC_BOUNDS[1]) / LOG_NORMAL_NOISE_LIMIT),
)


def _normal_noise_by_inverse_cdf(shape, dtype, seed):
    # eps = Phi^-1(u): standard normal, bounded by LOG_NORMAL_NOISE_LIMIT (see above).
    return tf.math.ndtri(uniform_noise(shape, dtype, seed))


LOG_NORMAL = Family(
    name="log_normal",
    param_names=("z_loc", "z_log_scale"),
    support="positive",
    tfd_class=tfd.LogNormal,
    tfd_params=_location_scale_params,
    constrain={
        "z_loc": lambda raw: soft_clip(raw, *LOG_NORMAL_LOC_BOUNDS),
        "z_log_scale": lambda raw: soft_clip(raw, *LOG_NORMAL_LOG_SCALE_BOUNDS),
    },
    noise=_normal_noise_by_inverse_cdf,
    # Composition (case 3): z = exp(loc + scale * eps), no clip (see above).
    draw=lambda eps, kwargs: ops.exp(_location_scale_draw(eps, kwargs)),
    description="LogNormal(z_loc, exp(z_log_scale)) of log z, loc in (-10, 10), scale < 3.8; "
    "eps = Phi^-1(u) ~ N(0, 1), z = exp(loc + scale*eps)",
)


def _weibull_draw(eps, kwargs):
    # Inverse CDF composed with a power: eps ~ Exp(1), z = scale * eps**(1/k).
    return kwargs["scale"] * ops.exp(ops.log(eps) / kwargs["concentration"])


WEIBULL = Family(
    name="weibull",
    param_names=("z_concentration", "z_scale"),
    support="positive",
    tfd_class=tfd.Weibull,
    tfd_params=lambda p: {"concentration": p["z_concentration"], "scale": p["z_scale"]},
    constrain={
        "z_concentration": _positive(CONCENTRATION_FLOOR),
        "z_scale": _positive(RATE_FLOOR),
    },
    noise=_exponential_noise,
    draw=_weibull_draw,
    description="Weibull(z_concentration k, z_scale lambda); eps = -log u, z = lambda * eps**(1/k)",
)

# ---------------------------------------------------------------- unit interval


def _uniform_params(p):
    # low = position * (1 - width), so [low, low + width] lies inside [0, 1] for every raw input.
    low = p["z_position"] * (1.0 - p["z_width"])
    return {"low": low, "high": low + p["z_width"]}


def _uniform_draw(u, kwargs):
    # Inverse CDF: z = low + (high - low) u. The minimum only catches float32 rounding past high
    # (u < 1 - 2^-24, so only at the top of the grid), where q's density would be 0: it moves no
    # probability.
    low, high = kwargs["low"], kwargs["high"]
    return ops.minimum(low + (high - low) * u, high)


UNIFORM = Family(
    name="uniform",
    param_names=("z_position", "z_width"),
    support="unit_interval",
    tfd_class=tfd.Uniform,
    tfd_params=_uniform_params,
    constrain={
        "z_position": ops.sigmoid,
        "z_width": lambda raw: UNIFORM_WIDTH_FLOOR + (1.0 - UNIFORM_WIDTH_FLOOR) * ops.sigmoid(raw),
    },
    noise=uniform_noise,
    draw=_uniform_draw,
    description="Uniform(low, low + z_width), low = z_position * (1 - z_width): inside [0, 1]; "
    "z = low + width*u",
)

BETA = Family(
    name="beta",
    param_names=("z_concentration1", "z_concentration0"),
    support="unit_interval",
    tfd_class=tfd.Beta,
    tfd_params=lambda p: {
        "concentration1": p["z_concentration1"],
        "concentration0": p["z_concentration0"],
    },
    constrain={
        "z_concentration1": _positive(UNIT_CONCENTRATION_FLOOR),
        "z_concentration0": _positive(UNIT_CONCENTRATION_FLOOR),
    },
    description="Beta(z_concentration1 a, z_concentration0 b); implicit reparameterization",
)


def _kumaraswamy_draw(u, kwargs):
    # Inverse CDF: z = (1 - (1 - u)**(1/b))**(1/a), in log space for accuracy near 0 and 1.
    # Clipped into [tiny, 1 - 2**-24]: at a sample rounded to exactly 0 or 1 log q is infinite.
    # The clip is float32 rounding, not a transform of q: z rounds to 1 with probability about
    # (a 2^-25)^b (3e-5 at a = 1001, b = 1, the largest a at raw 1e3 and smallest b) and to 0
    # never for b below 1e30.
    a, b = kwargs["concentration1"], kwargs["concentration0"]
    inner = -ops.expm1(ops.log1p(-u) / b)
    z = ops.exp(ops.log(inner) / a)
    finfo = np.finfo(tf.as_dtype(z.dtype).as_numpy_dtype)
    return ops.clip(z, float(finfo.tiny), 1.0 - float(finfo.epsneg))


KUMARASWAMY = Family(
    name="kumaraswamy",
    param_names=("z_concentration1", "z_concentration0"),
    support="unit_interval",
    tfd_class=tfd.Kumaraswamy,
    tfd_params=lambda p: {
        "concentration1": p["z_concentration1"],
        "concentration0": p["z_concentration0"],
    },
    constrain={
        "z_concentration1": _positive(UNIT_CONCENTRATION_FLOOR),
        "z_concentration0": _positive(UNIT_CONCENTRATION_FLOOR),
    },
    noise=uniform_noise,
    draw=_kumaraswamy_draw,
    description="Kumaraswamy(a, b), the Beta look-alike with a closed-form inverse CDF; "
    "z = (1 - (1-u)**(1/b))**(1/a)",
)

FAMILIES = {
    family.name: family
    for family in (
        NORMAL,
        LAPLACE,
        LOGISTIC,
        STUDENT_T,
        CAUCHY,
        GUMBEL,
        EXPONENTIAL,
        GAMMA,
        CHI2,
        LOG_NORMAL,
        WEIBULL,
        UNIFORM,
        BETA,
        KUMARASWAMY,
    )
}


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


def reference_params(family, latent_dim=1, batch=1):
    """Parameters from raw encoder outputs of 0: a valid point of every family, for checks."""
    return {
        name: family.constrain[name](tf.zeros([batch, latent_dim], tf.float32))
        for name in family.param_names
    }


def check_reparameterized(family):
    """Refuses a family whose samples carry no pathwise gradient (the SGVB estimator needs it)."""
    dist = family.distribution(reference_params(family))
    if dist.reparameterization_type != tfd.FULLY_REPARAMETERIZED:
        raise ValueError(
            f"Posterior family {family.name!r} is not fully reparameterized in TFP "
            f"({dist.reparameterization_type}): its samples carry no gradient to the encoder, "
            "so the SGVB estimator (paper eq. 6-7), which differentiates through z = g(eps, phi), "
            "cannot be used with it. Pick a family from keras_aevb.posterior_families()."
        )
    return dist
