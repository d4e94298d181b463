"""Causal sliding-window attention with absolute-position RoPE: the ``swa`` sequence layer.

Multi-head attention (``ttt.num_heads`` heads of ``ttt.head_dim``) where token ``i`` attends to
tokens ``j`` with ``0 <= i - j < attention_window``, queries and keys rotated by standard RoPE
over their absolute positions (``ttt.rope_theta``, ``ttt.rope_layout``). Param names
``q_proj k_proj v_proj o_proj`` (Dense kernels ``[d, d]``, no biases).

The attention is computed in blocks of ``attention_window`` queries, each against its own block
and the previous one, so time and memory grow linearly with the length.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttt_jax.config import ModelConfig
from ttt_jax.math.dense import dense_dot
from ttt_jax.math.rope import position_angles, rotate
from ttt_jax.types import SequenceMetadata


def sliding_window_attention(q, k, v, window: int):
    """Causal attention where query ``i`` sees keys ``j`` with ``0 <= i - j < window``.

    Args:
      q, k, v: ``[B, H, L, f]`` float32 (queries and keys already rotated).
      window: the number of keys each query sees (itself included).

    Returns:
      ``[B, H, L, f]`` float32.
    """
    bsz, heads, length, f = q.shape
    w = min(window, length)  # block size; with w == L there is a single block
    n = -(-length // w)
    pad = n * w - length
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q, k, v))
    qb = q.reshape(bsz, heads, n, w, f)
    kb, vb = (x.reshape(bsz, heads, n, w, f) for x in (k, v))
    prev = lambda x: jnp.pad(x, ((0, 0), (0, 0), (1, 0), (0, 0), (0, 0)))[:, :, :-1]
    kc = jnp.concatenate([prev(kb), kb], axis=3)  # [B, H, n, 2w, f]
    vc = jnp.concatenate([prev(vb), vb], axis=3)
    a = jnp.arange(w)[:, None]
    c = jnp.arange(2 * w)[None, :]
    dist = w + a - c  # i - j for query a of a block and key c of its (previous, own) pair
    visible = (dist >= 0) & (dist < window)  # [w, 2w]
    first = visible & (c >= w)  # block 0 has no previous block
    mask = jnp.concatenate([first[None], jnp.broadcast_to(visible, (n - 1, w, 2 * w))])
    scores = jnp.einsum("bhnaf,bhncf->bhnac", qb, kc,
                        precision=jax.lax.Precision.HIGHEST) / math.sqrt(f)
    scores = jnp.where(mask, scores, -jnp.inf)  # [B, H, n, w, 2w]
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhnac,bhncf->bhnaf", probs, vc, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(bsz, heads, n * w, f)[:, :, :length]


class SlidingWindowAttention(nn.Module):
    """Multi-head causal sliding-window attention with absolute-position RoPE.

    Attributes:
      config: the model config (``attention_window`` and the width, heads and RoPE of ``ttt``).
      dtype: compute dtype of the projections; the attention runs in float32.
    """

    config: ModelConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, metadata: Optional[SequenceMetadata] = None):
        cfg = self.config
        t = cfg.ttt
        bsz, length, d = x.shape
        if d != t.model_dim:
            raise ValueError(f"SlidingWindowAttention expects x of shape [B, L, model_dim="
                             f"{t.model_dim}], got {x.shape}")
        normal = nn.initializers.normal(t.initializer_range)
        dense = lambda name: nn.Dense(d, use_bias=False, dtype=self.dtype, kernel_init=normal,
                                      name=name, dot_general=dense_dot)

        def heads(y):  # [B, L, d] -> [B, H, L, f] float32
            y = y.reshape(bsz, length, t.num_heads, t.head_dim)
            return jnp.transpose(y, (0, 2, 1, 3)).astype(jnp.float32)

        q, k, v = heads(dense("q_proj")(x)), heads(dense("k_proj")(x)), heads(dense("v_proj")(x))
        meta = metadata if metadata is not None else SequenceMetadata()
        cos, sin = position_angles(meta.positions(bsz, length), t.head_dim, t.rope_theta)
        q, k = rotate(q, cos, sin, t.rope_layout), rotate(k, cos, sin, t.rope_layout)
        out = sliding_window_attention(q, k, v, cfg.attention_window)  # [B, H, L, f]
        out = jnp.transpose(out, (0, 2, 1, 3)).reshape(bsz, length, d)
        return dense("o_proj")(out.astype(self.dtype))
