"""Score-function and pathwise gradients estimate the same gradient; their variances differ."""

import keras
import numpy as np

import keras_aevb
from keras_aevb.diagnostics import gradient_statistics


def test_reparameterization_and_score_function_agree_in_mean_and_differ_in_variance():
    rng = np.random.default_rng(0)
    x = (rng.random((8, 5)) < 0.4).astype(np.float32)
    init = keras.initializers.RandomNormal(stddev=0.3, seed=0)
    model = keras_aevb.AEVB(
        keras_aevb.MLPEncoder(1, (4,), kernel_initializer=init, bias_initializer=init),
        keras_aevb.BernoulliDecoder((5,), (4,), kernel_initializer=init, bias_initializer=init),
        estimator="monte_carlo",
        seed=0,
    )
    model.build((None, 5))
    draws = 1500
    path = gradient_statistics(model, x, "reparameterization", num_samples=1, num_draws=draws)
    score = gradient_statistics(model, x, "score_function", num_samples=1, num_draws=draws)
    # Both are unbiased for grad_phi E_q[log p(x, z) - log q(z|x)]; the difference of the means
    # is judged coordinate-wise against its standard error, sqrt((var_a + var_b) / draws).
    diff = path["gradient_mean"] - score["gradient_mean"]
    se = np.sqrt((path["gradient_variance"] + score["gradient_variance"]) / draws)
    # Whole-vector check: the norm of the difference is within 4 standard errors of the total.
    assert np.linalg.norm(diff) < 4 * se, (np.linalg.norm(diff), se)
    # The paper's point: the pathwise gradient has far less variance (here over 10x).
    assert score["gradient_variance"] > 10 * path["gradient_variance"]
    # Same bound (estimator A in both): means within 5 standard errors.
    bound_se = np.hypot(path["bound_std"], score["bound_std"]) / np.sqrt(draws)
    assert abs(path["bound_mean"] - score["bound_mean"]) < 5 * bound_se


# ---------------------------------------------------------------- posterior collapse


def _model_with_dead_dimensions(dead=(1, 3), latent_dim=5, posterior="normal", seed=0):
    """A model whose encoder ignores x in the `dead` latent dimensions: the weights and biases
    into those dimensions' heads are zero, so there q(z_j|x) = N(0, 1) = p(z_j) for every x."""
    init = keras.initializers.RandomNormal(stddev=0.5, seed=seed)
    model = keras_aevb.AEVB(
        keras_aevb.MLPEncoder(
            latent_dim, (16,), posterior=posterior, kernel_initializer=init, bias_initializer=init
        ),
        keras_aevb.BernoulliDecoder((12,), (16,), kernel_initializer=init, bias_initializer=init),
        posterior=posterior,
        seed=seed,
    )
    model.build((None, 12))
    for head in model.encoder.heads.values():
        kernel, bias = (np.array(w) for w in head.get_weights())
        kernel[:, list(dead)] = 0.0
        bias[list(dead)] = 0.0
        head.set_weights([kernel, bias])
    return model


def _data(n=400, seed=1):
    return (np.random.default_rng(seed).random((n, 12)) < 0.5).astype(np.float32)


def test_active_units_finds_exactly_the_dead_dimensions():
    from keras_aevb.diagnostics import active_units

    model = _model_with_dead_dimensions(dead=(1, 3))
    result = active_units(model, _data())
    assert result.count == 3
    np.testing.assert_array_equal(result.mask, [True, False, True, False, True])
    # The dead dimensions' posterior mean is exactly 0 for every input: variance exactly 0.
    assert result.variance[1] == 0.0 and result.variance[3] == 0.0
    assert min(result.variance[[0, 2, 4]]) > 0.01


def test_kl_per_dimension_is_zero_for_dead_dimensions_and_sums_to_the_bounds_kl():
    from keras_aevb.diagnostics import kl_per_dimension

    model = _model_with_dead_dimensions(dead=(1, 3))
    x = _data()
    kl = kl_per_dimension(model, x)
    assert kl.shape == (5,)
    assert kl[1] == 0.0 and kl[3] == 0.0  # N(0, 1) against N(0, 1): exactly 0 in closed form
    assert min(kl[[0, 2, 4]]) > 1e-3
    # Summed over dimensions it is the bound's KL term (estimator B), averaged over x; float32
    # sums in a different order: 1e-5 relative.
    terms = model.bound_terms(x, training=False)
    np.testing.assert_allclose(kl.sum(), np.mean(terms["kl"]), rtol=1e-5)


def test_kl_per_dimension_without_a_closed_form_is_the_monte_carlo_mean():
    from keras_aevb.diagnostics import kl_per_dimension

    # Laplace q against the N(0, 1) prior: TFP has no closed-form KL, so it is estimated; every
    # dimension's is positive (a dead one compares Laplace(0, 1) with N(0, 1): not equal).
    model = _model_with_dead_dimensions(dead=(0,), posterior="laplace")
    kl = kl_per_dimension(model, _data(), num_samples=2000)
    assert np.all(kl > 0)
    assert np.all(np.isfinite(kl))


def test_mutual_information_is_zero_for_a_collapsed_encoder_and_bounded_by_log_n():
    from keras_aevb.diagnostics import mutual_information

    x = _data(n=300)
    collapsed = _model_with_dead_dimensions(dead=(0, 1, 2, 3, 4))
    # Every q(z|x_i) is the same N(0, I): log q(z|x) = log q(z) exactly.
    assert abs(mutual_information(collapsed, x)) < 1e-5
    live = _model_with_dead_dimensions(dead=())
    info = mutual_information(live, x)
    assert 0.1 < info <= np.log(len(x)) + 1e-6, info


def test_latent_report_is_plain_json():
    import json

    from keras_aevb.diagnostics import latent_report

    report = latent_report(_model_with_dead_dimensions(dead=(2,)), _data())
    assert report["active_units"] == 4 and report["latent_dim"] == 5
    assert report["kl_per_dimension"][2] == 0.0
    assert json.loads(json.dumps(report)) == report
