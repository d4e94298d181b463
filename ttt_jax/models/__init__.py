"""Language models: one causal-LM skeleton whose sequence layer the config names."""

from __future__ import annotations

import flax.linen as nn

from ttt_jax.config import ModelConfig


def build_model(cfg: ModelConfig) -> nn.Module:
    """The LM that ``cfg.seq_modeling`` names: ``ttt`` -> ``TTTLM``, ``swa`` -> ``AttentionLM``
    (both the ``CausalLM`` skeleton with that sequence layer)."""
    from ttt_jax.models.attention_lm import AttentionLM
    from ttt_jax.models.ttt_lm import TTTLM

    models = {"ttt": TTTLM, "swa": AttentionLM}
    if cfg.seq_modeling not in models:
        raise ValueError(f"model.seq_modeling={cfg.seq_modeling!r} is invalid: expected one of "
                         + ", ".join(repr(k) for k in models))
    return models[cfg.seq_modeling](cfg)


__all__ = ["build_model"]
