"""`FusedAdagrad`: the paper's Adagrad (Duchi et al.) in TensorFlow's fused kernel (issue 9)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_aevb


def reference_adagrad(theta, gradients, learning_rate, epsilon, initial=0.0):
    """Duchi et al. in float64: a += g^2; theta -= lr * g / (sqrt(a) + eps)."""
    theta = np.asarray(theta, np.float64).copy()
    accumulator = np.full_like(theta, initial)
    for g in gradients:
        accumulator += g**2
        theta -= learning_rate * g / (np.sqrt(accumulator) + epsilon)
    return theta, accumulator


@pytest.mark.parametrize("in_function", [False, True], ids=["eager", "tf_function"])
def test_fused_adagrad_is_duchi_adagrad(in_function):
    rng = np.random.default_rng(0)
    theta0 = rng.normal(size=(3, 4)).astype(np.float32)
    gradients = [rng.normal(scale=s, size=(3, 4)).astype(np.float32) for s in (1e-3, 1.0, 5.0)]
    variable = keras.Variable(theta0)
    optimizer = keras_aevb.FusedAdagrad(learning_rate=0.1, epsilon=1e-3)

    optimizer.build([variable])  # variables are created outside any tf.function

    def apply(g):
        optimizer.apply([tf.convert_to_tensor(g)], [variable])

    if in_function:
        apply = tf.function(apply)
    for g in gradients:
        apply(g)
    expected, accumulator = reference_adagrad(theta0, gradients, 0.1, 1e-3)
    # Tolerance: float32 arithmetic of three updates against the float64 reference.
    np.testing.assert_allclose(np.asarray(variable), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(optimizer.variables[-1]), accumulator, rtol=1e-5)
    # epsilon is added outside the square root: Keras's Adagrad (inside) differs measurably
    # at this epsilon, so the comparison above can tell the two apart.
    keras_theta = theta0.astype(np.float64).copy()
    acc = np.zeros_like(keras_theta)
    for g in gradients:
        acc += g**2
        keras_theta -= 0.1 * g / np.sqrt(acc + 1e-3)
    assert np.max(np.abs(keras_theta - expected)) > 1e-3


def test_unfused_fallback_is_the_same_update():
    rng = np.random.default_rng(1)
    theta0 = rng.normal(size=(5,)).astype(np.float32)
    gradients = [rng.normal(size=(5,)).astype(np.float32) for _ in range(3)]
    fused, unfused = keras.Variable(theta0), keras.Variable(theta0)
    a = keras_aevb.FusedAdagrad(learning_rate=0.05)
    b = keras_aevb.FusedAdagrad(learning_rate=0.05)
    b.build([unfused])
    for g in gradients:
        a.apply([tf.constant(g)], [fused])
        b._unfused_update_step(tf.constant(g), unfused, 0.05)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(unfused), rtol=1e-6)


def test_paper_optimizer_is_fused_adagrad_from_zero_and_round_trips():
    optimizer = keras_aevb.paper_optimizer(0.02)
    assert isinstance(optimizer, keras_aevb.FusedAdagrad)
    config = optimizer.get_config()
    assert config["initial_accumulator_value"] == 0.0 and config["epsilon"] == 1e-8
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is keras_aevb.FusedAdagrad
    assert restored.get_config() == config
