"""Inner models of the TTT layer (DESIGN §1.5) as one code path: a stack of dense layers.

TTT-Linear is one layer ``f -> f``; TTT-MLP is two, ``f -> 4f -> f`` with ``gelu_tanh`` between.
A state is a tuple of ``(W, b)`` pairs, ``W: [..., f_in, f_out]`` and ``b: [..., 1, f_out]``;
leading axes are ``[B, H]`` inside the scan. Each model is three functions used by the dual form
and the primal form alike: ``forward`` (keys through the layers), ``grads`` (the gradient of
the reconstruction loss at every pre-activation) and the update, written where it is used.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ttt_jax.math.layernorm import layer_norm_l2_grad

# tanh-approximated GELU: 0.5 x (1 + tanh(c (x + a x^3))), c = sqrt(2 / pi).
GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715

InnerState = tuple[tuple[Array, Array], ...]


def mm(a: Array, b: Array) -> Array:
    """Batched matmul at full float32 precision (no TF32/bf16 passes on accelerators)."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


def gelu_tanh_grad(x: Array) -> Array:
    """Derivative of ``gelu_tanh`` in closed form (used inside the inner gradient)."""
    t = jnp.tanh(GELU_C * (x + GELU_A * x ** 3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * x * x)


def forward(state: InnerState, x: Float[Array, "*S f"]):
    """Runs ``x`` through the layers.

    Returns:
      ``(acts, zs)``: ``acts[l]`` is the input of layer ``l`` and ``zs[l]`` its pre-activation;
      ``zs[-1]`` is the pre-LN output ``f_pre(x)``.
    """
    acts, zs = [x], []
    for i, (w, b) in enumerate(state):
        z = mm(acts[-1], w) + b
        zs.append(z)
        if i + 1 < len(state):
            acts.append(gelu_tanh(z))
    return acts, zs


def grads(state: InnerState, zs, target: Float[Array, "*S f"], ln_weight: Array,
          ln_bias: Array) -> list[Array]:
    """Gradient of ``0.5 ||LN(f_pre(x)) - target||^2`` w.r.t. every pre-activation ``zs[l]``.

    The gradient of a layer's weight for one token is then ``outer(acts[l], g[l])`` and of its
    bias ``g[l]``.
    """
    g = [layer_norm_l2_grad(zs[-1], target, ln_weight, ln_bias)]
    for i in range(len(state) - 1, 0, -1):
        w_next = state[i][0]
        g.insert(0, mm(g[0], jnp.swapaxes(w_next, -1, -2)) * gelu_tanh_grad(zs[i - 1]))
    return g


def init_state(params: InnerState, batch: int) -> InnerState:
    """Tiles per-head initial weights ``[H, ...]`` over the batch: ``[B, H, ...]``, float32."""
    return tuple(
        tuple(jnp.broadcast_to(p.astype(jnp.float32), (batch,) + p.shape) for p in layer)
        for layer in params)
