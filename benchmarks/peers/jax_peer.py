"""The paper's MNIST model and protocol in JAX, written for speed the way JAX users write it.

Model and protocol (Kingma & Welling, section 5): 784-500-J tanh encoder with mu and
log sigma^2 heads, J-500-784 tanh decoder with Bernoulli logits, SGVB estimator B (analytic KL),
L = 1, minibatch M, dynamic binarization (x ~ Bernoulli(grey level) each time a datapoint is
used), Adagrad from a zero accumulator (theta -= lr g / (sqrt(sum g^2) + 1e-8)), weight prior
N(0, I) per datapoint (weight decay 1/N added to the gradient), every parameter ~ N(0, 0.01^2).

How it is made fast (what a JAX engineer would do):
- The training images live on the device as one array; a whole chunk of steps (the
  permutation's minibatch gather, the binarization, the noise eps, forward, backward and the
  Adagrad update) is one `jax.jit` program: `lax.scan` over the steps, so Python and dispatch
  are paid once per chunk, not per step.
- Parameters and accumulators are donated to the call (`donate_argnums`): XLA updates them in
  place instead of copying 2 x 816k floats per call.
- The random bits come from the `rbg` PRNG (XLA's RngBitGenerator) when it is faster than the
  default threefry on this backend: `choose_prng_impl` measures both once.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

NAME = "JAX (jit + lax.scan)"


def init_params(key, data_dim=784, hidden=500, latent_dim=20):
    """Every weight and bias ~ N(0, 0.01^2), as the paper draws them."""
    shapes = {
        "enc_w": (data_dim, hidden), "enc_b": (hidden,),
        "mu_w": (hidden, latent_dim), "mu_b": (latent_dim,),
        "lv_w": (hidden, latent_dim), "lv_b": (latent_dim,),
        "dec_w": (latent_dim, hidden), "dec_b": (hidden,),
        "out_w": (hidden, data_dim), "out_b": (data_dim,),
    }  # fmt: skip
    keys = jax.random.split(key, len(shapes))
    return {
        name: 0.01 * jax.random.normal(k, shape, jnp.float32)
        for k, (name, shape) in zip(keys, shapes.items(), strict=True)
    }


def elbo(params, x, eps):
    """Per-example SGVB estimator B: -KL(q(z|x) || N(0, I)) + log p(x | z), z = mu + sigma eps."""
    h = jnp.tanh(x @ params["enc_w"] + params["enc_b"])
    mu = h @ params["mu_w"] + params["mu_b"]
    log_var = h @ params["lv_w"] + params["lv_b"]
    z = mu + jnp.exp(0.5 * log_var) * eps
    logits = jnp.tanh(z @ params["dec_w"] + params["dec_b"]) @ params["out_w"] + params["out_b"]
    # log Bernoulli(x | sigmoid(logits)) = x logits - softplus(logits)
    log_px = jnp.sum(x * logits - jax.nn.softplus(logits), axis=-1)
    kl = -0.5 * jnp.sum(1.0 + log_var - mu**2 - jnp.exp(log_var), axis=-1)
    return log_px - kl


def _loss(params, x, eps):
    return -jnp.mean(elbo(params, x, eps))


class Trainer:
    """Trains the model on `images` ([N, 784] grey levels in [0, 1]) in chunks of steps."""

    name = NAME

    def __init__(self, images, latent_dim=20, hidden=500, batch_size=100,
                 learning_rate=0.02, weight_decay=None, seed=0, prng_impl=None):  # fmt: skip
        images = np.asarray(images, np.float32).reshape(len(images), -1)
        self.num_examples, data_dim = images.shape
        self.batch_size, self.latent_dim = batch_size, latent_dim
        self.steps_per_epoch = self.num_examples // batch_size
        self.prng_impl = prng_impl or choose_prng_impl(batch_size, data_dim, latent_dim)
        self.key = jax.random.key(seed, impl=self.prng_impl)
        self.key, init_key = jax.random.split(self.key)
        self.params = init_params(init_key, data_dim, hidden, latent_dim)
        self.accumulators = jax.tree.map(jnp.zeros_like, self.params)
        self.images = jnp.asarray(images)
        wd = 1.0 / self.num_examples if weight_decay is None else weight_decay
        self._run = _make_run(batch_size, latent_dim, learning_rate, wd)

    def train_epoch(self):
        """One pass over a fresh permutation of the training images: one compiled call."""
        self.key, key = jax.random.split(self.key)
        self.params, self.accumulators, loss = self._run(
            self.params, self.accumulators, self.images, key, self.steps_per_epoch
        )
        return float(loss)

    def bound(self, x_binary, seed=1):
        """Mean per-example bound on binary data (one eps draw per example)."""
        x = jnp.asarray(np.asarray(x_binary, np.float32).reshape(len(x_binary), -1))
        eps = jax.random.normal(jax.random.key(seed), (len(x), self.latent_dim))
        return float(jnp.mean(jax.jit(elbo)(self.params, x, eps)))


def _make_run(batch_size, latent_dim, learning_rate, weight_decay):
    @functools.partial(jax.jit, static_argnums=(4,), donate_argnums=(0, 1))
    def run(params, accumulators, images, key, steps):
        perm_key, step_key = jax.random.split(key)
        order = jax.random.permutation(perm_key, images.shape[0])[: steps * batch_size]
        batches = order.reshape(steps, batch_size)
        step_keys = jax.random.split(step_key, steps)

        def step(state, inputs):
            params, accumulators = state
            index, k = inputs
            k_bin, k_eps = jax.random.split(k)
            grey = images[index]
            x = (jax.random.uniform(k_bin, grey.shape) < grey).astype(jnp.float32)
            eps = jax.random.normal(k_eps, (batch_size, latent_dim))
            loss, grads = jax.value_and_grad(_loss)(params, x, eps)

            def adagrad(p, a, g):
                g = g + weight_decay * p
                a = a + g * g
                return p - learning_rate * g / (jnp.sqrt(a) + 1e-8), a

            updated = jax.tree.map(adagrad, params, accumulators, grads)
            params = jax.tree.map(lambda _, pa: pa[0], params, updated)
            accumulators = jax.tree.map(lambda _, pa: pa[1], params, updated)
            return (params, accumulators), loss

        (params, accumulators), losses = jax.lax.scan(
            step, (params, accumulators), (batches, step_keys)
        )
        return params, accumulators, losses[-1]

    return run


def choose_prng_impl(batch_size=100, data_dim=784, latent_dim=20, draws=200):
    """The faster of JAX's threefry and rbg PRNGs at one step's draws, measured here once."""
    times = {}
    for impl in ("threefry2x32", "rbg"):

        @jax.jit
        def draw(key):
            def body(key, _):
                key, k1, k2 = jax.random.split(key, 3)
                u = jax.random.uniform(k1, (batch_size, data_dim))
                e = jax.random.normal(k2, (batch_size, latent_dim))
                return key, jnp.sum(u) + jnp.sum(e)

            return jax.lax.scan(body, key, None, length=draws)[1]

        key = jax.random.key(0, impl=impl)
        draw(key).block_until_ready()
        start = time.perf_counter()
        draw(key).block_until_ready()
        times[impl] = time.perf_counter() - start
    return min(times, key=times.get)


def params_from_keras(model):
    """The peer's parameters from a `keras_aevb.paper_model("mnist", ...)` model's weights."""
    names = {
        "encoder/hidden_0/kernel": "enc_w", "encoder/hidden_0/bias": "enc_b",
        "encoder/z_mean/kernel": "mu_w", "encoder/z_mean/bias": "mu_b",
        "encoder/z_log_var/kernel": "lv_w", "encoder/z_log_var/bias": "lv_b",
        "decoder/hidden_0/kernel": "dec_w", "decoder/hidden_0/bias": "dec_b",
        "decoder/logits/kernel": "out_w", "decoder/logits/bias": "out_b",
    }  # fmt: skip
    params = {}
    for variable in model.trainable_variables:
        suffix = "/".join(variable.path.split("/")[-3:])
        params[names[suffix]] = jnp.asarray(variable.numpy())
    return params


@functools.partial(jax.jit, static_argnums=(2, 3))
def log_likelihood(params, x, num_samples, chunk, key):
    """Importance-sampled log p(x) per example (K = num_samples draws from q, in chunks).

    log p(x) ~ logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K, z_k ~ q(z|x).
    Each chunk is one batched decoder pass over [examples * chunk] latent points; `lax.map`
    runs the chunks in one compiled program.
    """
    h = jnp.tanh(x @ params["enc_w"] + params["enc_b"])
    mu = h @ params["mu_w"] + params["mu_b"]
    log_var = h @ params["lv_w"] + params["lv_b"]
    sigma = jnp.exp(0.5 * log_var)
    log_2pi = jnp.log(2.0 * jnp.pi)

    def chunk_weights(k):
        eps = jax.random.normal(k, (chunk, *mu.shape))  # [C, B, J]
        z = mu + sigma * eps
        logits = jnp.tanh(z @ params["dec_w"] + params["dec_b"]) @ params["out_w"]
        logits = logits + params["out_b"]
        log_px = jnp.sum(x * logits - jax.nn.softplus(logits), axis=-1)
        log_pz = -0.5 * jnp.sum(z**2 + log_2pi, axis=-1)
        log_q = -0.5 * jnp.sum(eps**2 + log_2pi + log_var, axis=-1)
        return log_px + log_pz - log_q  # [C, B]

    weights = jax.lax.map(chunk_weights, jax.random.split(key, num_samples // chunk))
    weights = weights.reshape(-1, x.shape[0])
    return jax.scipy.special.logsumexp(weights, axis=0) - jnp.log(num_samples)
