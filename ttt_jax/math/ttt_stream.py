"""Streaming TTT: chunks of tokens that start and end anywhere inside a mini-batch
(docs/architecture.md §1.6-1.7; the layer's ``TTTLayer.stream``).

A stream's TTT state between tokens is ``(state0, acc, phase)``: the weights at the last
mini-batch boundary, the lr-weighted sum of the gradients of the ``phase`` tokens seen since
(all taken at ``state0``), and ``phase = tokens since the boundary``. The weights that token
``i`` of a mini-batch reads are ``state0 - tok[i] * (acc + sum_{j<=i} lr_j grad_j)``, so a
chunk that starts at phase ``p`` is the dual form with the known ``acc`` term added.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ttt_jax.math import inner
from ttt_jax.math.inner import InnerState
from ttt_jax.math.layernorm import layer_norm
from ttt_jax.math.ttt import primal_token_step, token_weights
from ttt_jax.math.ttt_step import dual_outputs


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
    z_bar = dual_outputs(state0, acts, gs, xq, lr, tok, acc=acc)
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
