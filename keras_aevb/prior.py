"""The prior p(z) over the latent variables, built from a name, a distribution or a callable.

The paper uses the centred isotropic Gaussian p(z) = N(z; 0, I) (section 3). A prior is given as

- a name in `PRIORS`: each posterior family's name gives that family at standard parameters
  (below), and "standard_normal" is the paper's N(0, I);
- a `tfd.Distribution` instance: its event shape must be `[latent_dim]`, or its batch shape
  `[latent_dim]` for scalar components;
- a callable `latent_dim -> Distribution`;
- a learned prior: a `keras.layers.Layer` with a `distribution(latent_dim)` method, such as
  `LearnedNormalPrior`. `AEVB` holds it as `model.prior`, so Keras tracks its weights and `fit`
  trains them with the encoder and decoder (empirical Bayes on p(z)).

A distribution or plain callable whose parameters are `tf.Variable`s is refused: nothing would
track those variables, so they would silently stay at their initial values. (A `keras.Variable`
handed to a `tfd` constructor is read once, as a constant: it would not train either; use its
`.value`, inside a Layer, as `LearnedNormalPrior` does.)

The posterior's support must lie inside the prior's (`check_support`), else KL(q || p) is
infinite; `AEVB` checks it before training.
"""

import collections

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from keras_aevb.estimator import has_analytic_kl
from keras_aevb.families import (
    FAMILIES,
    SUPPORTS,
    get_family,
    reference_params,
    support_contains,
    uniform_noise,
)
from keras_aevb.inputs import positive_int

__all__ = [
    "FamilyTable",
    "LearnedNormalPrior",
    "PRIORS",
    "PRIOR_ALIASES",
    "PRIOR_NEEDS",
    "Prior",
    "check_support",
    "fitting_priors",
    "has_quantile",
    "make_prior",
    "posterior_families",
    "prior_config",
    "prior_name",
    "prior_names",
    "prior_quantile",
    "sample_prior",
]

tfd = tfp.distributions


def _iid(tfd_class, **params):
    """A constructor latent_dim -> `tfd_class` with every parameter repeated per dimension."""

    def constructor(latent_dim):
        return tfd_class(**{key: tf.fill([latent_dim], float(v)) for key, v in params.items()})

    constructor.__doc__ = (
        f"{tfd_class.__name__}({', '.join(f'{k}={v:g}' for k, v in params.items())})"
    )
    return constructor


Prior = collections.namedtuple("Prior", ["constructor", "support"])

# name -> (constructor of per-dimension scalar distributions [latent_dim], support). Each family
# at its standard parameters (location 0, scale/rate/concentrations 1), except where noted. Three
# positive priors coincide as densities with Exponential(1) (gamma, weibull) or Exponential(1/2)
# (chi2); the name still matters: it picks the TFP class, hence which KLs are analytic.
PRIORS = {
    "standard_normal": Prior(_iid(tfd.Normal, loc=0.0, scale=1.0), "real"),
    "normal": Prior(_iid(tfd.Normal, loc=0.0, scale=1.0), "real"),
    "laplace": Prior(_iid(tfd.Laplace, loc=0.0, scale=1.0), "real"),
    "logistic": Prior(_iid(tfd.Logistic, loc=0.0, scale=1.0), "real"),
    # df = 5: heavier tails than the Gaussian with a finite kurtosis; the Student's t posterior's
    # df starts there too.
    "student_t": Prior(_iid(tfd.StudentT, df=5.0, loc=0.0, scale=1.0), "real"),
    "cauchy": Prior(_iid(tfd.Cauchy, loc=0.0, scale=1.0), "real"),
    "gumbel": Prior(_iid(tfd.Gumbel, loc=0.0, scale=1.0), "real"),
    "exponential": Prior(_iid(tfd.Exponential, rate=1.0), "positive"),
    "gamma": Prior(_iid(tfd.Gamma, concentration=1.0, rate=1.0), "positive"),
    # df = 2: the smallest df whose density is bounded at 0 (chi2(2) = Exponential(1/2)).
    "chi2": Prior(_iid(tfd.Chi2, df=2.0), "positive"),
    "log_normal": Prior(_iid(tfd.LogNormal, loc=0.0, scale=1.0), "positive"),
    "weibull": Prior(_iid(tfd.Weibull, concentration=1.0, scale=1.0), "positive"),
    "uniform": Prior(_iid(tfd.Uniform, low=0.0, high=1.0), "unit_interval"),
    "beta": Prior(_iid(tfd.Beta, concentration1=1.0, concentration0=1.0), "unit_interval"),
    "kumaraswamy": Prior(
        _iid(tfd.Kumaraswamy, concentration1=1.0, concentration0=1.0), "unit_interval"
    ),
}

# Names that are another name's prior under a second spelling (listed once in tables).
PRIOR_ALIASES = {"standard_normal": "normal"}

# What each named prior needs of the posterior for a finite KL: the expectation E_q[f(z)]
# (keras_aevb.families.EXPECTATIONS) with f the growth of -log p(z); None: bounded -log p.
PRIOR_NEEDS = {
    "standard_normal": "square",
    "normal": "square",
    "laplace": "abs",
    "logistic": "abs",
    "student_t": "log",
    "cauchy": "log",
    "gumbel": "exp_neg",
    "exponential": "abs",
    "gamma": "abs",
    "chi2": "abs",
    "log_normal": "log_square",
    "weibull": "abs",
    "uniform": None,
    "beta": None,
    "kumaraswamy": None,
}
_NEED_WORDS = {
    "log": "log|z|",
    "abs": "|z|",
    "square": "z^2",
    "exp_neg": "exp(-z) as z -> -inf",
    "log_square": "(log z)^2",
}


def prior_names():
    """The named priors with their distribution and support, aliases left out (for docs)."""
    return {
        name: (prior.constructor.__doc__, prior.support)
        for name, prior in PRIORS.items()
        if name not in PRIOR_ALIASES
    }


def prior_name(prior):
    """How messages name a model's `prior` argument: its name, or its type's."""
    return prior if isinstance(prior, str) else type(prior).__name__


def prior_config(prior):
    """A model's `prior` argument as its config holds it: a name; else a clear error."""
    if not isinstance(prior, str):
        raise ValueError(
            "This model's prior is a distribution or callable, which a config cannot hold: "
            "save the weights (model.save_weights) and rebuild the model in code, or use a "
            "named prior."
        )
    return prior


def make_prior(prior, latent_dim):
    """Returns p(z) as a distribution with event shape `[latent_dim]`.

    Args:
        prior: a name in `PRIORS`, a `tfd.Distribution`, a callable taking `latent_dim`, or a
            Keras layer with a `distribution(latent_dim)` method (a learned prior).
        latent_dim: number of latent dimensions (J in the paper).
    """
    if isinstance(prior, str):
        try:
            constructor, _ = PRIORS[prior]
        except KeyError:
            raise ValueError(f"Unknown prior {prior!r}; known priors: {sorted(PRIORS)}.") from None
        dist = constructor(latent_dim)
    elif isinstance(prior, keras.layers.Layer) and hasattr(prior, "distribution"):
        dist = prior.distribution(latent_dim)
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
            "prior must be a name, a tfd.Distribution, a callable latent_dim -> Distribution or "
            f"a keras Layer with a distribution(latent_dim) method; got {prior!r}."
        )
    if not isinstance(prior, keras.layers.Layer) and dist.trainable_variables:
        raise ValueError(
            f"The prior holds trainable variables ({len(dist.trainable_variables)}) that no "
            "Keras layer owns, so fit() would never update them. For a learned prior, create "
            "the weights in a keras.layers.Layer with a distribution(latent_dim) method (see "
            "keras_aevb.prior.LearnedNormalPrior); for a fixed one, pass constants."
        )
    if dist.event_shape.rank == 0:
        dist = tfd.Independent(dist, reinterpreted_batch_ndims=1)
    if dist.event_shape.as_list() != [latent_dim]:
        raise ValueError(
            f"The prior's event shape is {dist.event_shape.as_list()}, but the encoder has "
            f"latent_dim={latent_dim}: the prior must have event shape [{latent_dim}]."
        )
    return dist


# Interior points of each support, out to the far ends, at which the prior must have support.
_SUPPORT_PROBES = {
    "real": (-1e30, -1e3, -1.0, -1e-3, 0.0, 1e-3, 1.0, 1e3, 1e30),
    "positive": (1e-30, 1e-3, 0.5, 1.0, 2.0, 1e3, 1e30),
    "unit_interval": (1e-6, 1e-3, 0.25, 0.5, 0.75, 1.0 - 1e-3, 1.0 - 1e-6),
}


def _prior_misses(prior_dist, support):
    """The probe points of `support` outside the prior's support (empty list: none).

    A point is inside where the inverse of the prior's default event-space bijector (the map
    from R^n onto its support) is finite; log_prob cannot tell, since TFP does not check
    supports by default (Gamma(1, 1).log_prob(-1.) is 1.0). Returns None where the prior has no
    such bijector, so that its support cannot be checked.
    """
    try:
        bijector = prior_dist.experimental_default_event_space_bijector()
    except (NotImplementedError, AttributeError):
        return None
    if bijector is None:
        return None
    probes = np.asarray(_SUPPORT_PROBES[support], np.float32)
    event = prior_dist.event_shape.as_list()
    points = np.broadcast_to(probes.reshape([-1] + [1] * len(event)), [len(probes), *event])
    points = tf.constant(points, dtype=prior_dist.dtype)
    unconstrained = bijector.inverse(points)
    finite = tf.reduce_all(
        tf.reshape(tf.math.is_finite(unconstrained), [len(probes), -1]), axis=-1
    ).numpy()
    return [float(p) for p, ok in zip(probes, finite, strict=True) if not ok]


def fitting_priors(family):
    """The named priors `AEVB` accepts for a posterior family: support containing the family's
    (else KL(q || p) = inf) and tails no lighter (`PRIOR_NEEDS`: the expectation under q that
    -log p needs is finite for the family). Aliases are left out."""
    family = get_family(family)
    return [
        name
        for name, prior in PRIORS.items()
        if name not in PRIOR_ALIASES
        and support_contains(prior.support, family.support)
        and PRIOR_NEEDS[name] in (None, *family.finite_expectations)
    ]


def check_support(posterior, prior_dist, prior=None, pair_name=""):
    """Raises ValueError unless KL(q || p) can be finite: q's support inside p's, tails too.

    Where q(z|x) puts mass on a set where p(z) = 0, KL(q || p) = +inf and the bound is -inf
    (paper eq. 3); so this is checked before training, not discovered as a NaN. For a named
    prior the tails are checked too: a posterior whose tails are heavier than the prior's
    (a Cauchy q under a Normal p, where E_q[z^2] = inf) has an infinite KL for every parameter
    value (see `keras_aevb.families.EXPECTATIONS`).

    Args:
        posterior: the posterior family (a `Family` or its name).
        prior_dist: p(z), event shape `[latent_dim]`, as `make_prior` returns it.
        prior: the prior as the user gave it; a name in `PRIORS` is checked by its recorded
            support and tails, anything else by probing the support of `prior_dist` through its
            event-space bijector (not checkable without one: then only the name-free checks).
        pair_name: names the pair in the message.
    """
    family = get_family(posterior)
    support = family.support
    pair_name = pair_name or f"posterior={family.name!r} and prior={prior!r}"
    named = isinstance(prior, str) and prior in PRIORS
    if named:
        inside = support_contains(PRIORS[prior].support, support)
        miss = (
            None
            if inside
            else f"its support is {PRIORS[prior].support} {SUPPORTS[PRIORS[prior].support]}"
        )
    else:
        misses = _prior_misses(prior_dist, support)
        miss = f"it has no mass at z = {', '.join(f'{p:g}' for p in misses)}" if misses else None
    if miss:
        raise ValueError(
            f"The posterior's support ({support}, {SUPPORTS[support]}) is not inside the "
            f"prior's for {pair_name}: {miss}. KL(q || p) would be infinite. Use a prior whose "
            f"support contains the posterior's, e.g. one of {fitting_priors(family)}."
        )
    need = PRIOR_NEEDS.get(prior) if named else None
    if need is not None and need not in family.finite_expectations:
        raise ValueError(
            f"KL(q || p) is infinite for {pair_name} whatever the encoder outputs: -log p(z) "
            f"grows like {_NEED_WORDS[need]}, whose mean under a {family.name} posterior is "
            f"infinite (its tails are heavier than the prior's). Use a prior with tails at "
            f"least as heavy, e.g. one of {fitting_priors(family)}."
        )


def prior_quantile(prior_dist, u):
    """z = F^{-1}(u) per latent dimension: the prior's own quantile function (paper Fig. 4).

    The 2-D manifold of Fig. 4 places its grid at the inverse CDF of the Gaussian prior at
    evenly spaced u; this does the same for any prior of independent scalar components.

    Args:
        prior_dist: p(z) as `make_prior` returns it (`tfd.Independent` or `tfd.Sample` over a
            scalar distribution, event shape `[latent_dim]`).
        u: probabilities in (0, 1), shape `[..., latent_dim]`.

    Returns:
        z with the shape of `u`.

    Raises:
        ValueError: if the prior is not a product of scalar distributions, or its components
            have no quantile function in TFP.
    """
    component = getattr(prior_dist, "distribution", None)
    if not isinstance(prior_dist, tfd.Independent | tfd.Sample) or component is None:
        raise ValueError(
            f"The prior {type(prior_dist).__name__} is not a product of independent scalar "
            "distributions, so it has no per-dimension quantile function; draw z with "
            "prior.sample() instead."
        )
    if component.event_shape.rank != 0:
        raise ValueError(
            f"The prior's components ({type(component).__name__}) are not scalar: no "
            "per-dimension quantile function."
        )
    u = tf.convert_to_tensor(u, dtype=prior_dist.dtype)
    try:
        return component.quantile(u)
    except NotImplementedError:
        raise ValueError(
            f"TFP's {type(component).__name__} has no quantile function; draw z with "
            "prior.sample() instead."
        ) from None


def has_quantile(prior_dist):
    """Whether `prior_quantile` works for this prior."""
    try:
        prior_quantile(prior_dist, tf.fill(prior_dist.event_shape, 0.5))
    except ValueError:
        return False
    return True


def sample_prior(prior_dist, num_samples, seed):
    """z ~ p(z), `[num_samples, latent_dim]`, through the quantile function where there is one.

    z = F^{-1}(u), u ~ U(0, 1) (the inverse-CDF method, paper section 2.4 case 1): the same
    transform the 2-D manifold uses, so samples and the manifold grid come from one map.
    Priors without a quantile are sampled with `prior.sample`.

    Args:
        prior_dist: p(z), event shape `[latent_dim]`.
        num_samples: number of draws: an int, or a scalar int32 tensor (a graph input, as in
            the exported `sample` signature).
        seed: stateless int32 pair.
    """
    if not tf.is_tensor(num_samples):
        num_samples = positive_int(num_samples, "num_samples")
    if has_quantile(prior_dist):
        shape = [num_samples, *prior_dist.event_shape.as_list()]
        return prior_quantile(prior_dist, uniform_noise(shape, prior_dist.dtype, seed))
    return prior_dist.sample(num_samples, seed=seed)


@keras.saving.register_keras_serializable(package="keras_aevb")
class LearnedNormalPrior(keras.layers.Layer):
    """A learned prior p(z) = N(z; mu, diag(sigma^2)), mu and sigma trained with the model.

    An example of the learned-prior protocol: a Keras layer that owns its weights and returns
    the prior from `distribution(latent_dim)`. The distribution reads the weights by reference
    (`weight.value`, with sigma = softplus(raw) through a `tfp.util.DeferredTensor`), so the one
    distribution `AEVB` builds at construction sees every update. Maximizing the bound over
    mu and sigma moves the prior to the aggregate posterior (an empirical-Bayes prior).

    A model with a learned prior saves its weights (`model.save_weights`), not a `.keras`
    config: rebuild it in code and load the weights.

    Args:
        latent_dim: J, the number of latent dimensions.

    Example:
    >>> prior = LearnedNormalPrior(2)
    >>> encoder, decoder = MLPEncoder(2, (16,)), BernoulliDecoder((4,), (16,))
    >>> model = AEVB(encoder, decoder, prior=prior)  # doctest: +SKIP
    """

    def __init__(self, latent_dim, **kwargs):
        super().__init__(**kwargs)
        self.latent_dim = int(latent_dim)
        self.loc = self.add_weight(shape=(self.latent_dim,), initializer="zeros", name="loc")
        # softplus(0.5413) = 1: starts at the standard normal.
        self.raw_scale = self.add_weight(
            shape=(self.latent_dim,),
            initializer=keras.initializers.Constant(float(np.log(np.expm1(1.0)))),
            name="raw_scale",
        )
        self.built = True

    def distribution(self, latent_dim):
        if int(latent_dim) != self.latent_dim:
            raise ValueError(
                f"LearnedNormalPrior has latent_dim={self.latent_dim}, the encoder {latent_dim}."
            )
        scale = tfp.util.DeferredTensor(self.raw_scale.value, tf.math.softplus)
        return tfd.Normal(loc=self.loc.value, scale=scale)

    def call(self, inputs=None):
        raise NotImplementedError("A prior layer is not called; use distribution(latent_dim).")

    def get_config(self):
        config = super().get_config()
        config.update(latent_dim=self.latent_dim)
        return config


class FamilyTable(list):
    """The rows of `posterior_families()`: a list of dicts that prints as a table."""

    COLUMNS = (
        ("name", "name"),
        ("support", "support"),
        ("parameters", "parameters"),
        ("reparameterization", "reparameterization"),
        ("analytic_kl_priors", "analytic KL with priors"),
    )

    def _cells(self, row):
        return [
            ", ".join(row[key]) if isinstance(row[key], list | tuple) else str(row[key])
            for key, _ in self.COLUMNS
        ]

    def __str__(self):
        header = [title for _, title in self.COLUMNS]
        rows = [header] + [self._cells(row) for row in self]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def markdown(self):
        """The table in Markdown (docs/families.md's table is this output)."""
        header = [title for _, title in self.COLUMNS]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self:
            lines.append("| " + " | ".join(c or "-" for c in self._cells(row)) + " |")
        return "\n".join(lines)


def posterior_families():
    """The posterior families with their support, parameters and analytic-KL partners.

    The analytic-KL column is computed, not written by hand: for each named prior in
    `PRIORS`, the pair is listed where `tfd.kl_divergence` is registered (there
    `estimator="auto"` uses the paper's estimator B, eq. 7; elsewhere estimator A, eq. 6).

    Returns:
        A `FamilyTable` (a list of dicts with keys name, support, parameters,
        reparameterization, analytic_kl_priors, priors (the named priors `AEVB` accepts for
        the family), description) that prints as a table.

    Example:
    >>> print(posterior_families())  # doctest: +SKIP
    """
    rows = FamilyTable()
    for family in FAMILIES.values():
        posterior = family.distribution(reference_params(family))
        accepted = fitting_priors(family)
        rows.append(
            {
                "name": family.name,
                "support": family.support,
                "parameters": list(family.param_names),
                "reparameterization": family.reparameterization,
                "analytic_kl_priors": [
                    name for name in accepted if has_analytic_kl(posterior, make_prior(name, 1))
                ],
                "priors": accepted,
                "description": family.description,
            }
        )
    return rows
