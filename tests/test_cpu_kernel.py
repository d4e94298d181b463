"""The native CPU kernels (``ttt_jax/math/cpu_kernel.py``, ``csrc/ttt_cpu.cc``): the scan of
both inner models and its derivative.

Their outputs against the float64 numpy primal form (``tests/reference.py``) and their
derivatives against autodiff of the plain dual form, at sizes that take the kernel's vector
paths (f and b multiples of 16) and its scalar ones (f = 8, b = 4, a final partial
mini-batch), with groups that do and do not divide the mini-batch count, split over two and
three takers (XLA's threads, ``csrc/parallel.h``); TTT-Linear's XLA scan is checked the same
way with the kernel switched off. Also: how the kernel is chosen, and its errors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:  # tests/ is on sys.path under pytest's default import mode
    import reference as ref
except ImportError:  # tests/ imported as a package
    from tests import reference as ref
from ttt_jax.math import cpu_kernel
from ttt_jax.math.ttt import ttt_dual

# (B, H, f, b, L, group): vector paths with a group that does not divide n = 5; scalar paths
# with a partial last mini-batch (L = 4 * 3 + 2).
SIZES = [(1, 2, 16, 16, 80, 2), (2, 2, 8, 4, 14, 3)]


def _inputs(bsz, heads, f, b, length, seed, kind="linear"):
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 12))
    normal = lambda shape, scale: scale * jax.random.normal(next(keys), shape)  # noqa: E731
    widths = (f, f) if kind == "linear" else (f, 4 * f, f)
    params = tuple((normal((heads, widths[i], widths[i + 1]), 0.3),
                    normal((heads, 1, widths[i + 1]), 0.1)) for i in range(len(widths) - 1))
    xq, xk, xv = (normal((bsz, heads, length, f), 1.0) for _ in range(3))
    lr = 0.5 * jax.nn.sigmoid(normal((bsz, heads, length), 1.0))
    return (params, xq, xk, xv, lr, normal((b,), 0.1), 1.0 + normal((heads, f), 0.1),
            normal((heads, f), 0.1))


def _loss(group, hand_vjp, w_out):
    def loss(*args):
        out, state = ttt_dual(*args, checkpoint_group=group, hand_vjp=hand_vjp)
        return jnp.sum(out * w_out) + sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(state))
    return loss


def _grads(loss, args, kernel):
    """Gradients of ``loss``, traced with the kernel on or off (the choice is made when
    tracing, so each gets a fresh trace)."""
    fn = jax.grad(loss, argnums=tuple(range(len(args))))
    if kernel:
        return fn(*args)
    with cpu_kernel.disabled():
        return fn(*args)


def test_the_kernel_is_built_and_chosen_on_the_cpu():
    state = ((jnp.zeros((1, 2, 8, 8)), jnp.zeros((1, 2, 1, 8))),)
    assert cpu_kernel.use_kernel(state), "the kernel did not build here"
    assert cpu_kernel.use_kernel(state + state)
    assert not cpu_kernel.use_kernel(state * 3), "no kernel for three inner layers"
    assert not cpu_kernel.use_kernel(jax.tree.map(lambda a: a.astype(jnp.bfloat16), state))
    with cpu_kernel.disabled():
        assert not cpu_kernel.use_kernel(state)
    jaxpr = str(jax.make_jaxpr(lambda *a: ttt_dual(*a)[0])(*_inputs(1, 2, 8, 4, 8, 0)))
    assert "ttt_jax_linear_forward" in jaxpr
    with cpu_kernel.disabled():
        jaxpr = str(jax.make_jaxpr(lambda *a: ttt_dual(*a)[0])(*_inputs(1, 2, 8, 4, 8, 0)))
    assert "ttt_jax_linear_forward" not in jaxpr


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("size", SIZES, ids=["vector", "scalar"])
def test_kernel_outputs_match_the_primal_reference(size, kind, monkeypatch):
    # Three takers: more than this machine's pool may have free and, for 2 chains, more than
    # there are chains; for 4 chains, an uneven share. Every chain must still run exactly once.
    monkeypatch.setenv("TTT_JAX_CPU_THREADS", "3")
    bsz, heads, f, b, length, _ = size
    args = _inputs(bsz, heads, f, b, length, seed=f, kind=kind)
    out, state = jax.jit(lambda *a: ttt_dual(*a))(*args)  # a fresh trace reads the setting
    want, want_state = ref.inner_loop(*args)
    assert np.max(np.abs(np.asarray(out, np.float64) - want)) <= 1e-5 * np.max(np.abs(want))
    for got, exp in zip(jax.tree.leaves(state), jax.tree.leaves(want_state)):
        assert np.max(np.abs(np.asarray(got, np.float64) - exp)) <= 1e-5 * np.max(np.abs(exp))


@pytest.mark.parametrize("kind,kernel", [("linear", True), ("linear", False), ("mlp", True)],
                         ids=["linear-kernel", "linear-xla-scan", "mlp-kernel"])
@pytest.mark.parametrize("size", SIZES, ids=["vector", "scalar"])
def test_hand_derivative_matches_autodiff(size, kind, kernel, monkeypatch):
    # Two threads even at these sizes (the kernel would take one): each runs half the chains.
    monkeypatch.setenv("TTT_JAX_CPU_THREADS", "2")
    bsz, heads, f, b, length, group = size
    args = _inputs(bsz, heads, f, b, length, seed=3 * f + b, kind=kind)
    w_out = jnp.cos(jnp.arange(bsz * heads * length * f, dtype=jnp.float32))
    w_out = w_out.reshape(bsz, heads, length, f)
    hand = _grads(_loss(group, True, w_out), args, kernel)
    auto = _grads(_loss(group, False, w_out), args, False)
    names = ("params", "xq", "xk", "xv", "lr", "token_idx", "ln_w", "ln_b")
    for name, a, c in zip(names, hand, auto):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)):
            scale = float(jnp.max(jnp.abs(y)))
            assert scale > 1e-4, f"{name}: no gradient to compare"
            err = float(jnp.max(jnp.abs(x - y)))
            assert err <= 2e-5 * scale, f"{name}: {err:.2e} from autodiff (scale {scale:.2e})"


def test_a_bad_switch_or_a_failed_build_is_reported(monkeypatch, tmp_path):
    state = ((jnp.zeros((1, 2, 8, 8)), jnp.zeros((1, 2, 1, 8))),)
    monkeypatch.setenv(cpu_kernel.ENV, "yes")
    with pytest.raises(ValueError, match="TTT_JAX_CPU_KERNEL='yes': expected 0"):
        cpu_kernel.use_kernel(state)
    monkeypatch.setenv(cpu_kernel.ENV, "0")
    assert not cpu_kernel.use_kernel(state)
    monkeypatch.setenv("TTT_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(cpu_kernel.KernelUnavailable,
                       match="compiling ttt_cpu.cc, xent_cpu.cc failed"):
        cpu_kernel.build()
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(cpu_kernel.KernelUnavailable, match="no C\\+\\+ compiler"):
        cpu_kernel.build()
    assert not list((tmp_path / "cache").glob("*.so")), "a failed build left a library behind"
