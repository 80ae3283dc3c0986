"""A linear-Gaussian model built from keras_aevb pieces, with log p(x) and p(z|x) in closed form.

    p(z) = N(0, I),   p(x|z) = N(W z + b, s^2 I)
    =>  p(x) = N(b, W W^T + s^2 I)                                   (exact, via SciPy)
        p(z|x) = N(S W^T (x - b) / s^2, S),  S = (I + W^T W / s^2)^-1

A diagonal Gaussian q can hold the exact posterior only if S is diagonal, i.e. if the columns of
W are orthogonal; `linear_gaussian_problem(orthogonal=True)` builds W that way.

Test-only API (reusable by any test module):

- `linear_gaussian_problem(seed, x_dim, z_dim, noise_std, num_examples, orthogonal)` -> dict with
  `w [x_dim, z_dim]`, `b [x_dim]`, `noise_std`, `x [n, x_dim]` (float32, drawn from p(x)),
  `log_px [n]` (float64, SciPy), `post_mean [n, z_dim]`, `post_cov [z_dim, z_dim]`.
- `LinearGaussianDecoder(w, b, noise_std)`: the decoder interface of keras_aevb (call(z) ->
  {"x_mean", "x_log_var"}, distribution, mean, log_likelihood, output_shape, likelihood,
  max_log_likelihood, check_data); W and b are trainable weights initialised to the given
  values.
- `PosteriorEncoder(w, b, noise_std, mean_shift=0.0, log_var_shift=0.0)`: returns the exact
  posterior's mean and log of the diagonal of S (exact for orthogonal W), optionally shifted to
  make a worse proposal.
- `linear_gaussian_model(problem, mean_shift=0.0, log_var_shift=0.0)` -> a built `AEVB`.
"""

import keras
import numpy as np
import scipy.stats
import tensorflow as tf
import tensorflow_probability as tfp
from keras import ops

import keras_aevb

tfd = tfp.distributions


def linear_gaussian_problem(
    seed=0, x_dim=5, z_dim=2, noise_std=0.5, num_examples=8, orthogonal=True
):
    """Draws W, b and data x ~ p(x); returns the closed forms (see module docstring)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(x_dim, z_dim))
    if orthogonal:
        # Orthogonal columns with distinct norms: W^T W is diagonal, so is the posterior S.
        q, _ = np.linalg.qr(w)
        w = q[:, :z_dim] * np.linspace(1.0, 2.0, z_dim)
    b = rng.normal(size=x_dim)
    marginal_cov = w @ w.T + noise_std**2 * np.eye(x_dim)
    x = rng.multivariate_normal(b, marginal_cov, size=num_examples).astype(np.float32)
    log_px = scipy.stats.multivariate_normal(b, marginal_cov).logpdf(x.astype(np.float64))
    post_cov = np.linalg.inv(np.eye(z_dim) + w.T @ w / noise_std**2)
    post_mean = (x - b) @ w @ post_cov.T / noise_std**2
    return {
        "w": w,
        "b": b,
        "noise_std": noise_std,
        "x": x,
        "log_px": np.atleast_1d(log_px),
        "post_mean": post_mean,
        "post_cov": post_cov,
    }


class LinearGaussianDecoder(keras.layers.Layer):
    """p(x|z) = N(W z + b, s^2 I) with the decoder interface of `keras_aevb.GaussianDecoder`."""

    likelihood = "gaussian"

    def __init__(self, w, b, noise_std, **kwargs):
        super().__init__(**kwargs)
        self.w_init = np.asarray(w, np.float32)
        self.b_init = np.asarray(b, np.float32)
        self.noise_std = float(noise_std)
        self.output_shape = (self.w_init.shape[0],)

    def build(self, input_shape):
        self.w = self.add_weight(
            shape=self.w_init.shape, initializer=keras.initializers.Constant(self.w_init), name="w"
        )
        self.b = self.add_weight(
            shape=self.b_init.shape, initializer=keras.initializers.Constant(self.b_init), name="b"
        )

    def call(self, z):
        x_mean = ops.einsum("...z,xz->...x", z, self.w) + self.b
        return {
            "x_mean": x_mean,
            "x_log_var": ops.full_like(x_mean, 2.0 * np.log(self.noise_std)),
        }

    def compute_output_spec(self, z):
        shape = (*z.shape[:-1], *self.output_shape)
        return {name: keras.KerasTensor(shape) for name in ("x_mean", "x_log_var")}

    def distribution(self, outputs):
        scale = ops.exp(0.5 * outputs["x_log_var"])
        return tfd.Independent(tfd.Normal(outputs["x_mean"], scale), reinterpreted_batch_ndims=1)

    def mean(self, outputs):
        return outputs["x_mean"]

    def log_likelihood(self, x, outputs):
        return self.distribution(outputs).log_prob(x)

    @property
    def max_log_likelihood(self):
        """log N(x; x, s^2 I) = -x_dim (log(2 pi) / 2 + log s): the density's peak."""
        return -self.output_shape[0] * (0.5 * np.log(2.0 * np.pi) + np.log(self.noise_std))

    def check_data(self, x):
        return None


class PosteriorEncoder(keras.layers.Layer):
    """q(z|x) = N(post_mean + mean_shift, diag(S) * exp(log_var_shift)): exact when shifts are 0
    and W has orthogonal columns."""

    posterior = "normal"

    def __init__(self, w, b, noise_std, mean_shift=0.0, log_var_shift=0.0, **kwargs):
        super().__init__(**kwargs)
        w = np.asarray(w, np.float64)
        post_cov = np.linalg.inv(np.eye(w.shape[1]) + w.T @ w / noise_std**2)
        self.latent_dim = w.shape[1]
        # z_mean = (x - b) @ A with A = W S^T / s^2.
        self.projection = tf.constant(w @ post_cov.T / noise_std**2, tf.float32)
        self.b = tf.constant(b, tf.float32)
        self.z_log_var = tf.constant(np.log(np.diag(post_cov)) + log_var_shift, tf.float32)
        self.mean_shift = float(mean_shift)

    def build(self, input_shape):
        self.built = True

    def call(self, x):
        z_mean = ops.matmul(x - self.b, self.projection) + self.mean_shift
        return {"z_mean": z_mean, "z_log_var": ops.zeros_like(z_mean) + self.z_log_var}

    def compute_output_spec(self, x):
        shape = (x.shape[0], self.latent_dim)
        return {"z_mean": keras.KerasTensor(shape), "z_log_var": keras.KerasTensor(shape)}


def linear_gaussian_model(problem, mean_shift=0.0, log_var_shift=0.0, seed=0, **kwargs):
    """An `AEVB` whose decoder is the linear-Gaussian p(x|z) and whose encoder is (a shift of)
    the exact posterior; `kwargs` go to `AEVB` (estimator A unless they say otherwise)."""
    w, b, s = problem["w"], problem["b"], problem["noise_std"]
    model = keras_aevb.AEVB(
        PosteriorEncoder(w, b, s, mean_shift, log_var_shift),
        LinearGaussianDecoder(w, b, s),
        seed=seed,
        **{"estimator": "monte_carlo", **kwargs},
    )
    model.build()
    return model
