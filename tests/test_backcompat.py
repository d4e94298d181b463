"""Backward compatibility of the RoPE switch (docs/architecture.md §1.3, §3): off by default, absent from the
traced program when off, no new parameters, metadata optional, and params interchangeable."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from ttt_jax import (TTTLM, ModelConfig, RunConfig, SequenceMetadata, TTTConfig, TTTLayer,
                     from_dict, load_config, to_dict)
from jaxpr_walk import all_eqns

# The shapes of tests/conftest.py.
BATCH, DIM, HEADS, MINI_BATCH = 2, 16, 2, 4
LENGTH = 13  # L % b != 0
VOCAB = 32
HUGE = 100_000
TRIG = ("sin", "cos")


def ttt_config(**kw):
    return TTTConfig(model_dim=DIM, num_heads=HEADS, mini_batch_size=MINI_BATCH, **kw)


def model_config(**ttt_kw):
    return ModelConfig(vocab_size=VOCAB, num_layers=2, intermediate_size=32,
                       ttt=ttt_config(**ttt_kw))


def trig_ops(closed_jaxpr):
    """The sin/cos primitives of a jaxpr, found both structurally and in its printed text."""
    structural = sorted(e.primitive.name for e in all_eqns(closed_jaxpr)
                        if e.primitive.name in TRIG)
    # In the text a primitive follows "= " ("gm:f32[4,4] = sin gk"); a bare substring test
    # could also hit a variable that happens to be named "sin".
    printed = sorted(re.findall(r"=\s+(sin|cos)\b", str(closed_jaxpr)))
    assert structural == printed, (structural, printed)
    return structural


def sds(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def shapes_of(tree):
    return jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), tree)


@pytest.fixture(scope="module")
def x():
    return jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, LENGTH, DIM)), jnp.float32)


@pytest.fixture(scope="module")
def params(x):
    """Variables of a RoPE-off layer (the only real init in this file)."""
    return jax.jit(TTTLayer(ttt_config()).init)(jax.random.key(0), x)


@pytest.fixture(scope="module")
def off_loss_and_grad(params, x):
    """``variables -> ((loss, out), grads)`` for a RoPE-off layer called with no metadata at all
    (the pre-RoPE call), on a regression loss; jitted once."""
    layer = TTTLayer(ttt_config())
    target = jnp.asarray(np.random.default_rng(1).normal(size=(BATCH, LENGTH, DIM)), jnp.float32)

    @chex.assert_max_traces(n=1)
    def loss_fn(variables):
        out = layer.apply(variables, x)
        return jnp.mean(jnp.square(out - target)), out

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


@pytest.fixture(scope="module")
def out_off(params, off_loss_and_grad):
    """The RoPE-off layer's output with no metadata: the pre-RoPE behaviour."""
    (_, out), _ = off_loss_and_grad(params)
    chex.assert_shape(out, (BATCH, LENGTH, DIM))
    chex.assert_tree_all_finite(out)
    return out


@pytest.fixture(scope="module")
def apply_layer(params, x):
    """``use_rope -> (metadata -> output)``, jitted; the metadata is a traced pytree, so each
    layer compiles once per metadata form (offset-only, explicit position_ids), never per value."""

    off, on = TTTLayer(ttt_config()), TTTLayer(ttt_config(use_rope=True))

    # (chex keys its trace counter on the source text, so the two need separate definitions.)
    @chex.assert_max_traces(n=2)
    def apply_off(meta):
        return off.apply(params, x, meta)

    @chex.assert_max_traces(n=2)
    def apply_on(meta):
        return on.apply(params, x, meta)

    return {False: jax.jit(apply_off), True: jax.jit(apply_on)}


# --------------------------------------------------------------------------- defaults


def test_rope_off_by_default():
    cfg = TTTConfig(model_dim=DIM, num_heads=HEADS)
    assert cfg.use_rope is False
    assert cfg.rope_theta == 10000.0
    assert model_config().ttt.use_rope is False


def test_config_without_rope_keys_means_off(tmp_path):
    data = {"model_dim": DIM, "num_heads": HEADS, "mini_batch_size": MINI_BATCH}
    cfg = from_dict(TTTConfig, data)
    assert cfg.use_rope is False
    assert cfg.rope_theta == 10000.0 and isinstance(cfg.rope_theta, float)
    # Omitting the keys and writing the defaults are the same config.
    assert cfg == from_dict(TTTConfig, {**data, "use_rope": False})
    assert cfg == from_dict(TTTConfig, {**data, "use_rope": False, "rope_theta": 10000.0})
    assert cfg == from_dict(TTTConfig, to_dict(cfg))
    # Nested, and from a YAML file written before RoPE existed.
    model = {"vocab_size": VOCAB, "num_layers": 2, "intermediate_size": 32, "ttt": data}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"model": model}))
    for run in (from_dict(RunConfig, {"model": model}), load_config(path)):
        assert run.model.ttt.use_rope is False
        assert run.model.ttt.rope_theta == 10000.0
        assert run.model.ttt == cfg


# --------------------------------------------------------------------------- no RoPE ops when off


LAYER_VARIANTS = [{}, {"ttt_layer_type": "mlp"},
                  {"share_qk": True, "qk_l2_norm": True, "use_gate": True}]
METADATA = [None, SequenceMetadata(), SequenceMetadata(offset=5),
            SequenceMetadata(position_ids=jnp.arange(LENGTH)[None].repeat(BATCH, 0))]


@pytest.mark.parametrize("variant", LAYER_VARIANTS, ids=["linear", "mlp", "shared_qk_l2_gate"])
def test_layer_jaxpr_has_no_trig_when_off(variant):
    x = sds((BATCH, LENGTH, DIM))
    off, on = TTTLayer(ttt_config(**variant)), TTTLayer(ttt_config(use_rope=True, **variant))
    variables = jax.eval_shape(off.init, jax.random.key(0), x)
    prims_off = None
    for meta in METADATA:
        jaxpr = jax.make_jaxpr(lambda v, x: off.apply(v, x, meta))(variables, x)
        assert trig_ops(jaxpr) == []
        # The metadata does not change the program at all when RoPE is off.
        prims = [e.primitive.name for e in all_eqns(jaxpr)]
        assert prims_off is None or prims == prims_off
        prims_off = prims
    # The documented usage exactly, and the check can fail: RoPE on puts sin and cos in.
    assert trig_ops(jax.make_jaxpr(lambda v, x: off.apply(v, x))(variables, x)) == []
    assert trig_ops(jax.make_jaxpr(lambda v, x: on.apply(v, x))(variables, x)) == ["cos", "sin"]
    for layout in ("interleaved", "half"):
        half = TTTLayer(ttt_config(use_rope=True, rope_layout=layout, **variant))
        meta = SequenceMetadata(offset=5)
        jaxpr = jax.make_jaxpr(lambda v, x: half.apply(v, x, meta))(variables, x)
        assert trig_ops(jaxpr) == ["cos", "sin"]


@pytest.mark.parametrize("ttt_type", ["linear", "mlp"])
def test_model_jaxpr_has_no_trig_when_off(ttt_type):
    tokens = sds((BATCH, LENGTH), jnp.int32)
    off = TTTLM(model_config(ttt_layer_type=ttt_type))
    on = TTTLM(model_config(ttt_layer_type=ttt_type, use_rope=True))
    variables = jax.eval_shape(off.init, jax.random.key(0), tokens)
    assert trig_ops(jax.make_jaxpr(lambda v, t: off.apply(v, t))(variables, tokens)) == []
    meta = SequenceMetadata(offset=5)
    assert trig_ops(jax.make_jaxpr(lambda v, t: off.apply(v, t, meta))(variables, tokens)) == []
    # One sin and one cos per layer when on.
    trig = trig_ops(jax.make_jaxpr(lambda v, t: on.apply(v, t))(variables, tokens))
    assert trig == ["cos", "cos", "sin", "sin"]


# --------------------------------------------------------------------------- training without RoPE


def test_forward_and_sgd_step_without_rope(params, off_loss_and_grad):
    value_and_grad = off_loss_and_grad
    (loss, out), grads = value_and_grad(params)
    chex.assert_shape(out, (BATCH, LENGTH, DIM))
    chex.assert_type(out, jnp.float32)
    chex.assert_tree_all_finite((loss, out, grads))
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)

    # A small step: the loss is sharply curved at init (lr=0.5 overshoots and raises it).
    lr = 1e-3
    new_params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    chex.assert_tree_all_finite(new_params)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new_params))
    assert any(changed)
    (new_loss, _), _ = value_and_grad(new_params)  # same shapes: no second trace
    assert np.isfinite(float(new_loss))
    assert float(new_loss) < float(loss)
    # ... by about the first-order amount lr * |g|^2, so the gradient is the loss's own.
    predicted = lr * sum(float(jnp.sum(jnp.square(g))) for g in jax.tree.leaves(grads))
    assert 0.25 * predicted < float(loss) - float(new_loss) < 2.0 * predicted


# --------------------------------------------------------------------------- metadata


def test_metadata_without_position_ids(params, x, out_off, apply_layer):
    """With RoPE on: no position_ids means offset 0, and an offset equals explicit
    ``offset + arange(L)``."""
    on = apply_layer[True]
    arange = jnp.arange(LENGTH, dtype=jnp.int32)[None].repeat(BATCH, 0)  # [B, L]
    empty = on(SequenceMetadata())
    offset = on(SequenceMetadata(offset=5))
    explicit0 = on(SequenceMetadata(position_ids=arange))
    explicit = on(SequenceMetadata(position_ids=5 + arange))
    for out in (empty, offset, explicit0, explicit):
        chex.assert_shape(out, out_off.shape)
        chex.assert_type(out, out_off.dtype)
        chex.assert_tree_all_finite(out)
    chex.assert_trees_all_close(empty, explicit0, atol=1e-6, rtol=0)
    chex.assert_trees_all_close(offset, explicit, atol=1e-6, rtol=0)
    # The offset matters with RoPE on (5 % 4 != 0), so the equalities above are not vacuous.
    assert float(jnp.max(jnp.abs(offset - empty))) > 1e-5
    # An offset that is a multiple of b is the same as no offset (bounded positions).
    chex.assert_trees_all_close(on(SequenceMetadata(offset=HUGE)), empty, atol=1e-6, rtol=0)

    # No metadata at all, and per-row offsets [B], checked on the RoPE-rotated inputs.
    layer = TTTLayer(ttt_config(use_rope=True))

    def ttt_inputs(meta):
        return layer.apply(params, x, meta, method=TTTLayer.ttt_inputs)

    chex.assert_trees_all_equal(ttt_inputs(None), ttt_inputs(SequenceMetadata()))
    rows = jnp.array([5, HUGE + 1], jnp.int32)
    chex.assert_trees_all_close(ttt_inputs(SequenceMetadata(offset=rows)),
                                ttt_inputs(SequenceMetadata(position_ids=rows[:, None] + arange)),
                                atol=1e-6, rtol=0)


def test_rope_off_ignores_metadata(out_off, apply_layer):
    off = apply_layer[False]
    rng = np.random.default_rng(2)
    metas = [SequenceMetadata(), SequenceMetadata(offset=5),
             SequenceMetadata(position_ids=jnp.asarray(rng.integers(0, 10**6, (BATCH, LENGTH)),
                                                       jnp.int32)),
             SequenceMetadata(position_ids=jnp.asarray(rng.integers(0, 10**6, (BATCH, LENGTH)),
                                                       jnp.int32))]
    for meta in metas:
        chex.assert_trees_all_close(off(meta), out_off, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- params and shapes


def assert_interchangeable(off, on, inputs, out_shape):
    """Same param tree and shapes with RoPE off and on; each model accepts the other's params
    (flax checks names and shapes at apply) and returns ``out_shape`` float32."""
    v_off = jax.eval_shape(off.init, jax.random.key(0), inputs)
    v_on = jax.eval_shape(on.init, jax.random.key(0), inputs)
    assert jax.tree.structure(v_off) == jax.tree.structure(v_on)
    assert shapes_of(v_off) == shapes_of(v_on)
    outs = [jax.eval_shape(model.apply, v, inputs) for model in (off, on) for v in (v_off, v_on)]
    assert all(shapes_of(o) == (out_shape, jnp.dtype(jnp.float32)) for o in outs)


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_layer_same_param_tree_and_output_shape(layout):
    off, on = TTTLayer(ttt_config()), TTTLayer(ttt_config(use_rope=True, rope_layout=layout))
    assert_interchangeable(off, on, sds((BATCH, LENGTH, DIM)), (BATCH, LENGTH, DIM))


@pytest.mark.parametrize("ttt_type", ["linear", "mlp"])
def test_model_same_param_tree_and_output_shape(ttt_type):
    off = TTTLM(model_config(ttt_layer_type=ttt_type))
    on = TTTLM(model_config(ttt_layer_type=ttt_type, use_rope=True))
    assert_interchangeable(off, on, sds((BATCH, LENGTH), jnp.int32), (BATCH, LENGTH, VOCAB))


def test_rope_off_params_run_in_rope_on_layer(out_off, apply_layer):
    """Real values: RoPE-off params drive a RoPE-on layer, and at positions that are all
    multiples of b (angle 0) it reproduces the RoPE-off output."""
    zero_angle = MINI_BATCH * (HUGE + jnp.arange(LENGTH, dtype=jnp.int32))[None].repeat(BATCH, 0)
    out = apply_layer[True](SequenceMetadata(position_ids=zero_angle))
    chex.assert_trees_all_equal_shapes_and_dtypes(out, out_off)
    chex.assert_trees_all_close(out, out_off, atol=1e-6, rtol=0)
