"""The training objective: which estimate of the bound a step ascends, and its gradient.

`AEVB.train_step` (Algorithm 1) ascends, per datapoint,

    the SGVB estimate of the ELBO     1/L sum_l log p(x|z_l) - beta KL   (A: eq. 6, B: eq. 7)
    or Burda et al.'s bound           L_k = log 1/k sum_l p(x, z_l) / q(z_l|x)

where beta = 1 (the paper's bound) unless a `kl_weight` or `KLSchedule` reshapes it, and free
bits (Kingma et al., 2016) floor each latent dimension's batch-mean KL at lambda, so a
dimension below lambda gets no gradient pushing it to the prior. With an IWAE objective, DReG
(Tucker et al., 2018) may replace the encoder's gradient.

The paper's MAP prior p(theta) = N(0, I) on all weights: the paper maximises
sum_i L(x_i) + log p(theta), per datapoint mean_i L(x_i) + log p(theta) / N, so a step
minimises -mean objective + weight_decay / 2 * ||theta||^2 with weight_decay = 1/N
(N training examples).

Whatever the objective, the `elbo` a model reports is the bound itself, with estimator B
where TFP has the KL in closed form (`Objective.elbo_estimator`), so numbers compare across
objectives; `loss` is the negative objective.
"""

import numpy as np
import tensorflow as tf
from keras import ops

from keras_aevb.config import GRADIENTS
from keras_aevb.estimator import (
    analytic_kl_per_dimension,
    free_bits_kl,
    has_analytic_kl,
    iwae_terms,
    resolve_estimator,
    sgvb_terms,
)
from keras_aevb.schedules import KLWeight

__all__ = [
    "METRIC_NAMES",
    "Objective",
    "ObjectiveAttributes",
    "dreg_gradients",
    "weight_penalty",
    "with_weight_prior_gradient",
]

METRIC_NAMES = ("loss", "elbo", "reconstruction_log_likelihood", "kl")


class Objective:
    """A model's training objective, checked once at construction.

    Args:
        estimator: "analytic_kl" (B), "monte_carlo" (A), "auto" (B where TFP has the KL), or
            "iwae" (L_k with k = the model's `num_samples`).
        posterior: a q(z|x) of the model's family (any valid parameters: TFP's KL registry
            answers by type) and `prior` p(z): the pair the estimator is resolved on.
        pair_name: how messages name the pair.
        kl_weight: beta: a finite number >= 0, a `KLSchedule`, or a schedule's config.
        free_bits: lambda >= 0, nats per latent dimension; needs estimator B.
        gradient: "reparameterization", or "dreg" with estimator="iwae".
        weight_decay: the precision over N of the N(0, I) weight prior (1/N: the paper's MAP
            prior): a step adds weight_decay / 2 * ||theta||^2 to -mean objective.

    Raises:
        ValueError: a setting that cannot work, named with the fix.
    """

    def __init__(
        self, estimator, posterior, prior, pair_name, kl_weight=1.0, free_bits=0.0,
        gradient="reparameterization", weight_decay=0.0,
    ):  # fmt: skip
        self.estimator = resolve_estimator(estimator, posterior, prior, pair_name=pair_name)
        self.elbo_estimator = self.estimator
        if self.estimator == "iwae":
            analytic = has_analytic_kl(posterior, prior)
            self.elbo_estimator = "analytic_kl" if analytic else "monte_carlo"
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be 'reparameterization' or 'dreg', got {gradient!r}.")
        if gradient == "dreg" and self.estimator != "iwae":
            raise ValueError(
                "gradient='dreg' is the doubly-reparameterized gradient of the importance-"
                "weighted bound: pass estimator='iwae' (with num_samples=k > 1) as well."
            )
        self.gradient = gradient
        self.beta = KLWeight(kl_weight)
        self.free_bits = float(free_bits)
        self._check_kl_shaping()
        number = isinstance(weight_decay, int | float | np.integer | np.floating)
        self.weight_decay = float(weight_decay) if number else float("nan")
        if isinstance(weight_decay, bool) or not 0.0 <= self.weight_decay < float("inf"):
            # NaN would make every weight NaN at the first step, silently.
            raise ValueError(
                f"weight_decay must be a finite number >= 0 (1/N for the paper's N(0, I) "
                f"weight prior, 0 for none), got {weight_decay!r}."
            )

    def _check_kl_shaping(self):
        if not 0.0 <= self.free_bits < float("inf"):
            raise ValueError(f"free_bits must be a finite number >= 0, got {self.free_bits!r}.")
        if self.estimator == "iwae" and (
            self.beta.schedule is not None or self.beta.initial != 1.0 or self.free_bits
        ):
            raise ValueError(
                "kl_weight and free_bits reshape the ELBO's KL term; estimator='iwae' trains on "
                "the importance-weighted bound, which has none: drop them or use "
                "estimator='analytic_kl'."
            )
        if self.free_bits and self.estimator != "analytic_kl":
            raise ValueError(
                "free_bits needs the KL per latent dimension in closed form (estimator B), but "
                f"this model uses estimator={self.estimator!r}; pass estimator='analytic_kl' "
                "with a posterior/prior pair that has one (e.g. normal and standard_normal)."
            )

    @property
    def metric_names(self):
        """The metrics of `fit` and `evaluate`: METRIC_NAMES, and `iwae_bound` with L_k."""
        return METRIC_NAMES + (("iwae_bound",) if self.estimator == "iwae" else ())

    def terms(self, log_px_given_z, posterior, prior, z, stopped_posterior=None):
        """The per-example terms, a dict of `[batch]` tensors.

        `elbo`, `reconstruction_log_likelihood`, `kl` (`elbo_estimator`); with L_k also
        `iwae_bound`, and `dreg_surrogate` when `stopped_posterior` (q at stop-gradient
        parameters) is given; with free bits `kl_per_dimension` `[batch, latent_dim]`.
        """
        terms = sgvb_terms(log_px_given_z, posterior, prior, z, self.elbo_estimator)
        if self.estimator == "iwae":
            terms.update(iwae_terms(log_px_given_z, posterior, prior, z, stopped_posterior))
        if self.free_bits:
            terms["kl_per_dimension"] = analytic_kl_per_dimension(posterior, prior)
        return terms

    def per_example(self, terms, sample_weight, dtype, step=None):
        """The objective of each example: L_k, or E_q[log p(x|z)] - beta KL (free bits: the
        floored KL).

        `step`: the optimizer's step count, where a schedule gives beta (training); otherwise
        beta is the `kl_weight` variable's value. With beta = 1 and no free bits every value
        equals the `elbo` exactly (1.0 * kl is kl in floating point).
        """
        if self.estimator == "iwae":
            return terms["iwae_bound"]
        beta = self.beta.at(step, dtype)
        kl = terms["kl"]
        if self.free_bits:
            kl = free_bits_kl(kl, terms["kl_per_dimension"], self.free_bits, sample_weight)
        return terms["reconstruction_log_likelihood"] - beta * kl

    def get_config(self):
        """The constructor arguments a model's config holds (the estimator as resolved)."""
        return {
            "estimator": self.estimator,
            "kl_weight": self.beta.get_config(),
            "free_bits": self.free_bits,
            "gradient": self.gradient,
            "weight_decay": self.weight_decay,
        }


class ObjectiveAttributes:
    """A model's objective settings and bound metrics as its attributes (mixed into `AEVB`).

    The model holds `objective` (an `Objective`) and `trackers` (a `keras.metrics.Mean` per
    name of `objective.metric_names`); the metrics are nats per datapoint.
    """

    estimator = property(lambda self: self.objective.estimator, doc="The estimator in use.")
    elbo_estimator = property(
        lambda self: self.objective.elbo_estimator, doc="The estimator of the reported `elbo`."
    )
    gradient = property(lambda self: self.objective.gradient, doc="The encoder's gradient.")
    free_bits = property(lambda self: self.objective.free_bits, doc="lambda, nats per dimension.")
    weight_decay = property(
        lambda self: self.objective.weight_decay, doc="The weight prior's precision over N."
    )
    kl_schedule = property(
        lambda self: self.objective.beta.schedule, doc="The `KLSchedule` of beta, or None."
    )

    @property
    def kl_weight(self):
        """beta, the KL term's weight in the objective (a `keras.Variable`; assign to change
        it between steps; with a schedule, the value of the last step)."""
        return self.objective.beta.variable

    @property
    def metrics(self):
        return list(self.trackers.values())

    def update_metrics(self, terms, sample_weight):
        """Updates the trackers with a step's terms; returns `metric_logs()`."""
        values = dict(terms, loss=-terms.get("objective", terms["elbo"]))
        for name, tracker in self.trackers.items():
            tracker.update_state(values[name], sample_weight=sample_weight)
        return self.metric_logs()

    def metric_logs(self, training=False):
        """The trackers' current values, by metric name; `training`: the logs of a train
        step, where a subclass may add train-only metrics (the baselines' diagnostics)."""
        return {name: tracker.result() for name, tracker in self.trackers.items()}


def weight_penalty(variables, weight_decay):
    """weight_decay / 2 * ||theta||^2 over `variables`: the paper's N(0, I) weight prior,
    -log p(theta) per datapoint up to a constant (weight_decay = 1/N)."""
    if not weight_decay or not variables:
        return 0.0
    squares = [ops.sum(ops.square(v)) for v in variables]
    return 0.5 * weight_decay * ops.sum(ops.stack(squares))


def with_weight_prior_gradient(gradients, variables, factor):
    """gradients + factor * theta: the gradient of `weight_penalty` with factor = weight_decay
    (times the loss scale and over replicas, as the rest of the gradient is).

    In closed form (2 passes over the weights) rather than through the tape (the penalty's
    forward and backward, 4-5 passes): bit-identical results, faster steps
    (benchmarks/BENCHMARKS.md).
    """
    with tf.name_scope("weight_prior_gradient"):  # named for profiles
        return [
            ops.multiply(ops.cast(factor, v.dtype), v) + (0.0 if g is None else g)
            for g, v in zip(gradients, variables, strict=True)
        ]


def dreg_gradients(tape, surrogate, gradients, variables, encoder_variables):
    """`gradients` of `variables` with the encoder's replaced by DReG's (the gradient of
    `surrogate`, `estimator.iwae_terms`'s `dreg_surrogate`); the decoder's (and a learned
    prior's) stay the bound's own, which has no score-function term to remove."""
    dreg = dict(zip(map(id, encoder_variables), tape.gradient(surrogate, encoder_variables),
                    strict=True))  # fmt: skip
    return [dreg.get(id(v), g) for g, v in zip(gradients, variables, strict=True)]
