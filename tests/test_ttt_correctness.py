"""The TTT layer and its inner loop against the independent float64 numpy reference.

``tests/reference.py`` implements docs/architecture.md §1 naively in the primal form. Here we
(a) validate the reference's hand-derived inner gradients with central finite differences,
(b) compare ``TTTLayer.apply`` (float32) with the reference across every option,
(c) compare the pure ``ttt_dual`` (with and without remat) and ``ttt_primal`` with the reference
    inner loop, and
(d) check that RoPE positions only matter modulo the mini-batch size.

Params are perturbed away from their init (inner weights std 0.3, noisy norms, token weights,
learning-rate bias, ...) so that the inner update changes the output visibly; every test also
checks that switching the inner update off changes the reference output, so it could fail.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:  # tests/ is on sys.path under pytest's default import mode
    import reference as ref
except ImportError:  # tests/ imported as a package
    from tests import reference as ref
from ttt_jax import SequenceMetadata, TTTConfig, TTTLayer
from ttt_jax.math.ttt import ttt_dual, ttt_primal

BATCH, DIM, HEADS, MINI_BATCH = 2, 16, 2, 4
HEAD_DIM = DIM // HEADS
# float32 library vs float64 reference, max abs (the bound docs/architecture.md sets).
ATOL = 1e-5
# The inner update must move the reference output by at least this much (>> ATOL), otherwise
# a comparison could pass with TTT silently disabled.
MIN_UPDATE_EFFECT = 1e-2
# Std of the inner weights after perturbation (init 0.02 makes TTT nearly a no-op).
INNER_STD = 0.3


# ----------------------------------------------------------------------------- helpers


def _make_params(cfg, length, seed):
    """Float32 TTTLayer params, drawn away from init so that every term of the layer matters.

    Shapes and names come from ``jax.eval_shape`` of ``init`` (no compilation); the values are
    drawn here: inner weights with std ``INNER_STD`` (init 0.02 makes TTT nearly a no-op), noisy
    norms, biases, token weights (one clamped to zero) and learning-rate params.
    """
    shapes = jax.eval_shape(TTTLayer(cfg).init, jax.random.PRNGKey(0),
                            jnp.zeros((BATCH, length, DIM), jnp.float32))["params"]
    rng = np.random.default_rng(seed)
    noise = lambda shape, std: (std * rng.standard_normal(shape)).astype(np.float32)
    offsets = {"ttt_norm_weight": 1.0, ("post_norm", "scale"): 1.0}
    stds = {"W1": INNER_STD, "W2": INNER_STD, "learnable_ttt_lr_weight": 0.3,
            "learnable_ttt_lr_bias": 0.5, "learnable_token_idx": 0.1}

    def draw(path, leaf):
        keys = tuple(k.key for k in path)
        name = keys[0] if len(keys) == 1 else keys
        std = stds.get(name, 0.3 if keys[-1] == "kernel" else 0.2)
        return offsets.get(name, 0.0) + noise(leaf.shape, std)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    params["learnable_token_idx"][1] = -0.75  # tok[1] = max(0, 1/2 - 0.75) = 0: the clamp
    return params


def _layer_setup(cfg, length, seed):
    rng = np.random.default_rng(seed + 1000)
    x = rng.standard_normal((BATCH, length, DIM)).astype(np.float32)
    return {"params": _make_params(cfg, length, seed)}, x


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg):
    """One jitted ``TTTLayer(cfg).apply`` per config, shared by the tests (fewer compilations)."""
    return jax.jit(TTTLayer(cfg).apply)


def _positions(length):
    """Positions that are neither ``arange`` nor aligned to the mini-batch, one row each."""
    return np.stack([np.arange(length) + 5, np.arange(length) * 3 + 2]).astype(np.int32)


def _inner_case(layer_type, length, seed):
    """Random per-head inner-loop inputs, float32, shaped as the layer produces them."""
    rng = np.random.default_rng(seed)
    f = HEAD_DIM
    widths = (f, f) if layer_type == "linear" else (f, 4 * f, f)
    f32 = lambda a: np.asarray(a, np.float32)
    params = [(f32(INNER_STD * rng.standard_normal((HEADS, widths[i], widths[i + 1]))),
               f32(0.2 * rng.standard_normal((HEADS, 1, widths[i + 1]))))
              for i in range(len(widths) - 1)]
    xq, xk, xv = (f32(rng.standard_normal((BATCH, HEADS, length, f))) for _ in range(3))
    lr = f32(rng.uniform(0.05, 0.3, (BATCH, HEADS, length)))
    token_idx = f32(0.1 * rng.standard_normal(MINI_BATCH))
    ln_w = f32(1.0 + 0.2 * rng.standard_normal((HEADS, f)))
    ln_b = f32(0.2 * rng.standard_normal((HEADS, f)))
    return params, xq, xk, xv, lr, token_idx, ln_w, ln_b


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ----------------------------------------------------------------------------- (a) reference


def _fd_grads(state, k, v, ln_w, ln_b, eps=1e-6):
    """Central finite differences of ``ref.inner_loss`` w.r.t. every parameter of ``state``."""
    out = []
    for layer, (w, b) in enumerate(state):
        grads = []
        for which, arr in enumerate((w, b)):
            g = np.zeros_like(arr)
            for idx in np.ndindex(arr.shape):
                losses = []
                for sign in (1.0, -1.0):
                    pert = [(ww.copy(), bb.copy()) for ww, bb in state]
                    pert[layer][which][idx] += sign * eps
                    losses.append(ref.inner_loss(pert, k, v, ln_w, ln_b))
                g[idx] = (losses[0] - losses[1]) / (2 * eps)
            grads.append(g)
        out.append(tuple(grads))
    return out


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_reference_inner_grads_match_finite_differences(layer_type):
    rng = np.random.default_rng(0)
    f = HEAD_DIM
    widths = (f, f) if layer_type == "linear" else (f, 4 * f, f)
    state = [(0.5 * rng.standard_normal((widths[i], widths[i + 1])),
              0.3 * rng.standard_normal((1, widths[i + 1]))) for i in range(len(widths) - 1)]
    ln_w, ln_b = 1.0 + 0.3 * rng.standard_normal(f), 0.3 * rng.standard_normal(f)
    for _ in range(2):
        k, v = rng.standard_normal(f), rng.standard_normal(f)
        hand = ref.inner_grads(state, k, v, ln_w, ln_b)
        numeric = _fd_grads(state, k, v, ln_w, ln_b)
        for (dw, db), (nw, nb) in zip(hand, numeric):
            assert np.abs(dw).max() > 1e-3  # a non-degenerate gradient
            np.testing.assert_allclose(dw, nw, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(db, nb, rtol=1e-6, atol=1e-7)


def test_reference_gelu_derivative_matches_finite_differences():
    x = np.linspace(-5.0, 5.0, 201)
    eps = 1e-6
    numeric = (ref.gelu_tanh(x + eps) - ref.gelu_tanh(x - eps)) / (2 * eps)
    np.testing.assert_allclose(ref.gelu_tanh_derivative(x), numeric, rtol=1e-7, atol=1e-8)


# ----------------------------------------------------------------------------- (b) layer

# A handful of combinations (one jit compilation each) covering every option with both inner
# models, L a multiple of b (8) and not (2b + 3 = 11), both base learning rates of the presets
# (1.0, TTT-Linear's; 0.1, TTT-MLP's) with each inner model, and plain RoPE
# (rope_bounded: false, positions up to 35 > b). With a small ``seq_chunk`` some go through the
# layer in spans (whole spans only, and spans plus a shorter rest; with the Q/K convs carried
# across spans, and RoPE positions read per span).
LAYER_CASES = [
    dict(ttt_layer_type="linear", length=8, use_rope=True, rope_layout="interleaved",
         qk_l2_norm=True, ttt_base_lr=1.0, seq_chunk=4),
    dict(ttt_layer_type="linear", length=11, use_rope=True, rope_layout="half", share_qk=True,
         use_gate=True, ttt_base_lr=0.1),
    dict(ttt_layer_type="linear", length=11, share_qk=True, qk_l2_norm=True, use_gate=True,
         scan_checkpoint_group=2, ttt_base_lr=1.0, seq_chunk=4),
    dict(ttt_layer_type="mlp", length=11, share_qk=True, qk_l2_norm=True, ttt_base_lr=0.1),
    dict(ttt_layer_type="mlp", length=8, use_rope=True, rope_layout="half", share_qk=True,
         use_gate=True, ttt_base_lr=1.0, seq_chunk=4),
    dict(ttt_layer_type="linear", length=11, use_rope=True, rope_bounded=False,
         rope_layout="interleaved", ttt_base_lr=1.0),
    dict(ttt_layer_type="mlp", length=11, use_rope=True, rope_layout="interleaved",
         qk_l2_norm=True, use_gate=True, scan_checkpoint_group=2, ttt_base_lr=0.1, seq_chunk=4),
]


def _case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


def _case_config(case):
    """``(TTTConfig, L)`` of one entry of ``LAYER_CASES``."""
    case = dict(case)
    length = case.pop("length")
    return TTTConfig(model_dim=DIM, num_heads=HEADS, mini_batch_size=MINI_BATCH, **case), length


def _reference_inputs(params, cfg, x, pos, ttt_base_lr=None):
    """``ref.layer_inputs``, and for ``rope_bounded: false`` plain RoPE: the reference's
    rotation with positions reduced modulo a number above all of them (so not at all)."""
    if not (cfg.use_rope and not cfg.rope_bounded):
        return ref.layer_inputs(params, cfg, x, pos, ttt_base_lr)
    xq, xk, xv, lr = ref.layer_inputs(params, dataclasses.replace(cfg, use_rope=False), x, pos,
                                      ttt_base_lr)
    pos = np.broadcast_to(np.asarray(pos), x.shape[:2])
    beyond = int(pos.max()) + 1
    xq, xk = (ref.rope(a, pos, beyond, cfg.rope_theta, cfg.rope_layout) for a in (xq, xk))
    return xq, xk, xv, lr


def _reference_layer(params, cfg, x, pos, ttt_base_lr=None):
    """``ref.ttt_layer`` through ``_reference_inputs`` (so plain RoPE too)."""
    p = ref.to_f64(params)
    xq, xk, xv, lr = _reference_inputs(p, cfg, x, pos, ttt_base_lr)
    out, _ = ref.inner_loop(ref.inner_params(p, cfg), xq, xk, xv, lr, p["learnable_token_idx"],
                            p["ttt_norm_weight"], p["ttt_norm_bias"])
    return ref.layer_output(p, cfg, out, x)


@pytest.mark.parametrize("case", LAYER_CASES, ids=_case_id)
def test_layer_matches_numpy_reference(case):
    cfg, length = _case_config(case)
    variables, x = _layer_setup(cfg, length, seed=LAYER_CASES.index(case))
    pos = _positions(length)
    meta = SequenceMetadata(position_ids=jnp.asarray(pos))

    # The inner-loop inputs first (eager, cheap): localises a failure to projections/RoPE/lr.
    got_in = TTTLayer(cfg).apply(variables, jnp.asarray(x), metadata=meta,
                                 method=TTTLayer.ttt_inputs)
    want_in = _reference_inputs(variables["params"], cfg, x, pos)
    for name, g, w in zip(("xq", "xk", "xv", "lr"), got_in, want_in):
        chex.assert_shape(g, w.shape)
        assert _max_err(g, w) <= ATOL, f"{name}: max abs err {_max_err(g, w):.3e}"

    got = _jitted_apply(cfg)(variables, jnp.asarray(x), metadata=meta)
    want = _reference_layer(variables["params"], cfg, x, pos)
    chex.assert_shape(got, (BATCH, length, DIM))
    assert got.dtype == jnp.float32
    err = _max_err(got, want)
    assert err <= ATOL, f"layer output: max abs err {err:.3e}"

    no_update = _reference_layer(variables["params"], cfg, x, pos, ttt_base_lr=0.0)
    assert _max_err(want, no_update) > MIN_UPDATE_EFFECT, "the inner update has no effect"
    other_lr = _reference_layer(variables["params"], cfg, x, pos,
                                ttt_base_lr=1.1 - cfg.ttt_base_lr)  # 0.1 <-> 1.0
    assert _max_err(want, other_lr) > MIN_UPDATE_EFFECT, "ttt_base_lr has no effect"
    if cfg.use_rope:  # the rotation must matter too
        plain = ref.ttt_layer(variables["params"], dataclasses.replace(cfg, use_rope=False), x)
        assert _max_err(want, plain) > MIN_UPDATE_EFFECT, "RoPE has no effect"
    if cfg.use_rope and not cfg.rope_bounded:  # and whether it is bounded
        bounded = ref.ttt_layer(variables["params"], dataclasses.replace(cfg, rope_bounded=True),
                                x, pos)
        assert _max_err(want, bounded) > MIN_UPDATE_EFFECT, "rope_bounded has no effect"


# ----------------------------------------------------------------------------- (c) pure math


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_inner_loop_matches_numpy_reference(layer_type):
    # L = 3b + 1: with checkpoint_group=2 this covers a remat group, an un-grouped whole
    # mini-batch and the final partial mini-batch.
    length = 3 * MINI_BATCH + 1
    params, xq, xk, xv, lr, token_idx, ln_w, ln_b = _inner_case(layer_type, length, seed=11)
    want, want_state = ref.inner_loop(params, xq, xk, xv, lr, token_idx, ln_w, ln_b)
    no_update, _ = ref.inner_loop(params, xq, xk, xv, 0.0 * lr, token_idx, ln_w, ln_b)
    assert _max_err(want, no_update) > MIN_UPDATE_EFFECT, "the inner update has no effect"

    args = (tuple((jnp.asarray(w), jnp.asarray(b)) for w, b in params),
            *(jnp.asarray(a) for a in (xq, xk, xv, lr, token_idx, ln_w, ln_b)))
    dual = jax.jit(ttt_dual, static_argnames="checkpoint_group")
    for group in (0, 2):
        out, state = dual(*args, checkpoint_group=group)
        chex.assert_shape(out, (BATCH, HEADS, length, HEAD_DIM))
        err = _max_err(out, want)
        assert err <= ATOL, f"ttt_dual(group={group}): max abs err {err:.3e}"
        for (w, b), (rw, rb) in zip(state, want_state):  # the state after the last token
            assert max(_max_err(w, rw), _max_err(b, rb)) <= ATOL, f"ttt_dual state, group={group}"

    out, state = jax.jit(ttt_primal)(*args)
    chex.assert_shape(out, (BATCH, HEADS, length, HEAD_DIM))
    err = _max_err(out, want)
    assert err <= ATOL, f"ttt_primal: max abs err {err:.3e}"
    # ttt_primal returns the start state of the mini-batch after the last whole one.
    whole = (length // MINI_BATCH) * MINI_BATCH
    cut = lambda a: a[:, :, :whole]
    _, whole_state = ref.inner_loop(params, cut(xq), cut(xk), cut(xv), cut(lr), token_idx,
                                    ln_w, ln_b)
    for (w, b), (rw, rb) in zip(state, whole_state):
        assert max(_max_err(w, rw), _max_err(b, rb)) <= ATOL, "ttt_primal state"


# ----------------------------------------------------------------------------- (d) positions

# A RoPE case of LAYER_CASES: its jitted apply is reused (no extra compilation).
ROPE_CASE = LAYER_CASES[-1]


def test_rope_positions_only_matter_modulo_mini_batch():
    cfg, length = _case_config(ROPE_CASE)
    assert cfg.use_rope
    variables, x = _layer_setup(cfg, length, seed=LAYER_CASES.index(ROPE_CASE))
    apply = _jitted_apply(cfg)
    run = lambda meta: np.asarray(apply(variables, jnp.asarray(x), metadata=meta))
    ids = lambda p: SequenceMetadata(position_ids=jnp.asarray(p, jnp.int32))
    pos = _positions(length)
    base = run(ids(pos))
    shift = np.array([[3 * MINI_BATCH], [10 * MINI_BATCH]])  # a different multiple per row
    np.testing.assert_allclose(run(ids(pos + shift)), base, rtol=0, atol=1e-6)
    # a shift that is not a multiple of b must change the output (the check can fail)
    assert _max_err(run(ids(pos + 1)), base) > MIN_UPDATE_EFFECT
    # and the reference agrees with the layer at the shifted positions
    assert _max_err(base, ref.ttt_layer(variables["params"], cfg, x, pos + shift)) <= ATOL

    # Positions generated from offsets (no position_ids): offsets 0 give arange(L), as the
    # reference's default; offsets that are multiples of b give the same output.
    offsets = lambda o: SequenceMetadata(offset=jnp.asarray(o, jnp.int32))
    from_zero = run(offsets([0, 0]))
    assert _max_err(from_zero, ref.ttt_layer(variables["params"], cfg, x)) <= ATOL
    np.testing.assert_allclose(run(offsets([2 * MINI_BATCH, 7 * MINI_BATCH])), from_zero,
                               rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- (e) gradients

# jax.grad of the float32 library against central finite differences of the float64 numpy
# reference (tests/reference.py, tests/reference_lm.py), one random direction per param leaf
# (and the input): <u, grad> must equal (F(p + h u) - F(p - h u)) / 2h to GRAD_RTOL. Between
# them the cases own every param name of the layer (k_proj or the two convs, the gate, W2/b2)
# and of the LM (pre-conv, untied head).
GRAD_RTOL = 1e-4
FD_STEP = 1e-4  # float64: truncation ~h^2, rounding ~1e-16 / h, both far below GRAD_RTOL
GRAD_LENGTH = 11  # 2b + 3: two whole mini-batches and a partial one
GRAD_CASES = [
    dict(ttt_layer_type="linear"),
    dict(ttt_layer_type="linear", use_rope=True, rope_layout="interleaved", qk_l2_norm=True,
         share_qk=True, use_gate=True, scan_checkpoint_group=2, seq_chunk=4),
    dict(ttt_layer_type="mlp", qk_l2_norm=True, use_gate=True),
    dict(ttt_layer_type="mlp", use_rope=True, rope_layout="half", share_qk=True,
         scan_checkpoint_group=2, seq_chunk=8),
]
# At these tiny shapes XLA's backend optimisations cost more compile time than they save.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _directional_check(grads, point, value, seed):
    """``grads``, ``point``: flat dicts ``name -> array``; ``value(point) -> float`` in float64.
    Checks every leaf's directional derivative along a random unit direction."""
    rng = np.random.default_rng(seed)
    for name, g in grads.items():
        base = np.asarray(point[name], np.float64)
        u = rng.standard_normal(base.shape)
        u /= np.linalg.norm(u)
        shifted = lambda sign: value({**point, name: base + sign * FD_STEP * u})  # noqa: E731
        fd = (shifted(1.0) - shifted(-1.0)) / (2 * FD_STEP)
        ad = float(np.sum(np.asarray(g, np.float64) * u))
        assert abs(fd) > 1e-6, f"{name}: the loss does not depend on it ({fd:.2e})"
        assert abs(ad - fd) <= GRAD_RTOL * abs(fd), f"{name}: grad {ad:.8e} vs FD {fd:.8e}"


def _flat(tree):
    from ttt_jax.tree import flatten

    return {k: np.asarray(v) for k, v in flatten(tree).items()}


def _unflat(flat):
    out = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


@pytest.mark.parametrize("case", GRAD_CASES, ids=_case_id)
def test_layer_gradients_match_finite_differences_of_the_reference(case):
    cfg = TTTConfig(model_dim=DIM, num_heads=HEADS, mini_batch_size=MINI_BATCH, **case)
    variables, x = _layer_setup(cfg, GRAD_LENGTH, seed=20 + GRAD_CASES.index(case))
    pos = _positions(GRAD_LENGTH)
    target = np.random.default_rng(3).standard_normal(x.shape)
    layer = TTTLayer(cfg)
    meta = SequenceMetadata(position_ids=jnp.asarray(pos))

    def loss(params, x):
        return jnp.sum(layer.apply({"params": params}, x, metadata=meta) * target)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=FAST_COMPILE)(
        variables["params"], jnp.asarray(x))
    point = {**_flat(variables["params"]), "x": x}

    def value(p):
        p = dict(p)
        inp = p.pop("x")
        return float(np.sum(ref.ttt_layer(_unflat(p), cfg, inp, pos) * target))

    _directional_check({**_flat(grads[0]), "x": grads[1]}, point, value, seed=1)


LM_GRAD_CASES = [
    dict(ttt=dict(ttt_layer_type="linear", use_rope=True, qk_l2_norm=True, use_gate=True,
                  seq_chunk=4),
         pre_conv=True, tie_word_embeddings=False),
    dict(ttt=dict(ttt_layer_type="mlp")),
]


@pytest.mark.parametrize("case", LM_GRAD_CASES, ids=lambda c: c["ttt"]["ttt_layer_type"])
def test_lm_gradients_match_finite_differences_of_the_reference(case):
    """The next-token cross-entropy of a 1-block TTT-LM (tests/reference_lm.py in float64)."""
    import reference_lm
    from ttt_jax import TTTLM, ModelConfig

    seed = 30 + LM_GRAD_CASES.index(case)
    case = dict(case)
    ttt = TTTConfig(model_dim=DIM, num_heads=HEADS, mini_batch_size=MINI_BATCH,
                    **case.pop("ttt"))
    cfg = ModelConfig(vocab_size=32, num_layers=1, intermediate_size=32, ttt=ttt, **case)
    model = TTTLM(cfg)
    tokens = np.random.default_rng(4).integers(0, 32, (BATCH, GRAD_LENGTH + 1)).astype(np.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), inputs)["params"]
    # The TTT block's params as in the layer tests; the rest around their initialisers.
    block = _make_params(ttt, GRAD_LENGTH, seed=seed)
    rng = np.random.default_rng(5)
    params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32),
                          shapes)
    for name in ("norm",):
        params[name]["weight"] = 1.0 + params[name]["weight"] / 3
    for name in ("seq_norm", "ffn_norm"):
        params["layers_0"][name]["weight"] = 1.0 + params["layers_0"][name]["weight"] / 3
    params["layers_0"]["seq_modeling_block"] = block

    def loss(params):
        logits = model.apply({"params": params}, inputs)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

    grads = jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)(params)

    def value(p):
        logits = reference_lm.logits(_unflat(p), cfg, inputs)
        logits = logits - logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return float(-np.mean(np.take_along_axis(logp, targets[..., None], -1)))

    _directional_check(_flat(grads), _flat(params), value, seed=2)
