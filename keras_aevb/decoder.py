"""The generative model p_theta(x|z): dense decoders for binary and continuous data (App. C)."""

import math

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from keras import ops

from keras_aevb.encoder import dense_stack, serialize_initializer
from keras_aevb.families import soft_clip

__all__ = [
    "BINARIZATION_HINT",
    "BernoulliDecoder",
    "GaussianDecoder",
    "X_LOG_VAR_BOUNDS",
]

tfd = tfp.distributions

BINARIZATION_HINT = (
    "binarize it first: keras_aevb.data.make_dataset(..., binarization='dynamic'), or "
    "keras_aevb.data.binarize(x, 'static' or 'threshold'); or use a GaussianDecoder for "
    "continuous data"
)


class _MLPDecoder(keras.layers.Layer):
    """Shared body: z -> tanh hidden layers -> heads reshaped to `[..., *output_shape]`.

    `z` may carry leading sample dimensions (`[L, batch, latent_dim]`); they are kept.
    """

    head_names = ()

    # The largest value log p(x|z) can take, in nats per datapoint; None: not known. Every
    # bound (ELBO <= log p(x) <= this) above it is impossible: the step-size search and the
    # divergence check of keras_aevb.training treat such a bound as divergence.
    max_log_likelihood = None

    def __init__(
        self,
        output_shape,
        hidden_units,
        activation="tanh",
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(output_shape, int):
            output_shape = (output_shape,)
        self.output_shape = tuple(int(d) for d in output_shape)
        if not self.output_shape or min(self.output_shape) < 1:
            raise ValueError(f"output_shape must be positive sizes, got {output_shape!r}.")
        self.hidden_units = tuple(int(u) for u in hidden_units)
        self.activation = activation
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.hidden_layers = dense_stack(
            self.hidden_units, activation, kernel_initializer, bias_initializer, "hidden"
        )
        self.heads = {
            name: keras.layers.Dense(
                math.prod(self.output_shape),
                kernel_initializer=keras.initializers.get(kernel_initializer),
                bias_initializer=keras.initializers.get(bias_initializer),
                name=name,
            )
            for name in self.head_names
        }

    @property
    def event_ndims(self):
        return len(self.output_shape)

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.hidden_layers:
            layer.build(shape)
            shape = shape[:-1] + (layer.units,)
        for head in self.heads.values():
            head.build(shape)

    def _heads(self, z):
        h = z
        for layer in self.hidden_layers:
            h = layer(h)
        lead = ops.shape(z)[:-1]
        return {
            name: ops.reshape(head(h), (*lead, *self.output_shape))
            for name, head in self.heads.items()
        }

    def log_likelihood(self, x, outputs):
        """log p(x|z) summed over the event dimensions; shape = the leading dims of outputs."""
        return self.distribution(outputs).log_prob(x)

    def get_config(self):
        config = super().get_config()
        config.update(
            output_shape=list(self.output_shape),
            hidden_units=list(self.hidden_units),
            activation=self.activation,
            kernel_initializer=serialize_initializer(self.kernel_initializer),
            bias_initializer=serialize_initializer(self.bias_initializer),
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("kernel_initializer", "bias_initializer"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_aevb")
class BernoulliDecoder(_MLPDecoder):
    """Bernoulli MLP decoder for binary data (paper App. C.1); returns `logits`.

        log p(x|z) = sum_i x_i log y_i + (1 - x_i) log(1 - y_i)
        y = sigmoid(W5 tanh(W4 z + b4) + b5)

    computed from the logits (`tfd.Bernoulli(logits=...)`, i.e. -softplus form), which stays finite
    for logits of any size, unlike cross-entropy on probabilities.

    Example:
    >>> decoder = BernoulliDecoder((28, 28), hidden_units=(16,))
    >>> tuple(decoder(np.zeros((3, 2), "float32")).shape)
    (3, 28, 28)

    Reference: Kingma & Welling, arXiv:1312.6114, App. C.1.
    """

    head_names = ("logits",)
    likelihood = "bernoulli"
    # log p(x|z) is the log of a probability (x binary), and for x in [0, 1] each pixel's
    # x l - softplus(l) is at most x log x + (1 - x) log(1 - x) <= 0: no bound can exceed 0.
    max_log_likelihood = 0.0

    def __init__(self, output_shape, hidden_units=(500,), activation="tanh", **kwargs):
        super().__init__(output_shape, hidden_units, activation, **kwargs)

    def call(self, z):
        return self._heads(z)["logits"]

    def compute_output_spec(self, z):
        return keras.KerasTensor((*z.shape[:-1], *self.output_shape), dtype=self.compute_dtype)

    def log_likelihood(self, x, logits):
        """log p(x|z) = sum_i x_i l_i - softplus(l_i), summed over the event dimensions.

        The same value as `self.distribution(logits).log_prob(x)` (TFP computes
        -sigmoid_cross_entropy_with_logits, which is this expression), written out because it
        is 3 element-wise ops and their gradients against TFP's ~8 (the time it saves:
        benchmarks/BENCHMARKS.md, "Where a step's time goes without XLA"). Finite for logits of
        any size (softplus is stable).
        """
        axes = tuple(range(-self.event_ndims, 0))
        x = ops.cast(x, logits.dtype)
        return ops.sum(x * logits - ops.softplus(logits), axis=axes)

    def distribution(self, logits):
        return tfd.Independent(
            tfd.Bernoulli(logits=logits, dtype=logits.dtype),
            reinterpreted_batch_ndims=self.event_ndims,
        )

    def mean(self, logits):
        """Pixel probabilities y = sigmoid(logits)."""
        return ops.sigmoid(logits)

    def noise(self, shape, seed, dtype="float32"):
        """u ~ U(0, 1) of `shape` (a batch of events), from a stateless seed: the noise that
        `sample_given_noise` turns into x ~ p(x|z)."""
        return tf.random.stateless_uniform(shape, seed, dtype=dtype)

    def sample_given_noise(self, logits, u):
        """x ~ p(x|z) from u = `noise(...)`: x = 1 where u < sigmoid(logits), as TFP's
        Bernoulli draws it (the same seed gives the same x as `distribution(logits).sample`)."""
        return ops.cast(u < ops.sigmoid(logits), logits.dtype)

    # The support of p(x|z): data outside it are refused (keras_aevb.inputs).
    data_range = (0.0, 1.0)

    def range_message(self, low, high):
        """The error for data with values in [low, high], outside `data_range`."""
        return (
            f"BernoulliDecoder needs data in [0, 1], got values in [{low:g}, {high:g}]: "
            "scale the images (e.g. divide 8-bit pixels by 255) and " + BINARIZATION_HINT + "."
        )

    def check_data(self, x):
        """Refuses values outside [0, 1]; warns (returns a message) for grey values."""
        low, high = float(np.min(x)), float(np.max(x))
        if low < 0.0 or high > 1.0:
            raise ValueError(self.range_message(low, high))
        if np.any((x != 0.0) & (x != 1.0)):
            return (
                "Grey (non-binary) values fed to a BernoulliDecoder: the bound is then not a "
                "log-likelihood of binary data and is not comparable with the paper's numbers; "
                + BINARIZATION_HINT
                + "."
            )
        return None


# log sigma^2 of the Gaussian decoder is softly bounded (DESIGN 5): on continuous data the bound
# grows without limit as a pixel's variance shrinks towards 0 on pixels the model fits exactly.
# exp(-9) gives sigma = 0.011, about 3 grey levels of an 8-bit image scaled to [0, 1], well below
# the noise of real images; sigma^2 = exp(3) is far above any variance in [0, 1].
X_LOG_VAR_BOUNDS = (-9.0, 3.0)


@keras.saving.register_keras_serializable(package="keras_aevb")
class GaussianDecoder(_MLPDecoder):
    """Gaussian MLP decoder with learned per-pixel variance for continuous data (App. C.2).

        h = tanh(W3 z + b3),  x_mean = sigmoid(W4 h + b4),  x_log_var = W5 h + b5 (soft-bounded)
        log p(x|z) = sum_i log N(x_i; x_mean_i, exp(x_log_var_i))

    `x_mean` goes through a sigmoid because the data are scaled to (0, 1) (paper section 5, Frey
    Face). `x_log_var` is bounded to `X_LOG_VAR_BOUNDS` (reason at its definition).

    Example:
    >>> decoder = GaussianDecoder((28, 20), hidden_units=(16,))
    >>> out = decoder(np.zeros((3, 2), "float32"))
    >>> tuple(out["x_mean"].shape), tuple(out["x_log_var"].shape)
    ((3, 28, 20), (3, 28, 20))

    Reference: Kingma & Welling, arXiv:1312.6114, App. C.2.
    """

    head_names = ("x_mean", "x_log_var")
    likelihood = "gaussian"

    @property
    def max_log_likelihood(self):
        """The largest log p(x|z): every pixel's density is at most that of N(0; 0, sigma^2) at
        the smallest variance `X_LOG_VAR_BOUNDS` allows (the soft clip's floor, a hair below
        its lower bound): 3.58 nats per pixel, e.g. 2005 nats for a 28 x 20 Frey Face frame."""
        low, high = X_LOG_VAR_BOUNDS
        floor = low - math.log1p(math.exp(low - high))  # soft_clip(-inf, low, high)
        per_pixel = -0.5 * math.log(2.0 * math.pi) - 0.5 * floor
        return math.prod(self.output_shape) * per_pixel

    def __init__(self, output_shape, hidden_units=(200,), activation="tanh", **kwargs):
        super().__init__(output_shape, hidden_units, activation, **kwargs)

    def call(self, z):
        heads = self._heads(z)
        return {
            "x_mean": ops.sigmoid(heads["x_mean"]),
            "x_log_var": soft_clip(heads["x_log_var"], *X_LOG_VAR_BOUNDS),
        }

    def compute_output_spec(self, z):
        shape = (*z.shape[:-1], *self.output_shape)
        return {
            name: keras.KerasTensor(shape, dtype=self.compute_dtype) for name in self.head_names
        }

    def distribution(self, outputs):
        return tfd.Independent(
            tfd.Normal(loc=outputs["x_mean"], scale=ops.exp(0.5 * outputs["x_log_var"])),
            reinterpreted_batch_ndims=self.event_ndims,
        )

    def mean(self, outputs):
        return outputs["x_mean"]

    def noise(self, shape, seed, dtype="float32"):
        """eps ~ N(0, I) of `shape` (a batch of events), from a stateless seed."""
        return tf.random.stateless_normal(shape, seed, dtype=dtype)

    def sample_given_noise(self, outputs, eps):
        """x ~ p(x|z) from eps = `noise(...)`: x = mu + sigma * eps, as TFP's Normal draws it."""
        return eps * ops.exp(0.5 * outputs["x_log_var"]) + outputs["x_mean"]

    # A density on the real line: any finite value can be scored (data outside [0, 1] only
    # draw a warning from check_data).
    data_range = None

    def check_data(self, x):
        low, high = float(np.min(x)), float(np.max(x))
        if low < 0.0 or high > 1.0:
            return (
                f"GaussianDecoder data lie in [{low:g}, {high:g}], but its mean is a sigmoid in "
                "(0, 1): scale the data to [0, 1] (paper section 5) for a meaningful bound."
            )
        if np.all((x == 0.0) | (x == 1.0)):
            return (
                "Binary data fed to a GaussianDecoder: its bound grows without limit on binary "
                "pixels (a density, not a probability); use a BernoulliDecoder or "
                "binarization='none'."
            )
        return None
