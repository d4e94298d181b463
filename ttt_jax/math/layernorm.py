"""Per-head LayerNorm and its backward fused with the L2 reconstruction loss (docs/architecture.md §1.5)."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

# eps of the inner-loop LayerNorm (``ttt_norm``), as the reference implementations use.
TTT_NORM_EPS = 1e-6


def layer_norm(x: Float[Array, "*S f"], weight: Float[Array, "*W f"], bias: Float[Array, "*W f"],
               eps: float = TTT_NORM_EPS) -> Float[Array, "*S f"]:
    """``weight * (x - mean) / sqrt(var + eps) + bias`` over the last axis, biased variance."""
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jnp.reciprocal(jnp.sqrt(var + eps)) * weight + bias


def layer_norm_l2_loss(z: Float[Array, "*S f"], target: Float[Array, "*S f"],
                       weight: Float[Array, "*W f"], bias: Float[Array, "*W f"],
                       eps: float = TTT_NORM_EPS) -> Float[Array, "*S"]:
    """``0.5 * ||LN(z) - target||^2`` over the last axis (its gradient: ``layer_norm_l2_grad``)."""
    return 0.5 * jnp.sum(jnp.square(layer_norm(z, weight, bias, eps) - target), axis=-1)


def layer_norm_l2_grad(z: Float[Array, "*S f"], target: Float[Array, "*S f"],
                       weight: Float[Array, "*W f"], bias: Float[Array, "*W f"],
                       eps: float = TTT_NORM_EPS) -> Float[Array, "*S f"]:
    """Gradient of ``0.5 * ||LN(z) - target||^2`` with respect to ``z``, in closed form.

    With ``x_hat = (z - mu) / std`` and ``g = (LN(z) - target) * weight`` (the gradient at
    ``x_hat``), the LayerNorm backward is
    ``(g - mean(g) - x_hat * mean(g * x_hat)) / std``.
    """
    mu = jnp.mean(z, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(z - mu), axis=-1, keepdims=True)
    inv_std = jnp.reciprocal(jnp.sqrt(var + eps))
    x_hat = (z - mu) * inv_std
    g = (weight * x_hat + bias - target) * weight
    return (g - jnp.mean(g, axis=-1, keepdims=True)
            - x_hat * jnp.mean(g * x_hat, axis=-1, keepdims=True)) * inv_std
