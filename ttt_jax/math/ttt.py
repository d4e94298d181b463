"""The TTT inner loop over a sequence: dual form per mini-batch, scanned (docs/architecture.md §1.6-1.7).

Inputs are per head and already projected: ``xq, xk, xv: [B, H, L, f]`` float32 and the
per-token learning rates ``lr: [B, H, L]``. Every mini-batch of ``b`` tokens starts from the
state carried by the previous one; every gradient inside it is taken at that state.

Two implementations of the same function:

* ``ttt_dual``: the dual form, a ``lax.scan`` over mini-batches, a few matmuls per step, with an
  exact shorter final mini-batch when ``L % b != 0``; each step is rematerialised in the
  backward pass, and optionally only every k-th carried state is kept.
* ``ttt_primal``: the definition, a ``lax.scan`` over tokens that accumulates per-token
  gradients taken at the mini-batch's starting state. Slow; a baseline for benchmarks and the
  basis of streaming decode.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ttt_jax.math import inner
from ttt_jax.math.inner import InnerState, mm
from ttt_jax.math.layernorm import layer_norm


def token_weights(learnable_token_idx: Float[Array, "b"]) -> Float[Array, "b"]:
    """``tok[i] = max(0, 1/(i+1) + learnable_token_idx[i])`` (docs/architecture.md §1.4)."""
    b = learnable_token_idx.shape[-1]
    base = 1.0 / jnp.arange(1, b + 1, dtype=jnp.float32)
    return jnp.maximum(0.0, base + learnable_token_idx.astype(jnp.float32))


def _swap(x: Array) -> Array:
    return jnp.swapaxes(x, -1, -2)


def _dual_outputs(state: InnerState, acts, gs, xq, lr, tok, m1=None, acc=None):
    """Pre-LN outputs of one mini-batch frame in the dual form.

    Token ``i`` reads the weights ``state - tok[i] * (acc + sum_{j<=i} lr_j grad_j)``, every
    gradient taken at ``state`` (``acts, gs`` from ``inner.loss_grads`` on the frame's keys).

    Args:
      state: ``[B, H, ...]`` weights; acts, gs: per layer ``[B, H, b, .]``.
      xq: ``[B, H, b, f]``; lr: ``[B, H, b]``; tok: ``[b]``.
      m1: ``[B, H, b, b]`` the first layer's mask ``tril(eta * (xq xk^T + 1))`` if precomputed.
      acc: ``[B, H, ...]`` gradients accumulated before the frame, or None (none).

    Returns:
      ``z_bar: [B, H, b, f]``.
    """
    eta = None
    xbar = xq
    for i, ((w, bias), a, g) in enumerate(zip(state, acts, gs)):
        if i == 0 and m1 is not None:
            m = m1
        else:  # queries of later layers depend on the state: build the mask here
            if eta is None:
                eta = jnp.tril(tok[:, None] * lr[..., None, :])  # [B, H, b, b]
            m = eta * (mm(xbar, _swap(a)) + 1.0)
        z_bar = mm(xbar, w) + bias  # [B, H, b, f_out]
        if acc is not None:
            aw, ab = acc[i]
            z_bar = z_bar - tok[:, None] * (mm(xbar, aw) + ab)
        z_bar = z_bar - mm(m, g)
        if i + 1 < len(state):
            xbar = inner.gelu_tanh(z_bar)
    return z_bar


def dual_step(state: InnerState, xq, xk, xv, lr, m1, tok, ln_weight, ln_bias):
    """One mini-batch in the dual form.

    Args:
      state: inner weights at the mini-batch start, ``W: [B, H, f_in, f_out]``,
        ``bias: [B, H, 1, f_out]``.
      xq, xk, xv: ``[B, H, b, f]``.
      lr: ``[B, H, b]`` per-token learning rates.
      m1: ``[B, H, b, b]`` = ``tril(eta * (xq xk^T + 1))``, precomputed outside the scan.
      tok: ``[b]`` token weights; ``eta[i, j] = tok[i] * lr[j]``.
      ln_weight, ln_bias: ``[H, 1, f]``.

    Returns:
      ``(state', z_bar)``: the state after the mini-batch and the pre-LN outputs ``[B, H, b, f]``.
    """
    acts, _, gs = inner.loss_grads(state, xk, xv, ln_weight, ln_bias)
    z_bar = _dual_outputs(state, acts, gs, xq, lr, tok, m1=m1)
    return inner.step(state, acts, gs, tok[-1] * lr), z_bar


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


def _dual_chunks(state, xq, xk, xv, lr, tok, ln_weight, ln_bias, group):
    """Scans ``n`` whole mini-batches; inputs ``[B, H, n, b, ...]``, output ``[B, H, n, b, f]``."""
    eta = tok[:, None] * lr[..., None, :]  # [B, H, n, b, b]
    m1 = jnp.tril(eta * (mm(xq, _swap(xk)) + 1.0))  # [B, H, n, b, b]
    xs = jax.tree.map(lambda x: jnp.moveaxis(x, 2, 0), (xq, xk, xv, lr, m1))  # [n, B, H, ...]

    def step(carry, x):
        return dual_step(carry, *x, tok, ln_weight, ln_bias)

    state, z_bar = _scan(step, state, xs, group)  # z_bar: [n, B, H, b, f]
    return state, jnp.moveaxis(z_bar, 0, 2)


def ttt_dual(params: InnerState, xq: Float[Array, "B H L f"], xk: Float[Array, "B H L f"],
             xv: Float[Array, "B H L f"], lr: Float[Array, "B H L"],
             learnable_token_idx: Float[Array, "b"], ln_weight: Float[Array, "H f"],
             ln_bias: Float[Array, "H f"], *, checkpoint_group: int = 0,
             initial_state: InnerState | None = None):
    """TTT over a whole sequence in the dual form.

    Args:
      params: initial inner weights per head, ``W: [H, f_in, f_out]``, ``bias: [H, 1, f_out]``.
      xq, xk, xv: ``[B, H, L, f]`` float32.
      lr: ``[B, H, L]`` per-token learning rates ``ttt_base_lr * sigmoid(.) / f``.
      learnable_token_idx: ``[b]``; its length is the mini-batch size.
      ln_weight, ln_bias: ``[H, f]`` the inner LayerNorm.
      checkpoint_group: keep the carried state only every this many mini-batches in the
        backward pass (0 or 1: every mini-batch).
      initial_state: ``[B, H, ...]`` weights to start from instead of tiling ``params``.

    Returns:
      ``(out, state)``: ``out = xq + LN(z_bar)`` of shape ``[B, H, L, f]`` and the inner state
      after the last (possibly partial) mini-batch.
    """
    bsz, heads, length, f = xq.shape
    b = learnable_token_idx.shape[-1]
    tok = token_weights(learnable_token_idx)
    lnw, lnb = ln_weight[:, None, :], ln_bias[:, None, :]  # [H, 1, f]
    state = initial_state if initial_state is not None else inner.init_state(params, bsz)
    n, r = divmod(length, b)
    outs = []
    if n:
        cut = n * b
        full = [x[:, :, :cut].reshape(bsz, heads, n, b, *x.shape[3:]) for x in (xq, xk, xv, lr)]
        state, z_bar = _dual_chunks(state, *full, tok, lnw, lnb, checkpoint_group)
        outs.append(z_bar.reshape(bsz, heads, cut, f))  # [B, H, n*b, f]
    if r:  # the final partial mini-batch is a shorter mini-batch, no padding (docs/architecture.md §1.7)
        part = [x[:, :, n * b:, None] for x in (xq, xk, xv, lr)]  # [B, H, r, 1, ...]
        part = [jnp.swapaxes(x, 2, 3) for x in part]  # [B, H, 1, r, ...]
        state, z_bar = _dual_chunks(state, *part, tok[:r], lnw, lnb, 0)
        outs.append(z_bar.reshape(bsz, heads, r, f))
    z_bar = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    return xq + layer_norm(z_bar, lnw, lnb), state


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


# --- Streaming: chunks that start and end anywhere inside a mini-batch -----------------------
#
# A stream's TTT state between tokens is ``(state0, acc, phase)``: the weights at the last
# mini-batch boundary, the lr-weighted sum of the gradients of the ``phase`` tokens seen since
# (all taken at ``state0``), and ``phase = tokens since the boundary``. The weights that token
# ``i`` of a mini-batch reads are ``state0 - tok[i] * (acc + sum_{j<=i} lr_j grad_j)``, so a
# chunk that starts at phase ``p`` is the dual form with the known ``acc`` term added.


def _dual_step_acc(state0, acc, xq, xk, xv, lr, tok, ln_weight, ln_bias):
    """One mini-batch frame in the dual form, starting from accumulated gradients ``acc``.

    Args:
      state0, acc: ``[B, H, ...]`` weights at the boundary and gradients accumulated so far.
      xq, xk, xv: ``[B, H, b, f]``; ``lr: [B, H, b]`` (zero for tokens that are not in the
        frame: those contribute no gradient).
      tok: ``[b]`` token weights.

    Returns:
      ``(acc', z_bar)``: the accumulator after the frame and the pre-LN outputs ``[B, H, b, f]``.
    """
    acts, _, gs = inner.loss_grads(state0, xk, xv, ln_weight, ln_bias)
    z_bar = _dual_outputs(state0, acts, gs, xq, lr, tok, acc=acc)
    return inner.accumulate(acc, inner.weighted_grad_sums(acts, gs, lr)), z_bar


def ttt_stream(state0: InnerState, acc: InnerState, phase, xq, xk, xv, lr, lengths,
               learnable_token_idx, ln_weight, ln_bias):
    """Continues a stream by a chunk of tokens, exactly, from any phase.

    Element ``e`` of the batch has already seen ``phase[e]`` tokens of its current mini-batch
    (their gradients summed in ``acc``) and now reads the first ``lengths[e]`` tokens of the
    chunk; the rest of its chunk is ignored (their outputs are meaningless and they leave the
    state untouched). Each element's tokens are laid out in frames of ``b`` aligned with its own
    mini-batches (slots before ``phase[e]`` and after its last token are empty, with zero
    learning rate), so every element keeps its own boundaries.

    Args:
      state0, acc: ``[B, H, ...]`` boundary weights and accumulated gradients.
      phase: ``[B]`` int32 in ``[0, b)``.
      xq, xk, xv: ``[B, H, n, f]``; ``lr: [B, H, n]``.
      lengths: ``[B]`` int32 in ``[0, n]``.
      learnable_token_idx: ``[b]``; ln_weight, ln_bias: ``[H, f]``.

    Returns:
      ``(out, (state0', acc', phase'))`` with ``out = xq + LN(z_bar)`` of shape ``[B, H, n, f]``.
    """
    bsz, heads, n, f = xq.shape
    b = learnable_token_idx.shape[-1]
    tok = token_weights(learnable_token_idx)
    lnw, lnb = ln_weight[:, None, :], ln_bias[:, None, :]
    frames = (n + 2 * b - 2) // b  # enough for any phase in [0, b)
    slot = jnp.arange(frames * b, dtype=jnp.int32)
    src = slot[None, :] - phase[:, None]  # [B, T]: chunk index held by each slot
    valid = (src >= 0) & (src < lengths[:, None])
    take = jnp.clip(src, 0, n - 1)[:, None, :]  # [B, 1, T]

    def lay_out(x):
        if x.ndim == 4:
            y = jnp.take_along_axis(x, take[..., None], axis=2)
            y = jnp.where(valid[:, None, :, None], y, 0.0)
        else:
            y = jnp.where(valid[:, None, :], jnp.take_along_axis(x, take, axis=2), 0.0)
        return jnp.moveaxis(y.reshape(bsz, heads, frames, b, *y.shape[3:]), 2, 0)

    xs = tuple(lay_out(x) for x in (xq, xk, xv, lr))  # [F, B, H, b, ...]
    complete = jnp.moveaxis(valid[:, b - 1::b], 1, 0)  # [F, B]: the frame's last slot is filled

    def step(carry, x):
        w0, a0 = carry
        *frame, done = x
        a1, z_bar = _dual_step_acc(w0, a0, *frame, tok, lnw, lnb)
        done = done[:, None, None, None]
        w1 = inner.apply_update(w0, a1, tok[-1])
        w0 = jax.tree.map(lambda new, old: jnp.where(done, new, old), w1, w0)
        a0 = jax.tree.map(lambda a: jnp.where(done, jnp.zeros_like(a), a), a1)
        return (w0, a0), z_bar

    (state0, acc), z_bar = jax.lax.scan(step, (state0, acc), (*xs, complete))
    z_bar = jnp.moveaxis(z_bar, 0, 2).reshape(bsz, heads, frames * b, f)
    back = (phase[:, None] + jnp.arange(n, dtype=jnp.int32))[:, None, :, None]  # [B, 1, n, 1]
    z_bar = jnp.take_along_axis(z_bar, back, axis=2)
    out = xq + layer_norm(z_bar, lnw, lnb)
    return out, (state0, acc, (phase + lengths) % b)


def ttt_token(state0: InnerState, acc: InnerState, phase, xq, xk, xv, lr,
              learnable_token_idx, ln_weight, ln_bias):
    """One token per batch element in the primal form (streaming decode's step).

    Args as ``ttt_stream`` with one token: ``xq, xk, xv: [B, H, f]``, ``lr: [B, H]``.

    Returns:
      ``(out [B, H, f], (state0', acc', phase'))``.
    """
    tok = token_weights(learnable_token_idx)
    lnw, lnb = ln_weight[:, None, :], ln_bias[:, None, :]
    (state0, acc, phase), z_bar = primal_token_step((state0, acc, phase), (xq, xk, xv, lr), tok,
                                                    lnw, lnb)
    return xq + layer_norm(z_bar, ln_weight, ln_bias), (state0, acc, phase)
