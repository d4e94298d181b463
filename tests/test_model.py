"""TTT-LM: logits, param layout, causality, the small Linen blocks against numpy, presets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_lm
from conftest import BATCH, DIM, HEADS, MINI_BATCH
from ttt_jax import TTTLM, Block, ModelConfig, TTTConfig, TTTLayer, load_config
from ttt_jax.models import build_model, causal_lm
from ttt_jax.models.attention_lm import AttentionLM
from ttt_jax.models.causal_lm import CausalLM
from ttt_jax.nn.layers import CausalDepthwiseConv, RMSNorm, SwiGLU

REPO = Path(__file__).resolve().parents[1]
LENGTH = 13  # 13 % 4 != 0
PRESETS = sorted(p for p in (REPO / "configs").glob("*.yaml")
                 if not p.stem.startswith(("tiny", "moshi", "ttt_with_rope_example")))  # test_moshi_config.py

TTT_BLOCK_PARAMS = {"q_proj", "v_proj", "o_proj", "post_norm", "learnable_ttt_lr_weight",
                    "learnable_ttt_lr_bias", "learnable_token_idx", "ttt_norm_weight",
                    "ttt_norm_bias", "W1", "b1"}


def expected_layout(cfg: ModelConfig) -> dict:
    """The export-friendly tree: module names down to the leaves, as nested dicts of sets."""
    ttt = set(TTT_BLOCK_PARAMS)
    ttt |= {"W2", "b2"} if cfg.ttt.ttt_layer_type == "mlp" else set()
    ttt |= {"conv_q", "conv_k"} if cfg.ttt.share_qk else {"k_proj"}
    ttt |= {"g_proj"} if cfg.ttt.use_gate else set()
    block = {"seq_norm": {"weight"}, "seq_modeling_block": ttt, "ffn_norm": {"weight"},
             "mlp": {"gate_proj": {"kernel"}, "up_proj": {"kernel"}, "down_proj": {"kernel"}}}
    if cfg.pre_conv:
        block["conv"] = {"norm": {"weight"}, "conv": {"kernel", "bias"}}
    tree = {"embed_tokens": {"embedding"}, "norm": {"weight"}}
    tree.update({f"layers_{i}": block for i in range(cfg.num_layers)})
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = {"kernel"}
    return tree


def assert_layout(params, layout):
    assert set(params) == set(layout), (sorted(params), sorted(layout))
    for name, sub in (layout.items() if isinstance(layout, dict) else []):
        if isinstance(sub, dict):
            assert_layout(params[name], sub)
        else:
            assert set(params[name]) == sub, (name, sorted(params[name]), sorted(sub))


def assert_leaf_shapes(params, cfg: ModelConfig):
    d, v, inter = cfg.model_dim, cfg.vocab_size, cfg.intermediate_size
    k = cfg.ttt.conv_kernel
    chex.assert_shape(params["embed_tokens"]["embedding"], (v, d))
    chex.assert_shape(params["norm"]["weight"], (d,))
    if not cfg.tie_word_embeddings:
        chex.assert_shape(params["lm_head"]["kernel"], (d, v))
    for i in range(cfg.num_layers):
        block = params[f"layers_{i}"]
        chex.assert_shape([block["seq_norm"]["weight"], block["ffn_norm"]["weight"]], (d,))
        chex.assert_shape([block["mlp"]["gate_proj"]["kernel"], block["mlp"]["up_proj"]["kernel"]],
                          (d, inter))
        chex.assert_shape(block["mlp"]["down_proj"]["kernel"], (inter, d))
        if cfg.pre_conv:
            chex.assert_shape(block["conv"]["conv"]["kernel"], (k, d))
            chex.assert_shape([block["conv"]["conv"]["bias"], block["conv"]["norm"]["weight"]], (d,))


def init_key(seed):
    # The "rbg" generator compiles in about half the time of threefry on CPU.
    return jax.random.key(seed, impl="rbg")


# At these tiny shapes XLA's backend optimisations cost far more compile time than they save.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn):
    return jax.jit(fn, compiler_options=FAST_COMPILE)


def tokens_for(cfg: ModelConfig, shape, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape).astype(np.int32)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("pre_conv", [False, True], ids=["no_pre_conv", "pre_conv"])
def test_logits_shape_and_layout(tiny_model_config, pre_conv, tied):
    cfg = dataclasses.replace(tiny_model_config, pre_conv=pre_conv, tie_word_embeddings=tied)
    model = TTTLM(cfg)
    tokens = jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32)

    def run(key, tokens):
        variables = model.init(key, tokens)
        return variables, model.apply(variables, tokens)

    variables, logits = jax.eval_shape(run, jax.random.PRNGKey(0), tokens)
    assert logits.shape == (BATCH, LENGTH, cfg.vocab_size)
    assert logits.dtype == jnp.float32
    assert set(variables) == {"params"}
    params = variables["params"]
    assert_layout(params, expected_layout(cfg))
    assert ("lm_head" in params) == (not tied)
    assert_leaf_shapes(params, cfg)


# Real runs for two corners of the grid (the other corners run for real in test_causality
# and in test_variants.py).
@pytest.mark.parametrize("pre_conv, tied", [(False, True), (True, False)],
                         ids=["no_pre_conv-tied", "pre_conv-untied"])
def test_logits_computed(tiny_model_config, pre_conv, tied):
    cfg = dataclasses.replace(tiny_model_config, pre_conv=pre_conv, tie_word_embeddings=tied)
    model = TTTLM(cfg)
    tokens = tokens_for(cfg, (BATCH, LENGTH))
    variables = fast_jit(model.init)(init_key(1), tokens)
    assert_layout(variables["params"], expected_layout(cfg))
    # Params moved away from init (whose zero biases and near-no-op TTT would hide terms).
    rng = np.random.default_rng(2)
    variables = jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32),
                             variables)
    logits = fast_jit(model.apply)(variables, tokens)
    chex.assert_shape(logits, (BATCH, LENGTH, cfg.vocab_size))
    chex.assert_type(logits, jnp.float32)
    # The independent float64 numpy forward (tests/reference_lm.py).
    want = reference_lm.logits(variables["params"], cfg, tokens)
    np.testing.assert_allclose(np.asarray(logits), want, rtol=0, atol=1e-5)
    assert np.abs(np.diff(want, axis=1)).max() > 1e-2  # not constant along the sequence


@pytest.mark.parametrize("pre_conv, tied", [(False, True), (True, False)],
                         ids=["no_pre_conv-tied", "pre_conv-untied"])
def test_one_skeleton_for_both_sequence_layers(tiny_model_config, pre_conv, tied):
    """``CausalLM`` takes the sequence layer from ``model.seq_modeling``; ``TTTLM`` and
    ``AttentionLM`` pin it. Outside ``seq_modeling_block`` both kinds have the same params."""
    ttt_cfg = dataclasses.replace(tiny_model_config, pre_conv=pre_conv, tie_word_embeddings=tied)
    swa_cfg = dataclasses.replace(ttt_cfg, seq_modeling="swa")
    tokens = jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32)

    def shapes(model):
        tree = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
        return jax.tree.map(lambda x: (x.shape, x.dtype), tree)

    ttt = shapes(CausalLM(ttt_cfg))
    assert ttt == shapes(TTTLM(ttt_cfg)) == shapes(TTTLM(swa_cfg))
    assert_layout(ttt, expected_layout(ttt_cfg))
    swa = shapes(CausalLM(swa_cfg))
    assert swa == shapes(AttentionLM(ttt_cfg))
    attention = {p: {"kernel"} for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    layout = expected_layout(ttt_cfg)
    layout.update({k: {**v, "seq_modeling_block": attention}
                   for k, v in layout.items() if k.startswith("layers_")})
    assert_layout(swa, layout)
    for i in range(ttt_cfg.num_layers):
        d = ttt_cfg.model_dim
        assert all(swa[f"layers_{i}"]["seq_modeling_block"][p]["kernel"][0] == (d, d)
                   for p in attention)
        ttt[f"layers_{i}"].pop("seq_modeling_block")
        swa[f"layers_{i}"].pop("seq_modeling_block")
    assert ttt == swa
    assert type(build_model(ttt_cfg)) is TTTLM and type(build_model(swa_cfg)) is AttentionLM
    assert Block is causal_lm.Block
    with pytest.raises(ValueError, match="model.seq_modeling='swa' does not stream"):
        jax.eval_shape(lambda: AttentionLM(ttt_cfg).init(jax.random.PRNGKey(0), BATCH,
                                                         method="init_cache"))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_causality(kind):
    """Changing token t leaves logits < t untouched and changes logits at t."""
    # Wider init than the default so that any leak would be far above float noise.
    ttt = TTTConfig(model_dim=DIM, num_heads=HEADS, mini_batch_size=MINI_BATCH,
                    ttt_layer_type=kind, share_qk=True, use_rope=True, use_gate=True,
                    initializer_range=0.2)
    cfg = ModelConfig(vocab_size=32, num_layers=2, intermediate_size=32, ttt=ttt, pre_conv=True)
    model = TTTLM(cfg)
    changed = (0, 2, 3, 4, 7, 8, 12)  # mini-batch edges, inside, and the partial mini-batch
    base = tokens_for(cfg, (LENGTH,))
    rows = [base]
    for t in changed:
        row = base.copy()
        row[t] = (base[t] + 1 + t) % cfg.vocab_size
        rows.append(row)
    tokens = np.stack(rows)  # [1 + len(changed), L]: batch rows are independent sequences
    variables = fast_jit(model.init)(init_key(1), tokens)
    logits = np.asarray(fast_jit(model.apply)(variables, tokens))
    for row, t in enumerate(changed, start=1):
        np.testing.assert_allclose(logits[row, :t], logits[0, :t], atol=1e-6, rtol=0,
                                   err_msg=f"token {t} leaked into earlier positions")
        assert np.abs(logits[row, t] - logits[0, t]).max() > 1e-3, t
        if t + 1 < LENGTH:  # and it reaches later positions
            assert np.abs(logits[row, t + 1:] - logits[0, t + 1:]).max() > 1e-4, t


def test_causality_inside_ttt_layer():
    """The same on the TTT layer alone (Q/K convs on), and the carried state reaches ahead."""
    ttt = TTTConfig(model_dim=DIM, num_heads=HEADS, mini_batch_size=MINI_BATCH, share_qk=True,
                    initializer_range=0.2)
    layer = TTTLayer(ttt)
    x = np.random.default_rng(0).standard_normal((1, LENGTH, DIM)).astype(np.float32)
    t = 5
    x2 = x.copy()
    x2[:, t] += 1.0
    variables = fast_jit(layer.init)(init_key(1), x)
    out = np.asarray(fast_jit(layer.apply)(variables, np.concatenate([x, x2])))
    y, y2 = out[:1], out[1:]
    np.testing.assert_allclose(y2[:, :t], y[:, :t], atol=1e-6, rtol=0)
    assert np.abs(y2[:, t] - y[:, t]).max() > 1e-4
    # Position t+4 is in the next mini-batch and out of the convs' reach (kernel 4): it sees
    # token t only through the inner state carried across mini-batches.
    assert np.abs(y2[:, t + 4] - y[:, t + 4]).max() > 1e-5


# ---------------------------------------------------------------- Linen blocks vs numpy


def rng_array(seed, shape, scale=1.0):
    return scale * np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_rms_norm_matches_numpy():
    x = rng_array(0, (2, 5, 8), 3.0)
    weight = rng_array(1, (8,)) + 1.0
    eps = 1e-6
    out = RMSNorm(eps).apply({"params": {"weight": weight}}, jnp.asarray(x))
    expected = weight * x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + eps)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-5)
    variables = RMSNorm(eps).init(jax.random.PRNGKey(0), jnp.asarray(x))
    np.testing.assert_array_equal(variables["params"]["weight"], np.ones(8, np.float32))


def test_swiglu_matches_numpy():
    d, hidden = 8, 12
    x = rng_array(0, (2, 5, d))
    gate, up, down = rng_array(1, (d, hidden), 0.3), rng_array(2, (d, hidden), 0.3), rng_array(
        3, (hidden, d), 0.3)
    params = {"gate_proj": {"kernel": gate}, "up_proj": {"kernel": up},
              "down_proj": {"kernel": down}}
    out = SwiGLU(hidden).apply({"params": params}, jnp.asarray(x))
    x64 = x.astype(np.float64)
    g = x64 @ gate
    silu = g / (1.0 + np.exp(-g))
    expected = (silu * (x64 @ up)) @ down
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-5)
    shapes = jax.eval_shape(SwiGLU(hidden).init, jax.random.PRNGKey(0), jnp.asarray(x))
    assert {k: v["kernel"].shape for k, v in shapes["params"].items()} == {
        "gate_proj": (d, hidden), "up_proj": (d, hidden), "down_proj": (hidden, d)}


def numpy_causal_conv(x, kernel, bias, tail=None):
    """``y[b, t, c] = bias[c] + sum_j kernel[j, c] * x[b, t - (K - 1) + j, c]``, a loop."""
    bsz, length, channels = x.shape
    k = kernel.shape[0]
    history = np.zeros((bsz, k - 1, channels)) if tail is None else tail
    full = np.concatenate([history, x], axis=1).astype(np.float64)  # index t + K - 1 is token t
    y = np.zeros((bsz, length, channels))
    for b in range(bsz):
        for t in range(length):
            for c in range(channels):
                y[b, t, c] = bias[c] + sum(kernel[j, c] * full[b, t + j, c] for j in range(k))
    return y


@pytest.mark.parametrize("kernel_size", [1, 3, 4])
def test_causal_depthwise_conv_matches_numpy(kernel_size):
    x = rng_array(0, (2, 7, 5))
    kernel, bias = rng_array(1, (kernel_size, 5)), rng_array(2, (5,))
    conv = CausalDepthwiseConv(kernel_size)
    variables = {"params": {"kernel": kernel, "bias": bias}}
    out = conv.apply(variables, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(out), numpy_causal_conv(x, kernel, bias), atol=1e-5,
                               rtol=1e-5)
    tail = rng_array(3, (2, kernel_size - 1, 5))
    out = conv.apply(variables, jnp.asarray(x), jnp.asarray(tail))
    np.testing.assert_allclose(np.asarray(out), numpy_causal_conv(x, kernel, bias, tail),
                               atol=1e-5, rtol=1e-5)
    # Streaming: a split sequence with the tail carried gives the whole-sequence output.
    if kernel_size > 1:
        first, second = x[:, :4], x[:, 4:]
        carried = np.concatenate([np.zeros((2, kernel_size - 1, 5), np.float32), first],
                                 axis=1)[:, -(kernel_size - 1):]
        out2 = conv.apply(variables, jnp.asarray(second), jnp.asarray(carried))
        np.testing.assert_allclose(np.asarray(out2), numpy_causal_conv(x, kernel, bias)[:, 4:],
                                   atol=1e-5, rtol=1e-5)
    shapes = jax.eval_shape(conv.init, jax.random.PRNGKey(0), jnp.asarray(x))
    assert shapes["params"]["kernel"].shape == (kernel_size, 5)
    assert shapes["params"]["bias"].shape == (5,)


# ---------------------------------------------------------------- full-size presets


# ttt-lm-pytorch's TTT_STANDARD_CONFIGS (hidden size, intermediate size, layers, heads); the
# README promises TTT-Linear and TTT-MLP at each, with the Llama-2 vocabulary (32000), b = 16,
# bounded interleaved RoPE on and the reference's base learning rates (linear 1.0, mlp 0.1).
STANDARD_SIZES = {"125m": (768, 2048, 12, 12), "350m": (1024, 2736, 24, 16),
                  "760m": (1536, 4096, 24, 16), "1.3b": (2048, 5504, 24, 32)}
BASE_LR = {"linear": 1.0, "mlp": 0.1}


def test_presets_exist():
    """Exactly the README's full-size presets, each with the reference's standard shapes."""
    want = {f"ttt_{kind}_{size}" for kind in BASE_LR for size in STANDARD_SIZES}
    assert {p.stem for p in PRESETS} == want
    for path in PRESETS:
        _, kind, size = path.stem.split("_")
        cfg = load_config(path).model
        t = cfg.ttt
        assert (t.model_dim, cfg.intermediate_size, cfg.num_layers, t.num_heads) \
            == STANDARD_SIZES[size], path.stem
        assert (cfg.vocab_size, t.mini_batch_size, t.ttt_layer_type, t.ttt_base_lr) \
            == (32000, 16, kind, BASE_LR[kind]), path.stem
        assert t.use_rope and t.rope_bounded and t.rope_layout == "interleaved", path.stem
        assert cfg.tie_word_embeddings and cfg.seq_modeling == "ttt", path.stem


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_shapes_without_allocation(path):
    cfg = load_config(path).model
    model = TTTLM(cfg)
    # One whole mini-batch: the shortest trace that runs every block.
    tokens = jax.ShapeDtypeStruct((2, cfg.ttt.mini_batch_size), jnp.int32)

    def run(key, tokens):
        variables = model.init(key, tokens)
        return variables, model.apply(variables, tokens)

    variables, logits = jax.eval_shape(run, jax.random.PRNGKey(0), tokens)
    assert logits.shape == (*tokens.shape, cfg.vocab_size)
    assert logits.dtype == jnp.float32
    assert_layout(variables["params"], expected_layout(cfg))
    assert_leaf_shapes(variables["params"], cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
