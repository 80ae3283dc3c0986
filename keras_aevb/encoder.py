"""The recognition model q_phi(z|x): a dense (MLP) encoder to the posterior's parameters."""

import math

import keras
from keras import ops

from keras_aevb.families import get_family

__all__ = [
    "dense_stack",
    "serialize_initializer",
    "MLPEncoder",
]


def dense_stack(hidden_units, activation, kernel_initializer, bias_initializer, prefix):
    return [
        keras.layers.Dense(
            units,
            activation=activation,
            kernel_initializer=keras.initializers.get(kernel_initializer),
            bias_initializer=keras.initializers.get(bias_initializer),
            name=f"{prefix}_{i}",
        )
        for i, units in enumerate(hidden_units)
    ]


def serialize_initializer(initializer):
    return keras.saving.serialize_keras_object(keras.initializers.get(initializer))


@keras.saving.register_keras_serializable(package="keras_aevb")
class MLPEncoder(keras.layers.Layer):
    """Dense encoder from x to the parameters of q(z|x) (paper App. C.2, the encoder's MLP).

    For the Gaussian posterior:  h = tanh(W3 x + b3),  mu = W4 h + b4,  log sigma^2 = W5 h + b5.
    `x` may have any event shape; it is flattened inside. The output is a dict with one
    `[batch, latent_dim]` tensor per parameter of the posterior family, already mapped to valid
    values (e.g. `{"z_mean", "z_log_var"}` for `posterior="normal"`).

    Args:
        latent_dim: J, the number of latent dimensions.
        hidden_units: sizes of the hidden layers (the paper uses one: 500 for MNIST, 200 for
            Frey Face).
        activation: hidden activation (the paper uses tanh).
        posterior: name of the posterior family in `keras_aevb.families.FAMILIES`.
        kernel_initializer, bias_initializer: Keras initializers (the paper draws every
            parameter from N(0, 0.01); `keras_aevb.paper_model` sets that).

    Example:
    >>> encoder = MLPEncoder(latent_dim=2, hidden_units=(16,))
    >>> params = encoder(np.zeros((3, 28, 28), "float32"))
    >>> sorted(params), tuple(params["z_mean"].shape)
    (['z_log_var', 'z_mean'], (3, 2))

    Reference: Kingma & Welling, Auto-Encoding Variational Bayes, arXiv:1312.6114, App. C.
    """

    def __init__(
        self,
        latent_dim,
        hidden_units=(500,),
        activation="tanh",
        posterior="normal",
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(latent_dim) < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}.")
        self.latent_dim = int(latent_dim)
        self.hidden_units = tuple(int(u) for u in hidden_units)
        self.activation = activation
        self.posterior = posterior
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.family = get_family(posterior)
        self.hidden_layers = dense_stack(
            self.hidden_units, activation, kernel_initializer, bias_initializer, "hidden"
        )
        # One linear head per parameter: each gets its own name in the weights and the export.
        self.heads = {
            name: keras.layers.Dense(
                self.latent_dim,
                kernel_initializer=keras.initializers.get(kernel_initializer),
                bias_initializer=keras.initializers.get(bias_initializer),
                name=name,
            )
            for name in self.family.param_names
        }

    def build(self, input_shape):
        features = math.prod(input_shape[1:])
        shape = (input_shape[0], features)
        for layer in self.hidden_layers:
            layer.build(shape)
            shape = (input_shape[0], layer.units)
        for name in self.family.param_names:
            self.heads[name].build(shape)

    def call(self, x):
        h = ops.reshape(x, (-1, math.prod(x.shape[1:])))
        for layer in self.hidden_layers:
            h = layer(h)
        return {
            name: self.family.constrain[name](self.heads[name](h))
            for name in self.family.param_names
        }

    def compute_output_spec(self, x):
        return {
            name: keras.KerasTensor((x.shape[0], self.latent_dim), dtype=self.compute_dtype)
            for name in self.family.param_names
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            latent_dim=self.latent_dim,
            hidden_units=list(self.hidden_units),
            activation=self.activation,
            posterior=self.posterior,
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
