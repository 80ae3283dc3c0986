"""Walks in the latent space of a trained model: interpolation and traversal.

`AEVB.embed`, `AEVB.interpolate` and `AEVB.traverse` (`LatentMethods`, mixed into `AEVB`);
both walks decode points around the posterior means `model.embed(x)`.
"""

import numpy as np
from keras import ops

from keras_aevb.inputs import positive_int

__all__ = ["LatentMethods", "interpolate", "traverse"]


class LatentMethods:
    """A model's latent tools: the embedding E_q[z|x] and walks from it (mixed into `AEVB`)."""

    def embed(self, x):
        """The posterior mean E_q[z|x], `[batch, latent_dim]`: a deterministic embedding of x
        (the mode for families without a mean), for nearest-neighbour search or plots."""
        return self.posterior_layer.mean(self.encode(x))

    def interpolate(self, x_a, x_b, steps=8, method="spherical"):
        """Decoded points on the latent path from x_a's embedding to x_b's
        (`keras_aevb.latent.interpolate`: spherical or linear)."""
        return interpolate(self, x_a, x_b, steps=steps, method=method)

    def traverse(self, x, dim, values):
        """Decoded embeddings of x with latent dimension `dim` set to each of `values`
        (`keras_aevb.latent.traverse`)."""
        return traverse(self, x, dim, values)


def interpolate(model, x_a, x_b, steps=8, method="spherical"):
    """Decoded points on the latent path from the embedding of x_a to that of x_b.

    z_t for t = 0, 1/(steps-1), ..., 1: "linear", z_t = (1 - t) z_a + t z_b, or "spherical"
    (slerp, White 2016: the path keeps the norm a Gaussian prior expects),
    z_t = sin((1 - t) W) / sin W z_a + sin(t W) / sin W z_b, W the angle between z_a and
    z_b (linear where W is near 0). Both ends are the embeddings themselves.

    Args:
        x_a, x_b: one example each, or two batches of the same size.
        steps: points on the path, ends included (>= 2).
        method: "spherical" or "linear".

    Returns:
        Decoder means `[steps, *event_shape]` (one pair) or `[batch, steps, *event_shape]`.
    """
    if method not in ("spherical", "linear"):
        raise ValueError(f"method must be 'spherical' or 'linear', got {method!r}")
    steps = positive_int(steps, "steps")
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (the two ends), got {steps}")
    z_a, single = _embed_one_or_many(model, x_a)
    z_b, _ = _embed_one_or_many(model, x_b)
    if z_a.shape[0] != z_b.shape[0]:
        raise ValueError(
            f"x_a and x_b must hold as many examples: {z_a.shape[0]} and {z_b.shape[0]}"
        )
    t = ops.reshape(ops.linspace(0.0, 1.0, steps), (1, steps, 1))
    z_a, z_b = z_a[:, None, :], z_b[:, None, :]
    path = (1.0 - t) * z_a + t * z_b
    if method == "spherical":
        path = _slerp(z_a, z_b, t, path)
    return _decoded(model, path, single)


def traverse(model, x, dim, values):
    """Decoded embeddings of x with latent dimension `dim` set to each of `values`.

    The other dimensions stay at the posterior mean of x: what one latent variable does.

    Returns:
        Decoder means `[len(values), *event_shape]` (one example) or
        `[batch, len(values), *event_shape]`.
    """
    dim = int(dim)
    if not 0 <= dim < model.latent_dim:
        raise ValueError(f"dim must be in [0, {model.latent_dim}), got {dim}")
    values = ops.convert_to_tensor(np.asarray(values, np.float32).reshape(-1))
    z, single = _embed_one_or_many(model, x)
    count = int(values.shape[0])
    z = ops.repeat(z[:, None, :], count, axis=1)  # [batch, count, latent_dim]
    one_hot = ops.reshape(ops.one_hot(dim, model.latent_dim), (1, 1, model.latent_dim))
    z = z * (1.0 - one_hot) + ops.reshape(values, (1, count, 1)) * one_hot
    return _decoded(model, z, single)


def _slerp(z_a, z_b, t, linear):
    """Spherical interpolation; the linear path where the angle is near 0."""
    norms = ops.norm(z_a, axis=-1, keepdims=True) * ops.norm(z_b, axis=-1, keepdims=True)
    cosine = ops.sum(z_a * z_b, axis=-1, keepdims=True) / ops.maximum(norms, 1e-12)
    angle = ops.arccos(ops.clip(cosine, -1.0, 1.0))
    sine = ops.sin(angle)
    safe = ops.where(sine > 1e-6, sine, 1.0)
    slerp = (ops.sin((1.0 - t) * angle) * z_a + ops.sin(t * angle) * z_b) / safe
    return ops.where(sine > 1e-6, slerp, linear)


def _decoded(model, z, single):
    """Decoder means of z `[batch, count, latent_dim]`: `[batch, count, *event_shape]`."""
    batch, count = int(z.shape[0]), int(z.shape[1])
    images = model.decode(ops.reshape(z, (batch * count, model.latent_dim)))
    images = ops.reshape(images, (batch, count, *model.event_shape))
    return images[0] if single else images


def _embed_one_or_many(model, x):
    """(z `[batch, latent_dim]`, whether x was one example without a batch axis)."""
    x = ops.convert_to_tensor(x, model.compute_dtype)
    single = tuple(x.shape) == tuple(model.event_shape) or (
        x.shape.rank == 1 and int(x.shape[0]) == int(np.prod(model.event_shape))
    )
    return model.embed(x[None] if single else x), single
