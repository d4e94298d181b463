"""The TTT-LM (docs/architecture.md §2), ttt-lm-pytorch's ``TTTForCausalLM`` architecture.

``TTTLM`` is the ``CausalLM`` skeleton (``ttt_jax.models.causal_lm``) with a ``TTTLayer`` as
the sequence layer of every block, whatever ``config.seq_modeling`` says. Besides the
full-sequence ``__call__`` it has ``init_cache``/``stream``: the same function computed chunk by
chunk from a per-stream state (``ttt_jax.decode`` drives them).
"""

from __future__ import annotations

from typing import Optional

from ttt_jax.models.causal_lm import Block, CausalLM


class TTTLM(CausalLM):
    """A causal language model of TTT blocks: tokens ``[B, L]`` -> logits ``[B, L, V]`` float32."""

    seq_modeling: Optional[str] = "ttt"


__all__ = ["Block", "TTTLM"]
