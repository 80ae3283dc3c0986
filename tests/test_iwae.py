"""Importance-weighted training (Burda et al., 2016) and DReG gradients (Tucker et al., 2018),
checked against a linear-Gaussian model whose log p(x) and posterior are exact."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from linear_gaussian import linear_gaussian_model, linear_gaussian_problem

import keras_aevb


def _linear_model(problem, k, mean_shift=0.0, log_var_shift=0.0):
    return linear_gaussian_model(
        problem, mean_shift, log_var_shift, estimator="iwae", num_samples=k
    )


def _bound(model, x, seed):
    terms = model.bound_terms(x, training=False, seed=tf.constant(seed, tf.int32))
    return terms["iwae_bound"].numpy().astype(np.float64), terms["elbo"].numpy()


def test_with_the_exact_posterior_every_k_gives_log_px():
    problem = linear_gaussian_problem(num_examples=6)
    for k in (1, 5, 50):
        bound, _ = _bound(_linear_model(problem, k), problem["x"], [k, 1])
        # Every importance weight equals p(x): exact up to float32 rounding of the densities.
        np.testing.assert_allclose(bound, problem["log_px"], rtol=0, atol=2e-4)


def test_with_a_shifted_posterior_the_bound_rises_with_k_towards_log_px():
    problem = linear_gaussian_problem(num_examples=6)
    means = {}
    for k in (1, 5, 50):
        model = _linear_model(problem, k, mean_shift=0.7, log_var_shift=-0.5)
        draws = np.stack([_bound(model, problem["x"], [seed, 2])[0] for seed in range(200)])
        means[k] = draws.mean(axis=0)
        standard_error = draws.std(axis=0, ddof=1) / np.sqrt(len(draws))
        # L_k <= log p(x): the mean over 200 draws is below it, up to 3 standard errors.
        assert np.all(means[k] <= problem["log_px"] + 3 * standard_error), k
    # L_1 < L_5 < L_50 (Burda et al., Theorem 1), per example; the gaps (measured 1.7-2.1 and
    # 1.5-1.8 nats here, L_50 still 1.9-2.3 below log p(x)) are many standard errors wide.
    assert np.all(means[1] < means[5]) and np.all(means[5] < means[50])
    assert np.all(problem["log_px"] - means[50] < problem["log_px"] - means[1])


def _mlp_model(gradient, k=5):
    init = keras.initializers.RandomNormal(stddev=0.5, seed=0)
    model = keras_aevb.AEVB(
        keras_aevb.MLPEncoder(2, (8,), kernel_initializer=init, bias_initializer=init),
        keras_aevb.BernoulliDecoder((10,), (8,), kernel_initializer=init, bias_initializer=init),
        estimator="iwae",
        num_samples=k,
        gradient=gradient,
        seed=0,
    )
    model.build((None, 10))
    return model


def test_the_dreg_gradient_has_the_iwae_gradients_mean_and_less_variance():
    x = (np.random.default_rng(0).random((16, 10)) < 0.4).astype(np.float32)
    model = _mlp_model("dreg", k=5)
    variables = model.encoder.trainable_variables

    @tf.function
    def gradients(eps):
        with tf.GradientTape(persistent=True) as tape:
            terms = model.bound_terms(x, training=True, eps=eps)
            iwae = tf.reduce_mean(terms["iwae_bound"])
            dreg = tf.reduce_mean(terms["dreg_surrogate"])
        flat = [
            tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(t, variables)], 0)
            for t in (iwae, dreg)
        ]
        return flat

    draws = 600
    iwae, dreg = [], []
    for i in range(draws):
        eps = tf.random.stateless_normal((5, 16, 2), seed=[i, 7])
        g_iwae, g_dreg = gradients(eps)
        iwae.append(g_iwae.numpy())
        dreg.append(g_dreg.numpy())
    iwae, dreg = np.stack(iwae), np.stack(dreg)
    difference = iwae.mean(axis=0) - dreg.mean(axis=0)
    # Both are unbiased for grad_phi L_5: the difference of the means is judged against its
    # standard error, sqrt((var_iwae + var_dreg) / draws), summed over the weights.
    standard_error = np.sqrt((iwae.var(axis=0, ddof=1) + dreg.var(axis=0, ddof=1)).sum() / draws)
    assert np.linalg.norm(difference) < 4 * standard_error
    # DReG removes the score-function term: less variance (measured 3.9x less here).
    assert dreg.var(axis=0).sum() < iwae.var(axis=0).sum()


@pytest.mark.parametrize("gradient", ["reparameterization", "dreg"])
def test_iwae_training_reports_both_bounds_and_round_trips(tmp_path, gradient):
    x = (np.random.default_rng(1).random((200, 10)) < 0.4).astype(np.float32)
    model = _mlp_model(gradient)
    model.compile(optimizer=keras_aevb.paper_optimizer(0.05))
    logs = model.fit(x, batch_size=20, epochs=3, verbose=0).history
    assert set(logs) >= {"iwae_bound", "elbo", "loss", "kl", "reconstruction_log_likelihood"}
    # The objective is L_5, the loss its negative; L_5 >= ELBO (the same draws: per example,
    # log mean w >= mean log w, Jensen).
    np.testing.assert_allclose(logs["loss"], -np.asarray(logs["iwae_bound"]), rtol=1e-6)
    assert all(a >= b for a, b in zip(logs["iwae_bound"], logs["elbo"], strict=True))
    assert logs["iwae_bound"][-1] > logs["iwae_bound"][0]
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert (loaded.estimator, loaded.gradient, loaded.num_samples) == ("iwae", gradient, 5)


def test_dreg_and_kl_settings_are_checked():
    with pytest.raises(ValueError, match="gradient='dreg' is the doubly-reparameterized"):
        keras_aevb.paper_model("mnist", 2, hidden_units=8, gradient="dreg")
    with pytest.raises(ValueError, match="estimator='iwae' trains on the importance-weighted"):
        keras_aevb.paper_model("mnist", 2, hidden_units=8, estimator="iwae", kl_weight=0.5)


def test_the_command_line_trains_on_the_iwae_bound(tmp_path, mnist_dir, capsys):
    import json

    from keras_aevb.cli import main

    argv = ["train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--latent-dim", "2"]
    argv += ["--hidden-units", "16", "--max-examples", "300", "--learning-rate", "0.05"]
    argv += ["--no-tensorboard", "--verbose", "0", "--estimator", "iwae", "--num-samples", "3"]
    run_dir = tmp_path / "run"
    assert main([*argv, "--gradient", "dreg", "--output", str(run_dir)]) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["estimator"], config["gradient"], config["num_samples"]) == ("iwae", "dreg", 3)
    loaded = keras.saving.load_model(run_dir / "model.keras", compile=False)
    assert (loaded.estimator, loaded.gradient) == ("iwae", "dreg")
    capsys.readouterr()
    bad = [*argv, "--method", "wake_sleep", "--output", str(tmp_path / "ws")]
    assert main(bad) == 2
    assert "--estimator iwae and --gradient dreg are AEVB's objectives" in capsys.readouterr().err
