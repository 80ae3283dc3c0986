"""The KL weight beta (fixed or scheduled per step) and free bits: the objective changes, the
reported bound does not, and the defaults train exactly as the paper's bound."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_aevb
from keras_aevb.model import AEVB
from keras_aevb.schedules import CyclicalAnnealing, LinearWarmup

EVENT = (6, 4)


def _x(n=120, seed=0):
    return (np.random.default_rng(seed).random((n, *EVENT)) < 0.4).astype(np.float32)


def _model(cls=AEVB, latent_dim=3, **kwargs):
    init = keras.initializers.RandomNormal(stddev=0.3, seed=0)
    model = cls(
        keras_aevb.MLPEncoder(latent_dim, (8,), kernel_initializer=init, bias_initializer=init),
        keras_aevb.BernoulliDecoder(EVENT, (8,), kernel_initializer=init, bias_initializer=init),
        seed=0,
        weight_decay=0.01,
        **kwargs,
    )
    model.build((None, *EVENT))
    return model


class _BoundObjective(AEVB):
    """The objective before kl_weight existed: the bound itself."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective.per_example = lambda terms, *args, **kwargs: terms["elbo"]


@pytest.mark.parametrize("steps_per_execution", [1, None])
def test_the_defaults_train_bit_identically_to_the_bound(steps_per_execution):
    x = _x()
    weights = []
    for cls in (AEVB, _BoundObjective):
        model = _model(cls)
        kwargs = {} if steps_per_execution is None else {"steps_per_execution": 1}
        model.compile(optimizer=keras_aevb.paper_optimizer(0.05), **kwargs)
        logs = model.fit(x, batch_size=20, epochs=2, verbose=0, shuffle=False).history
        weights.append([w.numpy() for w in model.trainable_variables])
        assert logs["loss"] == [-e for e in logs["elbo"]]
    for a, b in zip(*weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_schedule_gives_every_step_its_own_weight_in_xla_blocks_too():
    schedule = LinearWarmup(7, start=0.1, end=0.9)
    np.testing.assert_allclose(
        [float(schedule(t)) for t in (0, 3, 7, 50)], [0.1, 0.1 + 0.8 * 3 / 7, 0.9, 0.9], rtol=1e-6
    )
    cyclical = CyclicalAnnealing(10, ramp_fraction=0.5)
    np.testing.assert_allclose(
        [float(cyclical(t)) for t in (0, 2, 5, 9, 10, 12)], [0, 0.4, 1, 1, 0, 0.4], atol=1e-6
    )
    x = _x()
    seen, weights = [], []
    for steps_per_execution in (1, None):
        model = _model(kl_weight=schedule)
        kwargs = {} if steps_per_execution is None else {"steps_per_execution": 1}
        model.compile(optimizer=keras_aevb.paper_optimizer(0.05), **kwargs)
        betas = []

        def record_beta(batch, logs, model=model, betas=betas):
            betas.append(float(model.kl_weight.numpy()))

        record = keras.callbacks.LambdaCallback(on_train_batch_end=record_beta)
        model.fit(x, batch_size=10, epochs=1, verbose=0, shuffle=False, callbacks=[record])
        seen.append(betas)
        weights.append([w.numpy() for w in model.trainable_variables])
    # One step per execution: the weight of each of the 12 steps is the schedule's value.
    np.testing.assert_allclose(seen[0], [float(schedule(t)) for t in range(12)], rtol=1e-6)
    # Many steps per execution (XLA blocks): the same per-step weights, so the same training.
    for a, b in zip(*weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_beta_changes_the_objective_and_not_the_reported_bound():
    x = _x(40)
    model = _model(kl_weight=0.25)
    model.compile(optimizer=keras_aevb.paper_optimizer(0.05))
    logs = model.evaluate(x, batch_size=40, verbose=0, return_dict=True)
    # Same draws in both: the generator state is restored between the two evaluations.
    terms = logs["reconstruction_log_likelihood"], logs["kl"]
    np.testing.assert_allclose(logs["elbo"], terms[0] - terms[1], rtol=1e-5)
    np.testing.assert_allclose(logs["loss"], -(terms[0] - 0.25 * terms[1]), rtol=1e-5)
    model.kl_weight.assign(0.5)  # a callback's way: no retracing needed
    logs = model.evaluate(x, batch_size=40, verbose=0, return_dict=True)
    terms = logs["reconstruction_log_likelihood"], logs["kl"]
    np.testing.assert_allclose(logs["loss"], -(terms[0] - 0.5 * terms[1]), rtol=1e-5)


def test_free_bits_stop_the_kl_gradient_of_dimensions_below_the_floor():
    model = _model(latent_dim=4, free_bits=0.0)
    x = _x(50)
    eps = tf.random.stateless_normal((1, 50, 4), seed=[1, 2])
    # free_bits = 0: the per-dimension KL is not even computed.
    assert "kl_per_dimension" not in model.bound_terms(x, training=True, eps=eps)
    kl_j = np.mean(
        keras_aevb.estimator.analytic_kl_per_dimension(
            model.posterior_layer.distribution(model.encode(x)), model.prior_distribution
        ),
        axis=0,
    )
    floor = float(np.median(kl_j))  # half the dimensions below it, half above
    below, above = kl_j < floor, kl_j > floor
    assert below.any() and above.any()
    model.objective.free_bits = floor
    heads = [model.encoder.heads[name].kernel for name in ("z_mean", "z_log_var")]

    def gradients(objective):
        with tf.GradientTape() as tape:
            terms = model.bound_terms(x, training=True, eps=eps)
            value = tf.reduce_mean(objective(terms))
        return [g.numpy() for g in tape.gradient(value, heads)]

    free = gradients(lambda t: model.objective.per_example(t, None, "float32"))
    reconstruction = gradients(lambda t: t["reconstruction_log_likelihood"])
    bound = gradients(lambda t: t["elbo"])
    for g_free, g_rec, g_bound in zip(free, reconstruction, bound, strict=True):
        # Below the floor the KL contributes no gradient: only the reconstruction's remains.
        np.testing.assert_allclose(g_free[:, below], g_rec[:, below], rtol=1e-5, atol=1e-7)
        # Above it the KL's gradient is the bound's (the floor is inactive there).
        np.testing.assert_allclose(g_free[:, above], g_bound[:, above], rtol=1e-5, atol=1e-7)
        assert np.abs(g_rec[:, below] - g_bound[:, below]).max() > 1e-4  # the KL had a gradient


def test_free_bits_need_the_analytic_kl_and_settings_are_checked():
    with pytest.raises(ValueError, match="free_bits needs the KL per latent dimension"):
        _model(estimator="monte_carlo", free_bits=0.5)
    with pytest.raises(ValueError, match="kl_weight must be a finite number >= 0"):
        _model(kl_weight=-1.0)
    with pytest.raises(ValueError, match="warmup_steps must be positive"):
        LinearWarmup(0)


def test_the_objective_settings_survive_a_keras_round_trip(tmp_path):
    model = _model(kl_weight=CyclicalAnnealing(100, ramp_fraction=0.25), free_bits=0.1)
    model.compile(optimizer=keras_aevb.paper_optimizer())
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.kl_schedule, CyclicalAnnealing)
    assert loaded.kl_schedule.get_config() == model.kl_schedule.get_config()
    assert loaded.free_bits == 0.1
    # Not a weight: the count of parameters and the weight files are as before.
    assert len(loaded.get_weights()) == len(_model().get_weights())
    assert json.loads(json.dumps(loaded.get_config()["kl_weight"]))["class_name"]


def test_the_command_line_records_the_objective_settings(tmp_path, mnist_dir):
    from keras_aevb.cli import main

    run_dir = tmp_path / "run"
    argv = ["train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--output", str(run_dir)]
    argv += ["--latent-dim", "2", "--hidden-units", "16", "--max-examples", "300"]
    argv += ["--learning-rate", "0.05", "--no-tensorboard", "--verbose", "0"]
    assert main(argv + ["--beta", "0.5", "--kl-warmup", "3", "--free-bits", "0.1"]) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["beta"], config["kl_warmup"], config["free_bits"]) == (0.5, 3, 0.1)
    loaded = keras.saving.load_model(run_dir / "model.keras", compile=False)
    assert loaded.kl_schedule.get_config() == {"warmup_steps": 3, "start": 0.0, "end": 0.5}
    assert (
        main(argv[:5] + [str(tmp_path / "ws"), *argv[6:], "--method", "wake_sleep", "--beta", "2"])
        == 2
    )
