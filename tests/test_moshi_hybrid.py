"""The Moshi-TTT hybrid: causality, streaming = full forward, the no-op graft, param groups."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ttt_jax import registry
from ttt_jax.config import OptimConfig, TrainConfig
from ttt_jax.moshi.config import (MoshiRunConfig, MoshiTTTConfig, MoshiTransformerConfig,
                                  TTTArgs, load_ttt_args)
from ttt_jax.moshi.hybrid import MoshiTTTLM
from ttt_jax.moshi.registration import param_group
from ttt_jax.moshi.training import graft
from ttt_jax.training import param_labels
from ttt_jax.tree import flatten, path_str

BATCH, LENGTH, MINI_BATCH, CONTEXT, LAYERS = 2, 13, 4, 8, 4
VOCABS = (11, 7)
BACKBONE = MoshiTransformerConfig(d_model=32, num_heads=4, num_layers=LAYERS, dim_feedforward=96,
                                  context=CONTEXT, layer_scale=0.5)
TTT = TTTArgs(enable=True, layers="middle", mini_batch_size=MINI_BATCH, use_rope=True,
              ttt_base_lr=1.0)
CFG = MoshiTTTConfig(transformer=BACKBONE, ttt=TTT, vocab_sizes=VOCABS)


def tokens(seed=0, length=LENGTH):
    rng = np.random.default_rng(seed)
    cols = [rng.integers(0, v, (BATCH, length)) for v in VOCABS]
    return jnp.asarray(np.stack(cols, axis=-1), jnp.int32)  # [B, T, K], rows differ


MODEL = MoshiTTTLM(CFG)
APPLY = jax.jit(MODEL.apply)
# The same backbone without TTT sub-blocks.
BASE_MODEL = MoshiTTTLM(dataclasses.replace(CFG, ttt=dataclasses.replace(TTT, enable=False)))
BASE_APPLY = jax.jit(BASE_MODEL.apply)
SHAPES = registry.get("moshi_ttt").param_shapes(CFG)
# Values around the initialiser's: norm gains and alphas near their constants, the rest small.
CENTRES = {"alpha": 1.0, "scale": 1.0, "ttt_norm_weight": 1.0, "gating_alpha": 0.1}


def random_params(seed: int):
    """Params of ``CFG`` drawn on the host (no compiled init: the tests share one forward)."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        centre = CENTRES.get(str(getattr(path[-1], "key", "")), 0.0)
        return jnp.asarray(centre + 0.05 * rng.standard_normal(s.shape).astype(np.float32))

    return jax.tree_util.tree_map_with_path(draw, SHAPES)


@jax.jit
def loss_and_grad(params, x):
    """Mean next-frame cross-entropy of ``MODEL`` and its gradient (one compile for all tests)."""

    def loss(p):
        logits = MODEL.apply({"params": p}, x[:, :-1])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]))

    return jax.value_and_grad(loss)(params)


# One optimizer for the step tests: backbone frozen, TTT params at 3x and alphas at 7x the base
# learning rate (plain Adam: no weight decay, no warmup).
LR, WEIGHT_MULT, ALPHA_MULT = 1e-3, 3.0, 7.0
STEP_TTT = dataclasses.replace(TTT, freeze_backbone=True, weight_lr_multiplier=WEIGHT_MULT,
                               alpha_lr_multiplier=ALPHA_MULT)
ARCH = registry.get("moshi_ttt")
STEP_RUN = MoshiRunConfig(model=dataclasses.replace(CFG, ttt=STEP_TTT),
                          optim=OptimConfig(learning_rate=LR, warmup_steps=0, weight_decay=0.0),
                          train=TrainConfig(steps=10))
OPTIMIZER = ARCH.make_optimizer(STEP_RUN)


@jax.jit
def optimizer_step(params, grads):
    updates, _ = OPTIMIZER.update(grads, OPTIMIZER.init(params), params)
    return optax.apply_updates(params, updates)


@pytest.fixture(scope="module")
def hybrid():
    return MODEL, random_params(1), APPLY


def test_middle_layers_are_grafted():
    assert CFG.ttt_layers == (1, 2)
    params = SHAPES["transformer"]
    assert [("seq_modeling_block" in params[f"layers_{i}"]) for i in range(LAYERS)] == \
        [False, True, True, False]
    logits = APPLY({"params": random_params(0)}, tokens())
    assert logits.shape == (BATCH, LENGTH, len(VOCABS), max(VOCABS))
    # The 7-token stream's extra logits are masked, so its softmax is over its own vocab.
    assert float(jnp.max(logits[:, :, 1, 7:])) < -1e29


def test_causal(hybrid):
    _, params, apply = hybrid
    t = 6
    x = tokens()
    y = x.at[:, t, 0].set((x[:, t, 0] + 1) % VOCABS[0])
    a, b = apply({"params": params}, x), apply({"params": params}, y)
    np.testing.assert_array_equal(np.asarray(a[:, :t]), np.asarray(b[:, :t]))
    assert float(jnp.max(jnp.abs(a[:, t:] - b[:, t:]))) > 1e-4
    # Batch rows are independent streams.
    z = x.at[1].set(y[1])
    c = apply({"params": params}, z)
    np.testing.assert_allclose(np.asarray(c[0]), np.asarray(a[0]), atol=1e-6)


def test_streaming_equals_full(hybrid):
    model, params, apply = hybrid
    variables = {"params": params}
    x = tokens(1)
    full = np.asarray(apply(variables, x))
    stream = jax.jit(lambda c, t: model.apply(variables, t, c, method="stream"))
    cache = model.apply(variables, BATCH, method="init_cache")
    outs = []
    for t in range(LENGTH):  # one frame at a time, past the context and several mini-batches
        y, cache = stream(cache, x[:, t:t + 1])
        outs.append(np.asarray(y))
    assert np.max(np.abs(np.concatenate(outs, 1) - full)) <= 1e-5
    assert cache["layers"][1]["attn"]["k"].shape[2] == CONTEXT
    np.testing.assert_array_equal(np.asarray(cache["offset"]), [LENGTH, LENGTH])
    # A chunk of 5 frames (ending mid mini-batch), then single frames again.
    cache = model.apply(variables, BATCH, method="init_cache")
    outs, cache = stream(cache, x[:, :5])
    outs = [np.asarray(outs)]
    for t in range(5, LENGTH):
        y, cache = stream(cache, x[:, t:t + 1])
        outs.append(np.asarray(y))
    assert np.max(np.abs(np.concatenate(outs, 1) - full)) <= 1e-5


def backbone(params):
    """A base model's params: a hybrid's without its TTT sub-blocks (``BASE_MODEL``'s tree)."""
    base = {k: v for k, v in params.items() if k != "transformer"}
    base["transformer"] = {name: {k: v for k, v in layer.items() if k != "seq_modeling_block"}
                           for name, layer in params["transformer"].items()}
    return base


def zero_ttt_output(params):
    """``params`` with the ``o_proj`` kernel of every grafted TTT layer zeroed (what the
    module's init gives with ``ttt.noop_init``), the rest untouched."""
    def one(path, leaf):
        hit = path_str(path).endswith("seq_modeling_block/ttt_layer/o_proj/kernel")
        return np.zeros_like(leaf) if hit else leaf

    return jax.tree_util.tree_map_with_path(one, params)


def test_noop_graft_equals_base_and_trains():
    x = tokens(2)
    base = backbone(random_params(6))
    assert jax.tree.structure(base) == jax.tree.structure(
        jax.eval_shape(BASE_MODEL.init, jax.random.PRNGKey(0), x)["params"])
    cfg = dataclasses.replace(CFG, ttt=dataclasses.replace(TTT, noop_init=True))
    params, report = graft(base, cfg, target=zero_ttt_output(random_params(4)))
    assert report.missing and all(param_group(k) != "backbone" for k in report.missing)
    want = BASE_APPLY({"params": base}, x)
    got = APPLY({"params": params}, x)  # MoshiTTTLM(cfg) computes what MODEL does
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    grads = flatten(loss_and_grad(params, x)[1])
    o_proj = [k for k in grads if k.endswith("o_proj/kernel")]
    assert len(o_proj) == 2 and all(float(jnp.max(jnp.abs(grads[k]))) > 0 for k in o_proj)
    # One optimizer step later every new parameter receives gradient.
    stepped = optimizer_step(params, loss_and_grad(params, x)[1])
    grads = flatten(loss_and_grad(stepped, x)[1])
    new = [k for k in grads if param_group(k) != "backbone"]
    dead = [k for k in new if float(jnp.max(jnp.abs(grads[k]))) == 0.0]
    assert new and not dead, dead


@pytest.mark.parametrize("noop", [True, False])
def test_module_init_honours_noop_init(noop):
    """``MoshiTTTLM(cfg).init`` itself zeroes every grafted ``o_proj`` with ``ttt.noop_init``: the
    logits are then bit-identical to the base model's with the same backbone params."""
    cfg = dataclasses.replace(CFG, ttt=dataclasses.replace(TTT, noop_init=noop))
    x = tokens(3)
    params = jax.jit(MoshiTTTLM(cfg).init)(jax.random.PRNGKey(3), x[:, :MINI_BATCH])["params"]
    o_proj = {k: v for k, v in flatten(params).items() if k.endswith("ttt_layer/o_proj/kernel")}
    assert len(o_proj) == len(CFG.ttt_layers)
    assert all(bool(jnp.any(v)) != noop for v in o_proj.values())
    want = np.asarray(BASE_APPLY({"params": backbone(params)}, x))
    got = np.asarray(APPLY({"params": params}, x))  # noop_init changes the init, not the forward
    if noop:
        np.testing.assert_array_equal(got, want)
    else:
        assert np.max(np.abs(got - want)) > 1e-3


def test_freeze_backbone_and_lr_multipliers_on_one_step():
    """Only TTT params and alphas change; Adam's first step moves each by ~lr (the gradient's
    sign) times its group's multiplier."""
    before = random_params(5)
    grads = loss_and_grad(before, tokens(4))[1]
    after = flatten(optimizer_step(before, grads))
    before, grads = flatten(before), flatten(grads)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    groups = {k: param_group(k) for k in before}
    assert changed == {k for k, g in groups.items() if g != "backbone"}
    want = {"ttt": LR * WEIGHT_MULT, "alpha": LR * ALPHA_MULT}
    checked = set()
    for k in changed:
        live = np.abs(np.asarray(grads[k])) > 1e-5  # where Adam's eps=1e-8 is negligible
        if live.any():
            step = np.abs(np.asarray(after[k]) - np.asarray(before[k]))[live]
            np.testing.assert_allclose(step, want[groups[k]], rtol=1e-2, err_msg=k)
            checked.add(groups[k])
    assert checked == {"ttt", "alpha"}


def test_param_labels():
    shapes = SHAPES
    labels = flatten(param_labels(shapes, group_of=ARCH.param_group))
    assert labels["transformer/layers_1/seq_modeling_block/forward_ssm_gating/gating_alpha"] == "alpha"
    assert labels["transformer/layers_1/seq_modeling_block/ttt_layer/W1"] == "ttt"
    assert labels["transformer/layers_0/self_attn/in_proj/kernel"] == "backbone"
    assert labels["emb_0/embedding"] == "backbone"
    frozen = flatten(param_labels(shapes, group_of=ARCH.param_group,
                                  frozen=ARCH.frozen_groups(STEP_RUN)))
    assert {frozen[k] for k, v in labels.items() if v == "backbone"} == {"freeze"}
    only_alpha = flatten(param_labels(shapes, "gating_alpha", ARCH.param_group))
    assert {k for k, v in only_alpha.items() if v != "freeze"} == \
        {k for k, v in labels.items() if v == "alpha"}


# ---------------------------------------------------------------- TTTArgs


def test_layer_selection():
    spec = lambda layers, n: TTTArgs(enable=True, layers=layers).layer_indices(n)  # noqa: E731
    assert spec("middle", 32) == tuple(range(8, 24))
    assert spec("all", 3) == (0, 1, 2)
    assert spec("none", 5) == ()
    assert spec("9, 1,5", 10) == (1, 5, 9)
    assert TTTArgs(enable=False, layers="all").layer_indices(4) == ()


@pytest.mark.parametrize("kwargs, match", [
    (dict(layers="1,1"), r"ttt.layers='1,1' is invalid: expected distinct layer indices"),
    (dict(layers="-1"), r"ttt.layers='-1' is invalid: expected layer indices >= 0"),
    (dict(layers="middle-ish"), r"ttt.layers='middle-ish' is invalid: expected none, all, middle"),
    (dict(ttt_base_lr=0.0), r"ttt.ttt_base_lr=0.0 is invalid: expected a positive number"),
    (dict(mini_batch_size=0), r"ttt.mini_batch_size=0 is invalid: expected an integer >= 1"),
    (dict(weight_lr_multiplier=-2.0), r"ttt.weight_lr_multiplier=-2.0 is invalid"),
    (dict(alpha_lr_multiplier=0), r"ttt.alpha_lr_multiplier=0 is invalid"),
    (dict(enable="yes"), r"ttt.enable='yes' is invalid: expected true or false"),
])
def test_ttt_args_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TTTArgs(**kwargs)


def test_layers_out_of_range_names_the_field():
    with pytest.raises(ValueError, match=r"ttt.layers='1,4' is invalid: expected layer indices "
                                         r"in \[0, 3\] for num_layers=4 \(out of range: \[4\]\)"):
        MoshiTTTConfig(transformer=BACKBONE, ttt=TTTArgs(enable=True, layers="1,4"))


def test_moshi_ttt_block_loads_unchanged():
    block = {"enable": True, "layers": "middle", "base_lr": 1.0, "mini_batch_size": 16,
             "use_rope": True, "rope_theta": 10000.0}
    args = load_ttt_args(block)
    assert (args.enable, args.layers, args.mini_batch_size, args.use_rope) == \
        (True, "middle", 16, True)
    plain = load_ttt_args({k: v for k, v in block.items() if k not in ("use_rope", "rope_theta")})
    assert (plain.use_rope, plain.rope_theta) == (False, 10000.0)
    with pytest.raises(ValueError, match="unknown key"):
        load_ttt_args({**block, "fast": 1})
