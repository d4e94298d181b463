"""The Flax Moshi backbone against the real ``moshi`` package (moshi==0.2.13, torch CPU).

A small ``moshi.modules.transformer.StreamingTransformer`` with random weights (norm alphas and
layer scales included) is imported into ours; full-sequence outputs for a length beyond the
context window, and moshi's own streaming mode fed one frame at a time, must match ours.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
moshi_transformer = pytest.importorskip("moshi.modules.transformer")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ttt_jax.moshi.config import MoshiTTTConfig, MoshiTransformerConfig  # noqa: E402
from ttt_jax.moshi.convert import from_state_dict, to_state_dict  # noqa: E402
from ttt_jax.moshi.hybrid import StreamingTransformer  # noqa: E402
from ttt_jax.tree import path_str  # noqa: E402

D, HEADS, LAYERS, CONTEXT, FFN = 64, 4, 2, 32, 256
LENGTH, BATCH = 45, 2  # LENGTH > CONTEXT: the window matters
ATOL = 1e-4


def build_pair(norm: str, layer_scale):
    """A random-weight moshi StreamingTransformer and our config + params imported from it."""
    torch.manual_seed(0)
    ref = moshi_transformer.StreamingTransformer(
        d_model=D, num_heads=HEADS, num_layers=LAYERS, dim_feedforward=FFN, causal=True,
        context=CONTEXT, positional_embedding="rope", max_period=10000.0, gating="silu",
        norm=norm, layer_scale=layer_scale).eval()
    with torch.no_grad():  # move norms and layer scales away from their constant inits
        for name, p in ref.named_parameters():
            if name.endswith("alpha") or name.endswith("scale"):
                p.copy_(p + 0.3 * torch.randn_like(p))
    cfg = MoshiTTTConfig(transformer=MoshiTransformerConfig(
        d_model=D, num_heads=HEADS, num_layers=LAYERS, dim_feedforward=FFN, context=CONTEXT,
        norm=norm, layer_scale=layer_scale))
    model = StreamingTransformer(cfg)
    x0 = jnp.zeros((1, 4, D))
    target = model.init(jax.random.PRNGKey(0), x0)["params"]
    params, kept = from_state_dict(cfg, ref.state_dict(), target, scope="transformer")
    assert kept == []
    return ref, cfg, model, params


CASES = [("rms_norm_f32", None), ("rms_norm", 0.1)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-ls{c[1]}")
def pair(request):
    return build_pair(*request.param)


_FULL = {}


def full_forward(pair, inputs):
    """Our full forward of ``inputs`` (computed once per case)."""
    key = id(pair)
    if key not in _FULL:
        _, _, model, params = pair
        _FULL[key] = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(inputs)))
    return _FULL[key]


_STREAM = {}


def streamer(pair):
    """A jitted ``stream(cache, x)`` of the case (one per case, so its compiles are shared)."""
    if id(pair) not in _STREAM:
        _, _, model, params = pair
        _STREAM[id(pair)] = jax.jit(
            lambda c, x: model.apply({"params": params}, x, c, method="stream"))
    return _STREAM[id(pair)]


@pytest.fixture(scope="module")
def inputs():
    return np.random.default_rng(0).standard_normal((BATCH, LENGTH, D)).astype(np.float32)


def test_import_is_exact_and_exports_back(pair):
    ref, cfg, _, params = pair
    back = to_state_dict(cfg, params, scope="transformer")
    sd = ref.state_dict()
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)


def test_full_forward_matches_moshi(pair, inputs):
    ref, _, model, params = pair
    with torch.no_grad():
        want = ref(torch.from_numpy(inputs)).numpy()
    got = full_forward(pair, inputs)
    assert np.max(np.abs(got - want)) <= ATOL
    # The window matters at this length: without it the frames past the context differ.
    unbounded = dataclasses.replace(pair[1].transformer, context=None)
    model_nc = StreamingTransformer(dataclasses.replace(pair[1], transformer=unbounded))
    other = np.asarray(model_nc.apply({"params": params}, jnp.asarray(inputs)))
    assert np.max(np.abs(other[:, CONTEXT:] - want[:, CONTEXT:])) > 1e-3
    np.testing.assert_allclose(other[:, :CONTEXT], got[:, :CONTEXT], atol=1e-5)


def test_streaming_matches_moshi_streaming(pair, inputs):
    ref, _, model, params = pair
    variables = {"params": params}
    with torch.no_grad(), ref.streaming(BATCH):
        want = np.concatenate([ref(torch.from_numpy(inputs[:, t:t + 1])).numpy()
                               for t in range(LENGTH)], axis=1)
    cache = model.apply(variables, BATCH, method="init_cache")
    stream = streamer(pair)
    outs = []
    for t in range(LENGTH):
        y, cache = stream(cache, jnp.asarray(inputs[:, t:t + 1]))
        outs.append(np.asarray(y))
    got = np.concatenate(outs, axis=1)
    assert np.max(np.abs(want - got)) <= ATOL
    assert np.max(np.abs(full_forward(pair, inputs) - got)) <= 1e-5
    assert cache["layers"][0]["attn"]["k"].shape[2] == CONTEXT  # the cache stays bounded


@pytest.mark.parametrize("pair", CASES[:1], indirect=True, ids=lambda c: f"{c[0]}-ls{c[1]}")
def test_chunked_streaming_matches_full(pair, inputs):
    """A chunk longer than the context (37 frames), then single frames, continues the streams.
    One case suffices: chunking is independent of the norm and the layer scale."""
    _, _, model, params = pair
    variables = {"params": params}
    full = full_forward(pair, inputs)
    cache = model.apply(variables, BATCH, method="init_cache")
    stream = streamer(pair)
    outs = []
    for a, b in [(0, 37)] + [(t, t + 1) for t in range(37, LENGTH)]:
        y, cache = stream(cache, jnp.asarray(inputs[:, a:b]))
        outs.append(np.asarray(y))
    assert np.max(np.abs(np.concatenate(outs, axis=1) - full)) <= 1e-5


def test_noop_graft_on_moshi_weights_equals_moshi(inputs):
    """Real moshi weights, imported, with a no-op TTT layer grafted into layer 1: same output."""
    from ttt_jax.moshi.config import TTTArgs

    ref, cfg, _, _ = build_pair(*CASES[0])
    hybrid_cfg = dataclasses.replace(cfg, ttt=TTTArgs(enable=True, layers="1", mini_batch_size=4,
                                                      use_rope=True, noop_init=True))
    model = StreamingTransformer(hybrid_cfg)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4, D)))["params"]
    rng = np.random.default_rng(0)  # random TTT params: only the zero o_proj makes it a no-op
    target = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
    target = jax.tree_util.tree_map_with_path(  # zero o_proj: what noop_init's init gives
        lambda p, v: np.zeros_like(v) if path_str(p).endswith("o_proj/kernel") else v, target)
    params, kept = from_state_dict(hybrid_cfg, ref.state_dict(), target,
                                   scope="transformer", require_ttt=False)
    assert kept and all("seq_modeling_block" in k for k in kept)
    with torch.no_grad():
        want = ref(torch.from_numpy(inputs)).numpy()
    got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(inputs)))
    assert np.max(np.abs(got - want)) <= ATOL
