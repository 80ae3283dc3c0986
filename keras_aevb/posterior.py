"""The reparameterized posterior layer: z = g(eps, phi), eps ~ p(eps) (paper eq. 4)."""

import keras
import tensorflow as tf

from keras_aevb.families import check_reparameterized, get_family
from keras_aevb.inputs import positive_int

__all__ = [
    "ReparameterizedPosterior",
    "SavesGeneratorStates",
    "stateless_seed",
]

# Largest int32 for stateless seeds drawn from a SeedGenerator.
_INT32_MAX = 2**31 - 1


def stateless_seed(seed_generator):
    """An int32 `[2]` stateless seed for TFP, drawn from a Keras `SeedGenerator`.

    Keras owns the random state (so `seed=` in a config reproduces a run); TFP's stateless
    sampling takes the derived pair, which also works under XLA.
    """
    return keras.random.randint([2], 0, _INT32_MAX, seed=seed_generator, dtype="int32")


class SavesGeneratorStates:
    """Saves the states of a layer's `keras.random.SeedGenerator`s with its variables.

    Keras saves a layer's trainable and non-trainable variables but not its seed generators'
    states (DESIGN 9), so a model restored from `.keras` or `.weights.h5` would restart its
    noise stream: a resumed run would replay the noise of the epochs it already ran. The states
    are stored after the layer's own variables, under the next indices; files written without
    them still load (the generators then keep their seeded initial states).
    """

    def _own_variables(self):
        return self._trainable_variables + self._non_trainable_variables

    def _generator_states(self):
        return [generator.state for generator in self._seed_generators]

    def save_own_variables(self, store):
        super().save_own_variables(store)
        offset = len(self._own_variables())
        for i, state in enumerate(self._generator_states()):
            store[f"{offset + i}"] = state

    def load_own_variables(self, store):
        own, states = self._own_variables(), self._generator_states()
        if len(store.keys()) != len(own) + len(states):
            super().load_own_variables(store)  # no states in the file, or Keras's own error
            return
        for i, variable in enumerate(own + states):
            variable.assign(store[f"{i}"])


@keras.saving.register_keras_serializable(package="keras_aevb")
class ReparameterizedPosterior(SavesGeneratorStates, keras.layers.Layer):
    """Draws z ~ q_phi(z|x) as a differentiable function of the posterior's parameters.

    Paper eq. 4: z = g_phi(eps, x), eps ~ p(eps). For the Gaussian family,

        eps ~ N(0, I),   z = z_mean + exp(0.5 * z_log_var) * eps,

    so dz/dz_mean = 1 and dz/dz_log_var = 0.5 * sigma * eps. Families that define no explicit
    g are sampled with TFP's reparameterized sampler (implicit reparameterization for Gamma,
    Beta, Student's t). Families that TFP cannot reparameterize are refused.

    Calling the layer on the encoder's parameter dict returns z of shape
    `[num_samples, batch, latent_dim]`, or `[batch, latent_dim]` when `num_samples=1`. With
    `deterministic=True` (constructor or call) it returns the posterior mean instead,
    `[batch, latent_dim]` for every L, for serving and tests.

    Args:
        family: posterior family name (see `keras_aevb.families.FAMILIES`).
        num_samples: L, the number of samples per datapoint.
        seed: int seed of the layer's `keras.random.SeedGenerator`.
        deterministic: default for the call argument of the same name.

    Example:
    >>> layer = ReparameterizedPosterior(seed=1)
    >>> params = {"z_mean": np.zeros((4, 2), "float32"), "z_log_var": np.zeros((4, 2), "float32")}
    >>> tuple(layer(params).shape), tuple(layer.sample(params, 3).shape)
    ((4, 2), (3, 4, 2))

    Reference: Kingma & Welling, arXiv:1312.6114, section 2.3-2.4.
    """

    def __init__(self, family="normal", num_samples=1, seed=None, deterministic=False, **kwargs):
        super().__init__(**kwargs)
        self.family = family
        self.num_samples = positive_int(num_samples, "num_samples")
        self.seed = seed
        self.deterministic = bool(deterministic)
        self._family = get_family(family)
        check_reparameterized(self._family)
        self.seed_generator = keras.random.SeedGenerator(seed)
        # No weights of its own: built from the start so summaries and saving see it whole.
        self.built = True

    @property
    def param_names(self):
        return self._family.param_names

    @property
    def has_explicit_g(self):
        """Whether z = g(eps, params) is written out (else TFP's implicit reparameterization)."""
        return self._family.g is not None

    def distribution(self, params, stop_gradient=False):
        """q(z|x) as a `tfd` distribution with event shape `[latent_dim]`; `stop_gradient`:
        at parameters no gradient flows through (DReG's q, Tucker et al. 2018)."""
        if stop_gradient:
            params = {name: tf.stop_gradient(value) for name, value in params.items()}
        return self._family.distribution(params)

    def mean(self, params):
        """The posterior mean, the deterministic point estimate of z."""
        dist = self.distribution(params)
        try:
            return dist.mean()
        except NotImplementedError:
            # Families without a mean (e.g. Cauchy) fall back to their mode.
            return dist.mode()

    def sample(self, params, num_samples=None, seed=None, eps=None):
        """Reparameterized samples, always with a leading sample axis: `[L, batch, latent_dim]`.

        Args:
            params: the encoder's parameter dict.
            num_samples: L; defaults to the layer's `num_samples`.
            seed: optional stateless seed (int32 `[2]`); by default the layer's generator.
            eps: optional noise eps ~ p(eps) of shape `[L, batch, latent_dim]`, drawn by the
                caller with `noise`; z = g(eps, params) (families with an explicit g only).
        """
        if eps is not None:
            return self.g(eps, params)
        if num_samples is None:
            num_samples = self.num_samples
        num_samples = positive_int(num_samples, "num_samples")
        seed = stateless_seed(self.seed_generator) if seed is None else tf.cast(seed, "int32")
        replica = tf.distribute.get_replica_context()
        if replica is not None and replica.num_replicas_in_sync > 1:
            # Every replica reads the same generator state: fold in the replica id so the
            # replicas' eps are independent draws, as on one device.
            seed = tf.random.experimental.stateless_fold_in(seed, replica.replica_id_in_sync_group)
        return self._family.sample(params, num_samples, seed)

    def noise(self, shape, dtype="float32", seed=None):
        """eps ~ p(eps) of the given shape (families with an explicit g), from a stateless seed.

        By default the seed comes from the layer's generator, like `sample`'s.
        """
        if self._family.g is None:
            raise ValueError(
                f"Posterior family {self.family!r} has no explicit g(eps, phi), so no p(eps) to "
                "draw from: TFP samples it with implicit reparameterization."
            )
        seed = stateless_seed(self.seed_generator) if seed is None else tf.cast(seed, "int32")
        return self._family.noise(shape, dtype, seed)

    def g(self, eps, params):
        """The paper's g_phi(eps, x) for families with an explicit form (eq. 4)."""
        if self._family.g is None:
            raise ValueError(
                f"Posterior family {self.family!r} has no explicit g(eps, phi): TFP samples it "
                "with implicit reparameterization."
            )
        return self._family.g(eps, params)

    def call(self, params, deterministic=None):
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic:
            return self.mean(params)  # one point per example, whatever L is
        z = self.sample(params)
        return z[0] if self.num_samples == 1 else z

    def compute_output_spec(self, params, deterministic=None):
        deterministic = self.deterministic if deterministic is None else deterministic
        reference = params[self.param_names[0]]
        shape = tuple(reference.shape)
        if self.num_samples > 1 and not deterministic:
            shape = (self.num_samples, *shape)
        return keras.KerasTensor(shape, dtype=reference.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            family=self.family,
            num_samples=self.num_samples,
            seed=self.seed,
            deterministic=self.deterministic,
        )
        return config
