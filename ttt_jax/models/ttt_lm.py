"""The TTT-LM (DESIGN §2), ttt-lm-pytorch's ``TTTForCausalLM`` architecture.

``embed_tokens -> layers_{i} (Block) -> norm -> lm_head`` (tied to the embedding by default).
A block: optional ``x += conv(x)`` (pre-conv), ``x += seq_modeling_block(seq_norm(x))``,
``x += mlp(ffn_norm(x))``.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from ttt_jax.config import ModelConfig
from ttt_jax.nn.layers import PreConv, RMSNorm, SwiGLU
from ttt_jax.nn.ttt_layer import TTTLayer
from ttt_jax.types import SequenceMetadata


class Block(nn.Module):
    """One TTT-LM block; ``[B, L, d] -> [B, L, d]``."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, metadata: Optional[SequenceMetadata] = None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if cfg.pre_conv:
            x = x + PreConv(cfg.ttt.conv_kernel, cfg.rms_norm_eps, dtype, name="conv")(x)
        h = RMSNorm(cfg.rms_norm_eps, name="seq_norm")(x)
        x = x + TTTLayer(cfg.ttt, dtype, name="seq_modeling_block")(h, metadata)
        h = RMSNorm(cfg.rms_norm_eps, name="ffn_norm")(x)
        return x + SwiGLU(cfg.intermediate_size, cfg.ttt.initializer_range, dtype, name="mlp")(h)


class TTTLM(nn.Module):
    """A causal language model of TTT blocks: tokens ``[B, L]`` -> logits ``[B, L, V]`` float32."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, metadata: Optional[SequenceMetadata] = None):
        cfg = self.config
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"TTTLM expects integer token ids of shape [B, L], got "
                             f"{tokens.dtype}{list(tokens.shape)}")
        dtype = jnp.dtype(cfg.dtype)
        init = nn.initializers.normal(cfg.ttt.initializer_range)
        embed = nn.Embed(cfg.vocab_size, cfg.model_dim, dtype=dtype, embedding_init=init,
                         name="embed_tokens")
        x = embed(tokens)
        for i in range(cfg.num_layers):
            x = Block(cfg, name=f"layers_{i}")(x, metadata)
        x = RMSNorm(cfg.rms_norm_eps, name="norm")(x)
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, kernel_init=init,
                              name="lm_head")(x)
        return logits.astype(jnp.float32)
