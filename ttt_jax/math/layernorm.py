"""Per-head LayerNorm and its backward fused with the L2 reconstruction loss (docs/architecture.md §1.5)."""

from __future__ import annotations

import functools

import jax
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
    return _normalized_grad(g, x_hat, inv_std)


def _normalized_grad(g, x_hat, inv_std):
    """The LayerNorm backward: from the gradient ``g`` at ``x_hat`` to the gradient at ``z``."""
    return (g - jnp.mean(g, axis=-1, keepdims=True)
            - x_hat * jnp.mean(g * x_hat, axis=-1, keepdims=True)) * inv_std


def _ln_stats(x, eps):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return mu, jax.lax.rsqrt(var + eps)


def _layer_norm_fwd(x, weight, bias, eps):
    mu, rstd = _ln_stats(x, eps)
    return (x - mu) * rstd * weight + bias, (x, weight)


def _layer_norm_bwd(eps, res, dy):
    x, weight = res
    mu, rstd = _ln_stats(x, eps)  # recomputed: the residual is the input alone
    x_hat = (x - mu) * rstd
    dx = _normalized_grad(dy * weight, x_hat, rstd)
    return dx, _sum_to(dy * x_hat, weight.shape), _sum_to(dy, weight.shape)


def _sum_to(a, shape):
    """Sums ``a`` over the axes that broadcasting added or stretched to reach ``a.shape``."""
    a = jnp.sum(a, axis=tuple(range(a.ndim - len(shape))))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and a.shape[i] != 1)
    return jnp.sum(a, axis=stretched, keepdims=True) if stretched else a


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm_lean(x, weight, bias, eps):
    return _layer_norm_fwd(x, weight, bias, eps)[0]


_layer_norm_lean.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def layer_norm_lean(x: Float[Array, "*S f"], weight: Float[Array, "*W f"],
                    bias: Float[Array, "*W f"], eps: float = TTT_NORM_EPS) -> Float[Array, "*S f"]:
    """``layer_norm`` (with ``rsqrt``) whose derivative keeps only ``x`` and ``weight``.

    Autodiff of the plain form keeps ``weight`` broadcast to the full ``x`` shape for the
    backward pass (XLA materialises it: one more activation-sized array per call); here the
    statistics are recomputed and the closed-form backward is used. Reverse mode only (a
    ``jax.custom_vjp``); ``weight``/``bias`` broadcast against the trailing axes of ``x``
    (``[f]`` or ``[H, 1, f]``-style shapes whose leading size-1 axes are summed over).
    """
    return _layer_norm_lean(x, weight, bias, eps)
