"""Bounded-position RoPE (docs/architecture.md §1.3): the table, both layouts, position bounding, dtypes,
gradients, and where the rotation sits inside the TTT layer.

Every expected value comes from a hand-written definition (explicit Python loops over the
rotated pairs, float64), never from the library code itself.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ttt_jax.math.rope as rope_mod
from ttt_jax import SequenceMetadata, TTTConfig, TTTLayer
from ttt_jax.config import from_dict
from ttt_jax.math.rope import apply_bounded_rope, inv_frequencies, rope_table
from jaxpr_walk import all_eqns

# The shapes of tests/conftest.py.
BATCH, DIM, HEADS, MINI_BATCH = 2, 16, 2, 4
HEAD_DIM = DIM // HEADS
LENGTH = 13  # L % b != 0
LAYOUTS = ("interleaved", "half")
THETA = 10000.0
# Positions far beyond anything a table indexed by absolute position would hold.
HUGE = 100_000


# --------------------------------------------------------------------------- references


def hand_inv_freq(f, theta):
    """``1 / theta ** (2k / f)`` in float64, one Python expression per k."""
    return [1.0 / theta ** (2 * k / f) for k in range(f // 2)]


def hand_pairs(f, layout):
    """The index pairs ``(i, j)`` rotated together, pair k rotating by ``inv_freq[k]``."""
    if layout == "interleaved":
        return [(2 * k, 2 * k + 1) for k in range(f // 2)]
    return [(k, k + f // 2) for k in range(f // 2)]


def hand_rope(x, positions, b, theta, layout, sign=1.0):
    """Rotates ``x [B, H, L, f]`` pair by pair by ``sign * (p % b) * inv_freq[k]`` (float64)."""
    x = np.asarray(x, np.float64)
    positions = np.asarray(positions)
    out = x.copy()
    nb, _, length, f = x.shape
    inv = hand_inv_freq(f, theta)
    for bi in range(nb):
        for t in range(length):
            p = int(positions[bi, t]) % b
            for k, (i, j) in enumerate(hand_pairs(f, layout)):
                angle = sign * p * inv[k]
                c, s = math.cos(angle), math.sin(angle)
                a, bb = x[bi, :, t, i], x[bi, :, t, j]
                out[bi, :, t, i] = a * c - bb * s
                out[bi, :, t, j] = a * s + bb * c
    return out


def rope_inputs(seed=0, length=LENGTH):
    """``(xq, xk)``, ``[B, H, L, f]`` float32 (numpy RNG: no jax.random compile needed)."""
    rng = np.random.default_rng(seed)
    shape = (BATCH, HEADS, length, HEAD_DIM)
    return (jnp.asarray(rng.normal(size=shape), jnp.float32),
            jnp.asarray(rng.normal(size=shape), jnp.float32))


def random_positions(seed=0, high=1_000_000, length=LENGTH):
    return np.random.default_rng(seed).integers(0, high, size=(BATCH, length)).astype(np.int32)


def rope(xq, xk, pos, layout, b=MINI_BATCH, theta=THETA):
    return apply_bounded_rope(xq, xk, jnp.asarray(pos), mini_batch_size=b, theta=theta,
                              layout=layout)


def layer_config(**kw):
    return TTTConfig(model_dim=DIM, num_heads=HEADS, mini_batch_size=MINI_BATCH, **kw)


@pytest.fixture(scope="module")
def layer_x():
    return jnp.asarray(np.random.default_rng(42).normal(size=(BATCH, LENGTH, DIM)), jnp.float32)


@pytest.fixture(scope="module")
def layer_params(layer_x):
    """One set of layer variables; RoPE adds no parameter, so it serves RoPE on and off."""
    return jax.jit(TTTLayer(layer_config()).init)(jax.random.key(1), layer_x)


@pytest.fixture(scope="module")
def rope_layer_loss_and_grad(layer_params, layer_x):
    """``pos -> ((loss, out), grads)`` for the full layer with RoPE on, jitted once.

    Positions are data: ``chex.assert_max_traces`` fails if a new position array re-traces.
    """
    layer = TTTLayer(layer_config(use_rope=True))

    @chex.assert_max_traces(n=1)
    def loss(params, pos):
        out = layer.apply(params, layer_x, SequenceMetadata(position_ids=pos))
        return jnp.mean(jnp.square(out)), out

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return lambda pos: step(layer_params, jnp.asarray(pos, jnp.int32))


# --------------------------------------------------------------------------- init


@pytest.mark.parametrize("f,theta", [(HEAD_DIM, THETA), (16, 500.0), (2, 10.0)])
def test_inv_freq_matches_hand_formula(f, theta):
    inv = inv_frequencies(f, theta)
    chex.assert_shape(inv, (f // 2,))
    assert inv.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(inv), hand_inv_freq(f, theta), rtol=1e-6, atol=0)


@pytest.mark.parametrize("b", [1, MINI_BATCH, 16])
def test_rope_table_has_b_rows(b):
    cos, sin = rope_table(b, HEAD_DIM, THETA)
    chex.assert_shape([cos, sin], (b, HEAD_DIM // 2))
    chex.assert_type([cos, sin], jnp.float32)
    inv = hand_inv_freq(HEAD_DIM, THETA)
    want_cos = [[math.cos(p * w) for w in inv] for p in range(b)]
    want_sin = [[math.sin(p * w) for w in inv] for p in range(b)]
    np.testing.assert_allclose(np.asarray(cos), want_cos, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin), want_sin, atol=1e-6)


def test_layer_builds_table_with_exactly_b_rows(monkeypatch):
    """Whatever L and the positions, the layer asks for a ``b``-row table only."""
    calls = []
    real_table = rope_mod.rope_table

    def spy(num_positions, head_dim, theta):
        cos, sin = real_table(num_positions, head_dim, theta)
        calls.append((num_positions, head_dim, theta, cos.shape, sin.shape))
        return cos, sin

    monkeypatch.setattr(rope_mod, "rope_table", spy)
    layer = TTTLayer(layer_config(use_rope=True, rope_theta=500.0))
    x = jax.ShapeDtypeStruct((BATCH, LENGTH, DIM), jnp.float32)
    meta = SequenceMetadata(position_ids=HUGE + 7 + jnp.arange(LENGTH)[None].repeat(BATCH, 0))
    params = jax.eval_shape(layer.init, jax.random.key(0), x)
    out = jax.eval_shape(lambda v, x: layer.apply(v, x, meta), params, x)
    chex.assert_shape(out, (BATCH, LENGTH, DIM))
    assert calls, "the layer never built a RoPE table"
    half = HEAD_DIM // 2
    assert all(c == (MINI_BATCH, HEAD_DIM, 500.0, (MINI_BATCH, half), (MINI_BATCH, half))
               for c in calls), calls


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_matches_hand_rotation(layout):
    xq, xk = rope_inputs()
    pos = random_positions()
    rq, rk = rope(xq, xk, pos, layout)
    chex.assert_shape([rq, rk], (BATCH, HEADS, LENGTH, HEAD_DIM))
    chex.assert_type([rq, rk], jnp.float32)
    np.testing.assert_allclose(np.asarray(rq), hand_rope(xq, pos, MINI_BATCH, THETA, layout),
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(rk), hand_rope(xk, pos, MINI_BATCH, THETA, layout),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_position_zero_mod_b_is_identity(layout):
    """Angle 0 at every multiple of b, huge ones included."""
    xq, xk = rope_inputs()
    pos = MINI_BATCH * np.random.default_rng(3).integers(0, 2**27, size=(BATCH, LENGTH))
    rq, rk = rope(xq, xk, pos.astype(np.int32), layout)
    chex.assert_trees_all_close((rq, rk), (xq, xk), atol=1e-6, rtol=0)


def test_layouts_differ():
    """The two layouts really pair different dims (so the tests above can tell them apart)."""
    xq, xk = rope_inputs()
    pos = 1 + np.zeros((BATCH, LENGTH), np.int32)
    a, _ = rope(xq, xk, pos, "interleaved")
    b, _ = rope(xq, xk, pos, "half")
    assert float(jnp.max(jnp.abs(a - b))) > 1e-2


# --------------------------------------------------------------------------- position bounding


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", [1, 3, HUGE // MINI_BATCH, 2**27])
def test_rope_modulo_invariance(layout, k):
    xq, xk = rope_inputs()
    pos = random_positions(high=1000)
    base = rope(xq, xk, pos, layout)
    shifted = rope(xq, xk, pos + k * MINI_BATCH, layout)
    chex.assert_trees_all_equal(base, shifted)
    # Shifting by a non-multiple of b does change the result.
    other = rope(xq, xk, pos + k * MINI_BATCH + 1, layout)
    assert float(jnp.max(jnp.abs(other[0] - base[0]))) > 1e-3


def test_layer_modulo_invariance(rope_layer_loss_and_grad):
    """The full TTT layer sees only ``p % b``: p and p + k b (up to 2^29) give the same output
    and the same parameter gradients."""
    pos = random_positions(seed=5, high=64)
    (_, base), base_grads = rope_layer_loss_and_grad(pos)
    chex.assert_shape(base, (BATCH, LENGTH, DIM))
    chex.assert_tree_all_finite(base)
    per_row_k = np.array([[HUGE // MINI_BATCH], [7]], np.int32)  # a different k per row
    for shift in (MINI_BATCH, HUGE, 2**29, per_row_k * MINI_BATCH):
        (_, out), grads = rope_layer_loss_and_grad(pos + shift)
        chex.assert_trees_all_equal((out, grads), (base, base_grads))
    (_, other), _ = rope_layer_loss_and_grad(pos + HUGE + 1)
    assert float(jnp.max(jnp.abs(other - base))) > 1e-6


# --------------------------------------------------------------------------- layouts


def test_half_and_interleaved_related_by_fixed_permutation():
    """``half(x[..., perm]) == interleaved(x)[..., perm]`` with perm = even dims, then odd dims."""
    perm = np.concatenate([np.arange(0, HEAD_DIM, 2), np.arange(1, HEAD_DIM, 2)])
    xq, xk = rope_inputs(seed=7)
    pos = random_positions(seed=7)
    inter = rope(xq, xk, pos, "interleaved")
    half = rope(xq[..., perm], xk[..., perm], pos, "half")
    chex.assert_trees_all_close(half, tuple(i[..., perm] for i in inter),
                                atol=1e-6, rtol=1e-6)
    # ... and each still agrees with its own hand-written rotation.
    np.testing.assert_allclose(np.asarray(inter[0]),
                               hand_rope(xq, pos, MINI_BATCH, THETA, "interleaved"), atol=1e-5)
    np.testing.assert_allclose(np.asarray(half[0]),
                               hand_rope(xq[..., perm], pos, MINI_BATCH, THETA, "half"), atol=1e-5)


# --------------------------------------------------------------------------- dtype


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_in_bf16_out_float32_table(layout):
    xq, xk = rope_inputs(seed=11)
    pos = random_positions(seed=11)
    bq, bk = xq.astype(jnp.bfloat16), xk.astype(jnp.bfloat16)
    rq, rk = rope(bq, bk, pos, layout)
    chex.assert_type([rq, rk], jnp.bfloat16)
    chex.assert_shape([rq, rk], (BATCH, HEADS, LENGTH, HEAD_DIM))
    chex.assert_type(list(rope_table(MINI_BATCH, HEAD_DIM, THETA)), jnp.float32)
    # The trig runs in float32 even for bf16 inputs.
    jaxpr = jax.make_jaxpr(lambda q, k: rope(q, k, pos, layout))(bq, bk)
    trig = [e for e in all_eqns(jaxpr) if e.primitive.name in ("sin", "cos")]
    assert trig and all(e.outvars[0].aval.dtype == jnp.float32 for e in trig)
    # Only the bf16 rounding of the output separates it from the exact rotation of its input.
    exact = hand_rope(np.asarray(bq.astype(jnp.float32)), pos, MINI_BATCH, THETA, layout)
    np.testing.assert_allclose(np.asarray(rq.astype(jnp.float32)), exact, rtol=2**-8, atol=1e-6)
    # And it is close to the fp32 result of the unrounded input.
    fq, _ = rope(xq, xk, pos, layout)
    np.testing.assert_allclose(np.asarray(rq.astype(jnp.float32)), np.asarray(fq),
                               rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grad_is_inverse_rotation(layout):
    """d/dx sum(w * R(p) x) = R(p)^T w = R(-p) w: the rotation is orthogonal."""
    xq, xk = rope_inputs(seed=13)
    wq, wk = rope_inputs(seed=14)
    pos = random_positions(seed=13)

    def loss(q, k):
        rq, rk = rope(q, k, pos, layout)
        return jnp.sum(wq * rq) + jnp.sum(wk * rk)

    gq, gk = jax.grad(loss, argnums=(0, 1))(xq, xk)
    chex.assert_tree_all_finite((gq, gk))
    assert float(jnp.min(jnp.linalg.norm(gq, axis=-1))) > 0
    np.testing.assert_allclose(np.asarray(gq), hand_rope(wq, pos, MINI_BATCH, THETA, layout, -1),
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gk), hand_rope(wk, pos, MINI_BATCH, THETA, layout, -1),
                               atol=1e-5, rtol=1e-5)
    # Orthogonality: the gradient has the norm of w, row by row.
    np.testing.assert_allclose(np.asarray(jnp.linalg.norm(gq, axis=-1)),
                               np.asarray(jnp.linalg.norm(wq, axis=-1)), rtol=1e-5)


def test_layer_param_grads_finite_with_rope(rope_layer_loss_and_grad, layer_params):
    (loss, _), grads = rope_layer_loss_and_grad(random_positions(seed=17))
    assert np.isfinite(float(loss))
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, layer_params)
    chex.assert_tree_all_finite(grads)
    g = grads["params"]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert float(jnp.max(jnp.abs(g[name]["kernel"]))) > 0, name


# --------------------------------------------------------------------------- placement in the layer


def ttt_inputs(params, x, metadata=None, **cfg):
    return TTTLayer(layer_config(**cfg)).apply(params, x, metadata, method=TTTLayer.ttt_inputs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rope_rotates_q_and_k_not_v(layer_params, layer_x, layout):
    pos = np.arange(LENGTH, dtype=np.int32)[None] + np.array([[0], [HUGE + 1]], np.int32)
    meta = SequenceMetadata(position_ids=jnp.asarray(pos))
    q0, k0, v0, lr0 = ttt_inputs(layer_params, layer_x, meta, use_rope=False)
    q1, k1, v1, lr1 = ttt_inputs(layer_params, layer_x, meta, use_rope=True, rope_layout=layout)
    chex.assert_shape([q1, k1, v1], (BATCH, HEADS, LENGTH, HEAD_DIM))
    chex.assert_type([q1, k1, v1], jnp.float32)
    chex.assert_trees_all_equal((v1, lr1), (v0, lr0))  # V (and the learning rates) untouched

    zero = (pos % MINI_BATCH == 0)[:, None, :]  # [B, 1, L]: angle 0 there
    assert zero.any() and (~zero).any()
    for on, off in ((q1, q0), (k1, k0)):
        diff = np.asarray(jnp.linalg.norm(on - off, axis=-1))  # [B, H, L]
        scale = np.asarray(jnp.linalg.norm(off, axis=-1))
        assert np.all(diff[np.broadcast_to(zero, diff.shape)] <= 1e-6 * scale.max())
        assert np.all(diff[np.broadcast_to(~zero, diff.shape)] > 1e-3 * scale[
            np.broadcast_to(~zero, diff.shape)])
        # Norms per head and token are preserved, and the rotation is exactly the hand one.
        np.testing.assert_allclose(np.asarray(jnp.linalg.norm(on, axis=-1)), scale, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(on), hand_rope(off, pos, MINI_BATCH, THETA, layout),
                                   atol=1e-6, rtol=1e-5)


def test_rope_after_qk_l2_norm(layer_params, layer_x):
    pos = random_positions(seed=19)
    meta = SequenceMetadata(position_ids=jnp.asarray(pos))
    q, k, _, _ = ttt_inputs(layer_params, layer_x, meta, use_rope=True, qk_l2_norm=True)
    chex.assert_trees_all_close(
        (jnp.linalg.norm(q, axis=-1), jnp.linalg.norm(k, axis=-1)),
        (jnp.ones(q.shape[:-1]), jnp.ones(k.shape[:-1])), atol=1e-5, rtol=0)
    # Composition check: normalise the plain projections by hand, then rotate by hand.
    q0, k0, _, _ = ttt_inputs(layer_params, layer_x, meta)
    for got, plain in ((q, q0), (k, k0)):
        plain = np.asarray(plain, np.float64)
        unit = plain / np.linalg.norm(plain, axis=-1, keepdims=True)
        np.testing.assert_allclose(np.asarray(got),
                                   hand_rope(unit, pos, MINI_BATCH, THETA, "interleaved"),
                                   atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- bad input


def test_odd_head_dim_with_rope_rejected():
    with pytest.raises(ValueError, match=r"num_heads.*head_dim=3"):
        TTTConfig(model_dim=6, num_heads=2, use_rope=True)
    with pytest.raises(ValueError, match="head_dim"):
        from_dict(TTTConfig, {"model_dim": 6, "num_heads": 2, "use_rope": True})
    with pytest.raises(ValueError, match="even head_dim"):
        inv_frequencies(3, THETA)
    # Odd head dims are fine while RoPE is off.
    assert TTTConfig(model_dim=6, num_heads=2).head_dim == 3


def test_unknown_rope_layout_rejected():
    with pytest.raises(ValueError, match=r"rope_layout.*'interleaved'.*'half'"):
        TTTConfig(model_dim=DIM, num_heads=HEADS, use_rope=True, rope_layout="rotate_half")
    with pytest.raises(ValueError, match="rope_layout"):
        from_dict(TTTConfig, {"model_dim": DIM, "num_heads": HEADS, "rope_layout": "neox"})
    xq, xk = rope_inputs()
    with pytest.raises(ValueError, match="rope_layout"):
        rope(xq, xk, random_positions(), "neox")
