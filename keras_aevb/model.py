"""`AEVB`: the variational auto-encoder trained with the SGVB lower bound (paper Algorithm 1).

The model, its bound and its user methods. Mixed in: how `fit` and `evaluate` run the steps
(steps per execution, XLA blocks, exact step counts, the data check of every batch, the
tf.distribute workarounds: `keras_aevb.execution.Executions`), the objective's settings and
metrics as attributes (`keras_aevb.objective.ObjectiveAttributes`) and the latent tools
(`keras_aevb.latent.LatentMethods`).
"""

import keras
import tensorflow as tf
from keras import ops

from keras_aevb import inputs
from keras_aevb.estimator import ESTIMATOR_NAMES
from keras_aevb.execution import DEFAULT_STEPS_PER_EXECUTION, Executions, reducible_logs
from keras_aevb.families import get_family, reference_params
from keras_aevb.inputs import unpack_data, weighted_mean
from keras_aevb.latent import LatentMethods
from keras_aevb.objective import (
    METRIC_NAMES,
    Objective,
    ObjectiveAttributes,
    dreg_gradients,
    with_weight_prior_gradient,
)
from keras_aevb.posterior import ReparameterizedPosterior, SavesGeneratorStates, stateless_seed
from keras_aevb.prior import check_support, make_prior, prior_config, prior_name, sample_prior

__all__ = [
    "unpack_data",
    "weighted_mean",
    "AEVB",
    "DEFAULT_STEPS_PER_EXECUTION",
    "METRIC_NAMES",
]


@keras.saving.register_keras_serializable(package="keras_aevb")
class AEVB(ObjectiveAttributes, LatentMethods, Executions, SavesGeneratorStates, keras.Model):
    """Auto-Encoding Variational Bayes: encoder, reparameterized posterior, decoder, SGVB bound.

    Each training step is Algorithm 1 of the paper: draw a minibatch of M datapoints, draw
    eps ~ p(eps) and z = g(eps, x), and ascend the gradient of the SGVB estimate of the bound

        L(theta, phi; x) = E_q[log p(x|z)] - KL(q(z|x) || p(z))

    averaged over the minibatch, with the paper's N(0, I) weight prior as `weight_decay`
    (its setting is 1/N); `keras_aevb.objective` states the objective and its variants.

    The metrics of `fit` and `evaluate` are nats per datapoint (summed over pixels and latent
    dimensions, averaged over the batch): `elbo`, `reconstruction_log_likelihood` =
    1/L sum_l log p(x|z_l), `kl` (elbo = reconstruction - kl: the bound whatever the
    objective), and `loss`, the negative objective (-elbo with the defaults; without the
    weight penalty, which is not a property of the data).

    Args:
        encoder: a layer x -> dict of posterior parameters (e.g. `MLPEncoder`).
        decoder: a layer z -> parameters of p(x|z) with `distribution`, `mean`,
            `log_likelihood` and `output_shape` (`BernoulliDecoder`, `GaussianDecoder`).
        posterior: posterior family name; must match the encoder's.
        prior: p(z): a name in `keras_aevb.prior.PRIORS`, a `tfd.Distribution` or a callable.
        estimator: "analytic_kl" (B, eq. 7), "monte_carlo" (A, eq. 6), "auto" (B where
            `tfd.kl_divergence` knows the pair, else A), or "iwae": the importance-weighted
            bound L_k of Burda et al. (2016), k = `num_samples`, reported as `iwae_bound`.
        num_samples: L, samples of z per datapoint in training and evaluation.
        weight_decay: the weight prior's precision over N: minimises
            -mean ELBO + weight_decay / 2 * ||theta||^2.
        seed: seed of the posterior's and the prior sampler's random generators.
        kl_weight, free_bits, gradient: reshape the objective (`keras_aevb.objective`): beta
            in E_q[log p(x|z)] - beta KL (a number, held in the variable `model.kl_weight`, or
            a `KLSchedule`); free bits' lambda; "reparameterization", or "dreg" with L_k.

    Example:
    >>> model = AEVB(MLPEncoder(2, (16,)), BernoulliDecoder((28, 28), (16,)), seed=0)
    >>> model.compile(optimizer=keras.optimizers.Adagrad(0.02))
    >>> history = model.fit(np.zeros((8, 28, 28), "float32"), epochs=1, verbose=0)
    >>> sorted(history.history)
    ['elbo', 'kl', 'loss', 'reconstruction_log_likelihood']

    Reference: Kingma & Welling, Auto-Encoding Variational Bayes, arXiv:1312.6114.
    """

    def __init__(
        self,
        encoder,
        decoder,
        posterior="normal",
        prior="standard_normal",
        estimator="auto",
        num_samples=1,
        weight_decay=0.0,
        seed=None,
        kl_weight=1.0,
        free_bits=0.0,
        gradient="reparameterization",
        **kwargs,
    ):
        super().__init__(**kwargs)
        encoder_family = getattr(encoder, "posterior", posterior)
        if encoder_family != posterior:
            raise ValueError(
                f"The encoder emits parameters of the {encoder_family!r} family but "
                f"posterior={posterior!r}: build the encoder with posterior={posterior!r}."
            )
        self.encoder = encoder
        self.decoder = decoder
        self.posterior = posterior
        self.prior = prior
        self.seed = seed
        self.latent_dim = int(encoder.latent_dim)
        self.posterior_layer = ReparameterizedPosterior(
            family=posterior, num_samples=num_samples, seed=seed, name="posterior"
        )
        self.num_samples = self.posterior_layer.num_samples  # checked there
        # The prior sampler has its own generator so that sample() does not shift the stream of
        # training noise (a run with and without sampling callbacks trains identically).
        self.prior_seed_generator = keras.random.SeedGenerator(
            None if seed is None else seed + 1, name="prior_seed_generator"
        )
        self.prior_distribution = make_prior(prior, self.latent_dim)
        # Where q(z|x) has mass and p(z) has none, the KL is infinite: refuse before training.
        pair_name = f"posterior={posterior!r} and prior={prior_name(prior)!r}"
        check_support(posterior, self.prior_distribution, prior=prior, pair_name=pair_name)
        reference_posterior = self.posterior_layer.distribution(
            reference_params(get_family(posterior), self.latent_dim)
        )
        self.objective = Objective(
            estimator, reference_posterior, self.prior_distribution, pair_name,
            kl_weight=kl_weight, free_bits=free_bits, gradient=gradient,
            weight_decay=weight_decay,
        )  # fmt: skip
        names = self.objective.metric_names
        self.trackers = {name: keras.metrics.Mean(name=name) for name in names}

    # ---------------------------------------------------------------- building and calling

    @property
    def event_shape(self):
        """The shape of one datapoint, as the decoder produces it."""
        return tuple(self.decoder.output_shape)

    def build(self, input_shape=None):
        """Creates the weights; the encoder flattens, so any shape with the event's size works."""
        if not self.encoder.built:
            self.encoder.build((None, *self.event_shape))
        if not self.decoder.built:
            self.decoder.build((None, self.latent_dim))
        self.built = True

    def get_build_config(self):
        # The weights' shapes depend on the event shape only, which the config already holds.
        return {"input_shape": (None, *self.event_shape)}

    def build_from_config(self, config):
        self.build(config["input_shape"])

    def call(self, x, training=False):
        """Reconstruction `[batch, *event_shape]`: the decoder mean at the posterior mean.

        With `training=True`, at one sample z ~ q(z|x) instead. One z per example for every L
        (`num_samples`): L is the number of samples of the bound, not of the reconstruction.
        """
        x = self.as_event(x)
        params = self.encoder(x, training=training)
        if training:
            z = self.posterior_layer.sample(params, num_samples=1)[0]
        else:
            z = self.posterior_layer.mean(params)
        return self.decoder.mean(self.decoder(z, training=training))

    def as_event(self, x):
        """x as `[batch, *event_shape]` in the compute dtype, checked (`inputs.as_event`)."""
        return inputs.as_event(x, self.event_shape, self.decoder, self.compute_dtype)

    # ---------------------------------------------------------------- the bound

    def bound_terms(self, x, training=False, num_samples=None, seed=None, eps=None):
        """The per-example terms of the bound for x, a dict of `[batch]` tensors.

        `elbo` (eq. 7 with estimator B, eq. 6 with A), `reconstruction_log_likelihood`
        (1/L sum_l log p(x|z_l)) and `kl`; with estimator="iwae" also `iwae_bound` (L_k).
        `seed`: an int32 pair for a stateless draw; `eps`: the noise itself.
        """
        x = self.as_event(x)
        params = self.encoder(x, training=training)
        posterior = self.posterior_layer.distribution(params)
        z = self.posterior_layer.sample(params, num_samples, seed=seed, eps=eps)
        log_px_given_z = self.decoder.log_likelihood(x, self.decoder(z, training=training))
        dreg = self.gradient == "dreg" and training
        stopped = self.posterior_layer.distribution(params, stop_gradient=True) if dreg else None
        return self.objective.terms(log_px_given_z, posterior, self.prior_distribution, z, stopped)

    def train_step(self, data):
        x, sample_weight = unpack_data(data)
        return reducible_logs(self._train_step(x, sample_weight))

    def _train_step(self, x, sample_weight, eps=None):
        """One step of Algorithm 1 on minibatch x; `eps`: the step's noise, drawn by the caller."""
        x = self.check_step_data(x)
        # Under tf.distribute the replicas' gradients are summed: scale each replica's mean.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync

        def scaled_mean(values):
            return self.optimizer.scale_loss(-weighted_mean(values, sample_weight) / replicas)

        with tf.GradientTape(persistent=self.gradient == "dreg") as tape:
            terms = self.bound_terms(x, training=True, eps=eps)
            terms["objective"] = self.objective.per_example(
                terms, sample_weight, self.compute_dtype, self.optimizer.iterations
            )
            loss = scaled_mean(terms["objective"])
            if self.gradient == "dreg":
                surrogate = scaled_mean(terms.pop("dreg_surrogate"))
        variables = self.trainable_variables
        gradients = tape.gradient(loss, variables)
        if self.gradient == "dreg":
            encoder_variables = self.encoder.trainable_variables
            gradients = dreg_gradients(tape, surrogate, gradients, variables, encoder_variables)
        if self.weight_decay:  # scale_loss multiplies: 1, or the loss scale
            factor = self.optimizer.scale_loss(self.weight_decay / replicas)
            gradients = with_weight_prior_gradient(gradients, variables, factor)
        self.optimizer.apply(gradients, variables)
        return self.update_metrics(terms, sample_weight)

    def test_step(self, data):
        x, sample_weight = unpack_data(data)
        terms = self.bound_terms(self.check_step_data(x), training=False)
        terms["objective"] = self.objective.per_example(terms, sample_weight, self.compute_dtype)
        return reducible_logs(self.update_metrics(terms, sample_weight))

    # ---------------------------------------------------------------- XLA blocks

    def block_step(self):
        """The training step as XLA blocks run it (`keras_aevb.execution`), or None.

        AEVB's is `train_step` with eps given, where the posterior family has an explicit
        g(eps, phi) (TFP's implicit reparameterization draws inside the step). A subclass that
        overrides `train_step` gets None (step by step, its own step on every batch) unless it
        overrides `block_step` too.
        """
        if not self.posterior_layer.has_explicit_g:
            return None
        return lambda x, eps: self._train_step(x, None, eps)

    def step_noise(self, batch_size):
        """eps ~ p(eps) of one training step, `[L, batch_size, latent_dim]`, from the
        posterior layer's generator, as `train_step` draws it."""
        shape = (self.num_samples, batch_size, self.latent_dim)
        return self.posterior_layer.noise(shape, self.compute_dtype)

    # ---------------------------------------------------------------- user methods

    def encode(self, x):
        """The posterior's parameters for x, a dict of `[batch, latent_dim]` tensors."""
        return self.encoder(self.as_event(x), training=False)

    def decode(self, z):
        """Decoder means for latent points z `[batch, latent_dim]` (probabilities if Bernoulli)."""
        return self.decoder.mean(self.decoder(ops.convert_to_tensor(z), training=False))

    def reconstruct(self, x):
        """Decoder mean through the posterior mean: a deterministic reconstruction of x."""
        return self(x, training=False)

    def sample_z(self, num_samples, seed=None):
        """Draws z ~ p(z), `[num_samples, latent_dim]`; `seed` (int or int32 pair) is stateless.

        z = F^{-1}(u), u ~ U(0, 1), through the prior's own quantile function where it has one
        (the map the 2-D manifold of Fig. 4 uses), else `prior.sample`.
        """
        if seed is None:
            seed = stateless_seed(self.prior_seed_generator)
        return sample_prior(self.prior_distribution, num_samples, inputs.check_seed(seed))

    def sample(self, num_samples, seed=None):
        """Decoder means at z ~ p(z): new data from the generative model (paper Fig. 5)."""
        return self.decode(self.sample_z(num_samples, seed=seed))

    def elbo(self, x, num_samples=1, seed=None):
        """Per-example SGVB estimate of the bound with L = `num_samples`, shape `[batch]`."""
        seed = inputs.check_seed(seed)
        return self.bound_terms(x, training=False, num_samples=num_samples, seed=seed)["elbo"]

    def summary(self, *args, **kwargs):
        print_fn = kwargs.get("print_fn") or print
        super().summary(*args, **kwargs)
        print_fn(self.describe())

    def describe(self):
        """One line naming the posterior, the prior and the estimator in use."""
        return (
            f"AEVB: posterior={self.posterior!r}, prior={prior_name(self.prior)!r}, "
            f"estimator={self.estimator!r} ({ESTIMATOR_NAMES[self.estimator]}), "
            f"L={self.num_samples}, latent_dim={self.latent_dim}, "
            f"weight_decay={self.weight_decay:g}"
        )

    # ---------------------------------------------------------------- serialization

    def get_config(self):
        config = super().get_config()
        config.update(
            encoder=keras.saving.serialize_keras_object(self.encoder),
            decoder=keras.saving.serialize_keras_object(self.decoder),
            posterior=self.posterior,
            prior=prior_config(self.prior),
            num_samples=self.num_samples,
            seed=self.seed,
            **self.objective.get_config(),
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        config["decoder"] = keras.saving.deserialize_keras_object(config["decoder"])
        return cls(**config)
