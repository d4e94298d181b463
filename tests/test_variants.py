"""Every TTTLayer variant: shapes, params, finite non-zero gradients, jit agreement, remat, bf16.

Compiles dominate the runtime on CPU, so work is shared through cached helpers: each variant
is initialised, perturbed and run at L=8 and L=13 once (``_variant_run``); gradients with remat
off and on are taken once per gradient variant (``_grad_run``) and once for the LM
(``_lm_run``); several tests read each result. The grid is a covering design, not the full
product, and gradients use two variants that between them (plus the LM) own every param name.
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


def assert_all_grads_nonzero(grads):
    for name, g in flat(grads).items():
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), f"non-finite gradient for {name}"
        assert np.linalg.norm(g) > 0, f"zero gradient for {name}"


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
def test_variant_gradients_finite_nonzero(variant):
    """Every leaf (all of them: both convs, the gate, W2/b2; k_proj in the LM test) learns."""
    for _, grads in _grad_run(variant).values():
        assert_all_grads_nonzero(grads["params"])


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


# Pre-conv and an untied head; separate Q/K projections (k_proj's gradient is checked here).
# One block keeps the gradient compile short; test_model.py covers deeper stacks.
LM_CONFIG = ModelConfig(vocab_size=VOCAB, num_layers=1, intermediate_size=32,
                        ttt=Variant("linear", "interleaved", True, False, True, 0).config(),
                        pre_conv=True, tie_word_embeddings=False)
LM_LENGTH = LENGTHS[0]


def cross_entropy(logits, labels):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


@functools.lru_cache(maxsize=None)
def _lm_run(cfg: ModelConfig):
    model = TTTLM(cfg)
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (BATCH, LM_LENGTH + 1))
    inp, labels = tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32)
    variables = perturb(fast_jit(model.init)(init_key(2), inp), seed=3)

    def loss(v):
        logits = model.apply(v, inp)
        return cross_entropy(logits, labels), logits

    (_, logits), grads = fast_jit(jax.value_and_grad(loss, has_aux=True))(variables)
    return jax.device_get(variables), inp, jax.device_get(logits), jax.device_get(grads)


def test_lm_gradients_finite_nonzero():
    variables, inp, logits, grads = _lm_run(LM_CONFIG)
    chex.assert_shape(logits, (*inp.shape, VOCAB))
    chex.assert_tree_all_finite(logits)
    params = variables["params"]
    assert "lm_head" in params and "conv" in params["layers_0"]
    assert "k_proj" in params["layers_0"]["seq_modeling_block"]
    assert_all_grads_nonzero(grads["params"])


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
            variables, x, expected, _ = _lm_run(LM_CONFIG)

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
