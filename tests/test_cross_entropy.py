"""The LM head fused with the cross-entropy (``ttt_jax/math/cross_entropy.py``) against the loss
of materialised logits: the value against a float64 numpy log-sum-exp, the gradients against
autodiff of ``log_softmax`` on the whole logits, and the training loss of a model with
``loss_chunk`` against the same model with ``loss_chunk: 0`` (docs/architecture.md §2). Each
with the softmax pass in XLA and in the native library (``csrc/xent_cpu.cc``), which is also
checked against the derivative written out in float64 numpy."""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax import TTTConfig, training
from ttt_jax.config import ModelConfig
from ttt_jax.math import cpu_kernel
from ttt_jax.math.cross_entropy import fused_cross_entropy
from ttt_jax.models.ttt_lm import TTTLM

N, D, V = 37, 16, 50  # 37 tokens: chunks of 8 leave a padded last chunk


def _data(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    h = jax.random.normal(k[0], (N, D))
    w = 0.3 * jax.random.normal(k[1], (V, D))  # [V, d], a tied embedding table
    targets = jax.random.randint(k[2], (N,), 0, V)
    mask = jax.random.uniform(k[3], (N,)) * (jax.random.uniform(k[1], (N,)) > 0.3)
    return h, w, targets, mask


def _numpy_loss(h, w, targets, mask):
    logits = np.asarray(h, np.float64) @ np.asarray(w, np.float64).T
    top = logits.max(axis=-1)
    lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=-1))
    picked = logits[np.arange(len(targets)), np.asarray(targets)]
    m = np.ones(len(targets)) if mask is None else np.asarray(mask, np.float64)
    return float(np.sum(m * (lse - picked))), float(m.sum())


def _naive(h, w, targets, mask):
    logp = jax.nn.log_softmax(h @ w.T, axis=-1)
    return -jnp.sum(mask * jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0])


def _softmax_path(native: bool):
    """The native softmax pass (required to build here), or XLA's."""
    if native:
        cpu_kernel.load()
        return contextlib.nullcontext()
    return cpu_kernel.disabled()


def _uses_native(fn, *args) -> bool:
    return "ttt_jax_softmax_xent" in str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("native", [True, False], ids=["native", "xla"])
@pytest.mark.parametrize("vocab_axis", [0, 1])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_matches_materialised_logits(vocab_axis, masked, native):
    h, w, targets, mask = _data()
    mask = mask if masked else None
    weights = jnp.ones(N) if mask is None else mask
    layout = (lambda a: a) if vocab_axis == 0 else (lambda a: a.T)

    def fused(h, w_laid):
        with _softmax_path(native):
            return fused_cross_entropy(h, w_laid, targets, mask, chunk=8, vocab_axis=vocab_axis)

    grad_fn = jax.grad(lambda h, wl: fused(h, wl)[0], argnums=(0, 1))
    assert _uses_native(grad_fn, h, layout(w)) == native
    total, count = fused(h, layout(w))
    want_total, want_count = _numpy_loss(h, w, targets, mask)
    assert abs(float(total) - want_total) <= 1e-5 * abs(want_total)
    assert float(count) == pytest.approx(want_count, rel=1e-6)
    grads = grad_fn(h, layout(w))
    want = jax.grad(lambda h, w: _naive(h, w, targets, weights), argnums=(0, 1))(h, w)
    for name, got, ref in (("h", grads[0], want[0]), ("w", layout(grads[1]), want[1])):
        scale = float(jnp.max(jnp.abs(ref)))
        assert scale > 1e-3, name
        err = float(jnp.max(jnp.abs(got - ref)))
        assert err <= 1e-5 * scale + 1e-7, f"d{name}: {err:.2e} (scale {scale:.2e})"


def test_fused_keeps_input_dtypes_and_rejects_bad_shapes():
    h, w, targets, _ = _data(1)
    gh, gw = jax.grad(lambda h, w: fused_cross_entropy(h, w, targets, chunk=16)[0],
                      argnums=(0, 1))(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert gh.dtype == gw.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="vocab_axis"):
        fused_cross_entropy(h, w, targets, vocab_axis=2)
    with pytest.raises(ValueError, match="model dim"):
        fused_cross_entropy(h, w, targets, vocab_axis=1)  # w is [V, d]
    with pytest.raises(ValueError, match="chunk"):
        fused_cross_entropy(h, w, targets, chunk=0)


@pytest.mark.parametrize("tie", [True, False])
def test_training_loss_with_loss_chunk_matches_logits(tie):
    """``_loss_sums`` of a TTT-LM, the head fused in chunks of 5 of 24 tokens, against the same
    params with ``loss_chunk: 0`` (logits materialised): value and every parameter gradient."""
    cfg = ModelConfig(vocab_size=V, num_layers=1, intermediate_size=32, loss_chunk=5,
                      ttt=TTTConfig(model_dim=D, num_heads=2, mini_batch_size=4),
                      tie_word_embeddings=tie)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 13), 0, V)
    mask = (jnp.arange(12) % 3 != 0).astype(jnp.float32)[None].repeat(2, 0) if tie else None
    fused, plain = TTTLM(cfg), TTTLM(dataclasses.replace(cfg, loss_chunk=0))
    params = jax.jit(fused.init)(jax.random.PRNGKey(3), tokens[:, :-1])["params"]

    def run(model):
        fn = lambda p: training._loss_sums(model, p, tokens, mask)  # noqa: E731
        return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

    ((got, got_n), got_g), ((want, want_n), want_g) = run(fused), run(plain)
    assert float(got_n) == float(want_n)
    assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got_g), jax.tree.leaves(want_g)):
        scale = float(jnp.max(jnp.abs(b)))
        err = float(jnp.max(jnp.abs(a - b)))
        assert err <= 1e-4 * scale + 1e-6, f"{jax.tree_util.keystr(path)}: {err:.2e} ({scale:.2e})"


@pytest.mark.parametrize("vocab,scale", [(7, 1.0), (48, 1.0), (50, 40.0)],
                         ids=["tail-only", "whole-vectors", "large-logits"])
def test_native_softmax_pass_matches_numpy(vocab, scale, monkeypatch):
    """Loss and both gradients with the native pass against ``dlogits = m (softmax - onehot)``,
    ``dh = dlogits W``, ``dW = dlogits^T h`` in float64 numpy: rows shorter than a vector, whole
    vectors, a tail, and logits 100s apart (``exp`` far below its clamp at -87). The rows of a
    chunk are shared by three takers (each row must be done exactly once)."""
    monkeypatch.setenv("TTT_JAX_CPU_THREADS", "3")
    k = jax.random.split(jax.random.PRNGKey(7), 4)
    h = scale * jax.random.normal(k[0], (N, D))
    w = 0.3 * jax.random.normal(k[1], (vocab, D))
    targets = jax.random.randint(k[2], (N,), 0, vocab).at[:2].set(jnp.array([0, vocab - 1]))
    mask = jax.random.uniform(k[3], (N,)).at[3].set(0.0)
    cpu_kernel.load()
    fn = jax.value_and_grad(lambda h, w: fused_cross_entropy(h, w, targets, mask, chunk=16)[0],
                            argnums=(0, 1))
    assert _uses_native(fn, h, w)
    total, (gh, gw) = fn(h, w)

    h64, w64, m64 = (np.asarray(a, np.float64) for a in (h, w, mask))
    logits = h64 @ w64.T
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    onehot = np.eye(vocab)[np.asarray(targets)]
    dlogits = m64[:, None] * (p - onehot)
    want_total, _ = _numpy_loss(h, w, targets, mask)
    assert abs(float(total) - want_total) <= 1e-5 * abs(want_total)
    for name, got, ref in (("h", gh, dlogits @ w64), ("w", gw, dlogits.T @ h64)):
        err = float(np.max(np.abs(np.asarray(got, np.float64) - ref)))
        assert err <= 1e-5 * float(np.max(np.abs(ref))), f"d{name}: {err:.2e}"
