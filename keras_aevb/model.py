"""`AEVB`: the variational auto-encoder trained with the SGVB lower bound (paper Algorithm 1)."""

import contextlib
import math
import warnings

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_aevb import execution, inputs
from keras_aevb._cache import model_cache
from keras_aevb.data import DataError
from keras_aevb.estimator import (
    ESTIMATOR_NAMES,
    analytic_kl_per_dimension,
    has_analytic_kl,
    iwae_terms,
    resolve_estimator,
    sgvb_terms,
)
from keras_aevb.families import get_family, reference_params
from keras_aevb.posterior import ReparameterizedPosterior, SavesGeneratorStates, stateless_seed
from keras_aevb.prior import check_support, make_prior, sample_prior
from keras_aevb.schedules import KLSchedule

__all__ = [
    "unpack_data",
    "weighted_mean",
    "AEVB",
    "DEFAULT_STEPS_PER_EXECUTION",
    "METRIC_NAMES",
]

METRIC_NAMES = ("loss", "elbo", "reconstruction_log_likelihood", "kl")

# Training steps per call of the train function when `compile` is not told. Each call has a
# fixed cost of Python and dispatch, of the order of a paper-model step at M = 100 on a CPU;
# 100 steps per call hide it (benchmarks/BENCHMARKS.md, "What the defaults do"). `fit` and
# `evaluate` stop an execution at `steps_per_epoch` / `steps` (keras_aevb.execution), so the
# value never changes how many steps run.
DEFAULT_STEPS_PER_EXECUTION = 100


# Batches of fewer values than this stay with tf.data in `fit`: on 2 CPU cores, building
# batches next to the steps (`AEVB._addressed_batches`) was faster for the paper's MNIST model at
# M = 100 and 1000 (78,400 and 784,000 values per batch) and slower at M = 20 (15,680), where a
# batch's fixed costs weigh more than tf.data's thread beside the step (benchmarks/BENCHMARKS.md).
_MIN_ADDRESSED_VALUES = 50_000


@keras.saving.register_keras_serializable(package="keras_aevb")
class AEVB(SavesGeneratorStates, keras.Model):
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
        if isinstance(kl_weight, dict):
            kl_weight = keras.saving.deserialize_keras_object(kl_weight)
        self.kl_schedule = kl_weight if isinstance(kl_weight, KLSchedule) else None
        initial = float(kl_weight(0)) if self.kl_schedule is not None else float(kl_weight)
        if not initial >= 0 or not np.isfinite(initial):
            raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}.")
        self.free_bits = float(free_bits)
        if not self.free_bits >= 0 or not np.isfinite(self.free_bits):
            raise ValueError(f"free_bits must be a finite number >= 0, got {free_bits!r}.")
        if self.estimator == "iwae" and (
            self.kl_schedule is not None or initial != 1.0 or self.free_bits
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
        # Held outside Keras's variable tracking: beta is a setting, not a weight, so it is
        # neither in get_weights()/count_params() nor in .keras files (older files load).
        self._kl_weight_holder = _Untracked(
            keras.Variable(
                initial,
                trainable=False,
                dtype="float32",
                name="kl_weight",
                aggregation="only_first_replica",
            )
        )
        self._kl_weight_config = (
            keras.saving.serialize_keras_object(self.kl_schedule)
            if self.kl_schedule is not None
            else initial
        )

    @property
    def kl_weight(self):
        """beta, the KL term's weight in the objective (a `keras.Variable`; assign to change
        it between steps; with a schedule, the value of the last step)."""
        return self._kl_weight_holder.value

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
        x = self._as_event(x)
        params = self.encoder(x, training=training)
        if training:
            z = self.posterior_layer.sample(params, num_samples=1)[0]
        else:
            z = self.posterior_layer.mean(params)
        return self.decoder.mean(self.decoder(z, training=training))

    def _as_event(self, x):
        """x as `[batch, *event_shape]`, checked (keras_aevb.inputs).

        Takes the event shape, the event shape plus a trailing 1, or flat examples
        ((28, 28), (28, 28, 1) or (784,) for MNIST) and refuses any other layout. Eager values
        are checked here too (NaN, inf, the decoder's support); inside a compiled step the
        step's own check (`_check_step_data`) sees every batch.
        """
        x = ops.convert_to_tensor(x)
        if x.dtype != self.compute_dtype:
            x = ops.cast(x, self.compute_dtype)
        if x.shape.rank is None:
            # A step traced for several layouts (reduce_retracing): fit and evaluate hand it
            # batches already in the event shape (`_event_data`), so only the batch size is new.
            return ops.reshape(x, (-1, *self.event_shape))
        inputs.event_layout(x.shape[1:], self.event_shape)
        if isinstance(x, tf.Tensor) and hasattr(x, "numpy") and tf.executing_eagerly():
            self._check_values(x.numpy())
        if tuple(x.shape[1:]) == self.event_shape:
            return x
        return ops.reshape(x, (-1, *self.event_shape))

    def _check_values(self, x):
        """Raises `DataError` for NaN, inf or values outside the decoder's support."""
        message = inputs.value_error(self.decoder, *inputs.array_statistics(x))
        if message:
            raise DataError(message)

    # ---------------------------------------------------------------- the bound

    def _terms(self, x, training, num_samples=None, seed=None, eps=None):
        x = self._as_event(x)
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
        if self.kl_schedule is not None and step is not None:
            beta = ops.cast(self.kl_schedule(step), self.compute_dtype)
            self.kl_weight.assign(beta)
        else:
            beta = ops.cast(self.kl_weight, self.compute_dtype)
        kl = terms["kl"]
        if self.free_bits:
            # Kingma et al. (2016): the floor applies to each dimension's KL averaged over the
            # minibatch; every example then carries that same floored total.
            per_dimension = _weighted_mean_over_batch(terms["kl_per_dimension"], sample_weight)
            floored = ops.sum(ops.maximum(per_dimension, self.free_bits))
            kl = ops.zeros_like(kl) + floored
        return terms["reconstruction_log_likelihood"] - beta * kl

    def _weight_penalty(self):
        """weight_decay / 2 * ||theta||^2, the paper's log p(theta) per datapoint (negated)."""
        if not self.weight_decay:
            return 0.0
        squares = [ops.sum(ops.square(v)) for v in self.trainable_variables]
        return 0.5 * self.weight_decay * ops.sum(ops.stack(squares))

    def train_step(self, data):
        x, sample_weight = unpack_data(data)
        return _reducible_logs(self._train_step(x, sample_weight))

    def _train_step(self, x, sample_weight, eps=None):
        """One step of Algorithm 1 on minibatch x; `eps`: the step's noise, drawn by the caller."""
        x = self._check_step_data(x)
        # Under tf.distribute the replicas' gradients are summed: scale each replica's mean.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape(persistent=self.gradient == "dreg") as tape:
            terms = self._terms(x, training=True, eps=eps)
            terms["objective"] = self._objective_terms(
                terms, sample_weight, self.optimizer.iterations
            )
            objective = -weighted_mean(terms["objective"], sample_weight) / replicas
            scaled = self.optimizer.scale_loss(objective)
            if self.gradient == "dreg":
                surrogate = -weighted_mean(terms.pop("dreg_surrogate"), sample_weight) / replicas
                scaled_surrogate = self.optimizer.scale_loss(surrogate)
        variables = self.trainable_variables
        gradients = tape.gradient(scaled, variables)
        if self.gradient == "dreg":
            # The encoder's gradient is DReG's; the decoder's (and a learned prior's) the
            # bound's own, which has no score-function term to remove.
            encoder = {id(v) for v in self.encoder.trainable_variables}
            dreg = tape.gradient(scaled_surrogate, self.encoder.trainable_variables)
            by_id = dict(zip((id(v) for v in self.encoder.trainable_variables), dreg, strict=True))
            gradients = [
                by_id[id(v)] if id(v) in encoder else g
                for g, v in zip(gradients, variables, strict=True)
            ]
            del tape
        if self.weight_decay:
            # The gradient of weight_decay / 2 * ||theta||^2 is weight_decay * theta: added in
            # closed form (2 passes over the 816k weights) rather than through the tape (the
            # penalty's forward and backward, 4-5 passes); bit-identical results, up to 1.1x
            # faster steps (benchmarks/BENCHMARKS.md). scale_loss multiplies (1 or the loss
            # scale), so the term is scaled like the rest of the gradient.
            with tf.name_scope("weight_prior_gradient"):  # named for profiles
                factor = self.optimizer.scale_loss(self.weight_decay / replicas)
                gradients = [
                    ops.multiply(ops.cast(factor, v.dtype), v) + (0.0 if g is None else g)
                    for g, v in zip(gradients, variables, strict=True)
                ]
        self.optimizer.apply(gradients, variables)
        return self._update_metrics(terms, sample_weight)

    def test_step(self, data):
        x, sample_weight = unpack_data(data)
        x = self._check_step_data(x)
        terms = self._terms(x, training=False)
        terms["objective"] = self._objective_terms(terms, sample_weight)
        return _reducible_logs(self._update_metrics(terms, sample_weight))

    def predict_step(self, data):
        x, _ = unpack_data(data)
        return self(x, training=False)

    def _check_step_data(self, x):
        """The data check of every batch, inside the compiled step; returns x.

        In keras_aevb's executions (`fit`/`evaluate` on one device) the first bad batch is
        recorded and the execution raises `DataError` naming it, with the weights restored
        (keras_aevb.execution.DataGuard): XLA drops assertions. Run eagerly, the step raises
        at once; in Keras's own loop (a `tf.distribute` strategy) an assertion stops the step
        before its update.
        """
        x = self._as_event(x)
        statistics = inputs.batch_statistics(x)
        guard = execution.active_guard(self)
        if guard is not None:
            guard.record(inputs.batch_is_bad(self.decoder, statistics), statistics)
            return x
        if tf.executing_eagerly():
            message = inputs.statistics_error(self.decoder, statistics.numpy())
            if message:
                raise DataError(message)
            return x
        check = tf.debugging.Assert(
            tf.logical_not(inputs.batch_is_bad(self.decoder, statistics)),
            ["keras_aevb: a batch holds NaN, inf or values outside the decoder's support; "
             "sum, min and max of the batch:", statistics],
        )  # fmt: skip
        with tf.control_dependencies([check]):
            return tf.identity(x)

    def _update_metrics(self, terms, sample_weight):
        values = dict(terms, loss=-terms.get("objective", terms["elbo"]))
        for name, tracker in self.trackers.items():
            tracker.update_state(values[name], sample_weight=sample_weight)
        return self._metric_logs()

    def _metric_logs(self):
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    @property
    def metrics(self):
        return list(self.trackers.values())

    # ---------------------------------------------------------------- executions

    @property
    def _execution_state(self):
        return model_cache(self, "execution_state")

    def _runs_lean_executions(self):
        """Whether fit/evaluate use keras_aevb.execution (one device, compiled) or Keras's."""
        return not self.run_eagerly and _is_default_strategy(self.distribute_strategy)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # A subclass that writes its own train_step and not how a block runs it trains step by
        # step: blocks would run the inherited block step instead of its own.
        if "train_step" in cls.__dict__ and "block_step" not in cls.__dict__:
            cls.block_step = AEVB._no_block_step

    def block_step(self):
        """The training step as XLA blocks run it (`keras_aevb.execution`), or None.

        A function `(x, eps) -> logs` of one full batch and its noise eps ~ p(eps), which
        `compile(jit_compile="auto")` runs inside one XLA computation per block of steps. AEVB's
        is `train_step` with the noise given. A subclass that overrides `train_step` gets None
        (step by step, its own step on every batch) unless it overrides `block_step` too.
        """
        return lambda x, eps: self._train_step(x, None, eps)

    def _no_block_step(self):
        return None

    def _uses_xla_blocks(self):
        # A layer that declares `supports_jit = False` (Keras's flag for ops XLA cannot compile)
        # turns blocks off, as it turns off Keras's own "auto".
        return (
            getattr(self, "xla_blocks", False)
            and self.posterior_layer.has_explicit_g
            and self.block_step() is not None
            and all(getattr(layer, "supports_jit", True) for layer in self._flatten_layers())
        )

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        if not self._runs_lean_executions():
            return super().make_train_function(force=force)
        block = None
        if self._uses_xla_blocks():
            block = (self.block_step(), self._block_noise)
        self.train_function = execution.make_execution_function(
            self, self.train_step, "train", jit_step=self.jit_compile, block=block
        )
        return self.train_function

    def make_test_function(self, force=False):
        if self.test_function is not None and not force:
            return self.test_function
        if not self._runs_lean_executions():
            return super().make_test_function(force=force)
        self.test_function = execution.make_execution_function(
            self, self.test_step, "test", jit_step=self.jit_compile
        )
        return self.test_function

    def _block_noise(self, steps, batch_size):
        """eps for `steps` training steps, `[steps, L, batch_size, latent_dim]`.

        One draw per step from the posterior layer's generator, as `train_step` draws it: the
        same seed gives the same noise stream, in XLA blocks or step by step.
        """
        shape = (self.num_samples, batch_size, self.latent_dim)
        _, draws = tf.while_loop(
            lambda k, draws: k < steps,
            lambda k, draws: (
                k + 1,
                draws.write(k, self.posterior_layer.noise(shape, self.compute_dtype)),
            ),
            (tf.constant(0), tf.TensorArray(self.compute_dtype, size=steps)),
        )
        return draws.stack()

    # ---------------------------------------------------------------- compiling

    def compile(
        self,
        optimizer="rmsprop",
        loss=None,
        loss_weights=None,
        metrics=None,
        weighted_metrics=None,
        run_eagerly=False,
        steps_per_execution=None,
        jit_compile="auto",
        **kwargs,
    ):
        """`keras.Model.compile` with defaults chosen by measurement for this model.

        - `steps_per_execution`: `DEFAULT_STEPS_PER_EXECUTION` (100; 1 when `run_eagerly` or
          under a `tf.distribute` strategy, where Keras's own loop runs).
          Each call of the train function has a fixed cost of Python and dispatch, of the order
          of a paper-model step at M = 100 (benchmarks/BENCHMARKS.md). `fit` and `evaluate` still
          run exactly `steps_per_epoch` / `steps` steps (an execution stops there); batch-level
          callbacks see every execution's last batch.
        - `jit_compile="auto"`: training runs in XLA blocks (`xla_blocks`): the steps of an
          execution's full batches run inside one XLA computation, with eps drawn outside it
          (keras_aevb.execution). Taken where the posterior family has an explicit
          z = g(eps, phi) (normal, laplace, logistic, ...); families sampled by TFP's implicit
          reparameterization (gamma, beta, student_t, chi2) train step by step without XLA.
          Single steps (evaluation, an epoch's short last batch) run without XLA, Keras's
          rule on CPU. `jit_compile=True` also compiles those single steps; `False` turns XLA
          off everywhere.

        Any value the caller passes is used as given. Under a `tf.distribute` strategy with
        several replicas Keras's own loop runs, with a default of 1 step per execution: Keras 3
        fails on `steps_per_execution > 1` with `MirroredStrategy` (keras-team/keras#19246,
        "You must feed a value for placeholder").
        """
        strategy = self.distribute_strategy
        replicas = strategy.num_replicas_in_sync
        if steps_per_execution is None:
            # Keras's own loop (eager, or any tf.distribute strategy, even of one replica) runs
            # whole executions: more steps than `steps_per_epoch` asks on an endless dataset.
            own_loop = run_eagerly or not _is_default_strategy(strategy)
            steps_per_execution = 1 if own_loop else DEFAULT_STEPS_PER_EXECUTION
        elif steps_per_execution > 1 and replicas > 1:
            warnings.warn(
                f"steps_per_execution={steps_per_execution} with {replicas} replicas: Keras 3 "
                "fails on this with MirroredStrategy (keras-team/keras#19246); pass "
                "steps_per_execution=1 if fit raises 'You must feed a value for placeholder'.",
                UserWarning,
                stacklevel=2,
            )
        self.xla_blocks = bool(jit_compile) and not run_eagerly and replicas == 1
        super().compile(
            optimizer=optimizer,
            loss=loss,
            loss_weights=loss_weights,
            metrics=metrics,
            weighted_metrics=weighted_metrics,
            run_eagerly=run_eagerly,
            steps_per_execution=steps_per_execution,
            # "auto": XLA for the blocks only (above); Keras's "auto" (off on CPU) elsewhere.
            jit_compile=jit_compile,
            **kwargs,
        )
        # Keras saves the resolved value (False on a CPU for "auto"); a loaded model must
        # resolve "auto" again, or it would lose its XLA blocks.
        self._compile_config.config["jit_compile"] = jit_compile

    def compile_from_config(self, config):
        """Recompiles a loaded model (Keras skips models whose `compile` is overridden)."""
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if hasattr(self, "optimizer") and self.built:
            # Creates the optimizer's variables so its saved state can be loaded into them.
            self.optimizer.build(self.trainable_variables)

    # ---------------------------------------------------------------- input checks

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        validation_split=0.0,
        validation_data=None,
        shuffle=None,
        sample_weight=None,
        steps_per_epoch=None,
        **kwargs,
    ):
        """`keras.Model.fit` with the data checked and sample weights kept without targets.

        `sample_weight` weights each example's bound in the objective and the metrics (Keras
        itself drops sample weights when `y` is None). A `tf.data.Dataset` carries them as
        `(x, None, sample_weight)` elements.
        """
        x, y, sample_weight = self._event_data(x, y, sample_weight)
        if validation_data is not None:
            validation_data = self._event_validation_data(validation_data)
        if shuffle is None:
            # A dataset is shuffled by its own pipeline; Keras would warn that shuffle=True is
            # ignored on every call.
            shuffle = not isinstance(x, tf.data.Dataset)
        x, source = self._addressed_batches(x)
        with self._bounded_executions("train", x, batch_size, steps_per_epoch, source):
            return super().fit(
                x=x,
                y=y,
                batch_size=batch_size,
                epochs=epochs,
                verbose=verbose,
                callbacks=self._with_cursor(callbacks),
                validation_split=validation_split,
                validation_data=validation_data,
                shuffle=shuffle,
                sample_weight=sample_weight,
                steps_per_epoch=steps_per_epoch,
                **kwargs,
            )

    def evaluate(
        self,
        x=None,
        y=None,
        batch_size=None,
        verbose="auto",
        sample_weight=None,
        steps=None,
        callbacks=None,
        **kwargs,
    ):
        """`keras.Model.evaluate`: the metrics are the `sample_weight`-weighted means if given."""
        x, y, sample_weight = self._event_data(x, y, sample_weight)
        with self._bounded_executions("test", x, batch_size, steps):
            return super().evaluate(
                x=x,
                y=y,
                batch_size=batch_size,
                verbose=verbose,
                sample_weight=sample_weight,
                steps=steps,
                callbacks=self._with_cursor(callbacks),
                **kwargs,
            )

    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None):
        """Deterministic reconstructions `[N, *event_shape]` (the posterior mean; any L)."""
        x, _, _ = self._event_data(x, None, None)
        return super().predict(
            x, batch_size=batch_size, verbose=verbose, steps=steps, callbacks=callbacks
        )

    @contextlib.contextmanager
    def _bounded_executions(self, mode, x, batch_size, steps, source=None):
        """Runs fit/evaluate with executions that stop at the epoch's `steps` (exact counts).

        Where the epoch's length is known and shorter than `steps_per_execution`, executions
        are that long for this call, so progress bars count real steps. `source`: the
        `AddressedBatches` whose addresses x yields (see `_addressed_batches`).
        """
        state = self._execution_state
        saved = dict(state), getattr(self, "steps_per_execution", 1)
        state[f"{mode}_source"] = source
        state[f"{mode}_steps"] = None if steps is None else int(steps)
        state[f"{mode}_begin"] = 0
        if mode == "train":
            state["fitting"] = True  # validation batches are named as such in data errors
        known = execution.steps_in(x, batch_size, steps)
        if known and self._runs_lean_executions() and known < self.steps_per_execution:
            self.steps_per_execution = known
        try:
            yield
        finally:
            state.clear()
            state.update(saved[0])
            self.steps_per_execution = saved[1]

    def _addressed_batches(self, x):
        """`(data for Keras, source)`: a `make_dataset` stream as its batches' addresses.

        Where the steps run in XLA blocks, the executions build each batch of a
        `keras_aevb.data.make_dataset` stream from its address next to the steps
        (`data.AddressedBatches`): the same batches, without tf.data building them on a
        thread of its own that competes with the step for the CPU. Small batches stay with
        tf.data (`_MIN_ADDRESSED_VALUES`), where its thread runs beside the step for free.
        Any other data: `(x, None)`.
        """
        addressed = getattr(x, "_keras_aevb_addressed", None)
        if addressed is None or not (self._runs_lean_executions() and self._uses_xla_blocks()):
            return x, None
        source, addresses = addressed
        if source.spec.event_shape != tuple(self.event_shape):
            return x, None
        if source.spec.batch_size * math.prod(source.spec.event_shape) < _MIN_ADDRESSED_VALUES:
            return x, None
        return addresses, source

    def _with_cursor(self, callbacks):
        """Adds the `ExecutionCursor` that tells executions where the epoch stands."""
        if isinstance(callbacks, keras.callbacks.CallbackList):
            if not any(isinstance(c, execution.ExecutionCursor) for c in callbacks.callbacks):
                callbacks.append(execution.ExecutionCursor(self._execution_state))
            return callbacks
        return [execution.ExecutionCursor(self._execution_state), *(callbacks or [])]

    def _check_data(self, x):
        """Refuses data the likelihood cannot score; warns once about data it scores poorly.

        Arrays are checked in full, a `tf.data.Dataset` on its first batch here and on every
        batch inside the compiled step (`_check_step_data`).
        """
        if not self.built:
            # Keras's own symbolic build in fit() builds the layers but not the model flag,
            # which saving needs.
            self.build()
        sample = _peek(x)
        if sample is None:
            return
        if sample.ndim >= 1:
            inputs.event_layout(sample.shape[1:], self.event_shape)
        self._check_values(sample)
        message = self.decoder.check_data(sample) if sample.size else None
        if message:
            seen = model_cache(self, "warned")  # once per message and model
            if message not in seen:
                seen[message] = True
                warnings.warn(message, UserWarning, stacklevel=4)

    def _event_data(self, x, y, sample_weight):
        """`(x, y, sample_weight)` for Keras: x checked and in the event shape.

        Arrays are reshaped here and datasets mapped (only where their layout differs), so a
        compiled step sees `[batch, *event_shape]` whichever accepted layout came in: steps
        traced for one layout then serve the others. Sample weights without targets get
        placeholder targets, or Keras would drop the weights.
        """
        self._check_data(x)
        if isinstance(x, tf.data.Dataset):
            x = self._event_dataset(x)
        elif isinstance(x, np.ndarray | tf.Tensor) and x.ndim >= 2:
            if tuple(x.shape[1:]) != self.event_shape:
                x = (
                    ops.reshape(x, (-1, *self.event_shape))
                    if isinstance(x, tf.Tensor)
                    else (x.reshape((-1, *self.event_shape)))
                )
        if sample_weight is not None and y is None and x is not None:
            if isinstance(x, tf.data.Dataset):
                raise ValueError(
                    "sample_weight with a tf.data.Dataset: put the weights in the dataset, as "
                    "(x, None, sample_weight) elements."
                )
            y = np.zeros((len(x),), np.float32)  # ignored by the steps; keeps the weights
        return x, y, sample_weight

    def _event_validation_data(self, validation_data):
        if isinstance(validation_data, tuple | list):
            x, *rest = validation_data
            y = rest[0] if rest else None
            weights = rest[1] if len(rest) > 1 else None
            x, y, weights = self._event_data(x, y, weights)
            return (x,) if y is None else (x, y) if weights is None else (x, y, weights)
        return self._event_data(validation_data, None, None)[0]

    def _event_dataset(self, dataset):
        """The dataset with its examples in the event shape (a reshape, only where needed)."""
        spec = dataset.element_spec
        first = spec[0] if isinstance(spec, tuple) else spec
        if not isinstance(first, tf.TensorSpec):
            return dataset
        if first.shape.rank is not None:
            shape = inputs.event_layout(first.shape[1:], self.event_shape)
            if shape == self.event_shape:
                return dataset
        event_shape = self.event_shape

        def reshape(*element):
            x = tf.reshape(element[0], (-1, *event_shape))
            return x if len(element) == 1 else (x, *element[1:])

        return dataset.map(reshape)

    # ---------------------------------------------------------------- user methods

    def encode(self, x):
        """The posterior's parameters for x, a dict of `[batch, latent_dim]` tensors."""
        return self.encoder(self._as_event(x), training=False)

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

    def _embed_one_or_many(self, x):
        """(z `[batch, latent_dim]`, whether x was one example without a batch axis)."""
        x = ops.convert_to_tensor(x, self.compute_dtype)
        single = tuple(x.shape) == self.event_shape or (
            x.shape.rank == 1 and int(x.shape[0]) == int(np.prod(self.event_shape))
        )
        return self.embed(x[None] if single else x), single

    def interpolate(self, x_a, x_b, steps=8, method="spherical"):
        """Decoded points on the latent path from the embedding of x_a to that of x_b.

        z_t for t = 0, 1/(steps-1), ..., 1: "linear", z_t = (1 - t) z_a + t z_b, or "spherical"
        (slerp, White 2016: the path keeps the norm a Gaussian prior expects),
        z_t = sin((1 - t) W) / sin W z_a + sin(t W) / sin W z_b, W the angle between z_a and
        z_b (linear where W is near 0). Both ends are the embeddings themselves.

        Args:
            x_a, x_b: one example each, or two batches of the same size.
            steps: points on the path, ends included (>= 2).
            method: "spherical" or "linear".

        Returns:
            Decoder means `[steps, *event_shape]` (one pair) or `[batch, steps, *event_shape]`.
        """
        if method not in ("spherical", "linear"):
            raise ValueError(f"method must be 'spherical' or 'linear', got {method!r}")
        steps = int(steps)
        if steps < 2:
            raise ValueError(f"steps must be at least 2 (the two ends), got {steps}")
        z_a, single = self._embed_one_or_many(x_a)
        z_b, _ = self._embed_one_or_many(x_b)
        if z_a.shape[0] != z_b.shape[0]:
            raise ValueError(
                f"x_a and x_b must hold as many examples: {z_a.shape[0]} and {z_b.shape[0]}"
            )
        t = ops.reshape(ops.linspace(0.0, 1.0, steps), (1, steps, 1))
        z_a, z_b = z_a[:, None, :], z_b[:, None, :]
        linear = (1.0 - t) * z_a + t * z_b
        if method == "spherical":
            norms = ops.norm(z_a, axis=-1, keepdims=True) * ops.norm(z_b, axis=-1, keepdims=True)
            cosine = ops.sum(z_a * z_b, axis=-1, keepdims=True) / ops.maximum(norms, 1e-12)
            angle = ops.arccos(ops.clip(cosine, -1.0, 1.0))
            sine = ops.sin(angle)
            safe = ops.where(sine > 1e-6, sine, 1.0)
            slerp = (ops.sin((1.0 - t) * angle) * z_a + ops.sin(t * angle) * z_b) / safe
            path = ops.where(sine > 1e-6, slerp, linear)
        else:
            path = linear
        batch = int(path.shape[0])
        images = self.decode(ops.reshape(path, (batch * steps, self.latent_dim)))
        images = ops.reshape(images, (batch, steps, *self.event_shape))
        return images[0] if single else images

    def traverse(self, x, dim, values):
        """Decoded embeddings of x with latent dimension `dim` set to each of `values`.

        The other dimensions stay at the posterior mean of x: what one latent variable does.

        Returns:
            Decoder means `[len(values), *event_shape]` (one example) or
            `[batch, len(values), *event_shape]`.
        """
        dim = int(dim)
        if not 0 <= dim < self.latent_dim:
            raise ValueError(f"dim must be in [0, {self.latent_dim}), got {dim}")
        values = ops.convert_to_tensor(np.asarray(values, np.float32).reshape(-1))
        z, single = self._embed_one_or_many(x)
        batch, count = int(z.shape[0]), int(values.shape[0])
        z = ops.repeat(z[:, None, :], count, axis=1)  # [batch, count, latent_dim]
        one_hot = ops.reshape(ops.one_hot(dim, self.latent_dim), (1, 1, self.latent_dim))
        z = z * (1.0 - one_hot) + ops.reshape(values, (1, count, 1)) * one_hot
        images = self.decode(ops.reshape(z, (batch * count, self.latent_dim)))
        images = ops.reshape(images, (batch, count, *self.event_shape))
        return images[0] if single else images

    def elbo(self, x, num_samples=1, seed=None):
        """Per-example SGVB estimate of the bound with L = `num_samples`, shape `[batch]`."""
        return self._terms(x, training=False, num_samples=num_samples, seed=_stateless(seed))[
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
            kl_weight=self._kl_weight_config,
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


class _Untracked:
    """Holds a value where Keras's attribute tracking does not look (a plain object)."""

    def __init__(self, value):
        self.value = value


def _prior_name(prior):
    return prior if isinstance(prior, str) else type(prior).__name__


def _reducible_logs(logs):
    """Gives the step's metric values a leading axis of 1 under multi-worker training.

    Keras 3 reduces the logs of every step under `MultiWorkerMirroredStrategy` with
    `strategy.reduce("MEAN", value, axis=0)`, which fails on scalars ("Invalid reduction
    dimension 0 for input with 0 dimensions", tensorflow/tensorflow#72388); with shape [1] it
    returns the scalar mean over workers. Elsewhere the logs are returned as they are.
    """
    strategy = tf.distribute.get_strategy()
    in_multi_worker_mode = getattr(strategy.extended, "_in_multi_worker_mode", None)
    if not (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and in_multi_worker_mode is not None
        and in_multi_worker_mode()
    ):
        return logs
    return {name: ops.reshape(value, (1,)) for name, value in logs.items()}


def unpack_data(data):
    x, _, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    return x, sample_weight


def weighted_mean(values, sample_weight):
    if sample_weight is None:
        return ops.mean(values)
    sample_weight = ops.cast(ops.reshape(sample_weight, ops.shape(values)), values.dtype)
    return ops.sum(values * sample_weight) / ops.maximum(ops.sum(sample_weight), 1e-12)


def _weighted_mean_over_batch(values, sample_weight):
    """The (weighted) mean over the batch axis of `[batch, ...]` values: `[...]`."""
    if sample_weight is None:
        return ops.mean(values, axis=0)
    shape = (-1,) + (1,) * (len(values.shape) - 1)
    weight = ops.cast(ops.reshape(sample_weight, shape), values.dtype)
    return ops.sum(values * weight, axis=0) / ops.maximum(ops.sum(weight), 1e-12)


def _is_default_strategy(strategy):
    """Whether `strategy` is TensorFlow's default (no tf.distribute strategy in use)."""
    from tensorflow.python.distribute import distribute_lib

    return strategy is distribute_lib._get_default_strategy()


def _stateless(seed):
    return inputs.check_seed(seed)


def _peek(x):
    """A NumPy view of the data to check: the array itself, or a dataset's first batch."""
    if x is None:
        return None
    if isinstance(x, tf.data.Dataset):
        element = next(iter(x.take(1)), None)
        if element is None:
            return None
        x = element[0] if isinstance(element, tuple | list) else element
    if isinstance(x, tuple | list) and x and not np.isscalar(x[0]):
        x = x[0]
    if isinstance(x, dict):
        return None
    try:
        return np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError):
        return None
