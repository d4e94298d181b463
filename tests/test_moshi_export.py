"""Moshi-TTT export to PyTorch names (moshi backbone + Moshi-TTT TTT names) and import back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("safetensors")  # the torch extra: writes and reads model.safetensors

from ttt_jax.config import apply_overrides, load_config
from ttt_jax.moshi.config import (MoshiRunConfig, MoshiTTTConfig, MoshiTransformerConfig,
                                  TTTArgs)
from ttt_jax.moshi.convert import from_state_dict, save_safetensors, to_state_dict
from ttt_jax.cli import main
from ttt_jax.moshi.export import load_torch, save_torch
from ttt_jax import registry
from ttt_jax.tree import flatten

REPO = Path(__file__).resolve().parents[1]
CFG = MoshiTTTConfig(
    transformer=MoshiTransformerConfig(d_model=32, num_heads=4, num_layers=4, dim_feedforward=96,
                                       context=8, layer_scale=0.2),
    ttt=TTTArgs(enable=True, layers="middle", mini_batch_size=4, use_rope=True, pre_norm=True),
    vocab_sizes=(11, 7))


def random_params(cfg, seed=0):
    """Params of ``cfg`` with random values (shapes from eval_shape; nothing compiled)."""
    shapes = registry.get("moshi_ttt").param_shapes(cfg)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def test_names_follow_moshi_and_moshi_ttt():
    state = to_state_dict(CFG, random_params(CFG))
    t = "transformer.layers.1."
    ttt = t + "seq_modeling_block.ttt_layer.ttt."
    d, h, f = 32, 4, 8
    want = {
        "transformer.layers.0.self_attn.in_projs.0.weight": (3 * d, d),
        "transformer.layers.0.self_attn.out_projs.0.weight": (d, d),
        "transformer.layers.0.norm1.alpha": (1, 1, d),
        "transformer.layers.0.gating.linear_in.weight": (2 * 64, d),
        "transformer.layers.0.layer_scale_2.scale": (d,),
        ttt + "wq.weight": (d, d), ttt + "wq.bias": (d,), ttt + "wo.weight": (d, d),
        ttt + "learnable_ttt_lr_weight": (h, 1, d), ttt + "learnable_ttt_lr_bias": (h, 1),
        ttt + "ttt_norm_weight": (h, f), ttt + "post_norm.weight": (d,),
        ttt + "W1": (h, f, 4 * f), ttt + "b2": (h, 1, f), ttt + "learnable_token_idx": (4,),
        t + "seq_modeling_block.forward_ssm_gating.gating_alpha": (d,),
        t + "seq_modeling_block.ttt_norm.alpha": (1, 1, d),
        "emb.1.weight": (7, d), "linears.0.weight": (11, d), "out_norm.alpha": (1, 1, d),
    }
    for k, shape in want.items():
        assert state[k].shape == shape, k
    assert not np.any(state[ttt + "wk.bias"])
    assert not any("layers.0.seq_modeling_block" in k or "layers.3.seq_modeling_block" in k
                   for k in state)  # only the middle layers are grafted


def test_save_load_round_trip_is_exact(tmp_path):
    params = random_params(CFG, 1)
    save_torch(CFG, params, tmp_path / "out")
    cfg, back = load_torch(tmp_path / "out")
    assert cfg == CFG
    a, b = flatten(params), flatten(back)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(b[k]), a[k], err_msg=k)
    with pytest.raises(FileExistsError, match="--force"):
        save_torch(CFG, params, tmp_path / "out")


def test_backbone_keys_load_into_moshi_strictly():
    torch = pytest.importorskip("torch")
    transformer = pytest.importorskip("moshi.modules.transformer")
    from ttt_jax.moshi.export import moshi_kwargs

    state = to_state_dict(CFG, random_params(CFG, 2))
    backbone = {k[len("transformer."):]: torch.from_numpy(v) for k, v in state.items()
                if k.startswith("transformer.") and "seq_modeling_block" not in k}
    ref = transformer.StreamingTransformer(**moshi_kwargs(CFG))
    ref.load_state_dict(backbone, strict=True)
    np.testing.assert_array_equal(ref.layers[2].norm2.alpha.detach().numpy(),
                                  state["transformer.layers.2.norm2.alpha"])


def test_import_refuses_bias_and_reports_missing():
    params = random_params(CFG, 3)
    state = to_state_dict(CFG, params)
    key = "transformer.layers.1.seq_modeling_block.ttt_layer.ttt.wv.bias"
    with pytest.raises(ValueError, match=f"{key} is non-zero"):
        from_state_dict(CFG, {**state, key: np.ones_like(state[key])}, params)
    partial = {k: v for k, v in state.items() if "seq_modeling_block" not in k}
    with pytest.raises(ValueError, match="require_ttt=False"):
        from_state_dict(CFG, partial, params)
    grafted, kept = from_state_dict(CFG, partial, params, require_ttt=False)
    assert kept and all("seq_modeling_block" in k for k in kept)
    # Older moshi checkpoints name the attention projections in_proj_weight / out_proj.weight.
    legacy = {k.replace("self_attn.in_projs.0.weight", "self_attn.in_proj_weight")
               .replace("self_attn.out_projs.0.weight", "self_attn.out_proj.weight"): v
              for k, v in state.items()}
    assert "transformer.layers.0.self_attn.in_proj_weight" in legacy
    again, _ = from_state_dict(CFG, legacy, params)
    for k, v in flatten(again).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(flatten(params)[k]), err_msg=k)
    with pytest.raises(ValueError, match="keys no parameter reads"):
        from_state_dict(CFG, {**state, "transformer.layers.9.norm1.alpha": state[
            "out_norm.alpha"]}, params)


def test_import_cli_then_export_cli(tmp_path, capsys):
    """moshi weights -> a run directory (TTT grafted, no-op) -> export -> the same backbone."""
    run_cfg = apply_overrides(load_config(REPO / "configs" / "moshi_ttt_tiny.yaml",
                                          MoshiRunConfig),
                              ["model.transformer.num_layers=2", "model.ttt.noop_init=true",
                               "model.ttt.layer_type=linear"])  # the cheapest to compile
    cfg = run_cfg.model
    base = dataclasses.replace(cfg, ttt=dataclasses.replace(cfg.ttt, enable=False))
    base_state = to_state_dict(base, random_params(base, 4)["transformer"], scope="transformer")
    # As a whole moshi LMModel checkpoint would store it: under "transformer.", plus other keys.
    weights = {"transformer." + k: v for k, v in base_state.items()}
    weights["depformer.layers.0.norm1.alpha"] = np.ones((1, 1, 8), np.float32)
    save_safetensors(weights, tmp_path / "moshi.safetensors")
    config = tmp_path / "run.yaml"
    from ttt_jax.config import save_config
    save_config(run_cfg, config)
    assert main(["import", "--in", str(tmp_path / "moshi.safetensors"), "--config",
                 str(config), "--out", str(tmp_path / "run"), "--prefix", "transformer."]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out",
                 str(tmp_path / "torch")]) == 0
    got_cfg, params = load_torch(tmp_path / "torch")
    assert got_cfg == cfg
    state = to_state_dict(cfg, params, scope="model")
    for k, v in weights.items():
        if k.startswith("transformer."):
            np.testing.assert_array_equal(state[k], v, err_msg=k)
    o_proj = "transformer.layers.0.seq_modeling_block.ttt_layer.ttt.wo.weight"
    assert not np.any(state[o_proj])  # the grafted block is a no-op
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # python -m ttt_jax.moshi.export is the same command (--weights is --in); a run directory
    # is never imported over, and moshi_ttt exports float32 only.
    from ttt_jax.moshi.export import main as alias
    assert alias(["import", "--weights", str(tmp_path / "moshi.safetensors"), "--config",
                  str(config), "--out", str(tmp_path / "run")]) == 2
    assert "run directory" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "y"),
                 "--dtype", "bf16"]) == 2
    assert "float32" in capsys.readouterr().err
