"""Inner models of the TTT layer (docs/architecture.md §1.5) as one code path: a stack of dense layers.

TTT-Linear is one layer ``f -> f``; TTT-MLP is two, ``f -> 4f -> f`` with ``gelu_tanh`` between.
A state is a tuple of ``(W, bias)`` pairs, ``W: [..., f_in, f_out]`` and
``bias: [..., 1, f_out]``; leading axes are ``[B, H]`` inside the scan (``b`` always names the
mini-batch size). The dual form, the primal form, streaming and the diagnostics all use the
functions here:

* ``forward`` (keys through the layers), ``loss`` (the reconstruction loss
  ``0.5 ||LN(f(xk)) - (xv - xk)||^2`` per token), ``grads`` (its gradient at every
  pre-activation) and ``loss_grads`` (forward and gradients at once);
* ``weighted_grad_sums``: per layer ``sum_j w_j outer(a_j, g_j)`` and ``sum_j w_j g_j`` for a
  row of per-token weights (``eta_last`` or ``lr``);
* ``apply_update`` (``state - scale * delta``), ``accumulate`` (``acc + delta``) and ``step``
  (one gradient step with per-token weights: the inner update rule).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ttt_jax.math.layernorm import layer_norm_l2_grad, layer_norm_l2_loss

# tanh-approximated GELU: 0.5 x (1 + tanh(c (x + a x^3))), c = sqrt(2 / pi).
GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715

InnerState = tuple[tuple[Array, Array], ...]


def mm(x: Array, y: Array) -> Array:
    """Batched matmul at full float32 precision (no TF32/bf16 passes on accelerators)."""
    return jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)


def mm_tn(x: Array, y: Array) -> Array:
    """``x^T y`` over the token axis (``x: [..., b, m]``, ``y: [..., b, n]`` -> ``[..., m, n]``).

    On the CPU the transposed ``x`` is made an array of its own first
    (``lax.optimization_barrier``): XLA then runs a plain product, where it would otherwise
    fold the transpose into the product and, for some of these shapes, fall back to a slower
    kernel (benchmarks/README.md). Elsewhere this is ``mm(swapaxes(x), y)``.
    """
    xt = jnp.swapaxes(x, -1, -2)
    if jax.default_backend() == "cpu":
        xt = jax.lax.optimization_barrier(xt)
    return mm(xt, y)


def gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


def gelu_tanh_grad(x: Array) -> Array:
    """Derivative of ``gelu_tanh`` in closed form (used inside the inner gradient)."""
    t = jnp.tanh(GELU_C * (x + GELU_A * x ** 3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * x * x)


def forward(state: InnerState, x: Float[Array, "*S f"], first=None):
    """Runs ``x`` through the layers.

    ``first``: ``x @ W_0`` when already computed (without the bias).

    Returns:
      ``(acts, zs)``: ``acts[l]`` is the input of layer ``l`` and ``zs[l]`` its pre-activation;
      ``zs[-1]`` is the pre-LN output ``f_pre(x)``.
    """
    acts, zs = [x], []
    for i, (w, bias) in enumerate(state):
        z = (mm(acts[-1], w) if i or first is None else first) + bias
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


def loss(state: InnerState, xk: Float[Array, "*S f"], xv: Float[Array, "*S f"],
         ln_weight: Array, ln_bias: Array) -> Float[Array, "*S"]:
    """The reconstruction loss ``0.5 ||LN(f(xk; state)) - (xv - xk)||^2`` of every token."""
    _, zs = forward(state, xk)
    return layer_norm_l2_loss(zs[-1], xv - xk, ln_weight, ln_bias)


def loss_grads(state: InnerState, xk: Float[Array, "*S f"], xv: Float[Array, "*S f"],
               ln_weight: Array, ln_bias: Array, first=None):
    """Forward of the keys and the reconstruction-loss gradients at ``state``.

    The loss is ``0.5 ||LN(f(xk; state)) - (xv - xk)||^2`` per token; ``first`` as ``forward``.

    Returns:
      ``(acts, zs, gs)``: as ``forward`` and ``grads``.
    """
    acts, zs = forward(state, xk, first)
    return acts, zs, grads(state, zs, xv - xk, ln_weight, ln_bias)


def weighted_grad_sums(acts, gs, weights: Float[Array, "*S b"]) -> InnerState:
    """Per layer, the weighted sums of the per-token gradients over a mini-batch's ``b`` tokens.

    ``acts[l], gs[l]: [..., b, f_in]`` / ``[..., b, f_out]`` (from ``loss_grads``) and one weight
    per token ``weights: [..., b]`` (e.g. ``eta_last = tok[-1] * lr``, or ``lr``). Returns
    ``((sum_j w_j outer(a_j, g_j), sum_j w_j g_j), ...)`` shaped like a state:
    ``[..., f_in, f_out]`` and ``[..., 1, f_out]``, as ``(a^T * w) g`` and ``w g``.
    """
    row = weights[..., None, :]  # [..., 1, b]
    return tuple((mm_tn(a * weights[..., None], g), mm(row, g)) for a, g in zip(acts, gs))


def apply_update(state: InnerState, delta: InnerState, scale=None) -> InnerState:
    """``state - scale * delta`` layer by layer (``state - delta`` when ``scale`` is None).

    ``scale`` broadcasts against every leaf (a scalar, or ``[B, 1, 1, 1]``: one per element).
    """
    if scale is None:
        return tuple((w - dw, bias - db) for (w, bias), (dw, db) in zip(state, delta))
    return tuple((w - scale * dw, bias - scale * db) for (w, bias), (dw, db) in zip(state, delta))


def accumulate(acc: InnerState, delta: InnerState) -> InnerState:
    """``acc + delta`` layer by layer (a running sum of weighted gradients)."""
    return tuple((aw + dw, ab + db) for (aw, ab), (dw, db) in zip(acc, delta))


def step(state: InnerState, acts, gs, weights: Float[Array, "*S b"]) -> InnerState:
    """The inner update rule: one gradient step with per-token weights.

    ``W' = W - (weights^T * A)^T G`` and ``bias' = bias - weights G`` per layer, all gradients
    taken at ``state``; with ``weights = tok[-1] * lr`` it is the state after a mini-batch.
    """
    return apply_update(state, weighted_grad_sums(acts, gs, weights))


def init_state(params: InnerState, batch: int) -> InnerState:
    """Tiles per-head initial weights ``[H, ...]`` over the batch: ``[B, H, ...]``, float32."""
    return tuple(
        tuple(jnp.broadcast_to(p.astype(jnp.float32), (batch,) + p.shape) for p in layer)
        for layer in params)
