"""Param sharding rules of the Moshi models (``moshi_ttt``, ``moshi_lm``) on a mesh.

Rules by param path and shape (docs/moshi.md, "Sharded runs"; the mechanism in
``ttt_jax.sharding`` and docs/scaling.md): every matrix is split over ``fsdp`` along its largest
dim that the fsdp size divides, and over ``tensor`` along its heads / FFN width / vocabulary
(:class:`ttt_jax.sharding.Split`); per-head TTT params over ``tensor`` by head (and ``fsdp``
over their largest other dim); small vectors
(norms, layer scales, biases, gating alphas, conv kernels, ``learnable_token_idx``) are
replicated. Every param of ``MoshiTTTLM`` and ``MoshiLM`` (with LoRA adapters, TTT-Linear or
TTT-MLP, any depformer layout) matches exactly one named rule: :func:`unmatched` lists those
that do not (none, tested).
"""

from __future__ import annotations

from ttt_jax.sharding import Split
from ttt_jax.tree import flatten

_HEAD_PARAMS = r"(W\d+|b\d+|ttt_norm_weight|ttt_norm_bias|learnable_ttt_lr_weight|" \
               r"learnable_ttt_lr_bias)"
# Projections whose output columns are heads (attention Q/K/V, depformer steps, TTT Q/K/V/G)
# or the FFN's hidden width; and those that read them back.
_COLUMN = r"(in_proj|in_projs_\d+|q_proj|k_proj|v_proj|g_proj|linear_in)"
_ROW = r"(out_proj|out_projs_\d+|o_proj|linear_out)"
_EMBEDDINGS = r"(text_emb|depformer_text_emb|emb_\d+|depformer_emb_\d+)"
_HEADS = r"(text_linear|linears_\d+|depformer_in_\d+)"

# (regex over the param path, template); first match wins.
MOSHI_RULES = (
    # Per-head TTT params [H, ...]: heads over tensor, fsdp over the largest other dim.
    (r"/seq_modeling_block/ttt_layer/" + _HEAD_PARAMS + "$", Split(tensor=0)),
    # Replicated: norms, layer scales, biases, gating alphas, TTT convs and token weights.
    (r"(^|/)(alpha|scale|bias|gating_alpha|learnable_token_idx)$", ()),
    (r"/conv_[a-z]+/kernel$", ()),
    # Attention, FFN and TTT projections [d, n] / [n, d]: n (heads, hidden) over tensor.
    (r"/" + _COLUMN + "/kernel$", Split(tensor=1)),
    (r"/" + _ROW + "/kernel$", Split(tensor=0)),
    # LoRA adapters A [in, r], B [r, out]: the side their kernel splits over tensor likewise.
    (r"/" + _COLUMN + "/lora_b$", Split(tensor=1)),
    (r"/" + _ROW + "/lora_a$", Split(tensor=0)),
    (r"/(lora_a|lora_b)$", Split()),
    # Embeddings [V(+1), d]: width over tensor (V + 1 is odd in moshi).
    (r"(^|/)" + _EMBEDDINGS + "/embedding$", Split(tensor=1)),
    # Output heads [d, V] (vocabulary over tensor) and the depformer's input projections.
    (r"(^|/)" + _HEADS + "/kernel$", Split(tensor=1)),
)


def unmatched(params, rules=MOSHI_RULES) -> list[str]:
    """The param paths of ``params`` (a tree, abstract or concrete) that no rule names."""
    import re

    return [k for k in flatten(params)
            if not any(re.search(pattern, k) for pattern, _ in rules)]


def layer_working_set(cfg, rows: int) -> int:
    """With ``model.remat: layer``, the bytes one layer keeps for its own backward pass while it
    is recomputed (the largest of a temporal layer, grafted if any is, and a depformer layer),
    for ``rows`` sequences of ``data.seq_len + 1`` frames; 0 without remat."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from ttt_jax.moshi.hybrid import HybridLayer
    from ttt_jax.moshi.lm import DepformerLayer
    from ttt_jax.moshi.lm_config import MoshiLMConfig
    from ttt_jax.memory import residual_bytes

    model = cfg.model
    if model.remat != "layer":
        return 0
    length = cfg.data.seq_len + 1
    temporal = model.temporal if isinstance(model, MoshiLMConfig) else model
    temporal = dataclasses.replace(temporal, remat="none")
    dtype = jnp.dtype(model.dtype)
    key = jax.random.PRNGKey(0)

    def one(layer, *inputs):
        params = jax.eval_shape(layer.init, key, *inputs)["params"]
        return residual_bytes(lambda p, *xs: layer.apply({"params": p}, *xs), params, *inputs)

    d = temporal.transformer.d_model
    x = jax.ShapeDtypeStruct((rows, length, d), dtype)
    positions = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    sizes = [one(HybridLayer(temporal, bool(temporal.ttt_layers)), x, positions)]
    if isinstance(model, MoshiLMConfig):
        steps = jax.ShapeDtypeStruct((rows * length, model.dep_q, model.depformer.d_model), dtype)
        sizes.append(one(DepformerLayer(dataclasses.replace(model, remat="none")), steps))
    return max(sizes)
