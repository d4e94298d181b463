"""Every TTTLayer variant: shapes, params, jit agreement, remat, bf16 (projections only).

Gradients are checked against finite differences of the float64 reference in
``test_ttt_correctness.py`` (every param leaf of the layer and of a TTT-LM); here remat must
not change them.

Compiles dominate the runtime on CPU, so work is shared through cached helpers: each variant
is initialised, perturbed and run at L=8 and L=13 once (``_variant_run``); gradients with remat
off and on are taken once per gradient variant (``_grad_run``), and the LM's logits once
(``_lm_run``); several tests read each result. The grid is a covering design, not the full
product.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import traverse_util

from conftest import BATCH, DIM, HEADS, MINI_BATCH
from ttt_jax import TTTLM, ModelConfig, TTTConfig, TTTLayer
from ttt_jax.math import cpu_kernel

LENGTHS = (8, 13)  # 13 % 4 != 0: a final partial mini-batch
VOCAB = 32
# Added to every param so that no leaf sits at a special point of its initialiser (zero biases,
# zero learnable_token_idx). Small enough that tok[i] = 1/(i+1) + idx[i] stays positive.
PERTURB_STD = 0.01


@dataclasses.dataclass(frozen=True)
class Variant:
    ttt_layer_type: str
    rope: str  # "off" | "interleaved" | "half"
    qk_l2_norm: bool
    share_qk: bool
    use_gate: bool
    scan_checkpoint_group: int

    def config(self) -> TTTConfig:
        return TTTConfig(model_dim=DIM, num_heads=HEADS, mini_batch_size=MINI_BATCH,
                         ttt_layer_type=self.ttt_layer_type, use_rope=self.rope != "off",
                         rope_layout="interleaved" if self.rope == "off" else self.rope,
                         qk_l2_norm=self.qk_l2_norm, share_qk=self.share_qk,
                         use_gate=self.use_gate,
                         scan_checkpoint_group=self.scan_checkpoint_group)

    @property
    def name(self) -> str:
        flags = [n for n in ("qk_l2_norm", "share_qk", "use_gate") if getattr(self, n)]
        return "-".join([self.ttt_layer_type, f"rope_{self.rope}", *flags,
                         f"group{self.scan_checkpoint_group}"])


# A covering design instead of the full product (96 configs would take minutes to compile):
# with both linear and mlp, every value of every option appears at least once.
VARIANTS = [
    Variant("linear", "off", False, False, False, 0),
    Variant("linear", "interleaved", True, True, True, 2),
    Variant("linear", "half", True, False, True, 2),
    Variant("mlp", "off", True, True, False, 2),
    Variant("mlp", "interleaved", False, False, True, 0),
    Variant("mlp", "half", True, True, True, 2),
]
# Every option on, the variant used by the jit tests (with mlp) and the gradient tests.
FULL = Variant("mlp", "half", True, True, True, 2)
GRAD_VARIANTS = [Variant("linear", "interleaved", True, True, True, 2), FULL]


def test_variant_grid_covers_every_option():
    options = {
        "rope": {"off", "interleaved", "half"},
        "qk_l2_norm": {False, True},
        "share_qk": {False, True},
        "use_gate": {False, True},
        "scan_checkpoint_group": {0, 2},
    }
    for kind in ("linear", "mlp"):
        rows = [v for v in VARIANTS if v.ttt_layer_type == kind]
        for name, values in options.items():
            assert {getattr(v, name) for v in rows} == values, (kind, name)


def perturb(params, seed):
    """Adds host-side noise to every leaf (no random-number kernels to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: p + PERTURB_STD * rng.standard_normal(p.shape).astype(np.float32), params)


def inputs(seed, length, batch=BATCH):
    return np.random.default_rng(seed).standard_normal((batch, length, DIM)).astype(np.float32)


# At these tiny shapes XLA's backend optimisations cost far more compile time than they save at
# run time (about half of each compile); the numerics are unchanged at float32 tolerance.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn):
    return jax.jit(fn, compiler_options=FAST_COMPILE)


def init_key(seed):
    # The "rbg" generator compiles in about half the time of threefry on CPU; init is
    # otherwise unchanged (the same initialisers and shapes).
    return jax.random.key(seed, impl="rbg")


@functools.lru_cache(maxsize=None)
def _variant_run(variant: Variant):
    """Init (then perturb), and apply at every length: two compiles per variant."""
    layer = TTTLayer(variant.config())
    xs = [inputs(seed, n) for seed, n in enumerate(LENGTHS)]
    variables = perturb(fast_jit(layer.init)(init_key(0), xs[0]), seed=1)
    ys = fast_jit(lambda v: [layer.apply(v, x) for x in xs])(variables)
    return jax.device_get(variables), xs, jax.device_get(ys)


@functools.lru_cache(maxsize=None)
def _grad_run(variant: Variant):
    """Outputs and gradients at L=13 of the variant's params, with remat off and on.

    Returns ``{group: (y, grads)}`` for ``scan_checkpoint_group`` 0 and the variant's own.
    The loss ``mean(y * target)`` with a random target reaches every output entry.
    """
    variables, xs, _ = _variant_run(variant)
    x = xs[-1]
    target = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    groups = sorted({0, variant.scan_checkpoint_group})
    layers = {g: TTTLayer(dataclasses.replace(variant.config(), scan_checkpoint_group=g))
              for g in groups}

    def run(v):
        out = {}
        for g, layer in layers.items():
            def loss(v, layer=layer):
                y = layer.apply(v, x)
                return jnp.mean(y * target), y

            (_, y), grads = jax.value_and_grad(loss, has_aux=True)(v)
            out[g] = (y, grads)
        return out

    return jax.device_get(fast_jit(run)(variables))


def expected_param_shapes(cfg: TTTConfig) -> dict[str, tuple[int, ...]]:
    """The TTTLayer param layout derived from the config alone."""
    d, h, f, b, k = cfg.model_dim, cfg.num_heads, cfg.head_dim, cfg.mini_batch_size, cfg.conv_kernel
    big = 4 * f if cfg.ttt_layer_type == "mlp" else f
    shapes = {
        "q_proj/kernel": (d, d), "v_proj/kernel": (d, d), "o_proj/kernel": (d, d),
        "post_norm/scale": (d,), "post_norm/bias": (d,),
        "learnable_ttt_lr_weight": (h, d), "learnable_ttt_lr_bias": (h,),
        "learnable_token_idx": (b,), "ttt_norm_weight": (h, f), "ttt_norm_bias": (h, f),
        "W1": (h, f, big), "b1": (h, 1, big),
    }
    if cfg.ttt_layer_type == "mlp":
        shapes.update({"W2": (h, big, f), "b2": (h, 1, f)})
    if cfg.share_qk:
        for conv in ("conv_q", "conv_k"):
            shapes.update({f"{conv}/kernel": (k, d), f"{conv}/bias": (d,)})
    else:
        shapes["k_proj/kernel"] = (d, d)
    if cfg.use_gate:
        shapes["g_proj/kernel"] = (d, d)
    return shapes


def flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_variant_output_shape_and_finite(variant):
    _, xs, ys = _variant_run(variant)
    for x, y, length in zip(xs, ys, LENGTHS):
        chex.assert_shape(y, (BATCH, length, DIM))
        chex.assert_type(y, jnp.float32)
        chex.assert_tree_all_finite(y)
        assert np.abs(y).max() > 0


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_variant_params(variant):
    variables, _, _ = _variant_run(variant)
    assert set(variables) == {"params"}
    shapes = {k: tuple(v.shape) for k, v in flat(variables["params"]).items()}
    assert shapes == expected_param_shapes(variant.config())
    chex.assert_tree_all_finite(variables)
    for v in flat(variables["params"]).values():
        assert v.dtype == jnp.float32


@pytest.mark.parametrize("variant", GRAD_VARIANTS, ids=lambda v: v.name)
def test_scan_checkpoint_group_matches_no_remat(variant):
    """Remat (group 2 over n=3 mini-batches plus a partial one) changes neither y nor grads."""
    results = _grad_run(variant)
    y0, g0 = results[0]
    _, xs, ys = _variant_run(variant)
    chex.assert_trees_all_close(y0, ys[-1], atol=1e-5, rtol=1e-5)
    assert variant.scan_checkpoint_group > 0 and LENGTHS[-1] > 2 * MINI_BATCH
    y, g = results[variant.scan_checkpoint_group]
    chex.assert_trees_all_close(y, y0, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(g, g0, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- TTT-LM


# Pre-conv and an untied head; separate Q/K projections. One block keeps the compile short;
# test_model.py covers deeper stacks.
LM_CONFIG = ModelConfig(vocab_size=VOCAB, num_layers=1, intermediate_size=32,
                        ttt=Variant("linear", "interleaved", True, False, True, 0).config(),
                        pre_conv=True, tie_word_embeddings=False)
LM_LENGTH = LENGTHS[0]


@functools.lru_cache(maxsize=None)
def _lm_run(cfg: ModelConfig):
    """Init (then perturb) and jitted logits of the LM: ``(variables, tokens, logits)``."""
    model = TTTLM(cfg)
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (BATCH, LM_LENGTH))
    inp = tokens.astype(np.int32)
    variables = perturb(fast_jit(model.init)(init_key(2), inp), seed=3)
    logits = fast_jit(model.apply)(variables, inp)
    return jax.device_get(variables), inp, jax.device_get(logits)


class JitAgreementTest(chex.TestCase):
    """The layer and the LM give the same outputs with and without ``jax.jit``.

    Both variants are compared with the same reference (computed under ``jax.jit`` by the
    cached helpers), so they agree with each other to the same tolerance.
    """

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("layer", "layer"), ("lm", "lm"))
    def test_matches_reference(self, which):
        if which == "layer":
            module = TTTLayer(FULL.config())
            variables, xs, ys = _variant_run(FULL)
            x, expected = xs[0], ys[0]
        else:
            module = TTTLM(LM_CONFIG)
            variables, x, expected = _lm_run(LM_CONFIG)

        @self.variant
        def apply(v, x):
            return module.apply(v, x)

        out = apply(variables, x)
        chex.assert_shape(out, expected.shape)
        chex.assert_trees_all_close(out, expected, atol=1e-5, rtol=1e-5)


def test_jitted_apply_traces_once():
    variant = VARIANTS[0]
    layer = TTTLayer(variant.config())
    variables, xs, ys = _variant_run(variant)
    x = xs[0]

    @jax.jit
    @chex.assert_max_traces(n=1)
    def apply(v, x):
        return layer.apply(v, x)

    try:
        out = apply(variables, x)
        apply(variables, x + 1.0)  # new values, same shapes
        apply(jax.tree.map(lambda p: p * 1.5, variables), x)
        out2 = apply(variables, x)
    finally:
        chex.clear_trace_counter()
    chex.assert_trees_all_close(out, ys[0], atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_equal(out, out2)


def test_bfloat16_compute(tiny_model_config):
    cfg = dataclasses.replace(tiny_model_config, dtype="bfloat16")
    model = TTTLM(cfg)
    length = LENGTHS[-1]
    tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, (BATCH, length)).astype(np.int32)
    variables = fast_jit(model.init)(init_key(4), tokens)
    for name, p in flat(variables["params"]).items():
        assert p.dtype == jnp.float32, name
    logits = fast_jit(model.apply)(variables, tokens)
    chex.assert_shape(logits, (BATCH, length, cfg.vocab_size))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)
    assert np.abs(np.asarray(logits)).max() > 0


def test_bfloat16_compute_keeps_the_inner_loop_in_float32():
    """``model.dtype: bfloat16`` rounds the projections only. The inner loop (every option on)
    gets float32 inputs and carries a float32 state: its output equals the float64 reference
    inner loop run on the bfloat16 layer's own inputs to float32 accuracy (a bfloat16 inner
    loop would miss by ~1e-2), so its distance to the float32 layer's output is what the
    rounded projections alone explain (the reference on each layer's inputs), plus 2 * 1e-5.
    The jaxpr's scans carry no bfloat16 and multiply in float32; the stream state is float32."""
    from flax import linen as nn

    import reference as ref
    from jaxpr_walk import all_eqns

    cfg = FULL.config()
    variables, xs, _ = _variant_run(FULL)
    # The inner weights and learning rates well away from init, so the inner update matters.
    rng = np.random.default_rng(8)
    params = dict(variables["params"])
    for name, std in (("W1", 0.3), ("W2", 0.3), ("learnable_ttt_lr_bias", 1.0)):
        params[name] = params[name] + std * rng.standard_normal(params[name].shape).astype(np.float32)
    variables = {"params": params}
    x = jnp.asarray(xs[-1])

    def run(layer):
        def inner(v, x):
            captured = {}

            def interceptor(next_fun, args, kwargs, context):
                if context.method_name == "output":  # TTTLayer.output(inner output, x)
                    captured["out"] = args[0]
                return next_fun(*args, **kwargs)

            with nn.intercept_methods(interceptor):
                layer.apply(v, x)
            return captured["out"], layer.apply(v, x, method=TTTLayer.ttt_inputs)

        out, inputs = fast_jit(inner)(variables, x)
        return np.asarray(out), [np.asarray(a) for a in inputs]

    def reference(inputs):
        p = ref.to_f64(params)
        out, _ = ref.inner_loop(ref.inner_params(p, cfg), *inputs, p["learnable_token_idx"],
                                p["ttt_norm_weight"], p["ttt_norm_bias"])
        return out

    out32, in32 = run(TTTLayer(cfg))
    bf16 = TTTLayer(cfg, dtype=jnp.bfloat16)
    out16, in16 = run(bf16)
    assert out16.dtype == np.float32 and all(a.dtype == np.float32 for a in in16)
    # V is a plain projection: bfloat16 values held in float32.
    np.testing.assert_array_equal(in16[2], in16[2].astype(jnp.bfloat16).astype(np.float32))
    ref32, ref16 = reference(in32), reference(in16)
    assert np.abs(out32 - ref32).max() <= 1e-5
    assert np.abs(out16 - ref16).max() <= 1e-5, np.abs(out16 - ref16).max()
    explained = np.abs(ref16 - ref32).max()
    assert 1e-4 < explained < 0.2  # the rounding of the projections is visible and bounded
    assert np.abs(out16 - out32).max() <= explained + 2e-5

    # On the CPU the inner loop is one call of the native kernel: its operands are float32.
    jaxpr = jax.make_jaxpr(lambda v, x: bf16.apply(v, x))(variables, x)
    calls = [e for e in all_eqns(jaxpr) if e.primitive.name == "ffi_call"]
    assert calls and all(v.aval.dtype == jnp.float32 for e in calls for v in e.invars)
    with cpu_kernel.disabled():  # the XLA scan (accelerators): its products in float32
        jaxpr = jax.make_jaxpr(lambda v, x: bf16.apply(v, x))(variables, x)
    scans = [e for e in all_eqns(jaxpr) if e.primitive.name == "scan"]
    assert scans
    for scan in scans:
        assert all(v.aval.dtype != jnp.bfloat16 for v in scan.outvars)
        dots = [e for e in all_eqns(scan.params["jaxpr"]) if e.primitive.name == "dot_general"]
        assert dots and all(v.aval.dtype == jnp.float32 for e in dots for v in e.invars)

    def stream(v, x):
        cache = bf16.apply(v, BATCH, method=TTTLayer.init_cache)
        return bf16.apply(v, x, cache, method=TTTLayer.stream)[1]

    cache = jax.eval_shape(stream, variables, x[:, :5])  # the traced program's dtypes
    for key in ("state0", "acc"):
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(cache[key])), key
