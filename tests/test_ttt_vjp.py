"""The dual form's hand-written derivative (``ttt_jax/math/ttt_scan.py``: ``scan_tokens``,
``_dual_step_bwd``, docs/architecture.md §1.6) against autodiff of the plain dual form, and
against finite differences of the float64 numpy primal form (``tests/reference.py``, §1.7).

Every case differentiates with respect to every input of ``ttt_dual`` (initial weights, Q/K/V,
learning rates, ``learnable_token_idx``, the inner LayerNorm) a loss that reads both the
outputs and the final state, for both inner models, with RoPE on and off, with and without a
final partial mini-batch, and with ``checkpoint_group`` 0 and 3 (``n = 4`` whole mini-batches:
one group of 3 and a shorter group of 1).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:  # tests/ is on sys.path under pytest's default import mode
    import reference as ref
except ImportError:  # tests/ imported as a package
    from tests import reference as ref
from ttt_jax.math import cpu_kernel, rope
from ttt_jax.math.ttt import auto_group, ttt_dual

B, H, F, MB = 2, 2, 8, 4
# jit at tiny shapes: XLA's backend optimisations cost more compile time than they save.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
CASES = list(itertools.product(["linear", "mlp"], [False, True], [4 * MB, 3 * MB + 1], [0, 3]))
ARGNAMES = ("params", "xq", "xk", "xv", "lr", "token_idx", "ln_w", "ln_b")


def _inputs(layer_type, length, seed):
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 16))
    normal = lambda shape, scale: scale * jax.random.normal(next(keys), shape)  # noqa: E731
    widths = (F, F) if layer_type == "linear" else (F, 4 * F, F)
    params = tuple((normal((H, widths[i], widths[i + 1]), 0.3), normal((H, 1, widths[i + 1]), 0.1))
                   for i in range(len(widths) - 1))
    xq, xk, xv = (normal((B, H, length, F), 1.0) for _ in range(3))
    lr = 0.5 * jax.nn.sigmoid(normal((B, H, length), 1.0))
    return (params, xq, xk, xv, lr, normal((MB,), 0.1), 1.0 + normal((H, F), 0.1),
            normal((H, F), 0.1))


def _positions(length):
    return jnp.arange(length)[None] + jnp.array([[0], [3]])  # [B, L]: two different phases


def _loss_fn(use_rope, group, hand_vjp, length, lanes=None):
    """A scalar of ``ttt_dual``'s outputs and final state (RoPE rotates Q/K first)."""
    w_out = jnp.cos(jnp.arange(B * H * length * F, dtype=jnp.float32)).reshape(B, H, length, F)

    def loss(params, xq, xk, xv, lr, token_idx, ln_w, ln_b):
        if use_rope:
            xq, xk = rope.apply_bounded_rope(xq, xk, _positions(length), mini_batch_size=MB,
                                             theta=10000.0, layout="interleaved")
        out, state = ttt_dual(params, xq, xk, xv, lr, token_idx, ln_w, ln_b,
                              checkpoint_group=group, hand_vjp=hand_vjp, lanes=lanes)
        tail = sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(state))
        return jnp.sum(out * w_out) + tail

    return loss, w_out


def _grads(loss, args):
    fn = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))), compiler_options=FAST_COMPILE)
    return fn(*args)


@pytest.mark.parametrize("layer_type,use_rope,length,group", CASES,
                         ids=[f"{t}-rope{int(r)}-L{n}-g{g}" for t, r, n, g in CASES])
def test_hand_vjp_matches_autodiff(layer_type, use_rope, length, group):
    args = _inputs(layer_type, length, seed=length + group)
    hand = _grads(_loss_fn(use_rope, group, True, length)[0], args)
    auto = _grads(_loss_fn(use_rope, group, False, length)[0], args)
    for name, a, b in zip(ARGNAMES, hand, auto):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            scale = float(jnp.max(jnp.abs(y)))
            assert scale > 1e-4, f"{name}: no gradient to compare"
            err = float(jnp.max(jnp.abs(x - y)))
            assert err <= 2e-5 * scale, f"{name}: hand {err:.2e} from autodiff (scale {scale:.2e})"


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_lanes_of_heads_give_the_same_values(layer_type):
    """Heads split into independent chains (``lanes``) or run as one batch: same values and
    gradients, each equal to autodiff of the plain dual form (the XLA scan: TTT-Linear's CPU
    kernel, which has no lanes, is switched off)."""
    length, group = 3 * MB + 1, 3
    args = _inputs(layer_type, length, seed=11)
    auto = _grads(_loss_fn(False, group, False, length)[0], args)
    for lanes in (1, H):
        with cpu_kernel.disabled():
            hand = _grads(_loss_fn(False, group, True, length, lanes)[0], args)
        for name, a, b in zip(ARGNAMES, hand, auto):
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
                scale = float(jnp.max(jnp.abs(y)))
                err = float(jnp.max(jnp.abs(x - y)))
                assert err <= 2e-5 * scale, f"lanes={lanes} {name}: {err:.2e} (scale {scale:.2e})"
    with pytest.raises(ValueError, match="lanes: 3 must .* divide the number of heads"):
        ttt_dual(*args, lanes=3)


def _reference_value(use_rope, length, w_out):
    """The loss in float64 through ``tests/reference.py``'s primal form."""
    pos = np.asarray(_positions(length))

    def value(args):
        params, xq, xk, xv, lr, token_idx, ln_w, ln_b = args
        if use_rope:
            xq, xk = (ref.rope(np.asarray(x, np.float64), pos, MB, 10000.0, "interleaved")
                      for x in (xq, xk))
        out, state = ref.inner_loop(params, xq, xk, xv, lr, token_idx, ln_w, ln_b)
        tail = sum(np.sum(np.sin(leaf)) for layer in state for leaf in layer)
        return float(np.sum(out * np.asarray(w_out, np.float64)) + tail)

    return value


@pytest.mark.parametrize("layer_type,use_rope", [("linear", True), ("mlp", False)])
def test_hand_vjp_matches_finite_differences_of_the_reference(layer_type, use_rope):
    length, group, step = 3 * MB + 1, 3, 1e-4
    args = _inputs(layer_type, length, seed=7)
    loss, w_out = _loss_fn(use_rope, group, True, length)
    grads = _grads(loss, args)
    value = _reference_value(use_rope, length, w_out)
    point = jax.tree.map(lambda a: np.asarray(a, np.float64), args)
    flat_point, tree = jax.tree.flatten(point)
    flat_grads = jax.tree.leaves(grads)
    rng = np.random.default_rng(0)
    for i, (base, g) in enumerate(zip(flat_point, flat_grads)):
        u = rng.standard_normal(base.shape)
        u /= np.linalg.norm(u)
        shifted = lambda sign: value(jax.tree.unflatten(  # noqa: E731
            tree, flat_point[:i] + [base + sign * step * u] + flat_point[i + 1:]))
        fd = (shifted(1.0) - shifted(-1.0)) / (2 * step)
        ad = float(np.sum(np.asarray(g, np.float64) * u))
        assert abs(fd) > 1e-6, f"leaf {i}: the loss does not depend on it"
        assert abs(ad - fd) <= 1e-4 * abs(fd), f"leaf {i}: grad {ad:.8e} vs FD {fd:.8e}"


def test_auto_group_balances_kept_states_and_residuals():
    """``auto_group``: the divisor of n nearest g0 = sqrt(n S / K) within a factor 2, else g0
    rounded; S the carried state's floats, K a mini-batch's recomputed residuals (keys,
    activations, inner gradients), counted by hand."""
    f, b, bsz, heads = 64, 16, 2, 8

    def expect(n, state_floats, key_floats):  # the divisor of n nearest g0, within 2x
        g0 = float(np.sqrt(n * state_floats / key_floats))
        best = None
        for g in range(1, n + 1):
            if n % g == 0 and g0 / 2 <= g <= 2 * g0:
                if best is None or abs(np.log(g / g0)) < abs(np.log(best / g0)):
                    best = g
        return best if best is not None else max(1, min(n, round(g0)))

    linear_state, linear_keys = f * f + f, 3 * b * f  # W, bias; xk, Z, G
    # W1, b1, W2, b2; xk, gelu(Z1), Z1, Z2, G1, G2 and G2 W2^T
    mlp_state, mlp_keys = 2 * 4 * f * f + 4 * f + f, b * (f + 4 * f + 4 * f + f + 4 * f + f + 4 * f)
    # g0 = 13.2 and 14.7 at n = 128; 6.7 (TTT-Linear) at n = 33, whose divisors are 1, 3, 11, 33
    assert expect(128, linear_state, linear_keys) == 16
    assert expect(128, mlp_state, mlp_keys) == 16
    assert expect(33, linear_state, linear_keys) == 11
    assert expect(7, 1, 700) == 1  # g0 = 0.1: no divisor within 2x
    for widths, s, k in (((f, f), linear_state, linear_keys), ((f, 4 * f, f), mlp_state, mlp_keys)):
        state = tuple((jnp.zeros((bsz, heads, widths[i], widths[i + 1])),
                       jnp.zeros((bsz, heads, 1, widths[i + 1]))) for i in range(len(widths) - 1))
        ln = jnp.zeros((heads, 1, f))
        for n in (1, 2, 7, 33, 128, 509, 512, 2048):
            assert auto_group(state, (bsz, heads, b, f), ln, ln, n) == expect(n, s, k), n


def test_auto_group_gives_the_same_gradients():
    """``checkpoint_group=None`` (here ``auto_group`` = 2 of n = 4) against autodiff, TTT-MLP."""
    length = 4 * MB
    state = tuple((jnp.zeros((B, H, a, c)), jnp.zeros((B, H, 1, c))) for a, c in ((F, 4 * F), (4 * F, F)))
    assert auto_group(state, (B, H, MB, F), jnp.zeros((H, 1, F)), jnp.zeros((H, 1, F)), 4) == 2
    args = _inputs("mlp", length, seed=5)
    hand = _grads(_loss_fn(True, None, True, length)[0], args)
    auto = _grads(_loss_fn(True, 0, False, length)[0], args)
    for name, a, b in zip(ARGNAMES, hand, auto):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            scale = float(jnp.max(jnp.abs(y)))
            err = float(jnp.max(jnp.abs(x - y)))
            assert err <= 2e-5 * scale, f"{name}: {err:.2e} (scale {scale:.2e})"
