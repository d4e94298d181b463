"""Moshi's streaming transformer pieces in Linen, with the ``moshi`` package's semantics.

Facts taken from ``moshi.modules.transformer`` (moshi 0.2.13), which the parity tests check:

* ``RMSNorm``: ``y = x * alpha * rsqrt(eps + mean(x^2))`` with ``alpha`` ones (torch shape
  ``[1, 1, d]``, ours ``[d]``); ``rms_norm`` computes in the input dtype with eps 1e-5,
  ``rms_norm_f32`` in float32 with eps 1e-8.
* Attention: one fused ``in_proj`` without bias whose output splits as ``(p h f)``: Q, K, V
  blocks of ``d`` columns, each ``H`` heads of ``f``; ``out_proj`` without bias.
* RoPE over absolute positions, interleaved pairs ``(2k, 2k+1)``, frequency
  ``max_period^(-2k/f)``, on Q and K.
* Causal mask with a window: query at position ``p`` sees key positions ``p - context < q <= p``.
  Streaming keeps a KV cache of exactly ``context`` entries (moshi's ring buffer).
* Gated FFN: ``linear_out(silu(h[:, :H]) * h[:, H:])`` with ``h = linear_in(x)`` of width ``2H``.
* ``LayerScale``: a per-channel ``scale`` on each residual branch when ``layer_scale`` is set.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttt_jax.nn.lora import LoRAConfig, dense
from ttt_jax.math.rope import inv_frequencies, rotate
from ttt_jax.moshi.config import MoshiTransformerConfig

# Mask value for disallowed attention scores (finite, so fully masked rows stay NaN-free).
MASK_VALUE = -1e30


class MoshiRMSNorm(nn.Module):
    """moshi's RMSNorm: ``x * alpha * rsqrt(eps + mean(x^2))``.

    Attributes:
      eps: added to the mean square.
      float32: normalise in float32 (``rms_norm_f32``) rather than the input dtype.
    """

    eps: float
    float32: bool = True

    @nn.compact
    def __call__(self, x):
        alpha = self.param("alpha", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        h = x.astype(jnp.float32) if self.float32 else x
        var = self.eps + jnp.mean(jnp.square(h), axis=-1, keepdims=True)
        return (h * (alpha.astype(var.dtype) * jax.lax.rsqrt(var))).astype(x.dtype)


def make_norm(cfg: MoshiTransformerConfig) -> MoshiRMSNorm:
    """The norm ``cfg.norm`` names (assign it to a ``setup`` attribute, which names it)."""
    return MoshiRMSNorm(cfg.norm_eps, cfg.norm == "rms_norm_f32")


def rope_absolute(x, positions, max_period: float):
    """Rotates ``x: [B, H, T, f]`` by absolute ``positions: [B, T]`` (interleaved pairs)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_frequencies(x.shape[-1], max_period)
    return rotate(x, jnp.cos(angles), jnp.sin(angles), "interleaved")


def window_mask(pos_q, pos_k, context):
    """``[B, Tq, Tk]``: key valid (pos >= 0), not in the future, and within ``context``."""
    delta = pos_q[:, :, None] - pos_k[:, None, :]
    mask = (pos_k[:, None, :] >= 0) & (delta >= 0)
    if context is not None:
        mask = mask & (delta < context)
    return mask


class MoshiAttention(nn.Module):
    """Causal multi-head self-attention with RoPE and a context window; full and streaming.

    Attributes:
      config: the backbone config.
      dtype: compute dtype of the projections.
    """

    config: MoshiTransformerConfig
    dtype: Any = jnp.float32
    lora: Optional[LoRAConfig] = None

    def setup(self):
        d = self.config.d_model
        init = nn.initializers.normal(0.02)
        where = "/".join(self.path)
        self.in_proj = dense(3 * d, self.lora, where, name="in_proj", dtype=self.dtype,
                             kernel_init=init)
        self.out_proj = dense(d, self.lora, where, name="out_proj", dtype=self.dtype,
                              kernel_init=init)

    def _qkv(self, x, positions):
        cfg = self.config
        bsz, length, _ = x.shape
        qkv = self.in_proj(x).reshape(bsz, length, 3, cfg.num_heads, cfg.head_dim)
        q, k, v = (jnp.transpose(qkv[:, :, i], (0, 2, 1, 3)) for i in range(3))  # [B, H, T, f]
        if cfg.positional_embedding == "rope":
            q = rope_absolute(q, positions, cfg.max_period)
            k = rope_absolute(k, positions, cfg.max_period)
        return q, k, v

    def _attend(self, q, k, v, mask):
        scale = 1.0 / jnp.sqrt(jnp.float32(self.config.head_dim))
        scores = jnp.einsum("bhqf,bhkf->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
        scores = jnp.where(mask[:, None], scores * scale, MASK_VALUE)
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bhkf->bhqf", weights, v.astype(jnp.float32))
        bsz, _, length, _ = out.shape
        out = jnp.transpose(out, (0, 2, 1, 3)).reshape(bsz, length, self.config.d_model)
        return self.out_proj(out.astype(self.dtype))

    def __call__(self, x, positions):
        """Args: x ``[B, T, d]``; positions ``[B, T]`` absolute. Returns ``[B, T, d]``."""
        q, k, v = self._qkv(x, positions)
        return self._attend(q, k, v, window_mask(positions, positions, self.config.context))

    def stream(self, x, positions, cache):
        """Streaming: attend over the cached ``context`` keys plus the new ones.

        Args:
          x: ``[B, T, d]`` new frames (any ``T >= 1``).
          positions: ``[B, T]`` their absolute positions.
          cache: ``{"k", "v": [B, H, C, f], "pos": [B, C]}`` (``pos = -1``: empty slot).

        Returns:
          ``(y [B, T, d], cache)`` with the cache holding the last ``C`` keys.
        """
        q, k, v = self._qkv(x, positions)
        keys = jnp.concatenate([cache["k"], k.astype(cache["k"].dtype)], axis=2)
        values = jnp.concatenate([cache["v"], v.astype(cache["v"].dtype)], axis=2)
        pos_k = jnp.concatenate([cache["pos"], positions.astype(jnp.int32)], axis=1)
        y = self._attend(q, keys, values, window_mask(positions, pos_k, self.config.context))
        c = cache["pos"].shape[1]
        return y, {"k": keys[:, :, -c:], "v": values[:, :, -c:], "pos": pos_k[:, -c:]}


def init_attention_cache(cfg: MoshiTransformerConfig, batch: int, dtype=jnp.float32) -> dict:
    """An empty KV cache of ``context`` slots per layer (moshi needs a context to stream too)."""
    if cfg.context is None:
        raise ValueError("transformer.context=None is invalid for streaming: expected a "
                         "positive context (the KV cache holds exactly `context` frames)")
    shape = (batch, cfg.num_heads, cfg.context, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "pos": jnp.full((batch, cfg.context), -1, jnp.int32)}


class MoshiGating(nn.Module):
    """The gated SiLU FFN: ``linear_out(silu(a) * b)`` with ``[a, b] = linear_in(x)``."""

    config: MoshiTransformerConfig
    dtype: Any = jnp.float32
    lora: Optional[LoRAConfig] = None

    @nn.compact
    def __call__(self, x):
        cfg, init = self.config, nn.initializers.normal(0.02)
        hidden, where = cfg.hidden_size, "/".join(self.path)
        h = dense(2 * hidden, self.lora, where, name="linear_in", dtype=self.dtype,
                  kernel_init=init)(x)
        h = nn.silu(h[..., :hidden]) * h[..., hidden:]
        return dense(cfg.d_model, self.lora, where, name="linear_out", dtype=self.dtype,
                     kernel_init=init)(h)


class LayerScale(nn.Module):
    """Per-channel ``scale * x`` (initial value ``init``)."""

    init: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.constant(self.init), (x.shape[-1],),
                           jnp.float32)
        return scale.astype(x.dtype) * x
