"""Moshi-TTT: Moshi's streaming transformer in Flax, with TTT layers grafted in (docs/architecture.md §2)."""

from ttt_jax.moshi.config import (MoshiDataConfig, MoshiRunConfig, MoshiTransformerConfig,
                                  MoshiTTTConfig, TTTArgs)
from ttt_jax.moshi.hybrid import MoshiTTTLM, StreamingTransformer

__all__ = ["MoshiDataConfig", "MoshiRunConfig", "MoshiTTTConfig", "MoshiTTTLM",
           "MoshiTransformerConfig", "StreamingTransformer", "TTTArgs"]
