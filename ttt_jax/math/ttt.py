"""The TTT inner loop over a sequence: dual form per mini-batch, scanned (docs/architecture.md §1.6-1.7).

Inputs are per head and already projected: ``xq, xk, xv: [B, H, L, f]`` float32 and the
per-token learning rates ``lr: [B, H, L]``. Every mini-batch of ``b`` tokens starts from the
state carried by the previous one; every gradient inside it is taken at that state.

Two implementations of the same function:

* ``ttt_dual`` (``[B, H, L, f]``) and ``ttt_dual_tokens`` (token-major ``[B, L, H, f]``, the
  layer's): the dual form, a ``lax.scan`` over mini-batches, a few matmuls per step, with an
  exact shorter final mini-batch when ``L % b != 0``. By default the scan (``scan_tokens``,
  ``ttt_scan.py``) reads each mini-batch from the token-major inputs and writes its outputs in
  place, and is differentiated by hand (``_dual_step_bwd``, ``ttt_step.py``, with the
  mini-batch step ``dual_step``): the backward pass keeps the carried state only every k-th
  mini-batch (1 by default) and recomputes the rest. ``hand_vjp=False`` is the same function
  differentiated by autodiff under ``jax.checkpoint`` (the reference for the tests).
* ``ttt_primal``: the definition, a ``lax.scan`` over tokens that accumulates per-token
  gradients taken at the mini-batch's starting state. Slow; a baseline for benchmarks and the
  basis of streaming decode.

Streaming (chunks that start and end anywhere inside a mini-batch) is in ``ttt_stream.py``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ttt_jax.math import cpu_kernel, inner
from ttt_jax.math.inner import InnerState
from ttt_jax.math.layernorm import layer_norm, layer_norm_lean
from ttt_jax.math.ttt_scan import lane_slices, auto_group, auto_lanes, scan_tokens
from ttt_jax.math.ttt_step import dual_outputs, dual_step

__all__ = ["auto_group", "auto_lanes", "dual_outputs", "dual_step", "primal_token_step", "token_weights",
           "ttt_dual", "ttt_dual_tokens", "ttt_primal"]


def token_weights(learnable_token_idx: Float[Array, "b"]) -> Float[Array, "b"]:
    """``tok[i] = max(0, 1/(i+1) + learnable_token_idx[i])`` (docs/architecture.md §1.4)."""
    b = learnable_token_idx.shape[-1]
    base = 1.0 / jnp.arange(1, b + 1, dtype=jnp.float32)
    return jnp.maximum(0.0, base + learnable_token_idx.astype(jnp.float32))


def _scan(step: Callable, carry, xs, group: int):
    """``lax.scan`` whose steps are rematerialised in the backward pass.

    Each step is wrapped in ``jax.checkpoint``: only its inputs and carried state are saved, and
    its internals are recomputed (cheaper on CPU than storing them, and far less memory). With
    ``group > 0`` only every ``group``-th carried state is saved as well, and each group of
    steps is recomputed from it.
    """
    step = jax.checkpoint(step, prevent_cse=False)
    n = jax.tree.leaves(xs)[0].shape[0]
    if group <= 1 or n <= 1:
        return jax.lax.scan(step, carry, xs)
    group = min(group, n)
    g = n // group
    head = jax.tree.map(lambda x: x[: g * group].reshape((g, group) + x.shape[1:]), xs)
    body = jax.checkpoint(lambda c, x: jax.lax.scan(step, c, x), prevent_cse=False)
    carry, ys = jax.lax.scan(body, carry, head)
    ys = jax.tree.map(lambda y: y.reshape((g * group,) + y.shape[2:]), ys)
    if n % group:
        tail = jax.tree.map(lambda x: x[g * group:], xs)
        carry, ys_tail = jax.lax.scan(step, carry, tail)
        ys = jax.tree.map(lambda y, y_tail: jnp.concatenate([y, y_tail]), ys, ys_tail)
    return carry, ys


def _dual_chunks(state, xs, tok, ln_weight, ln_bias, group, hand_vjp, lanes):
    """``n`` whole mini-batches, token-major ``[B, n, b, H, ...]`` in and ``z_bar`` out.

    ``hand_vjp``: ``scan_tokens``, or on the CPU the native kernel (``cpu_kernel.scan``,
    when ``cpu_kernel.use_kernel``); otherwise the same steps differentiated by autodiff under
    ``jax.checkpoint`` (``_scan``), on inputs transposed to ``[n, B, H, b, ...]``.
    """
    n = xs[0].shape[1]
    if group is None:
        bsz, _, b, heads, f = xs[1].shape
        group = auto_group(state, (bsz, heads, b, f), ln_weight, ln_bias, n)
    if hand_vjp:
        lane_slices(xs[0].shape[3], lanes)  # a bad ``lanes`` is an error whichever scan runs
        group = min(max(group, 1), n)
        if cpu_kernel.use_kernel(state):
            return cpu_kernel.scan(state, xs, tok, ln_weight, ln_bias, group)
        return scan_tokens(state, xs, tok, ln_weight, ln_bias, group, lanes)
    xs = tuple(jnp.moveaxis(jnp.swapaxes(x, 2, 3), 1, 0) for x in xs)  # [n, B, H, b, ...]

    def step(carry, x):
        return dual_step(carry, *x, tok, ln_weight, ln_bias)

    state, z_bar = _scan(step, state, xs, group)  # [n, B, H, b, f]
    return state, jnp.swapaxes(jnp.moveaxis(z_bar, 0, 1), 2, 3)


def ttt_dual_tokens(params: InnerState, xq: Float[Array, "B L H f"], xk: Float[Array, "B L H f"],
                    xv: Float[Array, "B L H f"], lr: Float[Array, "B L H"],
                    learnable_token_idx: Float[Array, "b"], ln_weight: Float[Array, "H f"],
                    ln_bias: Float[Array, "H f"], *, checkpoint_group: int | None = 0,
                    initial_state: InnerState | None = None, hand_vjp: bool = True,
                    lanes: int | None = None):
    """``ttt_dual`` on token-major inputs ``[B, L, H, f]`` (``lr: [B, L, H]``).

    The projections' own layout (``[B, L, d]`` split into heads by a reshape); ``out`` comes
    back ``[B, L, H, f]``. Returns ``(out, state)`` as ``ttt_dual``.
    """
    bsz, length, heads, f = xq.shape
    b = learnable_token_idx.shape[-1]
    tok = token_weights(learnable_token_idx)
    lnw, lnb = ln_weight[:, None, :], ln_bias[:, None, :]  # [H, 1, f]
    state = initial_state if initial_state is not None else inner.init_state(params, bsz)
    lanes = auto_lanes(heads, f) if lanes is None else lanes
    n, r = divmod(length, b)
    parts = []
    if n:
        xs = tuple(x[:, :n * b].reshape(bsz, n, b, *x.shape[2:]) for x in (xq, xk, xv, lr))
        state, z_bar = _dual_chunks(state, xs, tok, lnw, lnb, checkpoint_group, hand_vjp,
                                    lanes)
        parts.append(z_bar.reshape(bsz, n * b, heads, f))
    if r:  # the final partial mini-batch is a shorter mini-batch, no padding (docs/architecture.md §1.7)
        xs = tuple(x[:, n * b:, None] for x in (xq, xk, xv, lr))  # [B, 1, r, ...]
        xs = tuple(jnp.moveaxis(x, 2, 1) for x in xs)
        state, z_bar = _dual_chunks(state, xs, tok[:r], lnw, lnb, 0, hand_vjp, lanes)
        parts.append(z_bar.reshape(bsz, r, heads, f))
    z_bar = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    return xq + layer_norm_lean(z_bar, ln_weight, ln_bias), state


def ttt_dual(params: InnerState, xq: Float[Array, "B H L f"], xk: Float[Array, "B H L f"],
             xv: Float[Array, "B H L f"], lr: Float[Array, "B H L"],
             learnable_token_idx: Float[Array, "b"], ln_weight: Float[Array, "H f"],
             ln_bias: Float[Array, "H f"], *, checkpoint_group: int | None = 0,
             initial_state: InnerState | None = None, hand_vjp: bool = True,
             lanes: int | None = None):
    """TTT over a whole sequence in the dual form.

    Args:
      params: initial inner weights per head, ``W: [H, f_in, f_out]``, ``bias: [H, 1, f_out]``.
      xq, xk, xv: ``[B, H, L, f]`` float32.
      lr: ``[B, H, L]`` per-token learning rates ``ttt_base_lr * sigmoid(.) / f``.
      learnable_token_idx: ``[b]``; its length is the mini-batch size.
      ln_weight, ln_bias: ``[H, f]`` the inner LayerNorm.
      checkpoint_group: keep the carried state only every this many mini-batches in the
        backward pass (0 or 1: every mini-batch; None: ``auto_group``, the least memory). The
        same values and the same recomputation for any choice.
      initial_state: ``[B, H, ...]`` weights to start from instead of tiling ``params``.
      hand_vjp: differentiate the scan by its hand-written derivative (``scan_tokens``);
        False: by autodiff of ``dual_step`` under ``jax.checkpoint``. Same values either way,
        to float rounding.
      lanes: independent chains of heads inside each step of the hand-differentiated scan
        (must divide ``H``); None: ``auto_lanes(H, f)``. The same values for any choice.

    Returns:
      ``(out, state)``: ``out = xq + LN(z_bar)`` of shape ``[B, H, L, f]`` and the inner state
      after the last (possibly partial) mini-batch.
    """
    tokens = (*(jnp.swapaxes(x, 1, 2) for x in (xq, xk, xv)), jnp.swapaxes(lr, 1, 2))
    out, state = ttt_dual_tokens(params, *tokens, learnable_token_idx, ln_weight, ln_bias,
                                 checkpoint_group=checkpoint_group, initial_state=initial_state,
                                 hand_vjp=hand_vjp, lanes=lanes)
    return jnp.swapaxes(out, 1, 2), state


def primal_token_step(carry, x, tok, ln_weight, ln_bias):
    """One token of the primal form; the carry holds the mini-batch's start state.

    Args:
      carry: ``(state0, acc, idx)``: weights at the mini-batch start ``[B, H, ...]``, the
        ``lr``-weighted sum of this mini-batch's gradients so far (same shapes) and the token's
        index inside its mini-batch (an int32 scalar, or ``[B]``: one per batch element).
      x: ``(xq, xk, xv, lr)`` of one token: ``[B, H, f]`` and ``[B, H]``.
      tok: ``[b]`` token weights.
      ln_weight, ln_bias: ``[H, 1, f]``.

    Returns:
      ``(carry', z_bar)`` with ``z_bar: [B, H, f]`` the pre-LN output of the token.
    """
    state0, acc, idx = carry
    xq, xk, xv = (v[..., None, :] for v in x[:3])  # [B, H, 1, f]
    lr = x[3][..., None]  # [B, H, 1]: a mini-batch of one token
    acts, _, gs = inner.loss_grads(state0, xk, xv, ln_weight, ln_bias)
    acc = inner.accumulate(acc, inner.weighted_grad_sums(acts, gs, lr))
    per_row = jnp.shape(idx) + (1, 1, 1)  # a scalar index, or one per batch element [B]
    t = tok[idx].reshape(per_row)
    state_i = inner.apply_update(state0, acc, t)
    _, zq = inner.forward(state_i, xq)
    last = (idx == tok.shape[0] - 1).reshape(per_row)
    state0 = jax.tree.map(lambda new, old: jnp.where(last, new, old), state_i, state0)
    acc = jax.tree.map(lambda a: jnp.where(last, jnp.zeros_like(a), a), acc)
    return (state0, acc, (idx + 1) % tok.shape[0]), zq[-1][..., 0, :]


def ttt_primal(params: InnerState, xq, xk, xv, lr, learnable_token_idx, ln_weight, ln_bias):
    """TTT over a sequence in the primal form: a ``lax.scan`` over tokens.

    Same arguments and outputs as ``ttt_dual`` (without remat or a start state); the returned
    state is the start state of the mini-batch that follows the last whole one.
    """
    bsz = xq.shape[0]
    tok = token_weights(learnable_token_idx)
    lnw, lnb = ln_weight[:, None, :], ln_bias[:, None, :]
    state0 = inner.init_state(params, bsz)
    acc = jax.tree.map(jnp.zeros_like, state0)
    xs = (*(jnp.moveaxis(v, 2, 0) for v in (xq, xk, xv)), jnp.moveaxis(lr, 2, 0))  # [L, B, H, .]

    def step(carry, x):
        return primal_token_step(carry, x, tok, lnw, lnb)

    (state0, _, _), z_bar = jax.lax.scan(step, (state0, acc, jnp.int32(0)), xs)
    z_bar = jnp.moveaxis(z_bar, 0, 2)  # [B, H, L, f]
    return xq + layer_norm(z_bar, lnw, lnb), state0
