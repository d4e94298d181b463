"""The causal LMs in the architecture registry: ``ttt_lm`` and the ``attention_lm`` baseline.

Both read a ``RunConfig``; the baseline is the same skeleton with ``model.seq_modeling: swa``.
"""

from __future__ import annotations

import sys

import jax.numpy as jnp

from ttt_jax.config import ModelConfig, RunConfig
from ttt_jax.data import make_dataset
from ttt_jax.data.prepared import check_model_vocab, read_meta
from ttt_jax.models import build_model
from ttt_jax.registry import Architecture, register


def sample_tokens(cfg: ModelConfig, batch: int, length: int):
    """Zero token ids ``[batch, length]``."""
    del cfg
    return jnp.zeros((batch, length), jnp.int32)


def build_datasets(cfg: RunConfig):
    """Train and validation datasets for ``cfg.data``; checks their vocab against the model.

    ``data.prepared``: the datasets' ``describe()`` names the tokenizer (kind, sha256, vocab),
    which the trainer logs; a model vocabulary over 2x the tokenizer's is warned about on
    stderr, a smaller one refused.
    """
    d = cfg.data
    path = d.prepared if d.source == "prepared" else d.path
    common = dict(seq_len=d.seq_len, seed=cfg.train.seed, path=path,
                  vocab_size=cfg.model.vocab_size, recall_num_pairs=d.recall_num_pairs,
                  recall_vocab=d.recall_vocab)
    if d.source == "tokens":
        common.update(token_dtype=d.token_dtype, val_fraction=d.val_fraction,
                      val_path=d.val_path)
    train = make_dataset(d.source, batch_size=d.batch_size, split="train", **common)
    val = make_dataset(d.source, batch_size=d.batch_size, split="val", **common)
    if d.source == "prepared":
        warning = check_model_vocab(read_meta(d.prepared), cfg.model.vocab_size, d.prepared)
        if warning:
            print(warning, file=sys.stderr)
    if train.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is invalid: data source "
                         f"{d.source!r} needs at least {train.vocab_size}")
    return train, val


def export_torch(cfg: RunConfig, params, out, *, dtype=None, force=False, allow_inexact=False,
                 key="the model") -> str:
    """A ttt-lm-pytorch directory (``config.json`` + ``model.safetensors``). A model without
    RoPE has no exact counterpart there (the reference always rotates Q and K): refused unless
    ``allow_inexact``."""
    from ttt_jax.export.torch import export_dtype, save_torch

    if not cfg.model.ttt.use_rope and not allow_inexact:
        raise ValueError(f"{key} is invalid for export: its model has model.ttt.use_rope=false, "
                         f"but ttt-lm-pytorch always applies RoPE, so the exported model would "
                         f"compute different logits; pass --allow-inexact to write it anyway "
                         f"(config.json keeps use_rope=false, so ttt-jax import restores it "
                         f"exactly)")
    dtype = export_dtype(dtype or "float32")
    save_torch(cfg.model, {"params": params}, out, dtype=dtype, force=force)
    return f"wrote {out}/config.json and {out}/model.safetensors ({dtype})"


TTT_LM = register(Architecture(
    name="ttt_lm", run_config=RunConfig, build_model=build_model, sample_input=sample_tokens,
    build_datasets=build_datasets,
    features=frozenset({"diagnostics", "generate", "export", "eval", "mesh"}),
    export=export_torch,
    description="the TTT-LM (ttt-lm-pytorch's TTTForCausalLM)"))

ATTENTION_LM = register(Architecture(
    name="attention_lm", run_config=RunConfig, build_model=build_model,
    sample_input=sample_tokens, build_datasets=build_datasets,
    features=frozenset({"eval", "mesh"}),
    description="the causal LM with sliding-window attention (a baseline)"))
