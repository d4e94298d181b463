"""An independent float64 numpy TTT-LM forward (docs/architecture.md §2), built on the TTT layer
of ``tests/reference.py``.

Written from the architecture page only: ``embed_tokens -> layers_{i} -> norm -> lm_head``, a
block being ``x += conv(RMSNorm(x))`` (with ``pre_conv``), ``x += TTT(RMSNorm(x))``,
``x += down(silu(gate(x')) * up(x'))`` with ``x' = RMSNorm(x)``; the head is the embedding
matrix when tied. Tests compare the library's logits and gradients with it.
"""

from __future__ import annotations

import numpy as np

try:  # tests/ is on sys.path under pytest's default import mode
    import reference as ref
except ImportError:  # tests/ imported as a package
    from tests import reference as ref


def rms_norm(x, weight, eps):
    return weight * x / np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + eps)


def silu(x):
    return x / (1.0 + np.exp(-x))


def block(p, cfg, x, position_ids=None):
    """One block ``[B, L, d] -> [B, L, d]`` of a TTT-LM with ModelConfig ``cfg``."""
    eps = cfg.rms_norm_eps
    if cfg.pre_conv:
        conv = p["conv"]
        x = x + ref.causal_depthwise_conv(rms_norm(x, conv["norm"]["weight"], eps),
                                          conv["conv"]["kernel"], conv["conv"]["bias"])
    x = x + ref.ttt_layer(p["seq_modeling_block"], cfg.ttt, rms_norm(x, p["seq_norm"]["weight"], eps),
                          position_ids)
    h = rms_norm(x, p["ffn_norm"]["weight"], eps)
    mlp = p["mlp"]
    return x + (silu(h @ mlp["gate_proj"]["kernel"]) * (h @ mlp["up_proj"]["kernel"])) \
        @ mlp["down_proj"]["kernel"]


def logits(params, cfg, tokens, position_ids=None):
    """Logits ``[B, L, V]`` float64 of ``tokens [B, L]`` (positions ``arange(L)`` by default)."""
    p = ref.to_f64(params)
    embedding = p["embed_tokens"]["embedding"]
    x = embedding[np.asarray(tokens)]
    for i in range(cfg.num_layers):
        x = block(p[f"layers_{i}"], cfg, x, position_ids)
    x = rms_norm(x, p["norm"]["weight"], cfg.rms_norm_eps)
    return x @ (embedding.T if cfg.tie_word_embeddings else p["lm_head"]["kernel"])
