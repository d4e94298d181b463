"""Training: optimizer chain, gradient accumulation, and a tiny end-to-end run."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ttt_jax import TTTLM, ModelConfig, RunConfig, TTTConfig
from ttt_jax.config import DataConfig, OptimConfig, TrainConfig
from ttt_jax import training
from ttt_jax.tree import path_str

SEQ, VOCAB = 12, 32


def tiny_model():
    ttt = TTTConfig(model_dim=16, num_heads=2, mini_batch_size=4)
    return ModelConfig(vocab_size=VOCAB, num_layers=1, intermediate_size=32, ttt=ttt)


@pytest.fixture(scope="module")
def setup():
    model = TTTLM(tiny_model())
    optimizer = training.make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0), 10)
    state = jax.jit(lambda k: training.new_state(
        model.init(k, jnp.zeros((1, SEQ), jnp.int32))["params"], optimizer))(jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (8, SEQ + 1)), jnp.int32)
    return model, optimizer, state, tokens


def test_grad_accumulation_equals_one_big_batch(setup):
    """k micro-batches of m sequences give the update of one batch of k*m (docs/architecture.md §4)."""
    model, optimizer, state, tokens = setup
    step = jax.jit(training.make_train_step(model, optimizer))
    one, m_one = step(state, tokens[None])  # [1, 8, L+1]
    four, m_four = step(state, tokens.reshape(4, 2, SEQ + 1))  # [4, 2, L+1]
    np.testing.assert_allclose(m_one["loss"], m_four["loss"], rtol=1e-6)
    chex_close = lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)
    jax.tree.map(chex_close, one.params, four.params)
    # And the update is not trivially zero.
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), one.params, state.params)
    assert max(jax.tree.leaves(moved)) > 1e-3


def test_loss_matches_independent_cross_entropy(setup):
    """The step's reported loss is the mean next-token cross-entropy, computed here in numpy."""
    model, optimizer, state, tokens = setup
    logits = np.asarray(model.apply({"params": state.params}, tokens[:, :-1]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    targets = np.asarray(tokens[:, 1:])
    expected = -np.take_along_axis(logp, targets[..., None], -1).mean()
    _, metrics = jax.jit(training.make_train_step(model, optimizer))(state, tokens[None])
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)


def test_loss_mask_counts_only_marked_tokens(setup):
    model, _, state, tokens = setup
    logits = model.apply({"params": state.params}, tokens[:, :-1])
    mask = np.zeros((8, SEQ), np.float32)
    mask[:, -1] = 1.0
    s, n = training.cross_entropy(logits, tokens[:, 1:], jnp.asarray(mask))
    full = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    assert float(n) == 8.0
    np.testing.assert_allclose(float(s), float(jnp.sum(full[:, -1])), rtol=1e-6)


# The leaves docs/architecture.md §4 says are decayed: the matrices (embedding, Dense kernels,
# the inner weights and the per-head learning-rate projection). Everything else (norm gains and
# biases, inner biases, token weights, lr biases) is spared.
DECAYED = {"embedding", "kernel", "W1", "W2", "learnable_ttt_lr_weight"}
SPARED = {"weight", "scale", "bias", "b1", "b2", "learnable_token_idx", "learnable_ttt_lr_bias",
          "ttt_norm_weight", "ttt_norm_bias"}


def test_one_adamw_step_decays_exactly_the_matrices(setup):
    """With zero gradients Adam's moments stay zero, so one AdamW step changes a param only by
    its decoupled weight decay: ``p <- p - lr * wd * p`` on the matrices, nothing elsewhere.
    Every leaf of the TTT-LM (MLP inner model, so W2/b2 too) is checked by name."""
    wd, lr = 0.25, 0.1
    cfg = dataclasses.replace(tiny_model(), ttt=dataclasses.replace(tiny_model().ttt,
                                                                    ttt_layer_type="mlp"))
    shapes = jax.eval_shape(TTTLM(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(1.0 + rng.random(s.shape), jnp.float32),
                          shapes["params"])
    optimizer = training.make_optimizer(
        OptimConfig(learning_rate=lr, warmup_steps=0, weight_decay=wd), 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    new = optax.apply_updates(params, updates)
    names = set()
    for (path, old), got in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                jax.tree.leaves(new)):
        name = path[-1].key
        names.add(name)
        assert name in DECAYED | SPARED, f"{path_str(path)}: a leaf this test does not know"
        want = np.asarray(old) * (1 - lr * wd) if name in DECAYED else np.asarray(old)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, err_msg=path_str(path))
    assert DECAYED <= names and {"b2", "ttt_norm_bias", "learnable_token_idx"} <= names


def test_schedule_warms_up_then_decays():
    """Every step against the closed form: ``peak * t / W`` for ``t < W``, then
    ``end + (peak - end) * (1 + cos(pi * (t - W) / (T - W))) / 2`` up to ``T``, then ``end``."""
    peak, warmup, total, ratio = 3.0, 10, 100, 0.1
    cfg = OptimConfig(learning_rate=peak, warmup_steps=warmup, min_lr_ratio=ratio)
    sched = training.learning_rate_schedule(cfg, total)
    end = peak * ratio
    for t in range(total + 20):
        if t < warmup:
            want = peak * t / warmup
        elif t <= total:
            want = end + (peak - end) * 0.5 * (1 + np.cos(np.pi * (t - warmup) / (total - warmup)))
        else:
            want = end
        assert float(sched(t)) == pytest.approx(want, rel=1e-5, abs=1e-6), t


def test_tiny_run_writes_outputs_and_learns(tmp_path):
    """A few steps on the built-in byte corpus: metrics, PNG, config, and a falling loss."""
    from ttt_jax.trainer import run

    cfg = RunConfig(
        model=dataclasses.replace(tiny_model(), vocab_size=256),
        optim=OptimConfig(learning_rate=1e-2, warmup_steps=2),
        data=DataConfig(source="bytes", seq_len=32, batch_size=8),
        train=TrainConfig(steps=30, eval_every=15, eval_batches=2, log_every=5, grad_accum=2,
                          run_dir=str(tmp_path / "run")))
    out = run(cfg, print_fn=lambda *a: None)
    run_dir = tmp_path / "run"
    assert (run_dir / "loss.png").stat().st_size > 0
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 15, 30]
    assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    assert out["end_val_loss"] < 0.8 * out["start_val_loss"]


def test_trainable_pattern_freezes_everything_else(setup):
    """``optim.trainable`` updates only matching params (here the TTT layer of the block)."""
    model, _, state, tokens = setup
    cfg = OptimConfig(learning_rate=1e-2, warmup_steps=0, trainable="seq_modeling_block")
    optimizer = training.make_optimizer(cfg, 10)
    start = training.TrainState(step=state.step, params=state.params,
                                opt_state=optimizer.init(state.params))
    new, _ = jax.jit(training.make_train_step(model, optimizer))(start, tokens[None])
    flat_old = jax.tree_util.tree_flatten_with_path(state.params)[0]
    flat_new = jax.tree.leaves(new.params)
    changed = {path_str(p): bool(jnp.any(a != b))
               for (p, a), b in zip(flat_old, flat_new)}
    trained = [p for p in changed if "seq_modeling_block" in p]
    frozen = [p for p in changed if "seq_modeling_block" not in p]
    assert trained and frozen
    assert not any(changed[p] for p in frozen), [p for p in frozen if changed[p]]
    assert all(changed[p] for p in trained), [p for p in trained if not changed[p]]


def test_bad_trainable_pattern_named():
    with pytest.raises(ValueError, match="optim.trainable"):
        OptimConfig(trainable="([")
