"""``dense_dot``: a linear layer's product with a hand-written derivative (ttt_jax/math/dense.py).

Values and both gradients are checked against the products written out in float64 numpy
(``y = x W``, ``dx = g W^T``, ``dW = sum over tokens of x_t^T g_t``), for a 3-D input as the
layers pass it; ``nn.Dense`` with it against ``nn.Dense`` without; other contractions go to
``lax.dot_general`` unchanged.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.math.dense import dense_dot

DENSE_DIMS = lambda x: (((x.ndim - 1,), (0,)), ((), ()))  # noqa: E731  nn.Dense's contraction


def _data(shape_x, shape_w, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape_x).astype(np.float32)
    w = rng.standard_normal(shape_w).astype(np.float32)
    g = rng.standard_normal(shape_x[:-1] + shape_w[1:]).astype(np.float32)
    return x, w, g


@pytest.mark.parametrize("shape_x", [(2, 5, 6), (7, 6), (6,)])
def test_values_and_gradients_match_the_products_written_out(shape_x):
    x, w, g = _data(shape_x, (6, 4))
    y, vjp = jax.vjp(lambda a, b: dense_dot(a, b, DENSE_DIMS(a)), jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
    np.testing.assert_allclose(y, x64 @ w64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, g64 @ w64.T, rtol=1e-5, atol=1e-5)
    want_dw = sum(np.outer(xt, gt) for xt, gt in zip(x64.reshape(-1, 6), g64.reshape(-1, 4)))
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)
    assert dx.shape == x.shape and dw.shape == w.shape


def test_flax_dense_with_it_equals_plain_dense():
    x, _, _ = _data((2, 3, 8), (8, 5), seed=1)
    plain = nn.Dense(5, use_bias=False)
    custom = nn.Dense(5, use_bias=False, dot_general=dense_dot)
    params = plain.init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(params) == jax.tree.structure(custom.init(jax.random.PRNGKey(0), x))

    def loss(module, p, inp):
        return jnp.sum(jnp.sin(module.apply(p, inp)))

    for module in (plain, custom):
        assert module.apply(params, x).shape == (2, 3, 5)
    want = jax.grad(loss, argnums=(1, 2))(plain, params, x)
    got = jax.grad(loss, argnums=(1, 2))(custom, params, x)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_bfloat16_gradients_keep_the_operand_dtypes():
    x, w, g = _data((3, 4, 8), (8, 2), seed=2)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    y, vjp = jax.vjp(lambda a, b: dense_dot(a, b, DENSE_DIMS(a)), xb, wb)
    dx, dw = vjp(jnp.asarray(g, jnp.bfloat16))
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16,) * 3
    want_dw = np.einsum("bld,blo->do", np.asarray(xb, np.float64), np.asarray(g, np.float64))
    np.testing.assert_allclose(np.asarray(dw, np.float64), want_dw, rtol=5e-2, atol=5e-2)


def test_other_contractions_are_plain_dot_general():
    x, w, _ = _data((6, 3), (6, 4), seed=3)
    dims = (((0,), (0,)), ((), ()))  # x^T W: not nn.Dense's contraction
    got = dense_dot(jnp.asarray(x), jnp.asarray(w), dims)
    np.testing.assert_allclose(got, x.astype(np.float64).T @ w, rtol=1e-5, atol=1e-5)
    jaxpr = jax.make_jaxpr(lambda a, b: dense_dot(a, b, dims))(x, w)
    assert [e.primitive.name for e in jaxpr.eqns] == ["dot_general"]
    # nn.Dense's own contraction goes through the hand-written derivative
    jaxpr = jax.make_jaxpr(lambda a, b: dense_dot(a, b, DENSE_DIMS(a)))(x.T, w)
    assert [e.primitive.name for e in jaxpr.eqns] == ["custom_vjp_call"]
