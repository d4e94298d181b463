"""The causal LM skeleton (docs/architecture.md §2) shared by every sequence layer.

``embed_tokens -> layers_{i} (Block) -> norm -> lm_head`` (tied to the embedding by default).
A block: optional ``x += conv(x)`` (pre-conv), ``x += seq_modeling_block(seq_norm(x))``,
``x += mlp(ffn_norm(x))``. The sequence layer is a parameter, ``model.seq_modeling``:

* ``ttt``: a ``TTTLayer`` (ttt-lm-pytorch's ``TTTForCausalLM``; ``ttt_jax.models.ttt_lm``);
* ``swa``: a ``SlidingWindowAttention`` (the baseline; ``ttt_jax.models.attention_lm``).

Both kinds share every param name outside ``seq_modeling_block``. With ``ttt``, every module
also has ``init_cache``/``stream``: the same function computed chunk by chunk from a per-stream
state (``ttt_jax.decode`` drives them).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from ttt_jax.config import ModelConfig
from ttt_jax.math.cross_entropy import cross_entropy, fused_cross_entropy
from ttt_jax.nn.attention import SlidingWindowAttention
from ttt_jax.nn.layers import PreConv, RMSNorm, SwiGLU
from ttt_jax.nn.ttt_layer import TTTLayer
from ttt_jax.types import SequenceMetadata

# The sequence layer of each ``seq_modeling`` kind: ``(config, dtype) -> module``.
SEQUENCE_LAYERS = {
    "ttt": lambda cfg, dtype: TTTLayer(cfg.ttt, dtype),
    "swa": lambda cfg, dtype: SlidingWindowAttention(cfg, dtype),
}


def resolve_kind(config: ModelConfig, seq_modeling: Optional[str]) -> str:
    """The sequence-layer kind: ``seq_modeling`` if given, else ``config.seq_modeling``."""
    kind = seq_modeling if seq_modeling is not None else config.seq_modeling
    if kind not in SEQUENCE_LAYERS:
        raise ValueError(f"model.seq_modeling={kind!r} is invalid: expected one of "
                         + ", ".join(repr(k) for k in SEQUENCE_LAYERS))
    return kind


class Block(nn.Module):
    """One block; ``[B, L, d] -> [B, L, d]``.

    Attributes:
      config: the model config.
      seq_modeling: the sequence-layer kind; None reads ``config.seq_modeling``.
    """

    config: ModelConfig
    seq_modeling: Optional[str] = None

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if cfg.pre_conv:
            self.conv = PreConv(cfg.ttt.conv_kernel, cfg.rms_norm_eps, dtype)
        self.seq_norm = RMSNorm(cfg.rms_norm_eps)
        self.seq_modeling_block = SEQUENCE_LAYERS[resolve_kind(cfg, self.seq_modeling)](cfg, dtype)
        self.ffn_norm = RMSNorm(cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.intermediate_size, cfg.ttt.initializer_range, dtype)

    def __call__(self, x, metadata: Optional[SequenceMetadata] = None):
        if self.config.pre_conv:
            x = x + self.conv(x)
        x = x + self.seq_modeling_block(self.seq_norm(x), metadata)
        return x + self.mlp(self.ffn_norm(x))

    def _check_streams(self):
        kind = resolve_kind(self.config, self.seq_modeling)
        if kind != "ttt":
            raise ValueError(f"model.seq_modeling={kind!r} does not stream (init_cache/stream): "
                             f"expected 'ttt'")

    def init_cache(self, batch_size: int, start_position=0):
        """``{"ttt": TTTLayer cache[, "conv_tail": [B, K-1, d]]}`` (``ttt`` blocks only)."""
        self._check_streams()
        cfg = self.config
        cache = {"ttt": self.seq_modeling_block.init_cache(batch_size, start_position)}
        if cfg.pre_conv:
            cache["conv_tail"] = jnp.zeros((batch_size, cfg.ttt.conv_kernel - 1, cfg.model_dim),
                                           jnp.dtype(cfg.dtype))
        return cache

    def stream(self, x, cache, lengths=None):
        """``(y, cache')``: ``__call__`` continued from ``cache`` (see ``TTTLayer.stream``)."""
        self._check_streams()
        new = {}
        if self.config.pre_conv:
            valid = lengths if lengths is not None else jnp.full((x.shape[0],), x.shape[1],
                                                                   jnp.int32)
            h, new["conv_tail"] = self.conv.stream(x, cache["conv_tail"], valid)
            x = x + h
        h, new["ttt"] = self.seq_modeling_block.stream(self.seq_norm(x), cache["ttt"], lengths)
        x = x + h
        return x + self.mlp(self.ffn_norm(x)), new


class CausalLM(nn.Module):
    """A causal LM of ``Block`` s: tokens ``[B, L]`` -> logits ``[B, L, V]`` float32.

    Attributes:
      config: the model config.
      seq_modeling: the sequence-layer kind of every block; None reads ``config.seq_modeling``.
    """

    config: ModelConfig
    seq_modeling: Optional[str] = None

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        kind = resolve_kind(cfg, self.seq_modeling)
        init = nn.initializers.normal(cfg.ttt.initializer_range)
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.model_dim, dtype=dtype,
                                     embedding_init=init)
        self.layers = [Block(cfg, kind) for _ in range(cfg.num_layers)]  # named layers_{i}
        self.norm = RMSNorm(cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype,
                                    kernel_init=init)

    def _check_tokens(self, tokens):
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"{type(self).__name__} expects integer token ids of shape [B, L], "
                             f"got {tokens.dtype}{list(tokens.shape)}")

    def _logits(self, x):
        x = self.norm(x)
        if self.config.tie_word_embeddings:
            logits = self.embed_tokens.attend(x)
        else:
            logits = self.lm_head(x)
        return logits.astype(jnp.float32)

    def _hidden(self, tokens, metadata):
        self._check_tokens(tokens)
        x = self.embed_tokens(tokens)
        for block in self.layers:
            x = block(x, metadata)
        return x

    def __call__(self, tokens, metadata: Optional[SequenceMetadata] = None):
        return self._logits(self._hidden(tokens, metadata))

    def next_token_loss(self, tokens, targets, mask=None):
        """``(loss_sum, count)``: the summed cross-entropy of the logits of ``tokens [B, L]``
        against ``targets [B, L]`` (``mask [B, L]``: per-token weights), as
        ``cross_entropy(self(tokens), targets, mask)``.

        With ``config.loss_chunk > 0`` the LM head runs inside the loss, that many tokens at a
        time (``ttt_jax.math.cross_entropy.fused_cross_entropy``), and the logits are never
        whole; 0 takes the loss of the materialised logits.
        """
        chunk = self.config.loss_chunk
        if not chunk:
            return cross_entropy(self(tokens), targets, mask)
        x = self.norm(self._hidden(tokens, None))
        if self.config.tie_word_embeddings:
            w, vocab_axis = self.embed_tokens.embedding, 0  # [V, d]
        else:
            w, vocab_axis = self.lm_head.variables["params"]["kernel"], 1  # [d, V]
        flat = lambda a: None if a is None else a.reshape(-1)  # noqa: E731
        return fused_cross_entropy(x.reshape(-1, x.shape[-1]), w, flat(targets), flat(mask),
                                   chunk=chunk, vocab_axis=vocab_axis)

    def init_cache(self, batch_size: int, start_position=0):
        """The decode state of ``batch_size`` fresh streams: ``{"layers": [Block cache, ...]}``."""
        return {"layers": [block.init_cache(batch_size, start_position) for block in self.layers]}

    def stream(self, tokens, cache, lengths=None):
        """Logits ``[B, n, V]`` of a chunk of tokens ``[B, n]`` continuing each stream, and the
        new cache. ``lengths [B]``: valid tokens per element (all if None)."""
        self._check_tokens(tokens)
        x = self.embed_tokens(tokens)
        new = []
        for block, c in zip(self.layers, cache["layers"]):
            x, c = block.stream(x, c, lengths)
            new.append(c)
        return self._logits(x), {"layers": new}
