"""L > 1 (`num_samples`) end to end (issue 13, item 9).

L is the number of samples of z in the bound; a deterministic reconstruction is one point per
example, `[batch, *event_shape]`, for every L: through `call`, `reconstruct`, `predict`, the
export's `serving_default`, the picture commands and `keras-aevb train`'s TensorBoard images.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_aevb

EVENT = (4, 6)


def tiny_model(num_samples, seed=0):
    init = keras.initializers.RandomNormal(stddev=0.3, seed=seed)
    encoder = keras_aevb.MLPEncoder(2, (8,), kernel_initializer=init, bias_initializer=init)
    decoder = keras_aevb.BernoulliDecoder(EVENT, (8,), kernel_initializer=init)
    return keras_aevb.AEVB(encoder, decoder, num_samples=num_samples, seed=seed)


@pytest.mark.parametrize("num_samples", [1, 2, 5])
def test_deterministic_reconstructions_have_one_point_per_example(num_samples):
    x = (np.random.default_rng(0).random((7, *EVENT)) < 0.4).astype("float32")
    model = tiny_model(num_samples)
    model.compile(optimizer=keras_aevb.paper_optimizer(0.05))
    model.fit(x, batch_size=7, epochs=1, verbose=0)
    reference = tiny_model(1)
    reference.build()
    reference.set_weights(model.get_weights())
    expected = reference.reconstruct(x).numpy()  # L does not enter a deterministic output
    assert expected.shape == (7, *EVENT)
    for output in (model(x), model.reconstruct(x), model.predict(x, batch_size=3, verbose=0)):
        np.testing.assert_allclose(np.asarray(output), expected, rtol=1e-6, atol=1e-7)
    assert model(x, training=True).shape == (7, *EVENT)
    layer = model.posterior_layer
    assert layer(model.encode(x), deterministic=True).shape == (7, 2)
    assert layer(model.encode(x)).shape == ((7, 2) if num_samples == 1 else (num_samples, 7, 2))
    # The bound still averages L samples per example.
    assert model.elbo(x).shape == (7,)


def run_cli(*args, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", "keras_aevb", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


@pytest.mark.slow
def test_train_reconstruct_and_export_with_several_samples(tmp_path, mnist_dir):
    run = tmp_path / "run"
    result = run_cli(
        "train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--output", str(run),
        "--latent-dim", "2", "--hidden-units", "8", "--epochs", "2", "--num-samples", "2",
        "--learning-rate", "0.05", "--train-examples", "200", "--test-examples", "50",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (run / "model.keras").is_file()
    images = list((run / "logs" / "images").glob("events.*"))
    assert images, "the TensorBoard image grids were written"
    out = tmp_path / "recon.png"
    result = run_cli(
        "reconstruct", str(run / "model.keras"), "--dataset", "mnist", "--data-dir",
        str(mnist_dir), "--out", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = keras.saving.load_model(run / "model.keras")
    assert model.num_samples == 2
    from keras_aevb.export import export_saved_model

    version = export_saved_model(model, tmp_path / "served")
    import tensorflow as tf

    loaded = tf.saved_model.load(str(version))
    x = np.zeros((3, 28, 28), np.float32)
    outputs = loaded.signatures["serving_default"](x=tf.constant(x))
    assert outputs["reconstruction"].shape == (3, 28, 28)
    np.testing.assert_allclose(outputs["reconstruction"], model.reconstruct(x), atol=1e-6)


@pytest.mark.parametrize("bad", [1.5, 0, -2, "2", True])
def test_a_count_of_samples_that_is_not_a_positive_integer_is_refused_everywhere(bad, tmp_path):
    # int(1.5) == 1 and int("2") == 2: before, L was truncated or parsed without a word, and the
    # bound was estimated with a number of samples the caller never asked for.
    x = np.zeros((3, *EVENT), "float32")
    model = tiny_model(1)
    model.build((None, *EVENT))
    calls = {
        "AEVB": lambda: tiny_model(bad),
        "ReparameterizedPosterior": lambda: keras_aevb.ReparameterizedPosterior(num_samples=bad),
        "elbo": lambda: model.elbo(x, num_samples=bad),
        "sample": lambda: model.sample(bad, seed=0),
        "log_likelihood": lambda: keras_aevb.log_likelihood(model, x, num_samples=bad),
        "export": lambda: keras_aevb.export_saved_model(
            model, str(tmp_path / "m"), score_num_samples=bad
        ),
    }
    for where, call in calls.items():
        with pytest.raises(ValueError, match=r"num_samples must be a positive integer"):
            call()
            pytest.fail(f"{where} accepted num_samples={bad!r}")
