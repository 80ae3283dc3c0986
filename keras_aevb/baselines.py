"""The paper's baselines: the wake-sleep algorithm and Monte Carlo EM (paper section 5, Fig. 2-3).

Both are Keras models built from the same encoder and decoder layers as `AEVB` (they subclass it,
so `encode`, `decode`, `sample`, `elbo`, saving, `keras_aevb.log_likelihood` and
`keras_aevb.hmc_log_likelihood` work the same way); only `train_step` differs. Both report the
same metrics as `AEVB` in `fit` and `evaluate` (`loss` = -elbo, `elbo`,
`reconstruction_log_likelihood`, `kl`, nats per datapoint, the SGVB bound of their recognition
model), so their curves go on one figure with AEVB's; each adds its own training diagnostics.
"""

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from keras import ops

from keras_aevb.estimator import sgvb_terms
from keras_aevb.inputs import unpack_data, weighted_mean
from keras_aevb.marginal_likelihood import log_joint_fn
from keras_aevb.model import AEVB
from keras_aevb.objective import weight_penalty
from keras_aevb.posterior import stateless_seed

__all__ = [
    "MCEM_MAX_EXAMPLES",
    "MonteCarloEM",
    "WakeSleep",
]

tfd = tfp.distributions


class _Baseline(AEVB):
    """AEVB's model and bound metrics with extra train-only metrics (`extra_metric_names`)."""

    extra_metric_names = ()

    def __init__(self, encoder, decoder, **kwargs):
        super().__init__(encoder, decoder, **kwargs)
        self.extra_trackers = {
            name: keras.metrics.Mean(name=name) for name in self.extra_metric_names
        }

    @property
    def metrics(self):
        return list(self.trackers.values()) + list(self.extra_trackers.values())

    def metric_logs(self, training=False):
        logs = super().metric_logs(training)
        if training:
            logs.update({name: t.result() for name, t in self.extra_trackers.items()})
        return logs

    def _update_all_metrics(self, terms, extras, sample_weight):
        for name, tracker in self.extra_trackers.items():
            tracker.update_state(extras[name])
        self.update_metrics(terms, sample_weight)
        return self.metric_logs(training=True)

    def block_step(self):
        """None unless a baseline declares its step in XLA blocks (wake-sleep does; Monte
        Carlo EM's HMC chains run inside its step)."""
        return None


@keras.saving.register_keras_serializable(package="keras_aevb")
class WakeSleep(_Baseline):
    """The wake-sleep algorithm (Hinton et al., 1995) with AEVB's encoder and decoder.

    Each training step, on a minibatch x of M datapoints:

    - wake phase: z ~ q_phi(z|x) from the recognition model (no gradient through z), and the
      generative weights theta ascend  1/M sum_i log p_theta(x_i, z_i)  (= log p(x|z) + const);
    - sleep phase: M dreams z ~ p(z), x ~ p_theta(x|z) from the generative model (no gradient
      through them), and the recognition weights phi ascend  1/M sum log q_phi(z|x).

    The two objectives touch disjoint weights (wake: theta only, sleep: phi only), so one
    optimizer applies both gradients in one update (`optimizer.iterations` counts minibatches).
    The phases use the weights of the start of the step (a simultaneous, not alternating,
    update). Unlike AEVB, phi does not ascend the bound: the sleep phase fits q to the model's
    own dreams, KL(p(z|x) || q(z|x)) in expectation over p(x), not to the data.

    Metrics: `loss`, `elbo`, `reconstruction_log_likelihood`, `kl` are AEVB's (the SGVB bound
    of q, estimator B where the KL is analytic, with the wake-phase z), so the curves compare
    with AEVB's; in training also `sleep_log_q` = 1/M sum log q(z|x) on the dreams (the sleep
    objective).

    Args:
        encoder, decoder: the same layers as for `AEVB` (e.g. `MLPEncoder`, `BernoulliDecoder`).
        prior: p(z) (see `AEVB`).
        seed: seed of the wake samples, the dreams and the bound's samples.
        **kwargs: `AEVB`'s other arguments (posterior, estimator for the reported bound,
            num_samples = L wake samples per datapoint, weight_decay).

    Example:
    >>> model = WakeSleep(MLPEncoder(2, (16,)), BernoulliDecoder((28, 28), (16,)), seed=0)
    >>> model.compile(optimizer=keras_aevb.paper_optimizer())
    >>> history = model.fit(x_binary, epochs=1, batch_size=100, verbose=0)

    Reference: Hinton, Dayan, Frey & Neal, The wake-sleep algorithm for unsupervised neural
    networks, Science 1995; Kingma & Welling, arXiv:1312.6114, section 5 (Fig. 2 and 3).
    """

    extra_metric_names = ("sleep_log_q",)

    def __init__(self, encoder, decoder, prior="standard_normal", seed=None, **kwargs):
        super().__init__(encoder, decoder, prior=prior, seed=seed, **kwargs)
        # The dreams have their own generator: the wake samples' stream matches AEVB's.
        self.dream_seed_generator = keras.random.SeedGenerator(
            None if seed is None else seed + 2, name="dream_seed_generator"
        )

    def train_step(self, data):
        x, sample_weight = unpack_data(data)
        return self._wake_sleep_step(x, sample_weight)

    def block_step(self):
        """Wake-sleep in XLA blocks: the step with every draw given (`step_noise`), where each
        can be drawn ahead: an explicit posterior g(eps, phi), a decoder that samples from
        given noise, and a prior without trainable weights. Else None (step by step)."""
        fixed_prior = not isinstance(self.prior, keras.layers.Layer) and not getattr(
            self.prior_distribution, "trainable_variables", ()
        )
        if not (
            self.posterior_layer.has_explicit_g
            and hasattr(self.decoder, "sample_given_noise")
            and fixed_prior
        ):
            return None
        return lambda x, noise: self._wake_sleep_step(x, None, noise)

    def step_noise(self, batch_size):
        """One step's draws: the wake eps (the posterior layer's generator), then the dreams'
        z ~ p(z) and the noise of x ~ p(x|z) (the dream generator), as `train_step` draws them."""
        shape = (self.num_samples, batch_size, self.latent_dim)
        wake = self.posterior_layer.noise(shape, self.compute_dtype)
        return {"wake": wake, **self._dream_noise(batch_size)}

    def _dream_noise(self, batch_size):
        dream_z = self.prior_distribution.sample(
            batch_size, seed=stateless_seed(self.dream_seed_generator)
        )
        dream_x = None
        if hasattr(self.decoder, "noise"):
            shape = (batch_size, *self.event_shape)
            seed = stateless_seed(self.dream_seed_generator)
            dream_x = self.decoder.noise(shape, seed, self.compute_dtype)
        return {"dream_z": dream_z, "dream_x": dream_x}

    def _dream_x(self, outputs, noise):
        """x ~ p(x|z) for the dreams: from the noise given, or drawn by TFP (a decoder
        without `sample_given_noise`)."""
        if noise is not None:
            return self.decoder.sample_given_noise(outputs, noise)
        return self.decoder.distribution(outputs).sample(
            seed=stateless_seed(self.dream_seed_generator)
        )

    def _wake_sleep_step(self, x, sample_weight, noise=None):
        """One wake-sleep step on minibatch x; `noise`: its draws (`step_noise`), or None to
        draw them here (the wake eps then as `posterior_layer.sample` draws it under
        tf.distribute, independent per replica)."""
        x = self.check_step_data(x)
        wake_eps = None if noise is None else noise["wake"]
        with tf.GradientTape() as tape:
            # Wake: z ~ q(z|x), fixed; theta ascends log p(x|z) (log p(z) has no theta).
            params = self.encoder(x, training=True)
            posterior = self.posterior_layer.distribution(params)
            z = ops.stop_gradient(self.posterior_layer.sample(params, eps=wake_eps))
            log_px_z = self.decoder.log_likelihood(x, self.decoder(z, training=True))
            wake = weighted_mean(ops.mean(log_px_z, axis=0), sample_weight)
            # Sleep: (z, x) ~ p(z) p(x|z), fixed; phi ascends log q(z|x).
            dreams = self._dream_noise(ops.shape(x)[0]) if noise is None else noise
            dream_z = dreams["dream_z"]
            dream_x = self._dream_x(self.decoder(dream_z, training=False), dreams["dream_x"])
            dream_x = ops.stop_gradient(ops.cast(dream_x, x.dtype))
            dream_params = self.encoder(dream_x, training=True)
            sleep = ops.mean(self.posterior_layer.distribution(dream_params).log_prob(dream_z))
            objective = -(wake + sleep) + weight_penalty(
                self.trainable_variables, self.weight_decay
            )
            objective = objective / tf.distribute.get_strategy().num_replicas_in_sync
            scaled = self.optimizer.scale_loss(objective)
        gradients = tape.gradient(scaled, self.trainable_variables)
        # The wake sample z is held fixed, so no gradient depends on the encoder's read that
        # made it: without this edge TensorFlow may run the encoder's update first and draw z
        # from the updated weights (measured: 1 step in 4 differed from the same seed).
        with tf.control_dependencies([z, log_px_z, sleep]):
            gradients = [None if g is None else tf.identity(g) for g in gradients]
        self.optimizer.apply(gradients, self.trainable_variables)
        terms = sgvb_terms(log_px_z, posterior, self.prior_distribution, z, self.estimator)
        return self._update_all_metrics(terms, {"sleep_log_q": sleep}, sample_weight)


# Monte Carlo EM keeps one HMC chain per training example and visits each once per epoch: it does
# not scale to large data sets (the paper's point in Fig. 3, where it is run with N = 1000).
MCEM_MAX_EXAMPLES = 10_000


@keras.saving.register_keras_serializable(package="keras_aevb")
class MonteCarloEM(_Baseline):
    """Monte Carlo EM with an HMC E-step, the paper's baseline of Fig. 3 (App. E).

    One persistent HMC chain z_i per training example i. Each training step, on a minibatch:

    - E-step: `num_hmc_steps` HMC transitions of each example's chain, targeting
      p_theta(z|x_i) proportional to p_theta(x_i|z) p(z), with `num_leapfrog_steps` = 10
      leapfrog steps and a per-example step size adapted towards `target_accept_prob` = 0.9
      (App. E: "automatically tuned stepsize such that the acceptance rate was 90%") by
      log eps <- log eps + `adaptation_rate` * (accept_prob - 0.9), kept across epochs;
    - M-step: `num_m_steps` = 5 gradient updates of the decoder's weights theta on
      1/M sum_i log p_theta(x_i, z_i) at the sampled z_i (App. E: "followed by 5 weight updates
      steps using the acquired sample"), with the compiled optimizer.

    The generative model is learned by those two steps alone. The encoder is an
    evaluation-only recognition model: after the M-step it takes one step up the SGVB bound
    with theta held fixed (its own optimizer `recognition_optimizer`: by default a copy of the
    compiled one made by the first `fit`; not saved with the model), so that the model
    reports a well-defined lower bound on its log p(x) (the `elbo` metric, comparable with
    AEVB's and wake-sleep's), and `keras_aevb.log_likelihood` has a proposal. It never
    changes theta. The paper compares the methods by marginal likelihood
    (`keras_aevb.hmc_log_likelihood`, App. D, which needs no encoder).

    Training data: the chains are indexed by example, so `fit` takes the training set as one
    array `[N, *event_shape]` with N <= `MCEM_MAX_EXAMPLES` (10,000) and passes each example's
    index with it internally (`y` must be None; shuffling and batch_size work as usual).
    A `tf.data.Dataset` is refused. Every later `fit` must use the same N examples, in the same
    order. `num_examples` (N) is taken from the first `fit`, or given to the constructor (needed
    to load a saved model, whose chains are part of its weights).

    Metrics in training: AEVB's four (the recognition model's bound, after the M-step), plus
    `log_joint` (1/M sum log p(x_i, z_i) at the E-step's samples, before the M-step: the
    objective the M-step ascends), `acceptance_rate` and `step_size` (means over the batch).

    Args:
        encoder, decoder: the same layers as for `AEVB`.
        prior: p(z) (see `AEVB`).
        seed: seed of the chains' initial states, the HMC draws and the bound's samples.
        num_examples: N; None: set by the first `fit`.
        num_leapfrog_steps: leapfrog steps per HMC transition (App. E: 10).
        num_hmc_steps: HMC transitions per E-step.
        num_m_steps: weight updates per minibatch (App. E: 5).
        initial_step_size: every chain's first step size.
        target_accept_prob: acceptance probability the step sizes aim at (App. E: 0.9).
        adaptation_rate: gain of the step-size adaptation (above).
        **kwargs: `AEVB`'s other arguments (posterior, estimator, num_samples, weight_decay).

    Reference: Kingma & Welling, arXiv:1312.6114, section 5 (Fig. 3) and App. E;
    Duane et al., Hybrid Monte Carlo, 1987; Wei & Tanner, Monte Carlo EM, 1990.
    """

    extra_metric_names = ("log_joint", "acceptance_rate", "step_size")

    def __init__(
        self,
        encoder,
        decoder,
        prior="standard_normal",
        seed=None,
        num_examples=None,
        num_leapfrog_steps=10,
        num_hmc_steps=1,
        num_m_steps=5,
        initial_step_size=0.1,
        target_accept_prob=0.9,
        adaptation_rate=0.5,
        **kwargs,
    ):
        super().__init__(encoder, decoder, prior=prior, seed=seed, **kwargs)
        for name, value in (
            ("num_leapfrog_steps", num_leapfrog_steps),
            ("num_hmc_steps", num_hmc_steps),
            ("num_m_steps", num_m_steps),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not 0.0 < float(target_accept_prob) < 1.0:
            raise ValueError(f"target_accept_prob must be in (0, 1), got {target_accept_prob!r}.")
        if float(initial_step_size) <= 0.0:
            raise ValueError(f"initial_step_size must be > 0, got {initial_step_size!r}.")
        self.num_examples = None if num_examples is None else _check_size(num_examples)
        self.num_leapfrog_steps = int(num_leapfrog_steps)
        self.num_hmc_steps = int(num_hmc_steps)
        self.num_m_steps = int(num_m_steps)
        self.initial_step_size = float(initial_step_size)
        self.target_accept_prob = float(target_accept_prob)
        self.adaptation_rate = float(adaptation_rate)
        self.hmc_seed_generator = keras.random.SeedGenerator(
            None if seed is None else seed + 3, name="hmc_seed_generator"
        )
        # Set by the first fit (a copy of the compiled optimizer) unless set by the user.
        self.recognition_optimizer = None

    def build(self, input_shape=None):
        if self.num_examples is not None and not hasattr(self, "chain_state"):
            # The E-step's state, one chain and one step size per training example: weights
            # (saved with the model), not trained by gradients.
            self.chain_state = self.add_weight(
                shape=(self.num_examples, self.latent_dim),
                initializer=keras.initializers.RandomNormal(seed=self.seed),
                trainable=False,
                name="chain_state",
            )
            self.chain_step_size = self.add_weight(
                shape=(self.num_examples,),
                initializer=keras.initializers.Constant(self.initial_step_size),
                trainable=False,
                name="chain_step_size",
            )
        super().build(input_shape)

    def fit(self, x=None, y=None, *args, **kwargs):
        """Trains on the whole training set `x` (one array, N <= 10,000); see the class doc."""
        if y is not None:
            raise ValueError(
                "MonteCarloEM.fit takes no y: it pairs each example with its index itself, to "
                "find the example's HMC chain. Call fit(x, ...) with the training array."
            )
        if isinstance(x, tf.data.Dataset) or not hasattr(x, "shape"):
            raise ValueError(
                "MonteCarloEM keeps one HMC chain per training example, so fit needs the whole "
                f"training set as one array [N, ...] with N <= {MCEM_MAX_EXAMPLES}, not "
                f"{type(x).__name__}; e.g. np.concatenate(list(dataset.as_numpy_iterator()))."
            )
        n = _check_size(int(x.shape[0]))
        if self.num_examples is None:
            if hasattr(self, "chain_state") or self.built:
                raise ValueError(
                    "This MonteCarloEM was built before it knew its training set size: pass "
                    "num_examples=N to the constructor."
                )
            self.num_examples = n
        elif n != self.num_examples:
            raise ValueError(
                f"This MonteCarloEM holds HMC chains for {self.num_examples} training examples "
                f"but fit got {n}: fit it on the same training set (or build a new model with "
                f"num_examples={n})."
            )
        if not self.built:
            self.build()
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None and not optimizer.built:
            # Built on all trainable weights (as Keras builds it on loading), though the M-step
            # applies it to theta only: a saved model's optimizer state then loads back.
            optimizer.build(self.trainable_variables)
        if self.recognition_optimizer is None and optimizer is not None:
            # The recognition model's own optimizer: a fresh copy of the compiled one (same class
            # and settings, its own state), so that theta's optimizer counts M-step updates only.
            self.recognition_optimizer = keras.optimizers.deserialize(
                keras.optimizers.serialize(self.optimizer)
            )
        if self.recognition_optimizer is not None and not self.recognition_optimizer.built:
            self.recognition_optimizer.build(self.encoder.trainable_variables)
        indices = np.arange(n, dtype=np.int32)
        return super().fit(x, indices, *args, **kwargs)

    def train_step(self, data):
        x, index, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x = self.check_step_data(x)
        index = ops.cast(ops.reshape(index, (-1,)), "int32")
        log_joint = log_joint_fn(self, x)

        # E-step: HMC on p(z|x_i), one chain per example, per-example step sizes.
        z = ops.take(self.chain_state, index, axis=0)
        step_size = ops.take(self.chain_step_size, index, axis=0)
        accept_prob = ops.zeros_like(step_size)
        for _ in range(self.num_hmc_steps):
            kernel = tfp.mcmc.HamiltonianMonteCarlo(
                log_joint,
                step_size=step_size[:, None],
                num_leapfrog_steps=self.num_leapfrog_steps,
            )
            z, results = kernel.one_step(
                z, kernel.bootstrap_results(z), seed=stateless_seed(self.hmc_seed_generator)
            )
            log_accept = tf.where(
                tf.math.is_nan(results.log_accept_ratio), -np.inf, results.log_accept_ratio
            )
            accept_prob = ops.exp(ops.minimum(log_accept, 0.0))
            # Robbins-Monro on log eps: stationary where E[accept_prob] = target; bounded so a
            # chain that diverged once can recover.
            step_size = ops.exp(
                ops.clip(
                    ops.log(step_size)
                    + self.adaptation_rate * (accept_prob - self.target_accept_prob),
                    np.log(1e-4),
                    np.log(10.0),
                )
            )
        z = ops.stop_gradient(z)
        self.chain_state.assign(tf.tensor_scatter_nd_update(self.chain_state, index[:, None], z))
        self.chain_step_size.assign(
            tf.tensor_scatter_nd_update(self.chain_step_size, index[:, None], step_size)
        )

        # M-step: num_m_steps updates of theta on 1/M sum_i log p(x_i, z_i) at the samples.
        decoder_variables = self.decoder.trainable_variables
        joint_before = None
        for _ in range(self.num_m_steps):
            with tf.GradientTape() as tape:
                joint = weighted_mean(log_joint(z), sample_weight)
                objective = -joint + weight_penalty(decoder_variables, self.weight_decay)
                scaled = self.optimizer.scale_loss(objective)
            if joint_before is None:
                joint_before = joint
            gradients = tape.gradient(scaled, decoder_variables)
            self.optimizer.apply(gradients, decoder_variables)

        # The recognition model (evaluation only): one step up the bound, theta fixed.
        encoder_variables = self.encoder.trainable_variables
        with tf.GradientTape() as tape:
            terms = self.bound_terms(x, training=True)
            objective = -weighted_mean(terms["elbo"], sample_weight)
            objective = objective + weight_penalty(encoder_variables, self.weight_decay)
        if encoder_variables:
            gradients = tape.gradient(objective, encoder_variables)
            self.recognition_optimizer.apply(gradients, encoder_variables)

        extras = {
            "log_joint": joint_before,
            "acceptance_rate": ops.mean(accept_prob),
            "step_size": ops.mean(step_size),
        }
        return self._update_all_metrics(terms, extras, sample_weight)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_examples=self.num_examples,
            num_leapfrog_steps=self.num_leapfrog_steps,
            num_hmc_steps=self.num_hmc_steps,
            num_m_steps=self.num_m_steps,
            initial_step_size=self.initial_step_size,
            target_accept_prob=self.target_accept_prob,
            adaptation_rate=self.adaptation_rate,
        )
        return config


def _check_size(n):
    n = int(n)
    if n > MCEM_MAX_EXAMPLES:
        raise ValueError(
            f"MonteCarloEM got {n} training examples; it accepts at most {MCEM_MAX_EXAMPLES}: it "
            "keeps one HMC chain per example and visits each once per epoch, which does not "
            "scale (the paper runs it on N = 1000, Fig. 3). Train on a subset, e.g. x[:1000], "
            "or use AEVB."
        )
    if n < 1:
        raise ValueError(f"MonteCarloEM needs at least one training example, got {n}.")
    return n
