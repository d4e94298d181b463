"""Next-token cross-entropy, of materialised logits or fused with the LM head (docs/architecture.md §2).

``cross_entropy(logits, targets, mask)`` takes the loss of whole logits.
``fused_cross_entropy(h, w, targets, mask)`` is ``sum_t mask_t * (logsumexp(h_t W) - (h_t W)[y_t])``
without the ``[N, V]`` logits ever being whole: a ``lax.scan`` over chunks of ``chunk`` tokens
computes each chunk's logits in float32, its loss, and, when differentiated, its share of both
gradients at once (``dlogits = mask * (softmax - onehot)``, ``dh = dlogits W^T``,
``dW += h^T dlogits``), so the backward pass only scales them by the incoming cotangent. Same
matmuls as the unfused loss (logits, ``dh``, ``dW``); the memory of the head is that of one
chunk's logits instead of several ``[N, V]`` float32 arrays (about 0.5 GiB each at
``N = 4096``, ``V = 32000``). Where ``cpu_kernel.available()`` (a single CPU device), the
softmax part of each chunk is one native call (``csrc/xent_cpu.cc``) that turns the logits into
``dlogits`` in place, row by row (docs/architecture.md §2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from ttt_jax.math import cpu_kernel

# Tokens per chunk by default: a 1024 x 32000 float32 chunk of logits is 125 MiB.
DEFAULT_CHUNK = 1024
# Below this many logits per thread the native softmax pass runs on one thread.
_MIN_SOFTMAX_PER_THREAD = 1 << 16


def cross_entropy(logits: Float[Array, "B L V"], targets: Int[Array, "B L"],
                  mask: Float[Array, "B L"] | None = None) -> tuple[Array, Array]:
    """Summed token cross-entropy of materialised logits and the number of counted tokens.

    Args:
      logits: ``[B, L, V]`` float32.
      targets: ``[B, L]`` int.
      mask: optional ``[B, L]`` weights (e.g. only the answer positions of a recall task).
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, L]
    if mask is None:
        return jnp.sum(losses), jnp.asarray(losses.size, jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask)


def _dot(a, b, contract_a: int, contract_b: int):  # float32 operands
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _logits(h, w, vocab_axis: int):
    """``[c, d] x W -> [c, V]`` float32; ``W`` is ``[V, d]`` (``vocab_axis=0``) or ``[d, V]``."""
    return _dot(h, w, 1, 1 - vocab_axis)


def _chunks(h, targets, mask, chunk: int):
    """``[n, chunk, ...]`` views, the last chunk padded with zero-weight tokens."""
    n_tok = h.shape[0]
    pad = -n_tok % chunk
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        targets = jnp.pad(targets, (0, pad))
        mask = jnp.pad(mask, (0, pad))
    n = (n_tok + pad) // chunk
    return h.reshape(n, chunk, -1), targets.reshape(n, chunk), mask.reshape(n, chunk)


def _chunk_loss(logits, targets, mask):
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jnp.sum(mask * (lse - picked)), lse


def _softmax_xent_native(logits, targets, mask, threads: int):
    """``(dlogits, losses)`` of one chunk in the native library (``csrc/xent_cpu.cc``):
    ``mask * (softmax - onehot)`` in place of the logits, and ``mask * (lse - picked)``; the
    rows shared by up to ``threads`` of XLA's threads."""
    rows = logits.shape[0]
    out = (jax.ShapeDtypeStruct(logits.shape, jnp.float32),
           jax.ShapeDtypeStruct((rows,), jnp.float32))
    call = jax.ffi.ffi_call("ttt_jax_softmax_xent", out, vmap_method="sequential",
                            input_output_aliases={0: 0})
    return call(logits, targets.astype(jnp.int32), mask, threads=np.int64(threads))


def _plain(h, w, targets, mask, chunk, vocab_axis, native_threads):
    hs, ts, ms = _chunks(h.astype(jnp.float32), targets, mask, chunk)
    w = w.astype(jnp.float32)

    def step(total, xs):
        hc, tc, mc = xs
        loss, _ = _chunk_loss(_logits(hc, w, vocab_axis), tc, mc)
        return total + loss, None

    total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), (hs, ts, ms))
    return total


def _fwd(h, w, targets, mask, chunk, vocab_axis, native_threads):
    h_dtype, w_dtype = h.dtype, w.dtype
    hs, ts, ms = _chunks(h.astype(jnp.float32), targets, mask, chunk)
    w = w.astype(jnp.float32)

    def step(carry, xs):
        total, dw = carry
        hc, tc, mc = xs
        logits = _logits(hc, w, vocab_axis)
        if native_threads:
            dlogits, losses = _softmax_xent_native(logits, tc, mc, native_threads)
            loss = jnp.sum(losses)
        else:
            loss, lse = _chunk_loss(logits, tc, mc)
            # the mask scales the softmax in the same pass; the one-hot part is then c writes
            dlogits = jnp.exp(logits - lse[:, None]) * mc[:, None]
            dlogits = dlogits.at[jnp.arange(tc.shape[0]), tc].add(-mc)
        dh = _dot(dlogits, w, 1, vocab_axis)  # [c, d]
        # dW: h^T dlogits laid out as W
        dw = dw + (_dot(dlogits, hc, 0, 0) if vocab_axis == 0 else _dot(hc, dlogits, 0, 0))
        return (total + loss, dw), dh

    init = (jnp.zeros((), jnp.float32), jnp.zeros(w.shape, jnp.float32))
    (total, dw), dh = jax.lax.scan(step, init, (hs, ts, ms))
    dh = dh.reshape(-1, h.shape[1])[: h.shape[0]]
    return total, (dh.astype(h_dtype), dw.astype(w_dtype), targets, mask)


def _bwd(chunk, vocab_axis, native_threads, res, g):
    del chunk, vocab_axis, native_threads
    dh, dw, targets, mask = res
    d_targets = np.zeros(targets.shape, jax.dtypes.float0)
    return (g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), d_targets, jnp.zeros_like(mask)


_fused = jax.custom_vjp(_plain, nondiff_argnums=(4, 5, 6))
_fused.defvjp(_fwd, _bwd)


def fused_cross_entropy(h: Float[Array, "N d"], w: Float[Array, "..."],
                        targets: Int[Array, "N"], mask: Float[Array, "N"] | None = None, *,
                        chunk: int = DEFAULT_CHUNK, vocab_axis: int = 0):
    """``(loss_sum, count)`` of the cross-entropy of ``logits = h W`` against ``targets``.

    Args:
      h: ``[N, d]`` final hidden states (the LM head's input), any float dtype.
      w: the head's weight, ``[V, d]`` (``vocab_axis=0``: a tied embedding table) or ``[d, V]``
        (``vocab_axis=1``: a ``Dense`` kernel).
      targets: ``[N]`` integer ids in ``[0, V)``.
      mask: ``[N]`` per-token weights, or None (every token counts once).
      chunk: tokens per chunk (the last one padded with zero-weight tokens).

    Returns:
      ``(sum_t mask_t * loss_t, sum_t mask_t)`` float32, as ``ttt_jax.training.cross_entropy``
      on the materialised logits; differentiable in ``h`` and ``w`` (not in ``mask``).
    """
    if vocab_axis not in (0, 1):
        raise ValueError(f"vocab_axis: expected 0 ([V, d] weight) or 1 ([d, V]), got {vocab_axis}")
    if h.ndim != 2 or w.ndim != 2 or h.shape[1] != w.shape[1 - vocab_axis]:
        raise ValueError(f"fused_cross_entropy: h {list(h.shape)} and w {list(w.shape)} "
                         f"(vocab_axis={vocab_axis}) do not share the model dim")
    if chunk <= 0:
        raise ValueError(f"chunk: expected a positive number of tokens, got {chunk}")
    # Decided here, outside the jit, so that each setting gets its own trace: the native
    # softmax pass and its threads for one chunk, or 0 for XLA's ops.
    native_threads = 0
    if cpu_kernel.available():
        rows = min(chunk, h.shape[0])
        native_threads = cpu_kernel.threads(rows * w.shape[vocab_axis], _MIN_SOFTMAX_PER_THREAD)
    return _fused_cross_entropy(h, w, targets, mask, chunk=chunk, vocab_axis=vocab_axis,
                                native_threads=native_threads)


@functools.partial(jax.jit, static_argnames=("chunk", "vocab_axis", "native_threads"))
def _fused_cross_entropy(h, w, targets, mask, *, chunk: int, vocab_axis: int,
                         native_threads: int):
    weights = (jnp.ones(targets.shape, jnp.float32) if mask is None
               else mask.astype(jnp.float32))
    chunk = min(chunk, h.shape[0])
    total = _fused(h, w, targets.astype(jnp.int32), weights, chunk, vocab_axis, native_threads)
    return total, jnp.sum(weights)
