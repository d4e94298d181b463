"""A sliding-window attention LM: the TTT-LM's skeleton with causal local attention instead of TTT.

The long-context baseline (``model.seq_modeling: swa``): ``AttentionLM`` is the ``CausalLM``
skeleton (``ttt_jax.models.causal_lm``) with a ``SlidingWindowAttention``
(``ttt_jax.nn.attention``) as the sequence layer of every block.

Because a token never looks further back than the window, the logits of tokens ``[s, e)``
computed from the tokens ``[s - context_needed, e)`` (with their absolute positions) equal those
of the whole sequence: the receptive field grows by a window per layer, see
:func:`context_needed`.
"""

from __future__ import annotations

from typing import Optional

from ttt_jax.config import ModelConfig
from ttt_jax.models.causal_lm import CausalLM
from ttt_jax.nn.attention import SlidingWindowAttention, sliding_window_attention


def context_needed(cfg: ModelConfig) -> int:
    """Tokens before a position that can influence its logits: per layer ``window - 1``, plus
    ``conv_kernel - 1`` with the pre-conv."""
    conv = cfg.ttt.conv_kernel - 1 if cfg.pre_conv else 0
    return cfg.num_layers * (cfg.attention_window - 1 + conv)


class AttentionLM(CausalLM):
    """A causal LM of sliding-window attention blocks: tokens ``[B, L]`` -> logits ``[B, L, V]``."""

    seq_modeling: Optional[str] = "swa"


__all__ = ["AttentionLM", "SlidingWindowAttention", "context_needed", "sliding_window_attention"]
