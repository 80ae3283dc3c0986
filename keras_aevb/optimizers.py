"""Adagrad as the paper uses it, in TensorFlow's fused kernel (paper section 5, Duchi et al.)."""

import keras
import tensorflow as tf
from keras import ops


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
    theta, g and the accumulator once and writes theta and the accumulator once. On the
    2-core CPU measured (benchmarks/BENCHMARKS.md) the optimizer was 24 % of a training step's
    op time with Keras's form and 11 % with this one.

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
