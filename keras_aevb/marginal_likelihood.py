"""Estimates of the marginal likelihood log p_theta(x) of a trained model, per example.

The paper's first claim is that AEVB "finds higher log likelihood"; the bound alone cannot show
that. Two estimators:

- `log_likelihood`: importance sampling with the model's recognition model q(z|x) as proposal
  (the IWAE evaluation protocol of Burda et al., 2016, with K = 5000):

      log p(x) ~= logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K,  z_k ~ q(z|x)

  Unbiased for p(x) but, through the log, biased low for log p(x) (Jensen): its expectation
  rises with K towards log p(x) and, for K = 1, is the SGVB bound (estimator A, eq. 6).

- `hmc_log_likelihood`: the estimator of the paper's App. D, which needs no recognition model:
  HMC samples from p(z|x), a Gaussian r(z) fitted to them, and the harmonic-mean form

      p(x) ~= [ 1/L sum_l r(z_l) / (p(z_l) p(x|z_l)) ]^-1,   z_l ~ p(z|x) (fresh HMC draws)

  It works for any model with a decoder and a prior (so also for Monte Carlo EM), but the paper
  warns that it is unreliable beyond a few latent dimensions.

Both return NumPy float64 arrays `[num_examples]` in nats.
"""

import math
import warnings

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from keras_aevb import inputs
from keras_aevb._cache import model_cache
from keras_aevb.families import get_family

__all__ = [
    "HMC_MAX_RELIABLE_LATENT_DIM",
    "hmc_log_likelihood",
    "log_joint_fn",
    "log_likelihood",
]

tfd = tfp.distributions

# Decoder outputs (samples x examples x event values) held at once by `log_likelihood`: 2^22
# float32 values = 16 MiB per output tensor, whatever K is.
_MAX_CHUNK_VALUES = 2**22

# Above this many latent dimensions the App. D estimator is unreliable (paper App. D: "... we
# found that [the estimator] is inaccurate for higher-dimensional latent space").
HMC_MAX_RELIABLE_LATENT_DIM = 5

_INT32_MAX = 2**31 - 1

# The K importance samples of a batch are drawn in blocks of this many, block j from its own
# stateless seed (the batch's seed folded with j): the draws depend on the seed and the batch,
# not on how the samples are chunked, so any `chunk_size` scores the same K draws. Chunks are
# rounded to whole blocks by default; a chunk that cuts a block draws that block once more and
# keeps its part.
_NOISE_BLOCK = 16


def log_likelihood(model, x, num_samples=5000, batch_size=None, seed=None, chunk_size=None):
    """Importance-sampled log p(x) per example, with q(z|x) as the proposal.

        log p(x) ~= logsumexp_{k=1..K} log w_k - log K,
        log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x),   z_k ~ q(z|x)

    `E[exp(estimate)] = p(x)`, so by Jensen `E[estimate] <= log p(x)`: the estimate is biased
    low for finite K and its mean rises with K (Burda et al., 2016, Theorem 1). K = 1 is the
    SGVB bound (estimator A, paper eq. 6) in expectation; K = 5000 is the IWAE evaluation
    protocol. If q(z|x) is the exact posterior every weight equals p(x) and the estimate is
    exact for every K.

    The K samples are drawn in chunks whose logsumexps are combined exactly, so the memory
    held is bounded (about `_MAX_CHUNK_VALUES` decoder outputs) for any K and batch size. The
    draws depend on `seed` and the batches only: every `chunk_size` gives the same estimate
    (to float32 rounding).

    Args:
        model: an `AEVB` (or `WakeSleep`, `MonteCarloEM`): anything with `encoder`,
            `posterior_layer`, `decoder`, `prior_distribution` and `as_event`.
        x: data: a NumPy array or tensor `[N, *event_shape]`, or a `tf.data.Dataset` of
            batches `x` or tuples `(x, ...)` (only the first element is used).
        num_samples: K, importance samples per example.
        batch_size: examples per step for arrays (default 100); a dataset keeps its batches.
        seed: int seed of the draws (the same seed gives the same estimates); None: random.
        chunk_size: samples per chunk (memory only, not the draws); default: as many whole
            blocks of `_NOISE_BLOCK` samples as fit in `_MAX_CHUNK_VALUES`.

    Returns:
        float64 NumPy array `[N]`: the estimates of log p(x) in nats.

    Example:
    >>> model = paper_model("mnist", latent_dim=2)
    >>> log_px = log_likelihood(model, x_test_binary, num_samples=5000, seed=0)
    >>> float(log_px.mean())  # nats per datapoint; compare with the bound model.elbo(x)

    Reference: Burda, Grosse & Salakhutdinov, Importance Weighted Autoencoders, ICLR 2016;
    Kingma & Welling, arXiv:1312.6114, section 2.3.
    """
    num_samples = inputs.positive_int(num_samples, "num_samples")
    _check_data(model, x)
    event_size = math.prod(model.event_shape)
    step = _log_weight_chunk_fn(model)

    def estimate(batch, seed_pair):
        n = int(batch.shape[0])
        params = model.encoder(batch, training=False)
        if chunk_size is None:
            chunk = max(1, _MAX_CHUNK_VALUES // (n * event_size))
            chunk = max(_NOISE_BLOCK, chunk - chunk % _NOISE_BLOCK)
        else:
            chunk = inputs.positive_int(chunk_size, "chunk_size")
        chunk = min(chunk, num_samples)
        # One seed per batch; the samples' blocks fold their index into it (_NOISE_BLOCK).
        # num_samples and chunk are tensors: no batch traces the step again.
        chunk_lse = step(batch, params, tf.constant(num_samples), tf.constant(chunk), seed_pair)
        return _logsumexp(chunk_lse.numpy().astype(np.float64), axis=0) - math.log(num_samples)

    return _per_batch(model, x, batch_size, seed, estimate, "log_likelihood")


def _per_batch(model, x, batch_size, seed, estimate, name):
    """`estimate(batch, seed_pair)` of every non-empty batch of x, concatenated (float64 [N]).

    One seed pair per batch, drawn in order from `seed`."""
    rng = np.random.default_rng(seed)
    estimates = []
    for batch in _batches(x, batch_size):
        batch = model.as_event(batch)
        if int(batch.shape[0]) == 0:
            continue
        seed_pair = tf.constant(rng.integers(0, _INT32_MAX, size=2), tf.int32)
        estimates.append(np.asarray(estimate(batch, seed_pair), np.float64))
    if not estimates:
        raise ValueError(f"{name} got no examples: x is empty.")
    return np.concatenate(estimates)


def _log_weight_chunk_fn(model):
    """A compiled step: per chunk of samples, the logsumexp of log w, `[chunks, batch]`.

    `step(x, params, num_samples, chunk, seed)` runs every chunk of one batch in one call (a
    `tf.while_loop`), so no chunk pays a Python call and a copy back to NumPy. Cached on the
    model so repeated calls (batches, evaluations) reuse one trace.
    """
    cache = model_cache(model, "log_likelihood")
    if "chunk_step" in cache:
        return cache["chunk_step"]

    def chunk_lse(x, params, start, k, seed):
        posterior = model.posterior_layer.distribution(params)
        z = _sample_block_range(model, params, start, k, seed)
        log_px_z = model.decoder.log_likelihood(x, model.decoder(z, training=False))
        log_w = log_px_z + model.prior_distribution.log_prob(z) - posterior.log_prob(z)
        return tf.reduce_logsumexp(log_w, axis=0)

    @tf.function(reduce_retracing=True)
    def step(x, params, num_samples, chunk, seed):
        chunks = (num_samples + chunk - 1) // chunk
        reference = params[model.posterior_layer.param_names[0]]

        def body(i, lse):
            start = i * chunk
            k = tf.minimum(chunk, num_samples - start)
            return i + 1, lse.write(i, chunk_lse(x, params, start, k, seed))

        _, lse = tf.while_loop(
            lambda i, lse: i < chunks,
            body,
            (tf.constant(0), tf.TensorArray(reference.dtype, size=chunks)),
        )
        return lse.stack()

    cache["chunk_step"] = step
    return step


def _sample_block_range(model, params, start, k, seed):
    """Draws start .. start + k - 1 of a batch's samples, `[k, batch, latent_dim]`.

    Sample i belongs to block i // _NOISE_BLOCK, drawn from `stateless_fold_in(seed, block)`,
    so a sample's value does not depend on the chunk that asks for it.
    """
    first = start // _NOISE_BLOCK
    last = (start + k - 1) // _NOISE_BLOCK
    reference = params[model.posterior_layer.param_names[0]]

    def draw(block):
        block_seed = tf.random.experimental.stateless_fold_in(seed, block)
        return _sample_posterior(model, params, _NOISE_BLOCK, block_seed)

    blocks = tf.map_fn(draw, tf.range(first, last + 1), fn_output_signature=reference.dtype)
    z = tf.reshape(blocks, tf.concat([[-1], tf.shape(blocks)[2:]], axis=0))
    offset = start - first * _NOISE_BLOCK
    return z[offset : offset + k]


def _sample_posterior(model, params, k, seed):
    """k draws z ~ q(z|x), `[k, batch, latent_dim]`; k may be a tensor (no retrace per k)."""
    return get_family(model.posterior_layer.family).sample(params, k, seed)


# ------------------------------------------------------------------------- App. D estimator


def hmc_log_likelihood(
    model,
    x,
    num_samples=1000,
    num_burnin_steps=500,
    num_chains=10,
    num_leapfrog_steps=4,
    step_size=0.05,
    target_accept_prob=0.9,
    batch_size=None,
    seed=None,
):
    """The paper's App. D estimator of log p(x), with HMC samples from p(z|x).

    For each datapoint x (paper App. D):

    1. draw L samples z from p_theta(z|x) by HMC on log p(x|z) + log p(z) (App. E: 4 leapfrog
       steps, the step size adapted during burn-in towards `target_accept_prob`);
    2. fit a density r(z) to them: here a Gaussian with full covariance (sample mean and
       covariance);
    3. draw L fresh samples z_l from p(z|x) (the chains continued) and return

           log p(x) ~= -[ logsumexp_l (log r(z_l) - log p(x|z_l) - log p(z_l)) - log L ].

    This is the harmonic-mean identity E_{p(z|x)}[r(z) / p(x, z)] = 1 / p(x) for any density r;
    it has finite variance when r has lighter tails than p(z|x), which a Gaussian fit to a
    near-Gaussian posterior has. The paper found it unreliable beyond a few latent dimensions;
    this function warns above `HMC_MAX_RELIABLE_LATENT_DIM` (5). It needs no recognition model:
    it scores any generative model with a `decoder` and a `prior_distribution` (AEVB,
    wake-sleep, Monte Carlo EM) the same way, as in the paper's Fig. 3.

    The chains start from the recognition model's posterior samples when the model has an
    encoder (a start near the mode shortens burn-in), else from the prior. `num_chains` chains
    per example each give `ceil(L / num_chains)` draws per stage, all examples of a batch and
    all chains stepping together; the step size is adapted per example
    (`tfp.mcmc.SimpleStepSizeAdaptation`, the acceptance probability averaged over its chains).

    Args:
        model: an `AEVB`, `WakeSleep` or `MonteCarloEM` (needs `decoder`,
            `prior_distribution`, `latent_dim`, `as_event`).
        x: NumPy array or tensor `[N, *event_shape]`, or a `tf.data.Dataset` of `x` or
            `(x, ...)` batches.
        num_samples: L, HMC draws per example for the fit (step 2) and again for the
            estimate (step 3).
        num_burnin_steps: HMC steps per chain before step 1, with step-size adaptation.
        num_chains: chains per example.
        num_leapfrog_steps: leapfrog steps per HMC step (App. E: 4).
        step_size: initial step size.
        target_accept_prob: acceptance probability the adaptation aims at.
        batch_size: examples per step for arrays (default 100).
        seed: int seed; None: random.

    Returns:
        float64 NumPy array `[N]`: estimates of log p(x) in nats.

    Reference: Kingma & Welling, arXiv:1312.6114, App. D and App. E.
    """
    settings = _hmc_settings(
        model, num_samples, num_burnin_steps, num_chains, num_leapfrog_steps, target_accept_prob
    )
    _check_data(model, x)
    run = _hmc_estimate_fn(model, *settings)
    step_size = tf.constant(float(step_size))
    return _per_batch(
        model,
        x,
        batch_size,
        seed,
        lambda batch, seed_pair: run(batch, step_size, seed_pair).numpy(),
        "hmc_log_likelihood",
    )


def _hmc_settings(
    model, num_samples, num_burnin_steps, num_chains, num_leapfrog_steps, target_accept_prob
):
    """Checked settings of `hmc_log_likelihood`, as `_hmc_estimate_fn` takes them; warns
    about latent spaces where the paper found the estimator unreliable."""
    num_samples = inputs.positive_int(num_samples, "num_samples")
    num_chains = inputs.positive_int(num_chains, "num_chains")
    num_leapfrog_steps = inputs.positive_int(num_leapfrog_steps, "num_leapfrog_steps")
    if int(num_burnin_steps) < 0:
        raise ValueError(f"num_burnin_steps must be >= 0, got {num_burnin_steps!r}.")
    if not 0.0 < float(target_accept_prob) < 1.0:
        raise ValueError(f"target_accept_prob must be in (0, 1), got {target_accept_prob!r}.")
    if model.latent_dim > HMC_MAX_RELIABLE_LATENT_DIM:
        warnings.warn(
            f"hmc_log_likelihood on a {model.latent_dim}-dimensional latent space: the paper "
            f"(App. D) found this estimator unreliable above {HMC_MAX_RELIABLE_LATENT_DIM} "
            "dimensions; use keras_aevb.log_likelihood (importance sampling) instead.",
            UserWarning,
            stacklevel=3,
        )
    draws_per_chain = -(-num_samples // num_chains)
    return (num_chains, draws_per_chain, int(num_burnin_steps), num_leapfrog_steps,
            float(target_accept_prob))  # fmt: skip


def log_joint_fn(model, x):
    """The function z `[..., batch, latent_dim]` -> log p(x|z) + log p(z), `[..., batch]`.

    The unnormalised log posterior that HMC targets (paper App. D step 1, MCEM's E-step).
    """

    def log_joint(z):
        outputs = model.decoder(z, training=False)
        return model.decoder.log_likelihood(x, outputs) + model.prior_distribution.log_prob(z)

    return log_joint


def _initial_state(model, x, num_chains, seed):
    """Chain starts `[num_chains, batch, latent_dim]`: q(z|x) draws if there is an encoder."""
    encoder = getattr(model, "encoder", None)
    if encoder is not None and getattr(model, "posterior_layer", None) is not None:
        params = encoder(x, training=False)
        return _sample_posterior(model, params, num_chains, seed)
    batch = tf.shape(x)[0]
    z = model.prior_distribution.sample(num_chains * batch, seed=seed)
    return tf.reshape(z, [num_chains, batch, model.latent_dim])


def _hmc_estimate_fn(
    model, num_chains, draws_per_chain, num_burnin_steps, num_leapfrog_steps, target_accept_prob
):
    key = (num_chains, draws_per_chain, num_burnin_steps, num_leapfrog_steps, target_accept_prob)
    cache = model_cache(model, "hmc_estimate")
    if key in cache:
        return cache[key]

    @tf.function(reduce_retracing=True, jit_compile=True)
    def run(x, step_size, seed):
        init_seed, chain_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        log_joint = log_joint_fn(model, x)
        batch = tf.shape(x)[0]
        z0 = _initial_state(model, x, num_chains, init_seed)
        # One step size per example, [batch, 1]: SimpleStepSizeAdaptation then averages the
        # acceptance probability over the chain axis only (its rule for a step size of lower
        # rank than the state), so each example gets its own step size. Adaptation stops after
        # 80 % of the burn-in, so every draw kept comes from a fixed (valid) HMC kernel.
        step = tf.fill([batch, 1], tf.cast(step_size, z0.dtype))
        kernel = tfp.mcmc.SimpleStepSizeAdaptation(
            tfp.mcmc.HamiltonianMonteCarlo(
                log_joint, step_size=step, num_leapfrog_steps=num_leapfrog_steps
            ),
            num_adaptation_steps=int(0.8 * num_burnin_steps),
            target_accept_prob=target_accept_prob,
        )
        # One chain run (one kernel in the graph: tracing and compiling TFP's kernels is the
        # slow part): the first half of the kept draws is step 1, the second half step 3.
        chain = tfp.mcmc.sample_chain(
            num_results=2 * draws_per_chain,
            num_burnin_steps=num_burnin_steps,
            current_state=z0,
            kernel=kernel,
            trace_fn=None,
            seed=chain_seed,
        )  # [2T, C, batch, D]
        fit_draws, eval_draws = chain[:draws_per_chain], chain[draws_per_chain:]
        # Step 2: a Gaussian with full covariance fitted to the step-1 draws, per example.
        draws = tf.reshape(tf.transpose(fit_draws, [2, 0, 1, 3]), [batch, -1, model.latent_dim])
        draws = tf.cast(draws, tf.float64)
        mean = tf.reduce_mean(draws, axis=1)
        centred = draws - mean[:, None]
        n = tf.cast(tf.shape(draws)[1], tf.float64)
        cov = tf.einsum("bni,bnj->bij", centred, centred) / (n - 1.0)
        # A jitter keeps the Cholesky factor finite when the chains barely moved.
        cov += 1e-8 * tf.eye(model.latent_dim, dtype=tf.float64)
        fitted = tfd.MultivariateNormalTriL(mean, tf.linalg.cholesky(cov))
        # Step 3: the harmonic-mean estimate from the fresh draws.
        log_r = fitted.log_prob(tf.cast(eval_draws, tf.float64))
        log_ratio = log_r - tf.cast(log_joint(eval_draws), tf.float64)  # [T, C, batch]
        log_ratio = tf.reshape(tf.transpose(log_ratio, [2, 0, 1]), [batch, -1])
        count = tf.cast(tf.shape(log_ratio)[1], tf.float64)
        return -(tf.reduce_logsumexp(log_ratio, axis=1) - tf.math.log(count))

    cache[key] = run
    return run


# ------------------------------------------------------------------------- input handling


def _check_data(model, x):
    """The model's own data check (as in fit/evaluate): refuses values its likelihood cannot
    score, warns once about grey values fed to a Bernoulli decoder (not a likelihood then)."""
    if hasattr(model, "event_shape") and hasattr(model, "decoder"):
        inputs.check_data(model, x)


def _batches(x, batch_size):
    """Yields batches of x from an array/tensor (by batch_size) or a tf.data.Dataset."""
    if isinstance(x, tf.data.Dataset):
        if batch_size is not None:
            warnings.warn(
                "batch_size is ignored for a tf.data.Dataset: its own batches are used.",
                UserWarning,
                stacklevel=3,
            )
        for element in x:
            yield element[0] if isinstance(element, tuple | list) else element
        return
    if isinstance(x, tuple | list) and x and not np.isscalar(x[0]) and np.ndim(x[0]) > 1:
        x = x[0]
    batch_size = 100 if batch_size is None else inputs.positive_int(batch_size, "batch_size")
    n = int(x.shape[0]) if hasattr(x, "shape") else len(x)
    for start in range(0, n, batch_size):
        yield x[start : start + batch_size]


def _logsumexp(values, axis):
    peak = np.max(values, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    total = np.log(np.sum(np.exp(values - peak), axis=axis, keepdims=True)) + peak
    return np.squeeze(total, axis=axis)
