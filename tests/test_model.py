"""AEVB as a Keras model: fit/evaluate/predict, callbacks, XLA, saving, shapes, bad input."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_aevb

EVENT = (6, 6)


@pytest.fixture(scope="module")
def binary_data():
    """240 noisy copies of 4 binary 6x6 prototypes: a structure a 2-D latent space can learn."""
    rng = np.random.default_rng(0)
    prototypes = rng.random((4, *EVENT)) < 0.5
    x = prototypes[rng.integers(0, 4, 240)]
    flips = rng.random(x.shape) < 0.05
    return (x ^ flips).astype(np.float32)


def tiny_model(estimator="analytic_kl", seed=0, **kwargs):
    init = keras.initializers.GlorotUniform(seed=seed)
    encoder = keras_aevb.MLPEncoder(2, (16,), kernel_initializer=init)
    decoder = keras_aevb.BernoulliDecoder(EVENT, (16,), kernel_initializer=init)
    return keras_aevb.AEVB(encoder, decoder, estimator=estimator, seed=seed, **kwargs)


def _mean_elbo(model, x):
    # Fixed stateless seed and L = 20: the comparison before/after training is not noise.
    return float(np.mean(model.elbo(x, num_samples=20, seed=123)))


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("estimator", ["analytic_kl", "monte_carlo"])
def test_loss_falls_over_50_steps(binary_data, estimator, jit_compile):
    model = tiny_model(estimator)
    model.compile(optimizer=keras.optimizers.Adam(0.01), jit_compile=jit_compile)
    before = _mean_elbo(model, binary_data)
    model.fit(binary_data, batch_size=24, epochs=5, verbose=0)  # 50 steps
    after = _mean_elbo(model, binary_data)
    # From ~ -25 nats (36 pixels at p=0.5) to well below: a 5-nat rise is far above the noise
    # of a 20-sample, 240-example estimate (< 0.1 nat) and a trained model gains > 10.
    assert after > before + 5.0, (before, after)


def test_metrics_are_nats_per_datapoint_and_elbo_is_reconstruction_minus_one_kl(binary_data):
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    logs = model.evaluate(binary_data, batch_size=60, verbose=0, return_dict=True)
    assert sorted(logs) == ["elbo", "kl", "loss", "reconstruction_log_likelihood"]
    np.testing.assert_allclose(logs["loss"], -logs["elbo"], rtol=1e-6)
    np.testing.assert_allclose(
        logs["elbo"], logs["reconstruction_log_likelihood"] - logs["kl"], rtol=1e-5
    )
    # Per datapoint, summed over 36 pixels: an untrained decoder gives p ~ 0.5 per pixel, so
    # reconstruction ~ 36 log 0.5 = -24.95 nats (a batch-mean of per-pixel sums, not a mean).
    assert -27.0 < logs["reconstruction_log_likelihood"] < -23.0
    history = model.fit(
        binary_data, epochs=1, batch_size=60, verbose=0, validation_data=(binary_data,)
    ).history
    assert set(history) == {
        "loss", "elbo", "reconstruction_log_likelihood", "kl",
        "val_loss", "val_elbo", "val_reconstruction_log_likelihood", "val_kl",
    }  # fmt: skip


def test_tf_data_steps_per_execution_and_callbacks(binary_data, tmp_path):
    model = tiny_model()
    model.compile(optimizer=keras_aevb.paper_optimizer(0.05), steps_per_execution=4)
    dataset = tf.data.Dataset.from_tensor_slices(binary_data).batch(20)
    seen = []
    callbacks = [
        keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"), monitor="val_loss"),
        keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
        keras.callbacks.EarlyStopping(monitor="val_elbo", mode="max", patience=5),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", patience=1),
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: seen.append(logs["elbo"])),
    ]
    model.fit(dataset, epochs=3, validation_data=dataset, callbacks=callbacks, verbose=0)
    assert len(seen) == 3 and all(np.isfinite(seen))
    assert (tmp_path / "best.keras").exists()
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert len(lines) == 4 and "val_elbo" in lines[0]
    loaded = keras.saving.load_model(tmp_path / "best.keras")
    np.testing.assert_allclose(
        loaded.reconstruct(binary_data[:5]), model.reconstruct(binary_data[:5]), atol=1e-6
    )


@pytest.mark.parametrize("shape", [(6, 6), (6, 6, 1), (36,)])
def test_accepts_any_shape_with_the_right_number_of_values(binary_data, shape):
    model = tiny_model()
    model.compile(optimizer="adam")
    x = binary_data[:40].reshape((40, *shape))
    model.fit(x, epochs=1, batch_size=20, verbose=0)
    assert model.predict(x, verbose=0).shape == (40, *EVENT)
    assert model.elbo(x).shape == (40,)


def test_mismatched_shape_names_the_expected_shape(binary_data):
    model = tiny_model()
    model.compile(optimizer="adam")
    with pytest.raises(ValueError, match=r"Expected examples of shape \(6, 6\).*got \(5, 5\)"):
        model.fit(np.zeros((10, 5, 5), np.float32), verbose=0)


def test_bernoulli_data_outside_unit_interval_is_refused_and_grey_data_warn_once(binary_data):
    model = tiny_model()
    model.compile(optimizer="adam")
    with pytest.raises(ValueError, match=r"needs data in \[0, 1\], got values in \[0, 255\]"):
        model.fit(binary_data * 255, verbose=0)
    with pytest.raises(ValueError, match="NaN"):
        model.evaluate(np.full((4, *EVENT), np.nan, np.float32), verbose=0)
    grey = binary_data * 0.5 + 0.25
    with pytest.warns(UserWarning, match="binarization='dynamic'") as record:
        model.fit(grey, epochs=1, batch_size=60, verbose=0)
        model.fit(grey, epochs=1, batch_size=60, verbose=0)
    assert sum("Grey" in str(w.message) for w in record) == 1


def test_weight_decay_is_the_gaussian_weight_prior_per_datapoint(binary_data):
    # One SGD step from the same weights: the penalty adds weight_decay * theta to the gradient.
    lr, decay = 0.1, 0.5
    plain, decayed = tiny_model(seed=1), tiny_model(seed=1, weight_decay=decay)
    for model in (plain, decayed):
        model.compile(optimizer=keras.optimizers.SGD(lr))
        model.build((None, *EVENT))
    decayed.set_weights(plain.get_weights())
    before = [w.copy() for w in plain.get_weights()]
    x = binary_data[:20]
    plain.fit(x, batch_size=20, epochs=1, verbose=0, shuffle=False)
    decayed.fit(x, batch_size=20, epochs=1, verbose=0, shuffle=False)
    # Same seed, same noise: the updates differ by exactly lr * decay * theta (float32 rounding).
    for w0, wp, wd in zip(before, plain.get_weights(), decayed.get_weights(), strict=True):
        np.testing.assert_allclose(wp - wd, lr * decay * w0, atol=1e-5)


def test_saving_round_trips_every_layer_and_the_model(binary_data, tmp_path):
    model = tiny_model(estimator="monte_carlo", num_samples=3)
    model.compile(optimizer=keras_aevb.paper_optimizer(0.05))
    model.fit(binary_data, epochs=1, batch_size=60, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, keras_aevb.AEVB)
    assert loaded.get_config()["estimator"] == "monte_carlo" and loaded.num_samples == 3
    x = binary_data[:8]
    np.testing.assert_allclose(loaded.reconstruct(x), model.reconstruct(x), atol=1e-6)
    for name in ("z_mean", "z_log_var"):
        np.testing.assert_allclose(loaded.encode(x)[name], model.encode(x)[name], atol=1e-6)
    z = np.linspace(-2, 2, 10, dtype=np.float32).reshape(5, 2)
    np.testing.assert_allclose(loaded.decode(z), model.decode(z), atol=1e-6)
    np.testing.assert_allclose(loaded.sample(4, seed=3), model.sample(4, seed=3), atol=1e-6)
    # Training continues from the loaded optimizer state and noise stream: both models train
    # to the same weights (the same ops on the same data and noise: exact).
    for m in (model, loaded):
        m.fit(binary_data, epochs=1, batch_size=60, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # Each layer alone through .keras-free serialization.
    for layer in (model.encoder, model.decoder, model.posterior_layer):
        clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
        assert type(clone) is type(layer) and clone.get_config() == layer.get_config()


def test_paper_model_parameter_count_and_architecture():
    model = keras_aevb.paper_model("mnist", latent_dim=20)
    assert model.count_params() == keras_aevb.PAPER_MNIST_NUM_PARAMS == 815_824
    assert model.encoder.hidden_units == (500,) and model.decoder.hidden_units == (500,)
    assert model.estimator == "analytic_kl" and model.weight_decay == pytest.approx(1 / 60000)
    frey = keras_aevb.paper_model("frey_face", latent_dim=10)
    assert isinstance(frey.decoder, keras_aevb.GaussianDecoder) and frey.event_shape == (28, 20)
    # 560-200-10 (x2 heads) and 10-200-560 (x2 heads).
    assert frey.count_params() == (560 * 200 + 200) + 2 * (200 * 10 + 10) + (10 * 200 + 200) + 2 * (
        200 * 560 + 560
    )
    # One shared initializer must still give every weight tensor its own draw.
    firsts = [float(v.numpy().ravel()[0]) for v in model.trainable_variables]
    assert len(set(firsts)) == len(firsts)
    same_seed = keras_aevb.paper_model("mnist", latent_dim=20, seed=7).get_weights()
    again = keras_aevb.paper_model("mnist", latent_dim=20, seed=7).get_weights()
    for a, b in zip(same_seed, again, strict=True):
        np.testing.assert_array_equal(a, b)
    weights = model.encoder.hidden_layers[0].kernel.numpy()
    # N(0, 0.01^2) init: the sample std of 392k draws is within 1% of 0.01.
    assert abs(weights.std() - 0.01) < 1e-4
    with pytest.raises(ValueError, match="Unknown dataset 'cifar'"):
        keras_aevb.paper_model("cifar", 2)


def test_sample_and_methods_shapes_and_seeds():
    model = tiny_model()
    model.build((None, *EVENT))
    samples = model.sample(7, seed=5)
    assert samples.shape == (7, *EVENT)
    np.testing.assert_array_equal(samples, model.sample(7, seed=5))
    assert np.all((samples.numpy() >= 0) & (samples.numpy() <= 1))


def test_posterior_family_mismatch_is_refused():
    with pytest.raises(ValueError, match="encoder emits parameters of the 'normal' family"):
        keras_aevb.AEVB(keras_aevb.MLPEncoder(2, (4,)), keras_aevb.BernoulliDecoder((3,), (4,)),
                        posterior="nope")  # fmt: skip


@pytest.mark.parametrize("weight_decay", [-1.0, float("nan"), float("inf"), "1e-4", None])
def test_a_weight_decay_that_is_not_a_finite_number_at_least_0_is_refused(weight_decay):
    # NaN would turn every weight NaN at the first step; a negative precision is no prior.
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        tiny_model(weight_decay=weight_decay)


def test_non_tensorflow_backend_is_an_import_error_with_the_fix(monkeypatch):
    # A real process under KERAS_BACKEND=jax would need JAX installed; the check reads only
    # keras.backend.backend(), so patch that.
    from keras_aevb._backend import require_tensorflow_backend

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ImportError, match="using 'jax'.*KERAS_BACKEND=tensorflow"):
        require_tensorflow_backend()


@pytest.mark.parametrize("posterior", ["normal", "exponential", "gamma", "uniform"])
def test_the_estimator_is_resolved_on_a_valid_posterior(monkeypatch, posterior):
    # The estimator is chosen on a reference q(z|x) made from encoder outputs of 0 through the
    # family's constraints (keras_aevb.families.reference_params): a valid distribution, whose
    # samples have a finite log density (raw zeros as constrained parameters gave an Exponential
    # with rate 0).
    from keras_aevb import objective as objective_lib

    seen = []
    resolve = objective_lib.resolve_estimator

    def spy(estimator, reference, prior, pair_name):
        seen.append(reference)
        return resolve(estimator, reference, prior, pair_name)

    monkeypatch.setattr(objective_lib, "resolve_estimator", spy)
    encoder = keras_aevb.MLPEncoder(2, (4,), posterior=posterior)
    decoder = keras_aevb.BernoulliDecoder((4,), (4,))
    keras_aevb.AEVB(encoder, decoder, posterior=posterior, prior=posterior)
    (reference,) = seen
    z = reference.sample(seed=1)
    assert np.isfinite(reference.log_prob(z).numpy()).all()
