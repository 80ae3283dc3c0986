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
