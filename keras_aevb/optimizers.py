"""The optimizers of the protocols the package reproduces.

`FusedAdagrad`: Adagrad as Kingma & Welling use it (section 5; Duchi et al.), in TensorFlow's
fused kernel. `iwae_adam` and `IWAELearningRate`: Adam and its step-size schedule as Burda,
Grosse & Salakhutdinov train the importance-weighted autoencoder (2015, section 5).
"""

import keras
import tensorflow as tf
from keras import ops

__all__ = ["FusedAdagrad", "IWAELearningRate", "iwae_adam"]

# Burda et al.'s stages: 3^i passes over the data at the rate 1e-3 * 10^(-i/7), i = 0..7. Their
# released code (yburda/iwae, experiments.py) rounds each factor to one decimal:
# 1e-4 * round(10^(1 - i/7), 1).
IWAE_STAGE_FACTORS = tuple(round(10 ** (1 - i / 7), 1) / 10 for i in range(8))
IWAE_STAGE_PASSES = tuple(3**i for i in range(8))  # 3,280 passes in all


@keras.saving.register_keras_serializable(package="keras_aevb")
class FusedAdagrad(keras.optimizers.Adagrad):
    """Adagrad in Duchi et al.'s form, one fused TensorFlow kernel per weight.

        accumulator += g^2
        theta -= learning_rate * g / (sqrt(accumulator) + epsilon)

    with the squared-gradient sum starting at `initial_accumulator_value` = 0 (Duchi et al.,
    PyTorch's `Adagrad`; DESIGN.md section 9: Keras's default of 0.1 shrinks the paper's early
    steps by orders of magnitude).

    Why a subclass: `keras.optimizers.Adagrad` writes the update as 6 element-wise ops, each a
    pass over all 816k weights of the paper's MNIST model; `ResourceApplyAdagradV2` reads
    theta, g and the accumulator once and writes theta and the accumulator once (its share of
    a step's time, measured: benchmarks/BENCHMARKS.md, "Where a step's time goes without XLA").

    The one difference from `keras.optimizers.Adagrad` is where epsilon goes: Keras divides by
    sqrt(accumulator + epsilon), this kernel (like Duchi et al. and PyTorch) by
    sqrt(accumulator) + epsilon; with epsilon = 1e-8 they differ only while the accumulator is
    below ~1e-8. Where the fused kernel does not apply (variables mirrored by a `tf.distribute`
    strategy, sparse gradients) the same update runs as separate ops.

    Example:
    >>> optimizer = FusedAdagrad(learning_rate=0.02)
    >>> optimizer.get_config()["initial_accumulator_value"]
    0.0

    Reference: Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization", JMLR 2011; Kingma & Welling, arXiv:1312.6114, section 5.
    """

    def __init__(self, learning_rate=0.02, initial_accumulator_value=0.0, epsilon=1e-8, **kwargs):
        super().__init__(
            learning_rate=learning_rate,
            initial_accumulator_value=initial_accumulator_value,
            epsilon=epsilon,
            **kwargs,
        )

    def update_step(self, gradient, variable, learning_rate):
        accumulator = self._accumulators[self._get_variable_index(variable)]
        var = _tf_variable(variable)
        acc = _tf_variable(accumulator)
        if (
            isinstance(gradient, tf.IndexedSlices)
            or isinstance(var, tf.distribute.DistributedValues)
            or isinstance(acc, tf.distribute.DistributedValues)
        ):
            return self._unfused_update_step(gradient, variable, learning_rate)
        tf.raw_ops.ResourceApplyAdagradV2(
            var=var.handle,
            accum=acc.handle,
            lr=tf.cast(learning_rate, var.dtype),
            epsilon=tf.cast(self.epsilon, var.dtype),
            grad=tf.cast(gradient, var.dtype),
            use_locking=False,
        )
        return None

    def _unfused_update_step(self, gradient, variable, learning_rate):
        """The same update as separate ops, epsilon outside the square root."""
        accumulator = self._accumulators[self._get_variable_index(variable)]
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(tf.convert_to_tensor(gradient), variable.dtype)
        self.assign_add(accumulator, ops.square(gradient))
        step = ops.divide(ops.multiply(lr, gradient), ops.sqrt(accumulator) + self.epsilon)
        self.assign_sub(variable, step)
        return None


def _tf_variable(variable):
    """The `tf.Variable` behind a Keras variable (or the variable itself)."""
    return variable.value if isinstance(variable, keras.Variable) else variable


@keras.saving.register_keras_serializable(package="keras_aevb")
class IWAELearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """Burda et al.'s step-size schedule, per optimizer step t:

        rate(t) = initial_learning_rate * f_i   while   P_i <= t / steps_per_pass < P_{i+1},

    with P_i = 3^0 + ... + 3^(i-1) passes over the data and f_i = round(10^(1 - i/7), 1) / 10
    (1, 0.72, 0.52, ..., 0.1), i = 0..7; after the last stage (3,280 passes) the rate stays at
    its last value. Step t = 0 is the first.

    Reference: Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders",
    arXiv:1509.00519, section 5.
    """

    def __init__(self, steps_per_pass, initial_learning_rate=1e-3):
        if int(steps_per_pass) < 1:
            raise ValueError(f"steps_per_pass must be a positive integer, got {steps_per_pass!r}")
        self.steps_per_pass = int(steps_per_pass)
        self.initial_learning_rate = float(initial_learning_rate)
        ends, total = [], 0
        for passes in IWAE_STAGE_PASSES[:-1]:
            total += passes
            ends.append(total * self.steps_per_pass)
        self._stage_ends = tuple(ends)  # the first step of stages 1..7

    def __call__(self, step):
        step = ops.cast(step, "int64")
        stage = ops.sum(ops.cast(ops.greater_equal(step, self._stage_ends), "int32"))
        rates = ops.convert_to_tensor(
            [self.initial_learning_rate * f for f in IWAE_STAGE_FACTORS], dtype="float32"
        )
        return ops.take(rates, stage)

    def get_config(self):
        return {
            "steps_per_pass": self.steps_per_pass,
            "initial_learning_rate": self.initial_learning_rate,
        }


def iwae_adam(steps_per_pass, learning_rate=1e-3):
    """Adam as Burda et al. train the IWAE: beta_1 = 0.99, beta_2 = 0.999, epsilon = 1e-4
    (their released code's values; the paper's text says beta_1 = 0.9), on the schedule
    `IWAELearningRate(steps_per_pass, learning_rate)`.

    Keras's Adam is their update, bias corrections included; the one difference is that their
    code starts the second moments at 1 instead of 0 (smaller first steps).
    """
    return keras.optimizers.Adam(
        learning_rate=IWAELearningRate(steps_per_pass, learning_rate),
        beta_1=0.99,
        beta_2=0.999,
        epsilon=1e-4,
    )
