"""embed, interpolate and traverse: the latent tools, checked against decode() of the latent
points they promise (golden values computed independently in NumPy)."""

import keras
import numpy as np
import pytest

import keras_aevb


@pytest.fixture(scope="module")
def model():
    init = keras.initializers.RandomNormal(stddev=0.5, seed=0)
    model = keras_aevb.AEVB(
        keras_aevb.MLPEncoder(3, (16,), kernel_initializer=init, bias_initializer=init),
        keras_aevb.BernoulliDecoder((4, 3), (16,), kernel_initializer=init, bias_initializer=init),
        seed=0,
    )
    model.build((None, 4, 3))
    return model


def _x(n, seed=0):
    return (np.random.default_rng(seed).random((n, 4, 3)) < 0.5).astype(np.float32)


def test_embed_is_the_posterior_mean(model):
    x = _x(5)
    np.testing.assert_array_equal(model.embed(x), model.encode(x)["z_mean"])
    np.testing.assert_array_equal(model.embed(x.reshape(5, 12)), model.embed(x))  # flat input


def test_linear_interpolation_decodes_the_straight_line(model):
    x_a, x_b = _x(1, 1)[0], _x(1, 2)[0]
    path = np.asarray(model.interpolate(x_a, x_b, steps=5, method="linear"))
    assert path.shape == (5, 4, 3)
    z_a, z_b = np.asarray(model.embed(x_a[None]))[0], np.asarray(model.embed(x_b[None]))[0]
    t = np.linspace(0, 1, 5)[:, None]
    expected = np.asarray(model.decode((1 - t) * z_a + t * z_b))
    # The same decoder on the same points, one batched call against another: float32 rounding.
    np.testing.assert_allclose(path, expected, rtol=1e-5, atol=1e-6)


def test_spherical_interpolation_keeps_the_ends_and_follows_the_great_circle(model):
    x_a, x_b = _x(3, 3), _x(3, 4)
    paths = np.asarray(model.interpolate(x_a, x_b, steps=7))
    assert paths.shape == (3, 7, 4, 3)
    z_a, z_b = np.asarray(model.embed(x_a), np.float64), np.asarray(model.embed(x_b), np.float64)
    np.testing.assert_allclose(paths[:, 0], model.decode(z_a.astype("float32")), atol=1e-5)
    np.testing.assert_allclose(paths[:, -1], model.decode(z_b.astype("float32")), atol=1e-5)
    # Slerp in NumPy (float64) at t = 1/2 for the first pair.
    a, b = z_a[0], z_b[0]
    omega = np.arccos(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    t = 0.5
    mid = (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)
    np.testing.assert_allclose(paths[0, 3], model.decode(mid[None].astype("float32"))[0], atol=1e-5)
    with pytest.raises(ValueError, match="steps must be at least 2"):
        model.interpolate(x_a, x_b, steps=1)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        model.interpolate(x_a, x_b, steps=4.5)  # was a path of 4 points, without a word
    with pytest.raises(ValueError, match="as many examples"):
        model.interpolate(x_a, x_b[:2])


def test_spherical_interpolation_between_equal_codes_is_constant(model):
    x = _x(1, 5)[0]
    path = np.asarray(model.interpolate(x, x, steps=4))  # angle 0: no division by sin(0)
    assert np.all(np.isfinite(path))
    np.testing.assert_allclose(path, np.repeat(path[:1], 4, axis=0), atol=1e-6)


def test_traverse_moves_one_latent_dimension(model):
    x = _x(2, 6)
    values = [-2.0, 0.0, 2.0]
    grids = np.asarray(model.traverse(x, dim=1, values=values))
    assert grids.shape == (2, 3, 4, 3)
    z = np.asarray(model.embed(x))
    for j, value in enumerate(values):
        moved = z.copy()
        moved[:, 1] = value
        np.testing.assert_allclose(grids[:, j], model.decode(moved), rtol=1e-5, atol=1e-6)
    assert np.asarray(model.traverse(x[0], 0, values)).shape == (3, 4, 3)
    with pytest.raises(ValueError, match=r"dim must be in \[0, 3\)"):
        model.traverse(x, dim=3, values=values)
