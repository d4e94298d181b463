"""LoRA on the Moshi models (``model.lora``): the merged export is the function the adapters
compute, judged by the real ``moshi`` package; training moves only adapters and TTT params
when the base is frozen; adapters are saved and restored like any param."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
lm_module = pytest.importorskip("moshi.models.lm")
pytest.importorskip("safetensors")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ttt_jax import registry  # noqa: E402
from ttt_jax.checkpoint import load_run  # noqa: E402
from ttt_jax.moshi.lm import MoshiLM  # noqa: E402
from ttt_jax.moshi.lm_config import (MoshiLMRunConfig, from_moshi_lm_kwargs,  # noqa: E402
                                     moshi_lm_kwargs)
from ttt_jax.moshi.lm_convert import from_lm_state_dict, load_lm  # noqa: E402
from ttt_jax.nn.lora import LoRAConfig  # noqa: E402
from ttt_jax.tree import flatten  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KW = dict(card=11, text_card=13, dim=32, num_heads=4, num_layers=2, hidden_scale=4, context=6,
          causal=True, gating="silu", positional_embedding="rope", max_period=10000,
          depformer_dim=16, depformer_num_heads=2, delays=[0, 1, 0], n_q=2, dep_q=2,
          norm="rms_norm_f32", layer_scale=None, depformer_num_layers=1,
          depformer_multi_linear=False, depformer_weights_per_step=False,
          depformer_pos_emb="none")
LORA = LoRAConfig(enable=True, rank=3, scaling=0.7)


def outputs(out):
    return {k: np.asarray(getattr(out, k)) for k in ("logits", "text_logits")}


def test_merged_export_computes_the_adapted_model_in_moshi(tmp_path):
    torch.manual_seed(0)
    ref = lm_module.LMModel(**KW).eval()
    base_cfg = from_moshi_lm_kwargs(KW)
    cfg = dataclasses.replace(base_cfg, lora=LORA)
    rng = np.random.default_rng(0)
    codes = np.concatenate([rng.integers(0, 13, (2, 1, 8)), rng.integers(0, 11, (2, 2, 8))],
                           axis=1)
    shapes = jax.eval_shape(MoshiLM(cfg).init, jax.random.PRNGKey(0), jnp.asarray(codes))
    target = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes["params"])
    params, kept = from_lm_state_dict(cfg, ref.state_dict(), target)
    # every adapter is left at its target value by the import; give them all non-zero values
    flat = flatten(params)
    adapters = [k for k in flat if k.endswith(("lora_a", "lora_b"))]
    assert len(adapters) == 4 * 2 * 2 and sorted(kept) == sorted(adapters)
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: (0.3 * rng.standard_normal(v.shape)).astype(np.float32)
        if jax.tree_util.keystr(p).endswith(("'lora_a']", "'lora_b']")) else v, params)
    ours = outputs(jax.jit(MoshiLM(cfg).apply)({"params": params}, jnp.asarray(codes)))
    with torch.no_grad():
        plain = ref(torch.from_numpy(codes))
    assert np.nanmax(np.abs(ours["logits"] - plain.logits.numpy())) > 1e-2  # adapters matter

    run = MoshiLMRunConfig(model=cfg)
    registry.of(run).export(run, params, tmp_path / "out")
    exported_cfg, exported = load_lm(tmp_path / "out")
    assert exported_cfg == base_cfg  # the plain model: LoRA off, adapters merged
    assert not any("lora" in k for k in flatten(exported))
    fresh = lm_module.LMModel(**moshi_lm_kwargs(exported_cfg)).eval()
    from safetensors.torch import load_file

    fresh.load_state_dict(load_file(str(tmp_path / "out" / "model.safetensors")), strict=True)
    with torch.no_grad():
        theirs = fresh(torch.from_numpy(codes))
    for key, value in (("logits", theirs.logits), ("text_logits", theirs.text_logits)):
        np.testing.assert_array_equal(np.isnan(ours[key]), np.isnan(value.numpy()))
        assert np.nanmax(np.abs(ours[key] - value.numpy())) <= 1e-4, key


def test_training_moves_only_adapters_and_ttt_and_restores_them(tmp_path, train_main):
    run_dir = tmp_path / "run"
    argv = ["--config", str(REPO / "configs" / "moshi_ttt_tiny.yaml"),
            "--set", "model.lora.enable=true", "--set", "model.lora.rank=2",
            "--set", "model.transformer.num_layers=2", "--set", "model.ttt.layer_type=linear",
            "--set", "data.seq_len=16", "--set", "train.eval_batches=1",
            "--set", "train.log_every=1", "--set", "checkpoint.every=2",
            "--set", f"train.run_dir={run_dir}"]
    assert train_main([*argv, "--set", "train.steps=4"]) == 0
    straight = flatten(load_run(run_dir).params)
    saved = load_run(run_dir / "checkpoints" / "2")
    arch = registry.of(saved.config)
    # the run's own initial params: its init, jitted as the trainer does (seed 0)
    init = flatten(jax.jit(lambda k: arch.init_params(saved.config.model, k))(
        jax.random.PRNGKey(0)))
    after = flatten(saved.params)
    assert set(init) == set(after)
    moved = {k for k in after if not np.array_equal(np.asarray(after[k]), np.asarray(init[k]))}
    adapters = {k for k in after if k.endswith("lora_b")}
    assert adapters and adapters <= moved  # zero at init, trained since
    assert any("seq_modeling_block" in k for k in moved)
    backbone = {k for k in after if arch.param_group(k) == "backbone"}
    assert backbone and not (moved & backbone), sorted(moved & backbone)[:3]

    # killed after step 2 was saved: the resumed run's adapters equal the straight run's
    shutil.rmtree(run_dir / "checkpoints" / "4")
    assert train_main([*argv, "--set", "train.steps=4"]) == 0
    resumed = flatten(load_run(run_dir).params)
    for k in adapters:
        np.testing.assert_array_equal(np.asarray(resumed[k]), np.asarray(straight[k]), err_msg=k)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2, 3, 4]
