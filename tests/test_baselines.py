"""The paper's baselines: wake-sleep and Monte Carlo EM learn on tiny data, report AEVB's
metrics, save and load; MCEM's E-step samples the exact posterior of a linear-Gaussian model."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from linear_gaussian import LinearGaussianDecoder, PosteriorEncoder, linear_gaussian_problem

import keras_aevb
from keras_aevb.baselines import MCEM_MAX_EXAMPLES, MonteCarloEM, WakeSleep
from keras_aevb.marginal_likelihood import log_joint_fn
from keras_aevb.posterior import stateless_seed

EVENT = (6, 6)
BOUND = {"loss", "elbo", "reconstruction_log_likelihood", "kl"}


@pytest.fixture(scope="module")
def binary_data():
    """240 noisy copies of 4 binary 6x6 prototypes: a structure a 2-D latent space can learn."""
    rng = np.random.default_rng(0)
    prototypes = rng.random((4, *EVENT)) < 0.5
    x = prototypes[rng.integers(0, 4, 240)]
    return (x ^ (rng.random(x.shape) < 0.05)).astype(np.float32)


def _parts(seed=0):
    init = keras.initializers.GlorotUniform(seed=seed)
    return (
        keras_aevb.MLPEncoder(2, (16,), kernel_initializer=init),
        keras_aevb.BernoulliDecoder(EVENT, (16,), kernel_initializer=init),
    )


def _mean_elbo(model, x):
    # Fixed stateless seed and L = 20: before/after comparisons are not noise (< 0.1 nat).
    return float(np.mean(model.elbo(x, num_samples=20, seed=123)))


@pytest.fixture(scope="module")
def wake_sleep(binary_data):
    """Wake-sleep trained 10 epochs (100 steps) on the tiny data, shared by the tests below."""
    model = WakeSleep(*_parts(), seed=0)
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    before = _mean_elbo(model, binary_data)
    history = model.fit(
        binary_data, batch_size=24, epochs=10, verbose=0, validation_data=(binary_data,)
    ).history
    return model, history, before


def test_wake_sleep_improves_both_phases_and_reports_the_bound(wake_sleep, binary_data):
    model, history, before = wake_sleep
    after = _mean_elbo(model, binary_data)
    assert set(history) == BOUND | {"sleep_log_q"} | {f"val_{name}" for name in BOUND}
    # Wake phase: log p(x|z) with z ~ q rises from ~36 log 0.5 = -25 nats; a 5-nat rise of the
    # bound in 100 steps is far above the noise (measured: -27.1 -> -13.3).
    assert after > before + 5.0, (before, after)
    wake = history["reconstruction_log_likelihood"]
    assert wake[-1] > wake[0] + 5.0, wake
    # Sleep phase: 1/M sum log q(z|x) on the model's dreams rises (measured -3.2 -> -1.5 nats;
    # epoch means of 10 batches, each with noise ~0.3 nat).
    sleep = history["sleep_log_q"]
    assert sleep[-1] > sleep[0] + 0.8, sleep
    np.testing.assert_allclose(history["loss"], -np.asarray(history["elbo"]), rtol=1e-6)


def test_wake_sleep_steps_from_the_same_state_give_the_same_weights(binary_data):
    # The wake sample is held fixed, so no gradient waits for the encoder read that made it;
    # before the step ordered its update after that read, TensorFlow sometimes ran the
    # encoder's update first (2 to 5 of 12 identical models differed after one step).
    x = binary_data[:24]
    results = []
    for _ in range(8):
        model = WakeSleep(*_parts(), seed=0)
        model.compile(optimizer=keras.optimizers.SGD(0.1), steps_per_execution=1)
        model.build()
        model.fit(x, batch_size=24, epochs=1, verbose=0, shuffle=False)
        results.append([w.numpy() for w in model.trainable_variables])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


def test_wake_sleep_step_is_wake_gradient_on_theta_and_sleep_gradient_on_phi(binary_data):
    x = binary_data[:24]
    model = WakeSleep(*_parts(), seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.build()
    # A twin with the same weights and seed replays the step's random draws by hand.
    twin = WakeSleep(*_parts(), seed=0)
    twin.build()
    twin.set_weights(model.get_weights())
    theta, phi = twin.decoder.trainable_variables, twin.encoder.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        # Wake: z ~ q(z|x) (first draw of the posterior's generator), held fixed.
        z = tf.stop_gradient(twin.posterior_layer.sample(twin.encoder(x)))
        wake = tf.reduce_mean(twin.decoder.log_likelihood(x, twin.decoder(z)))
        # Sleep: z ~ p(z), x ~ p(x|z) (first two draws of the dream generator), held fixed.
        dream_z = twin.prior_distribution.sample(24, seed=stateless_seed(twin.dream_seed_generator))
        dream_x = twin.decoder.distribution(twin.decoder(dream_z)).sample(
            seed=stateless_seed(twin.dream_seed_generator)
        )
        q = twin.posterior_layer.distribution(twin.encoder(tf.stop_gradient(dream_x)))
        sleep = tf.reduce_mean(q.log_prob(dream_z))
    before = {id(v): v.numpy().copy() for v in model.trainable_variables}
    model.fit(x, batch_size=24, epochs=1, verbose=0, shuffle=False)
    # One SGD step of lr 0.1 ascends wake on theta and sleep on phi, nothing else: the
    # decoder's update is 0.1 * d wake / d theta, the encoder's 0.1 * d sleep / d phi (to
    # float32 rounding of the gradients: rtol 1e-3, atol 1e-6).
    for layer, variables, objective in (
        (model.decoder, theta, wake),
        (model.encoder, phi, sleep),
    ):
        gradients = tape.gradient(objective, variables)
        for v, g in zip(layer.trainable_variables, gradients, strict=True):
            update = v.numpy() - before[id(v)]
            np.testing.assert_allclose(
                update, 0.1 * g.numpy(), rtol=1e-3, atol=1e-6, err_msg=v.path
            )
    assert tape.gradient(wake, phi) == [None] * len(phi)


@pytest.fixture(scope="module")
def mcem(binary_data):
    """MCEM trained 12 epochs from a far too large HMC step size (3 for a posterior of width
    ~0.5), one training run shared by the tests below (each fit traces HMC anew: slow)."""
    model = MonteCarloEM(*_parts(), seed=0, initial_step_size=3.0)
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    before = _mean_elbo(model, binary_data)
    history = model.fit(
        binary_data, batch_size=24, epochs=12, verbose=0, validation_data=(binary_data,)
    ).history
    return model, history, before


def test_mcem_improves_its_objective_and_the_bound(mcem, binary_data):
    model, history, before = mcem
    after = _mean_elbo(model, binary_data)
    extras = {"log_joint", "acceptance_rate", "step_size"}
    assert set(history) == BOUND | extras | {f"val_{name}" for name in BOUND}
    # The M-step objective 1/M sum log p(x, z) at the E-step samples rises (measured ~-24 ->
    # ~-10.5 nats in 3 seeds); 5 nats is far beyond the epoch-to-epoch noise (~1 nat).
    joint = history["log_joint"]
    assert joint[-1] > joint[0] + 5.0, joint
    # And the recognition model's bound on the MCEM-trained decoder rises too (~-27 -> ~-12).
    assert after > before + 5.0, (before, after)
    assert model.chain_state.shape == (240, 2)


def test_mcem_step_size_adapts_towards_ninety_percent_acceptance(mcem):
    # The step size of 3 gives almost no acceptance at first: the adaptation must shrink it and
    # raise the acceptance towards 0.9 (measured in 3 seeds: 0.0 in epoch 1, 0.79-0.81 in
    # epoch 12; mean step size 1.9 -> 0.16-0.19).
    _, history, _ = mcem
    steps, accept = history["step_size"], history["acceptance_rate"]
    assert steps[-1] < 0.2 * steps[0], steps
    assert accept[0] < 0.3 and accept[-1] > 0.6, accept


def test_mcem_e_step_samples_the_exact_posterior():
    # 1000 chains on copies of one x of a 2-D linear-Gaussian model with a correlated posterior,
    # the decoder frozen (learning rate 0): after 30 E-steps from N(0, I) the chain states are
    # 1000 independent draws from p(z|x), known in closed form.
    problem = linear_gaussian_problem(seed=5, z_dim=2, num_examples=1, orthogonal=False)
    w, b, s = problem["w"], problem["b"], problem["noise_std"]
    model = MonteCarloEM(PosteriorEncoder(w, b, s), LinearGaussianDecoder(w, b, s), seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    x = np.repeat(problem["x"], 1000, axis=0)
    model.fit(x, batch_size=250, epochs=30, verbose=0)
    z = model.chain_state.numpy()
    mean, cov = problem["post_mean"][0], problem["post_cov"]
    # Mean: within 5 standard errors sqrt(var / 1000) per coordinate.
    assert np.all(np.abs(z.mean(0) - mean) < 5 * np.sqrt(np.diag(cov) / 1000)), (z.mean(0), mean)
    # Covariance: a sample covariance of 1000 draws has relative error ~sqrt(2 / 1000) = 0.045
    # on the variances; 0.2 is > 4 of those (and 0.2 of the scale on the correlation).
    np.testing.assert_allclose(
        np.cov(z.T), cov, rtol=0.2, atol=0.2 * np.sqrt(np.prod(np.diag(cov)))
    )


def test_mcem_refuses_big_or_unindexed_training_sets(mcem, binary_data):
    model = MonteCarloEM(*_parts(), seed=0)
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    too_many = np.zeros((MCEM_MAX_EXAMPLES + 1, *EVENT), np.float32)
    with pytest.raises(ValueError, match="at most 10000: it keeps one HMC chain per example"):
        model.fit(too_many, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="needs the whole training set as one array"):
        model.fit(tf.data.Dataset.from_tensor_slices(binary_data).batch(24), verbose=0)
    with pytest.raises(ValueError, match="takes no y"):
        model.fit(binary_data, binary_data, verbose=0)
    with pytest.raises(ValueError, match="at most 10000"):
        MonteCarloEM(*_parts(), num_examples=MCEM_MAX_EXAMPLES + 1)
    with pytest.raises(ValueError, match="holds HMC chains for 240 training examples but fit got"):
        mcem[0].fit(binary_data[:100], epochs=1, verbose=0)


def test_wake_sleep_save_and_load_round_trip(wake_sleep, binary_data, tmp_path):
    _check_round_trip(wake_sleep[0], binary_data, tmp_path)


def test_mcem_save_and_load_round_trip(mcem, binary_data, tmp_path):
    model = mcem[0]
    loaded = _check_round_trip(model, binary_data, tmp_path)
    np.testing.assert_array_equal(loaded.chain_state.numpy(), model.chain_state.numpy())
    np.testing.assert_array_equal(loaded.chain_step_size.numpy(), model.chain_step_size.numpy())
    assert loaded.num_examples == 240 and loaded.num_leapfrog_steps == 10
    # Training goes on after loading, on the same training set: one epoch with the decoder
    # held (step size 0), so the reported log_joint, the mean over the epoch's 4 equal batches
    # of 1/M sum log p(x_i, z_i) at each batch's E-step samples, is exactly the mean of
    # log p(x, z) over every example's chain state after the epoch (float32 sums of 240 terms
    # of ~10 nats: rtol 1e-5).
    loaded.compile(optimizer=keras.optimizers.SGD(0.0))
    before = loaded.chain_state.numpy()
    history = loaded.fit(binary_data, batch_size=60, epochs=1, verbose=0).history
    log_joint = log_joint_fn(loaded, binary_data)(loaded.chain_state).numpy()
    np.testing.assert_allclose(history["log_joint"][0], log_joint.mean(), rtol=1e-5)
    # The E-step moved every chain (HMC at the adapted ~0.8 acceptance: few stay put).
    assert np.mean(np.any(loaded.chain_state.numpy() != before, axis=1)) > 0.5


def _check_round_trip(model, x, tmp_path):
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(model)
    # Same weights, same stateless seed: the same bound to float32 rounding.
    np.testing.assert_allclose(
        loaded.elbo(x, num_samples=5, seed=7), model.elbo(x, num_samples=5, seed=7), rtol=1e-5
    )
    return loaded
