"""Hand-written derivatives against plain autodiff of the forms they replace: RoPE's
(``ttt_jax/math/rope.py``, ``jax.custom_jvp``; the split/merge rotation), alone and through the
whole layer, and the LayerNorm that keeps only its input (``layernorm.layer_norm_lean``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax import SequenceMetadata, TTTConfig, TTTLayer
from ttt_jax.math import rope
from ttt_jax.math.layernorm import layer_norm, layer_norm_lean


def _tables(bsz, length, f, bounded):
    pos = jnp.arange(length)[None] + jnp.arange(bsz)[:, None] * 5
    if bounded:
        cos, sin = rope.rope_table(4, f, 10000.0)
        p = rope.bounded_positions(pos, 4)
        return cos[p], sin[p]
    return rope.position_angles(pos, f, 10000.0)


@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("bounded", [True, False])
def test_rotate_grad_matches_autodiff(layout, bounded):
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(k1, (2, 3, 7, 8))
    w = jax.random.normal(k2, (2, 3, 7, 8))
    cos, sin = _tables(2, 7, 8, bounded)

    def loss(fn):
        return lambda x: jnp.sum(jnp.sin(fn(x, cos, sin, layout)) * w)

    np.testing.assert_allclose(rope.rotate(x, cos, sin, layout),
                               rope._rotate_merged(x, cos, sin, layout), rtol=1e-6, atol=1e-6)
    g_new = jax.grad(loss(rope.rotate))(x)
    g_ref = jax.grad(loss(rope._rotate_merged))(x)
    np.testing.assert_allclose(g_new, g_ref, rtol=1e-4, atol=1e-6)
    # Forward mode works too (a custom_jvp, not a custom_vjp).
    t = jnp.ones_like(x)
    _, jv_new = jax.jvp(lambda x: rope.rotate(x, cos, sin, layout), (x,), (t,))
    _, jv_ref = jax.jvp(lambda x: rope._rotate_merged(x, cos, sin, layout), (x,), (t,))
    np.testing.assert_allclose(jv_new, jv_ref, rtol=1e-6, atol=1e-6)


def test_rotate_grad_keeps_dtype():
    x = jnp.ones((1, 2, 4, 8), jnp.bfloat16)
    cos, sin = _tables(1, 4, 8, True)
    g = jax.grad(lambda x: jnp.sum(rope.rotate(x, cos, sin, "interleaved").astype(jnp.float32)))(x)
    assert g.dtype == jnp.bfloat16


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_layer_grad_matches_autodiff_rope(layer_type, monkeypatch):
    cfg = TTTConfig(model_dim=16, num_heads=2, mini_batch_size=4, ttt_layer_type=layer_type,
                    use_rope=True, scan_checkpoint_group=2)
    layer = TTTLayer(cfg)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 11, 16))
    params = layer.init(jax.random.PRNGKey(2), x)["params"]
    meta = SequenceMetadata(offset=3)

    def grads():  # a fresh function each time: jax.jit would reuse an old trace
        def loss(p, x):
            return jnp.mean(jnp.square(layer.apply({"params": p}, x, meta)))
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    g_new = grads()
    monkeypatch.setattr(rope, "_rotate", rope._rotate_merged)
    g_ref = grads()
    for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("x_shape,w_shape", [((2, 6, 3, 8), (3, 8)), ((2, 3, 5, 8), (3, 1, 8)),
                                             ((4, 8), (8,))])
def test_lean_layer_norm_matches_autodiff(x_shape, w_shape):
    """Values and the derivative in every argument, the weights broadcast as the layer uses
    them (per head ``[H, f]``, per head inside a step ``[H, 1, f]``, over the model width)."""
    ks = jax.random.split(jax.random.PRNGKey(3), 4)
    x = 2.0 * jax.random.normal(ks[0], x_shape) + 0.5
    w = 1.0 + 0.2 * jax.random.normal(ks[1], w_shape)
    b = 0.2 * jax.random.normal(ks[2], w_shape)
    ct = jax.random.normal(ks[3], x_shape)
    y_new, vjp_new = jax.vjp(layer_norm_lean, x, w, b)
    y_ref, vjp_ref = jax.vjp(layer_norm, x, w, b)
    np.testing.assert_allclose(y_new, y_ref, rtol=1e-5, atol=1e-5)
    for name, g_new, g_ref in zip(("x", "weight", "bias"), vjp_new(ct), vjp_ref(ct)):
        assert g_new.shape == g_ref.shape, name
        np.testing.assert_allclose(g_new, g_ref, rtol=1e-4, atol=1e-5, err_msg=name)
