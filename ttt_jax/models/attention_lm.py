"""A sliding-window attention LM: the TTT-LM's blocks with causal local attention instead of TTT.

The long-context baseline (``model.seq_modeling: swa``). Everything but the sequence layer is
the TTT-LM's: ``embed_tokens -> layers_{i} -> norm -> lm_head`` with blocks (optional pre-conv)
``x += seq_modeling_block(seq_norm(x))``, ``x += mlp(ffn_norm(x))``. The sequence layer is
multi-head attention (``ttt.num_heads`` heads of ``ttt.head_dim``) where token ``i`` attends to
tokens ``j`` with ``0 <= i - j < attention_window``, queries and keys rotated by standard RoPE
over their absolute positions (``ttt.rope_theta``, ``ttt.rope_layout``).

The attention is computed in blocks of ``attention_window`` queries, each against its own block
and the previous one, so time and memory grow linearly with the length. Because a token never
looks further back than the window, the logits of tokens ``[s, e)`` computed from the tokens
``[s - context_needed, e)`` (with their absolute positions) equal those of the whole sequence:
the receptive field grows by a window per layer, see :func:`context_needed`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttt_jax.config import ModelConfig
from ttt_jax.math.rope import position_angles, rotate
from ttt_jax.nn.layers import PreConv, RMSNorm, SwiGLU
from ttt_jax.types import SequenceMetadata


def context_needed(cfg: ModelConfig) -> int:
    """Tokens before a position that can influence its logits: per layer ``window - 1``, plus
    ``conv_kernel - 1`` with the pre-conv."""
    conv = cfg.ttt.conv_kernel - 1 if cfg.pre_conv else 0
    return cfg.num_layers * (cfg.attention_window - 1 + conv)


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
    """Multi-head causal sliding-window attention with absolute-position RoPE."""

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
                                      name=name)

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


class AttentionBlock(nn.Module):
    """Optional ``x += conv(x)`` (pre-conv), ``x += attention(seq_norm(x))``,
    ``x += mlp(ffn_norm(x))``: the TTT-LM block with attention in place of TTT."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, metadata: Optional[SequenceMetadata] = None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if cfg.pre_conv:
            x = x + PreConv(cfg.ttt.conv_kernel, cfg.rms_norm_eps, dtype, name="conv")(x)
        h = RMSNorm(cfg.rms_norm_eps, name="seq_norm")(x)
        x = x + SlidingWindowAttention(cfg, dtype, name="seq_modeling_block")(h, metadata)
        h = RMSNorm(cfg.rms_norm_eps, name="ffn_norm")(x)
        return x + SwiGLU(cfg.intermediate_size, cfg.ttt.initializer_range, dtype, name="mlp")(h)


class AttentionLM(nn.Module):
    """A causal LM of sliding-window attention blocks: tokens ``[B, L]`` -> logits ``[B, L, V]``."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, metadata: Optional[SequenceMetadata] = None):
        cfg = self.config
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"AttentionLM expects integer token ids of shape [B, L], got "
                             f"{tokens.dtype}{list(tokens.shape)}")
        dtype = jnp.dtype(cfg.dtype)
        init = nn.initializers.normal(cfg.ttt.initializer_range)
        embed = nn.Embed(cfg.vocab_size, cfg.model_dim, dtype=dtype, embedding_init=init,
                         name="embed_tokens")
        x = embed(tokens)
        for i in range(cfg.num_layers):
            x = AttentionBlock(cfg, name=f"layers_{i}")(x, metadata)
        x = RMSNorm(cfg.rms_norm_eps, name="norm")(x)
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, kernel_init=init,
                              name="lm_head")(x)
        return logits.astype(jnp.float32)
