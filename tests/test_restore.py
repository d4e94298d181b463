"""Restoring a checkpoint into a model whose tree differs: RoPE toggled, TTT layers grafted.

The four RoPE scenarios (saved without/with RoPE, restored into RoPE off/on) restore every
array (RoPE adds no parameter) and the config difference is reported by name. A checkpoint of a
1-block TTT-LM restored into a 2-block one loads every matching array, initialises exactly the
new block's keys, and, once the new block is made a no-op, reproduces the source's logits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ttt_jax import TTTLM, ModelConfig, RunConfig, TTTConfig
from ttt_jax.checkpoint import Checkpointer, load_saved, merge_params
from ttt_jax.config import CheckpointConfig, TrainConfig
from ttt_jax.trainer import _config_differences
from ttt_jax.config import to_dict
from ttt_jax.training import TrainState

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 11)), jnp.int32)


def model_config(num_layers=1, use_rope=False, vocab=32):
    ttt = TTTConfig(model_dim=16, num_heads=2, mini_batch_size=4, use_rope=use_rope)
    return ModelConfig(vocab_size=vocab, num_layers=num_layers, intermediate_size=32, ttt=ttt)


def init(cfg, seed=0):
    return jax.jit(TTTLM(cfg).init)(jax.random.PRNGKey(seed), TOKENS)["params"]


def logits(cfg, params):
    return jax.jit(TTTLM(cfg).apply)({"params": params}, TOKENS)


def save_run(run_dir, cfg: ModelConfig, params):
    run = RunConfig(model=cfg, train=TrainConfig(run_dir=str(run_dir)),
                    checkpoint=CheckpointConfig(every=1))
    opt = optax.adam(1e-3)
    state = TrainState(step=jnp.asarray(1, jnp.int32), params=params, opt_state=opt.init(params))
    ckpt = Checkpointer(run_dir, every=1, keep=1)
    assert ckpt.save(state, run)
    ckpt.close()
    return run


def keys(tree):
    return {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory):
    runs = {}
    for rope in (False, True):
        cfg = model_config(use_rope=rope)
        params = init(cfg, seed=1)
        run_dir = tmp_path_factory.mktemp(f"rope_{rope}")
        runs[rope] = (save_run(run_dir, cfg, params), params, run_dir)
    return runs


@pytest.mark.parametrize("saved_rope", [False, True])
@pytest.mark.parametrize("target_rope", [False, True])
def test_rope_scenarios(saved_runs, saved_rope, target_rope):
    run, params, run_dir = saved_runs[saved_rope]
    state, meta = load_saved(run_dir)
    target_cfg = model_config(use_rope=target_rope)
    restored, report = merge_params(state["params"], init(target_cfg, seed=2), strict=True)
    assert report.exact and not report.missing and not report.unexpected
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    new_run = dataclasses.replace(run, model=target_cfg)
    diffs = _config_differences(meta["config"], to_dict(new_run))
    if saved_rope == target_rope:
        assert not diffs
        want, got = logits(target_cfg, params), logits(target_cfg, restored)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    else:
        assert diffs == [f"model.ttt.use_rope: {saved_rope!r} -> {target_rope!r}"]


def test_graft_new_block_reports_exactly_its_keys_and_can_be_a_no_op(tmp_path):
    source_cfg, target_cfg = model_config(num_layers=1), model_config(num_layers=2)
    source = init(source_cfg, seed=1)
    save_run(tmp_path, source_cfg, source)
    state, _ = load_saved(tmp_path)
    target = init(target_cfg, seed=2)
    grafted, report = merge_params(state["params"], target)
    new_keys = keys(target) - keys(source)
    assert new_keys and all(k.startswith("layers_1/") for k in new_keys)
    assert sorted(report.missing) == sorted(new_keys)
    assert report.unexpected == [] and report.mismatched == []
    assert sorted(report.loaded) == sorted(keys(source))
    # A residual block whose two output projections are zero adds nothing: the grafted model
    # then computes exactly the source model's logits.
    block = grafted["layers_1"]
    block["seq_modeling_block"]["o_proj"]["kernel"] = jnp.zeros_like(block["seq_modeling_block"]["o_proj"]["kernel"])
    block["mlp"]["down_proj"]["kernel"] = jnp.zeros_like(block["mlp"]["down_proj"]["kernel"])
    want, got = logits(source_cfg, source), logits(target_cfg, grafted)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    with pytest.raises(ValueError, match=r"strict restore refused(.|\n)*missing \(\d+\): layers_1/"):
        merge_params(state["params"], target, strict=True)


def test_unexpected_and_mismatched_keys_reported(tmp_path):
    bigger = init(model_config(num_layers=2, vocab=40), seed=1)
    target = init(model_config(num_layers=1, vocab=32), seed=2)
    restored, report = merge_params(bigger, target)
    assert report.unexpected and all(k.startswith("layers_1/") for k in report.unexpected)
    assert report.mismatched == ["embed_tokens/embedding float32[40, 16] vs float32[32, 16]"]
    np.testing.assert_array_equal(np.asarray(restored["embed_tokens"]["embedding"]),
                                  np.asarray(target["embed_tokens"]["embedding"]))
    np.testing.assert_array_equal(np.asarray(restored["layers_0"]["seq_norm"]["weight"]),
                                  np.asarray(bigger["layers_0"]["seq_norm"]["weight"]))
    assert "unexpected (" in str(report) and "mismatched (1)" in str(report)
    with pytest.raises(ValueError, match="strict restore refused"):
        merge_params(bigger, target, strict=True)


def test_load_saved_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_saved(tmp_path / "nowhere")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint steps"):
        load_saved(tmp_path / "empty")
