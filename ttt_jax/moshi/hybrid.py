"""The Moshi-TTT hybrid (docs/architecture.md §2): Moshi's streaming transformer with TTT sub-blocks.

A layer is ``x += ls1(attn(norm1(x)))``, then, in the grafted layers,
``x += tanh(alpha) * TTT(x)`` (the raw residual stream, or ``RMSNorm(x)`` with
``ttt.pre_norm``), then ``x += ls2(gating(norm2(x)))``. Param tree, per layer ``layers_{i}``:
``norm1/alpha``, ``self_attn/{in_proj,out_proj}/kernel``, ``norm2/alpha``,
``gating/{linear_in,linear_out}/kernel``, optional ``layer_scale_{1,2}/scale``, and in a grafted
layer ``seq_modeling_block/ttt_layer/...`` (a ``TTTLayer``) and
``seq_modeling_block/forward_ssm_gating/gating_alpha`` (the Moshi-TTT names).

The whole model (``MoshiTTTLM``): ``K`` token streams, one embedding ``emb_{k}`` each, summed
per frame -> ``transformer`` -> ``out_norm`` -> one head ``linears_{k}`` per stream.

Streaming: ``init_cache`` then ``stream`` frame chunks; the attention keeps a KV cache of
``context`` frames, a grafted layer its TTT state (``TTTLayer.stream``), and the output equals
the full forward.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttt_jax.moshi.config import MoshiTTTConfig
from ttt_jax.moshi.transformer import (MASK_VALUE, LayerScale, MoshiAttention, MoshiGating,
                                       init_attention_cache, make_norm)
from ttt_jax.nn.ttt_layer import TTTLayer
from ttt_jax.types import SequenceMetadata


class TTTBlock(nn.Module):
    """``tanh(alpha) * TTT(x)``: the grafted sub-block (the caller adds the residual).

    With ``ttt.noop_init`` the TTT layer's ``o_proj`` kernel is initialised to zeros, so a
    freshly initialised block adds exactly nothing.

    Attributes:
      config: the model config (its ``ttt`` args and width).
      dtype: compute dtype.
    """

    config: MoshiTTTConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg, args = self.config, self.config.ttt
        self.ttt_layer = TTTLayer(cfg.ttt_config, self.dtype, noop_init=args.noop_init)
        self.forward_ssm_gating = GatingAlpha(args.initial_gating_alpha)
        if args.pre_norm:
            self.ttt_norm = make_norm(cfg.transformer)

    def _input(self, x):
        return self.ttt_norm(x) if self.config.ttt.pre_norm else x

    def __call__(self, x, positions):
        y = self.ttt_layer(self._input(x), SequenceMetadata(position_ids=positions))
        return self.forward_ssm_gating(y)

    def init_cache(self, batch: int):
        return self.ttt_layer.init_cache(batch)

    def stream(self, x, cache):
        y, cache = self.ttt_layer.stream(self._input(x), cache)
        return self.forward_ssm_gating(y), cache


class GatingAlpha(nn.Module):
    """``tanh(gating_alpha) * x`` with a per-channel ``gating_alpha`` (Moshi-TTT's SSMGating)."""

    init: float

    @nn.compact
    def __call__(self, x):
        alpha = self.param("gating_alpha", nn.initializers.constant(self.init), (x.shape[-1],),
                           jnp.float32)
        return jnp.tanh(alpha).astype(x.dtype) * x


class HybridLayer(nn.Module):
    """One Moshi layer, with a TTT sub-block between attention and FFN when ``grafted``."""

    config: MoshiTTTConfig
    grafted: bool = False

    def setup(self):
        t, dtype = self.config.transformer, jnp.dtype(self.config.dtype)
        self.norm1 = make_norm(t)
        self.self_attn = MoshiAttention(t, dtype, lora=self.config.lora)
        self.norm2 = make_norm(t)
        self.gating = MoshiGating(t, dtype, lora=self.config.lora)
        if t.layer_scale is not None:
            self.layer_scale_1 = LayerScale(t.layer_scale)
            self.layer_scale_2 = LayerScale(t.layer_scale)
        if self.grafted:
            self.seq_modeling_block = TTTBlock(self.config, dtype)

    def _scale(self, which: int, x):
        if self.config.transformer.layer_scale is None:
            return x
        return (self.layer_scale_1 if which == 1 else self.layer_scale_2)(x)

    def _ffn(self, x):
        return x + self._scale(2, self.gating(self.norm2(x)))

    def __call__(self, x, positions):
        x = x + self._scale(1, self.self_attn(self.norm1(x), positions))
        if self.grafted:
            x = x + self.seq_modeling_block(x, positions)
        return self._ffn(x)

    def init_cache(self, batch: int):
        cache = {"attn": init_attention_cache(self.config.transformer, batch)}
        if self.grafted:
            cache["ttt"] = self.seq_modeling_block.init_cache(batch)
        return cache

    def stream(self, x, positions, cache):
        h, attn = self.self_attn.stream(self.norm1(x), positions, cache["attn"])
        x = x + self._scale(1, h)
        new = {"attn": attn}
        if self.grafted:
            h, new["ttt"] = self.seq_modeling_block.stream(x, cache["ttt"])
            x = x + h
        return self._ffn(x), new


def _positions(batch: int, length: int, offset) -> jax.Array:
    offset = jnp.broadcast_to(jnp.asarray(offset, jnp.int32).reshape(-1), (batch,))
    return offset[:, None] + jnp.arange(length, dtype=jnp.int32)  # [B, T]


class StreamingTransformer(nn.Module):
    """Moshi's ``StreamingTransformer`` (``[B, T, d] -> [B, T, d]``), TTT in ``config.ttt_layers``."""

    config: MoshiTTTConfig

    def setup(self):
        grafted = set(self.config.ttt_layers)
        # model.remat=layer: each layer's forward is recomputed in the backward pass (same
        # params, same values); streaming calls the layer's own ``stream``.
        layer = nn.remat(HybridLayer) if self.config.remat == "layer" else HybridLayer
        self.layers = [layer(self.config, i in grafted)
                       for i in range(self.config.transformer.num_layers)]

    def __call__(self, x, offset=0):
        """Args: x ``[B, T, d]``; offset the position of the first frame (int or ``[B]``)."""
        positions = _positions(x.shape[0], x.shape[1], offset)
        for layer in self.layers:
            x = layer(x, positions)
        return x

    def init_cache(self, batch: int):
        return {"offset": jnp.zeros((batch,), jnp.int32),
                "layers": [layer.init_cache(batch) for layer in self.layers]}

    def stream(self, x, cache):
        """Continues the streams by ``x: [B, T, d]``; returns ``(y, cache)``."""
        positions = _positions(x.shape[0], x.shape[1], cache["offset"])
        new = []
        for layer, c in zip(self.layers, cache["layers"]):
            x, c = layer.stream(x, positions, c)
            new.append(c)
        return x, {"offset": cache["offset"] + x.shape[1], "layers": new}


class MoshiTTTLM(nn.Module):
    """Token streams -> logits with the Moshi-TTT hybrid.

    Input: ``[B, T, K]`` int ids (frame ``t`` holds one token per stream), or ``[B, T]`` when
    ``K = 1``. Output: float32 ``[B, T, K, V]`` logits with ``V = max(vocab_sizes)`` (a
    stream's entries past its own vocab are ``-1e30``, so the softmax over ``V`` is the
    stream's own), or ``[B, T, V]`` for a ``[B, T]`` input.
    """

    config: MoshiTTTConfig

    def setup(self):
        cfg, init = self.config, nn.initializers.normal(self.config.init_std)
        d, dtype = cfg.transformer.d_model, jnp.dtype(cfg.dtype)
        self.emb = [nn.Embed(v, d, dtype=dtype, embedding_init=init)
                    for k, v in enumerate(cfg.vocab_sizes)]
        self.transformer = StreamingTransformer(cfg)
        self.out_norm = make_norm(cfg.transformer)
        self.linears = [nn.Dense(v, use_bias=False, dtype=dtype, kernel_init=init) for k, v in enumerate(cfg.vocab_sizes)]

    def _frames(self, tokens):
        k = self.config.num_streams
        if not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.ndim not in (2, 3) or (
                tokens.ndim == 3 and tokens.shape[-1] != k) or (tokens.ndim == 2 and k != 1):
            want = "[B, T, K]" + (" or [B, T]" if k == 1 else "")
            raise ValueError(f"MoshiTTTLM expects integer token ids of shape {want} with K={k} "
                             f"streams, got {tokens.dtype}{list(tokens.shape)}")
        return tokens[..., None] if tokens.ndim == 2 else tokens

    def _embed(self, frames):
        return sum(emb(frames[..., k]) for k, emb in enumerate(self.emb))  # [B, T, d]

    def _logits(self, x, squeeze: bool):
        x = self.out_norm(x)
        vmax = max(self.config.vocab_sizes)
        outs = []
        for head, v in zip(self.linears, self.config.vocab_sizes):
            y = head(x).astype(jnp.float32)
            outs.append(jnp.pad(y, ((0, 0), (0, 0), (0, vmax - v)), constant_values=MASK_VALUE))
        logits = jnp.stack(outs, axis=2)  # [B, T, K, V]
        return logits[:, :, 0] if squeeze else logits

    def __call__(self, tokens, offset=0):
        frames = self._frames(tokens)
        x = self.transformer(self._embed(frames), offset)
        return self._logits(x, tokens.ndim == 2)

    def init_cache(self, batch: int):
        """Fresh streaming state for ``batch`` streams (call with ``method="init_cache"``)."""
        return self.transformer.init_cache(batch)

    def stream(self, tokens, cache):
        """Streaming: logits of the new frames ``tokens`` and the updated cache."""
        frames = self._frames(tokens)
        x, cache = self.transformer.stream(self._embed(frames), cache)
        return self._logits(x, tokens.ndim == 2), cache
