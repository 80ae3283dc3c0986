"""`AEVB`: the variational auto-encoder trained with the SGVB lower bound (paper Algorithm 1).

The model, its bound and its user methods. How `fit` and `evaluate` run the steps (steps per
execution, XLA blocks, exact step counts, the data check of every batch, the tf.distribute
workarounds) is `keras_aevb.execution.Executions`, which `AEVB` mixes in.
"""

import keras
import tensorflow as tf
from keras import ops

from keras_aevb import inputs, latent
from keras_aevb.estimator import (
    ESTIMATOR_NAMES,
    analytic_kl_per_dimension,
    free_bits_kl,
    has_analytic_kl,
    iwae_terms,
    resolve_estimator,
    sgvb_terms,
)
from keras_aevb.execution import DEFAULT_STEPS_PER_EXECUTION, Executions, reducible_logs
from keras_aevb.families import get_family, reference_params
from keras_aevb.posterior import ReparameterizedPosterior, SavesGeneratorStates, stateless_seed
from keras_aevb.prior import check_support, make_prior, sample_prior
from keras_aevb.schedules import KLWeight

__all__ = [
    "unpack_data",
    "weighted_mean",
    "AEVB",
    "DEFAULT_STEPS_PER_EXECUTION",
    "METRIC_NAMES",
]

METRIC_NAMES = ("loss", "elbo", "reconstruction_log_likelihood", "kl")


@keras.saving.register_keras_serializable(package="keras_aevb")
class AEVB(Executions, SavesGeneratorStates, keras.Model):
    """Auto-Encoding Variational Bayes: encoder, reparameterized posterior, decoder, SGVB bound.

    Each training step is Algorithm 1 of the paper: draw a minibatch of M datapoints, draw
    eps ~ p(eps) and z = g(eps, x), and ascend the gradient of the SGVB estimate of the bound

        L(theta, phi; x) = E_q[log p(x|z)] - KL(q(z|x) || p(z))

    with `estimator="analytic_kl"` (estimator B, eq. 7: KL in closed form, App. B) or
    `"monte_carlo"` (estimator A, eq. 6), averaged over the minibatch. `"auto"` picks B where
    `tfd.kl_divergence` knows the pair and A otherwise.

    The metrics of `fit` and `evaluate` are nats per datapoint (summed over pixels and latent
    dimensions, averaged over the batch): `loss` = -ELBO, `elbo`,
    `reconstruction_log_likelihood` = 1/L sum_l log p(x|z_l), and `kl`; elbo = reconstruction - kl.

    `weight_decay` is the paper's MAP prior p(theta) = N(0, I) on all weights, per datapoint: the
    paper maximises sum_i L(x_i) + log p(theta), i.e. per datapoint
    mean_i L(x_i) + log p(theta) / N,
    so the paper's setting is `weight_decay = 1 / N` (N training examples); the gradient step then
    minimises -mean ELBO + weight_decay / 2 * ||theta||^2. The reported `loss` stays -ELBO (the
    penalty is not a property of the data), so numbers compare across settings.

    Args:
        encoder: a layer x -> dict of posterior parameters (e.g. `MLPEncoder`).
        decoder: a layer z -> parameters of p(x|z) with `distribution`, `mean`,
            `log_likelihood` and `output_shape` (`BernoulliDecoder`, `GaussianDecoder`).
        posterior: posterior family name; must match the encoder's.
        prior: p(z): a name in `keras_aevb.prior.PRIORS`, a `tfd.Distribution` or a callable.
        estimator: "analytic_kl", "monte_carlo", "auto", or "iwae": train on the
            importance-weighted bound L_k of Burda et al. (2016) with k = `num_samples` (k = 1 is
            estimator A); its value is the `iwae_bound` metric, and `elbo` stays the ELBO
            (analytic KL where TFP has it).
        num_samples: L, samples of z per datapoint in training and evaluation.
        weight_decay: 1/N times the precision of the Gaussian weight prior (see above).
        seed: seed of the posterior's and the prior sampler's random generators.
        kl_weight: beta, the weight of the KL term in the training objective
            E_q[log p(x|z)] - beta KL: a number (1, the paper's bound, by default; held in the
            variable `model.kl_weight`, which a callback may assign without retracing) or a
            `keras_aevb.schedules.KLSchedule` of the step (KL warm-up, cyclical annealing),
            evaluated at every step.
        gradient: "reparameterization" (the pathwise gradient of the objective), or with
            `estimator="iwae"` "dreg": the doubly-reparameterized encoder gradient of Tucker et
            al. (2018), unbiased for the same L_k with less variance.
        free_bits: lambda >= 0, nats per latent dimension (Kingma et al., 2016, "free bits"):
            the objective's KL is sum_j max(lambda, mean_batch KL_j), so a dimension whose KL
            is below lambda gets no gradient pushing it to the prior. Needs the analytic KL
            (estimator B).

    `kl_weight` and `free_bits` change the objective only: the `elbo`,
    `reconstruction_log_likelihood` and `kl` metrics stay the true bound and its terms, and
    `loss` is the negative objective (with the defaults, -elbo).

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
        if float(weight_decay) < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
        self.encoder = encoder
        self.decoder = decoder
        self.posterior = posterior
        self.prior = prior
        self.num_samples = int(num_samples)
        self.weight_decay = float(weight_decay)
        self.seed = seed
        self.latent_dim = int(encoder.latent_dim)
        self.posterior_layer = ReparameterizedPosterior(
            family=posterior, num_samples=num_samples, seed=seed, name="posterior"
        )
        # The prior sampler has its own generator so that sample() does not shift the stream of
        # training noise (a run with and without sampling callbacks trains identically).
        self.prior_seed_generator = keras.random.SeedGenerator(
            None if seed is None else seed + 1, name="prior_seed_generator"
        )
        self.prior_distribution = make_prior(prior, self.latent_dim)
        # Where q(z|x) has mass and p(z) has none, the KL is infinite: refuse before training.
        check_support(
            posterior,
            self.prior_distribution,
            prior=prior,
            pair_name=f"posterior={posterior!r} and prior={_prior_name(prior)!r}",
        )
        reference_posterior = self.posterior_layer.distribution(
            reference_params(get_family(posterior), self.latent_dim)
        )
        self.estimator = resolve_estimator(
            estimator,
            reference_posterior,
            self.prior_distribution,
            pair_name=f"posterior={posterior!r} and prior={_prior_name(prior)!r}",
        )
        # The ELBO reported beside an IWAE objective: estimator B where TFP has the KL.
        self._elbo_estimator = self.estimator
        if self.estimator == "iwae":
            analytic = has_analytic_kl(reference_posterior, self.prior_distribution)
            self._elbo_estimator = "analytic_kl" if analytic else "monte_carlo"
        if gradient not in ("reparameterization", "dreg"):
            raise ValueError(f"gradient must be 'reparameterization' or 'dreg', got {gradient!r}.")
        if gradient == "dreg" and self.estimator != "iwae":
            raise ValueError(
                "gradient='dreg' is the doubly-reparameterized gradient of the importance-"
                "weighted bound: pass estimator='iwae' (with num_samples=k > 1) as well."
            )
        self.gradient = gradient
        names = METRIC_NAMES + (("iwae_bound",) if self.estimator == "iwae" else ())
        self.trackers = {name: keras.metrics.Mean(name=name) for name in names}
        self._set_objective(kl_weight, free_bits)

    def _set_objective(self, kl_weight, free_bits):
        self._beta = KLWeight(kl_weight)
        self.free_bits = float(free_bits)
        if not 0.0 <= self.free_bits < float("inf"):
            raise ValueError(f"free_bits must be a finite number >= 0, got {free_bits!r}.")
        if self.estimator == "iwae" and (
            self.kl_schedule is not None or self._beta.initial != 1.0 or self.free_bits
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
    def kl_weight(self):
        """beta, the KL term's weight in the objective (a `keras.Variable`; assign to change
        it between steps; with a schedule, the value of the last step)."""
        return self._beta.variable

    @property
    def kl_schedule(self):
        """The `KLSchedule` of beta, or None (a constant beta)."""
        return self._beta.schedule

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
        outputs = self.decoder(z, training=training)
        log_px_given_z = self.decoder.log_likelihood(x, outputs)
        terms = sgvb_terms(
            log_px_given_z, posterior, self.prior_distribution, z, self._elbo_estimator
        )
        if self.estimator == "iwae":
            stopped = None
            if self.gradient == "dreg" and training:
                frozen = {name: ops.stop_gradient(value) for name, value in params.items()}
                stopped = self.posterior_layer.distribution(frozen)
            terms.update(iwae_terms(log_px_given_z, posterior, self.prior_distribution, z, stopped))
        if self.free_bits:
            terms["kl_per_dimension"] = analytic_kl_per_dimension(
                posterior, self.prior_distribution
            )
        return terms

    def _objective_terms(self, terms, sample_weight, step=None):
        """Per-example objective E_q[log p(x|z)] - beta KL (free bits: the floored KL).

        `step`: the optimizer's step count, where a schedule gives beta (training); otherwise
        beta is the `kl_weight` variable's value. With beta = 1 and no free bits every value
        equals the `elbo` exactly (1.0 * kl is kl in floating point).
        """
        if self.estimator == "iwae":
            return terms["iwae_bound"]
        beta = self._beta.at(step, self.compute_dtype)
        kl = terms["kl"]
        if self.free_bits:
            kl = free_bits_kl(kl, terms["kl_per_dimension"], self.free_bits, sample_weight)
        return terms["reconstruction_log_likelihood"] - beta * kl

    def _weight_penalty(self, variables=None):
        """weight_decay / 2 * ||theta||^2 over `variables` (all trainable weights by default):
        the paper's N(0, I) weight prior, log p(theta) per datapoint, negated."""
        variables = self.trainable_variables if variables is None else variables
        if not self.weight_decay or not variables:
            return 0.0
        squares = [ops.sum(ops.square(v)) for v in variables]
        return 0.5 * self.weight_decay * ops.sum(ops.stack(squares))

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
            terms["objective"] = self._objective_terms(
                terms, sample_weight, self.optimizer.iterations
            )
            loss = scaled_mean(terms["objective"])
            if self.gradient == "dreg":
                surrogate = scaled_mean(terms.pop("dreg_surrogate"))
        gradients = tape.gradient(loss, self.trainable_variables)
        if self.gradient == "dreg":
            gradients = self._dreg_gradients(tape, surrogate, gradients)
        gradients = self._add_weight_prior_gradient(gradients, replicas)
        self.optimizer.apply(gradients, self.trainable_variables)
        return self.update_metrics(terms, sample_weight)

    def test_step(self, data):
        x, sample_weight = unpack_data(data)
        terms = self.bound_terms(self.check_step_data(x), training=False)
        terms["objective"] = self._objective_terms(terms, sample_weight)
        return reducible_logs(self.update_metrics(terms, sample_weight))

    def predict_step(self, data):
        x, _ = unpack_data(data)
        return self(x, training=False)

    def _dreg_gradients(self, tape, surrogate, gradients):
        """The encoder's gradient is DReG's; the decoder's (and a learned prior's) the
        bound's own, which has no score-function term to remove."""
        encoder_variables = self.encoder.trainable_variables
        dreg = dict(zip(map(id, encoder_variables), tape.gradient(surrogate, encoder_variables),
                        strict=True))  # fmt: skip
        return [
            dreg.get(id(v), g) for g, v in zip(gradients, self.trainable_variables, strict=True)
        ]

    def _add_weight_prior_gradient(self, gradients, replicas):
        """Adds weight_decay * theta, the gradient of weight_decay / 2 * ||theta||^2.

        In closed form (2 passes over the weights) rather than through the tape (the penalty's
        forward and backward, 4-5 passes): bit-identical results, faster steps
        (benchmarks/BENCHMARKS.md). scale_loss multiplies (1 or the loss scale), so the term
        is scaled like the rest of the gradient.
        """
        if not self.weight_decay:
            return gradients
        with tf.name_scope("weight_prior_gradient"):  # named for profiles
            factor = self.optimizer.scale_loss(self.weight_decay / replicas)
            return [
                ops.multiply(ops.cast(factor, v.dtype), v) + (0.0 if g is None else g)
                for g, v in zip(gradients, self.trainable_variables, strict=True)
            ]

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

    # ---------------------------------------------------------------- XLA blocks

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # A subclass that writes its own train_step and not how a block runs it trains step by
        # step: blocks would run the inherited block step instead of its own.
        if "train_step" in cls.__dict__ and "block_step" not in cls.__dict__:
            cls.block_step = Executions.block_step

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

    @property
    def metrics(self):
        return list(self.trackers.values())

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
        seed = _stateless(seed) if seed is not None else stateless_seed(self.prior_seed_generator)
        return sample_prior(self.prior_distribution, num_samples, seed)

    def sample(self, num_samples, seed=None):
        """Decoder means at z ~ p(z): new data from the generative model (paper Fig. 5)."""
        return self.decode(self.sample_z(num_samples, seed=seed))

    # ---------------------------------------------------------------- latent tools

    def embed(self, x):
        """The posterior mean E_q[z|x], `[batch, latent_dim]`: a deterministic embedding of x
        (the mode for families without a mean), for nearest-neighbour search or plots."""
        return self.posterior_layer.mean(self.encode(x))

    def interpolate(self, x_a, x_b, steps=8, method="spherical"):
        """Decoded points on the latent path from x_a's embedding to x_b's
        (`keras_aevb.latent.interpolate`: spherical or linear)."""
        return latent.interpolate(self, x_a, x_b, steps=steps, method=method)

    def traverse(self, x, dim, values):
        """Decoded embeddings of x with latent dimension `dim` set to each of `values`
        (`keras_aevb.latent.traverse`)."""
        return latent.traverse(self, x, dim, values)

    def elbo(self, x, num_samples=1, seed=None):
        """Per-example SGVB estimate of the bound with L = `num_samples`, shape `[batch]`."""
        return self.bound_terms(x, training=False, num_samples=num_samples, seed=_stateless(seed))[
            "elbo"
        ]

    def summary(self, *args, **kwargs):
        print_fn = kwargs.get("print_fn") or print
        super().summary(*args, **kwargs)
        print_fn(self.describe())

    def describe(self):
        """One line naming the posterior, the prior and the estimator in use."""
        return (
            f"AEVB: posterior={self.posterior!r}, prior={_prior_name(self.prior)!r}, "
            f"estimator={self.estimator!r} ({ESTIMATOR_NAMES[self.estimator]}), "
            f"L={self.num_samples}, latent_dim={self.latent_dim}, "
            f"weight_decay={self.weight_decay:g}"
        )

    # ---------------------------------------------------------------- serialization

    def get_config(self):
        if not isinstance(self.prior, str):
            raise ValueError(
                "This model's prior is a distribution or callable, which a config cannot hold: "
                "save the weights (model.save_weights) and rebuild the model in code, or use a "
                "named prior."
            )
        config = super().get_config()
        config.update(
            encoder=keras.saving.serialize_keras_object(self.encoder),
            decoder=keras.saving.serialize_keras_object(self.decoder),
            posterior=self.posterior,
            prior=self.prior,
            estimator=self.estimator,
            num_samples=self.num_samples,
            weight_decay=self.weight_decay,
            seed=self.seed,
            kl_weight=self._beta.get_config(),
            free_bits=self.free_bits,
            gradient=self.gradient,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        config["decoder"] = keras.saving.deserialize_keras_object(config["decoder"])
        return cls(**config)


def _prior_name(prior):
    return prior if isinstance(prior, str) else type(prior).__name__


def unpack_data(data):
    x, _, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    return x, sample_weight


def weighted_mean(values, sample_weight):
    if sample_weight is None:
        return ops.mean(values)
    sample_weight = ops.cast(ops.reshape(sample_weight, ops.shape(values)), values.dtype)
    return ops.sum(values * sample_weight) / ops.maximum(ops.sum(sample_weight), 1e-12)


def _stateless(seed):
    return inputs.check_seed(seed)
